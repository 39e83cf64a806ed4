"""PyTorch as its documentation teaches it (the "idiomatic" division): `torch` and
`torch-compile`.

- `torch`: the GPT as an nn.Module (nn.Embedding, nn.Linear without bias, nn.RMSNorm without
  a learned scale, F.scaled_dot_product_attention), F.cross_entropy, loss.backward(),
  torch.optim.Adam in its default implementation and the spec's linear decay as a LambdaLR.
  Every step does what a user's training loop does: build the input tensors from the token
  ids, forward, backward, optimizer and scheduler steps, loss.item().
- `torch-compile`: the same module under torch.compile(model), and optimizer.step() compiled
  as PyTorch's "compiling the optimizer" recipe shows (lr a tensor, so the scheduler does not
  recompile it). Both are called through Dynamo, guards and all; sequence lengths vary, and
  torch.compile's default automatic dynamic shapes handle them.

Public torch API only, torch's default threads. Sampling runs the eager module with a
key/value cache under torch.no_grad() (for torch-compile too: the cache grows every position).
"""
from __future__ import annotations

import collections
import contextlib
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from backends.contract import RMS_EPS, Backend, BackendUnavailable, TokenBatch
from backends.devices import resolve_torch_device, synchronize_torch

IGNORE = -100  # F.cross_entropy's default ignore_index: targets of padded positions


# ---- the model -------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.wq = nn.Linear(n_embd, n_embd, bias=False)
        self.wk = nn.Linear(n_embd, n_embd, bias=False)
        self.wv = nn.Linear(n_embd, n_embd, bias=False)
        self.wo = nn.Linear(n_embd, n_embd, bias=False)

    def forward(self, x, cache: dict | None = None):
        B, T, C = x.shape
        heads = lambda y: y.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.wq(x)), heads(self.wk(x)), heads(self.wv(x))  # (B, H, T, D)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # sampling: one new position, which attends to every cached one (no mask)
            if cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
            y = F.scaled_dot_product_attention(q, k, v)
        return self.wo(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.norm = nn.RMSNorm(n_embd, eps=RMS_EPS, elementwise_affine=False)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.fc1 = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.fc2 = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x, cache: dict | None = None):
        x = x + self.attn(self.norm(x), cache)
        return x + self.fc2(F.relu(self.fc1(self.norm(x))))


class GPT(nn.Module):
    def __init__(self, config, vocab_size: int):
        super().__init__()
        C = config.n_embd
        self.wte = nn.Embedding(vocab_size, C)
        self.wpe = nn.Embedding(config.block_size, C)
        self.norm = nn.RMSNorm(C, eps=RMS_EPS, elementwise_affine=False)
        self.layers = nn.ModuleList(Block(C, config.n_head) for _ in range(config.n_layer))
        self.lm_head = nn.Linear(C, vocab_size, bias=False)

    def forward(self, idx, targets=None, caches: list | None = None, start: int = 0):
        """Logits (B, T, V) for token ids (B, T) at positions start..start+T-1, or the mean
        cross-entropy over the targets that are not IGNORE."""
        T = idx.shape[1]
        positions = torch.arange(start, start + T, device=idx.device)
        x = self.norm(self.wte(idx) + self.wpe(positions))
        for i, layer in enumerate(self.layers):
            x = layer(x, None if caches is None else caches[i])
        logits = self.lm_head(x)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1),
                               ignore_index=IGNORE)

    def spec_parameters(self) -> dict:
        """Spec name -> parameter ([out, in], as nn.Linear.weight and nn.Embedding.weight)."""
        named = {"wte": self.wte.weight, "wpe": self.wpe.weight, "lm_head": self.lm_head.weight}
        for i, layer in enumerate(self.layers):
            named.update({f"layer{i}.attn_wq": layer.attn.wq.weight,
                          f"layer{i}.attn_wk": layer.attn.wk.weight,
                          f"layer{i}.attn_wv": layer.attn.wv.weight,
                          f"layer{i}.attn_wo": layer.attn.wo.weight,
                          f"layer{i}.mlp_fc1": layer.fc1.weight,
                          f"layer{i}.mlp_fc2": layer.fc2.weight})
        return named


# ---- the backends ----------------------------------------------------------------------------
class TorchModuleBackend(Backend):
    name = "torch"
    provides_gradients = True
    provides_moments = True

    def __init__(self, config, vocab_size, dtype, device=None):
        super().__init__(config, vocab_size, dtype, device)  # resolves the device
        if self.device == "mps" and dtype == "float64":
            raise BackendUnavailable(
                f"backend {self.name}: the MPS device has no float64; use --dtype float32 "
                "or --device cpu")
        self.torch_dtype = torch.float64 if dtype == "float64" else torch.float32
        self.model = GPT(config, vocab_size).to(device=self.device, dtype=self.torch_dtype)
        self.named = self.model.spec_parameters()
        self.optimizer = self.scheduler = None
        self.step = 0
        self.reset_cache()

    def resolve_device(self, requested):
        return resolve_torch_device(self.name, requested)

    def make_optimizer(self):
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=self.config.learning_rate,
            betas=(self.config.beta1, self.config.beta2), eps=self.config.eps)

    def make_scheduler(self):
        num_steps = self.config.num_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: 1 - step / num_steps)

    # ---- parameters ------------------------------------------------------------------------
    def load_parameters(self, parameters):
        with torch.no_grad():
            for name, value in parameters.items():
                # cast on the host: MPS cannot receive float64
                self.named[name].copy_(torch.as_tensor(np.asarray(value, dtype=self.dtype)))
        # fresh Adam (zero moments, step 0) and schedule
        self.make_optimizer()
        self.make_scheduler()
        self.step = 0

    def parameters(self):
        return {name: p.detach().to(device="cpu", dtype=torch.float64).numpy().copy()
                for name, p in self.named.items()}

    def optimizer_moments(self):
        """Adam's exp_avg and exp_avg_sq from optimizer.state; torch creates a parameter's
        state on its first step, so none yet means zeros."""
        moments = ({}, {})
        for name, p in self.named.items():
            state = self.optimizer.state.get(p, {})
            for moment, key in zip(moments, ("exp_avg", "exp_avg_sq")):
                value = state.get(key)
                moment[name] = (np.zeros(tuple(p.shape)) if value is None else
                                value.detach().to(device="cpu", dtype=torch.float64)
                                .numpy().copy())
        return moments

    # ---- training --------------------------------------------------------------------------
    def tensors(self, batch: TokenBatch):
        """The step's inputs and targets (B, T), rows padded to the longest; padded targets
        are IGNOREd by the loss."""
        sequences = batch.sequences
        T = max(len(tokens) for tokens in sequences) - 1
        pad = self.vocab_size - 1  # BOS
        inputs = [tokens[:-1] + [pad] * (T + 1 - len(tokens)) for tokens in sequences]
        targets = [tokens[1:] + [IGNORE] * (T + 1 - len(tokens)) for tokens in sequences]
        return (torch.tensor(inputs, device=self.device),
                torch.tensor(targets, device=self.device))

    def forward_loss(self, inputs, targets):
        return self.model(inputs, targets)

    def optimizer_step(self):
        self.optimizer.step()

    def train_step(self, batch, adam):
        if adam.step != self.step:  # the optimizer and scheduler count steps themselves
            raise RuntimeError(f"backend {self.name}: harness step {adam.step}, "
                               f"optimizer step {self.step}")
        inputs, targets = self.tensors(batch)
        self.optimizer.zero_grad()
        loss = self.forward_loss(inputs, targets)
        loss.backward()
        self.optimizer_step()
        self.scheduler.step()
        self.step += 1
        return loss.item()

    def loss_and_gradients(self, batch):
        self.model.zero_grad()
        loss = self.model(*self.tensors(batch))
        loss.backward()
        gradients = {name: p.grad.detach().to(device="cpu", dtype=torch.float64).numpy().copy()
                     for name, p in self.named.items()}
        self.model.zero_grad()
        return loss.item(), gradients

    def sync(self):
        synchronize_torch(self.device)

    # ---- sampling --------------------------------------------------------------------------
    def reset_cache(self):
        self.caches = [{} for _ in range(self.config.n_layer)]

    def next_logits(self, token, position):
        with torch.no_grad():
            idx = torch.tensor([[token]], device=self.device)
            logits = self.model(idx, caches=self.caches, start=position)
        return logits[0, -1].to(device="cpu", dtype=torch.float64).numpy()

    def details(self):
        return {"device": self.device, "dtype": self.dtype, "threads": torch.get_num_threads(),
                "threads_from": "torch default", "torch": torch.__version__,
                "model": "nn.Module: nn.Embedding, nn.Linear(bias=False), "
                         "nn.RMSNorm(elementwise_affine=False), F.scaled_dot_product_attention",
                "loss": "F.cross_entropy(ignore_index=-100)",
                "autograd": "loss.backward()",
                "optimizer": "torch.optim.Adam (default implementation)",
                "schedule": "torch.optim.lr_scheduler.LambdaLR(1 - step / num_steps), "
                            "stepped once per step"}


# ---- torch.compile ---------------------------------------------------------------------------
TRACES: collections.Counter = collections.Counter()  # compiled function -> Dynamo traces


@torch.compiler.assume_constant_result
def count_trace(function: str) -> bool:
    """Called first thing in each compiled function. Marked a constant result, it runs while
    Dynamo traces and is a constant of the graph: nothing per call, one count per trace, by
    public API only. Its argument must be a literal: Dynamo breaks the graph on a variable."""
    TRACES[function] += 1
    return True


@contextlib.contextmanager
def default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class TorchCompiledModuleBackend(TorchModuleBackend):
    name = "torch-compile"
    # the gradients of loss_and_gradients would be the eager module's, tested by the torch row
    provides_gradients = False

    def __init__(self, config, vocab_size, dtype, device=None):
        super().__init__(config, vocab_size, dtype, device)
        self.traces = collections.Counter()  # traces during this backend's calls
        self.compile_seconds = None
        model = self.model

        def compute_loss(inputs, targets):
            count_trace("model")
            return model(inputs, targets)

        # torch.compile(model) with a trace counter around it; default mode and dynamic shapes
        self.compiled_loss = torch.compile(compute_loss)
        # One optimizer for the backend's lifetime: opt_step's guards hold on to it, so a new
        # optimizer per load_parameters would recompile it every time. Reloading zeroes its
        # state instead (make_optimizer), which is exactly a fresh Adam's.
        self.make_optimizer()

        @torch.compile(fullgraph=False)
        def opt_step():
            count_trace("optimizer_step")
            self.optimizer.step()

        self.opt_step = opt_step

    def make_optimizer(self):
        # lr as a tensor: the scheduler changes its value, not a constant of the compiled step
        lr = torch.tensor(self.config.learning_rate, dtype=self.torch_dtype, device=self.device)
        if self.optimizer is None:
            self.optimizer = torch.optim.Adam(
                self.model.parameters(), lr=lr, betas=(self.config.beta1, self.config.beta2),
                eps=self.config.eps)
            return
        with torch.no_grad():
            for state in self.optimizer.state.values():
                for value in state.values():
                    value.zero_()  # moments and step count
            for group in self.optimizer.param_groups:  # the new scheduler starts from these
                group["lr"].copy_(lr)
                group.get("initial_lr", group["lr"]).copy_(lr)

    def forward_loss(self, inputs, targets):
        before = TRACES["model"]
        loss = self.compiled_loss(inputs, targets)
        self.traces["model"] += TRACES["model"] - before
        return loss

    def dtype_scope(self):
        """float64 runs under torch's default dtype float64, as a float64 user sets it: Adam
        keeps its step count in the default dtype, and compiled Adam computes the bias
        corrections from that tensor (float32 rounding there is a 3e-7 loss gap at 200
        steps). Scoped to this backend's calls, so that other backends in the process keep
        theirs."""
        if self.dtype == "float64":
            return default_dtype(torch.float64)
        return contextlib.nullcontext()

    def train_step(self, batch, adam):
        with self.dtype_scope():
            return super().train_step(batch, adam)

    def optimizer_step(self):
        before = TRACES["optimizer_step"]
        self.opt_step()
        self.traces["optimizer_step"] += TRACES["optimizer_step"] - before

    def prepare(self):
        """Compile on representative inputs (lengths 1, 2, 3, then the block: what automatic
        dynamic shapes needs to settle) and put the parameters and optimizer state back."""
        parameters = {name: p.detach().clone() for name, p in self.named.items()}
        optimizer_state = {key: {name: value.clone() for name, value in state.items()}
                           for key, state in self.optimizer.state.items()}
        learning_rates = [group["lr"].clone() for group in self.optimizer.param_groups]
        scheduler_state, step = self.scheduler.state_dict(), self.step
        bos, block = self.vocab_size - 1, self.config.block_size
        start = time.perf_counter()
        with self.dtype_scope():
            for n in (1, 2, 3, block):
                rows = [[bos] * (n + 1)] * self.config.batch_size
                batch = TokenBatch.from_sequences(rows, block, bos)
                self.optimizer.zero_grad()
                self.forward_loss(*self.tensors(batch)).backward()
                self.optimizer_step()
        self.sync()
        self.compile_seconds = time.perf_counter() - start
        with torch.no_grad():
            for name, p in self.named.items():
                p.copy_(parameters[name])
            for key, state in self.optimizer.state.items():  # created here: zero, as fresh
                for name, value in state.items():
                    if key in optimizer_state:
                        value.copy_(optimizer_state[key][name])
                    else:
                        value.zero_()
            for group, lr in zip(self.optimizer.param_groups, learning_rates):
                group["lr"].copy_(lr)
        self.optimizer.zero_grad()
        self.scheduler.load_state_dict(scheduler_state)
        self.step = step
        return {"compile_s": self.compile_seconds}

    def trace_counts(self):
        return dict(self.traces)

    def details(self):
        details = super().details()
        details.update({
            "compile": {"model": "torch.compile(model) (default mode and backend, automatic "
                                 "dynamic shapes)",
                        "optimizer": "optimizer.step() under torch.compile(fullgraph=False), "
                                     "lr a tensor",
                        "calls": "through Dynamo (guards checked every call)"},
            "sampling": "eager module with a key/value cache",
            "compile_seconds": self.compile_seconds,
            "traces": self.trace_counts(),
        })
        return details
