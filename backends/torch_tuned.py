"""PyTorch backends: `torch` (eager, hand-written backward pass) and `torch-compile` (the whole
training step, forward, backward and Adam, as one torch.compile graph). CPU, CUDA and Apple MPS.

At 4,192 parameters every kernel finishes in well under a microsecond, so a step costs what the
framework spends around its kernels (Python, operator dispatch, autograd bookkeeping), not
arithmetic: on the 2-core CI machine an eager op costs ~2-5 us inside a step. Both backends are
written for that regime:

- One flat buffer each for the parameters, the gradients and the two Adam moments. The weight
  matrices are views into it, so the gradients land in one buffer and Adam is one operation
  on whole buffers; no nn.Module, no torch.optim.
- Weights are stored transposed ([in, out]) so that each linear layer on row vectors (the
  compiled graph, sampling) is one matmul `x @ w`, and q, k and v come out of one [C, 3C]
  matmul. The token and position tables
  are adjacent rows of one [V + block, C] table (`embed`).
- Eager (`torch`): no autograd. Recording a graph and replaying it costs more than the
  arithmetic here, so the step is the forward pass, the hand-derived backward pass (numpy's,
  see backends/numpy_backend.py) and torch's fused Adam kernel, ~80 tensor operations in all.
  Activations are columns, x [C, N], one column per position: a linear layer is one matmul
  W @ x with the spec's [out, in] W (a transposed view of the stored block, made once); its
  backward pass is stored @ dy and the gradient x @ dy.T, written straight into the flat
  gradient buffer. With one sequence per step every head's queries, keys and values are then
  views of the qkv product ([3, H, D, T]), so attention needs no copies. The embedding lookup
  is a matmul by a one-hot selector built on the host, next to the one-hot targets of the
  loss. Constants are tensors made once, because a Python float operand costs a scalar
  conversion per call. One intra-op thread.
- Compiled (`torch-compile`): forward, backward (torch.func.grad_and_value) and the spec's Adam
  update in one graph. Inputs are always padded to block_size (`TokenBatch.padded`; targets past
  a row's length are ignored by the loss), so every step has the same shapes and the graph
  compiles once. Padding is exact: positions after a row's end never reach a real position
  through the causal attention and carry no loss. On the CPU the compiled graph is then called
  directly, without Dynamo's per-call overhead (see CompiledStep).
- Sampling (both): eager, under inference_mode, with a [H, block, D] key/value cache per layer.

Shapes: B batch rows, T positions, N = B * T positions in all (rows of activations in the
compiled graph, columns in the eager step), C = n_embd, H heads, D = head_dim, V vocab.
"""
from __future__ import annotations

import os
import time
from typing import NamedTuple

import numpy as np

import torch
import torch.nn.functional as F

from backends.contract import RMS_EPS, AdamStep, Backend, BackendUnavailable, TokenBatch, adam_step
from backends.devices import resolve_torch_device, synchronize_torch

IGNORE = -100  # cross_entropy's ignore_index: target of a padded position
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # torch's intra-op thread count


class StepInputs(NamedTuple):
    """One eager step's inputs (TorchTunedBackend._stage); N = B * T columns, one per position."""
    selector: "torch.Tensor"  # [V + block, N] one-hot: the token's row and row V + position
    targets: "torch.Tensor"  # [V, N] -1 / count at each real position's target token
    weights: "torch.Tensor"  # [1, N] 1 / count at real positions, 0 on padding
    batch_rows: int


# ---- the flat parameter buffer --------------------------------------------------------------
class FlatLayout:
    """Where every weight lives in the flat parameter buffer.

    Blocks in buffer order: `embed` [V + block, C] (wte's rows, then wpe's), `lm_head_t` [C, V],
    then per layer i `layer{i}.qkv_t` [C, 3C] (= [wq.T | wk.T | wv.T]), `layer{i}.wo_t` [C, C],
    `layer{i}.fc1_t` [C, 4C], `layer{i}.fc2_t` [4C, C]: the spec's [out, in] matrices transposed.
    """

    def __init__(self, config, vocab_size: int):
        C, V = config.n_embd, vocab_size
        self.n_embd, self.vocab_size, self.n_layer = C, V, config.n_layer
        shapes = [("embed", (V + config.block_size, C)), ("lm_head_t", (C, V))]
        for i in range(config.n_layer):
            shapes += [(f"layer{i}.qkv_t", (C, 3 * C)), (f"layer{i}.wo_t", (C, C)),
                       (f"layer{i}.fc1_t", (C, 4 * C)), (f"layer{i}.fc2_t", (4 * C, C))]
        self.blocks = []  # (name, offset, rows, cols)
        offset = 0
        for name, (rows, cols) in shapes:
            self.blocks.append((name, offset, rows, cols))
            offset += rows * cols
        self.size = offset

    def views(self, flat) -> dict:
        """Block name -> [rows, cols] view of `flat` (also used inside the compiled graph)."""
        return {name: flat[offset: offset + rows * cols].view(rows, cols)
                for name, offset, rows, cols in self.blocks}

    def spec_views(self, flat) -> dict:
        """Spec parameter name -> [out, in] view of `flat` (strided where stored transposed)."""
        blocks, C, V = self.views(flat), self.n_embd, self.vocab_size
        views = {"wte": blocks["embed"][:V], "wpe": blocks["embed"][V:],
                 "lm_head": blocks["lm_head_t"].T}
        for i in range(self.n_layer):
            qkv = blocks[f"layer{i}.qkv_t"]
            views[f"layer{i}.attn_wq"] = qkv[:, :C].T
            views[f"layer{i}.attn_wk"] = qkv[:, C: 2 * C].T
            views[f"layer{i}.attn_wv"] = qkv[:, 2 * C:].T
            views[f"layer{i}.attn_wo"] = blocks[f"layer{i}.wo_t"].T
            views[f"layer{i}.mlp_fc1"] = blocks[f"layer{i}.fc1_t"].T
            views[f"layer{i}.mlp_fc2"] = blocks[f"layer{i}.fc2_t"].T
        return views


# ---- the model, shared by the eager and the compiled step ----------------------------------
def rmsnorm(x, inverse_width, eps):
    """x * (mean(x*x) + eps) ** -0.5 over the last axis, the mean as sum * (1 / width).
    The constants are 0-dim tensors in eager code (a Python float, or torch.mean's internal
    division, costs a scalar conversion per call) and floats inside the compiled graph."""
    return x * torch.rsqrt(torch.sum(x * x, -1, keepdim=True) * inverse_width + eps)


def transformer_logits(weights: dict, x, config, batch_rows: int, attend, norm):
    """Logits [N, V] from the summed embeddings x [N, C] (N = B * T, rows ordered b-major).
    `attend(q, k, v)` maps [B, H, T, D] queries, keys and values to causal attention heads;
    `norm(x)` is rmsnorm with the caller's kind of constants."""
    N, C = x.shape
    B, H, D = batch_rows, config.n_head, config.head_dim
    T = N // B
    x = norm(x)
    for i in range(config.n_layer):
        qkv = norm(x) @ weights[f"layer{i}.qkv_t"]  # (N, 3C)
        q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, D)
        heads = attend(q, k, v).transpose(1, 2).reshape(N, C)  # heads concatenated per row
        x = torch.addmm(x, heads, weights[f"layer{i}.wo_t"])  # x + heads @ wo.T
        hidden = torch.relu(norm(x) @ weights[f"layer{i}.fc1_t"])  # (N, 4C)
        x = torch.addmm(x, hidden, weights[f"layer{i}.fc2_t"])
    return x @ weights["lm_head_t"]  # (N, V)


# ---- the backends ----------------------------------------------------------------------------
class TorchTunedBackend(Backend):
    name = "torch-tuned"
    provides_gradients = True
    provides_moments = True
    # Intra-op threads on the CPU (also used by torch-compile's generated code): the tensors
    # are far too small for parallel-for to pay for its synchronisation, and a second thread
    # waits for a busy second core (slower with 2 threads than 1 on a 2-core machine, eager
    # and compiled alike).
    cpu_threads = 1

    def __init__(self, config, vocab_size, dtype, device=None):
        super().__init__(config, vocab_size, dtype, device)  # resolves the device
        if self.device == "mps" and dtype == "float64":
            raise BackendUnavailable(
                f"backend {self.name}: the MPS device has no float64; use --dtype float32 "
                "or --device cpu")
        # Process-wide (the runner gives each backend its own process). An explicit
        # OMP_NUM_THREADS / MKL_NUM_THREADS is left to torch, which reads it at start-up.
        self.threads_from = next((name for name in THREAD_VARIABLES if os.environ.get(name)),
                                 None)
        if self.device == "cpu" and self.threads_from is None:
            torch.set_num_threads(self.cpu_threads)
        self.torch_dtype = torch.float64 if dtype == "float64" else torch.float32
        self.np_dtype = np.dtype(dtype)
        self.storage = FlatLayout(config, vocab_size)
        make = lambda: torch.zeros(self.storage.size, dtype=self.torch_dtype,  # noqa: E731
                                   device=self.device)
        self.flat, self.flat_grad, self.adam_m, self.adam_v = make(), make(), make(), make()
        self.spec_views = self.storage.spec_views(self.flat)
        # Stored blocks ([in, out], see FlatLayout), their [out, in] transposes for the forward
        # pass (W @ x), and the gradient blocks the backward pass writes into.
        self.weights = self.storage.views(self.flat)
        self.weights_out_in = {name: view.t() for name, view in self.weights.items()}
        self.gradients = self.storage.views(self.flat_grad)
        self._make_constants()
        self._stage_templates = {}  # (B, T) -> host template of the step's inputs
        self.reset_cache()

    def _make_constants(self):
        const = lambda value: torch.tensor(value, dtype=self.torch_dtype,  # noqa: E731
                                           device=self.device)
        cfg, C, T = self.config, self.config.n_embd, self.config.block_size
        self.rms_eps, self.inverse_width = const(RMS_EPS), const(1.0 / C)
        # mean over a column as one product: [1, C] @ [C, N]
        self.mean_row = torch.full((1, C), 1.0 / C, dtype=self.torch_dtype, device=self.device)
        self.negative_mean_row = -self.mean_row
        self.attention_scale = cfg.head_dim ** -0.5
        self.attention_scale_tensor = const(self.attention_scale)
        # Additive causal masks [T, T] (-inf where key > query), one per sequence length
        causal = torch.full((T, T), float("-inf"), dtype=self.torch_dtype,
                            device=self.device).triu(1)
        self.causal_masks = {n: causal[:n, :n].contiguous() for n in range(1, T + 1)}
        # Adam's step count s + 1 (the fused kernel computes the bias corrections from it).
        # On the CPU it is written through a numpy view (no torch op).
        self.adam_step_count = torch.zeros((), dtype=torch.float32, device=self.device)
        self._adam_step_count_numpy = (self.adam_step_count.numpy() if self.device == "cpu"
                                       else None)

    # ---- discovery -------------------------------------------------------------------------
    def resolve_device(self, requested):
        """The torch row's rules: None is CUDA, then MPS, then the CPU."""
        return resolve_torch_device(self.name, requested)

    # ---- parameters ------------------------------------------------------------------------
    def load_parameters(self, parameters):
        with torch.no_grad():
            for name, value in parameters.items():
                # cast on the host: MPS cannot receive float64
                host = torch.from_numpy(np.asarray(value, dtype=self.np_dtype))
                self.spec_views[name].copy_(host)
            self.adam_m.zero_()
            self.adam_v.zero_()

    def parameters(self):
        # np.array copies: for float64 on the CPU the tensor's numpy view would share memory
        # with the live parameters.
        return {name: np.array(view.detach().cpu().numpy(), dtype=np.float64)
                for name, view in self.spec_views.items()}

    def optimizer_moments(self):
        """The flat moment buffers, laid out like the parameters: the spec's [out, in] views."""
        return tuple({name: np.array(view.detach().cpu().numpy(), dtype=np.float64)
                      for name, view in self.storage.spec_views(moment).items()}
                     for moment in (self.adam_m, self.adam_v))

    # ---- training --------------------------------------------------------------------------
    def _stage(self, batch: TokenBatch) -> StepInputs:
        """The step's inputs, built on the host (numpy) and cut to the batch's longest row T.
        Columns n = b * T + t. One host array holds three blocks of rows: the one-hot selector
        (1 at the token's row and at row V + t), the targets (-1 / count at the target token's
        row of every real position) and the per-position weight (1 / count; 0 on padding)."""
        lengths = batch.lengths
        B = len(lengths)
        T = int(lengths[0]) if B == 1 else int(lengths.max())
        V = self.vocab_size
        targets_row = V + self.config.block_size
        key = (B, T)
        if key not in self._stage_templates:
            N = B * T
            template = np.zeros((targets_row + V + 1, N), dtype=self.np_dtype)
            columns = np.arange(N)
            template[V + columns % T, columns] = 1  # the position part of the selector
            self._stage_templates[key] = template, columns
        template, columns = self._stage_templates[key]
        host = template.copy()
        inputs = batch.padded[:, :T].reshape(-1)  # (N,)
        targets = batch.padded[:, 1: T + 1].reshape(-1)
        if B == 1:  # one unpadded row: every position counts
            real, weight = slice(None), 1.0 / T
        else:
            real = (np.arange(T)[None, :] < lengths[:, None]).reshape(-1)
            weight = 1.0 / np.count_nonzero(real)
        host[inputs, columns] = 1
        host[targets_row + targets[real], columns[real]] = -weight
        host[-1, real] = weight
        blocks = (host[:targets_row], host[targets_row: -1], host[-1:])
        if self.device == "cpu":
            return StepInputs(*map(torch.from_numpy, blocks), B)
        return StepInputs(*(torch.from_numpy(block).to(self.device) for block in blocks), B)

    def _norm(self, x):
        """rmsnorm over the last axis (sampling's row vectors)."""
        return rmsnorm(x, self.inverse_width, self.rms_eps)

    def _rmsnorm(self, x):
        """rmsnorm of every column of x [C, N]: (y, s) with y = x * s, s [1, N] =
        (mean(x * x) + eps) ** -0.5, kept for the backward pass."""
        scale = torch.rsqrt(torch.addmm(self.rms_eps, self.mean_row, x * x))
        return x * scale, scale

    def _rmsnorm_backward(self, dy, y, scale, residual=None):
        """dx = scale * (dy - y * mean(dy * y)) per column (numpy's rmsnorm_backward, written
        with y = x * scale), plus `residual`, the gradient arriving through the skip path."""
        centred = torch.addcmul(dy, y, torch.mm(self.negative_mean_row, dy * y))
        if residual is None:
            return centred * scale
        return torch.addcmul(residual, centred, scale)

    def _linear_backward(self, name, x, dy):
        """Backward pass of y = W x for the block `name`: writes dW and returns dx."""
        torch.mm(x, dy.t(), out=self.gradients[name])  # [in, out], the stored layout
        return torch.mm(self.weights[name], dy)

    def _attention(self, qkv, batch_rows):
        """Causal attention of every head. qkv [3C, N] (q, k, v rows; each head's D rows
        adjacent) -> heads [C, N], and what the backward pass keeps."""
        cfg = self.config
        H, D, N = cfg.n_head, cfg.head_dim, qkv.shape[1]
        B, T = batch_rows, N // batch_rows
        if B == 1:  # views
            q, k, v = qkv.view(3, H, D, T).unbind(0)  # each (H, D, T)
        else:  # copies: the (B, H) pairs have no common stride
            q, k, v = (qkv.view(3, H, D, B, T).permute(0, 3, 1, 2, 4)
                       .reshape(3, B * H, D, T).unbind(0))  # each (B * H, D, T)
        # probs[i, j] = softmax_j(q_i . k_j / sqrt(D)) over the keys j <= i
        scores = torch.baddbmm(self.causal_masks[T], q.transpose(1, 2), k,
                               alpha=self.attention_scale)  # (BH, T, T)
        probs = scores.softmax(-1)
        out = torch.bmm(v, probs.transpose(1, 2))  # (BH, D, T): out[:, i] = sum_j p[i, j] v[:, j]
        if B == 1:
            heads = out.view(H * D, N)
        else:
            heads = out.view(B, H, D, T).permute(1, 2, 0, 3).reshape(H * D, N)
        return heads, (q, k, v, probs)

    def _attention_backward(self, dheads, saved, batch_rows):
        """d qkv [3C, N] from d heads [C, N]."""
        cfg = self.config
        H, D, N = cfg.n_head, cfg.head_dim, dheads.shape[1]
        B, T = batch_rows, N // batch_rows
        q, k, v, probs = saved
        if B == 1:
            dout = dheads.view(H, D, T)
        else:
            dout = dheads.view(H, D, B, T).permute(2, 0, 1, 3).reshape(B * H, D, T)
        dv = torch.bmm(dout, probs)
        dprobs = torch.bmm(dout.transpose(1, 2), v)  # (BH, T, T)
        # softmax's backward kernel, then the 1 / sqrt(D) of the scores
        dscores = torch._softmax_backward_data(dprobs, probs, -1, probs.dtype)
        dscores.mul_(self.attention_scale_tensor)
        dq = torch.bmm(k, dscores.transpose(1, 2))
        dk = torch.bmm(q, dscores)
        dqkv = torch.stack((dq, dk, dv))  # (3, BH, D, T)
        if B == 1:
            return dqkv.view(3 * H * D, N)
        return dqkv.view(3, B, H, D, T).permute(0, 2, 3, 1, 4).reshape(3 * H * D, N)

    def _loss_and_gradients(self, inputs: StepInputs):
        """Forward and backward pass: returns the loss (a 0-dim tensor) and writes every
        gradient into flat_grad (each block is overwritten, so nothing needs zeroing)."""
        w = self.weights_out_in
        B = inputs.batch_rows
        # (C, N): wte[token] + wpe[position] per column, normed
        x_embed, embed_scale = self._rmsnorm(torch.mm(w["embed"], inputs.selector))
        x, saved = x_embed, []
        for i in range(self.config.n_layer):
            xn1, scale1 = self._rmsnorm(x)
            heads, attention = self._attention(torch.mm(w[f"layer{i}.qkv_t"], xn1), B)
            x_mid = torch.addmm(x, w[f"layer{i}.wo_t"], heads)  # x + Wo heads
            xn2, scale2 = self._rmsnorm(x_mid)
            hidden = torch.relu(torch.mm(w[f"layer{i}.fc1_t"], xn2))  # (4C, N)
            saved.append((x, xn1, scale1, attention, heads, x_mid, xn2, scale2, hidden))
            x = torch.addmm(x_mid, w[f"layer{i}.fc2_t"], hidden)
        log_probs = torch.log_softmax(torch.mm(w["lm_head_t"], x), 0)  # (V, N)
        # targets hold -1 / count at each target: this is the mean negative log-likelihood
        loss = torch.mul(inputs.targets, log_probs).sum()
        # d loss / d logits = (softmax - one-hot) / count at every real position
        dlogits = torch.addcmul(inputs.targets, log_probs.exp(), inputs.weights)

        dx = self._linear_backward("lm_head_t", x, dlogits)
        for i in reversed(range(self.config.n_layer)):
            x, xn1, scale1, attention, heads, x_mid, xn2, scale2, hidden = saved[i]
            # MLP block: x_out = x_mid + fc2(relu(fc1(rmsnorm(x_mid))))
            dhidden = self._linear_backward(f"layer{i}.fc2_t", hidden, dx)
            dhidden.mul_(hidden.sign())  # relu: 1 where it passed its input, else 0
            dxn2 = self._linear_backward(f"layer{i}.fc1_t", xn2, dhidden)
            dx = self._rmsnorm_backward(dxn2, xn2, scale2, residual=dx)
            # attention block: x_mid = x + Wo(attention(rmsnorm(x)))
            dheads = self._linear_backward(f"layer{i}.wo_t", heads, dx)
            dqkv = self._attention_backward(dheads, attention, B)
            dxn1 = self._linear_backward(f"layer{i}.qkv_t", xn1, dqkv)
            dx = self._rmsnorm_backward(dxn1, xn1, scale1, residual=dx)
        dembed = self._rmsnorm_backward(dx, x_embed, embed_scale)
        # one-hot selector: dembed's columns added into the token's and the position's rows
        torch.mm(inputs.selector, dembed.t(), out=self.gradients["embed"])
        return loss

    def _adam_update(self, adam: AdamStep):
        """The spec's Adam on the whole buffer in one call of torch's fused kernel (the one
        torch.optim.Adam(fused=True) runs): m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2,
        p -= lr * (m / bc1) / (sqrt(v) / sqrt(bc2) + eps), the bias corrections bc computed
        from the step count s + 1 as the spec's 1 - b ** (s + 1)."""
        if self._adam_step_count_numpy is not None:
            self._adam_step_count_numpy[...] = adam.step + 1
        else:
            self.adam_step_count.fill_(adam.step + 1)
        cfg = self.config
        torch._fused_adam_([self.flat], [self.flat_grad], [self.adam_m], [self.adam_v], [],
                           [self.adam_step_count], lr=adam.learning_rate, beta1=cfg.beta1,
                           beta2=cfg.beta2, weight_decay=0.0, eps=cfg.eps, amsgrad=False,
                           maximize=False)

    def train_step(self, batch, adam):
        loss = self._loss_and_gradients(self._stage(batch))
        self._adam_update(adam)
        return loss.item()

    def loss_and_gradients(self, batch: TokenBatch):
        """The loss and every gradient as float64 [out, in] arrays, without updating (tests)."""
        loss = self._loss_and_gradients(self._stage(batch))
        grads = self.storage.spec_views(self.flat_grad)
        return loss.item(), {name: np.array(view.cpu().numpy(), dtype=np.float64)
                             for name, view in grads.items()}

    def prepare(self):
        # One step on throwaway state warms up the allocator, the BLAS handles and (on a GPU)
        # the kernels, so that the first timed step is not an outlier; then everything is
        # restored. Nothing here is compiled.
        start = time.perf_counter()
        self._warm_up()
        return {"warmup": time.perf_counter() - start}

    def _warm_up(self, steps: int = 1):
        saved = [tensor.clone() for tensor in (self.flat, self.adam_m, self.adam_v)]
        block, bos = self.config.block_size, self.vocab_size - 1
        rows = [[bos] * (block + 1)] * self.config.batch_size  # full length: the real shapes
        batch = TokenBatch.from_sequences(rows, block, bos)
        for step in range(steps):
            self.train_step(batch, adam_step(self.config, step))
        with torch.no_grad():
            for tensor, value in zip((self.flat, self.adam_m, self.adam_v), saved):
                tensor.copy_(value)  # in place: the buffers keep their addresses
        self.sync()

    def sync(self):
        synchronize_torch(self.device)

    # ---- sampling --------------------------------------------------------------------------
    def reset_cache(self):
        cfg = self.config
        H, D = cfg.n_head, cfg.head_dim
        # Keys and values of every position so far, per layer: [H, block, D], filled in order.
        make = lambda: torch.zeros(H, cfg.block_size, D, dtype=self.torch_dtype,  # noqa: E731
                                   device=self.device)
        self.cache_keys = [make() for _ in range(cfg.n_layer)]
        self.cache_values = [make() for _ in range(cfg.n_layer)]

    def next_logits(self, token, position):
        with torch.inference_mode():
            return self._next_logits(token, position)

    def _next_logits(self, token, position):
        cfg, w, norm = self.config, self.weights, self._norm
        C, H, D = cfg.n_embd, cfg.n_head, cfg.head_dim
        embed = w["embed"]
        x = norm(embed[token] + embed[self.vocab_size + position])  # (C,)
        for i in range(cfg.n_layer):
            qkv = norm(x) @ w[f"layer{i}.qkv_t"]  # (3C,)
            q, k, v = qkv.view(3, H, 1, D).unbind(0)  # each (H, 1, D)
            self.cache_keys[i][:, position: position + 1] = k
            self.cache_values[i][:, position: position + 1] = v
            keys = self.cache_keys[i][:, : position + 1]  # (H, P, D)
            values = self.cache_values[i][:, : position + 1]
            # the newest position attends to every cached one: no mask
            heads = F.scaled_dot_product_attention(q, keys, values).reshape(C)
            x = x + heads @ w[f"layer{i}.wo_t"]
            x = x + torch.relu(norm(x) @ w[f"layer{i}.fc1_t"]) @ w[f"layer{i}.fc2_t"]
        logits = x @ w["lm_head_t"]  # (V,)
        return logits.to(device="cpu", dtype=torch.float64).numpy()

    def details(self):
        return {"device": self.device, "dtype": self.dtype, "threads": torch.get_num_threads(),
                "threads_from": self.threads_from or "backend default (cpu_threads)",
                "torch": torch.__version__,
                "attention": "batched matmuls and softmax, hand-written backward",
                "autograd": "none: hand-derived backward pass into one flat gradient buffer",
                "optimizer": "torch._fused_adam_ on the flat buffer"}


# ---- the compiled step -----------------------------------------------------------------------
def make_padded_train_step(layout: FlatLayout, config):
    """The whole training step as one function of tensors, for torch.compile:
    step(flat, adam_m, adam_v, tokens, lengths, adam_scalars, causal_mask) -> loss, updating
    flat, adam_m and adam_v in place.

    tokens: int32 [B, block + 1] (TokenBatch.padded), lengths: int32 [B], adam_scalars:
    [learning_rate, bias_correction1, bias_correction2] in the parameter dtype, causal_mask:
    [block, block] additive (0 on and below the diagonal, -inf above).

    Variable lengths use one fixed shape: every row is padded to block_size and the targets at
    positions >= length are IGNOREd by the loss, so the graph never sees a sequence length and
    compiles once. The function captures only plain values (ints, floats, a tuple of offsets),
    no tensors: everything that changes arrives as an argument.
    """
    blocks = tuple(layout.blocks)
    V, C, T = layout.vocab_size, config.n_embd, config.block_size
    scale = config.head_dim ** -0.5
    beta1, beta2, eps = config.beta1, config.beta2, config.eps
    model_config = config
    inverse_width = 1.0 / C

    def norm(x):
        return rmsnorm(x, inverse_width, RMS_EPS)

    def padded_loss(flat, tokens, lengths, causal_mask):
        weights = {name: flat[offset: offset + rows * cols].view(rows, cols)
                   for name, offset, rows, cols in blocks}
        B = tokens.shape[0]
        positions = torch.arange(T, device=tokens.device)
        targets = torch.where(positions < lengths[:, None], tokens[:, 1:], IGNORE)  # (B, T)
        embed = weights["embed"]
        x = F.embedding(tokens[:, :-1], embed) + embed[V:]  # (B, T, C): wte[token] + wpe[pos]

        def masked_attention(q, k, v):
            # Written out rather than scaled_dot_product_attention: Inductor fuses the scale,
            # mask and softmax into its own kernels, where the fused CPU attention kernels are
            # opaque calls that cost ~0.1 ms a step at these sizes (measured 0.46 vs 0.35
            # ms/step).
            scores = (q @ k.transpose(-1, -2)) * scale + causal_mask  # (B, H, T, T)
            return scores.softmax(-1) @ v

        logits = transformer_logits(weights, x.reshape(B * T, C), model_config, B,
                                    masked_attention, norm)
        return F.cross_entropy(logits, targets.reshape(-1).long(), ignore_index=IGNORE)

    loss_and_gradient = torch.func.grad_and_value(padded_loss)

    def train_step(flat, adam_m, adam_v, tokens, lengths, adam_scalars, causal_mask):
        gradient, loss = loss_and_gradient(flat, tokens, lengths, causal_mask)
        learning_rate, bias_correction1, bias_correction2 = adam_scalars.unbind()
        # The spec's update as written; Inductor fuses it into one pass over the buffers.
        adam_m.copy_(beta1 * adam_m + (1 - beta1) * gradient)
        adam_v.copy_(beta2 * adam_v + (1 - beta2) * gradient * gradient)
        m_hat = adam_m / bias_correction1
        v_hat = adam_v / bias_correction2
        flat.sub_(learning_rate * m_hat / (torch.sqrt(v_hat) + eps))
        return loss

    return train_step


STEP_ARGUMENTS = ("flat", "adam_m", "adam_v", "tokens", "lengths", "adam_scalars", "causal_mask")


class CompiledStep:
    """One compiled training step, shared by every backend of the same config, dtype and device
    in this process (so the tests and repeated runs compile once).

    `guarded` is the torch.compile'd function: every call goes through Dynamo, which checks the
    guards of the compiled graph and evaluates its frame. That costs ~0.1 ms a call on the CI
    machine, as much as the whole compiled step. So on the CPU the step is compiled with a
    backend that is Inductor exactly as `backend="inductor"` runs it, but which also keeps the
    compiled graph; after the first call, `direct` calls that graph without Dynamo. Skipping the
    guards is sound here: the graph's inputs never change shape, dtype or device (tokens are
    always padded to [B, block + 1], the state buffers are fixed), its constants come from a
    frozen config, and TorchCompileTunedBackend.train_step checks the batch shape itself.
    """

    def __init__(self, train_step, device: str):
        self.graphs = []  # (compiled graph, its input names), one per graph Dynamo compiles
        self.direct = None
        if device == "cpu":
            # The C++ wrapper calls the generated kernels without a Python line per kernel:
            # 0.20 vs 0.29 ms/step (p10, alternated). max_autotune's CPU GEMM templates were no
            # faster and compile for a minute longer.
            self.settings = {"backend": "inductor (graph kept)", "cpp_wrapper": True}
            self.guarded = torch.compile(train_step, backend=self._compile_and_keep,
                                         fullgraph=True, dynamic=False)
        elif device.startswith("cuda"):
            # A launch-bound step: CUDA graphs replay all its kernels in one launch.
            self.settings = {"backend": "inductor", "mode": "reduce-overhead"}
            self.guarded = torch.compile(train_step, mode="reduce-overhead", fullgraph=True,
                                         dynamic=False)
        else:
            self.settings = {"backend": "inductor"}
            self.guarded = torch.compile(train_step, fullgraph=True, dynamic=False)

    def _compile_and_keep(self, graph_module, example_inputs):
        inductor = torch._dynamo.lookup_backend("inductor")
        compiled = inductor(graph_module, example_inputs, config_patches={"cpp_wrapper": True})
        # Dynamo names a graph input taken from argument `flat` "l_flat_"
        names = [node.name for node in graph_module.graph.nodes if node.op == "placeholder"]
        self.graphs.append((compiled, names))
        return compiled

    def make_direct(self):
        """After the first (compiling) call: a function of the STEP_ARGUMENTS that calls the
        compiled graph directly, or None when that graph's inputs are not exactly them."""
        if len(self.graphs) != 1:
            return None
        compiled, names = self.graphs[0]
        order = [f"l_{name}_" for name in STEP_ARGUMENTS]
        if sorted(names) != sorted(order):
            return None
        positions = [order.index(name) for name in names]  # graph input i = argument positions[i]

        def direct(*arguments):
            # called as Dynamo's bytecode calls it: positional inputs, a tuple of outputs
            return compiled(*[arguments[position] for position in positions])[0]

        self.direct = direct
        return direct


_COMPILED_STEPS: dict = {}  # (config, vocab size, dtype, device) -> CompiledStep


class TorchCompileTunedBackend(TorchTunedBackend):
    name = "torch-compile-tuned"
    # Its gradients are the compiled graph's own, not exposed apart (the inherited eager
    # loss_and_gradients would test the torch row's code, not this one's).
    provides_gradients = False

    def __init__(self, config, vocab_size, dtype, device=None):
        super().__init__(config, vocab_size, dtype, device)
        T = config.block_size
        self.causal_mask = torch.full((T, T), float("-inf"), dtype=self.torch_dtype,
                                      device=self.device).triu(1)
        # [learning_rate, bias_correction1, bias_correction2], a graph input (a Python float
        # would be baked into the graph and recompile every step)
        self.step_scalars = torch.zeros(3, dtype=self.torch_dtype, device=self.device)
        if self.device == "cpu":
            self._step_scalars_host = self.step_scalars
        else:
            self._step_scalars_host = torch.zeros(3, dtype=self.torch_dtype,
                                                  pin_memory=self.device.startswith("cuda"))
        self._step_scalars_numpy = self._step_scalars_host.numpy()
        self.padded_shape = (config.batch_size, T + 1)
        if self.device.startswith("cuda"):
            # CUDA graphs need the buffers the step updates in place at fixed addresses
            for buffer in (self.flat, self.adam_m, self.adam_v):
                torch._dynamo.mark_static_address(buffer)
        key = (config, vocab_size, dtype, self.device)
        if key not in _COMPILED_STEPS:
            _COMPILED_STEPS[key] = CompiledStep(make_padded_train_step(self.storage, config),
                                                self.device)
        self.compiled = _COMPILED_STEPS[key]
        # Dynamo's process-wide counters; "unique_graphs" grows by one per compiled graph
        from torch._dynamo.utils import counters
        self._dynamo_stats = counters["stats"]
        self.graphs_compiled = 0  # during this backend's prepare and train_step calls
        self.compile_seconds = None

    def prepare(self):
        # Compile by running one step on a dummy batch of the real shapes (padded tokens are
        # always [B, block + 1]); the state is saved before and restored after, so the
        # parameters and moments do not change.
        start = time.perf_counter()
        # the first train_step call compiles and counts the graph; CUDA graph trees record on
        # the second call and replay from the third
        self._warm_up(steps=3 if self.device.startswith("cuda") else 1)
        self.compile_seconds = time.perf_counter() - start
        return {"compile": self.compile_seconds}

    def train_step(self, batch, adam):
        if batch.padded.shape != self.padded_shape:  # the compiled graph's one input shape
            raise ValueError(f"backend {self.name}: tokens of shape {batch.padded.shape}, "
                             f"compiled for {self.padded_shape}")
        self._step_scalars_numpy[0] = adam.learning_rate
        self._step_scalars_numpy[1] = adam.bias_correction1
        self._step_scalars_numpy[2] = adam.bias_correction2
        tokens, lengths = torch.from_numpy(batch.padded), torch.from_numpy(batch.lengths)
        if self.device != "cpu":
            tokens, lengths = tokens.to(self.device), lengths.to(self.device)
            self.step_scalars.copy_(self._step_scalars_host, non_blocking=True)
        arguments = (self.flat, self.adam_m, self.adam_v, tokens, lengths, self.step_scalars,
                     self.causal_mask)
        if self.compiled.direct is not None:
            return self.compiled.direct(*arguments).item()
        before = self._dynamo_stats["unique_graphs"]
        loss = self.compiled.guarded(*arguments)
        # a compilation after the first would be a recompile: details() reports the count
        self.graphs_compiled += self._dynamo_stats["unique_graphs"] - before
        if self.compiled.settings.get("backend") == "inductor (graph kept)":
            self.compiled.make_direct()
        return loss.item()

    def trace_counts(self):
        return {"train_step": self.graphs_compiled}

    def details(self):
        details = super().details()
        details.update({
            "attention": "written out (scale, mask, softmax fused by Inductor)",
            "autograd": "torch.func.grad_and_value inside the compiled graph",
            "optimizer": "the spec's Adam update inside the compiled graph",
            "compile": {"fullgraph": True, "dynamic": False, **self.compiled.settings},
            "calls": ("compiled graph called directly (Dynamo only on the compiling call)"
                      if self.compiled.direct is not None else "through Dynamo"),
            "padding": "every row padded to block_size; targets past its length ignored",
            "compile_seconds": self.compile_seconds,
            "graphs_compiled": self.graphs_compiled,  # 1 (0 if another backend compiled it)
        })
        return details
