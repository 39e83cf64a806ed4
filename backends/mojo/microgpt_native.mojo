# The `mojo` backend's compute: the spec (SPEC.md) on contiguous buffers, as a Python extension
# module built by backends/mojo_backend.py (`mojo build --emit shared-lib`).
#
# `NativeModel[dtype]` (bound to Python as NativeModel32 and NativeModel64) owns every buffer
# between steps: parameters, gradients and Adam moments as flat arrays in the spec's draw order
# (the layout of backends/numpy_backend.py's flat buffer), and the activations of one sequence
# (block_size rows), which double as the key/value cache when sampling. One `train_step` call
# runs the forward pass position by position, the hand-derived backward pass of
# numpy_backend.NumpyBackend._backward, and Adam, and returns the loss.
#
# Shapes: T positions (<= S = block_size), C = n_embd, H heads, D = head_dim, F = 4C, V = vocab.
# Weights are [out, in] row-major, so the forward matvec is a dot product per output row and
# both backward products (weight and input gradients) run along contiguous rows: SIMD along
# `in`, with four independent accumulators so that the FMA latency is hidden.

from std.math import exp, log, sqrt
from std.os import abort
from std.python import Python, PythonObject
from std.python.bindings import PythonModuleBuilder
from std.sys import simd_width_of

comptime RMS_EPS = 1e-5


# ---- raw buffer views ---------------------------------------------------------------------------
@fieldwise_init
struct Buf[dtype: DType](ImplicitlyCopyable):
    """A view into a buffer owned by a NativeModel List: indexing and SIMD load/store."""

    var ptr: Pointer[Scalar[Self.dtype], MutUntrackedOrigin]

    @always_inline
    def __getitem__(self, i: Int) -> Scalar[Self.dtype]:
        return self.ptr[unsafe_offset=i]

    @always_inline
    def __setitem__(self, i: Int, value: Scalar[Self.dtype]):
        self.ptr[unsafe_offset=i] = value

    @always_inline
    def load[width: Int](self, i: Int) -> SIMD[Self.dtype, width]:
        return self.ptr.unsafe_load[width=width](i)

    @always_inline
    def store[width: Int](self, i: Int, value: SIMD[Self.dtype, width]):
        self.ptr.unsafe_store(i, value)

    @always_inline
    def at(self, offset: Int) -> Self:
        return Self(self.ptr.unsafe_offset(offset))


@always_inline
def view[dtype: DType](mut values: List[Scalar[dtype]]) -> Buf[dtype]:
    return Buf[dtype](values.unsafe_ptr().unsafe_origin_cast[MutUntrackedOrigin]())


# ---- vector kernels (n is a runtime length; SIMD chunks, then a scalar tail) --------------------
@always_inline
def dot[dtype: DType](a: Buf[dtype], b: Buf[dtype], n: Int) -> Scalar[dtype]:
    comptime W = simd_width_of[dtype]()
    var acc0 = SIMD[dtype, W](0)
    var acc1 = SIMD[dtype, W](0)
    var i = 0
    while i + 2 * W <= n:
        acc0 += a.load[W](i) * b.load[W](i)
        acc1 += a.load[W](i + W) * b.load[W](i + W)
        i += 2 * W
    if i + W <= n:
        acc0 += a.load[W](i) * b.load[W](i)
        i += W
    var total = (acc0 + acc1).reduce_add()
    while i < n:
        total += a[i] * b[i]
        i += 1
    return total


@always_inline
def axpy[dtype: DType](y: Buf[dtype], alpha: Scalar[dtype], x: Buf[dtype], n: Int):
    """Computes y += alpha * x."""
    comptime W = simd_width_of[dtype]()
    var i = 0
    while i + W <= n:
        y.store[W](i, y.load[W](i) + alpha * x.load[W](i))
        i += W
    while i < n:
        y[i] += alpha * x[i]
        i += 1


@always_inline
def add_into[dtype: DType](y: Buf[dtype], a: Buf[dtype], b: Buf[dtype], n: Int):
    """Computes y = a + b (y may alias a or b)."""
    comptime W = simd_width_of[dtype]()
    var i = 0
    while i + W <= n:
        y.store[W](i, a.load[W](i) + b.load[W](i))
        i += W
    while i < n:
        y[i] = a[i] + b[i]
        i += 1


@always_inline
def scale_into[dtype: DType](y: Buf[dtype], x: Buf[dtype], s: Scalar[dtype], n: Int):
    """Computes y = x * s."""
    comptime W = simd_width_of[dtype]()
    var i = 0
    while i + W <= n:
        y.store[W](i, x.load[W](i) * s)
        i += W
    while i < n:
        y[i] = x[i] * s
        i += 1


@always_inline
def fill[dtype: DType](y: Buf[dtype], value: Scalar[dtype], n: Int):
    comptime W = simd_width_of[dtype]()
    var i = 0
    while i + W <= n:
        y.store[W](i, SIMD[dtype, W](value))
        i += W
    while i < n:
        y[i] = value
        i += 1


@always_inline
def rms_scale[dtype: DType](x: Buf[dtype], n: Int) -> Scalar[dtype] where dtype.is_floating_point():
    """(mean(x*x) + eps) ** -0.5, kept for the backward pass."""
    var mean_square = dot(x, x, n) / Scalar[dtype](n)
    return 1 / sqrt(mean_square + Scalar[dtype](RMS_EPS))


@always_inline
def rmsnorm_backward_acc[
    dtype: DType
](dx: Buf[dtype], x: Buf[dtype], s: Scalar[dtype], dy: Buf[dtype], n: Int):
    """Adds the rmsnorm backward to dx, for y = x * s, s = (mean(x^2) + eps)^-1/2:
    s * dy - s^3 * x * mean(dy * x)."""
    var coefficient = s * s * s * dot(dy, x, n) / Scalar[dtype](n)
    comptime W = simd_width_of[dtype]()
    var i = 0
    while i + W <= n:
        dx.store[W](i, dx.load[W](i) + s * dy.load[W](i) - coefficient * x.load[W](i))
        i += W
    while i < n:
        dx[i] += s * dy[i] - coefficient * x[i]
        i += 1


def softmax_inplace[dtype: DType](x: Buf[dtype], n: Int) where dtype.is_floating_point():
    """Softmax with the maximum subtracted before exp (the spec's order)."""
    var top = x[0]
    for i in range(1, n):
        top = max(top, x[i])
    var total = Scalar[dtype](0)
    for i in range(n):
        var e = exp(x[i] - top)
        x[i] = e
        total += e
    for i in range(n):
        x[i] = x[i] / total


# ---- matrix kernels: W is [n_out, n_in] row-major ---------------------------------------------
def matvec[dtype: DType](y: Buf[dtype], w: Buf[dtype], x: Buf[dtype], n_out: Int, n_in: Int):
    """Computes y[o] = W[o, :] . x, four output rows at a time (they share the loads of x)."""
    comptime Wd = simd_width_of[dtype]()
    var o = 0
    while o + 4 <= n_out:
        var r0 = w.at(o * n_in)
        var r1 = w.at((o + 1) * n_in)
        var r2 = w.at((o + 2) * n_in)
        var r3 = w.at((o + 3) * n_in)
        var a0 = SIMD[dtype, Wd](0)
        var a1 = SIMD[dtype, Wd](0)
        var a2 = SIMD[dtype, Wd](0)
        var a3 = SIMD[dtype, Wd](0)
        var i = 0
        while i + Wd <= n_in:
            var xv = x.load[Wd](i)
            a0 += r0.load[Wd](i) * xv
            a1 += r1.load[Wd](i) * xv
            a2 += r2.load[Wd](i) * xv
            a3 += r3.load[Wd](i) * xv
            i += Wd
        var s0 = a0.reduce_add()
        var s1 = a1.reduce_add()
        var s2 = a2.reduce_add()
        var s3 = a3.reduce_add()
        while i < n_in:
            s0 += r0[i] * x[i]
            s1 += r1[i] * x[i]
            s2 += r2[i] * x[i]
            s3 += r3[i] * x[i]
            i += 1
        y[o] = s0
        y[o + 1] = s1
        y[o + 2] = s2
        y[o + 3] = s3
        o += 4
    while o < n_out:
        y[o] = dot(w.at(o * n_in), x, n_in)
        o += 1


def weight_grad[
    dtype: DType
](g: Buf[dtype], dy: Buf[dtype], x: Buf[dtype], rows: Int, n_out: Int, n_in: Int):
    """Accumulates g[o, :] += sum_t dy[t, o] * x[t, :] over `rows` positions (dy [rows, n_out],
    x [rows, n_in]); four gradient rows at a time, which share the loads of x."""
    comptime Wd = simd_width_of[dtype]()
    var o = 0
    while o + 4 <= n_out:
        var g0 = g.at(o * n_in)
        var g1 = g.at((o + 1) * n_in)
        var g2 = g.at((o + 2) * n_in)
        var g3 = g.at((o + 3) * n_in)
        var i = 0
        while i + Wd <= n_in:
            var a0 = g0.load[Wd](i)
            var a1 = g1.load[Wd](i)
            var a2 = g2.load[Wd](i)
            var a3 = g3.load[Wd](i)
            for t in range(rows):
                var xv = x.load[Wd](t * n_in + i)
                var d = dy.at(t * n_out + o)
                a0 += d[0] * xv
                a1 += d[1] * xv
                a2 += d[2] * xv
                a3 += d[3] * xv
            g0.store[Wd](i, a0)
            g1.store[Wd](i, a1)
            g2.store[Wd](i, a2)
            g3.store[Wd](i, a3)
            i += Wd
        while i < n_in:
            for t in range(rows):
                var xs = x[t * n_in + i]
                var d = dy.at(t * n_out + o)
                g0[i] += d[0] * xs
                g1[i] += d[1] * xs
                g2[i] += d[2] * xs
                g3[i] += d[3] * xs
            i += 1
        o += 4
    while o < n_out:
        for t in range(rows):
            axpy(g.at(o * n_in), dy[t * n_out + o], x.at(t * n_in), n_in)
        o += 1


def input_grad[
    dtype: DType
](
    dx: Buf[dtype],
    dy: Buf[dtype],
    w: Buf[dtype],
    rows: Int,
    n_out: Int,
    n_in: Int,
    accumulate: Bool,
):
    """Computes dx[t, :] (+)= sum_o dy[t, o] * W[o, :]; four positions at a time, which share
    the loads of W."""
    comptime Wd = simd_width_of[dtype]()
    if not accumulate:
        fill(dx, Scalar[dtype](0), rows * n_in)
    var t = 0
    while t + 4 <= rows:
        var x0 = dx.at(t * n_in)
        var x1 = dx.at((t + 1) * n_in)
        var x2 = dx.at((t + 2) * n_in)
        var x3 = dx.at((t + 3) * n_in)
        var d0 = dy.at(t * n_out)
        var d1 = dy.at((t + 1) * n_out)
        var d2 = dy.at((t + 2) * n_out)
        var d3 = dy.at((t + 3) * n_out)
        var i = 0
        while i + Wd <= n_in:
            var a0 = x0.load[Wd](i)
            var a1 = x1.load[Wd](i)
            var a2 = x2.load[Wd](i)
            var a3 = x3.load[Wd](i)
            for o in range(n_out):
                var wv = w.load[Wd](o * n_in + i)
                a0 += d0[o] * wv
                a1 += d1[o] * wv
                a2 += d2[o] * wv
                a3 += d3[o] * wv
            x0.store[Wd](i, a0)
            x1.store[Wd](i, a1)
            x2.store[Wd](i, a2)
            x3.store[Wd](i, a3)
            i += Wd
        while i < n_in:
            for o in range(n_out):
                var ws = w[o * n_in + i]
                x0[i] += d0[o] * ws
                x1[i] += d1[o] * ws
                x2[i] += d2[o] * ws
                x3[i] += d3[o] * ws
            i += 1
        t += 4
    while t < rows:
        for o in range(n_out):
            axpy(dx.at(t * n_in), dy[t * n_out + o], w.at(o * n_in), n_in)
        t += 1


# ---- the model --------------------------------------------------------------------------------
struct NativeModel[dtype: DType](Movable, Writable) where dtype.is_floating_point():
    """All state of one backend instance; see the file header for the layout."""

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
    var attention_scale: Self.Scalar
    var beta1: Float64
    var beta2: Float64
    var eps: Float64

    # Flat parameter-sized buffers, the spec's draw order.
    var params: List[Self.Scalar]
    var grads: List[Self.Scalar]
    var adam_m: List[Self.Scalar]
    var adam_v: List[Self.Scalar]

    # Activations and backward scratch of one sequence, one buffer; offsets below.
    var acts: List[Self.Scalar]
    var layer_stride: Int
    var off_x_embed: Int  # [S, C] wte[t] + wpe[p] before the first rmsnorm
    var off_embed_scale: Int  # [S]
    var off_x_final: Int  # [S, C] the last layer's output
    var off_logits: Int  # [S, V]
    var off_probs: Int  # [S, V]
    var off_layers: Int  # n_layer blocks of layer_stride, fields at the offsets below
    var f_x_in: Int  # [S, C]
    var f_scale1: Int  # [S]
    var f_xn: Int  # [S, C]
    var f_q: Int  # [S, C]
    var f_k: Int  # [S, C]  (the key cache when sampling)
    var f_v: Int  # [S, C]  (the value cache when sampling)
    var f_att: Int  # [H, S, S] softmax weights, row t holds columns 0..t
    var f_heads: Int  # [S, C]
    var f_x_mid: Int  # [S, C]
    var f_scale2: Int  # [S]
    var f_xn2: Int  # [S, C]
    var f_hidden: Int  # [S, F] before relu
    var f_act: Int  # [S, F] after relu
    var off_dx: Int  # [S, C] backward scratch from here on
    var off_dwide: Int  # [S, F]
    var off_dxn: Int  # [S, C]
    var off_dheads: Int  # [S, C]
    var off_dq: Int  # [S, C]
    var off_dk: Int  # [S, C]
    var off_dv: Int  # [S, C]
    var off_datt: Int  # [S]
    var off_dlogits: Int  # [S, V]

    # Tokens of the current batch: row b at b * (S + 1), n_b predicted positions.
    var tokens: List[Int]
    var lengths: List[Int]
    var cache_length: Int  # positions in the key/value cache when sampling

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
            raise Error("NativeModel: every size must be >= 1")
        if n_embd % n_head != 0:
            raise Error("NativeModel: n_embd must be divisible by n_head")
        self.vocab = vocab
        self.n_embd = n_embd
        self.n_head = n_head
        self.head_dim = n_embd // n_head
        self.n_layer = n_layer
        self.block = block
        self.hidden = 4 * n_embd
        var C = n_embd
        var F = 4 * n_embd
        var S = block
        var V = vocab
        var H = n_head
        self.n_params = 2 * V * C + S * C + n_layer * (4 * C * C + 2 * F * C)
        self.attention_scale = Self.Scalar(1.0 / sqrt(Float64(self.head_dim)))
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps
        self.params = List[Self.Scalar](length=self.n_params, fill=0)
        self.grads = List[Self.Scalar](length=self.n_params, fill=0)
        self.adam_m = List[Self.Scalar](length=self.n_params, fill=0)
        self.adam_v = List[Self.Scalar](length=self.n_params, fill=0)

        var size = 0
        self.off_x_embed = size
        size += S * C
        self.off_embed_scale = size
        size += S
        self.off_x_final = size
        size += S * C
        self.off_logits = size
        size += S * V
        self.off_probs = size
        size += S * V
        self.off_dx = size
        size += S * C
        self.off_dwide = size
        size += S * F
        self.off_dxn = size
        size += S * C
        self.off_dheads = size
        size += S * C
        self.off_dq = size
        size += S * C
        self.off_dk = size
        size += S * C
        self.off_dv = size
        size += S * C
        self.off_datt = size
        size += S
        self.off_dlogits = size
        size += S * V
        self.off_layers = size
        var field = 0
        self.f_x_in = field
        field += S * C
        self.f_scale1 = field
        field += S
        self.f_xn = field
        field += S * C
        self.f_q = field
        field += S * C
        self.f_k = field
        field += S * C
        self.f_v = field
        field += S * C
        self.f_att = field
        field += H * S * S
        self.f_heads = field
        field += S * C
        self.f_x_mid = field
        field += S * C
        self.f_scale2 = field
        field += S
        self.f_xn2 = field
        field += S * C
        self.f_hidden = field
        field += S * F
        self.f_act = field
        field += S * F
        self.layer_stride = field
        size += n_layer * field
        self.acts = List[Self.Scalar](length=size, fill=0)
        self.tokens = List[Int](length=S + 1, fill=0)
        self.lengths = List[Int](length=1, fill=0)
        self.cache_length = 0

    def write_to(self, mut writer: Some[Writer]):
        writer.write(
            "NativeModel[",
            Self.dtype,
            "](layers=",
            self.n_layer,
            ", n_embd=",
            self.n_embd,
            ", params=",
            self.n_params,
            ")",
        )

    def write_repr_to(self, mut writer: Some[Writer]):
        self.write_to(writer)

    # ---- parameter offsets (the spec's draw order) -------------------------------------------
    @always_inline
    def wte(self) -> Int:
        return 0

    @always_inline
    def wpe(self) -> Int:
        return self.vocab * self.n_embd

    @always_inline
    def lm_head(self) -> Int:
        return self.wpe() + self.block * self.n_embd

    @always_inline
    def layer_params(self, layer: Int) -> Int:
        """Offset of layer{layer}.attn_wq; wk, wv, wo, fc1, fc2 follow it."""
        var C = self.n_embd
        return self.lm_head() + self.vocab * C + layer * (4 * C * C + 2 * self.hidden * C)

    # ---- activation views ----------------------------------------------------------------------
    @always_inline
    def layer_acts(mut self, layer: Int) -> Buf[Self.dtype]:
        return view(self.acts).at(self.off_layers + layer * self.layer_stride)

    @always_inline
    def layer_input(mut self, layer: Int) -> Buf[Self.dtype]:
        """Input of `layer`; input n_layer is the final output."""
        if layer == self.n_layer:
            return view(self.acts).at(self.off_x_final)
        return self.layer_acts(layer).at(self.f_x_in)

    # ---- forward -----------------------------------------------------------------------------
    def forward_position(mut self, token: Int, t: Int):
        """Every activation of position t, reading keys and values of positions 0..t; the
        logits land in row t of the logits buffer."""
        var C = self.n_embd
        var F = self.hidden
        var S = self.block
        var D = self.head_dim
        var p = view(self.params)
        var acts = view(self.acts)

        var x_embed = acts.at(self.off_x_embed + t * C)
        add_into(x_embed, p.at(self.wte() + token * C), p.at(self.wpe() + t * C), C)
        var s0 = rms_scale(x_embed, C)
        acts[self.off_embed_scale + t] = s0
        scale_into(self.layer_input(0).at(t * C), x_embed, s0, C)

        for layer in range(self.n_layer):
            var a = self.layer_acts(layer)
            var w = p.at(self.layer_params(layer))
            var wq = w
            var wk = w.at(C * C)
            var wv = w.at(2 * C * C)
            var wo = w.at(3 * C * C)
            var fc1 = w.at(4 * C * C)
            var fc2 = w.at(4 * C * C + F * C)
            var x_in = a.at(self.f_x_in + t * C)
            # Attention block: x_mid = Wo(attention(rmsnorm(x_in))) + x_in
            var s1 = rms_scale(x_in, C)
            a[self.f_scale1 + t] = s1
            var xn = a.at(self.f_xn + t * C)
            scale_into(xn, x_in, s1, C)
            var q = a.at(self.f_q + t * C)
            matvec(q, wq, xn, C, C)
            matvec(a.at(self.f_k + t * C), wk, xn, C, C)
            matvec(a.at(self.f_v + t * C), wv, xn, C, C)
            var heads = a.at(self.f_heads + t * C)
            fill(heads, Self.Scalar(0), C)
            for h in range(self.n_head):
                var att = a.at(self.f_att + (h * S + t) * S)
                for j in range(t + 1):
                    att[j] = dot(q.at(h * D), a.at(self.f_k + j * C + h * D), D) * (
                        self.attention_scale
                    )
                softmax_inplace(att, t + 1)
                for j in range(t + 1):
                    axpy(heads.at(h * D), att[j], a.at(self.f_v + j * C + h * D), D)
            var x_mid = a.at(self.f_x_mid + t * C)
            matvec(x_mid, wo, heads, C, C)
            add_into(x_mid, x_mid, x_in, C)
            # MLP block: x_out = fc2(relu(fc1(rmsnorm(x_mid)))) + x_mid
            var s2 = rms_scale(x_mid, C)
            a[self.f_scale2 + t] = s2
            var xn2 = a.at(self.f_xn2 + t * C)
            scale_into(xn2, x_mid, s2, C)
            var hidden = a.at(self.f_hidden + t * F)
            var act = a.at(self.f_act + t * F)
            matvec(hidden, fc1, xn2, F, C)
            for i in range(F):
                act[i] = max(hidden[i], Self.Scalar(0))
            var x_out = self.layer_input(layer + 1).at(t * C)
            matvec(x_out, fc2, act, C, F)
            add_into(x_out, x_out, x_mid, C)

        matvec(
            acts.at(self.off_logits + t * self.vocab),
            p.at(self.lm_head()),
            acts.at(self.off_x_final + t * C),
            self.vocab,
            C,
        )

    # ---- backward ----------------------------------------------------------------------------
    def backward_sequence(mut self, row: Int, n: Int):
        """Adds this sequence's gradients into self.grads, given dlogits [n, V] (already
        weighted by 1 / count) in the dlogits buffer and the activations of its forward
        pass. Follows numpy_backend.NumpyBackend._backward."""
        var C = self.n_embd
        var F = self.hidden
        var S = self.block
        var D = self.head_dim
        var V = self.vocab
        var p = view(self.params)
        var g = view(self.grads)
        var acts = view(self.acts)
        var dx = acts.at(self.off_dx)
        var dwide = acts.at(self.off_dwide)
        var dxn = acts.at(self.off_dxn)
        var dheads = acts.at(self.off_dheads)
        var dq = acts.at(self.off_dq)
        var dk = acts.at(self.off_dk)
        var dv = acts.at(self.off_dv)
        var datt = acts.at(self.off_datt)
        var dlogits = acts.at(self.off_dlogits)

        weight_grad(g.at(self.lm_head()), dlogits, acts.at(self.off_x_final), n, V, C)
        input_grad(dx, dlogits, p.at(self.lm_head()), n, V, C, False)
        for layer in reversed(range(self.n_layer)):
            var a = self.layer_acts(layer)
            var offset = self.layer_params(layer)
            var w = p.at(offset)
            var gw = g.at(offset)
            # MLP block: x = fc2(relu(fc1(rmsnorm(x_mid)))) + x_mid
            var fc1 = 4 * C * C
            var fc2 = fc1 + F * C
            weight_grad(gw.at(fc2), dx, a.at(self.f_act), n, C, F)
            input_grad(dwide, dx, w.at(fc2), n, C, F, False)  # d act [n, F]
            var hidden = a.at(self.f_hidden)
            for i in range(n * F):
                if hidden[i] <= 0:
                    dwide[i] = 0  # relu
            weight_grad(gw.at(fc1), dwide, a.at(self.f_xn2), n, F, C)
            input_grad(dxn, dwide, w.at(fc1), n, F, C, False)  # d xn2 [n, C]
            for t in range(n):
                rmsnorm_backward_acc(
                    dx.at(t * C),
                    a.at(self.f_x_mid + t * C),
                    a[self.f_scale2 + t],
                    dxn.at(t * C),
                    C,
                )
            # Attention block: x_mid = Wo(attention(rmsnorm(x_in))) + x_in
            weight_grad(gw.at(3 * C * C), dx, a.at(self.f_heads), n, C, C)
            input_grad(dheads, dx, w.at(3 * C * C), n, C, C, False)
            fill(dq, Self.Scalar(0), n * C)
            fill(dk, Self.Scalar(0), n * C)
            fill(dv, Self.Scalar(0), n * C)
            var q = a.at(self.f_q)
            var k = a.at(self.f_k)
            var v = a.at(self.f_v)
            for h in range(self.n_head):
                var hd = h * D
                for t in range(n):
                    var att = a.at(self.f_att + (h * S + t) * S)
                    var dh = dheads.at(t * C + hd)
                    # softmax backward: ds = a * (da - sum(da * a)), then the 1/sqrt(D) scale
                    var weighted = Self.Scalar(0)
                    for j in range(t + 1):
                        var da = dot(dh, v.at(j * C + hd), D)
                        datt[j] = da
                        weighted += da * att[j]
                    for j in range(t + 1):
                        var aj = att[j]
                        axpy(dv.at(j * C + hd), aj, dh, D)
                        var ds = aj * (datt[j] - weighted) * self.attention_scale
                        axpy(dq.at(t * C + hd), ds, k.at(j * C + hd), D)
                        axpy(dk.at(j * C + hd), ds, q.at(t * C + hd), D)
            var xn = a.at(self.f_xn)
            weight_grad(gw, dq, xn, n, C, C)
            weight_grad(gw.at(C * C), dk, xn, n, C, C)
            weight_grad(gw.at(2 * C * C), dv, xn, n, C, C)
            input_grad(dxn, dq, w, n, C, C, False)
            input_grad(dxn, dk, w.at(C * C), n, C, C, True)
            input_grad(dxn, dv, w.at(2 * C * C), n, C, C, True)
            for t in range(n):
                rmsnorm_backward_acc(
                    dx.at(t * C),
                    a.at(self.f_x_in + t * C),
                    a[self.f_scale1 + t],
                    dxn.at(t * C),
                    C,
                )
        # Embeddings: dembed = rmsnorm backward of x_embed; scatter into wpe rows and wte rows.
        var first_token = row * (S + 1)
        for t in range(n):
            var dembed = dxn.at(t * C)
            fill(dembed, Self.Scalar(0), C)
            rmsnorm_backward_acc(
                dembed,
                acts.at(self.off_x_embed + t * C),
                acts[self.off_embed_scale + t],
                dx.at(t * C),
                C,
            )
            axpy(g.at(self.wpe() + t * C), Self.Scalar(1), dembed, C)
            axpy(g.at(self.wte() + self.tokens[first_token + t] * C), Self.Scalar(1), dembed, C)

    # ---- one step ----------------------------------------------------------------------------
    def read_batch(mut self, sequences: PythonObject) raises -> Int:
        """Copies the batch's token rows (a list of lists of ints) into self.tokens and
        self.lengths, checking them; returns the number of rows."""
        ref cpython = Python().cpython()
        var rows = Int(cpython.PyObject_Length(sequences._obj_ptr))
        if rows < 1:
            cpython.PyErr_Clear()
            raise Error("train_step: sequences must be a non-empty list of token lists")
        var stride = self.block + 1
        if len(self.lengths) < rows:
            self.lengths.resize(rows, 0)
            self.tokens.resize(rows * stride, 0)
        for b in range(rows):
            var row = cpython.PyList_GetItem(sequences._obj_ptr, b)
            if not row:
                cpython.PyErr_Clear()
                raise Error("train_step: sequences must be a list of lists of ints")
            var length = Int(cpython.PyObject_Length(row))
            if length < 2 or length > stride:
                cpython.PyErr_Clear()
                raise Error(
                    String(
                        "train_step: a token row must hold 2 to block_size + 1 = ",
                        stride,
                        " tokens, got ",
                        length,
                    )
                )
            for i in range(length):
                var item = cpython.PyList_GetItem(row, i)
                if not item:
                    cpython.PyErr_Clear()
                    raise Error("train_step: a token row must be a list of ints")
                var token = Int(cpython.PyLong_AsSsize_t(item))
                if token == -1 and cpython.PyErr_Occurred():
                    cpython.PyErr_Clear()
                    raise Error("train_step: tokens must be Python ints")
                if token < 0 or token >= self.vocab:
                    cpython.PyErr_Clear()
                    raise Error(
                        String("train_step: token ", token, " is outside [0, ", self.vocab, ")")
                    )
                self.tokens[b * stride + i] = token
            self.lengths[b] = length - 1
        return rows

    def loss_and_backward(mut self, rows: Int) -> Float64:
        """Forward and backward over the batch read by read_batch; gradients in self.grads,
        the loss (mean over every predicted position) returned."""
        var V = self.vocab
        var stride = self.block + 1
        var count = 0
        for b in range(rows):
            count += self.lengths[b]
        var position_weight = Self.Scalar(1) / Self.Scalar(count)
        fill(view(self.grads), Self.Scalar(0), self.n_params)
        var acts = view(self.acts)
        var loss_sum = Self.Scalar(0)
        for b in range(rows):
            var n = self.lengths[b]
            var row = b * stride
            for t in range(n):
                self.forward_position(self.tokens[row + t], t)
            for t in range(n):
                var probs = acts.at(self.off_probs + t * V)
                var dlogits = acts.at(self.off_dlogits + t * V)
                for i in range(V):
                    probs[i] = acts[self.off_logits + t * V + i]
                softmax_inplace(probs, V)
                var target = self.tokens[row + t + 1]
                loss_sum -= log(probs[target])
                # d loss / d logits = (softmax - onehot) / count
                scale_into(dlogits, probs, position_weight, V)
                dlogits[target] -= position_weight
            self.backward_sequence(b, n)
        return Float64(loss_sum) / Float64(count)

    def adam(
        mut self, learning_rate: Float64, bias_correction1: Float64, bias_correction2: Float64
    ):
        """Adam on the flat buffers, in numpy_backend's order of operations:
        p -= (lr / bc1) * m / (sqrt(v * (1 / bc2)) + eps)."""
        comptime Wd = simd_width_of[Self.dtype]()
        var b1 = Self.Scalar(self.beta1)
        var b2 = Self.Scalar(self.beta2)
        var one_minus_b1 = Self.Scalar(1 - self.beta1)
        var one_minus_b2 = Self.Scalar(1 - self.beta2)
        var eps = Self.Scalar(self.eps)
        var inv_bc2 = Self.Scalar(1.0 / bias_correction2)
        var step_size = Self.Scalar(learning_rate / bias_correction1)
        var p = view(self.params)
        var g = view(self.grads)
        var m = view(self.adam_m)
        var v = view(self.adam_v)
        var i = 0
        while i + Wd <= self.n_params:
            var gi = g.load[Wd](i)
            var mi = m.load[Wd](i) * b1 + gi * one_minus_b1
            var vi = v.load[Wd](i) * b2 + gi * gi * one_minus_b2
            m.store[Wd](i, mi)
            v.store[Wd](i, vi)
            var update = mi / (sqrt(vi * inv_bc2) + eps) * step_size
            p.store[Wd](i, p.load[Wd](i) - update)
            i += Wd
        while i < self.n_params:
            var gi = g[i]
            var mi = m[i] * b1 + gi * one_minus_b1
            var vi = v[i] * b2 + gi * gi * one_minus_b2
            m[i] = mi
            v[i] = vi
            p[i] = p[i] - mi / (sqrt(vi * inv_bc2) + eps) * step_size
            i += 1

    # ---- Python-facing methods (self_ptr is the Python object's Mojo value) -------------------
    @staticmethod
    def py_init(out self: Self, args: PythonObject, kwargs: PythonObject) raises:
        """NativeModelXX(vocab, n_embd, n_head, n_layer, block_size, beta1, beta2, eps)."""
        if len(args) != 8:
            raise Error(
                "NativeModel(vocab, n_embd, n_head, n_layer, block_size, beta1, beta2, eps)"
            )
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
        """Reads n_params float64 values at `address` (a contiguous numpy buffer, draw order)
        and zeroes the Adam moments."""
        ref model = self_ptr[]
        if Int(py=count) != model.n_params:
            raise Error(String("load_parameters: expected ", model.n_params, " values"))
        var source = Pointer[Float64, MutUntrackedOrigin](unsafe_from_address=Int(py=address))
        for i in range(model.n_params):
            model.params[i] = source[unsafe_offset=i].cast[Self.dtype]()
            model.adam_m[i] = 0
            model.adam_v[i] = 0
        return PythonObject(None)

    @staticmethod
    def py_copy_parameters(
        self_ptr: Pointer[Self, MutAnyOrigin], address: PythonObject, count: PythonObject
    ) raises -> PythonObject:
        """Writes the parameters as n_params float64 values at `address`."""
        ref model = self_ptr[]
        if Int(py=count) != model.n_params:
            raise Error(String("copy_parameters: expected room for ", model.n_params))
        var target = Pointer[Float64, MutUntrackedOrigin](unsafe_from_address=Int(py=address))
        for i in range(model.n_params):
            target[unsafe_offset=i] = model.params[i].cast[DType.float64]()
        return PythonObject(None)

    @staticmethod
    def py_train_step(
        self_ptr: Pointer[Self, MutAnyOrigin],
        sequences: PythonObject,
        learning_rate: PythonObject,
        bias_correction1: PythonObject,
        bias_correction2: PythonObject,
    ) raises -> PythonObject:
        """One step: forward, backward, Adam. Returns the loss as a Python float."""
        ref model = self_ptr[]
        var rows = model.read_batch(sequences)
        var loss = model.loss_and_backward(rows)
        model.adam(
            Float64(py=learning_rate), Float64(py=bias_correction1), Float64(py=bias_correction2)
        )
        return PythonObject(loss)

    @staticmethod
    def py_train_step_overhead(
        self_ptr: Pointer[Self, MutAnyOrigin],
        sequences: PythonObject,
        learning_rate: PythonObject,
        bias_correction1: PythonObject,
        bias_correction2: PythonObject,
    ) raises -> PythonObject:
        """Does train_step's argument passing (tokens read, scalars converted) without the work:
        measures the Python <-> Mojo cost of one step."""
        ref model = self_ptr[]
        var rows = model.read_batch(sequences)
        var total = Float64(py=learning_rate) + Float64(py=bias_correction1)
        total += Float64(py=bias_correction2) + Float64(rows)
        return PythonObject(total * 0)

    @staticmethod
    def py_loss_and_gradients(
        self_ptr: Pointer[Self, MutAnyOrigin], sequences: PythonObject, address: PythonObject
    ) raises -> PythonObject:
        """Loss, with the gradients written as n_params float64 values at `address`; no
        update (for tests)."""
        ref model = self_ptr[]
        var rows = model.read_batch(sequences)
        var loss = model.loss_and_backward(rows)
        var target = Pointer[Float64, MutUntrackedOrigin](unsafe_from_address=Int(py=address))
        for i in range(model.n_params):
            target[unsafe_offset=i] = model.grads[i].cast[DType.float64]()
        return PythonObject(loss)

    @staticmethod
    def py_reset_cache(self_ptr: Pointer[Self, MutAnyOrigin]) -> PythonObject:
        self_ptr[].cache_length = 0
        return PythonObject(None)

    @staticmethod
    def py_next_logits(
        self_ptr: Pointer[Self, MutAnyOrigin],
        token: PythonObject,
        position: PythonObject,
        address: PythonObject,
    ) raises -> PythonObject:
        """Logits of `token` at `position` (which must be the cache length: sampling runs
        positions 0, 1, ... after reset_cache), written as V float64 values at `address`."""
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
        model.forward_position(token_id, p)
        model.cache_length += 1
        var target = Pointer[Float64, MutUntrackedOrigin](unsafe_from_address=Int(py=address))
        for i in range(model.vocab):
            target[unsafe_offset=i] = model.acts[model.off_logits + p * model.vocab + i].cast[
                DType.float64
            ]()
        return PythonObject(None)

    @staticmethod
    def py_noop(self_ptr: Pointer[Self, MutAnyOrigin]) -> PythonObject:
        return PythonObject(None)


# ---- module ------------------------------------------------------------------------------------
def noop() -> PythonObject:
    """Does nothing: times the bare Python -> Mojo call."""
    return PythonObject(None)


def simd_width(dtype_name: PythonObject) raises -> PythonObject:
    """The SIMD width (elements) the kernels use for 'float32' or 'float64'."""
    var name = String(py=dtype_name)
    if name == "float32":
        return PythonObject(simd_width_of[DType.float32]())
    if name == "float64":
        return PythonObject(simd_width_of[DType.float64]())
    raise Error("simd_width: dtype must be float32 or float64")


def bind_model[
    dtype: DType
](mut module: PythonModuleBuilder, name: StaticString) raises where dtype.is_floating_point():
    comptime M = NativeModel[dtype]
    _ = (
        module.add_type[M](name)
        .def_py_init[M.py_init]()
        .def_method[M.py_num_parameters]("num_parameters")
        .def_method[M.py_load_parameters]("load_parameters")
        .def_method[M.py_copy_parameters]("copy_parameters")
        .def_method[M.py_train_step]("train_step")
        .def_method[M.py_train_step_overhead]("train_step_overhead")
        .def_method[M.py_loss_and_gradients]("loss_and_gradients")
        .def_method[M.py_reset_cache]("reset_cache")
        .def_method[M.py_next_logits]("next_logits")
        .def_method[M.py_noop]("noop")
    )


@export
def PyInit_microgpt_native() abi("C") -> PythonObject:
    try:
        var module = PythonModuleBuilder("microgpt_native")
        module.def_function[noop]("noop")
        module.def_function[simd_width]("simd_width")
        bind_model[DType.float32](module, "NativeModel32")
        bind_model[DType.float64](module, "NativeModel64")
        return module.finalize()
    except e:
        abort(String("failed to create the microgpt_native module: ", e))
