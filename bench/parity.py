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

# Largest allowed |loss - reference loss| at any step of the trajectory check. float64 backends
# compute the same function to rounding, so 1e-9 leaves room only for summation order. float32
# numpy stays within 1e-6 of float64 over 1,000 steps of the tiny config; 1e-4 allows other
# float32 reduction orders while catching any real error (a wrong gradient moves the loss by
# > 1e-3 within tens of steps).
LOSS_TOLERANCE = {"float64": 1e-9, "float32": 1e-4}

# Where float32 training drifts from float64 on its own, a float32 backend may differ from the
# reference by as much as float32 itself does, with a safety factor: its tolerance at step s is
# 1e-4 + FLOAT32_DRIFT_FACTOR * d(s), d(s) the largest |numpy float32 - numpy float64| over
# steps 1..s.
FLOAT32_DRIFT_FACTOR = 10.0

# The trajectory check covers the steps over which comparing two trajectories means something:
# while numpy float32 stays within TRAJECTORY_DRIFT_LIMIT of numpy float64, rounding has not been
# amplified (all 1,000 steps of `tiny`; ~40 steps of `small`). Past them, float32 training at
# the larger configs is chaotic (a ReLU gate flips, Adam turns a rounding-level gradient into a
# full-size update) and two correct runs part ways; float64 would follow later. Every step there
# is vouched for by the checkpoint check instead (bench.checkpoints: one float64 step from the
# backend's own state, whose error does not grow with chaos), which runs at the same steps for
# every run whatever its length.
TRAJECTORY_DRIFT_LIMIT = 1e-5

REFERENCE_CACHE_DIR = REPO_ROOT / "data" / "cache" / "reference"
# Part of the cache key: bump when the reference computation changes (2: numpy's float32 loss
# through log-softmax, finite at `large`).
REFERENCE_VERSION = 2


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

    def trajectory_steps(self) -> int:
        """How many leading steps the trajectory check covers (at least the first)."""
        for step, drift in enumerate(self.float32_drift):
            if drift > TRAJECTORY_DRIFT_LIMIT:
                return max(1, step)
        return len(self)


def compare_losses(losses: list[float], reference: list[float], dtype: str) -> ParityResult:
    """Check the losses against the reference at every step of the trajectory check: all steps
    for a plain list, the leading `trajectory_steps()` of a ReferenceLosses (with float32's
    per-step drift allowance). Later steps are left to the checkpoint check."""
    if isinstance(reference, ReferenceLosses):
        tolerances = reference.tolerances(dtype, len(losses))
        covered = reference.trajectory_steps()
    else:
        tolerances = [LOSS_TOLERANCE[dtype]] * len(losses)
        covered = len(reference)
    if not losses:
        return ParityResult(False, math.inf, 0, tolerances[0] if tolerances else 0.0, 0,
                            "no losses to compare")
    if len(losses) > len(reference):
        return ParityResult(False, math.inf, 0, tolerances[0], 0,
                            f"{len(losses)} losses but only {len(reference)} reference steps")
    compared = min(len(losses), covered)
    diffs = [abs(loss - expected) if math.isfinite(loss) else math.inf
             for loss, expected in zip(losses[:compared], reference)]
    failing = [step for step, diff in enumerate(diffs) if not diff <= tolerances[step]]
    # A non-finite loss after the trajectory's steps is a failure too (it also stops the run).
    failing += [step for step in range(compared, len(losses)) if not math.isfinite(losses[step])]
    diffs += [math.inf if not math.isfinite(loss) else 0.0 for loss in losses[compared:]]
    # The worst step is the failing one that exceeds its own tolerance the most.
    candidates = failing or range(compared)
    worst_step = max(candidates, key=lambda step: diffs[step] / tolerances[step])
    worst, tolerance = diffs[worst_step], tolerances[worst_step]
    passed = not failing
    verdict = "matches" if passed else "DOES NOT MATCH"
    span = (f"over {compared} steps" if compared == len(losses) else
            f"over steps 1..{compared} of {len(losses)} (while numpy float32 stays within "
            f"{TRAJECTORY_DRIFT_LIMIT:g} of float64; later steps by checkpoints)")
    message = (f"{verdict} the float64 reference {span}: max |diff| "
               f"{max(diffs[:compared]):.3g}; worst against its tolerance at step "
               f"{worst_step + 1} (|diff| {worst:.3g}, tolerance {tolerance:.3g} for {dtype})")
    return ParityResult(passed, worst, worst_step + 1, tolerance, compared, message)


def parity_verdict(losses: list[float], reference: list[float], dtype: str,
                   checkpoints: dict | None) -> dict:
    """The run's parity block: the trajectory check and the checkpoint check
    (bench.checkpoints.CheckpointChecker.summary()), passed only when both pass. A run without
    checkpoints (a backend that cannot expose its moments) is vouched for only where the
    trajectory check reaches: it passes only if that covers every step."""
    trajectory = compare_losses(losses, reference, dtype)
    parity = trajectory.to_dict()
    parity["trajectory_steps"] = trajectory.steps_compared
    messages = [trajectory.message]
    passed = trajectory.passed
    if checkpoints is not None:
        parity["checkpoints"] = checkpoints
        messages.append(checkpoints["message"])
        passed = passed and checkpoints["passed"]
    elif trajectory.steps_compared < len(losses):
        messages.append(f"steps {trajectory.steps_compared + 1}..{len(losses)} unchecked: the "
                        f"backend does not expose its Adam moments for the checkpoint check")
        passed = False
    parity["passed"] = passed
    parity["message"] = "; ".join(messages)
    return parity


def _cache_key(spec: SpecInstance, steps: int, dataset_sha256: str) -> str:
    identity = json.dumps({"config": spec.config.to_dict(), "steps": steps,
                           "dataset": dataset_sha256, "version": REFERENCE_VERSION},
                          sort_keys=True)
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
