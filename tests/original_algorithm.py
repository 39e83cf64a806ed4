"""The original microgpt algorithm, one object per scalar, as a test oracle.

This follows SPEC.md the way the original program does it (a `Value` per scalar, a graph of
additions and multiplications, a topological sort for the backward pass, plain-Python Adam), so
that the suite's `python` backend, which restructures the tape for speed, can be checked against
the unoptimised algorithm step by step. It is deliberately slow and never used by the suite.
"""
from __future__ import annotations

import math


class Value:
    __slots__ = ("data", "grad", "children", "local_grads")

    def __init__(self, data, children=(), local_grads=()):
        self.data, self.grad = data, 0.0
        self.children, self.local_grads = children, local_grads

    def __add__(self, other):
        other = other if isinstance(other, Value) else Value(other)
        return Value(self.data + other.data, (self, other), (1.0, 1.0))

    def __mul__(self, other):
        other = other if isinstance(other, Value) else Value(other)
        return Value(self.data * other.data, (self, other), (other.data, self.data))

    def __pow__(self, exponent):
        return Value(self.data ** exponent, (self,), (exponent * self.data ** (exponent - 1),))

    def log(self):
        return Value(math.log(self.data), (self,), (1 / self.data,))

    def exp(self):
        return Value(math.exp(self.data), (self,), (math.exp(self.data),))

    def relu(self):
        return Value(0 if self.data < 0 else self.data, (self,), (float(self.data > 0),))

    __radd__ = __add__
    __rmul__ = __mul__

    def __neg__(self):
        return self * -1

    def __sub__(self, other):
        return self + (-other)

    def __truediv__(self, other):
        return self * other ** -1

    def backward(self):
        order, seen = [], set()

        def visit(node):
            if id(node) not in seen:
                seen.add(id(node))
                for child in node.children:
                    visit(child)
                order.append(node)
        visit(self)
        self.grad = 1.0
        for node in reversed(order):
            for child, local in zip(node.children, node.local_grads):
                child.grad += local * node.grad


class OriginalModel:
    """The spec's model over Value objects, from the spec's float64 parameters."""

    def __init__(self, config, parameters):
        self.config = config
        self.state = {name: [[Value(float(x)) for x in row] for row in matrix]
                      for name, matrix in parameters.items()}
        self.params = [p for matrix in self.state.values() for row in matrix for p in row]
        self.m = [0.0] * len(self.params)
        self.v = [0.0] * len(self.params)

    @staticmethod
    def linear(x, w):
        return [sum(wi * xi for wi, xi in zip(row, x)) for row in w]

    @staticmethod
    def softmax(logits):
        top = max(v.data for v in logits)
        exps = [(v - top).exp() for v in logits]
        total = sum(exps)
        return [e / total for e in exps]

    @staticmethod
    def rmsnorm(x):
        ms = sum(xi * xi for xi in x) / len(x)
        scale = (ms + 1e-5) ** -0.5
        return [xi * scale for xi in x]

    def forward(self, token, position, keys, values):
        cfg, s = self.config, self.state
        hd = cfg.head_dim
        x = self.rmsnorm([t + p for t, p in zip(s["wte"][token], s["wpe"][position])])
        for li in range(cfg.n_layer):
            residual = x
            x = self.rmsnorm(x)
            q = self.linear(x, s[f"layer{li}.attn_wq"])
            keys[li].append(self.linear(x, s[f"layer{li}.attn_wk"]))
            values[li].append(self.linear(x, s[f"layer{li}.attn_wv"]))
            attended = []
            for h in range(cfg.n_head):
                lo = h * hd
                q_h = q[lo:lo + hd]
                k_h = [k[lo:lo + hd] for k in keys[li]]
                v_h = [v[lo:lo + hd] for v in values[li]]
                scores = [sum(q_h[j] * k_h[t][j] for j in range(hd)) / hd ** 0.5
                          for t in range(len(k_h))]
                weights = self.softmax(scores)
                attended.extend(sum(weights[t] * v_h[t][j] for t in range(len(v_h)))
                                for j in range(hd))
            x = [a + b for a, b in zip(self.linear(attended, s[f"layer{li}.attn_wo"]), residual)]
            residual = x
            hidden = [h.relu() for h in self.linear(self.rmsnorm(x), s[f"layer{li}.mlp_fc1"])]
            x = [a + b for a, b in zip(self.linear(hidden, s[f"layer{li}.mlp_fc2"]), residual)]
        return self.linear(x, s["lm_head"])

    def train_step(self, tokens, step):
        cfg = self.config
        n = len(tokens) - 1
        keys = [[] for _ in range(cfg.n_layer)]
        values = [[] for _ in range(cfg.n_layer)]
        losses = []
        for position in range(n):
            probs = self.softmax(self.forward(tokens[position], position, keys, values))
            losses.append(-probs[tokens[position + 1]].log())
        loss = (1 / n) * sum(losses)
        loss.backward()
        lr = cfg.learning_rate * (1 - step / cfg.num_steps)
        for i, p in enumerate(self.params):
            self.m[i] = cfg.beta1 * self.m[i] + (1 - cfg.beta1) * p.grad
            self.v[i] = cfg.beta2 * self.v[i] + (1 - cfg.beta2) * p.grad ** 2
            m_hat = self.m[i] / (1 - cfg.beta1 ** (step + 1))
            v_hat = self.v[i] / (1 - cfg.beta2 ** (step + 1))
            p.data -= lr * m_hat / (v_hat ** 0.5 + cfg.eps)
            p.grad = 0
        return loss.data
