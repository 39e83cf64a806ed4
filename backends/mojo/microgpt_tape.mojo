# The `mojo-tape` backend's compute: the scalar autograd tape of the suite's `python` backend
# (backends/python_tape.py), compiled. Built as a Python extension module by
# backends/mojo_backend.py.
#
# Same algorithm and the same nodes as the pure-Python tape, so that the results table separates
# what compiling the tape buys from what changing the algorithm (microgpt_native.mojo) buys:
# - every node is one scalar, stored structure-of-arrays: value[i], grad[i], and its children
#   as edges child[e], local[e] (d node / d child) for e in [edge_end[i-1], edge_end[i]);
# - nodes 0..n_params-1 are the parameters (the spec's draw order) and stay on the tape; every
#   other node is appended by the forward pass and dropped after the step;
# - the python backend's coarse nodes: a linear layer's output (a dot product with 2 * in
#   children), an attention score, an attention-weighted value sum, an rmsnorm scale, a softmax
#   output and a per-position cross-entropy are one node each, local gradients written out;
# - backward walks the tape in reverse creation order (children are always older than their
#   parents), adding local * grad into each child; Adam then updates the parameter nodes.
# One difference of layout, not of graph: a vector is a contiguous range of nodes rather than a
# list of indices, so each layer's attention outputs are appended after all heads' weights.
# Sampling builds the same graph position by position with a cache of key/value node indices.

from std.math import exp, log, sqrt
from std.os import abort
from std.python import Python, PythonObject
from std.python.bindings import PythonModuleBuilder

comptime RMS_EPS = 1e-5


struct TapeModel[dtype: DType](Movable, Writable) where dtype.is_floating_point():
    """The tape (parameters first) and the Adam moments of one backend instance."""

    comptime Scalar = Scalar[Self.dtype]

    # Sizes.
    var vocab: Int
    var n_embd: Int
    var n_head: Int
    var head_dim: Int
    var n_layer: Int
    var block: Int
    var hidden: Int
    var n_params: Int
    var beta1: Float64
    var beta2: Float64
    var eps: Float64

    # The tape, structure of arrays; the Lists only grow (capacity is kept between steps).
    var value: List[Self.Scalar]
    var grad: List[Self.Scalar]
    var edge_end: List[Int]
    var child: List[Int]
    var local: List[Self.Scalar]
    var n_nodes: Int
    var n_edges: Int

    var adam_m: List[Self.Scalar]
    var adam_v: List[Self.Scalar]

    # First node of the key / value vector of (layer, position): the key/value cache.
    var key_node: List[Int]
    var value_node: List[Int]
    var cache_length: Int
    var tokens: List[Int]
    var loss_nodes: List[Int]
    var gather_a: List[Int]  # child lists of the attention-weighted value sums
    var gather_b: List[Int]
    var head_weights: List[Int]  # first node of each head's softmax weights
    var probs: List[Self.Scalar]  # softmax scratch

    def __init__(
        out self,
        vocab: Int,
        n_embd: Int,
        n_head: Int,
        n_layer: Int,
        block: Int,
        beta1: Float64,
        beta2: Float64,
        eps: Float64,
    ) raises:
        if vocab < 1 or n_embd < 1 or n_head < 1 or n_layer < 1 or block < 1:
            raise Error("TapeModel: every size must be >= 1")
        if n_embd % n_head != 0:
            raise Error("TapeModel: n_embd must be divisible by n_head")
        self.vocab = vocab
        self.n_embd = n_embd
        self.n_head = n_head
        self.head_dim = n_embd // n_head
        self.n_layer = n_layer
        self.block = block
        self.hidden = 4 * n_embd
        var C = n_embd
        self.n_params = 2 * vocab * C + block * C + n_layer * (4 * C * C + 2 * self.hidden * C)
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps
        # Room for the parameters and a first sequence; grown by doubling when needed.
        var node_capacity = 4 * self.n_params
        self.value = List[Self.Scalar](length=node_capacity, fill=0)
        self.grad = List[Self.Scalar](length=node_capacity, fill=0)
        self.edge_end = List[Int](length=node_capacity, fill=0)
        self.child = List[Int](length=node_capacity, fill=0)
        self.local = List[Self.Scalar](length=node_capacity, fill=0)
        self.n_nodes = self.n_params
        self.n_edges = 0
        self.adam_m = List[Self.Scalar](length=self.n_params, fill=0)
        self.adam_v = List[Self.Scalar](length=self.n_params, fill=0)
        self.key_node = List[Int](length=n_layer * block, fill=0)
        self.value_node = List[Int](length=n_layer * block, fill=0)
        self.cache_length = 0
        self.tokens = List[Int](length=block + 1, fill=0)
        self.loss_nodes = List[Int](length=block, fill=0)
        self.gather_a = List[Int](length=block, fill=0)
        self.gather_b = List[Int](length=block, fill=0)
        self.head_weights = List[Int](length=n_head, fill=0)
        self.probs = List[Self.Scalar](length=max(block, vocab), fill=0)

    def write_to(self, mut writer: Some[Writer]):
        writer.write("TapeModel[", Self.dtype, "](params=", self.n_params, ")")

    def write_repr_to(self, mut writer: Some[Writer]):
        self.write_to(writer)

    # ---- parameter node offsets (the spec's draw order) --------------------------------------
    def wpe(self) -> Int:
        return self.vocab * self.n_embd

    def lm_head(self) -> Int:
        return self.wpe() + self.block * self.n_embd

    def layer_params(self, layer: Int) -> Int:
        """First node of layer{layer}.attn_wq; wk, wv, wo, fc1, fc2 follow it."""
        var C = self.n_embd
        return self.lm_head() + self.vocab * C + layer * (4 * C * C + 2 * self.hidden * C)

    # ---- the tape ----------------------------------------------------------------------------
    def truncate(mut self):
        """Drops every node but the parameters."""
        self.n_nodes = self.n_params
        self.n_edges = 0
        self.cache_length = 0

    @always_inline
    def new_node(mut self, node_value: Self.Scalar, children: Int) -> Int:
        """Appends a node whose `children` edges the caller appends next; returns its index."""
        if self.n_nodes == len(self.value):
            var capacity = 2 * len(self.value)
            self.value.resize(capacity, 0)
            self.grad.resize(capacity, 0)
            self.edge_end.resize(capacity, 0)
        if self.n_edges + children > len(self.child):
            var capacity = 2 * (self.n_edges + children)
            self.child.resize(capacity, 0)
            self.local.resize(capacity, 0)
        var index = self.n_nodes
        self.value[index] = node_value
        self.edge_end[index] = self.n_edges + children
        self.n_nodes += 1
        return index

    @always_inline
    def edge(mut self, child: Int, local_gradient: Self.Scalar):
        self.child[self.n_edges] = child
        self.local[self.n_edges] = local_gradient
        self.n_edges += 1

    # ---- operations; each appends one node and returns it ------------------------------------
    def add(mut self, a: Int, b: Int) -> Int:
        var node = self.new_node(self.value[a] + self.value[b], 2)
        self.edge(a, 1)
        self.edge(b, 1)
        return node

    def relu(mut self, a: Int) -> Int:
        var va = self.value[a]
        var node = self.new_node(Self.Scalar(0) if va < 0 else va, 1)
        self.edge(a, Self.Scalar(1) if va > 0 else Self.Scalar(0))
        return node

    def dot(mut self, a: Int, b: Int, n: Int) -> Int:
        """One node: sum_i a_i * b_i over the contiguous node ranges a.., b..; 2n children."""
        var total = Self.Scalar(0)
        for i in range(n):
            total += self.value[a + i] * self.value[b + i]
        var node = self.new_node(total, 2 * n)
        for i in range(n):
            self.edge(a + i, self.value[b + i])
            self.edge(b + i, self.value[a + i])
        return node

    def scaled_dot(mut self, a: Int, b: Int, n: Int, factor: Self.Scalar) -> Int:
        """One node: (a . b) * factor (an attention score); 2n children."""
        var total = Self.Scalar(0)
        for i in range(n):
            total += self.value[a + i] * self.value[b + i]
        var node = self.new_node(total * factor, 2 * n)
        for i in range(n):
            self.edge(a + i, self.value[b + i] * factor)
            self.edge(b + i, self.value[a + i] * factor)
        return node

    def dot_gathered(mut self, n: Int) -> Int:
        """As dot, over the node lists gather_a[:n] and gather_b[:n]."""
        var total = Self.Scalar(0)
        for i in range(n):
            total += self.value[self.gather_a[i]] * self.value[self.gather_b[i]]
        var node = self.new_node(total, 2 * n)
        for i in range(n):
            self.edge(self.gather_a[i], self.value[self.gather_b[i]])
            self.edge(self.gather_b[i], self.value[self.gather_a[i]])
        return node

    def softmax_probabilities(mut self, x: Int, n: Int):
        """Fills self.probs[:n] with softmax(values of x..x+n) in the original's order of
        operations: maximum subtracted, exp, 1 / sum, multiply."""
        var top = self.value[x]
        for i in range(1, n):
            top = max(top, self.value[x + i])
        var total = Self.Scalar(0)
        for i in range(n):
            var e = exp(self.value[x + i] - top)
            self.probs[i] = e
            total += e
        var inverse_total = 1 / total
        for i in range(n):
            self.probs[i] *= inverse_total

    # ---- layers on vectors (a vector is a contiguous range of nodes: its first index) ----------
    def linear(mut self, x: Int, weights: Int, n_out: Int, n_in: Int) -> Int:
        """W @ x for W [n_out, n_in] parameter nodes: n_out dot nodes."""
        var first = self.n_nodes
        for o in range(n_out):
            _ = self.dot(weights + o * n_in, x, n_in)
        return first

    def add_vectors(mut self, a: Int, b: Int, n: Int) -> Int:
        var first = self.n_nodes
        for i in range(n):
            _ = self.add(a + i, b + i)
        return first

    def rmsnorm(mut self, x: Int, n: Int) -> Int:
        """One node for the scale s = (mean(x*x) + eps) ** -0.5 (children: x), then x_i * s."""
        var total = Self.Scalar(0)
        for i in range(n):
            total += self.value[x + i] * self.value[x + i]
        var mean_square = total * (Self.Scalar(1) / Self.Scalar(n))
        var s = (mean_square + Self.Scalar(RMS_EPS)) ** -0.5
        # d s / d x_i = -0.5 (ms + eps)^-1.5 * 2 x_i / n = -s^3 x_i / n
        var factor = -(s * s * s) / Self.Scalar(n)
        var scale = self.new_node(s, n)
        for i in range(n):
            self.edge(x + i, factor * self.value[x + i])
        var first = self.n_nodes
        for i in range(n):
            var xv = self.value[x + i]
            _ = self.new_node(xv * s, 2)
            self.edge(x + i, s)
            self.edge(scale, xv)
        return first

    def softmax(mut self, x: Int, n: Int) -> Int:
        """Appends n nodes p_i, each with every x_j as a child:
        d p_i / d x_j = p_i (delta_ij - p_j)."""
        self.softmax_probabilities(x, n)
        var first = self.n_nodes
        for i in range(n):
            var p_i = self.probs[i]
            _ = self.new_node(p_i, n)
            for j in range(n):
                var delta = Self.Scalar(1) if i == j else Self.Scalar(0)
                self.edge(x + j, p_i * (delta - self.probs[j]))
        return first

    def cross_entropy(mut self, logits: Int, n: Int, target: Int) -> Int:
        """One node: -log softmax(logits)[target]; d / d l_j = p_j - delta_j,target."""
        self.softmax_probabilities(logits, n)
        var node = self.new_node(-log(self.probs[target]), n)
        for j in range(n):
            var delta = Self.Scalar(1) if j == target else Self.Scalar(0)
            self.edge(logits + j, self.probs[j] - delta)
        return node

    # ---- the model -----------------------------------------------------------------------------
    def forward_position(mut self, token: Int, position: Int) -> Int:
        """The graph of one position (microgpt.py's gpt()); returns the first logits node."""
        var C = self.n_embd
        var F = self.hidden
        var D = self.head_dim
        var S = self.block
        var inverse_sqrt = 1 / sqrt(Self.Scalar(D))
        var x = self.add_vectors(token * C, self.wpe() + position * C, C)
        x = self.rmsnorm(x, C)
        for layer in range(self.n_layer):
            var w = self.layer_params(layer)
            var residual = x
            x = self.rmsnorm(x, C)
            var q = self.linear(x, w, C, C)
            self.key_node[layer * S + position] = self.linear(x, w + C * C, C, C)
            self.value_node[layer * S + position] = self.linear(x, w + 2 * C * C, C, C)
            var length = position + 1
            for h in range(self.n_head):
                var scores = self.n_nodes
                for j in range(length):
                    _ = self.scaled_dot(
                        q + h * D, self.key_node[layer * S + j] + h * D, D, inverse_sqrt
                    )
                self.head_weights[h] = self.softmax(scores, length)
            # Every head's outputs after all the weights, so that they form one vector.
            var attended = self.n_nodes
            for h in range(self.n_head):
                for d in range(D):
                    for j in range(length):
                        self.gather_a[j] = self.head_weights[h] + j
                        self.gather_b[j] = self.value_node[layer * S + j] + h * D + d
                    _ = self.dot_gathered(length)
            x = self.add_vectors(self.linear(attended, w + 3 * C * C, C, C), residual, C)
            residual = x
            var hidden = self.linear(self.rmsnorm(x, C), w + 4 * C * C, F, C)
            var activated = self.n_nodes
            for i in range(F):
                _ = self.relu(hidden + i)
            x = self.add_vectors(self.linear(activated, w + 4 * C * C + F * C, C, F), residual, C)
        return self.linear(x, self.lm_head(), self.vocab, C)

    def read_tokens(mut self, sequence: PythonObject) raises -> Int:
        """Copies one token list into self.tokens, checking it; returns n = len - 1."""
        ref cpython = Python().cpython()
        var length = Int(cpython.PyObject_Length(sequence._obj_ptr))
        if length < 2 or length > self.block + 1:
            cpython.PyErr_Clear()
            raise Error(
                String(
                    "train_step: a token list must hold 2 to block_size + 1 tokens, got ", length
                )
            )
        for i in range(length):
            var item = cpython.PyList_GetItem(sequence._obj_ptr, i)
            if not item:
                cpython.PyErr_Clear()
                raise Error("train_step: tokens must be a list of ints")
            var token = Int(cpython.PyLong_AsSsize_t(item))
            if token == -1 and cpython.PyErr_Occurred():
                cpython.PyErr_Clear()
                raise Error("train_step: tokens must be Python ints")
            if token < 0 or token >= self.vocab:
                cpython.PyErr_Clear()
                raise Error(
                    String("train_step: token ", token, " is outside [0, ", self.vocab, ")")
                )
            self.tokens[i] = token
        return length - 1

    def loss_and_backward(mut self, n: Int) -> Float64:
        """Builds the graph of the loss over the n positions in self.tokens, then walks it
        backwards; the parameters' gradients are in grad[0:n_params]."""
        self.truncate()
        for t in range(n):
            var logits = self.forward_position(self.tokens[t], t)
            self.loss_nodes[t] = self.cross_entropy(logits, self.vocab, self.tokens[t + 1])
        # The mean over positions, one node: (1 / n) * sum(losses).
        var total = Self.Scalar(0)
        for t in range(n):
            total += self.value[self.loss_nodes[t]]
        var mean = Self.Scalar(1) / Self.Scalar(n)
        var loss = self.new_node(total * mean, n)
        for t in range(n):
            self.edge(self.loss_nodes[t], mean)

        var grad = self.grad.unsafe_ptr()
        var edge_end = self.edge_end.unsafe_ptr()
        var child = self.child.unsafe_ptr()
        var local = self.local.unsafe_ptr()
        for i in range(self.n_nodes):
            grad[unsafe_offset=i] = 0
        grad[unsafe_offset=loss] = 1
        # Reverse creation order is a topological order: children are older than parents.
        var node = self.n_nodes - 1
        while node >= self.n_params:
            var g = grad[unsafe_offset=node]
            if g != 0:
                var first_edge = edge_end[unsafe_offset=node - 1]
                for e in range(first_edge, edge_end[unsafe_offset=node]):
                    grad[unsafe_offset=child[unsafe_offset=e]] += local[unsafe_offset=e] * g
            node -= 1
        return Float64(self.value[loss])

    def adam(
        mut self, learning_rate: Float64, bias_correction1: Float64, bias_correction2: Float64
    ):
        """Adam on the parameter nodes, one scalar at a time in the python backend's order:
        p -= lr * (m / bc1) / ((v / bc2) ** 0.5 + eps)."""
        var b1 = Self.Scalar(self.beta1)
        var b2 = Self.Scalar(self.beta2)
        var one_minus_b1 = Self.Scalar(1 - self.beta1)
        var one_minus_b2 = Self.Scalar(1 - self.beta2)
        var eps = Self.Scalar(self.eps)
        var lr = Self.Scalar(learning_rate)
        var bc1 = Self.Scalar(bias_correction1)
        var bc2 = Self.Scalar(bias_correction2)
        for i in range(self.n_params):
            var g = self.grad[i]
            self.adam_m[i] = b1 * self.adam_m[i] + one_minus_b1 * g
            self.adam_v[i] = b2 * self.adam_v[i] + one_minus_b2 * g * g
            self.value[i] -= lr * (self.adam_m[i] / bc1) / (sqrt(self.adam_v[i] / bc2) + eps)

    # ---- Python-facing methods ---------------------------------------------------------------
    @staticmethod
    def py_init(out self: Self, args: PythonObject, kwargs: PythonObject) raises:
        """TapeModelXX(vocab, n_embd, n_head, n_layer, block_size, beta1, beta2, eps)."""
        if len(args) != 8:
            raise Error("TapeModel(vocab, n_embd, n_head, n_layer, block_size, beta1, beta2, eps)")
        self = Self(
            Int(py=args[0]),
            Int(py=args[1]),
            Int(py=args[2]),
            Int(py=args[3]),
            Int(py=args[4]),
            Float64(py=args[5]),
            Float64(py=args[6]),
            Float64(py=args[7]),
        )

    @staticmethod
    def py_num_parameters(self_ptr: Pointer[Self, MutAnyOrigin]) -> PythonObject:
        return PythonObject(self_ptr[].n_params)

    @staticmethod
    def py_load_parameters(
        self_ptr: Pointer[Self, MutAnyOrigin], address: PythonObject, count: PythonObject
    ) raises -> PythonObject:
        """Reads n_params float64 values at `address` into the parameter nodes and zeroes the
        Adam moments."""
        ref model = self_ptr[]
        if Int(py=count) != model.n_params:
            raise Error(String("load_parameters: expected ", model.n_params, " values"))
        model.truncate()
        var source = Pointer[Float64, MutUntrackedOrigin](unsafe_from_address=Int(py=address))
        for i in range(model.n_params):
            model.value[i] = source[unsafe_offset=i].cast[Self.dtype]()
            model.adam_m[i] = 0
            model.adam_v[i] = 0
        return PythonObject(None)

    @staticmethod
    def py_copy_parameters(
        self_ptr: Pointer[Self, MutAnyOrigin], address: PythonObject, count: PythonObject
    ) raises -> PythonObject:
        ref model = self_ptr[]
        if Int(py=count) != model.n_params:
            raise Error(String("copy_parameters: expected room for ", model.n_params))
        var target = Pointer[Float64, MutUntrackedOrigin](unsafe_from_address=Int(py=address))
        for i in range(model.n_params):
            target[unsafe_offset=i] = model.value[i].cast[DType.float64]()
        return PythonObject(None)

    @staticmethod
    def py_copy_moments(
        self_ptr: Pointer[Self, MutAnyOrigin],
        m_address: PythonObject,
        v_address: PythonObject,
        count: PythonObject,
    ) raises -> PythonObject:
        """Writes Adam's first and second moments as n_params float64 values each at
        `m_address` and `v_address` (draw order)."""
        ref model = self_ptr[]
        if Int(py=count) != model.n_params:
            raise Error(String("copy_moments: expected room for ", model.n_params))
        var m = Pointer[Float64, MutUntrackedOrigin](unsafe_from_address=Int(py=m_address))
        var v = Pointer[Float64, MutUntrackedOrigin](unsafe_from_address=Int(py=v_address))
        for i in range(model.n_params):
            m[unsafe_offset=i] = model.adam_m[i].cast[DType.float64]()
            v[unsafe_offset=i] = model.adam_v[i].cast[DType.float64]()
        return PythonObject(None)

    @staticmethod
    def py_train_step(
        self_ptr: Pointer[Self, MutAnyOrigin],
        tokens: PythonObject,
        learning_rate: PythonObject,
        bias_correction1: PythonObject,
        bias_correction2: PythonObject,
    ) raises -> PythonObject:
        """One step on one token list: build the graph, backward, Adam; returns the loss."""
        ref model = self_ptr[]
        var n = model.read_tokens(tokens)
        var loss = model.loss_and_backward(n)
        model.adam(
            Float64(py=learning_rate), Float64(py=bias_correction1), Float64(py=bias_correction2)
        )
        model.truncate()
        return PythonObject(loss)

    @staticmethod
    def py_loss_and_gradients(
        self_ptr: Pointer[Self, MutAnyOrigin], tokens: PythonObject, address: PythonObject
    ) raises -> PythonObject:
        """Loss, with the parameter gradients written as n_params float64 values at
        `address`; no update (for tests)."""
        ref model = self_ptr[]
        var n = model.read_tokens(tokens)
        var loss = model.loss_and_backward(n)
        var target = Pointer[Float64, MutUntrackedOrigin](unsafe_from_address=Int(py=address))
        for i in range(model.n_params):
            target[unsafe_offset=i] = model.grad[i].cast[DType.float64]()
        model.truncate()
        return PythonObject(loss)

    @staticmethod
    def py_tape_size(
        self_ptr: Pointer[Self, MutAnyOrigin], tokens: PythonObject
    ) raises -> PythonObject:
        """(nodes, edges) of the training graph of one token list, parameters included."""
        ref model = self_ptr[]
        var n = model.read_tokens(tokens)
        _ = model.loss_and_backward(n)
        var result = Python.tuple(model.n_nodes, model.n_edges)
        model.truncate()
        return result

    @staticmethod
    def py_reset_cache(self_ptr: Pointer[Self, MutAnyOrigin]) -> PythonObject:
        self_ptr[].truncate()
        return PythonObject(None)

    @staticmethod
    def py_next_logits(
        self_ptr: Pointer[Self, MutAnyOrigin],
        token: PythonObject,
        position: PythonObject,
        address: PythonObject,
    ) raises -> PythonObject:
        """Logits of `token` at `position` (the cache length), as V float64 at `address`."""
        ref model = self_ptr[]
        var token_id = Int(py=token)
        var p = Int(py=position)
        if token_id < 0 or token_id >= model.vocab:
            raise Error(String("next_logits: token ", token_id, " outside [0, ", model.vocab, ")"))
        if p != model.cache_length or p >= model.block:
            raise Error(
                String(
                    "next_logits: position ",
                    p,
                    " must equal the cache length ",
                    model.cache_length,
                    " and be < block_size",
                )
            )
        var logits = model.forward_position(token_id, p)
        model.cache_length += 1
        var target = Pointer[Float64, MutUntrackedOrigin](unsafe_from_address=Int(py=address))
        for i in range(model.vocab):
            target[unsafe_offset=i] = model.value[logits + i].cast[DType.float64]()
        return PythonObject(None)


def bind_model[
    dtype: DType
](mut module: PythonModuleBuilder, name: StaticString) raises where dtype.is_floating_point():
    comptime M = TapeModel[dtype]
    _ = (
        module.add_type[M](name)
        .def_py_init[M.py_init]()
        .def_method[M.py_num_parameters]("num_parameters")
        .def_method[M.py_load_parameters]("load_parameters")
        .def_method[M.py_copy_parameters]("copy_parameters")
        .def_method[M.py_copy_moments]("copy_moments")
        .def_method[M.py_train_step]("train_step")
        .def_method[M.py_loss_and_gradients]("loss_and_gradients")
        .def_method[M.py_tape_size]("tape_size")
        .def_method[M.py_reset_cache]("reset_cache")
        .def_method[M.py_next_logits]("next_logits")
    )


def noop() -> PythonObject:
    """Does nothing: times the bare Python -> Mojo call."""
    return PythonObject(None)


@export
def PyInit_microgpt_tape() abi("C") -> PythonObject:
    try:
        var module = PythonModuleBuilder("microgpt_tape")
        module.def_function[noop]("noop")
        bind_model[DType.float32](module, "TapeModel32")
        bind_model[DType.float64](module, "TapeModel64")
        return module.finalize()
    except e:
        abort(String("failed to create the microgpt_tape module: ", e))
