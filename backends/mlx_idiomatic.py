"""MLX as its documentation and mlx-examples teach it: an `mlx.nn.Module` GPT, `nn.value_and_grad`
of a loss function, `mlx.optimizers.Adam` (bias correction on, the spec's linear learning-rate
decay as a schedule callable) and `optimizer.update(model, grads)`, then `mx.eval` of the model's
parameters and the optimizer state each step.

- `mlx` runs that step eagerly, on each step's real length (a batch is padded to its longest
  row, with a loss mask).
- `mlx-compile` puts the same step under `mx.compile` with `state = [model.state,
  optimizer.state]` as its inputs and outputs (mlx-examples' idiom). Its tokens are padded to
  block_size and the loss masked, so one compiled graph serves every sequence length (causal
  attention: padding after a position never changes it).

float32 on CPU or GPU (MLX's own choice), float64 on the CPU only. MLX's CPU `exp` (so
`softmax`, `logsumexp`) and `mx.fast.rms_norm` evaluate in float32 precision even for float64
inputs, so the float64 model spells softmax, log-sum-exp and rmsnorm out with exact ops
(`mx.power(e, x)`, as mlx_tuned does): correctness, not tuning. float32 uses MLX's own.

Two public-API choices keep float64 at float64 (with the documented `betas=[0.85, 0.99]` and
`optim.linear_schedule` the float64 losses end up 7.6e-7 off the reference): the schedule is a
callable in the compute dtype (linear_schedule computes in float32), and float64 betas are
float64 arrays (Adam raises Python-float betas to the uint64 step in float32). float32 uses
Python floats, as the docs do.
"""
import math
import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from backends.contract import RMS_EPS, AdamStep, Backend, BackendUnavailable, TokenBatch
from backends.devices import resolve_mlx_device


class FastOps:
    """MLX's own fused ops (float32)."""

    @staticmethod
    def rms_norm(x):
        return mx.fast.rms_norm(x, None, RMS_EPS)

    @staticmethod
    def softmax(x):
        return mx.softmax(x, axis=-1)

    @staticmethod
    def cross_entropy(logits, targets):
        return nn.losses.cross_entropy(logits, targets)


class ExactOps:
    """The same ops accurate to float64 (MLX's CPU exp and fast.rms_norm are float32-precise)."""

    def __init__(self):
        self.euler = mx.array(math.e, dtype=mx.float64)

    @staticmethod
    def rms_norm(x):
        return x * mx.rsqrt(mx.mean(mx.square(x), axis=-1, keepdims=True) + RMS_EPS)

    def exp(self, x):
        return mx.power(self.euler, x)

    def softmax(self, x):
        e = self.exp(x - mx.stop_gradient(mx.max(x, axis=-1, keepdims=True)))
        return e / e.sum(axis=-1, keepdims=True)

    def cross_entropy(self, logits, targets):
        # nn.losses.cross_entropy's formula, with an exact log-sum-exp
        logits = logits - mx.stop_gradient(mx.max(logits, axis=-1, keepdims=True))
        score = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
        return mx.log(self.exp(logits).sum(axis=-1)) - score


# ---- the model -----------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, ops):
        super().__init__()
        self.n_head = n_head
        self.scale = 1.0 / math.sqrt(n_embd // n_head)
        self.ops = ops
        self.wq = nn.Linear(n_embd, n_embd, bias=False)
        self.wk = nn.Linear(n_embd, n_embd, bias=False)
        self.wv = nn.Linear(n_embd, n_embd, bias=False)
        self.wo = nn.Linear(n_embd, n_embd, bias=False)

    def __call__(self, x, mask=None, cache=None):
        B, L, C = x.shape
        H = self.n_head
        q, k, v = (proj(x).reshape(B, L, H, -1).transpose(0, 2, 1, 3)
                   for proj in (self.wq, self.wk, self.wv))  # (B, H, L, D)
        if cache is not None:  # sampling: the earlier positions' keys and values
            k = mx.concatenate([cache[0], k], axis=2)
            v = mx.concatenate([cache[1], v], axis=2)
        scores = (q @ k.transpose(0, 1, 3, 2)) * self.scale
        if mask is not None:
            scores = scores + mask
        out = (self.ops.softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(B, L, C)
        return self.wo(out), (k, v)


class MLP(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.fc1 = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.fc2 = nn.Linear(4 * n_embd, n_embd, bias=False)

    def __call__(self, x):
        return self.fc2(nn.relu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, ops):
        super().__init__()
        self.ops = ops
        self.attn = CausalSelfAttention(n_embd, n_head, ops)
        self.mlp = MLP(n_embd)

    def __call__(self, x, mask=None, cache=None):
        h, cache = self.attn(self.ops.rms_norm(x), mask, cache)
        x = x + h
        return x + self.mlp(self.ops.rms_norm(x)), cache


class GPT(nn.Module):
    def __init__(self, config, vocab_size: int, ops):
        super().__init__()
        self.ops = ops
        self.wte = nn.Embedding(vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.layers = [Block(config.n_embd, config.n_head, ops) for _ in range(config.n_layer)]
        self.lm_head = nn.Linear(config.n_embd, vocab_size, bias=False)

    def __call__(self, inputs, cache=None, offset: int = 0):
        """inputs (B, L) token ids at positions offset..offset+L-1 -> logits (B, L, V) and the
        layers' (keys, values)."""
        L = inputs.shape[1]
        x = self.ops.rms_norm(self.wte(inputs) + self.wpe(mx.arange(offset, offset + L)))
        mask = (nn.MultiHeadAttention.create_additive_causal_mask(L, x.dtype) if L > 1
                else None)
        cache = cache or [None] * len(self.layers)
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache):
            x, layer_cache = layer(x, mask, layer_cache)
            new_cache.append(layer_cache)
        return self.lm_head(x), new_cache


def module_name(spec_name: str) -> str:
    """The spec's parameter name -> the module's ("layer0.attn_wq" -> "layers.0.attn.wq.weight")."""
    if spec_name.startswith("layer"):
        layer, _, rest = spec_name.partition(".")
        block, _, proj = rest.partition("_")
        return f"layers.{layer[len('layer'):]}.{block}.{proj}.weight"
    return f"{spec_name}.weight"


# ---- the backends --------------------------------------------------------------------------
class MLXModuleBackend(Backend):
    name = "mlx"
    provides_gradients = True
    provides_moments = True

    def __init__(self, config, vocab_size, dtype, device=None):
        super().__init__(config, vocab_size, dtype, device)
        if dtype == "float64" and self.device == "gpu":
            raise BackendUnavailable("MLX supports float64 on the CPU only; "
                                     "use --dtype float32 or --device cpu")
        self.mx_device = mx.gpu if self.device == "gpu" else mx.cpu
        self.mx_dtype = mx.float64 if dtype == "float64" else mx.float32
        with mx.stream(self.mx_device):
            self.ops = ExactOps() if dtype == "float64" else FastOps()
            self.model = GPT(config, vocab_size, self.ops)
            self.model.set_dtype(self.mx_dtype)
        self.loss_and_grad = nn.value_and_grad(self.model, self.loss_fn)
        self.steps_taken = 0
        self.optimizer = None
        self.reset_cache()

    def resolve_device(self, requested):
        return resolve_mlx_device(self.name, requested)

    # ---- parameters ------------------------------------------------------------------------
    def learning_rate_schedule(self, step):
        """The spec's lr * (1 - s / num_steps), in the compute dtype (mlx.optimizers'
        linear_schedule computes in float32)."""
        cfg = self.config
        return cfg.learning_rate * (1 - step.astype(self.mx_dtype) / cfg.num_steps)

    def make_optimizer(self):
        cfg = self.config
        betas = [cfg.beta1, cfg.beta2]
        if self.mx_dtype == mx.float64:
            # Adam computes beta ** step in the betas' dtype: float32 for Python floats, which
            # puts float64 losses 7e-7 off the reference; float64 arrays keep it float64.
            betas = [mx.array(beta, dtype=mx.float64) for beta in betas]
        optimizer = optim.Adam(learning_rate=self.learning_rate_schedule, betas=betas,
                               eps=cfg.eps, bias_correction=True)
        # Made now rather than at the first update, so that mx.compile sees the whole state.
        optimizer.init(self.model.trainable_parameters())
        return optimizer

    def load_parameters(self, parameters):
        with mx.stream(self.mx_device):
            self.model.load_weights([(module_name(name), mx.array(value, dtype=self.mx_dtype))
                                     for name, value in parameters.items()])
            self.optimizer = self.make_optimizer()
            mx.eval(self.model.parameters(), self.optimizer.state)
        self.steps_taken = 0

    def parameters(self):
        weights = dict(tree_flatten(self.model.parameters()))
        return {name: np.array(weights[module_name(name)]).astype(np.float64)
                for name in self.shapes}

    def optimizer_moments(self):
        """mlx.optimizers.Adam's state: "m" and "v" beside each parameter of the model's tree
        (flattened, "layers.0.attn.wq.weight.m")."""
        state = dict(tree_flatten(self.optimizer.state))
        return tuple({name: np.array(state[f"{module_name(name)}.{key}"]).astype(np.float64)
                      for name in self.shapes} for key in ("m", "v"))

    # ---- training --------------------------------------------------------------------------
    def loss_fn(self, model, tokens, lengths):
        """Mean cross-entropy over the real positions. tokens (B, L+1), lengths (B,)."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        logits, _ = model(inputs)
        mask = (mx.arange(inputs.shape[1])[None, :] < lengths[:, None]).astype(self.mx_dtype)
        return (self.ops.cross_entropy(logits, targets) * mask).sum() / mask.sum()

    def step_inputs(self, batch: TokenBatch):
        """(tokens, lengths): the rows cut to the batch's longest (eager: shapes are free)."""
        longest = int(batch.lengths.max())
        return mx.array(batch.padded[:, :longest + 1]), mx.array(batch.lengths)

    def check_step(self, adam: AdamStep):
        # The optimizer computes the learning rate and bias corrections from its own step
        # count; the harness's scalars are only checked against it.
        if adam.step != self.steps_taken:
            raise RuntimeError(f"{self.name}: step {adam.step} requested, but the optimizer is "
                               f"at step {self.steps_taken} (reload to restart)")
        self.steps_taken += 1

    def train_step(self, batch, adam):
        self.check_step(adam)
        with mx.stream(self.mx_device):
            loss, grads = self.loss_and_grad(self.model, *self.step_inputs(batch))
            self.optimizer.update(self.model, grads)
            mx.eval(self.model.parameters(), self.optimizer.state)
            return loss.item()

    def loss_and_gradients(self, batch: TokenBatch):
        with mx.stream(self.mx_device):
            loss, grads = self.loss_and_grad(self.model, *self.step_inputs(batch))
            mx.eval(loss, grads)
        grads = dict(tree_flatten(grads))
        return loss.item(), {name: np.array(grads[module_name(name)]).astype(np.float64)
                             for name in self.shapes}

    # ---- sampling --------------------------------------------------------------------------
    def reset_cache(self):
        self.cache = None

    def next_logits(self, token, position):
        with mx.stream(self.mx_device):
            logits, self.cache = self.model(mx.array([[token]]), self.cache, offset=position)
            return np.array(logits[0, -1]).astype(np.float64)

    def details(self):
        return {"device": self.device, "compile": "none (eager)",
                "optimizer": "mlx.optimizers.Adam(bias_correction=True)",
                "schedule": "callable lr * (1 - step / num_steps) in the compute dtype",
                "betas": ("float64 arrays" if self.mx_dtype == mx.float64
                          else "Python floats"),
                "padding": "each batch to its longest row, loss mask"}


class MLXCompiledModuleBackend(MLXModuleBackend):
    name = "mlx-compile"

    def __init__(self, config, vocab_size, dtype, device=None):
        super().__init__(config, vocab_size, dtype, device)
        self.traces = {"train_step": 0}  # the Python body runs only while tracing
        self.optimizer = self.make_optimizer()
        self.state = [self.model.state, self.optimizer.state]

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def step(tokens, lengths):
            self.traces["train_step"] += 1
            loss, grads = self.loss_and_grad(self.model, tokens, lengths)
            self.optimizer.update(self.model, grads)
            return loss

        self.compiled_step = step

    def load_parameters(self, parameters):
        super().load_parameters(parameters)
        # The compiled step reads and writes the arrays in self.state: point it at the new
        # optimizer's state (same structure, so the same compiled graph).
        self.state[1] = self.optimizer.state

    def step_inputs(self, batch: TokenBatch):
        """Padded to block_size: one shape, one compiled graph for every length."""
        return mx.array(batch.padded), mx.array(batch.lengths)

    def train_step(self, batch, adam):
        self.check_step(adam)
        with mx.stream(self.mx_device):
            loss = self.compiled_step(*self.step_inputs(batch))
            mx.eval(self.state)
            return loss.item()

    def prepare(self):
        """Trace and compile the step on dummy tokens, then put the parameters and a fresh
        optimizer back (MLX arrays are immutable: the saved ones are unchanged)."""
        saved = self.model.parameters()
        bos = self.vocab_size - 1
        batch = TokenBatch.from_sequences([[bos, bos]] * self.config.batch_size,
                                          self.config.block_size, bos)
        start = time.perf_counter()
        with mx.stream(self.mx_device):
            loss = self.compiled_step(*self.step_inputs(batch))
            mx.eval(loss, self.state)
            self.model.update(saved)
            self.optimizer = self.make_optimizer()
            self.state[1] = self.optimizer.state
        self.steps_taken = 0
        return {"compile_train_step": time.perf_counter() - start}

    def trace_counts(self):
        return dict(self.traces)

    def details(self):
        return {**super().details(),
                "compile": "mx.compile(inputs=state, outputs=state), state = [model.state, "
                           "optimizer.state]",
                "padding": f"fixed block_size {self.config.block_size} with a loss mask"}
