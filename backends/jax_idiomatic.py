"""JAX as its documentation and optax's teach it: the parameters as a pytree (a dict of arrays by
the spec's names), a pure loss function, `jax.value_and_grad`, `optax.adam` with an
`optax.linear_schedule` learning rate, `optax.apply_updates`, and the whole step under
`jax.jit` with the parameters and optimizer state donated.

- Sequence lengths: the tokens are padded to block_size and the loss masked, so one compiled
  step serves every length (causal attention: padding after a position never changes it).
- 64-bit types: importing this module turns on `jax_enable_x64` (JAX makes no float64 arrays
  without it; a process-wide switch, as in jax_tuned). Parameters and masks carry explicit
  dtypes, so a float32 run keeps float32 parameters, moments and loss (optax computes its
  bias-correction scalars in float64 under x64 and casts them).
- The schedule is optax.linear_schedule applied to optax's int32 step count cast to the compute
  dtype: JAX divides int32 by int in float32 even with x64, which put float64 losses 9.4e-8 off
  the reference (optax's bias corrections are float64 already).
- Threads, dispatch and devices are JAX's defaults (its GPU when jaxlib has one).
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from backends.contract import RMS_EPS, Backend, TokenBatch
from backends.devices import jax_devices, resolve_jax_device

jax.config.update("jax_enable_x64", True)  # see the module docstring


def rmsnorm(x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + RMS_EPS)


class JaxOptaxBackend(Backend):
    name = "jax"
    provides_gradients = True
    provides_moments = True

    def __init__(self, config, vocab_size, dtype, device=None):
        super().__init__(config, vocab_size, dtype, device)
        self.jax_device = jax_devices(self.device)[0]
        self.np_dtype = np.dtype(dtype)
        linear = optax.linear_schedule(init_value=config.learning_rate, end_value=0.0,
                                       transition_steps=config.num_steps)
        dtype = self.np_dtype

        def schedule(count):
            # optax's step count is int32 and JAX divides int32 in float32 (even with x64),
            # which puts float64 losses 9e-8 off the reference: count in the compute dtype.
            return linear(jnp.asarray(count).astype(dtype))

        self.schedule = schedule
        self.optimizer = optax.adam(learning_rate=schedule, b1=config.beta1, b2=config.beta2,
                                    eps=config.eps)
        self.traces = {"train_step": 0, "loss_and_gradients": 0, "next_logits": 0}
        self._train_step = jax.jit(self.step_function, donate_argnums=(0, 1))
        self._loss_and_gradients = jax.jit(self.loss_and_gradients_function)
        self._next_logits = jax.jit(self.next_logits_function)
        self.params = self.opt_state = None
        self.steps_taken = 0
        self.empty_cache = None
        self.reset_cache()

    def resolve_device(self, requested):
        return resolve_jax_device(self.name, requested)

    # ---- parameters ------------------------------------------------------------------------
    def load_parameters(self, parameters):
        self.params = {name: jax.device_put(np.asarray(parameters[name], dtype=self.np_dtype),
                                            self.jax_device) for name in self.shapes}
        # Committed to the device like the parameters (optax makes its step counts
        # uncommitted): otherwise the step's outputs, which are committed, differ from its
        # first inputs and jit compiles the step a second time.
        self.opt_state = jax.device_put(self.optimizer.init(self.params), self.jax_device)
        self.steps_taken = 0

    def parameters(self):
        return {name: np.asarray(value).astype(np.float64) for name, value in self.params.items()}

    def optimizer_moments(self):
        """optax.adam's ScaleByAdamState mu and nu (pytrees like the parameters), found in
        the chained optimizer state with optax.tree_utils.tree_get."""
        return tuple({name: np.asarray(value).astype(np.float64) for name, value in
                      optax.tree_utils.tree_get(self.opt_state, key).items()}
                     for key in ("mu", "nu"))

    # ---- the model (pure functions of the parameter pytree) --------------------------------
    def forward(self, params, inputs):
        """inputs int (B, T) -> logits (B, T, V)."""
        cfg = self.config
        B, T = inputs.shape
        H, D, C = cfg.n_head, cfg.head_dim, cfg.n_embd
        causal = jnp.tril(jnp.ones((T, T), dtype=bool))
        x = rmsnorm(params["wte"][inputs] + params["wpe"][:T])
        for i in range(cfg.n_layer):
            h = rmsnorm(x)
            q, k, v = (h @ params[f"layer{i}.attn_{w}"].T for w in ("wq", "wk", "wv"))
            q, k, v = (a.reshape(B, T, H, D) for a in (q, k, v))
            scores = jnp.einsum("bthd,bshd->bhts", q, k) * (1.0 / D ** 0.5)
            weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
            heads = jnp.einsum("bhts,bshd->bthd", weights, v).reshape(B, T, C)
            x = x + heads @ params[f"layer{i}.attn_wo"].T
            hidden = jax.nn.relu(rmsnorm(x) @ params[f"layer{i}.mlp_fc1"].T)
            x = x + hidden @ params[f"layer{i}.mlp_fc2"].T
        return x @ params["lm_head"].T

    def loss_fn(self, params, tokens, lengths):
        """Mean cross-entropy over the real positions. tokens (B, T+1), lengths (B,)."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        logits = self.forward(params, inputs)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        mask = (jnp.arange(inputs.shape[1])[None, :] < lengths[:, None]).astype(self.np_dtype)
        return (losses * mask).sum() / mask.sum()

    # ---- training --------------------------------------------------------------------------
    def step_function(self, params, opt_state, tokens, lengths):
        self.traces["train_step"] += 1  # Python runs only while tracing
        loss, grads = jax.value_and_grad(self.loss_fn)(params, tokens, lengths)
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def train_step(self, batch, adam):
        # optax computes the learning rate and bias corrections from its own step count; the
        # harness's scalars are only checked against it.
        if adam.step != self.steps_taken:
            raise RuntimeError(f"{self.name}: step {adam.step} requested, but the optimizer is "
                               f"at step {self.steps_taken} (reload to restart)")
        self.steps_taken += 1
        self.params, self.opt_state, loss = self._train_step(
            self.params, self.opt_state, batch.padded, batch.lengths)
        return float(loss)

    def loss_and_gradients_function(self, params, tokens, lengths):
        self.traces["loss_and_gradients"] += 1
        return jax.value_and_grad(self.loss_fn)(params, tokens, lengths)

    def loss_and_gradients(self, batch: TokenBatch):
        loss, grads = self._loss_and_gradients(self.params, batch.padded, batch.lengths)
        return float(loss), {name: np.asarray(g).astype(np.float64) for name, g in grads.items()}

    def prepare(self):
        """Compile the step and the sampling step once, on copies of the state (the step
        donates, i.e. consumes, its inputs); the parameters are unchanged."""
        bos = self.vocab_size - 1
        batch = TokenBatch.from_sequences([[bos, bos]] * self.config.batch_size,
                                          self.config.block_size, bos)
        params, opt_state = jax.tree.map(jnp.copy, (self.params, self.opt_state))
        start = time.perf_counter()
        jax.block_until_ready(self._train_step(params, opt_state, batch.padded, batch.lengths))
        compile_seconds = time.perf_counter() - start
        start = time.perf_counter()
        self.next_logits(bos, 0)
        self.reset_cache()
        return {"compile_train_step": compile_seconds,
                "compile_next_logits": time.perf_counter() - start}

    def sync(self):
        jax.block_until_ready(self.params)

    # ---- sampling --------------------------------------------------------------------------
    def reset_cache(self):
        if self.empty_cache is None:  # arrays are immutable: one empty cache serves all
            cfg = self.config
            # (layers, heads, block_size, head_dim), written one position at a time;
            # positions not yet written are masked out.
            shape = (cfg.n_layer, cfg.n_head, cfg.block_size, cfg.head_dim)
            self.empty_cache = (jnp.zeros(shape, dtype=self.np_dtype, device=self.jax_device),) * 2
        self.cache = self.empty_cache

    def next_logits_function(self, params, cache, token, position):
        self.traces["next_logits"] += 1
        cfg = self.config
        H, D, C, T = cfg.n_head, cfg.head_dim, cfg.n_embd, cfg.block_size
        keys, values = cache
        visible = jnp.arange(T) <= position
        x = rmsnorm(params["wte"][token] + params["wpe"][position])  # (C,)
        for i in range(cfg.n_layer):
            h = rmsnorm(x)
            q, k, v = (params[f"layer{i}.attn_{w}"] @ h for w in ("wq", "wk", "wv"))
            keys = keys.at[i, :, position].set(k.reshape(H, D))
            values = values.at[i, :, position].set(v.reshape(H, D))
            scores = jnp.einsum("hd,htd->ht", q.reshape(H, D), keys[i]) * (1.0 / D ** 0.5)
            weights = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
            heads = jnp.einsum("ht,htd->hd", weights, values[i]).reshape(C)
            x = x + params[f"layer{i}.attn_wo"] @ heads
            x = x + params[f"layer{i}.mlp_fc2"] @ jax.nn.relu(params[f"layer{i}.mlp_fc1"]
                                                              @ rmsnorm(x))
        return params["lm_head"] @ x, (keys, values)

    def next_logits(self, token, position):
        logits, self.cache = self._next_logits(self.params, self.cache, np.int32(token),
                                               np.int32(position))
        return np.asarray(logits).astype(np.float64)

    def trace_counts(self):
        return dict(self.traces)

    def details(self):
        return {"device": self.device,
                "optimizer": "optax.adam(b1, b2, eps) with optax.linear_schedule",
                "schedule": f"optax.linear_schedule({self.config.learning_rate}, 0.0, "
                            f"{self.config.num_steps})",
                "compile": "jax.jit (whole step; params and optimizer state donated)",
                "x64_enabled": bool(jax.config.jax_enable_x64),
                "padding": f"fixed block_size {self.config.block_size} with a loss mask"}
