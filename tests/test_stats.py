"""bench.stats: descriptive statistics, the pure-Python tests (against hand-computed values and
scipy), and the per-configuration summaries with their instability warnings.

Also holds the builders of synthetic result documents that test_compare and test_report use:
documents that follow the result-file schema, with per-step times drawn around a chosen median.
"""
from __future__ import annotations

import copy
import json
import math
import random

import pytest

from bench import results, stats
from backends.contract import preset
from bench.record import Status
from bench.stats import step_statistics

FINGERPRINT = "0123456789abcdef"


# ---- synthetic result documents ------------------------------------------------------------
def synthetic_run(backend="numpy", dtype="float32", ms=1.0, repeat=0, steps=60, seed=0,
                  config=None, status="ok", noise=0.02, losses=None) -> dict:
    """A run record as the worker writes it: per-step times around `ms` (relative noise
    `noise`), the statistics the worker computes from them, losses, sampling."""
    rng = random.Random(f"{backend}-{dtype}-{repeat}-{seed}")
    step_seconds = [ms * 1e-3 * (1 + noise * rng.gauss(0, 1)) for _ in range(steps)]
    config = config or preset("tiny", num_steps=steps).to_dict()
    losses = losses or [3.3 - 1.0 * step / steps + 0.01 * rng.gauss(0, 1)
                        for step in range(steps)]
    run = {"backend": backend, "dtype": dtype, "device": "cpu", "steps": steps,
           "config": config, "status": status, "repeat": repeat,
           "setup": {"import_s": 0.1, "compile_s": 0.0},
           "train": {"losses": losses, "step_seconds": step_seconds,
                     "steps_completed": steps, **step_statistics(step_seconds)},
           "infer": {"samples": ["ana"], "tokens": 100, "total_s": 0.01 * ms,
                     "tokens_per_s": 100 / (0.01 * ms)},
           "framework_versions": {"numpy": "2.0"}, "wall_s": 1.0 + steps * ms * 1e-3,
           "parity": {"passed": status != "parity-failed", "max_abs_diff": 0.0}}
    if status != "ok":
        run["error"] = f"synthetic {status}"
    return run


def synthetic_document(configurations=(("numpy", "float32", 1.0),), repeats=5, seed=0,
                       fingerprint=FINGERPRINT, scale=1.0, **run_options) -> dict:
    document = results.new_document({"machine_fingerprint": fingerprint,
                                     "cpu": {"model": "Test CPU", "usable_cores": 2},
                                     "os": {"platform": "TestOS"},
                                     "python": {"version": "3.11"},
                                     "git": {"commit": "abc", "dirty": False},
                                     "thread_settings": {}}, ["bench.py", "synthetic"])
    for repeat in range(repeats):
        for backend, dtype, ms in configurations:
            document["runs"].append(synthetic_run(backend, dtype, ms * scale, repeat,
                                                  seed=seed, **run_options))
    document["complete"] = True
    return document


# ---- descriptive ---------------------------------------------------------------------------
def test_describe_known_values():
    summary = stats.describe([10, 1, 4, 3, 2])
    assert summary["n"] == 5 and summary["median"] == 3 and summary["mean"] == 4
    assert (summary["q1"], summary["q3"], summary["iqr"]) == (2, 4, 2)
    assert (summary["min"], summary["max"]) == (1, 10)
    assert summary["std"] == pytest.approx(math.sqrt(12.5))
    # t(0.975, 4) = 2.7764451052; half width = 2.7764451052 * sqrt(12.5) / sqrt(5)
    half_width = 2.7764451052 * math.sqrt(12.5) / math.sqrt(5)
    assert summary["ci_low"] == pytest.approx(4 - half_width, rel=1e-9)
    assert summary["ci_high"] == pytest.approx(4 + half_width, rel=1e-9)
    single = stats.describe([2.5])
    assert single["median"] == 2.5 and single["std"] is None and single["ci_low"] is None
    assert stats.describe([]) == {"n": 0}


def test_quartiles_stay_inside_the_data_for_few_values():
    # statistics.quantiles' default method extrapolates below the minimum for two values.
    summary = stats.describe([1.0, 2.0])
    assert 1.0 <= summary["q1"] <= summary["q3"] <= 2.0


def test_step_statistics_are_describe_of_the_steps_after_the_first():
    # The first step (5 ms) is reported apart; the others are describe([10, 1, 4, 3, 2]) in ms.
    figures = step_statistics([0.005, 0.010, 0.001, 0.004, 0.003, 0.002])
    assert figures["first_step_ms"] == pytest.approx(5.0)
    assert figures["total_s"] == pytest.approx(0.025)
    assert (figures["ms_per_step_median"], figures["ms_per_step_mean"]) == pytest.approx((3, 4))
    assert (figures["ms_per_step_q1"], figures["ms_per_step_q3"],
            figures["ms_per_step_iqr"]) == pytest.approx((2, 4, 2))
    assert figures["ms_per_step_stdev"] == pytest.approx(math.sqrt(12.5))
    assert step_statistics([0.001])["ms_per_step_stdev"] == 0.0
    assert step_statistics([]) == {}


def test_status_is_its_value_in_result_files_and_text():
    assert json.dumps({"status": Status.DIFFERENT_INIT}) == '{"status": "different init"}'
    assert f"{Status.OUT_OF_MEMORY}" == str(Status.OUT_OF_MEMORY) == "out-of-memory"
    assert Status.OK == "ok" and "parity-failed" in (Status.PARITY_FAILED,)


def test_special_functions_known_values():
    # I_0.4(2, 3) = sum_{j=2..4} C(4, j) 0.4^j 0.6^(4-j) = 0.5248
    assert stats.regularized_incomplete_beta(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-14)
    assert stats.regularized_incomplete_beta(0.5, 0.5, 0.5) == pytest.approx(0.5, abs=1e-14)
    assert stats.t_quantile(0.975, 10) == pytest.approx(2.228138851986, abs=1e-10)
    assert stats.t_quantile(0.975, 1) == pytest.approx(12.7062047362, abs=1e-8)
    assert stats.t_quantile(0.025, 10) == pytest.approx(-2.228138851986, abs=1e-10)
    assert stats.t_sf(0.0, 7) == pytest.approx(0.5)
    # Large df approaches the normal distribution.
    assert stats.t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)


def test_mann_whitney_exact_small_example():
    # Complete separation of 3 and 3: one arrangement of 20 at each extreme, two-sided 0.1.
    result = stats.mann_whitney_u([1, 2, 3], [4, 5, 6])
    assert result.statistic == 0 and result.p_value == pytest.approx(0.1)
    assert "exact" in result["method"]
    assert stats.mann_whitney_u([4, 5, 6], [1, 2, 3]).statistic == 9


def test_welch_known_values():
    # Means 2 and 5, variances 1 and 1, n 3 and 3: t = -3 / sqrt(2/3), df = 4.
    result = stats.welch_t_test([1, 2, 3], [4, 5, 6])
    assert result.statistic == pytest.approx(-3 / math.sqrt(2 / 3))
    assert result["df"] == pytest.approx(4)
    assert result["ci_low"] < -3 < result["ci_high"] < 0
    no_spread = stats.welch_t_test([1, 1, 1], [1, 1, 1])
    assert no_spread.p_value == 1.0


def _samples(seed, ties):
    rng = random.Random(seed)
    x = [rng.gauss(0, 1) for _ in range(rng.randint(3, 30))]
    y = [rng.gauss(0.4, 1.5) for _ in range(rng.randint(3, 30))]
    if ties:
        x, y = [round(v, 0) for v in x], [round(v, 0) for v in y]
    return x, y


@pytest.mark.parametrize("seed", range(20))
def test_against_scipy(seed):
    scipy_stats = pytest.importorskip("scipy.stats")
    x, y = _samples(seed, ties=seed % 2 == 0)
    ours = stats.mann_whitney_u(x, y, exact_max_n=0)
    theirs = scipy_stats.mannwhitneyu(x, y, alternative="two-sided", method="asymptotic")
    assert ours.statistic == pytest.approx(theirs.statistic, abs=1e-9)
    assert ours.p_value == pytest.approx(theirs.pvalue, rel=1e-9, abs=1e-14)
    ours = stats.welch_t_test(x, y)
    theirs = scipy_stats.ttest_ind(x, y, equal_var=False)
    assert ours.statistic == pytest.approx(theirs.statistic, rel=1e-9)
    assert ours.p_value == pytest.approx(theirs.pvalue, rel=1e-9, abs=1e-14)
    interval = theirs.confidence_interval(0.95)
    assert ours["ci_low"] == pytest.approx(interval.low, rel=1e-8)
    assert ours["ci_high"] == pytest.approx(interval.high, rel=1e-8)


@pytest.mark.parametrize("sizes", [(3, 3), (4, 7), (8, 8), (2, 6)])
def test_exact_mann_whitney_against_scipy(sizes):
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = random.Random(sum(sizes))
    for _ in range(10):
        x = [rng.random() for _ in range(sizes[0])]
        y = [rng.random() + 0.3 for _ in range(sizes[1])]
        ours = stats.mann_whitney_u(x, y)
        theirs = scipy_stats.mannwhitneyu(x, y, alternative="two-sided", method="exact")
        assert "exact" in ours["method"]
        assert ours.p_value == pytest.approx(theirs.pvalue, rel=1e-12)


def test_t_quantile_against_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3.7, 9, 30, 250):
        for probability in (0.6, 0.9, 0.975, 0.995):
            assert stats.t_quantile(probability, df) == pytest.approx(
                scipy_stats.t.ppf(probability, df), rel=1e-9)


# ---- summaries -----------------------------------------------------------------------------
def test_summary_over_repeats():
    document = synthetic_document([("numpy", "float32", 1.0), ("python", "float64", 20.0)])
    rows = {row["backend"]: row for row in stats.summarize_runs(document["runs"])}
    numpy_row = rows["numpy"]
    medians = [run["train"]["ms_per_step_median"] for run in document["runs"]
               if run["backend"] == "numpy"]
    assert numpy_row["n"] == 5 and numpy_row["status"] == "ok"
    assert numpy_row["ms_per_step_median"] == pytest.approx(sorted(medians)[2])
    repeats = numpy_row["repeats"]["ms_per_step"]
    assert repeats["n"] == 5 and repeats["ci_low"] < repeats["mean"] < repeats["ci_high"]
    assert numpy_row["ms_per_step_ci_low"] == repeats["ci_low"]
    assert numpy_row["repeats"]["total_s"]["n"] == 5
    assert numpy_row["warnings"] == []  # 2% step noise: the medians agree within 1%
    assert rows["python"]["speedup_vs_numpy"] == pytest.approx(
        numpy_row["ms_per_step_median"] / rows["python"]["ms_per_step_median"])
    assert numpy_row["config"] == "tiny"


def test_unstable_and_slow_first_run_warnings():
    runs = [synthetic_run(ms=ms, repeat=repeat) for repeat, ms in enumerate(
        [2.0, 1.0, 1.3, 0.8, 1.1])]
    warnings = stats.summarize_runs(runs)[0]["warnings"]
    assert any("unstable" in warning and "--repeat" in warning for warning in warnings)
    assert any(warning.startswith("first run") and "--warmup" in warning
               for warning in warnings)
    # Fewer than two runs: nothing to warn about, but a note asks for repeats.
    rows = stats.summarize_runs(runs[:1])
    assert rows[0]["warnings"] == []
    assert any("--repeat" in note for note in stats.summary_notes(rows))


def test_failed_repeat_counts_against_its_configuration():
    runs = [synthetic_run(repeat=0), synthetic_run(repeat=1)]
    crashed = synthetic_run(repeat=2, status="crashed")
    crashed["device"] = None  # a run that died before the backend chose its device
    rows = stats.summarize_runs(runs + [crashed])
    assert len(rows) == 1 and rows[0]["n"] == 2 and rows[0]["status"] == "ok (1 failed)"


def test_external_programs_are_timed_rows():
    runs = [synthetic_run("microgpt.py", "unknown", ms=30.0, repeat=repeat,
                          status="different init") for repeat in range(3)]
    row = stats.summarize_runs(runs)[0]
    assert row["status"] == "different init" and row["n"] == 3
    assert row["ms_per_step_median"] == pytest.approx(30.0, rel=0.05)


def test_configs_are_summarised_apart():
    small = preset("small", num_steps=60).to_dict()
    runs = [synthetic_run(ms=1.0), synthetic_run(ms=5.0, config=small),
            synthetic_run("python", "float64", ms=50.0, config=small)]
    rows = stats.summarize_runs(runs)
    assert [row["config"] for row in rows] == ["tiny", "small", "small"]
    # Speed-ups are within one config: numpy is the slowest (1.0x) of tiny.
    assert rows[0]["speedup_vs_slowest"] == 1.0
    assert rows[1]["speedup_vs_slowest"] == pytest.approx(10.0, rel=0.1)
    assert stats.config_label(preset("medium", batch_size=8).to_dict()) == "medium b8"
    assert stats.config_label({**small, "n_embd": 24, "n_head": 3}) == "L2-d24-h3-T32"


def test_markdown_shows_ci_and_warnings():
    document = synthetic_document(repeats=3)
    text = results.markdown_report(copy.deepcopy(document))
    assert "95% CI" in text
    row_line = next(line for line in text.splitlines() if line.startswith("| numpy"))
    low, high = row_line.split(" | ")[6].split("..")
    assert float(low) < float(row_line.split(" | ")[5]) < float(high)
