"""numpy backend: a vectorised forward pass over the whole sequence, a hand-derived backward
pass, and Adam on one flat parameter buffer. float64 and float32.

This is the suite's readable reference for the maths: the MAX and Mojo backends follow its
backward pass, and its float64 run is the reference every other backend is checked against
(after it is itself checked against the pure-Python tape).

Shapes: B batch rows, T positions, C = n_embd, H heads, D = head_dim, V vocab.
"""
from __future__ import annotations

import numpy as np

from backends.contract import RMS_EPS, AdamStep, Backend, TokenBatch


def rmsnorm(x):
    """Returns (y, scale) with scale = (mean(x*x) + eps) ** -0.5 kept for the backward pass."""
    # sum * (1/C) rather than np.mean: same value, a fraction of np.mean's Python overhead.
    mean_square = np.einsum("...c,...c->...", x, x)[..., None] * (1.0 / x.shape[-1])
    scale = (mean_square + RMS_EPS) ** -0.5
    return x * scale, scale


def rmsnorm_backward(y, scale, dy):
    """dx for y = rmsnorm(x) = x * s, from the output y and the scale s:
    dx = s * dy - s^3 * x * mean(dy * x) = s * (dy - y * mean(dy * y))."""
    projection = np.einsum("...c,...c->...", dy, y)[..., None] * (1.0 / y.shape[-1])
    dx = dy - y * projection
    dx *= scale
    return dx


class NumpyBackend(Backend):
    name = "numpy"
    provides_gradients = True
    provides_moments = True

    def __init__(self, config, vocab_size, dtype, device=None):
        super().__init__(config, vocab_size, dtype, device)
        self.np_dtype = np.dtype(dtype)
        total = self.layout.total
        # One flat buffer each for parameters, gradients and Adam moments; the named arrays are
        # views into them, so the optimizer is a handful of whole-buffer operations.
        self.flat = np.zeros(total, dtype=self.np_dtype)
        self.flat_grad = np.zeros(total, dtype=self.np_dtype)
        self.adam_m = np.zeros(total, dtype=self.np_dtype)
        self.adam_v = np.zeros(total, dtype=self.np_dtype)
        self.scratch = np.zeros(total, dtype=self.np_dtype)
        self.params = self.layout.split(self.flat)
        self.grads = self.layout.split(self.flat_grad)
        self._views = {}
        self.identity_vocab = np.eye(vocab_size, dtype=self.np_dtype)
        self.position_index = np.arange(config.batch_size * config.block_size)
        head_dim = config.head_dim
        self.attention_scale = 1.0 / head_dim ** 0.5
        block = config.block_size
        # Additive causal mask, sliced to the step's length.
        self.causal_mask = np.triu(np.full((block, block), -np.inf, dtype=self.np_dtype), k=1)
        self.reset_cache()

    # ---- parameters ------------------------------------------------------------------------
    def load_parameters(self, parameters):
        for name, value in parameters.items():
            self.params[name][...] = value
        self.adam_m[:] = 0
        self.adam_v[:] = 0

    def parameters(self):
        return {name: value.astype(np.float64) for name, value in self.params.items()}

    def optimizer_moments(self):
        return tuple({name: value.astype(np.float64) for name, value in
                      self.layout.split(moment).items()} for moment in (self.adam_m, self.adam_v))

    # ---- training --------------------------------------------------------------------------
    def _layer_views(self, i):
        """Per-layer weights and gradients. wq, wk, wv are adjacent in the flat buffer (draw
        order), so one [3C, C] view serves q, k and v as a single matrix product."""
        if i not in self._views:
            C = self.config.n_embd
            first, last = f"layer{i}.attn_wq", f"layer{i}.attn_wv"
            self._views[i] = (self.layout.slice(self.flat, first, last).reshape(3 * C, C),
                              self.layout.slice(self.flat_grad, first, last).reshape(3 * C, C))
        return self._views[i]

    def _forward(self, inputs):
        """inputs: int [B, T]. Returns the logits [B, T, V] and what the backward pass needs.
        Linear layers work on rows [B*T, C]; attention on [B, H, T, D]."""
        cfg, p = self.config, self.params
        B, T = inputs.shape
        C, H, D = cfg.n_embd, cfg.n_head, cfg.head_dim
        x_embed = (p["wte"][inputs] + p["wpe"][:T]).reshape(B * T, C)
        x, scale = rmsnorm(x_embed)
        saved = {"inputs": inputs, "x_normed": x, "embed_scale": scale, "layers": []}
        mask = self.causal_mask[:T, :T]
        for i in range(cfg.n_layer):
            w_qkv, _ = self._layer_views(i)
            xn, scale1 = rmsnorm(x)
            qkv = (xn @ w_qkv.T).reshape(B, T, 3, H, D).transpose(2, 0, 3, 1, 4)  # (3,B,H,T,D)
            q, k, v = qkv[0], qkv[1], qkv[2]
            scores = q @ k.swapaxes(-1, -2)  # (B, H, T, T)
            scores *= self.attention_scale
            scores += mask
            scores -= scores.max(axis=-1, keepdims=True)
            weights = np.exp(scores, out=scores)
            weights /= weights.sum(axis=-1, keepdims=True)
            heads = (weights @ v).transpose(0, 2, 1, 3).reshape(B * T, C)
            x_mid = heads @ p[f"layer{i}.attn_wo"].T + x
            xn2, scale2 = rmsnorm(x_mid)
            hidden = xn2 @ p[f"layer{i}.mlp_fc1"].T  # (B*T, 4C)
            activated = np.maximum(hidden, 0)
            x_out = activated @ p[f"layer{i}.mlp_fc2"].T + x_mid
            saved["layers"].append((scale1, xn, q, k, v, weights, heads, scale2, xn2, hidden,
                                    activated))
            x = x_out
        saved["x_final"] = x
        return (x @ p["lm_head"].T).reshape(B, T, -1), saved

    def _loss_and_backward(self, batch: TokenBatch):
        """Loss, with the gradients written into self.grads."""
        T = int(batch.lengths.max())
        inputs = batch.padded[:, :T]
        targets = batch.padded[:, 1: T + 1]
        logits, saved = self._forward(inputs)
        B = inputs.shape[0]
        probs = logits.reshape(B * T, -1)  # one row per position, softmax in place
        probs -= probs.max(axis=-1, keepdims=True)
        if len(self.position_index) < B * T:  # a batch larger than the config's (tests)
            self.position_index = np.arange(B * T)
        rows, flat_targets = self.position_index[: B * T], targets.reshape(-1)
        # log p = (logit - max) - log(sum exp(logit - max)), not log(softmax): at the `large`
        # preset the logits spread by more than 100 early on, and float32's exp underflows
        # to a probability of 0 (an infinite loss) where the float64 loss is ~26.
        target_logits = probs[rows, flat_targets]  # (B*T,)
        np.exp(probs, out=probs)
        totals = probs.sum(axis=-1, keepdims=True)
        probs /= totals
        target_log_probs = target_logits - np.log(totals[:, 0])
        if B == 1:  # one unpadded row, the original program's case
            loss = -target_log_probs.sum() / T
            position_weight = 1.0 / T
        else:
            real = batch.position_mask[:, :T].reshape(-1).astype(self.np_dtype)
            count = real.sum()
            loss = -(target_log_probs * real).sum() / count
            position_weight = (real / count)[:, None]
        # d loss / d logits = (softmax - onehot) / n at every real position.
        dlogits = probs
        dlogits[rows, flat_targets] -= 1
        dlogits *= position_weight
        self._backward(dlogits, saved, B, T)
        return float(loss)

    def _backward(self, dlogits, saved, B, T):
        """dlogits: [B*T, V]. Writes every gradient into self.grads (views of flat_grad)."""
        cfg, p, g = self.config, self.params, self.grads
        C, H, D = cfg.n_embd, cfg.n_head, cfg.head_dim
        np.matmul(dlogits.T, saved["x_final"], out=g["lm_head"])
        dx = dlogits @ p["lm_head"]  # (B*T, C)
        for i in reversed(range(cfg.n_layer)):
            (scale1, xn, q, k, v, weights, heads, scale2, xn2, hidden,
             activated) = saved["layers"][i]
            w_qkv, g_qkv = self._layer_views(i)
            # MLP block: x_out = fc2(relu(fc1(rmsnorm(x_mid)))) + x_mid
            np.matmul(dx.T, activated, out=g[f"layer{i}.mlp_fc2"])
            dhidden = dx @ p[f"layer{i}.mlp_fc2"]
            dhidden *= hidden > 0
            np.matmul(dhidden.T, xn2, out=g[f"layer{i}.mlp_fc1"])
            dx = dx + rmsnorm_backward(xn2, scale2, dhidden @ p[f"layer{i}.mlp_fc1"])
            # Attention block: x_mid = Wo(attention(rmsnorm(x_in))) + x_in
            np.matmul(dx.T, heads, out=g[f"layer{i}.attn_wo"])
            dheads = (dx @ p[f"layer{i}.attn_wo"]).reshape(B, T, H, D).transpose(0, 2, 1, 3)
            dweights = dheads @ v.swapaxes(-1, -2)  # (B, H, T, T)
            dqkv = np.empty((3, B, H, T, D), dtype=self.np_dtype)
            np.matmul(weights.swapaxes(-1, -2), dheads, out=dqkv[2])  # dv
            # softmax backward, then the 1/sqrt(D) scale of the scores
            dweights -= (dweights * weights).sum(axis=-1, keepdims=True)
            dweights *= weights
            dweights *= self.attention_scale
            np.matmul(dweights, k, out=dqkv[0])  # dq
            np.matmul(dweights.swapaxes(-1, -2), q, out=dqkv[1])  # dk
            dqkv_rows = dqkv.transpose(1, 3, 0, 2, 4).reshape(B * T, 3 * C)
            np.matmul(dqkv_rows.T, xn, out=g_qkv)
            dx = dx + rmsnorm_backward(xn, scale1, dqkv_rows @ w_qkv)
        dembed = rmsnorm_backward(saved["x_normed"], saved["embed_scale"], dx)
        g["wpe"][T:] = 0
        g["wpe"][:T] = dembed if B == 1 else dembed.reshape(B, T, C).sum(axis=0)
        # Scatter-add of the token embedding rows as a one-hot product (faster than np.add.at
        # at these sizes, and deterministic).
        one_hot = self.identity_vocab[saved["inputs"].reshape(-1)]  # (B*T, V)
        np.matmul(one_hot.T, dembed, out=g["wte"])

    def loss_and_gradients(self, batch: TokenBatch):
        """The loss and a copy of every gradient, without updating (for tests)."""
        loss = self._loss_and_backward(batch)
        return loss, {name: grad.astype(np.float64) for name, grad in self.grads.items()}

    def relu_margin(self, batch: TokenBatch) -> float:
        """The smallest |pre-activation| of any MLP ReLU at a real position, relative to the
        size of the terms it sums (|W| |x|). Below ~1e-5, float32 rounding can put that gate on
        the other side of zero, which changes the gradient by a whole position's share
        (bench.checkpoints uses this to tell a flipped gate from a wrong gradient)."""
        T = int(batch.lengths.max())
        _, saved = self._forward(batch.padded[:, :T])
        real = batch.position_mask[:, :T].reshape(-1).astype(bool)
        margin = np.inf
        for i, layer in enumerate(saved["layers"]):
            xn2, hidden = layer[8], layer[9]
            bound = np.abs(xn2) @ np.abs(self.params[f"layer{i}.mlp_fc1"]).T
            with np.errstate(divide="ignore", invalid="ignore"):
                relative = np.abs(hidden[real]) / bound[real]
            margin = min(margin, float(np.nanmin(relative, initial=np.inf)))
        return margin

    def train_step(self, batch, adam: AdamStep):
        loss = self._loss_and_backward(batch)
        cfg, g, m, v, tmp = self.config, self.flat_grad, self.adam_m, self.adam_v, self.scratch
        m *= cfg.beta1
        np.multiply(g, 1 - cfg.beta1, out=tmp)
        m += tmp
        v *= cfg.beta2
        np.multiply(g, g, out=tmp)
        tmp *= 1 - cfg.beta2
        v += tmp
        # p -= lr * m_hat / (sqrt(v_hat) + eps), with m_hat = m / bc1, v_hat = v / bc2
        np.multiply(v, 1.0 / adam.bias_correction2, out=tmp)
        np.sqrt(tmp, out=tmp)
        tmp += cfg.eps
        np.divide(m, tmp, out=tmp)
        tmp *= adam.learning_rate / adam.bias_correction1
        self.flat -= tmp
        return loss

    # ---- sampling --------------------------------------------------------------------------
    def reset_cache(self):
        self.cache_k = [[] for _ in range(self.config.n_layer)]
        self.cache_v = [[] for _ in range(self.config.n_layer)]

    def next_logits(self, token, position):
        cfg, p = self.config, self.params
        H, D = cfg.n_head, cfg.head_dim
        x, _ = rmsnorm(p["wte"][token] + p["wpe"][position])  # (C,)
        for i in range(cfg.n_layer):
            residual = x
            xn, _ = rmsnorm(x)
            q = (p[f"layer{i}.attn_wq"] @ xn).reshape(H, D)
            self.cache_k[i].append(p[f"layer{i}.attn_wk"] @ xn)
            self.cache_v[i].append(p[f"layer{i}.attn_wv"] @ xn)
            keys = np.stack(self.cache_k[i]).reshape(-1, H, D)  # (P, H, D)
            values = np.stack(self.cache_v[i]).reshape(-1, H, D)
            scores = np.einsum("hd,phd->hp", q, keys) * self.attention_scale
            weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
            weights /= weights.sum(axis=-1, keepdims=True)
            heads = np.einsum("hp,phd->hd", weights, values).reshape(-1)
            x = p[f"layer{i}.attn_wo"] @ heads + residual
            xn2, _ = rmsnorm(x)
            x = p[f"layer{i}.mlp_fc2"] @ np.maximum(p[f"layer{i}.mlp_fc1"] @ xn2, 0) + x
        return (p["lm_head"] @ x).astype(np.float64)
