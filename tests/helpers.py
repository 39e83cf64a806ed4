"""Shared test helpers: build a loaded backend, run steps, compare parameters."""
from __future__ import annotations

import numpy as np

from backends import create_backend
from backends.contract import SpecInstance, TokenBatch, adam_step
from bench.training import prepare_batches, train


def make_backend(name: str, spec: SpecInstance, dtype: str, device: str | None = None):
    backend = create_backend(name, spec.config, spec.tokenizer.vocab_size, dtype, device)
    backend.load_parameters(spec.parameters)
    return backend


def train_losses(backend, spec: SpecInstance, steps: int) -> np.ndarray:
    return np.array(train(backend, spec, steps).losses)


def step_batch(spec: SpecInstance, step: int) -> TokenBatch:
    return prepare_batches(spec, step + 1)[step]


def max_parameter_difference(a: dict, b: dict) -> dict[str, float]:
    assert a.keys() == b.keys()
    return {name: float(np.abs(a[name] - b[name]).max()) for name in a}


__all__ = ["adam_step", "make_backend", "max_parameter_difference", "step_batch", "train_losses"]
