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
# numpy float32 is one witness of float32 rounding, and a lucky one can stay close for long:
# at `small` batch 32 it stays within 1e-5 for 190 steps while mlx-tuned (correct at every
# checkpoint) parts by 1e-4 at step 97. So the float32 window also ends where the float64
# reference passes a ReLU gate closer to zero than float32 resolves (relative margin
# |h| / (|W| |x|) below this; 6e-8 rounding over up to 128-term products, and the state a
# float32 run has already drifted by): the gate at step 61 of `small` that separates numpy
# float32 from float64 had a margin of 1e-8. Measured first steps below 1e-6: tiny 425 (of
# 1,000), small 61, small b32 32, large 3.
FLOAT32_GATE_MARGIN = 1e-6
# float64's window: while a float64 witness moved by one ulp at every step (every weight times
# 1 +- 2^-52, as another summation order moves it) stays within this of the reference. Real
# float64 backends start further off than one ulp (mojo-tape's first loss is 1.9e-13 from
# numpy's, its libm and sums differ) and are amplified alike (x1000 over 200 steps of `medium`,
# to 1.7e-9, where the witness reached 4e-13), so the limit leaves 1e-9 / 1e-13 of headroom.
# At `large`, torch and numpy in float64 part by more than 1e-9 from step 8.
FLOAT64_DRIFT_LIMIT = 1e-13

REFERENCE_CACHE_DIR = REPO_ROOT / "data" / "cache" / "reference"
# Part of the cache key: bump when the reference computation changes (2: numpy's float32 loss
# through log-softmax, finite at `large`; 3, 4: the trajectory windows).
REFERENCE_VERSION = 4


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
    |numpy float32 - numpy float64| per step (what float32 rounding alone does at this config),
    and `windows`: per dtype, how many leading steps the trajectory check covers (computed with
    the reference, `reference_losses`; without them, the float32 drift's rule for both)."""

    def __init__(self, losses, float32_drift, windows: dict[str, int] | None = None):
        super().__init__(losses)
        self.float32_drift = list(float32_drift)
        self.windows = dict(windows) if windows else None

    def to_dict(self) -> dict:
        return {"losses": list(self), "float32_drift": self.float32_drift,
                "windows": self.windows}

    @classmethod
    def from_dict(cls, data: dict) -> "ReferenceLosses":
        return cls(data["losses"], data["float32_drift"], data.get("windows"))

    def first(self, steps: int) -> "ReferenceLosses":
        """The reference of the first `steps` steps of this run (same schedule)."""
        return ReferenceLosses(self[:steps], self.float32_drift[:steps], self.windows)

    def tolerances(self, dtype: str, steps: int) -> list[float]:
        if dtype == "float32":
            return [LOSS_TOLERANCE["float32"] + FLOAT32_DRIFT_FACTOR * drift
                    for drift in self.float32_drift[:steps]]
        return [LOSS_TOLERANCE[dtype]] * steps

    def trajectory_steps(self, dtype: str = "float32") -> int:
        """How many leading steps the trajectory check covers for `dtype` (at least one)."""
        if self.windows and dtype in self.windows:
            return max(1, min(self.windows[dtype], len(self)))
        return _leading_steps(drift > TRAJECTORY_DRIFT_LIMIT for drift in self.float32_drift)


def _leading_steps(past_window) -> int:
    """The steps before the first one for which `past_window` is true (at least one)."""
    count = 0
    for count, past in enumerate(past_window):
        if past:
            return max(1, count)
    else:
        return count + 1


def compare_losses(losses: list[float], reference: list[float], dtype: str) -> ParityResult:
    """Check the losses against the reference at every step of the trajectory check: all steps
    for a plain list, the leading `trajectory_steps()` of a ReferenceLosses (with float32's
    per-step drift allowance). Later steps are left to the checkpoint check."""
    if isinstance(reference, ReferenceLosses):
        tolerances = reference.tolerances(dtype, len(losses))
        covered = reference.trajectory_steps(dtype)
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
            f"over steps 1..{compared} of {len(losses)} (while rounding has not been "
            f"amplified; later steps by checkpoints)")
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


def _numpy_run(spec: SpecInstance, steps: int, dtype: str, margins: list | None = None,
               jitter: bool = False) -> list[float]:
    """numpy's losses, stopping at a non-finite loss as a run does; with `margins`, each
    step's smallest relative ReLU margin is appended to it, taken before the step. `jitter`:
    the float64 witness, every weight moved by one ulp (times 1 +- 2^-52, fixed pseudo-random
    signs) before every step, as another implementation's summation order moves it."""
    import numpy as np
    from backends import create_backend
    from backends.contract import adam_step
    from bench.training import prepare_batches
    backend = create_backend("numpy", spec.config, spec.tokenizer.vocab_size, dtype)
    backend.load_parameters(spec.parameters)
    rng = np.random.default_rng(0)
    losses = []
    for step, batch in enumerate(prepare_batches(spec, steps)):
        if margins is not None:
            margins.append(backend.relu_margin(batch))
        if jitter:  # numpy's one flat parameter buffer (NumpyBackend.flat)
            backend.flat *= 1 + rng.choice([-1.0, 1.0], size=backend.flat.shape) * 2.0 ** -52
        losses.append(backend.train_step(batch, adam_step(spec.config, step)))
        if not math.isfinite(losses[-1]):
            break
    return losses


def _running_drift(losses: list[float], reference: list[float]) -> list[float]:
    """The running maximum of |losses - reference|, carried past a run that stopped early
    (inf) at its last finite value."""
    drift, worst = [], 0.0
    for loss, expected in zip(losses, reference):
        difference = abs(loss - expected)
        worst = max(worst, difference) if math.isfinite(difference) else worst
        drift.append(worst)
    return drift + [worst] * (len(reference) - len(drift))


def reference_losses(spec: SpecInstance, steps: int, dataset_sha256: str,
                     cache_dir: Path = REFERENCE_CACHE_DIR) -> ReferenceLosses:
    """The numpy float64 losses of `steps` steps at the spec's config, with the float32 drift
    and the trajectory windows (cached per config, steps and dataset): three numpy runs, the
    reference (with its ReLU margins), numpy float32 and a float64 witness moved by one ulp
    at every step."""
    path = cache_dir / f"{_cache_key(spec, steps, dataset_sha256)}.json"
    if path.is_file():
        try:
            return ReferenceLosses.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            pass  # a damaged or older cache entry is recomputed below
    margins: list[float] = []
    losses = _numpy_run(spec, steps, "float64", margins=margins)
    float32_drift = _running_drift(_numpy_run(spec, steps, "float32"), losses)
    float64_drift = _running_drift(_numpy_run(spec, steps, "float64", jitter=True), losses)
    windows = {
        "float32": _leading_steps(drift > TRAJECTORY_DRIFT_LIMIT or margin < FLOAT32_GATE_MARGIN
                                  for drift, margin in zip(float32_drift, margins)),
        "float64": _leading_steps(drift > FLOAT64_DRIFT_LIMIT for drift in float64_drift),
    }
    reference = ReferenceLosses(losses, float32_drift, windows)
    write_atomically(path, json.dumps({"config": spec.config.to_dict(), "steps": steps,
                                       **reference.to_dict()}))
    return reference
