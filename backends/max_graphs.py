"""MAX graph builders for the `max` and `max-loop` backends: the training step (forward,
hand-derived backward and Adam, all in one graph), the same step looped K times by a MAX while
loop, and next-token inference with a key/value cache.

MAX has no autograd, so the backward pass is written out op by op. It follows
`backends/numpy_backend.py` (`_forward`, `_backward`, Adam), which is its reference, step by
step and in the same order, with rewrites that change no maths but cut the number of compiled
kernels (at these sizes a step's time is mostly per-kernel overhead, a few microseconds each):
- products that would need a transposed operand (x @ W.T, dy.T @ x, the attention products) are
  a broadcast multiply summed over one axis (`_contract`), which MAX fuses into one kernel;
- Wq, Wk and Wv, adjacent in the flat parameter buffer, act as one [3C, C] matrix;
- the forward softmaxes and norms use MAX's fused softmax and rms_norm kernels;
- the rmsnorm backward is written in terms of its output y (no s^3 term).
With these the tiny config's training step is about 50 kernels (from about 100 written plainly).

State is one float32 tensor `state [3, P]`: row 0 the parameters flattened in the spec's draw
order (`ParameterLayout`), row 1 Adam's first moment, row 2 the second. The training graph takes
it and returns the next state, which the backend feeds back in as the next step's input, so
parameters and moments never leave the engine between steps; the inference graph reads row 0 of
the current state, so sampling always uses the current parameters without a copy.

Every graph has a fixed block per config: a step's tokens arrive padded to block_size + 1 with a
length per row, and padded positions are masked out of the loss. Causal attention keeps padding
(always after the real positions) from touching real positions, and its gradients are exactly
zero, so one compiled graph serves every document. The batch dimension of the training graphs
is symbolic (`BATCH`), so that graph also serves every batch size: nothing in it depends on
`config.batch_size`, and MAX's compile cache (~/.cache/modular) hands the graph compiled for
one batch size to a later process running another. Sampling has no batch dimension.

Shapes: B batch rows, T = block_size positions, C = n_embd, H heads, D = head_dim, V vocab,
N = B * T rows, P parameters in all, K steps per call (max-loop).
"""
from __future__ import annotations


import numpy as np
from max.dtype import DType
from max.graph import BufferType, DeviceRef, Dim, Graph, TensorType, TensorValue, ops

from backends.contract import RMS_EPS, GPTConfig, ParameterLayout

STATE_ROWS = 3  # parameters, Adam first moment, Adam second moment
# Per-step Adam scalars fed to the training graph, computed on the host exactly as the numpy
# float32 backend rounds them: (learning_rate / bias_correction1, 1 / bias_correction2).
ADAM_SCALARS = 2
# The training graphs' batch dimension is symbolic: one compiled graph per model config serves
# every batch size (MAX compiles a graph for minutes on a small CPU; the scaling sweep runs
# each config at several batch sizes, each in a fresh process that finds the graph in MAX's
# cache). The block is static: every row is padded to block_size + 1 tokens.
BATCH = Dim("batch")


# ---- small graph helpers --------------------------------------------------------------------
# At these sizes a compiled graph's time is mostly per-kernel overhead (a few microseconds per
# kernel on the CPU), not arithmetic. MAX runs a transpose as its own kernel, while a broadcast
# multiply followed by a sum fuses into one reduction kernel, so products that would need a
# transposed operand (x @ W.T, dy.T @ x, and the attention products) are written as
# `_contract`: sum over one axis of a broadcast product. Linear layers whose broadcast product
# would exceed CONTRACT_MAX_ELEMENTS (the larger presets) use matmul kernels instead, where the
# arithmetic outweighs the extra transpose kernels.
CONTRACT_MAX_ELEMENTS = 1 << 16


def _contract(a: TensorValue, b: TensorValue, axis: int) -> TensorValue:
    """sum(a * b) over `axis` (a and b broadcast against each other), that axis dropped."""
    product = a * b
    summed = ops.sum(product, axis=axis)
    shape = [dim for position, dim in enumerate(summed.shape)
             if position != axis % product.rank]
    return summed.reshape(shape)


def _use_matmul(rows: int, out, inputs) -> bool:
    """Whether a linear layer's product is large enough for matmul kernels (see above).
    `rows` is a static row count standing in for the layer's rows: with the batch dimension
    symbolic, the training graph decides for one document's block_size rows, so that one graph
    (and one choice) serves every batch size."""
    return int(rows) * int(out) * int(inputs) > CONTRACT_MAX_ELEMENTS


def _linear(x: TensorValue, weight: TensorValue, rows: int | None = None) -> TensorValue:
    """y = x @ W.T for rows x [N, in] and W [out, in]; [N, out]. `rows`: the static row count
    that decides between matmul and a fused contraction (default N, which must be static)."""
    (n, _), (out, inputs) = x.shape, weight.shape
    if _use_matmul(n if rows is None else rows, out, inputs):
        return x @ weight.T
    return _contract(ops.unsqueeze(x, 1), weight, axis=-1)


def _weight_gradient(dy: TensorValue, x: TensorValue, rows: int | None = None) -> TensorValue:
    """dW = dy.T @ x for rows dy [N, out], x [N, in]; [out, in] (`rows` as in `_linear`)."""
    (n, out), (_, inputs) = dy.shape, x.shape
    if _use_matmul(n if rows is None else rows, out, inputs):
        return dy.T @ x
    return _contract(ops.unsqueeze(dy, 2), ops.unsqueeze(x, 1), axis=0)


def _rmsnorm(x: TensorValue):
    """Returns (y, scale) with scale = (mean(x*x) + eps) ** -0.5 kept for the backward pass."""
    scale = ops.rsqrt(ops.mean(x * x, axis=-1) + RMS_EPS)
    # y from MAX's fused rms_norm kernel (one kernel where x * scale took two); the spec's norm
    # has no learned scale, so the kernel's weight is 0 + offset 1.
    unit_weight = ops.constant(np.zeros(int(x.shape[-1]), np.float32), DType.float32, x.device)
    return ops.rms_norm(x, unit_weight, RMS_EPS, weight_offset=1.0), scale


def _rmsnorm_backward(y: TensorValue, scale: TensorValue, dy: TensorValue) -> TensorValue:
    # y = x * s, s = (mean(x^2) + eps)^-1/2  =>  dx = s * dy - s^3 * x * mean(dy * x), which
    # is s * (dy - y * mean(dy * y)): the same in terms of the output y, without s^3 (one
    # kernel less per norm here).
    return scale * (dy - y * ops.mean(dy * y, axis=-1))


def _softmax(scores: TensorValue, axis: int = -1) -> TensorValue:
    """Softmax over `axis`: MAX's fused softmax kernel, which subtracts the maximum before exp
    as the spec asks (one kernel where max, exp-sum and divide would take three)."""
    return ops.softmax(scores, axis=axis)


# ---- training -------------------------------------------------------------------------------
def training_step(config: GPTConfig, vocab_size: int, layout: ParameterLayout,
                  device: DeviceRef, state: TensorValue, tokens: TensorValue,
                  lengths: TensorValue, adam: TensorValue):
    """One training step as graph values.

    state [3, P] float32, tokens [B, T+1] int32 (padded), lengths [B] int32, adam [2] float32.
    Returns (loss [1], new_state [3, P]). B is taken from `tokens` (the symbolic BATCH in the
    compiled graphs); nothing here reads `config.batch_size`, so one graph serves every batch
    size. Linear layers choose matmul or contraction for one document's T rows (`_linear`).
    """
    cfg = config
    T, C, H, D, V = cfg.block_size, cfg.n_embd, cfg.n_head, cfg.head_dim, vocab_size
    B = tokens.shape[0]
    N = B * T  # rows of all positions (symbolic when B is)
    attention_scale = 1.0 / D ** 0.5
    flat, moment1, moment2 = state[0], state[1], state[2]  # each [P]
    p = layout.split(flat)
    # Wq, Wk, Wv are adjacent in the flat buffer: one [3C, C] matrix, one product for q, k, v.
    qkv_weight = [layout.slice(flat, f"layer{i}.attn_wq", f"layer{i}.attn_wv")
                  .reshape((3 * C, C)) for i in range(cfg.n_layer)]

    inputs = tokens[:, :T].reshape((N,))  # [N]
    targets = tokens[:, 1:].reshape((N, 1))  # [N, 1]
    positions = ops.constant(np.arange(T, dtype=np.int32), DType.int32, device)
    # 1 where a position is predicted, 0 for padding; [B, T] -> [N, 1]
    real = ops.cast(positions.reshape((1, T)) < lengths.reshape((B, 1)), DType.float32)
    real = real.reshape((N, 1))
    vocab_ids = ops.constant(np.arange(V, dtype=np.int32).reshape(1, V), DType.int32, device)
    # Additive causal mask over [query, key, head].
    causal_mask = ops.constant(np.triu(np.full((T, T), -np.inf, dtype=np.float32), k=1)
                               .reshape(T, T, 1), DType.float32, device)

    def split_heads(rows):  # [N, C] -> [B, T, H, D]
        return rows.reshape((B, T, H, D))

    def merge_heads(heads):  # [B, T, H, D] -> [N, C]
        return heads.reshape((N, C))

    # ---- forward (numpy _forward, on rows [N, C]) ----
    x_embed = ops.gather(p["wte"], inputs, axis=0)  # [N, C]
    x_embed = (x_embed.reshape((B, T, C)) + p["wpe"]).reshape((N, C))
    x, embed_scale = _rmsnorm(x_embed)
    x_embed_normed = x  # the embedding norm's output, for its backward
    saved = []
    for i in range(cfg.n_layer):
        layer = {}
        xn, layer["scale1"] = _rmsnorm(x)
        qkv = _linear(xn, qkv_weight[i], T)  # [N, 3C]
        q = split_heads(qkv[:, 0:C])  # [B, T, H, D]
        k = split_heads(qkv[:, C:2 * C])
        v = split_heads(qkv[:, 2 * C:3 * C])
        # scores[b, query, key, h] = q[b, query, h] . k[b, key, h]
        scores = _contract(ops.unsqueeze(q, 2), ops.unsqueeze(k, 1), axis=-1)  # [B, T, T, H]
        weights = _softmax(scores * attention_scale + causal_mask, axis=2)
        # heads[b, query, h] = sum over keys of weights * v
        heads = merge_heads(_contract(ops.unsqueeze(weights, -1), ops.unsqueeze(v, 1), axis=2))
        x = _linear(heads, p[f"layer{i}.attn_wo"], T) + x
        layer.update(xn=xn, q=q, k=k, v=v, weights=weights, heads=heads)
        xn2, layer["scale2"] = _rmsnorm(x)
        hidden = _linear(xn2, p[f"layer{i}.mlp_fc1"], T)  # [N, 4C]
        activated = ops.relu(hidden)
        x = _linear(activated, p[f"layer{i}.mlp_fc2"], T) + x
        layer.update(xn2=xn2, hidden=hidden, activated=activated)
        saved.append(layer)
    logits = _linear(x, p["lm_head"], T)  # [N, V]

    # ---- loss: mean of -log softmax(logits)[target] over the real positions ----
    # The loss from log-softmax, not log(softmax): at `large` a target's probability underflows
    # float32 to 0 early in training (loss ~70), and log(0) would make the loss inf.
    probs = _softmax(logits)
    target_one_hot = ops.cast(targets == vocab_ids, DType.float32)  # [N, V]
    target_log_probs = ops.sum(ops.logsoftmax(logits) * target_one_hot, axis=-1)  # [N, 1]
    count = ops.sum(real, axis=0)  # [1, 1]
    loss = -ops.sum(target_log_probs * real, axis=0) / count  # [1, 1]
    # d loss / d logits = (softmax - onehot) / n at every real position, 0 on padding.
    dlogits = (probs - target_one_hot) * (real / count)  # [N, V]

    # ---- backward (numpy _backward) ----
    grads = {"lm_head": _weight_gradient(dlogits, x, T)}
    dx = dlogits @ p["lm_head"]  # [N, C]
    for i in reversed(range(cfg.n_layer)):
        layer = saved[i]
        # MLP block: x = fc2(relu(fc1(rmsnorm(x_mid)))) + x_mid
        grads[f"layer{i}.mlp_fc2"] = _weight_gradient(dx, layer["activated"], T)
        relu_mask = ops.cast(layer["hidden"] > 0, DType.float32)
        dhidden = (dx @ p[f"layer{i}.mlp_fc2"]) * relu_mask  # [N, 4C]
        grads[f"layer{i}.mlp_fc1"] = _weight_gradient(dhidden, layer["xn2"], T)
        dxn2 = dhidden @ p[f"layer{i}.mlp_fc1"]
        dx = dx + _rmsnorm_backward(layer["xn2"], layer["scale2"], dxn2)
        # Attention block: x_mid = Wo(attention(rmsnorm(x_in))) + x_in
        grads[f"layer{i}.attn_wo"] = _weight_gradient(dx, layer["heads"], T)
        dheads = split_heads(dx @ p[f"layer{i}.attn_wo"])  # [B, T, H, D]
        weights, q, k, v = layer["weights"], layer["q"], layer["k"], layer["v"]
        # dweights = dheads @ v.T and dv = weights.T @ dheads, per batch row and head
        dweights = _contract(ops.unsqueeze(dheads, 2), ops.unsqueeze(v, 1), axis=-1)  # [B,T,T,H]
        dv = _contract(ops.unsqueeze(weights, -1), ops.unsqueeze(dheads, 2), axis=1)  # [B,T,H,D]
        # softmax backward, then the 1/sqrt(D) scale of the scores
        dscores = weights * (dweights - ops.sum(dweights * weights, axis=2))
        dscores = ops.unsqueeze(dscores * attention_scale, -1)  # [B, T, T, H, 1]
        dq = _contract(dscores, ops.unsqueeze(k, 1), axis=2)  # [B, T, H, D]
        dk = _contract(dscores, ops.unsqueeze(q, 2), axis=1)
        dqkv = ops.concat([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)  # [N,3C]
        grads[f"layer{i}.attn_qkv"] = _weight_gradient(dqkv, layer["xn"], T)  # [3C, C]
        dxn = dqkv @ qkv_weight[i]  # [N, C]
        dx = dx + _rmsnorm_backward(layer["xn"], layer["scale1"], dxn)
    dembed = _rmsnorm_backward(x_embed_normed, embed_scale, dx)  # [N, C]
    grads["wpe"] = ops.sum(dembed.reshape((B, T, C)), axis=0).reshape((T, C))
    # Scatter-add of the token embedding rows as a one-hot product (as numpy does).
    input_one_hot = ops.cast(inputs.reshape((N, 1)) == vocab_ids, DType.float32)  # [N, V]
    grads["wte"] = _weight_gradient(input_one_hot, dembed, T)  # [V, C]
    pieces = []
    for name, (rows, cols), _ in layout.entries:
        if name.endswith("attn_wq"):
            name = name.replace("attn_wq", "attn_qkv")
            rows *= 3
        elif name.endswith(("attn_wk", "attn_wv")):
            continue  # part of the fused qkv gradient
        pieces.append(grads[name].reshape((rows * cols,)))
    gradient = ops.concat(pieces, axis=0)  # [P]

    # ---- Adam, in the numpy backend's order of operations ----
    step_size, inverse_bias_correction2 = adam[0], adam[1]  # lr / bc1, 1 / bc2
    moment1 = moment1 * cfg.beta1 + gradient * (1 - cfg.beta1)
    moment2 = moment2 * cfg.beta2 + (gradient * gradient) * (1 - cfg.beta2)
    update = moment1 / (ops.sqrt(moment2 * inverse_bias_correction2) + cfg.eps) * step_size
    new_state = ops.stack([flat - update, moment1, moment2], axis=0)  # [3, P]
    return loss.reshape((1,)), new_state


def _state_type(layout: ParameterLayout, device: DeviceRef) -> TensorType:
    return TensorType(DType.float32, [STATE_ROWS, layout.total], device)


def build_train_graph(config: GPTConfig, vocab_size: int, layout: ParameterLayout,
                      device: DeviceRef) -> Graph:
    """Inputs: state [3, P], tokens [B, T+1] int32, lengths [B] int32, adam [2] float32, B
    symbolic (any batch size). Outputs: the step's loss [1] and the new state [3, P] (the
    caller feeds it back in)."""
    B, T = BATCH, config.block_size
    input_types = [
        _state_type(layout, device),
        TensorType(DType.int32, [B, T + 1], device),
        TensorType(DType.int32, [B], device),
        TensorType(DType.float32, [ADAM_SCALARS], device),
    ]
    with Graph("microgpt_train_step", input_types=input_types) as graph:
        state, tokens, lengths, adam = (value.tensor for value in graph.inputs)
        loss, new_state = training_step(config, vocab_size, layout, device, state, tokens,
                                        lengths, adam)
        graph.output(loss, new_state)
    return graph


def build_train_loop_graph(config: GPTConfig, vocab_size: int, layout: ParameterLayout,
                           device: DeviceRef, steps_per_call: int) -> Graph:
    """K = steps_per_call training steps in one call, run by a MAX while loop.

    Inputs: state [3, P], tokens [K, B, T+1] int32, lengths [K, B] int32, adam [K, 2] float32,
    count [1] int32 (how many of the K step slots to run, 1 <= count <= K), B symbolic.
    Outputs: losses [K] (0 past `count`) and the state after the last step run [3, P]."""
    B, T, K = BATCH, config.block_size, steps_per_call
    input_types = [
        _state_type(layout, device),
        TensorType(DType.int32, [K, B, T + 1], device),
        TensorType(DType.int32, [K, B], device),
        TensorType(DType.float32, [K, ADAM_SCALARS], device),
        TensorType(DType.int32, [1], device),
    ]
    with Graph("microgpt_train_loop", input_types=input_types) as graph:
        state, all_tokens, all_lengths, all_adam, count = (value.tensor
                                                           for value in graph.inputs)
        slots = ops.constant(np.arange(K, dtype=np.int32), DType.int32, device)

        def predicate(step, state, losses):
            return (step < count).reshape(())

        def body(step, state, losses):
            # this step's slot of the packed inputs; step is [1] int32
            tokens = ops.gather(all_tokens, step, axis=0).reshape((B, T + 1))
            lengths = ops.gather(all_lengths, step, axis=0).reshape((B,))
            adam = ops.gather(all_adam, step, axis=0).reshape((ADAM_SCALARS,))
            loss, new_state = training_step(config, vocab_size, layout, device, state,
                                            tokens, lengths, adam)
            losses = ops.where(slots == step, loss, losses)  # losses[step] = loss
            return [step + 1, new_state, losses]

        first = ops.constant(np.zeros(1, dtype=np.int32), DType.int32, device)
        no_losses = ops.constant(np.zeros(K, dtype=np.float32), DType.float32, device)
        _, final_state, losses = ops.while_loop([first, state, no_losses], predicate, body)
        graph.output(losses, final_state)
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
        flat = state.tensor[0]  # [P]
        p = layout.split(flat)
        cache = ops.buffer_load(cache_buffer.buffer)  # [2, L, T, C]
        token, position = token_position.tensor[0:1], token_position.tensor[1:2]  # [1] each
        positions = ops.constant(np.arange(T, dtype=np.int32), DType.int32, device)
        at_position = (positions == position).reshape((T, 1))  # [T, 1]
        # Additive mask over [key, head]: cached positions after `position` (stale, or not yet
        # written) drop out.
        visible = ops.where((positions <= position).reshape((T, 1)),
                            ops.constant(0.0, DType.float32, device),
                            ops.constant(-np.inf, DType.float32, device))  # [T, 1]

        x = ops.gather(p["wte"], token, axis=0) + ops.gather(p["wpe"], position, axis=0)
        x, _ = _rmsnorm(x)  # [1, C]
        new_keys, new_values = [], []
        for i in range(L):
            residual = x
            xn, _ = _rmsnorm(x)
            qkv_weight = layout.slice(flat, f"layer{i}.attn_wq", f"layer{i}.attn_wv")
            qkv = _linear(xn, qkv_weight.reshape((3 * C, C)))  # [1, 3C]
            q = qkv[:, 0:C].reshape((1, H, D))
            keys = ops.where(at_position, qkv[:, C:2 * C], cache[0, i])  # [T, C]
            values = ops.where(at_position, qkv[:, 2 * C:3 * C], cache[1, i])
            new_keys.append(keys)
            new_values.append(values)
            scores = _contract(q, keys.reshape((T, H, D)), axis=-1)  # [T, H]
            weights = _softmax(scores * attention_scale + visible, axis=0)
            heads = _contract(ops.unsqueeze(weights, -1), values.reshape((T, H, D)), axis=0)
            x = _linear(heads.reshape((1, C)), p[f"layer{i}.attn_wo"]) + residual
            xn2, _ = _rmsnorm(x)
            x = _linear(ops.relu(_linear(xn2, p[f"layer{i}.mlp_fc1"])),
                        p[f"layer{i}.mlp_fc2"]) + x
        ops.buffer_store(cache_buffer.buffer,
                         ops.stack([ops.stack(new_keys, axis=0), ops.stack(new_values, axis=0)],
                                   axis=0))
        graph.output(_linear(x, p["lm_head"]).reshape((vocab_size,)))
    return graph
