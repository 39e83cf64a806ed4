"""The parity check that gates every timing: tolerances per dtype, the float32 drift allowance,
and the cached float64 reference."""
import math

import pytest

from backends.contract import preset
from bench.parity import (FLOAT32_DRIFT_FACTOR, FLOAT32_STRICT_STEPS, LOSS_TOLERANCE,
                          ReferenceLosses,
                          compare_losses, reference_losses)
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


def test_chaotic_float32_steps_pass_by_their_trailing_mean():
    steps = FLOAT32_STRICT_STEPS + 60
    reference = ReferenceLosses([2.5] * steps, float32_drift=[0.0] * steps)
    # Late per-step noise of +-0.01 around the same level: the model trains the same.
    noisy = [2.5] * FLOAT32_STRICT_STEPS + [2.5 + (0.01 if i % 2 else -0.01) for i in range(60)]
    result = compare_losses(noisy, reference, "float32")
    assert result.passed and "chaotic float32 steps" in result.message
    # The same noise inside the strict steps fails; so does a late level shift of 3%.
    early = [2.5 + 0.01] + [2.5] * (steps - 1)
    assert not compare_losses(early, reference, "float32").passed
    shifted = [2.5] * FLOAT32_STRICT_STEPS + [2.5 * 1.03] * 60
    assert not compare_losses(shifted, reference, "float32").passed
    assert not compare_losses(noisy, reference, "float64").passed  # float64 stays strict
