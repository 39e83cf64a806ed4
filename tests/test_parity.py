"""The parity check that gates every timing: tolerances per dtype, the float32 drift allowance,
and the cached float64 reference."""
import math

import pytest

from backends.contract import preset
from bench.parity import (FLOAT32_DRIFT_FACTOR, LOSS_TOLERANCE, TRAJECTORY_DRIFT_LIMIT,
                          ReferenceLosses, compare_losses, parity_verdict, reference_losses)
from backends.contract import build_spec


def test_float64_tolerance_is_tight():
    reference = [3.0, 2.5, 2.0]
    assert compare_losses([3.0, 2.5 + 5e-10, 2.0], reference, "float64").passed
    result = compare_losses([3.0, 2.5 + 5e-9, 2.0], reference, "float64")
    assert not result.passed and result.worst_step == 2
    assert "DOES NOT MATCH" in result.message


def test_non_finite_and_too_long_runs_fail():
    assert not compare_losses([3.0, math.nan], [3.0, 2.0], "float32").passed
    assert not compare_losses([3.0, 2.0, 1.0], [3.0, 2.0], "float32").passed
    assert not compare_losses([], [3.0], "float32").passed


def test_float32_allowance_follows_the_measured_drift():
    reference = ReferenceLosses([3.0, 2.0, 1.0], float32_drift=[0.0, 1e-3, 1e-2])
    limits = reference.tolerances("float32", 3)
    assert limits == pytest.approx([LOSS_TOLERANCE["float32"] + FLOAT32_DRIFT_FACTOR * d
                                    for d in (0.0, 1e-3, 1e-2)])
    assert compare_losses([3.0 + 5e-5, 2.005, 1.05], reference, "float32").passed
    # Early steps stay tight: a wrong first update is caught whatever happens later.
    assert not compare_losses([3.0 + 5e-4, 2.0, 1.0], reference, "float32").passed
    assert reference.tolerances("float64", 3) == [LOSS_TOLERANCE["float64"]] * 3


def test_reference_is_numpy_float64_and_cached(dataset, tmp_path):
    spec = build_spec(dataset.docs, preset("tiny"))  # first 30 of the 1,000-step schedule
    first = reference_losses(spec, 30, dataset.sha256, cache_dir=tmp_path)
    assert [f"{loss:.4f}" for loss in first[:3]] == ["3.3660", "3.4243", "3.1778"]
    assert len(list(tmp_path.iterdir())) == 1
    again = reference_losses(spec, 30, dataset.sha256, cache_dir=tmp_path)
    assert list(again) == list(first) and again.float32_drift == first.float32_drift
    # float32 drifts a little at tiny (so the allowance is real) and never shrinks.
    assert 0 < max(first.float32_drift) < 1e-5
    assert first.float32_drift == sorted(first.float32_drift)
    # nothing amplifies rounding in 30 steps of tiny: both dtypes' trajectories are whole
    assert again.windows == first.windows == {"float32": 30, "float64": 30}


def test_the_windows_end_where_rounding_is_amplified(dataset, tmp_path):
    """At `small` (200 steps) the float64 reference passes a ReLU gate within float32's
    resolution at step 61 (the one that separates numpy float32 from float64): the float32
    trajectory is checked over steps 1..60, float64's over all 200."""
    spec = build_spec(dataset.docs, preset("small", num_steps=200))
    reference = reference_losses(spec, 200, dataset.sha256, cache_dir=tmp_path)
    assert reference.windows == {"float32": 60, "float64": 200}
    assert reference.trajectory_steps("float32") == 60
    parted = list(reference[:60]) + [loss + 0.01 for loss in reference[60:]]
    assert compare_losses(parted, reference, "float32").passed
    assert not compare_losses(parted, reference, "float64").passed


def test_windows_are_per_dtype():
    reference = ReferenceLosses([2.5] * 5, float32_drift=[0] * 5,
                                windows={"float32": 2, "float64": 4})
    parted = [2.5, 2.5, 2.6, 2.6, 2.9]
    assert compare_losses(parted, reference, "float32").steps_compared == 2
    result = compare_losses(parted, reference, "float64")
    assert not result.passed and result.worst_step == 3
    assert ReferenceLosses.from_dict(reference.to_dict()).windows == reference.windows
    assert reference.first(3).windows == reference.windows


def test_the_trajectory_is_compared_while_float32_has_not_drifted():
    """Past the steps where numpy float32 stays within TRAJECTORY_DRIFT_LIMIT of float64, two
    correct trajectories may part: those steps are left to the checkpoint check, in both
    dtypes, and there is no statistical allowance anywhere."""
    limit = TRAJECTORY_DRIFT_LIMIT
    reference = ReferenceLosses([2.5] * 6, float32_drift=[0, limit / 2, limit, 2 * limit,
                                                          0.1, 0.1])
    assert reference.trajectory_steps() == 3
    parted = [2.5, 2.5, 2.5, 2.6, 2.4, 2.7]
    for dtype in ("float32", "float64"):
        result = compare_losses(parted, reference, dtype)
        assert result.passed and result.steps_compared == 3
        assert "over steps 1..3 of 6" in result.message
    # inside those steps the tolerance is strict; a non-finite loss anywhere fails
    assert not compare_losses([2.5, 2.5, 2.5 + 1e-8] + parted[3:], reference, "float64").passed
    assert not compare_losses(parted[:5] + [math.inf], reference, "float32").passed
    # with no drift measured (a plain list) every step is compared
    assert not compare_losses(parted, [2.5] * 6, "float32").passed


def test_the_verdict_needs_the_checkpoints_past_the_trajectory():
    reference = ReferenceLosses([2.5] * 4, float32_drift=[0, 0, 1.0, 1.0])
    losses = [2.5, 2.5, 2.9, 2.1]
    unchecked = parity_verdict(losses, reference, "float32", None)
    assert not unchecked["passed"] and "steps 3..4 unchecked" in unchecked["message"]
    passing = {"passed": True, "message": "4 checkpoint steps match"}
    verdict = parity_verdict(losses, reference, "float32", passing)
    assert verdict["passed"] and verdict["trajectory_steps"] == 2
    failing = {"passed": False, "message": "checkpoint step 4 DOES NOT MATCH"}
    verdict = parity_verdict(losses, reference, "float32", failing)
    assert not verdict["passed"] and "checkpoint step 4" in verdict["message"]
    # a backend without moments is vouched for where the trajectory covers every step
    assert parity_verdict(losses[:2], [2.5, 2.5], "float32", None)["passed"]
