"""Shared test helpers: build a loaded backend, run steps, compare parameters."""
from __future__ import annotations

import numpy as np

from backends import create_backend
from backends.contract import SpecInstance, TokenBatch
from bench.training import train

# A full block of tokens for the sampling checks: BOS, then characters.
SAMPLE_TOKENS = [26, 4, 12, 12, 0, 19, 8, 13, 0, 26, 1, 2, 3, 4, 5, 6]


def make_backend(name: str, spec: SpecInstance, dtype: str, device: str | None = None):
    backend = create_backend(name, spec.config, spec.tokenizer.vocab_size, dtype, device)
    backend.load_parameters(spec.parameters)
    return backend


def train_losses(backend, spec: SpecInstance, steps: int) -> np.ndarray:
    return np.array(train(backend, spec, steps).losses)


def max_parameter_difference(a: dict, b: dict) -> dict[str, float]:
    assert a.keys() == b.keys()
    return {name: float(np.abs(a[name] - b[name]).max()) for name in a}


def every_length(spec: SpecInstance) -> list[TokenBatch]:
    """One single-row batch per length 1 .. block_size: [BOS] + n - 1 characters (+ BOS)."""
    block, bos = spec.config.block_size, spec.tokenizer.bos
    batches = [TokenBatch.from_sequences([([bos] + [n % 26] * (n - 1) + [bos])[: block + 1]],
                                         block, bos) for n in range(1, block + 1)]
    assert sorted(int(batch.lengths[0]) for batch in batches) == list(range(1, block + 1))
    return batches
