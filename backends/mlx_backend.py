"""MLX backend: the whole training step (forward, `mx.value_and_grad`, Adam) compiled once with
`mx.compile`, over a flat parameter buffer and flat Adam moments; sampling with a fixed-shape
key/value cache, compiled too. float32 and float64 (float64 on the CPU only: MLX's GPUs have no
float64).

Why it looks the way it does (at 4,192 parameters the per-op dispatch cost is the whole step):
- Parameters and Adam moments are three flat buffers `[P]`; the compiled step slices them into
  the named matrices, so Adam is a few whole-buffer element-wise ops that `mx.compile` fuses,
  and the step's state is three arrays (the `inputs=state, outputs=state` idiom).
- Every step has the same shapes: the tokens are padded to block_size (TokenBatch.padded) and a
  mask built from TokenBatch.lengths drops the padded positions from the loss. Causal attention
  means the padding never changes a real position's value, so one compiled step serves every
  sequence length (no recompilation per length).
- The Adam scalars of the step (AdamStep) arrive as one small array, not Python floats, so a new
  learning rate is new data for the compiled graph rather than a new constant to recompile for.

Shapes: B batch rows, T = block_size positions, C = n_embd, H heads, D = head_dim, V vocab,
L layers, P parameters in all.
"""
from __future__ import annotations

import time

import numpy as np

from backends.base import Availability, Backend, BackendUnavailable, TokenBatch
from bench.config import AdamStep

try:  # the module must import (for the registry's availability check) without MLX installed
    import mlx.core as mx
except ImportError:  # pragma: no cover - exercised only where MLX is missing
    mx = None

RMS_EPS = 1e-5
DEVICE_ALIASES = {"cpu": "cpu", "gpu": "gpu", "metal": "gpu", "cuda": "gpu"}


def _gpu_available() -> bool:
    return mx is not None and mx.is_available(mx.gpu)


def rmsnorm(x):
    return x * mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True) + RMS_EPS)


class MLXBackend(Backend):
    name = "mlx"
    description = "MLX, whole step under mx.compile, flat Adam buffers, padded fixed shapes"
    requires = ("mlx",)
    install_hint = ('python -m pip install ".[mlx]" -c constraints.txt  '
                    '(Linux: installs mlx[cpu]; mlx[cuda] for NVIDIA GPUs)')
    supports_batches = True
    default_dtype = "float32"

    def __init__(self, config, vocab_size, dtype, device=None):
        if mx is None:
            raise BackendUnavailable(f"mlx is not installed; {self.install_hint}")
        super().__init__(config, vocab_size, dtype, device)
        if dtype == "float64" and self.device == "gpu":
            raise BackendUnavailable("MLX supports float64 on the CPU only; "
                                     "use --dtype float32 or --device cpu")
        self.mx_device = mx.gpu if self.device == "gpu" else mx.cpu
        self.mx_dtype = mx.float64 if dtype == "float64" else mx.float32
        self.np_dtype = np.dtype(dtype)
        # name -> (offset, shape) in the flat parameter buffer, in the spec's draw order
        self.layout = {}
        offset = 0
        for name, (rows, cols) in self.shapes.items():
            self.layout[name] = (offset, (rows, cols))
            offset += rows * cols
        self.num_parameters = offset
        self.trace_count = 0  # how many times the training step was traced (tests read it)
        self.sampling_trace_count = 0
        with mx.stream(self.mx_device):
            self._build_constants()
            zeros = mx.zeros((self.num_parameters,), dtype=self.mx_dtype)
            # The compiled step reads and replaces these three arrays in place (list items).
            self.state = [zeros, zeros, zeros]  # flat parameters, Adam m, Adam v
            mx.eval(self.state)
        self._train_step = mx.compile(self._step_function, inputs=self.state,
                                      outputs=self.state)
        self._sample_step = mx.compile(self._next_logits_function)
        self.reset_cache()

    # ---- discovery -------------------------------------------------------------------------
    @classmethod
    def availability(cls) -> Availability:
        found = super().availability()
        if found.available and mx is None:
            return Availability(False, "mlx is installed but failed to import", cls.install_hint)
        return found

    def resolve_device(self, requested):
        if requested is None:  # MLX's own choice: its GPU (Metal or CUDA) when it has one
            return "gpu" if _gpu_available() else "cpu"
        if requested not in DEVICE_ALIASES:
            raise BackendUnavailable(f"backend mlx has no device {requested!r}; "
                                     f"choose cpu or gpu")
        device = DEVICE_ALIASES[requested]
        if device == "gpu" and not _gpu_available():
            raise BackendUnavailable("MLX has no GPU here (needs Metal on macOS or mlx[cuda] "
                                     "with an NVIDIA GPU)")
        return device

    def _build_constants(self):
        cfg = self.config
        T = cfg.block_size
        positions = mx.arange(T)
        # Additive causal mask: 0 where a query may look at a key, -inf above the diagonal.
        self.causal_mask = mx.where(positions[None, :] <= positions[:, None],
                                    mx.array(0.0, dtype=self.mx_dtype),
                                    mx.array(-np.inf, dtype=self.mx_dtype))  # (T, T)
        self.positions = positions.astype(mx.int32)  # (T,)
        self.vocab_ids = mx.arange(self.vocab_size, dtype=mx.int32)  # (V,)
        self.attention_scale = 1.0 / cfg.head_dim ** 0.5
        mx.eval(self.causal_mask, self.positions, self.vocab_ids)

    # ---- parameters ------------------------------------------------------------------------
    def _unflatten(self, flat):
        """The named [out, in] matrices as views into the flat buffer."""
        return {name: flat[offset: offset + rows * cols].reshape(rows, cols)
                for name, (offset, (rows, cols)) in self.layout.items()}

    def load_parameters(self, parameters):
        flat = np.concatenate([np.asarray(parameters[name], dtype=np.float64).reshape(-1)
                               for name in self.layout]).astype(self.np_dtype)
        with mx.stream(self.mx_device):
            zeros = mx.zeros((self.num_parameters,), dtype=self.mx_dtype)
            self.state[:] = [mx.array(flat), zeros, zeros]
            mx.eval(self.state)

    def parameters(self):
        flat = np.array(self.state[0]).astype(np.float64)
        return {name: flat[offset: offset + rows * cols].reshape(rows, cols).copy()
                for name, (offset, (rows, cols)) in self.layout.items()}

    # ---- training --------------------------------------------------------------------------
    def _loss(self, params, tokens, lengths):
        """Mean cross-entropy over the real positions. tokens: int32 [B, T+1] padded with BOS,
        lengths: int32 [B] predicted positions per row."""
        cfg = self.config
        H, D = cfg.n_head, cfg.head_dim
        inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, T) each
        B, T = inputs.shape
        x = rmsnorm(params["wte"][inputs] + params["wpe"])  # (B, T, C)
        for i in range(cfg.n_layer):
            residual = x
            xn = rmsnorm(x)
            q = (xn @ params[f"layer{i}.attn_wq"].T).reshape(B, T, H, D).transpose(0, 2, 1, 3)
            k = (xn @ params[f"layer{i}.attn_wk"].T).reshape(B, T, H, D).transpose(0, 2, 1, 3)
            v = (xn @ params[f"layer{i}.attn_wv"].T).reshape(B, T, H, D).transpose(0, 2, 1, 3)
            scores = (q @ k.transpose(0, 1, 3, 2)) * self.attention_scale + self.causal_mask
            weights = mx.softmax(scores, axis=-1)  # (B, H, T, T)
            heads = (weights @ v).transpose(0, 2, 1, 3).reshape(B, T, H * D)  # (B, T, C)
            x = heads @ params[f"layer{i}.attn_wo"].T + residual
            residual = x
            hidden = mx.maximum(rmsnorm(x) @ params[f"layer{i}.mlp_fc1"].T, 0)  # (B, T, 4C)
            x = hidden @ params[f"layer{i}.mlp_fc2"].T + residual
        logits = x @ params["lm_head"].T  # (B, T, V)
        log_probs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        target_log_probs = mx.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        # Padded positions (p >= n) are computed but weigh nothing.
        real = (self.positions[None, :] < lengths[:, None]).astype(self.mx_dtype)  # (B, T)
        return -(target_log_probs * real).sum() / real.sum()

    def _step_function(self, tokens, lengths, adam_scalars):
        """One training step on self.state; returns the loss. Traced once by mx.compile."""
        self.trace_count += 1  # Python runs only while tracing
        cfg = self.config
        flat, m, v = self.state
        names = list(self.layout)
        views = self._unflatten(flat)

        def loss_of(matrices):
            return self._loss(dict(zip(names, matrices)), tokens, lengths)

        loss, grads = mx.value_and_grad(loss_of)([views[name] for name in names])
        g = mx.concatenate([grad.reshape(-1) for grad in grads])  # (P,)
        learning_rate, bias_correction1, bias_correction2 = (adam_scalars[0], adam_scalars[1],
                                                             adam_scalars[2])
        m = cfg.beta1 * m + (1 - cfg.beta1) * g
        v = cfg.beta2 * v + (1 - cfg.beta2) * (g * g)
        m_hat = m / bias_correction1
        v_hat = v / bias_correction2
        flat = flat - learning_rate * m_hat / (mx.sqrt(v_hat) + cfg.eps)
        self.state[:] = [flat, m, v]
        return loss

    def _step_inputs(self, batch: TokenBatch, adam: AdamStep):
        return (mx.array(batch.padded),
                mx.array(batch.lengths),
                mx.array(np.array([adam.learning_rate, adam.bias_correction1,
                                   adam.bias_correction2], dtype=self.np_dtype)))

    def prepare(self):
        """Trace and compile the training and sampling steps on dummy inputs, then put the
        parameters and moments back as they were (the arrays are immutable; we keep them)."""
        saved = list(self.state)
        block = self.config.block_size
        bos = self.vocab_size - 1
        batch = TokenBatch.from_sequences([[bos, bos]] * self.config.batch_size, block, bos)
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

    def train_step(self, batch, adam):
        with mx.stream(self.mx_device):
            loss = self._train_step(*self._step_inputs(batch, adam))
            # Evaluate here so that the step's work finishes inside the runner's timed region.
            mx.eval(loss, self.state)
        return loss.item()

    def sync(self):
        mx.synchronize()

    # ---- sampling --------------------------------------------------------------------------
    def reset_cache(self):
        cfg = self.config
        shape = (cfg.n_layer, cfg.block_size, cfg.n_embd)  # (L, T, C): one row per position
        with mx.stream(self.mx_device):
            # Unwritten rows are masked out of attention; zeros only keep them finite.
            self.cache_keys = mx.zeros(shape, dtype=self.mx_dtype)
            self.cache_values = mx.zeros(shape, dtype=self.mx_dtype)

    def _next_logits_function(self, flat, cache_keys, cache_values, token_and_position):
        """Logits of one token at one position, with the cache row of that position written.
        Fixed shapes (the whole block_size cache, masked past `position`) so that it compiles
        once for every position."""
        self.sampling_trace_count += 1
        cfg = self.config
        H, D = cfg.n_head, cfg.head_dim
        p = self._unflatten(flat)
        token, position = token_and_position[0], token_and_position[1]
        x = rmsnorm(p["wte"][token] + p["wpe"][position])  # (C,)
        written = (self.positions == position)[:, None]  # (T, 1): the row to write
        visible = self.positions <= position  # (T,): rows attended to
        keys_out, values_out = [], []
        for i in range(cfg.n_layer):
            residual = x
            xn = rmsnorm(x)
            q = (p[f"layer{i}.attn_wq"] @ xn).reshape(H, D)
            keys = mx.where(written, (p[f"layer{i}.attn_wk"] @ xn)[None, :], cache_keys[i])
            values = mx.where(written, (p[f"layer{i}.attn_wv"] @ xn)[None, :],
                              cache_values[i])  # (T, C)
            keys_out.append(keys)
            values_out.append(values)
            scores = (keys.reshape(-1, H, D) * q[None]).sum(axis=-1).T * self.attention_scale
            scores = mx.where(visible[None, :], scores, -np.inf)  # (H, T)
            weights = mx.softmax(scores, axis=-1)
            heads = (weights[:, :, None] * values.reshape(-1, H, D).transpose(1, 0, 2)).sum(
                axis=1).reshape(-1)  # (C,)
            x = p[f"layer{i}.attn_wo"] @ heads + residual
            hidden = mx.maximum(p[f"layer{i}.mlp_fc1"] @ rmsnorm(x), 0)  # (4C,)
            x = p[f"layer{i}.mlp_fc2"] @ hidden + x
        logits = p["lm_head"] @ x  # (V,)
        return logits, mx.stack(keys_out), mx.stack(values_out)

    def next_logits(self, token, position):
        with mx.stream(self.mx_device):
            logits, self.cache_keys, self.cache_values = self._sample_step(
                self.state[0], self.cache_keys, self.cache_values,
                mx.array(np.array([token, position], dtype=np.int32)))
            return np.array(logits).astype(np.float64)

    def details(self):
        return {"device": self.device, "compile": "mx.compile (whole step)",
                "padding": f"fixed block_size {self.config.block_size} with a length mask"}
