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
from dataclasses import dataclass
from pathlib import Path

from backends.contract import SpecInstance
from bench.files import REPO_ROOT, write_atomically

# Largest allowed |loss - reference loss| at any step. float64 backends compute the same
# function to rounding, so 1e-9 leaves room only for summation order. float32 numpy stays within
# 1e-6 of float64 over 1,000 steps of the tiny config; 1e-4 allows other float32 reduction
# orders while catching any real error (a wrong gradient moves the loss by > 1e-3 within tens
# of steps).
LOSS_TOLERANCE = {"float64": 1e-9, "float32": 1e-4}

# At larger configs Adam amplifies float32 rounding until float32 and float64 training part ways
# (numpy float32 leaves 1e-4 of float64 at step ~60 of `small` and ~20 of `medium`). There a
# float32 backend may differ from the float64 reference by as much as float32 itself does, with
# a safety factor: its tolerance at step s is 1e-4 + FLOAT32_DRIFT_FACTOR * d(s), where d(s) is
# the largest |numpy float32 - numpy float64| over steps 1..s. d is ~1e-6 at `tiny`, so the
# tolerance stays 1e-4 there; early steps stay tight at every size, which is where a wrong
# gradient shows.
FLOAT32_DRIFT_FACTOR = 10.0

# Past the first FLOAT32_STRICT_STEPS steps, float32 training at the larger configs is chaotic:
# Adam (eps 1e-8) turns a rounding-level gradient (a true zero computed as 1e-12) into a
# full-size update, so two correct float32 implementations can part ways by 0.07 at step ~180
# of `small` while numpy float32 happens to stay close. After those steps a float32 step also
# passes when the trailing FLOAT32_WINDOW-step mean of its loss is within
# FLOAT32_MEAN_RELATIVE of the reference's: the run still trains the same model as well. A wrong
# gradient shows long before (the tests see it within a few steps), in the strict part.
FLOAT32_STRICT_STEPS = 100
FLOAT32_WINDOW = 50
FLOAT32_MEAN_RELATIVE = 0.01

REFERENCE_CACHE_DIR = REPO_ROOT / "data" / "cache" / "reference"


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


class ReferenceLosses(list):
    """The numpy float64 losses, one per step, plus `float32_drift`: the running maximum of
    |numpy float32 - numpy float64| per step (what float32 rounding alone does at this config)."""

    def __init__(self, losses, float32_drift):
        super().__init__(losses)
        self.float32_drift = list(float32_drift)

    def tolerances(self, dtype: str, steps: int) -> list[float]:
        if dtype == "float32":
            return [LOSS_TOLERANCE["float32"] + FLOAT32_DRIFT_FACTOR * drift
                    for drift in self.float32_drift[:steps]]
        return [LOSS_TOLERANCE[dtype]] * steps


def compare_losses(losses: list[float], reference: list[float], dtype: str) -> ParityResult:
    """Check every step's loss against the reference; with a ReferenceLosses, float32 gets the
    per-step drift allowance described above."""
    if isinstance(reference, ReferenceLosses):
        tolerances = reference.tolerances(dtype, len(losses))
    else:
        tolerances = [LOSS_TOLERANCE[dtype]] * len(losses)
    if not losses:
        return ParityResult(False, math.inf, 0, tolerances[0] if tolerances else 0.0, 0,
                            "no losses to compare")
    if len(losses) > len(reference):
        return ParityResult(False, math.inf, 0, tolerances[0], 0,
                            f"{len(losses)} losses but only {len(reference)} reference steps")
    diffs = [abs(loss - expected) if math.isfinite(loss) else math.inf
             for loss, expected in zip(losses, reference)]
    within = [diff <= limit for diff, limit in zip(diffs, tolerances)]
    statistical = 0
    if dtype == "float32":
        for step in range(FLOAT32_STRICT_STEPS, len(losses)):
            if not within[step] and _trailing_means_agree(losses, reference, step):
                within[step] = True
                statistical += 1
    failing = [step for step, ok in enumerate(within) if not ok]
    # The worst step is the failing one that exceeds its own tolerance the most.
    candidates = failing or range(len(diffs))
    worst_step = max(candidates, key=lambda step: diffs[step] / tolerances[step])
    worst, tolerance = diffs[worst_step], tolerances[worst_step]
    passed = not failing
    verdict = "matches" if passed else "DOES NOT MATCH"
    message = (f"{verdict} the float64 reference over {len(losses)} steps: max |diff| "
               f"{max(diffs):.3g}; worst against its tolerance at step {worst_step + 1} "
               f"(|diff| {worst:.3g}, tolerance {tolerance:.3g} for {dtype})")
    if statistical:
        message += (f"; {statistical} chaotic float32 steps after step {FLOAT32_STRICT_STEPS} "
                    f"matched by their {FLOAT32_WINDOW}-step mean loss (within "
                    f"{FLOAT32_MEAN_RELATIVE:.0%})")
    return ParityResult(passed, worst, worst_step + 1, tolerance, len(losses), message)


def _trailing_means_agree(losses, reference, step: int) -> bool:
    start = max(0, step + 1 - FLOAT32_WINDOW)
    mean = sum(losses[start: step + 1]) / (step + 1 - start)
    expected = sum(reference[start: step + 1]) / (step + 1 - start)
    return math.isfinite(mean) and abs(mean - expected) <= FLOAT32_MEAN_RELATIVE * expected


def _cache_key(spec: SpecInstance, steps: int, dataset_sha256: str) -> str:
    identity = json.dumps({"config": spec.config.to_dict(), "steps": steps,
                           "dataset": dataset_sha256}, sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:20]


def _numpy_losses(spec: SpecInstance, steps: int, dtype: str) -> list[float]:
    from backends import create_backend
    from bench.training import train
    backend = create_backend("numpy", spec.config, spec.tokenizer.vocab_size, dtype)
    backend.load_parameters(spec.parameters)
    return train(backend, spec, steps).losses


def reference_losses(spec: SpecInstance, steps: int, dataset_sha256: str,
                     cache_dir: Path = REFERENCE_CACHE_DIR) -> ReferenceLosses:
    """The numpy float64 losses of `steps` steps at the spec's config, with the float32 drift
    (cached per config, steps and dataset)."""
    path = cache_dir / f"{_cache_key(spec, steps, dataset_sha256)}.json"
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            return ReferenceLosses(cached["losses"], cached["float32_drift"])
        except (ValueError, KeyError):
            pass  # a damaged or older cache entry is recomputed below
    losses = _numpy_losses(spec, steps, "float64")
    drift, worst = [], 0.0
    for loss32, loss64 in zip(_numpy_losses(spec, steps, "float32"), losses):
        difference = abs(loss32 - loss64)
        # A float32 run that stopped early (inf) leaves the allowance at its last finite value.
        worst = max(worst, difference) if math.isfinite(difference) else worst
        drift.append(worst)
    drift += [worst] * (len(losses) - len(drift))
    write_atomically(path, json.dumps({"config": spec.config.to_dict(), "steps": steps,
                                       "losses": losses, "float32_drift": drift}))
    return ReferenceLosses(losses, drift)
