"""MAX graph builders for the `max` and `max-loop` backends: the training step (forward,
hand-derived backward and Adam, all in one graph) and next-token inference with a key/value
cache.

MAX has no autograd, so the backward pass is written out op by op; it follows
`backends/numpy_backend.py` (`_backward`) line for line, which is its reference.

State lives in one mutable float32 buffer `state [3, P]`: row 0 the parameters flattened in the
spec's draw order (`ParameterLayout`), row 1 Adam's first moment, row 2 the second. The training
graph reads and overwrites it in place, so parameters and moments never leave the engine between
steps; the inference graph reads row 0 of the same buffer, so sampling always uses the current
parameters without a copy.

Every graph has fixed shapes per config: a step's tokens arrive padded to block_size + 1 with a
length per row, and padded positions are masked out of the loss. Causal attention keeps padding
(always after the real positions) from touching real positions, and its gradients are exactly
zero, so one compiled graph serves every document.

Shapes: B batch rows, T = block_size positions, C = n_embd, H heads, D = head_dim, V vocab,
P parameters in all, K steps per call (max-loop).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from max.dtype import DType
from max.graph import BufferType, DeviceRef, Graph, TensorType, TensorValue, ops

from bench.config import GPTConfig, parameter_shapes

RMS_EPS = 1e-5
STATE_ROWS = 3  # parameters, Adam first moment, Adam second moment
# Per-step Adam scalars fed to the training graph, computed on the host exactly as the numpy
# float32 backend rounds them: (learning_rate / bias_correction1, 1 / bias_correction2).
ADAM_SCALARS = 2


@dataclass(frozen=True)
class ParameterLayout:
    """Where each named parameter lives in the flat buffer (spec draw order, row-major)."""
    entries: tuple[tuple[str, tuple[int, int], int], ...]  # (name, [out, in], offset)
    total: int

    @classmethod
    def for_config(cls, config: GPTConfig, vocab_size: int) -> "ParameterLayout":
        entries, offset = [], 0
        for name, shape in parameter_shapes(config, vocab_size):
            entries.append((name, shape, offset))
            offset += shape[0] * shape[1]
        return cls(tuple(entries), offset)

    def split(self, flat):
        """name -> [out, in] view of a flat numpy array or graph tensor."""
        return {name: flat[offset: offset + rows * cols].reshape((rows, cols))
                for name, (rows, cols), offset in self.entries}


# ---- small graph helpers --------------------------------------------------------------------
def _rmsnorm(x: TensorValue):
    """Returns (y, scale) with scale = (mean(x*x) + eps) ** -0.5 kept for the backward pass."""
    scale = 1.0 / ops.sqrt(ops.mean(x * x, axis=-1) + RMS_EPS)
    return x * scale, scale


def _rmsnorm_backward(x: TensorValue, scale: TensorValue, dy: TensorValue) -> TensorValue:
    # y = x * s, s = (mean(x^2) + eps)^-1/2  =>  dx = s * dy - s^3 * x * mean(dy * x)
    return scale * dy - (scale * scale * scale) * x * ops.mean(dy * x, axis=-1)


def _softmax(scores: TensorValue) -> TensorValue:
    """Softmax over the last axis, max subtracted first (as numpy and the spec do)."""
    exps = ops.exp(scores - ops.max(scores, axis=-1))
    return exps / ops.sum(exps, axis=-1)


def _linear(x: TensorValue, weight: TensorValue) -> TensorValue:
    """y = x @ W.T for rows x [N, in] and W [out, in]."""
    return x @ weight.T


def _heads(rows: TensorValue, B: int, T: int, H: int, D: int) -> TensorValue:
    """[B*T, C] -> [B, H, T, D]."""
    return rows.reshape((B, T, H, D)).permute([0, 2, 1, 3])


def _rows(heads: TensorValue, B: int, T: int, C: int) -> TensorValue:
    """[B, H, T, D] -> [B*T, C] (heads concatenated in order)."""
    return heads.permute([0, 2, 1, 3]).reshape((B * T, C))


# ---- training -------------------------------------------------------------------------------
def training_step(config: GPTConfig, vocab_size: int, layout: ParameterLayout,
                  device: DeviceRef, state: TensorValue, tokens: TensorValue,
                  lengths: TensorValue, adam: TensorValue):
    """One training step as graph values.

    state [3, P] float32, tokens [B, T+1] int32 (padded), lengths [B] int32, adam [2] float32.
    Returns (loss [1], new_state [3, P]).
    """
    cfg = config
    B, T, C, H, D, V = (cfg.batch_size, cfg.block_size, cfg.n_embd, cfg.n_head,
                        cfg.head_dim, vocab_size)
    N = B * T  # rows of all positions
    attention_scale = 1.0 / D ** 0.5
    flat, moment1, moment2 = state[0], state[1], state[2]  # each [P]
    p = layout.split(flat)

    inputs = tokens[:, :T].reshape((N,))  # [B*T]
    targets = tokens[:, 1:].reshape((N, 1))  # [B*T, 1]
    positions = ops.constant(np.arange(T, dtype=np.int32), DType.int32, device)
    # 1 where a position is predicted, 0 for padding; [B, T] -> [B*T, 1]
    real = ops.cast(positions.reshape((1, T)) < lengths.reshape((B, 1)), DType.float32)
    real = real.reshape((N, 1))
    vocab_ids = ops.constant(np.arange(V, dtype=np.int32).reshape(1, V), DType.int32, device)
    causal_mask = ops.constant(np.triu(np.full((T, T), -np.inf, dtype=np.float32), k=1),
                               DType.float32, device)

    # ---- forward (numpy _forward, on rows [B*T, C]) ----
    x_embed = ops.gather(p["wte"], inputs, axis=0)  # [N, C]
    x_embed = (x_embed.reshape((B, T, C)) + p["wpe"]).reshape((N, C))
    x, embed_scale = _rmsnorm(x_embed)
    saved = []
    for i in range(cfg.n_layer):
        layer = {"x_in": x}
        xn, layer["scale1"] = _rmsnorm(x)
        q = _heads(_linear(xn, p[f"layer{i}.attn_wq"]), B, T, H, D)  # [B, H, T, D]
        k = _heads(_linear(xn, p[f"layer{i}.attn_wk"]), B, T, H, D)
        v = _heads(_linear(xn, p[f"layer{i}.attn_wv"]), B, T, H, D)
        scores = (q @ k.transpose(2, 3)) * attention_scale + causal_mask  # [B, H, T, T]
        weights = _softmax(scores)
        heads = _rows(weights @ v, B, T, C)  # [N, C]
        x = _linear(heads, p[f"layer{i}.attn_wo"]) + x
        layer.update(xn=xn, q=q, k=k, v=v, weights=weights, heads=heads, x_mid=x)
        xn2, layer["scale2"] = _rmsnorm(x)
        hidden = _linear(xn2, p[f"layer{i}.mlp_fc1"])  # [N, 4C]
        activated = ops.relu(hidden)
        x = _linear(activated, p[f"layer{i}.mlp_fc2"]) + x
        layer.update(xn2=xn2, hidden=hidden, activated=activated)
        saved.append(layer)
    logits = _linear(x, p["lm_head"])  # [N, V]

    # ---- loss: mean of -log softmax(logits)[target] over the real positions ----
    probs = _softmax(logits)
    target_one_hot = ops.cast(targets == vocab_ids, DType.float32)  # [N, V]
    target_probs = ops.sum(probs * target_one_hot, axis=-1)  # [N, 1]
    count = ops.sum(real, axis=0)  # [1, 1]
    loss = -ops.sum(ops.log(target_probs) * real, axis=0) / count  # [1, 1]
    # d loss / d logits = (softmax - onehot) / n at every real position, 0 on padding.
    dlogits = (probs - target_one_hot) * (real / count)

    # ---- backward (numpy _backward) ----
    grads = {"lm_head": dlogits.T @ x}
    dx = dlogits @ p["lm_head"]  # [N, C]
    for i in reversed(range(cfg.n_layer)):
        layer = saved[i]
        # MLP block: x = fc2(relu(fc1(rmsnorm(x_mid)))) + x_mid
        grads[f"layer{i}.mlp_fc2"] = dx.T @ layer["activated"]
        relu_mask = ops.cast(layer["hidden"] > 0, DType.float32)
        dhidden = (dx @ p[f"layer{i}.mlp_fc2"]) * relu_mask
        grads[f"layer{i}.mlp_fc1"] = dhidden.T @ layer["xn2"]
        dxn2 = dhidden @ p[f"layer{i}.mlp_fc1"]
        dx = dx + _rmsnorm_backward(layer["x_mid"], layer["scale2"], dxn2)
        # Attention block: x_mid = Wo(attention(rmsnorm(x_in))) + x_in
        grads[f"layer{i}.attn_wo"] = dx.T @ layer["heads"]
        dheads = _heads(dx @ p[f"layer{i}.attn_wo"], B, T, H, D)  # [B, H, T, D]
        weights, q, k, v = layer["weights"], layer["q"], layer["k"], layer["v"]
        dweights = dheads @ v.transpose(2, 3)  # [B, H, T, T]
        dv = weights.transpose(2, 3) @ dheads
        # softmax backward, then the 1/sqrt(D) scale of the scores
        dscores = weights * (dweights - ops.sum(dweights * weights, axis=-1))
        dscores = dscores * attention_scale
        dq = _rows(dscores @ k, B, T, C)
        dk = _rows(dscores.transpose(2, 3) @ q, B, T, C)
        dv = _rows(dv, B, T, C)
        xn = layer["xn"]
        grads[f"layer{i}.attn_wq"] = dq.T @ xn
        grads[f"layer{i}.attn_wk"] = dk.T @ xn
        grads[f"layer{i}.attn_wv"] = dv.T @ xn
        dxn = (dq @ p[f"layer{i}.attn_wq"] + dk @ p[f"layer{i}.attn_wk"]
               + dv @ p[f"layer{i}.attn_wv"])
        dx = dx + _rmsnorm_backward(layer["x_in"], layer["scale1"], dxn)
    dembed = _rmsnorm_backward(x_embed, embed_scale, dx)  # [N, C]
    grads["wpe"] = ops.sum(dembed.reshape((B, T, C)), axis=0).reshape((T, C))
    # Scatter-add of the token embedding rows as a one-hot product (as numpy does).
    input_one_hot = ops.cast(inputs.reshape((N, 1)) == vocab_ids, DType.float32)  # [N, V]
    grads["wte"] = input_one_hot.T @ dembed
    gradient = ops.concat([grads[name].reshape((rows * cols,))
                           for name, (rows, cols), _ in layout.entries], axis=0)  # [P]

    # ---- Adam, in the numpy backend's order of operations ----
    step_size, inverse_bias_correction2 = adam[0], adam[1]  # lr / bc1, 1 / bc2
    moment1 = moment1 * cfg.beta1 + gradient * (1 - cfg.beta1)
    moment2 = moment2 * cfg.beta2 + (gradient * gradient) * (1 - cfg.beta2)
    update = moment1 / (ops.sqrt(moment2 * inverse_bias_correction2) + cfg.eps) * step_size
    new_state = ops.stack([flat - update, moment1, moment2], axis=0)  # [3, P]
    return loss.reshape((1,)), new_state


def _state_type(layout: ParameterLayout, device: DeviceRef) -> BufferType:
    return BufferType(DType.float32, [STATE_ROWS, layout.total], device)


def build_train_graph(config: GPTConfig, vocab_size: int, layout: ParameterLayout,
                      device: DeviceRef) -> Graph:
    """Inputs: state (mutable, updated in place), tokens [B, T+1] int32, lengths [B] int32,
    adam [2] float32. Output: the step's loss [1]."""
    B, T = config.batch_size, config.block_size
    input_types = [
        _state_type(layout, device),
        TensorType(DType.int32, [B, T + 1], device),
        TensorType(DType.int32, [B], device),
        TensorType(DType.float32, [ADAM_SCALARS], device),
    ]
    with Graph("microgpt_train_step", input_types=input_types) as graph:
        state_buffer, tokens, lengths, adam = graph.inputs
        loss, new_state = training_step(config, vocab_size, layout, device,
                                        ops.buffer_load(state_buffer.buffer), tokens.tensor,
                                        lengths.tensor, adam.tensor)
        ops.buffer_store(state_buffer.buffer, new_state)
        graph.output(loss)
    return graph


def build_train_loop_graph(config: GPTConfig, vocab_size: int, layout: ParameterLayout,
                           device: DeviceRef, steps_per_call: int) -> Graph:
    """K = steps_per_call training steps in one call, run by a MAX while loop.

    Inputs: state (mutable), tokens [K, B, T+1] int32, lengths [K, B] int32, adam [K, 2]
    float32, steps [1] int32 (how many of the K steps to run, <= K). Output: losses [K] (the
    entries past `steps` are 0)."""
    B, T, K = config.batch_size, config.block_size, steps_per_call
    input_types = [
        _state_type(layout, device),
        TensorType(DType.int32, [K, B, T + 1], device),
        TensorType(DType.int32, [K, B], device),
        TensorType(DType.float32, [K, ADAM_SCALARS], device),
        TensorType(DType.int32, [1], device),
    ]
    with Graph("microgpt_train_loop", input_types=input_types) as graph:
        state_buffer, all_tokens, all_lengths, all_adam, steps = (
            value for value in graph.inputs)
        all_tokens, all_lengths, all_adam = all_tokens.tensor, all_lengths.tensor, all_adam.tensor
        steps = steps.tensor
        step_ids = ops.constant(np.arange(K, dtype=np.int32), DType.int32, device)

        def predicate(step, state, losses):
            return (step < steps).reshape(())

        def body(step, state, losses):
            tokens = ops.gather(all_tokens, step, axis=0).reshape((B, T + 1))
            lengths = ops.gather(all_lengths, step, axis=0).reshape((B,))
            adam = ops.gather(all_adam, step, axis=0).reshape((ADAM_SCALARS,))
            loss, new_state = training_step(config, vocab_size, layout, device, state,
                                            tokens, lengths, adam)
            # losses[step] = loss, as a select so the loop carries fixed-shape values
            losses = ops.where(step_ids == step, loss, losses)
            return [step + 1, new_state, losses]

        start = ops.constant(np.zeros(1, dtype=np.int32), DType.int32, device)
        no_losses = ops.constant(np.zeros(K, dtype=np.float32), DType.float32, device)
        _, final_state, losses = ops.while_loop(
            [start, ops.buffer_load(state_buffer.buffer), no_losses], predicate, body)
        ops.buffer_store(state_buffer.buffer, final_state)
        graph.output(losses)
    return graph


# ---- inference ------------------------------------------------------------------------------
def build_infer_graph(config: GPTConfig, vocab_size: int, layout: ParameterLayout,
                      device: DeviceRef) -> Graph:
    """Next-token logits for one token with a key/value cache.

    Inputs: state [3, P] (only row 0, the parameters, is read), cache (mutable) [2, n_layer, T,
    C] float32 (keys, values; updated in place at `position`), token_position [2] int32.
    Output: logits [V] float32. Cache rows past `position` are masked out, so a new sample needs
    no clearing; reset_cache zeroes the cache anyway.
    """
    cfg = config
    T, C, H, D, L = cfg.block_size, cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.n_layer
    attention_scale = 1.0 / D ** 0.5
    input_types = [
        TensorType(DType.float32, [STATE_ROWS, layout.total], device),
        BufferType(DType.float32, [2, L, T, C], device),
        TensorType(DType.int32, [2], device),
    ]
    with Graph("microgpt_next_logits", input_types=input_types) as graph:
        state, cache_buffer, token_position = graph.inputs
        p = layout.split(state.tensor[0])
        cache = ops.buffer_load(cache_buffer.buffer)  # [2, L, T, C]
        token, position = token_position.tensor[0:1], token_position.tensor[1:2]  # [1] each
        positions = ops.constant(np.arange(T, dtype=np.int32), DType.int32, device)
        at_position = (positions == position).reshape((T, 1))  # [T, 1]
        # Additive mask: cached positions after `position` (stale, or not yet written) drop out.
        visible = ops.where((positions <= position).reshape((1, 1, T)),
                            ops.constant(0.0, DType.float32, device),
                            ops.constant(-np.inf, DType.float32, device))  # [1, 1, T]

        x = ops.gather(p["wte"], token, axis=0) + ops.gather(p["wpe"], position, axis=0)
        x, _ = _rmsnorm(x)  # [1, C]
        new_keys, new_values = [], []
        for i in range(L):
            residual = x
            xn, _ = _rmsnorm(x)
            q = _linear(xn, p[f"layer{i}.attn_wq"]).reshape((H, 1, D))
            keys = ops.where(at_position, _linear(xn, p[f"layer{i}.attn_wk"]), cache[0, i])
            values = ops.where(at_position, _linear(xn, p[f"layer{i}.attn_wv"]), cache[1, i])
            new_keys.append(keys)  # [T, C]
            new_values.append(values)
            keys_by_head = keys.reshape((T, H, D)).permute([1, 2, 0])  # [H, D, T]
            values_by_head = values.reshape((T, H, D)).permute([1, 0, 2])  # [H, T, D]
            scores = (q @ keys_by_head) * attention_scale + visible  # [H, 1, T]
            heads = (_softmax(scores) @ values_by_head).reshape((1, C))
            x = _linear(heads, p[f"layer{i}.attn_wo"]) + residual
            xn2, _ = _rmsnorm(x)
            x = _linear(ops.relu(_linear(xn2, p[f"layer{i}.mlp_fc1"])),
                        p[f"layer{i}.mlp_fc2"]) + x
        ops.buffer_store(cache_buffer.buffer,
                         ops.stack([ops.stack(new_keys, axis=0), ops.stack(new_values, axis=0)],
                                   axis=0))
        graph.output(_linear(x, p["lm_head"]).reshape((vocab_size,)))
    return graph
