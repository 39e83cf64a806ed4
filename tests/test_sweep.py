"""`bench.py sweep`: the cost model, the planning (the complete sweep when the budget allows;
runs projected past the budget or --run-limit are skipped and listed, with a fake runner and
clock so the test is exact and fast), and one small real sweep that writes its result file,
tables and charts."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import results, sweep
from bench.command import ExitCode
from backends.contract import preset

REPO = Path(__file__).resolve().parents[1]
VOCAB = 27


def test_points_cheapest_first_and_flops_grow_with_the_model():
    points = sweep.sweep_points(["large", "tiny", "small"], [8, 1], 10, VOCAB)
    flops = [point.train_flops for point in points]
    assert flops == sorted(flops)
    assert points[0].label == "tiny" and points[-1].label == "large b8"
    tiny = next(point for point in points if point.label == "tiny")
    assert tiny.parameters == 4192  # the spec's parameter count
    tiny_b8 = next(point for point in points if point.label == "tiny b8")
    assert tiny_b8.train_flops == pytest.approx(8 * tiny.train_flops)
    assert tiny_b8.sample_flops == tiny.sample_flops  # sampling is one token at a time


def test_projection_scales_work_but_not_setup():
    points = {point.label: point for point in sweep.sweep_points(["tiny", "small"], [1], 100,
                                                                 VOCAB)}
    measured = {"wall_s": 3.0, "train": {"total_s": 1.0}, "infer": {"total_s": 0.5}}
    projected = sweep.project_seconds(measured, points["tiny"], points["small"])
    train_ratio = points["small"].train_flops / points["tiny"].train_flops
    sample_ratio = points["small"].sample_flops / points["tiny"].sample_flops
    assert projected == pytest.approx(1.5 + 1.0 * train_ratio + 0.5 * sample_ratio)


class FakeMachine:
    """A runner whose runs cost `setup + flops * seconds_per_flop` seconds of a fake clock."""

    def __init__(self, seconds_per_flop: float, setup_s: float = 1.0,
                 slowdown: dict[str, float] | None = None):
        self.now = 0.0
        self.seconds_per_flop = seconds_per_flop
        self.setup_s = setup_s
        self.slowdown = slowdown or {}  # backend -> factor on its training time
        self.requests = []

    def clock(self) -> float:
        return self.now

    def run(self, request, reference):
        self.requests.append(request)
        flops = sweep.train_flops_per_step(request.config, VOCAB) * request.steps
        train_s = flops * self.seconds_per_flop * self.slowdown.get(request.backend, 1.0)
        wall_s = self.setup_s + train_s
        if wall_s > request.timeout_s:
            self.now += request.timeout_s
            return {"backend": request.backend, "dtype": request.dtype, "status": "timeout",
                    "error": "killed"}
        self.now += wall_s
        return {"backend": request.backend, "dtype": request.dtype, "device": "cpu",
                "config": request.config.to_dict(), "steps": request.steps, "status": "ok",
                "wall_s": wall_s, "train": {"total_s": train_s, "losses": [1.0],
                                            "ms_per_step_median": 1e3 * train_s / request.steps},
                "infer": {"total_s": 0.0}}


def test_budget_skips_runs_projected_past_it():
    points = sweep.sweep_points(["tiny", "small", "medium", "large"], [1, 8], 10, VOCAB)
    tiny_flops = points[0].train_flops * 10
    # tiny costs 1 s setup + 0.1 s; medium and large would blow a 30 s budget.
    machine = FakeMachine(seconds_per_flop=0.1 / tiny_flops)
    settings = sweep.SweepSettings(pairs=[("numpy", "float32"), ("python", "float64")],
                                   points=points, budget_s=30.0)
    document = {"runs": [], "sweep": {"skipped": []}}
    references = []
    sweep.run_sweep(settings, document, save=lambda doc: None,
                    reference_for=lambda point: references.append(point.label) or [],
                    runner=machine.run, clock=machine.clock, log=lambda line: None)
    ran = [(run["backend"], run["sweep"]["label"]) for run in document["runs"]]
    skipped = [(item["backend"], item["preset"], item["batch_size"])
               for item in document["sweep"]["skipped"]]
    assert ("numpy", "tiny") in ran and ("python", "tiny") in ran
    # python does not support batches: it is never planned at batch 8.
    assert not any(backend == "python" and "b8" in label for backend, label in ran)
    assert not any(backend == "python" and batch == 8 for backend, _, batch in skipped)
    assert ("numpy", "large", 8) in skipped
    for item in document["sweep"]["skipped"]:
        assert item["projected_s"] is None or item["projected_s"] > 0
        assert "projected" in item["reason"] or "budget" in item["reason"]
    assert machine.now <= 30.0 + 1e-9  # nothing ran past the budget
    assert document["complete"] and document["sweep"]["elapsed_s"] == machine.now
    # Every run was projected from the same backend's previous run, except its first.
    projections = [run["sweep"]["projected_s"] for run in document["runs"]]
    assert projections[0] is None and all(value for value in projections[2:])


def _sweep(pairs, points, budget_s, machine, run_limit_s=None):
    settings = sweep.SweepSettings(pairs=pairs, points=points, budget_s=budget_s,
                                   run_limit_s=run_limit_s)
    document = {"runs": [], "sweep": {"skipped": []}}
    sweep.run_sweep(settings, document, save=lambda doc: None, reference_for=lambda point: [],
                    runner=machine.run, clock=machine.clock, log=lambda line: None)
    ran = {(run["backend"], run["sweep"]["label"]) for run in document["runs"]}
    return ran, document["sweep"]["skipped"]


def test_nothing_skipped_when_the_budget_allows():
    """The complete sweep: every preset at every batch size for every backend that batches,
    batch 1 for one that does not, when the budget covers it all."""
    points = sweep.sweep_points(list(sweep.PRESETS), [1, 8, 32], 200, VOCAB)
    machine = FakeMachine(seconds_per_flop=1e-9)
    pairs = [("numpy", "float32"), ("torch", "float32"), ("python", "float64")]
    ran, skipped = _sweep(pairs, points, 1e7, machine)
    assert skipped == []
    expected = {(backend, point.label) for backend, _ in pairs for point in points
                if backend != "python" or point.batch_size == 1}
    assert ran == expected and len(ran) == 2 * 12 + 4


def test_run_limit_skips_only_the_rows_past_it():
    """--run-limit takes a slow backend only as far as its runs stay short, with its own
    reason, and leaves the other backends' complete sweep alone, however long their runs."""
    points = sweep.sweep_points(list(sweep.PRESETS), [1, 8], 200, VOCAB)
    tiny_s = points[0].train_flops * 200 * 1e-9  # numpy: 740 s at large b8
    machine = FakeMachine(seconds_per_flop=1e-9, slowdown={"python": 30 / tiny_s})
    ran, skipped = _sweep([("numpy", "float32"), ("python", "float64")], points, 1e7,
                          machine, run_limit_s=60)
    assert ("python", "tiny") in ran and ("python", "small") not in ran
    assert {item["backend"] for item in skipped} == {"python"}
    assert all("--run-limit 60 s" in item["reason"] for item in skipped)
    assert {label for backend, label in ran if backend == "numpy"} == {
        point.label for point in points}


def test_real_sweep_writes_results_and_chart(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "sweep.json"
    completed = subprocess.run(
        [sys.executable, "bench.py", "sweep", "--backend", "numpy", "--presets", "tiny,small",
         "--batch-sizes", "1,8", "--steps", "4", "--warmup", "0", "--samples", "1",
         "--budget", "120", "--json", str(path), "--dtype", "float64", "--threads", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    document = results.load(path)
    labels = sorted(run["sweep"]["label"] for run in document["runs"])
    assert labels == ["small", "small b8", "tiny", "tiny b8"]
    assert all(run["status"] == "ok" for run in document["runs"])
    assert document["sweep"]["steps"] == 4 and document["sweep"]["skipped"] == []
    assert document["threads"]["environment"]["OMP_NUM_THREADS"] == "1"
    peak = document["environment"]["peak"]["gflops"]
    assert peak is not None and peak > 0  # "% of peak" needs it (a sweep once lacked it)
    markdown = path.with_suffix(".md").read_text()
    for table in ("median ms per training step", "compile s", "achieved GFLOP/s"):
        assert f"## Sweep: {table}" in markdown
    assert "(-%)" not in markdown
    for suffix in ("scaling", "compile", "gflops"):
        chart = path.with_name(f"sweep-{suffix}.png")
        assert chart.read_bytes().startswith(b"\x89PNG") and chart.stat().st_size > 10_000


def test_usage_errors_exit_2(capsys):
    assert sweep.main(["--presets", "huge"]) == ExitCode.USAGE
    assert sweep.main(["--budget", "0"]) == ExitCode.USAGE
    assert sweep.main(["--run-limit", "-1"]) == ExitCode.USAGE
    assert sweep.main(["--threads", "0"]) == ExitCode.USAGE
    assert sweep.main(["--backend", "nope"]) == ExitCode.USAGE
    errors = capsys.readouterr().err
    assert "unknown preset 'huge'" in errors and "Traceback" not in errors


def test_config_of_a_point_keeps_the_preset():
    point = sweep.sweep_points(["medium"], [32], 7, VOCAB)[0]
    assert point.config == preset("medium", num_steps=7, batch_size=32)
