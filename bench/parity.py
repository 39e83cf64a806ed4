"""Correctness before speed: the float64 reference losses and the per-dtype tolerances every
backend's losses are checked against before its timing is reported as valid.

The reference is the numpy backend in float64 at the same config and number of steps (the numpy
float64 backend is itself tested against the pure-Python tape, which reproduces the original
program). It is cached per (config, steps, dataset) under data/cache/.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.spec import SpecInstance

# Largest allowed |loss - reference loss| at any step. float64 backends compute the same
# function to rounding, so 1e-9 leaves room only for summation order. float32 numpy stays within
# 1e-6 of float64 over 1,000 steps of the tiny config; 1e-4 allows other float32 reduction
# orders while catching any real error (a wrong gradient moves the loss by > 1e-3 within tens
# of steps).
LOSS_TOLERANCE = {"float64": 1e-9, "float32": 1e-4}

REFERENCE_CACHE_DIR = Path(__file__).resolve().parents[1] / "data" / "cache" / "reference"


@dataclass(frozen=True)
class ParityResult:
    passed: bool
    max_abs_diff: float
    worst_step: int  # 1-based, as the original prints steps
    tolerance: float
    steps_compared: int
    message: str

    def to_dict(self) -> dict:
        return {"passed": self.passed, "max_abs_diff": self.max_abs_diff,
                "worst_step": self.worst_step, "tolerance": self.tolerance,
                "steps_compared": self.steps_compared, "reference": "numpy float64",
                "message": self.message}


def tolerance_for(dtype: str) -> float:
    return LOSS_TOLERANCE[dtype]


def compare_losses(losses: list[float], reference: list[float], dtype: str) -> ParityResult:
    tolerance = tolerance_for(dtype)
    if not losses:
        return ParityResult(False, math.inf, 0, tolerance, 0, "no losses to compare")
    if len(losses) > len(reference):
        return ParityResult(False, math.inf, 0, tolerance, 0,
                            f"{len(losses)} losses but only {len(reference)} reference steps")
    diffs = [abs(loss - expected) if math.isfinite(loss) else math.inf
             for loss, expected in zip(losses, reference)]
    worst_step = max(range(len(diffs)), key=diffs.__getitem__)
    worst = diffs[worst_step]
    passed = worst <= tolerance
    verdict = "matches" if passed else "DOES NOT MATCH"
    message = (f"{verdict} the float64 reference over {len(losses)} steps: max |diff| "
               f"{worst:.3g} at step {worst_step + 1} (tolerance {tolerance:g} for {dtype})")
    return ParityResult(passed, worst, worst_step + 1, tolerance, len(losses), message)


def _cache_key(spec: SpecInstance, steps: int, dataset_sha256: str) -> str:
    identity = json.dumps({"config": spec.config.to_dict(), "steps": steps,
                           "dataset": dataset_sha256}, sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:20]


def reference_losses(spec: SpecInstance, steps: int, dataset_sha256: str,
                     cache_dir: Path = REFERENCE_CACHE_DIR) -> list[float]:
    """The numpy float64 losses of `steps` steps at the spec's config (cached)."""
    path = cache_dir / f"{_cache_key(spec, steps, dataset_sha256)}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())["losses"]
        except (ValueError, KeyError):
            pass  # a damaged cache entry is recomputed below
    from backends.numpy_backend import NumpyBackend
    from bench.training import train
    backend = NumpyBackend(spec.config, spec.tokenizer.vocab_size, "float64")
    backend.load_parameters(spec.parameters)
    losses = train(backend, spec, steps).losses
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=cache_dir, delete=False, suffix=".tmp") as handle:
        json.dump({"config": spec.config.to_dict(), "steps": steps, "losses": losses}, handle)
    os.replace(handle.name, path)
    return losses
