#!/usr/bin/env python3
"""A port of microgpt written from this suite's SPEC.md alone: one file, standard library only.

It is the template for putting any program in the suite's table (with port.toml beside it),
and a fixture of the suite's tests. It trains the spec's tiny GPT exactly as the spec defines
it (the same random stream, initial weights, data order, Adam schedule and sampling), so the
suite judges it `ok`: every loss within half a unit of its last printed digit of the float64
reference, and the same 20 names.

Where the original builds a graph of one object per scalar, this port keeps every vector as a
Python list and writes the backward pass out by hand; the arithmetic is the spec's.

Output, in the original's format (the suite reads these lines as they arrive):
    step    1 / 1000 | loss 3.3660        (one per step, ended by \\r as the original does)
    sample  1: kamon                       (one per sample)

    python3 microgpt_port.py [--data input.txt] [--steps 1000] [--samples 20]
"""
from __future__ import annotations

import argparse
import math
import random

# SPEC.md, "Default hyper-parameters"
N_LAYER, N_EMBD, N_HEAD, BLOCK_SIZE = 1, 16, 4, 16
HEAD_DIM = N_EMBD // N_HEAD
LEARNING_RATE, BETA1, BETA2, ADAM_EPS = 0.01, 0.85, 0.99, 1e-8
INIT_STD, SEED, TEMPERATURE = 0.08, 42, 0.5
RMS_EPS = 1e-5


# ---- vectors as lists ------------------------------------------------------------------------
def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def matvec(matrix, vector):
    """matrix [out, in] @ vector [in] -> [out]."""
    return [dot(row, vector) for row in matrix]


def matvec_transposed(matrix, vector):
    """matrix^T @ vector: the gradient of matvec's input."""
    result = [0.0] * len(matrix[0])
    for row, scale in zip(matrix, vector):
        result = [total + scale * weight for total, weight in zip(result, row)]
    return result


def add_outer(gradient, dy, x):
    """gradient += dy x^T: the gradient of matvec's matrix."""
    for i, scale in enumerate(dy):
        gradient[i] = [total + scale * value for total, value in zip(gradient[i], x)]


def add_into(total, values):
    for i, value in enumerate(values):
        total[i] += value


def rmsnorm(x):
    """(x * s, s) with s = (mean(x*x) + eps) ** -0.5; no learned gain."""
    scale = (sum(value * value for value in x) / len(x) + RMS_EPS) ** -0.5
    return [value * scale for value in x], scale


def rmsnorm_backward(x, scale, dy):
    """dx of y = x * s(x): s * dy - s^3 * x * (dy . x) / n."""
    projection = scale ** 3 * dot(dy, x) / len(x)
    return [scale * g - projection * value for g, value in zip(dy, x)]


def softmax(values):
    top = max(values)
    exps = [math.exp(value - top) for value in values]
    total = sum(exps)
    return [value / total for value in exps]


# ---- the spec's data and weights -----------------------------------------------------------
def zeros(rows, cols):
    return [[0.0] * cols for _ in range(rows)]


def parameter_shapes(vocab_size):
    """Names and [out, in] shapes in the spec's draw order (SPEC.md, "Random state")."""
    shapes = [("wte", vocab_size, N_EMBD), ("wpe", BLOCK_SIZE, N_EMBD),
              ("lm_head", vocab_size, N_EMBD)]
    for layer in range(N_LAYER):
        shapes += [(f"layer{layer}.attn_wq", N_EMBD, N_EMBD),
                   (f"layer{layer}.attn_wk", N_EMBD, N_EMBD),
                   (f"layer{layer}.attn_wv", N_EMBD, N_EMBD),
                   (f"layer{layer}.attn_wo", N_EMBD, N_EMBD),
                   (f"layer{layer}.mlp_fc1", 4 * N_EMBD, N_EMBD),
                   (f"layer{layer}.mlp_fc2", N_EMBD, 4 * N_EMBD)]
    return shapes


class Model:
    def __init__(self, rng, vocab_size):
        shapes = parameter_shapes(vocab_size)
        # One gauss draw per element, matrix after matrix, row by row.
        self.weights = {name: [[rng.gauss(0, INIT_STD) for _ in range(cols)]
                               for _ in range(rows)] for name, rows, cols in shapes}
        self.grads = {name: zeros(rows, cols) for name, rows, cols in shapes}
        self.adam_m = {name: zeros(rows, cols) for name, rows, cols in shapes}
        self.adam_v = {name: zeros(rows, cols) for name, rows, cols in shapes}

    # ---- forward: one position at a time, keys and values cached, as the original ----------
    def forward_position(self, token, position, cache):
        """The logits at `position` after `token`; `cache` holds the layers' keys and values of
        the earlier positions and every activation the backward pass needs."""
        w = self.weights
        embedded = [a + b for a, b in zip(w["wte"][token], w["wpe"][position])]
        x, scale = rmsnorm(embedded)
        saved = {"token": token, "position": position, "embedded": embedded,
                 "embed_scale": scale, "layers": []}
        for layer in range(N_LAYER):
            name = f"layer{layer}."
            keys, values = cache.setdefault(layer, ([], []))
            residual = x
            h, h_scale = rmsnorm(x)
            q = matvec(w[name + "attn_wq"], h)
            keys.append(matvec(w[name + "attn_wk"], h))
            values.append(matvec(w[name + "attn_wv"], h))
            attended, weights_per_head = [], []
            for head in range(N_HEAD):
                lo, hi = head * HEAD_DIM, (head + 1) * HEAD_DIM
                scores = [dot(q[lo:hi], key[lo:hi]) / HEAD_DIM ** 0.5 for key in keys]
                weights = softmax(scores)
                weights_per_head.append(weights)
                attended += [sum(a * value[lo + d] for a, value in zip(weights, values))
                             for d in range(HEAD_DIM)]
            x = [a + b for a, b in zip(matvec(w[name + "attn_wo"], attended), residual)]
            mid = x
            h2, h2_scale = rmsnorm(x)
            hidden = matvec(w[name + "mlp_fc1"], h2)
            relu = [value if value > 0 else 0.0 for value in hidden]
            x = [a + b for a, b in zip(matvec(w[name + "mlp_fc2"], relu), mid)]
            saved["layers"].append({
                "x_in": residual, "h": h, "h_scale": h_scale, "q": q,
                "attn_weights": weights_per_head, "attended": attended, "mid": mid, "h2": h2,
                "h2_scale": h2_scale, "hidden": hidden, "relu": relu})
        saved["x_out"] = x
        cache.setdefault("positions", []).append(saved)
        return matvec(w["lm_head"], x)

    # ---- one training step ---------------------------------------------------------------
    def loss_and_gradients(self, tokens):
        """Mean cross-entropy of predicting tokens[1:] from tokens[:-1]; fills self.grads."""
        for gradient in self.grads.values():
            for row in gradient:
                row[:] = [0.0] * len(row)
        n = min(BLOCK_SIZE, len(tokens) - 1)
        cache, probabilities = {}, []
        for position in range(n):
            probabilities.append(softmax(self.forward_position(tokens[position], position,
                                                               cache)))
        loss = sum(-math.log(probabilities[p][tokens[p + 1]]) for p in range(n)) / n
        self.backward(cache, probabilities, tokens[1:n + 1])
        return loss

    def backward(self, cache, probabilities, targets):
        w, g = self.weights, self.grads
        positions = cache["positions"]
        n = len(positions)
        # d loss / d x of each position after the last layer, through lm_head.
        dx = []
        for saved, probs, target in zip(positions, probabilities, targets):
            dlogits = [p / n for p in probs]
            dlogits[target] -= 1.0 / n
            add_outer(g["lm_head"], dlogits, saved["x_out"])
            dx.append(matvec_transposed(w["lm_head"], dlogits))
        for layer in reversed(range(N_LAYER)):
            name = f"layer{layer}."
            acts = [saved["layers"][layer] for saved in positions]
            keys, values = cache[layer]
            # MLP block: x_out = fc2 relu(fc1 rmsnorm(mid)) + mid
            dmid = []
            for a, dout in zip(acts, dx):
                add_outer(g[name + "mlp_fc2"], dout, a["relu"])
                drelu = matvec_transposed(w[name + "mlp_fc2"], dout)
                dhidden = [d if value > 0 else 0.0 for d, value in zip(drelu, a["hidden"])]
                add_outer(g[name + "mlp_fc1"], dhidden, a["h2"])
                dh2 = matvec_transposed(w[name + "mlp_fc1"], dhidden)
                dnorm = rmsnorm_backward(a["mid"], a["h2_scale"], dh2)
                dmid.append([a_ + b for a_, b in zip(dout, dnorm)])
            # Attention block: mid = Wo attended + x_in, causal over the cached keys/values.
            dq = [[0.0] * N_EMBD for _ in range(n)]
            dkeys = [[0.0] * N_EMBD for _ in range(n)]
            dvalues = [[0.0] * N_EMBD for _ in range(n)]
            for p, (a, dm) in enumerate(zip(acts, dmid)):
                add_outer(g[name + "attn_wo"], dm, a["attended"])
                dattended = matvec_transposed(w[name + "attn_wo"], dm)
                for head in range(N_HEAD):
                    lo, hi = head * HEAD_DIM, (head + 1) * HEAD_DIM
                    weights = a["attn_weights"][head]
                    dout = dattended[lo:hi]
                    dweights = [dot(dout, values[j][lo:hi]) for j in range(p + 1)]
                    for j, weight in enumerate(weights):
                        for d in range(HEAD_DIM):
                            dvalues[j][lo + d] += weight * dout[d]
                    mean = dot(weights, dweights)
                    for j, weight in enumerate(weights):
                        dscore = weight * (dweights[j] - mean) / HEAD_DIM ** 0.5
                        for d in range(HEAD_DIM):
                            dq[p][lo + d] += dscore * keys[j][lo + d]
                            dkeys[j][lo + d] += dscore * a["q"][lo + d]
            new_dx = []
            for p, (a, dm) in enumerate(zip(acts, dmid)):
                add_outer(g[name + "attn_wq"], dq[p], a["h"])
                add_outer(g[name + "attn_wk"], dkeys[p], a["h"])
                add_outer(g[name + "attn_wv"], dvalues[p], a["h"])
                dh = [x + y + z for x, y, z in zip(matvec_transposed(w[name + "attn_wq"], dq[p]),
                                                   matvec_transposed(w[name + "attn_wk"],
                                                                     dkeys[p]),
                                                   matvec_transposed(w[name + "attn_wv"],
                                                                     dvalues[p]))]
                dnorm = rmsnorm_backward(a["x_in"], a["h_scale"], dh)
                new_dx.append([x + y for x, y in zip(dm, dnorm)])
            dx = new_dx
        # Embedding: x = rmsnorm(wte[token] + wpe[position]).
        for saved, dnormed in zip(positions, dx):
            dembedded = rmsnorm_backward(saved["embedded"], saved["embed_scale"], dnormed)
            add_into(g["wte"][saved["token"]], dembedded)
            add_into(g["wpe"][saved["position"]], dembedded)

    def adam_update(self, step, num_steps):
        """Adam with bias correction and the spec's linearly decaying learning rate."""
        rate = LEARNING_RATE * (1 - step / num_steps)
        correction1, correction2 = 1 - BETA1 ** (step + 1), 1 - BETA2 ** (step + 1)
        for name, matrix in self.weights.items():
            for row, grad, m, v in zip(matrix, self.grads[name], self.adam_m[name],
                                       self.adam_v[name]):
                for i, gradient in enumerate(grad):
                    m[i] = BETA1 * m[i] + (1 - BETA1) * gradient
                    v[i] = BETA2 * v[i] + (1 - BETA2) * gradient * gradient
                    row[i] -= rate * (m[i] / correction1) / (math.sqrt(v[i] / correction2)
                                                             + ADAM_EPS)


def sampling_probabilities(logits):
    """softmax(logits / T) in the original's exact order of operations (SPEC.md, "Sampling"),
    so that the same generator state draws the same tokens."""
    inverse_temperature = TEMPERATURE ** -1
    scaled = [value * inverse_temperature for value in logits]
    top = max(scaled)
    exps = [math.exp(value - top) for value in scaled]
    inverse_total = sum(exps) ** -1
    return [value * inverse_total for value in exps]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="input.txt", help="names.txt, one name per line")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=20)
    args = parser.parse_args()

    rng = random.Random(SEED)
    with open(args.data, encoding="utf-8") as handle:
        docs = [line.strip() for line in handle if line.strip()]
    rng.shuffle(docs)
    chars = sorted(set("".join(docs)))
    bos = len(chars)
    index_of = {ch: i for i, ch in enumerate(chars)}
    model = Model(rng, len(chars) + 1)

    for step in range(args.steps):
        doc = docs[step % len(docs)]
        tokens = [bos] + [index_of[ch] for ch in doc] + [bos]
        loss = model.loss_and_gradients(tokens)
        model.adam_update(step, args.steps)
        # flush: whoever reads the output sees each step when it happens.
        print(f"step {step + 1:4d} / {args.steps:4d} | loss {loss:.4f}", end="\r", flush=True)
    print()

    print("--- inference (new, hallucinated names) ---")
    vocab = range(len(chars) + 1)
    for sample in range(args.samples):
        cache, token, name = {}, bos, []
        for position in range(BLOCK_SIZE):
            logits = model.forward_position(token, position, cache)
            token = rng.choices(vocab, weights=sampling_probabilities(logits))[0]
            if token == bos:
                break
            name.append(chars[token])
        print(f"sample {sample + 1:2d}: {''.join(name)}", flush=True)


if __name__ == "__main__":
    main()
