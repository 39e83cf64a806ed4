"""MLX backend: the whole training step (forward, backward, Adam) compiled once with
`mx.compile`; sampling with a fixed-shape key/value cache, compiled too. float32 on CPU or GPU,
float64 on the CPU only (MLX's GPUs have no float64).

At 4,192 parameters a step's cost on the CPU is MLX's per-node overhead (graph bookkeeping and
an allocation per result on the calling thread, a hand-off to the stream's worker thread: about
4 us per node here) plus matmuls, which the Linux wheel runs on the reference BLAS (scalar
loops, about 1 multiply-add per cycle). So this file keeps the compiled graph small (about 80
nodes at the tiny size) and the matmuls few and small:
- One weight buffer: every matrix has n_embd columns (the spec's [out, in] for all but
  mlp_fc2, which is stored [in, out]), so all of them are row ranges of one (R, C) array, made
  by one split node (and their transposes by one transpose and one split); the gradients are
  one concatenation, and Adam is one fused element-wise kernel over the buffer. The state is
  three arrays: weights, m and v.
- The backward pass is written out by hand (the numpy backend's derivation) rather than taken
  from `mx.value_and_grad`, whose graph has a third more nodes (broadcasts, transposes and
  reshapes around each vjp). The tests check it against numpy and against
  `mx.value_and_grad` of `forward_loss`.
- wq, wk and wv are adjacent rows, so the three projections are one matmul, and attention runs
  all heads at once as batched matmuls on a head-major view of [q | k | v] (one reshape, one
  transpose). (An earlier version used block-diagonal masked keys, one plain matmul for all
  heads' scores with H times the arithmetic: fewer nodes, but attention's forward and backward
  alone took 0.134 against 0.095 ms here, the difference all in the reference BLAS.)
- Every step has the same shapes: the tokens are padded to block_size (TokenBatch.padded) and a
  mask built from TokenBatch.lengths gives the padded positions zero weight in the loss.
  Causal attention means the padding never changes a real position's value, so ONE compiled
  step serves every sequence length (no recompilation per length).
- Per step the host makes two arrays (the tokens; Adam's two scalar factors and the lengths):
  the scalars enter as data, not Python floats, so a new learning rate is new data for the
  compiled graph rather than a constant to recompile for.
- In a benchmark worker the process's threads are pinned to one core (configure_process).

Shapes: B batch rows, T = block_size positions, N = B*T rows, C = n_embd, H heads, D = head_dim,
V vocab, R rows of the weight buffer (R * C parameters).
"""
from __future__ import annotations

import math
import os
import time

import mlx.core as mx
import numpy as np

from backends.contract import RMS_EPS, AdamStep, Backend, BackendUnavailable, TokenBatch
from backends.devices import resolve_mlx_device

# "0" leaves the CPU affinity of an mlx worker process to the OS (see configure_process).
PIN_ENV_VAR = "MICROGPT_BENCH_MLX_PIN"


# MLX's CPU `exp` (and so `softmax`, `logsumexp`) evaluates in float32 with a fast polynomial
# even for float64 inputs (mlx/backend/cpu/simd/math.h; relative error ~6e-7), far outside the
# float64 parity tolerance. `power(e, x)` goes through std::pow and is accurate to ~1e-15, so
# the float64 path spells these out with it. float32 keeps MLX's one-node fused versions.
class PreciseExpOps:
    """exp, softmax and log-sum-exp (last axis) accurate to float64 (float64 only)."""

    def __init__(self):
        self.euler = mx.array(np.e, dtype=mx.float64)

    def exp(self, x):
        return mx.power(self.euler, x)

    def softmax(self, x):
        e = self.exp(x - mx.max(x, axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    def logsumexp(self, x):
        top = mx.max(x, axis=-1, keepdims=True)
        return mx.log(self.exp(x - top).sum(axis=-1, keepdims=True)) + top


class FastOps:
    """MLX's own exp, softmax and log-sum-exp (float32)."""

    @staticmethod
    def exp(x):
        return mx.exp(x)

    @staticmethod
    def softmax(x):
        return mx.softmax(x, axis=-1)

    @staticmethod
    def logsumexp(x):
        return mx.logsumexp(x, axis=-1, keepdims=True)


def rmsnorm(x):
    """Returns (y, sum_sq), sum_sq = sum(x*x) of shape (N, 1). Saving the sum rather than the
    scale lets mx.compile fuse the scale into y's node; the backward recomputes the scale,
    spelt differently (a multiply, not a divide) so that mx.compile's common-subexpression
    pass does not merge the two back into one shared (unfusable) node."""
    sum_sq = mx.square(x).sum(axis=-1, keepdims=True)
    return x * mx.rsqrt(sum_sq / x.shape[-1] + RMS_EPS), sum_sq


def rmsnorm_backward(x, sum_sq, dy):
    # y = x * s, s = (mean(x^2) + eps)^-1/2  =>  dx = s * dy - s^3 * x * mean(dy * x)
    inverse_width = 1.0 / x.shape[-1]
    scale = mx.rsqrt(sum_sq * inverse_width + RMS_EPS)
    mean_dy_x = (dy * x).sum(axis=-1, keepdims=True) * inverse_width
    return scale * dy - (scale * scale * scale) * x * mean_dy_x


class MLXTunedBackend(Backend):
    name = "mlx-tuned"
    provides_gradients = True
    provides_moments = True

    def __init__(self, config, vocab_size, dtype, device=None):
        super().__init__(config, vocab_size, dtype, device)
        if dtype == "float64" and self.device == "gpu":
            raise BackendUnavailable("MLX supports float64 on the CPU only; "
                                     "use --dtype float32 or --device cpu")
        self.mx_device = mx.gpu if self.device == "gpu" else mx.cpu
        self.mx_dtype = mx.float64 if dtype == "float64" else mx.float32
        self.np_dtype = np.dtype(dtype)
        ops = PreciseExpOps() if dtype == "float64" else FastOps()
        self.exp, self.softmax, self.logsumexp = ops.exp, ops.softmax, ops.logsumexp
        # The weight buffer's row ranges: name -> (first row, rows), in the spec's draw order
        # (wq, wk and wv fused into attn_wqkv; mlp_fc2 stored transposed as mlp_fc2_t).
        C = config.n_embd
        self.row_layout = {}
        rows = 0
        for name, (out_features, in_features) in self.shapes.items():
            if name.endswith((".attn_wk", ".attn_wv")):
                continue
            if name.endswith(".attn_wq"):
                name, out_features = name.replace("attn_wq", "attn_wqkv"), 3 * C
            if name.endswith(".mlp_fc2"):
                name, out_features = name + "_t", in_features
            self.row_layout[name] = (rows, out_features)
            rows += out_features
        self.num_rows = rows
        self.row_boundaries = [first for first, _ in self.row_layout.values()][1:]
        self.traces = {"train_step": 0, "next_logits": 0}  # Python runs only while tracing
        with mx.stream(self.mx_device):
            self._build_constants()
            zeros = mx.zeros((self.num_rows, C), dtype=self.mx_dtype)
            # [weights, Adam m, Adam v]: the compiled step reads this list and replaces its
            # items (the inputs=state, outputs=state idiom).
            self.state = [zeros, zeros, zeros]
            mx.eval(self.state)
        self._train_step = mx.compile(self._step_function, inputs=self.state,
                                      outputs=self.state)
        self._sample_step = mx.compile(self._next_logits_function)
        self._empty_cache = None
        self.reset_cache()

    def resolve_device(self, requested):
        return resolve_mlx_device(self.name, requested)

    def _build_constants(self):
        T = self.config.block_size
        # Additive causal mask (T, T): query t sees key s iff s <= t.
        causal = np.where(np.arange(T)[None, :] <= np.arange(T)[:, None], 0.0, -np.inf)
        self.causal_mask = mx.array(causal, dtype=self.mx_dtype)
        self.position_column = mx.arange(T, dtype=mx.int32)[:, None]  # (T, 1)
        self.vocab_ids = mx.arange(self.vocab_size, dtype=mx.int32)  # (V,)
        mx.eval(self.causal_mask, self.position_column, self.vocab_ids)

    def _position_one_hot(self, rows):
        """(rows*T, T) constant: row b*T + t is one-hot at t (the positions of a batch)."""
        T = self.config.block_size
        return mx.array(np.tile(np.eye(T), (rows, 1)), dtype=self.mx_dtype)

    # ---- parameters ------------------------------------------------------------------------
    def _stack(self, named):
        """Spec-named [out, in] numpy matrices -> the (R, C) buffer layout (float64 numpy)."""
        blocks = []
        for name in self.row_layout:
            if name.endswith(".attn_wqkv"):
                prefix = name[: -len("wqkv")]
                blocks += [named[prefix + "wq"], named[prefix + "wk"], named[prefix + "wv"]]
            elif name.endswith(".mlp_fc2_t"):
                blocks.append(named[name[:-2]].T)
            else:
                blocks.append(named[name])
        return np.concatenate([np.asarray(b, dtype=np.float64) for b in blocks])

    def _unstack(self, buffer):
        """The (R, C) buffer layout (numpy) -> the spec's named [out, in] float64 matrices."""
        buffer = np.asarray(buffer, dtype=np.float64)
        C = self.config.n_embd
        named = {}
        for name, (first, rows) in self.row_layout.items():
            block = buffer[first: first + rows]
            if name.endswith(".attn_wqkv"):
                prefix = name[: -len("wqkv")]
                for j, part in enumerate(("wq", "wk", "wv")):
                    named[prefix + part] = block[j * C: (j + 1) * C]
            elif name.endswith(".mlp_fc2_t"):
                named[name[:-2]] = block.T
            else:
                named[name] = block
        return {name: np.ascontiguousarray(named[name]) for name in self.shapes}

    def load_parameters(self, parameters):
        with mx.stream(self.mx_device):
            weights = mx.array(self._stack(parameters), dtype=self.mx_dtype)
            self.state[:] = [weights, mx.zeros_like(weights), mx.zeros_like(weights)]
            mx.eval(self.state)

    def parameters(self):
        return self._unstack(np.array(self.state[0]))

    def optimizer_moments(self):
        """m and v, the state's second and third buffers, in the weights' (R, C) layout."""
        return self._unstack(np.array(self.state[1])), self._unstack(np.array(self.state[2]))

    def _matrices(self, weights):
        """name -> row range of the (R, C) weight buffer: views, made by one split node."""
        return dict(zip(self.row_layout, mx.split(weights, self.row_boundaries, axis=0)))

    def _transposed_matrices(self, weights):
        """name -> the transpose of that block, (C, rows): two nodes for all of them rather
        than one transpose node per matrix."""
        return dict(zip(self.row_layout, mx.split(weights.T, self.row_boundaries, axis=1)))

    # ---- the model -------------------------------------------------------------------------
    def _to_heads(self, x, rows, parts):
        """(rows*T, parts*C) -> (parts, rows, H, T, D): head-major views for batched matmuls."""
        H, D = self.config.n_head, self.config.head_dim
        T = x.shape[0] // rows
        return x.reshape(rows, T, parts, H, D).transpose(2, 0, 3, 1, 4)

    @staticmethod
    def _from_heads(x):
        """(parts, rows, H, T, D) -> (rows*T, parts*C), the inverse of _to_heads."""
        parts, rows, H, T, D = x.shape
        return x.transpose(1, 3, 0, 2, 4).reshape(rows * T, parts * H * D)

    def _attention(self, q, k, v, mask):
        """Causal attention of every head at once: q (..., H, Tq, D), k and v (..., H, T, D),
        mask additive (Tq, T). Returns the heads' outputs (..., H, Tq, D) and the attention
        weights (..., H, Tq, T), which the backward pass needs."""
        scale = 1.0 / math.sqrt(self.config.head_dim)
        weights = self.softmax(q @ k.swapaxes(-1, -2) * scale + mask)
        return weights @ v, weights

    def _attention_backward(self, q, k, v, weights, dout):
        """Gradients of q, k and v (each (..., H, T, D)) from that of the output, stacked on a
        new first axis to match _to_heads(qkv, rows, 3)."""
        scale = 1.0 / math.sqrt(self.config.head_dim)
        dweights = dout @ v.swapaxes(-1, -2)
        dv = weights.swapaxes(-1, -2) @ dout
        # softmax backward, with the scores' 1/sqrt(D)
        dscores = weights * (dweights - (dweights * weights).sum(axis=-1, keepdims=True)) * scale
        dq = dscores @ k
        dk = dscores.swapaxes(-1, -2) @ q
        return mx.concatenate([dq, dk, dv], axis=0)

    def _forward_backward(self, weights, tokens, lengths):
        """The loss (1, 1) and the gradient of the (R, C) weight buffer.
        tokens: int32 [B*(T+1), 1], the rows of TokenBatch.padded (padded with BOS) one after
        the other; lengths: (B,) in the compute dtype, the predicted positions of each row."""
        cfg = self.config
        T = cfg.block_size
        B = lengths.shape[0]
        N = B * T
        p = self._matrices(weights)  # name -> (rows, C) views
        p_t = self._transposed_matrices(weights)  # name -> (C, rows) views
        # One-hot rows of inputs and targets: the embedding is a matmul with them and its
        # gradient the transposed one (no gather or scatter); the targets' rows carry the loss
        # weights, so padded positions fall out of the loss and its gradient.
        one_hot = (tokens == self.vocab_ids).astype(self.mx_dtype)  # (B*(T+1), V)
        if B > 1:
            one_hot = one_hot.reshape(B, T + 1, -1)
            input_one_hot = one_hot[:, :T].reshape(N, -1)  # (N, V)
            target_one_hot = one_hot[:, 1:].reshape(N, -1)
        else:
            input_one_hot, target_one_hot = one_hot[:T], one_hot[1:]  # (T, V) each
        # Padded positions (p >= n) are computed but weigh nothing; real ones weigh 1/count.
        if B > 1:
            real = self.position_column[None] < lengths[:, None, None]  # (B, T, 1)
            row_weights = real.reshape(N, 1).astype(self.mx_dtype) / lengths.sum()
        else:
            row_weights = (self.position_column < lengths).astype(self.mx_dtype) / lengths
        # (N, T) for a batch; B = 1 adds wpe directly (and its gradient is dembedded itself)
        position_one_hot = self._position_one_hot(B) if B > 1 else None
        if B > 1:
            embedded = mx.addmm(position_one_hot @ p["wpe"], input_one_hot, p["wte"])
        else:
            embedded = mx.addmm(p["wpe"], input_one_hot, p["wte"])  # (T, C)
        x, embed_sum_sq = rmsnorm(embedded)
        saved = []
        for i in range(cfg.n_layer):
            xn, sum_sq1 = rmsnorm(x)
            qkv = xn @ p_t[f"layer{i}.attn_wqkv"]  # (N, 3C)
            q, k, v = mx.split(self._to_heads(qkv, B, 3), 3)  # (1, B, H, T, D) each
            out, attention_weights = self._attention(q, k, v, self.causal_mask)
            heads = self._from_heads(out)  # (N, C)
            x_mid = mx.addmm(x, heads, p_t[f"layer{i}.attn_wo"])
            xn2, sum_sq2 = rmsnorm(x_mid)
            activated = mx.maximum(xn2 @ p_t[f"layer{i}.mlp_fc1"], 0)  # (N, 4C)
            saved.append((x, xn, sum_sq1, q, k, v, attention_weights, heads, x_mid, xn2,
                          sum_sq2, activated))
            x = mx.addmm(x_mid, activated, p[f"layer{i}.mlp_fc2_t"])
        logits = x @ p_t["lm_head"]  # (N, V)
        log_normalizer = self.logsumexp(logits)  # (N, 1)
        # -log softmax(logits)[target] = log_normalizer - logits[target], written so that the
        # log-probabilities are never materialised (kept (1, 1): a sum without keepdims adds
        # a squeeze node)
        loss = ((log_normalizer - logits) * (target_one_hot * row_weights)).sum(keepdims=True)

        # ---- backward ----
        # gradient_pairs[name] = (a, b): the gradient of that buffer block is a.T @ b
        gradient_pairs = {}
        dlogits = (self.exp(logits - log_normalizer) - target_one_hot) * row_weights  # (N, V)
        gradient_pairs["lm_head"] = (dlogits, x)
        dx = dlogits @ p["lm_head"]  # (N, C)
        for i in reversed(range(cfg.n_layer)):
            (x_in, xn, sum_sq1, q, k, v, attention_weights, heads, x_mid, xn2, sum_sq2,
             activated) = saved[i]
            gradient_pairs[f"layer{i}.mlp_fc2_t"] = (activated, dx)
            dhidden = (dx @ p_t[f"layer{i}.mlp_fc2_t"]) * (activated > 0)  # (N, 4C)
            gradient_pairs[f"layer{i}.mlp_fc1"] = (dhidden, xn2)
            dx = dx + rmsnorm_backward(x_mid, sum_sq2, dhidden @ p[f"layer{i}.mlp_fc1"])
            gradient_pairs[f"layer{i}.attn_wo"] = (dx, heads)
            dout = self._to_heads(dx @ p[f"layer{i}.attn_wo"], B, 1)  # (1, B, H, T, D)
            dqkv = self._from_heads(
                self._attention_backward(q, k, v, attention_weights, dout))  # (N, 3C)
            gradient_pairs[f"layer{i}.attn_wqkv"] = (dqkv, xn)
            dx = dx + rmsnorm_backward(x_in, sum_sq1, dqkv @ p[f"layer{i}.attn_wqkv"])
        dembedded = rmsnorm_backward(embedded, embed_sum_sq, dx)  # (N, C)
        gradient_pairs["wte"] = (input_one_hot, dembedded)
        # a = None: the block's gradient is b itself (one row, one position: an identity)
        gradient_pairs["wpe"] = (position_one_hot, dembedded)
        return loss, self._weight_gradient(gradient_pairs)

    def _weight_gradient(self, gradient_pairs):
        """The (R, C) gradient buffer from {name: (a (N, rows), b (N, C))}: block a.T @ b
        (b where a is None)."""
        # (Transposing all the a's at once, concatenated, saves three nodes but costs a copy
        # inside each matmul; no faster here.)
        return mx.concatenate([b if a is None else a.T @ b for a, b in (
            gradient_pairs[name] for name in self.row_layout)])

    def forward_loss(self, weights, tokens, lengths):
        """The loss alone, through the same forward pass (for the autodiff check in tests)."""
        return self._forward_backward(weights, tokens, lengths)[0].squeeze()  # 0-d

    # ---- training --------------------------------------------------------------------------
    def _step_function(self, tokens, scalars):
        """One training step on self.state; returns the loss. Traced once by mx.compile.
        scalars: (2 + B,): Adam's lr / bias_correction1 and 1 / sqrt(bias_correction2), then
        the lengths."""
        self.traces["train_step"] += 1
        cfg = self.config
        weights, m, v = self.state
        step_size, inverse_root_bias_correction2, lengths = mx.split(scalars, [1, 2])
        loss, grad = self._forward_backward(weights, tokens, lengths)
        # The spec's update, fused by mx.compile into one element-wise kernel over the buffer.
        # lr * (m / bc1) / (sqrt(v / bc2) + eps) is computed as
        # (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps), the scalar factors from the host: one
        # division and one square root per parameter rather than three and one (the kernel's
        # cost here); the same value up to float rounding.
        m = cfg.beta1 * m + (1 - cfg.beta1) * grad
        v = cfg.beta2 * v + (1 - cfg.beta2) * (grad * grad)
        self.state[:] = [
            weights - step_size * m / (mx.sqrt(v) * inverse_root_bias_correction2 + cfg.eps),
            m, v]
        return loss

    def _token_inputs(self, batch: TokenBatch):
        """(tokens, lengths) as MLX arrays: the arguments of _forward_backward."""
        return mx.array(batch.padded.reshape(-1, 1)), mx.array(batch.lengths, dtype=self.mx_dtype)

    def _step_inputs(self, batch: TokenBatch, adam: AdamStep):
        # Two host-to-MLX conversions per step (each costs microseconds): the tokens, and the
        # floats in one array. Adam's scalars enter as data, not Python floats, so that a new
        # learning rate is new data for the compiled graph rather than a constant to retrace.
        scalars = mx.array([adam.learning_rate / adam.bias_correction1,
                            1.0 / math.sqrt(adam.bias_correction2), *batch.lengths.tolist()],
                           dtype=self.mx_dtype)
        return mx.array(batch.padded.reshape(-1, 1)), scalars

    def train_step(self, batch, adam):
        with mx.stream(self.mx_device):
            loss = self._train_step(*self._step_inputs(batch, adam))
            # Evaluate here so that the step's work finishes inside the runner's timed region.
            mx.eval(loss, self.state)
        return loss.item()

    def loss_and_gradients(self, batch: TokenBatch):
        """The loss and the gradients in the spec's names, without updating (for tests)."""
        with mx.stream(self.mx_device):
            loss, grad = self._forward_backward(self.state[0], *self._token_inputs(batch))
            mx.eval(loss, grad)
        return loss.item(), self._unstack(np.array(grad))

    def prepare(self):
        """Trace and compile the training and sampling steps on dummy inputs, then put the
        parameters and moments back (MLX arrays are immutable; we keep the old ones)."""
        saved = list(self.state)
        bos = self.vocab_size - 1
        batch = TokenBatch.from_sequences([[bos, bos]] * self.config.batch_size,
                                          self.config.block_size, bos)
        dummy_adam = AdamStep(step=0, learning_rate=0.0, bias_correction1=1.0,
                              bias_correction2=1.0)
        start = time.perf_counter()
        with mx.stream(self.mx_device):
            loss = self._train_step(*self._step_inputs(batch, dummy_adam))
            mx.eval(loss, self.state)
        compile_seconds = time.perf_counter() - start
        self.state[:] = saved
        start = time.perf_counter()
        self.reset_cache()
        self.next_logits(bos, 0)
        self.reset_cache()
        sampling_seconds = time.perf_counter() - start
        return {"compile_train_step": compile_seconds, "compile_next_logits": sampling_seconds}

    def configure_process(self):
        """On the CPU, put all of this process's threads on one core. MLX evaluates each graph
        node by handing it from the calling thread to its CPU stream's worker thread, about
        80 hand-offs per training step; between two cores each one wakes the other core (on
        a small VM, a hypervisor exit), on one core it is a cheap switch. The README's mlx row
        gives what it buys. Threads made later inherit the affinity."""
        if self.device != "cpu" or not hasattr(os, "sched_setaffinity"):
            return {}
        if os.environ.get(PIN_ENV_VAR, "1") == "0":
            return {"cpu_affinity": f"left to the OS ({PIN_ENV_VAR}=0)"}
        cpu = min(os.sched_getaffinity(0))
        allowed = set()  # read back from every thread, for the result file
        for thread in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(thread), {cpu})
                allowed |= os.sched_getaffinity(int(thread))
            except OSError:  # the thread ended meanwhile
                pass
        return {"cpu_affinity": sorted(allowed)}

    def sync(self):
        # Nothing is ever left queued: train_step evaluates the loss and the whole new state
        # (every node of the step feeds one of them) and mx.eval waits for them, and the
        # other methods read their results back to numpy. mx.synchronize() would cost a
        # round trip to the stream's worker thread (about 8 us) per step for nothing.
        pass

    # ---- sampling --------------------------------------------------------------------------
    def reset_cache(self):
        cfg = self.config
        if self._empty_cache is None:  # made once: MLX arrays are immutable, so it is shared
            with mx.stream(self.mx_device):
                # (T, C) per layer, one row per position. Rows not yet written are masked out
                # of attention; zeros only keep them finite.
                self._empty_cache = mx.zeros((cfg.block_size, cfg.n_embd), dtype=self.mx_dtype)
                mx.eval(self._empty_cache)
        self.cache_keys = [self._empty_cache] * cfg.n_layer
        self.cache_values = [self._empty_cache] * cfg.n_layer

    def _next_logits_function(self, weights, cache_keys, cache_values, token_and_position):
        """Logits of one token at one position, with the cache row of that position written
        (cache_keys, cache_values: a (T, C) array per layer). Fixed shapes (the whole
        block_size cache, masked past `position`) so that it compiles once for every
        position."""
        self.traces["next_logits"] += 1
        cfg = self.config
        C = cfg.n_embd
        p, p_t = self._matrices(weights), self._transposed_matrices(weights)
        token, position = token_and_position[0:1], token_and_position[1:2]
        x, _ = rmsnorm(p["wte"][token] + p["wpe"][position])  # (1, C)
        written = self.position_column == position  # (T, 1): the cache row to write
        mask = self.causal_mask[position]  # (1, T): keys 0..position
        keys_out, values_out = [], []
        for i in range(cfg.n_layer):
            xn, _ = rmsnorm(x)
            qkv = xn @ p_t[f"layer{i}.attn_wqkv"]  # (1, 3C)
            keys = mx.where(written, qkv[:, C:2 * C], cache_keys[i])  # (T, C)
            values = mx.where(written, qkv[:, 2 * C:], cache_values[i])
            keys_out.append(keys)
            values_out.append(values)
            out, _ = self._attention(self._to_heads(qkv[:, :C], 1, 1), self._to_heads(keys, 1, 1),
                                     self._to_heads(values, 1, 1), mask)
            x = mx.addmm(x, self._from_heads(out), p_t[f"layer{i}.attn_wo"])
            xn2, _ = rmsnorm(x)
            hidden = mx.maximum(xn2 @ p_t[f"layer{i}.mlp_fc1"], 0)  # (1, 4C)
            x = mx.addmm(x, hidden, p[f"layer{i}.mlp_fc2_t"])
        logits = (x @ p_t["lm_head"])[0]  # (V,)
        return logits, keys_out, values_out

    def next_logits(self, token, position):
        with mx.stream(self.mx_device):
            logits, self.cache_keys, self.cache_values = self._sample_step(
                self.state[0], self.cache_keys, self.cache_values,
                mx.array([token, position], dtype=mx.int32))
            return np.array(logits).astype(np.float64)

    def trace_counts(self):
        return dict(self.traces)

    def details(self):
        return {"device": self.device, "compile": "mx.compile (whole step)",
                "backward": "hand-written",
                "padding": f"fixed block_size {self.config.block_size} with a length mask"}
