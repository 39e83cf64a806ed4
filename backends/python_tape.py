"""python backend: the spec as a scalar autograd tape in pure Python (standard library only).

This is the living definition of the semantics, like the original microgpt.py, but with two
changes that make it several times faster without changing the algorithm:
- a structure-of-arrays tape: one list of values, one of gradients, and per node a tuple of child
  indices and a tuple of local gradients, instead of one object per scalar;
- coarser scalar nodes: a dot product (one output of a linear layer, one attention score), an
  rmsnorm scale, a softmax output and a per-position cross-entropy are one node each, with their
  local gradients written out, instead of a chain of additions and multiplications.

Forward values are computed in the original's order of operations, so the losses agree with the
original program to the last few bits; only the order in which gradients are summed differs.
Parameters occupy the first slots of the tape; every step truncates the tape back to them.
"""
from __future__ import annotations

import math

from backends.contract import RMS_EPS, Backend


class Tape:
    """Scalar nodes: values[i], and for nodes built from others, children[i] and local[i]
    (d node / d child, one per child)."""

    def __init__(self):
        self.values: list[float] = []
        self.children: list[tuple] = []
        self.local: list[tuple] = []

    def leaf(self, value: float) -> int:
        self.values.append(value)
        self.children.append(())
        self.local.append(())
        return len(self.values) - 1

    def node(self, value: float, children, local) -> int:
        self.values.append(value)
        self.children.append(children)
        self.local.append(local)
        return len(self.values) - 1

    def truncate(self, size: int) -> None:
        del self.values[size:], self.children[size:], self.local[size:]

    def backward(self, root: int, stop: int) -> list[float]:
        """Gradients of node `root` with respect to every node, walking nodes >= stop."""
        grad = [0.0] * len(self.values)
        grad[root] = 1.0
        children, local = self.children, self.local
        for i in range(root, stop - 1, -1):
            g = grad[i]
            if g == 0.0:
                continue
            for child, local_grad in zip(children[i], local[i]):
                grad[child] += local_grad * g
        return grad


class PythonTapeBackend(Backend):
    name = "python"
    provides_moments = True

    def __init__(self, config, vocab_size, dtype="float64", device=None):
        super().__init__(config, vocab_size, dtype, device)
        self.tape = Tape()
        self.param_rows: dict[str, list[list[int]]] = {}  # name -> rows of tape indices
        for name, (rows, cols) in self.shapes.items():
            self.param_rows[name] = [[self.tape.leaf(0.0) for _ in range(cols)]
                                     for _ in range(rows)]
        self.num_params = len(self.tape.values)
        self.adam_m = [0.0] * self.num_params
        self.adam_v = [0.0] * self.num_params
        self.reset_cache()

    # ---- parameters ------------------------------------------------------------------------
    def load_parameters(self, parameters):
        for name, rows in self.param_rows.items():
            source = parameters[name]
            for r, row in enumerate(rows):
                for c, index in enumerate(row):
                    self.tape.values[index] = float(source[r][c])
        self.adam_m = [0.0] * self.num_params
        self.adam_v = [0.0] * self.num_params

    def parameters(self):
        import numpy as np  # only for handing results back to the suite, never in the maths
        values = self.tape.values
        return {name: np.array([[values[i] for i in row] for row in rows], dtype=np.float64)
                for name, rows in self.param_rows.items()}

    def optimizer_moments(self):
        import numpy as np  # only for handing results back to the suite, never in the maths
        return tuple({name: np.array([[moment[i] for i in row] for row in rows],
                                     dtype=np.float64)
                      for name, rows in self.param_rows.items()}
                     for moment in (self.adam_m, self.adam_v))

    # ---- the model as tape nodes -----------------------------------------------------------
    def _linear(self, x: list[int], weight_rows: list[list[int]]) -> list[int]:
        """y_o = sum_i W[o][i] * x[i], one node per output (children: the row, then x)."""
        values, node = self.tape.values, self.tape.node
        x_values = [values[i] for i in x]
        x_tuple, x_values_tuple = tuple(x), tuple(x_values)
        out = []
        for row in weight_rows:
            w_values = [values[i] for i in row]
            total = 0
            for w, xv in zip(w_values, x_values):
                total += w * xv
            out.append(node(total, tuple(row) + x_tuple, x_values_tuple + tuple(w_values)))
        return out

    def _rmsnorm(self, x: list[int]) -> list[int]:
        values, node = self.tape.values, self.tape.node
        x_values = [values[i] for i in x]
        total = 0
        for xv in x_values:
            total += xv * xv
        mean_square = total * len(x) ** -1
        scale_value = (mean_square + RMS_EPS) ** -0.5
        # d scale / d x_i = -0.5 (ms + eps)^-1.5 * 2 x_i / C = -scale^3 x_i / C
        factor = -(scale_value ** 3) / len(x)
        scale = node(scale_value, tuple(x), tuple(factor * xv for xv in x_values))
        return [node(xv * scale_value, (i, scale), (scale_value, xv))
                for i, xv in zip(x, x_values)]

    def _softmax(self, logits: list[int]) -> list[int]:
        values, node = self.tape.values, self.tape.node
        logit_values = [values[i] for i in logits]
        top = max(logit_values)
        exps = [math.exp(v - top) for v in logit_values]
        inverse_total = sum(exps) ** -1
        probs = [e * inverse_total for e in exps]
        children = tuple(logits)
        # d p_i / d l_j = p_i (delta_ij - p_j)
        return [node(p_i, children, tuple(p_i * ((1.0 if i == j else 0.0) - p_j)
                                          for j, p_j in enumerate(probs)))
                for i, p_i in enumerate(probs)]

    def _cross_entropy(self, logits: list[int], target: int) -> int:
        """-log softmax(logits)[target] as one node: d/d l_j = p_j - delta_j,target."""
        values = self.tape.values
        logit_values = [values[i] for i in logits]
        top = max(logit_values)
        exps = [math.exp(v - top) for v in logit_values]
        inverse_total = sum(exps) ** -1
        probs = [e * inverse_total for e in exps]
        local = tuple(p - (1.0 if j == target else 0.0) for j, p in enumerate(probs))
        return self.tape.node(-math.log(probs[target]), tuple(logits), local)

    def _add(self, a: list[int], b: list[int]) -> list[int]:
        values, node = self.tape.values, self.tape.node
        return [node(values[i] + values[j], (i, j), (1.0, 1.0)) for i, j in zip(a, b)]

    def _forward_position(self, token: int, position: int, keys, cache_values) -> list[int]:
        """Logit nodes for one position; appends this position's keys and values per layer."""
        cfg, rows, values, node = self.config, self.param_rows, self.tape.values, self.tape.node
        head_dim = cfg.head_dim
        x = self._add(rows["wte"][token], rows["wpe"][position])
        x = self._rmsnorm(x)
        inverse_sqrt = (head_dim ** 0.5) ** -1
        for li in range(cfg.n_layer):
            residual = x
            x = self._rmsnorm(x)
            q = self._linear(x, rows[f"layer{li}.attn_wq"])
            keys[li].append(self._linear(x, rows[f"layer{li}.attn_wk"]))
            cache_values[li].append(self._linear(x, rows[f"layer{li}.attn_wv"]))
            attended = []
            for h in range(cfg.n_head):
                lo, hi = h * head_dim, (h + 1) * head_dim
                q_h = q[lo:hi]
                q_values = [values[i] for i in q_h]
                scores = []
                for k in keys[li]:
                    k_h = k[lo:hi]
                    k_values = [values[i] for i in k_h]
                    dot = 0
                    for a, b in zip(q_values, k_values):
                        dot += a * b
                    scores.append(node(dot * inverse_sqrt, tuple(q_h) + tuple(k_h),
                                       tuple(v * inverse_sqrt for v in k_values)
                                       + tuple(v * inverse_sqrt for v in q_values)))
                weights = self._softmax(scores)
                weight_values = [values[i] for i in weights]
                for j in range(head_dim):
                    v_column = [v[lo + j] for v in cache_values[li]]
                    v_values = [values[i] for i in v_column]
                    total = 0
                    for a, b in zip(weight_values, v_values):
                        total += a * b
                    attended.append(node(total, tuple(weights) + tuple(v_column),
                                         tuple(v_values) + tuple(weight_values)))
            x = self._add(self._linear(attended, rows[f"layer{li}.attn_wo"]), residual)
            residual = x
            hidden = self._linear(self._rmsnorm(x), rows[f"layer{li}.mlp_fc1"])
            activated = [node(0.0 if values[i] < 0 else values[i], (i,),
                              (1.0 if values[i] > 0 else 0.0,)) for i in hidden]
            x = self._add(self._linear(activated, rows[f"layer{li}.mlp_fc2"]), residual)
        return self._linear(x, rows["lm_head"])

    # ---- training --------------------------------------------------------------------------
    def train_step(self, batch, adam):
        tape, cfg = self.tape, self.config
        tape.truncate(self.num_params)
        tokens = batch.sequences[0]
        n = len(tokens) - 1
        keys = [[] for _ in range(cfg.n_layer)]
        cache_values = [[] for _ in range(cfg.n_layer)]
        losses = []
        for position in range(n):
            logits = self._forward_position(tokens[position], position, keys, cache_values)
            losses.append(self._cross_entropy(logits, tokens[position + 1]))
        values = tape.values
        total = 0
        for i in losses:
            total += values[i]
        mean = n ** -1  # the original's (1 / n) * sum(losses)
        loss = tape.node(total * mean, tuple(losses), (mean,) * n)
        grad = tape.backward(loss, self.num_params)
        self._adam(grad, adam)
        return values[loss]

    def _adam(self, grad, adam):
        cfg, values, m, v = self.config, self.tape.values, self.adam_m, self.adam_v
        b1, b2, eps = cfg.beta1, cfg.beta2, cfg.eps
        lr, bc1, bc2 = adam.learning_rate, adam.bias_correction1, adam.bias_correction2
        for i in range(self.num_params):
            g = grad[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g ** 2
            values[i] -= lr * (m[i] / bc1) / ((v[i] / bc2) ** 0.5 + eps)

    # ---- sampling --------------------------------------------------------------------------
    def reset_cache(self):
        self.cache_keys = [[] for _ in range(self.config.n_layer)]
        self.cache_values = [[] for _ in range(self.config.n_layer)]
        if hasattr(self, "tape"):
            self.tape.truncate(self.num_params)

    def next_logits(self, token, position):
        logits = self._forward_position(token, position, self.cache_keys, self.cache_values)
        return [self.tape.values[i] for i in logits]
