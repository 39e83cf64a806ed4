"""JAX backend: the whole training step (forward, `jax.value_and_grad`, Adam) under one
`jax.jit`, with the parameters and Adam moments as three flat buffers donated to the step;
sampling with a fixed-shape key/value cache, jitted too. float32 by default, float64 on request.

Design notes (at 4,192 parameters a step is dispatch and per-kernel overhead, not arithmetic):
- 64-bit types: importing this module turns on `jax_enable_x64` (JAX can only make float64
  arrays with it on, and it is a process-wide switch that must be set before the step is
  traced). The runner gives every backend its own process; in a shared process (the tests) the
  switch stays on, so every array and constant this backend makes carries an explicit dtype
  and a float32 step computes in float32 throughout (the tests check its HLO for f64).
- It also turns off JAX's asynchronous CPU dispatch: the step then runs on the calling thread
  (a hand-off to a worker thread costs more than a step of this size).
- Flat buffers: the step takes the parameters, m and v as three `[P]` arrays (three donated
  buffers per call instead of 27, updated in place by XLA) and slices the model's matrices out
  of them inside the jitted function; the gradients are taken with respect to those matrices
  and concatenated, so Adam is one element-wise loop over `[P]`.
- One host-to-device transfer per step: the tokens, lengths and the two Adam quotients travel
  as one array (see _pack_inputs).
- Every step has the same shapes: the tokens are padded to block_size (TokenBatch.padded) and a
  mask built from TokenBatch.lengths gives the padded positions zero weight in the loss. Causal
  attention means the padding never changes a real position's value, so ONE compiled step
  serves every sequence length (no retrace or recompile per length).

Shapes: B batch rows, T = block_size positions, C = n_embd, H heads, D = head_dim, V vocab,
P parameters in all.
"""
from __future__ import annotations

import time

import numpy as np

from backends.contract import RMS_EPS, AdamStep, Backend, TokenBatch
from backends.devices import jax_devices, resolve_jax_device

import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", True)  # see the module docstring
# Run each computation inline on the calling thread instead of handing it to a worker thread:
# at this size the hand-off costs more than the step. Read when JAX creates its CPU client, so
# it only takes effect if nothing in the process used JAX before this import; details()
# reports whether it did.
try:  # a private helper: None (unknown) if a later JAX moves it
    from jax._src.xla_bridge import backends_are_initialized
    _INLINE_CPU_DISPATCH = not backends_are_initialized()
except (ImportError, AttributeError):  # pragma: no cover
    _INLINE_CPU_DISPATCH = None
jax.config.update("jax_cpu_enable_async_dispatch", False)


def rmsnorm(x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + RMS_EPS)


class JaxTunedBackend(Backend):
    name = "jax-tuned"
    provides_gradients = True
    provides_moments = True

    def __init__(self, config, vocab_size, dtype, device=None):
        super().__init__(config, vocab_size, dtype, device)
        self.jax_device = jax_devices(self.device)[0]
        self.jnp_dtype = jnp.float64 if dtype == "float64" else jnp.float32
        self.np_dtype = np.dtype(dtype)
        self.num_parameters = self.layout.total
        # The matrices the model computes with, tiling the same flat buffer in the same order:
        # wq, wk and wv lie one after the other in the spec's order, so `layer{i}.attn_wqkv`
        # (3C, C) is one slice and the three projections are one matmul.
        C = config.n_embd
        self.model_layout = {}
        for name, (rows, cols), offset in self.layout.entries:
            if name.endswith((".attn_wk", ".attn_wv")):
                continue
            if name.endswith(".attn_wq"):
                name, rows = name.replace(".attn_wq", ".attn_wqkv"), 3 * C
            self.model_layout[name] = (offset, (rows, cols))
        self.traces = {"train_step": 0, "next_logits": 0}  # Python runs only while tracing
        cfg = config
        T = cfg.block_size
        self.causal = np.tril(np.ones((T, T), dtype=bool))  # (T, T): query t sees keys <= t
        # -inf in the compute dtype (a bare -jnp.inf would enter a float32 graph as f64)
        self.masked_score = np.array(-np.inf, dtype=self.np_dtype)
        self.attention_scale = 1.0 / cfg.head_dim ** 0.5
        # Buffers 0-2 of the step are the parameters and the moments: XLA reuses them.
        self._train_step = jax.jit(self._step_function, donate_argnums=(0, 1, 2))
        self._loss_and_grad = jax.jit(self._loss_and_flat_gradient)
        # The caches are not donated: reset_cache can then hand out the same zero arrays every
        # time (a fresh device_put costs ~0.2 ms, more than a whole next_logits).
        self._sample_step = jax.jit(self._next_logits_function)
        self.flat, self.moment1, self.moment2 = (self._device_zeros() for _ in range(3))
        self._empty_cache = None
        self.reset_cache()

    def resolve_device(self, requested):
        return resolve_jax_device(self.name, requested)

    # ---- parameters ------------------------------------------------------------------------
    def _device_zeros(self):
        return jax.device_put(np.zeros(self.num_parameters, dtype=self.np_dtype),
                              self.jax_device)

    def _split(self, flat):
        """The model's matrices (see model_layout), sliced out of a flat buffer inside jit."""
        return {name: flat[offset: offset + rows * cols].reshape(rows, cols)
                for name, (offset, (rows, cols)) in self.model_layout.items()}

    def _join(self, matrices):
        """The inverse of _split: (P,)."""
        return jnp.concatenate([matrices[name].reshape(-1) for name in self.model_layout])

    # Each array handed to a jitted function costs a host-to-device transfer (~5 us on this
    # CPU), so a step's tokens, lengths and Adam scalars travel as ONE array of the compute
    # dtype: token ids and lengths are small integers, exact in float32 and float64.
    # The Adam scalars are the two quotients of the numpy reference's update, formed on the
    # host in float64: lr / bias_correction1 and 1 / bias_correction2. (Dividing them inside
    # the step makes a tiny XLA kernel that depends on nothing else in the graph; XLA's CPU
    # executor then runs it concurrently on its thread pool, and that hand-off cost ~50 us a
    # step here.)
    def _pack_inputs(self, batch: TokenBatch, adam: AdamStep) -> np.ndarray:
        step_size = adam.learning_rate / adam.bias_correction1
        inverse_bias_correction2 = 1.0 / adam.bias_correction2
        return np.concatenate([batch.padded.reshape(-1), batch.lengths,
                               (step_size, inverse_bias_correction2)]).astype(self.np_dtype)

    def _unpack_inputs(self, step_inputs):
        """-> tokens int32 (B, T+1), lengths (B,) and the Adam scalars (2,)."""
        T = self.config.block_size
        B = (step_inputs.shape[0] - 2) // (T + 2)  # static: the array's length gives B
        tokens = step_inputs[:B * (T + 1)].astype(jnp.int32).reshape(B, T + 1)
        lengths = step_inputs[B * (T + 1): B * (T + 2)]
        return tokens, lengths, step_inputs[B * (T + 2):]

    def load_parameters(self, parameters):
        flat = self.layout.flatten(parameters).astype(self.np_dtype)
        self.flat = jax.device_put(flat, self.jax_device)
        self.moment1, self.moment2 = self._device_zeros(), self._device_zeros()

    def parameters(self):
        return self.layout.split(np.asarray(self.flat).astype(np.float64))

    def optimizer_moments(self):
        """The two flat moment buffers, in the spec's flat layout like the parameters."""
        return tuple(self.layout.split(np.asarray(moment).astype(np.float64))
                     for moment in (self.moment1, self.moment2))

    # ---- training --------------------------------------------------------------------------
    def _loss(self, p, step_inputs):
        """Mean cross-entropy over the real positions. p: the model's matrices (_split);
        step_inputs as `_pack_inputs` makes them."""
        cfg = self.config
        H, D, C, T = cfg.n_head, cfg.head_dim, cfg.n_embd, cfg.block_size
        tokens, lengths, _ = self._unpack_inputs(step_inputs)  # (B, T+1), (B,)
        B = tokens.shape[0]
        # One-hot rows: the embedding is a matmul (its gradient another, not a scatter) and
        # the target log-probabilities a masked sum.
        one_hot = jax.nn.one_hot(tokens, self.vocab_size, dtype=self.jnp_dtype)  # (B, T+1, V)
        input_one_hot, target_one_hot = one_hot[:, :-1], one_hot[:, 1:]  # (B, T, V) each
        x = rmsnorm(input_one_hot @ p["wte"] + p["wpe"])  # (B, T, C)
        for i in range(cfg.n_layer):
            residual = x
            xn = rmsnorm(x)
            qkv = xn @ p[f"layer{i}.attn_wqkv"].T  # (B, T, 3C): wq, wk, wv are adjacent
            q, k, v = (qkv[..., j * C:(j + 1) * C].reshape(B, T, H, D) for j in range(3))
            scores = jnp.einsum("bthd,bshd->bhts", q, k) * self.attention_scale
            scores = jnp.where(self.causal, scores, self.masked_score)  # (B, H, T, T)
            weights = jax.nn.softmax(scores, axis=-1)
            heads = jnp.einsum("bhts,bshd->bthd", weights, v).reshape(B, T, C)
            x = heads @ p[f"layer{i}.attn_wo"].T + residual
            residual = x
            hidden = jax.nn.relu(rmsnorm(x) @ p[f"layer{i}.mlp_fc1"].T)  # (B, T, 4C)
            x = hidden @ p[f"layer{i}.mlp_fc2"].T + residual
        logits = x @ p["lm_head"].T  # (B, T, V)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        target_log_probs = (log_probs * target_one_hot).sum(axis=-1)  # (B, T)
        # Padded positions (p >= n) are computed but weigh nothing.
        real = (jnp.arange(T)[None, :] < lengths[:, None]).astype(self.jnp_dtype)  # (B, T)
        return -(target_log_probs * real).sum() / real.sum()

    def _step_function(self, flat, moment1, moment2, step_inputs):
        """One training step: returns the new parameters, moments and the loss."""
        self.traces["train_step"] += 1
        cfg = self.config
        # Gradients of the matrices, not of the flat buffer: the latter would pad every
        # matrix's gradient to (P,) and add them up; one concatenation is cheaper.
        loss, grads = jax.value_and_grad(self._loss)(self._split(flat), step_inputs)
        grad = self._join(grads)  # (P,)
        step_size, inverse_bias_correction2 = self._unpack_inputs(step_inputs)[2]
        moment1 = cfg.beta1 * moment1 + (1 - cfg.beta1) * grad
        moment2 = cfg.beta2 * moment2 + (1 - cfg.beta2) * (grad * grad)
        # p -= lr * m_hat / (sqrt(v_hat) + eps), m_hat = m / bc1, v_hat = v / bc2, in the
        # numpy reference's order: (m / (sqrt(v * (1 / bc2)) + eps)) * (lr / bc1)
        update = moment1 / (jnp.sqrt(moment2 * inverse_bias_correction2) + cfg.eps)
        return flat - update * step_size, moment1, moment2, loss

    def train_step(self, batch, adam):
        self.flat, self.moment1, self.moment2, loss = self._train_step(
            self.flat, self.moment1, self.moment2, self._pack_inputs(batch, adam))
        # Waits for the step, so its work ends inside the timed region. (np.asarray then
        # float is several times cheaper than float() on a jax.Array.)
        return float(np.asarray(loss))

    def _loss_and_flat_gradient(self, flat, step_inputs):
        loss, grads = jax.value_and_grad(self._loss)(self._split(flat), step_inputs)
        return loss, self._join(grads)

    def loss_and_gradients(self, batch: TokenBatch):
        """The loss and every gradient as float64 numpy [out, in], without updating (tests)."""
        unused_adam = AdamStep(step=0, learning_rate=0.0, bias_correction1=1.0,
                               bias_correction2=1.0)
        loss, grad = self._loss_and_grad(self.flat, self._pack_inputs(batch, unused_adam))
        return float(loss), self.layout.split(np.asarray(grad).astype(np.float64))

    def lowered_train_step_text(self, batch: TokenBatch, adam: AdamStep) -> str:
        """The step's StableHLO (tests check that a float32 step has no f64 in it)."""
        return self._train_step.lower(self.flat, self.moment1, self.moment2,
                                      self._pack_inputs(batch, adam)).as_text()

    def prepare(self):
        """Trace and compile the training and sampling steps by running them once on copies
        of the state (the step donates, i.e. consumes, its buffers); the state is unchanged."""
        bos = self.vocab_size - 1
        batch = TokenBatch.from_sequences([[bos, bos]] * self.config.batch_size,
                                          self.config.block_size, bos)
        dummy_adam = AdamStep(step=0, learning_rate=0.0, bias_correction1=1.0,
                              bias_correction2=1.0)
        copies = [jnp.array(buffer, copy=True) for buffer in
                  (self.flat, self.moment1, self.moment2)]
        start = time.perf_counter()
        outputs = self._train_step(*copies, self._pack_inputs(batch, dummy_adam))
        jax.block_until_ready(outputs)
        compile_seconds = time.perf_counter() - start
        start = time.perf_counter()
        self.reset_cache()
        self.next_logits(bos, 0)
        self.reset_cache()
        sampling_seconds = time.perf_counter() - start
        return {"compile_train_step": compile_seconds, "compile_next_logits": sampling_seconds}

    def sync(self):
        jax.block_until_ready((self.flat, self.moment1, self.moment2))

    # ---- sampling --------------------------------------------------------------------------
    def reset_cache(self):
        if self._empty_cache is None:
            cfg = self.config
            shape = (cfg.n_layer, cfg.block_size, cfg.n_embd)  # (L, T, C): a row per position
            # Rows not yet written are masked out of attention; zeros only keep them finite.
            self._empty_cache = jax.device_put(np.zeros(shape, dtype=self.np_dtype),
                                               self.jax_device)
        self.cache_keys = self.cache_values = self._empty_cache

    def _next_logits_function(self, flat, cache_keys, cache_values, token_and_position):
        """Logits of one token at one position, with the cache row of that position written.
        Fixed shapes (the whole block_size cache, masked past `position`) so that it compiles
        once for every position."""
        self.traces["next_logits"] += 1
        cfg = self.config
        H, D, T = cfg.n_head, cfg.head_dim, cfg.block_size
        p = self._split(flat)
        token, position = token_and_position[0], token_and_position[1]
        x = rmsnorm(p["wte"][token] + p["wpe"][position])  # (C,)
        visible = jnp.arange(T) <= position  # (T,): cache rows attended to
        for i in range(cfg.n_layer):
            residual = x
            xn = rmsnorm(x)
            q, k, v = jnp.split(p[f"layer{i}.attn_wqkv"] @ xn, 3)  # (C,) each
            q = q.reshape(H, D)
            cache_keys = cache_keys.at[i, position].set(k)
            cache_values = cache_values.at[i, position].set(v)
            keys = cache_keys[i].reshape(T, H, D)
            values = cache_values[i].reshape(T, H, D)
            scores = jnp.einsum("hd,thd->ht", q, keys) * self.attention_scale
            scores = jnp.where(visible, scores, self.masked_score)  # (H, T)
            weights = jax.nn.softmax(scores, axis=-1)
            heads = jnp.einsum("ht,thd->hd", weights, values).reshape(-1)  # (C,)
            x = p[f"layer{i}.attn_wo"] @ heads + residual
            hidden = jax.nn.relu(p[f"layer{i}.mlp_fc1"] @ rmsnorm(x))  # (4C,)
            x = p[f"layer{i}.mlp_fc2"] @ hidden + x
        return p["lm_head"] @ x, cache_keys, cache_values

    def next_logits(self, token, position):
        logits, self.cache_keys, self.cache_values = self._sample_step(
            self.flat, self.cache_keys, self.cache_values,
            np.array([token, position], dtype=np.int32))
        return np.asarray(logits).astype(np.float64)

    def trace_counts(self):
        return dict(self.traces)

    def details(self):
        return {"device": self.device, "compile": "jax.jit (whole step, donated buffers)",
                "x64_enabled": bool(jax.config.jax_enable_x64),
                "inline_cpu_dispatch": _INLINE_CPU_DISPATCH,
                "padding": f"fixed block_size {self.config.block_size} with a length mask"}
