"""Divisions, tunings and what the suite records about each row: the registry's declarations in
--list, the result file and the tables; what tuning bought; compare never pairs two
implementations of one name; listing and planning import no framework; --threads; the
harness floor, the machine's peak, FLOPs and the phases of a run."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from backends import REGISTRY
from backends.contract import preset, training_flops
from bench import cli, compare, report, results
from bench.limits import harness_floor_ms
from tests.test_stats import synthetic_document

REPO = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("torch", "jax", "jaxlib", "mlx", "max", "mojo", "optax")


def test_listing_and_planning_import_no_framework():
    """The registry's promise: --list and planning a run read declarations only."""
    program = (
        "import sys\n"
        "from bench.cli import main\n"
        "from bench.planning import plan_runs, select_backends\n"
        "main(['--list'])\n"
        "plan_runs(select_backends([], include_slow=True), ['float32', 'float64', 'default'])\n"
        f"print('LOADED', sorted(name for name in {FRAMEWORKS!r} if name in sys.modules))\n")
    completed = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True,
                               text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip().splitlines()[-1] == "LOADED []"
    for name, info in REGISTRY.items():  # and the list says which division each row is in
        assert name in completed.stdout
    assert "idiomatic" in completed.stdout and "tuned" in completed.stdout
    assert "private torch._fused_adam_" in completed.stdout  # a tuned row's tunings


def test_every_tuned_row_names_an_idiomatic_baseline_of_its_framework():
    for info in REGISTRY.values():
        if info.division == "tuned":
            assert REGISTRY[info.baseline].division == "idiomatic", info.name


def division_document(configurations, **options):
    """A synthetic document whose runs carry the division fields the worker records."""
    document = synthetic_document(configurations, repeats=3, **options)
    for run in document["runs"]:
        info = REGISTRY[run["backend"]]
        run.update(division=info.division, implementation=info.target,
                   tunings=list(info.tunings))
    return document


def test_the_tables_show_divisions_and_what_tuning_bought():
    document = division_document((("torch", "float32", 1.2), ("torch-tuned", "float32", 0.3)))
    markdown = results.markdown_report(copy.deepcopy(document))
    assert "| torch | idiomatic |" in markdown and "| torch-tuned | tuned |" in markdown
    assert "## What tuning buys" in markdown
    line = next(line for line in markdown.splitlines() if line.startswith("| torch float32"))
    assert "4.00x faster" in line and "hand-derived backward" in line
    (pair,) = results.tuning_rows(results.summarize_runs(document["runs"]))
    assert pair["speedup"] == pytest.approx(4.0, rel=0.05)


def test_ratios_read_right_at_any_size():
    assert results.ratio_text(1724.0) == "1,724.0x faster"
    assert results.ratio_text(1 / 1724) == "1,724.0x slower"
    assert results.ratio_text(1.5) == "1.50x faster"


def write(tmp_path, name, document) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(document))
    return str(path)


def test_compare_never_pairs_an_old_tuned_row_with_a_new_idiomatic_one(tmp_path, capsys):
    """A version 1 file's `torch` ran today's torch-tuned code: its row is not today's torch."""
    old = synthetic_document((("torch", "float32", 0.3), ("numpy", "float32", 0.2)), repeats=3)
    old["schema_version"] = 1
    new = division_document((("torch", "float32", 1.2), ("numpy", "float32", 0.2)))
    code = compare.main([write(tmp_path, "old.json", old), write(tmp_path, "new.json", new)])
    output = capsys.readouterr()
    text = " ".join((output.out + output.err).split())  # the terminal wraps lines
    assert code == 0  # numpy is compared (same implementation, inferred for the old file)
    assert "torch float32: not compared" in text
    assert "backends.torch_tuned:TorchTunedBackend (tuned division)" in text
    only_torch = [run for run in new["runs"] if run["backend"] == "torch"]
    old_torch = [run for run in old["runs"] if run["backend"] == "torch"]
    code = compare.main([write(tmp_path, "o.json", {**old, "runs": old_torch}),
                         write(tmp_path, "n.json", {**new, "runs": only_torch})])
    assert code == 2 and "implementation must match" in " ".join(capsys.readouterr().err.split())


def test_a_version_1_file_is_read_with_the_implementations_of_its_day(tmp_path):
    old = synthetic_document((("jax", "float32", 0.2), ("numpy", "float32", 0.2)), repeats=1)
    old["schema_version"] = 1
    document = results.load(write(tmp_path, "old.json", old))
    by_name = {run["backend"]: run for run in document["runs"]}
    assert by_name["jax"]["implementation"] == "backends.jax_tuned:JaxTunedBackend"
    assert by_name["jax"]["division"] == "tuned"
    assert by_name["numpy"]["implementation"] == REGISTRY["numpy"].target
    assert document["schema_version"] == results.SCHEMA_VERSION


def test_threads_apply_to_every_row_alike():
    assert cli.threads_environment(None) == {}
    one = cli.threads_environment(1)
    assert one["OMP_NUM_THREADS"] == one["MKL_NUM_THREADS"] == "1"
    assert "--xla_cpu_multi_thread_eigen=false" in one["XLA_FLAGS"]
    assert "XLA_FLAGS" not in cli.threads_environment(2)


def test_a_run_records_its_division_flops_and_the_machine_limits(tmp_path):
    path = tmp_path / "run.json"
    completed = subprocess.run(
        [sys.executable, "bench.py", "--backend", "numpy", "--steps", "20", "--warmup", "1",
         "--samples", "1", "--threads", "1", "--json", str(path), "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    document = json.loads(path.read_text())
    (run,) = document["runs"]
    assert run["division"] == "idiomatic" and run["implementation"] == REGISTRY["numpy"].target
    assert run["tunings"] == []
    # between a step of the shortest name and one of a full block
    assert (training_flops(preset("tiny"), 27, [2]) < run["train"]["flops_per_step"]
            < training_flops(preset("tiny"), 27, [16]))
    assert document["threads"]["environment"]["OMP_NUM_THREADS"] == "1"
    environment = document["environment"]
    assert 0 < environment["harness_floor_ms"] < 1.0
    assert environment["peak"]["gflops"] > 0
    markdown = path.with_suffix(".md").read_text()
    assert "Harness floor" in markdown and "GFLOP/s" in markdown and "% of peak" in markdown


def test_training_flops_count_the_specs_arithmetic():
    config = preset("tiny")
    d, vocab = config.n_embd, 27
    # one position: every matrix once (12 d^2 per layer + the head), attention over 1 key
    one = 3 * 2 * (12 * d * d + vocab * d + 2 * d)
    assert training_flops(config, vocab, [1]) == one
    # attention grows with n (n + 1): two rows add up
    assert training_flops(config, vocab, [3, 5]) == (training_flops(config, vocab, [3])
                                                   + training_flops(config, vocab, [5]))


def test_harness_floor_is_the_loop_alone(tiny_spec):
    assert 0 < harness_floor_ms(tiny_spec, steps=500) < 0.1


def test_phases_add_up_to_the_end_to_end_time():
    row = {"wall_s": 3.0, "import_s": 1.0, "data_s": 0.1, "init_s": 0.1, "compile_s": 0.5,
           "warmup_s": 0.05, "first_step_ms": 2.0, "total_s": 0.3, "sampling_s": 0.2}
    phases = report.phase_seconds(row)
    assert sum(phases.values()) == pytest.approx(3.0)
    assert phases["start-up and exit"] == pytest.approx(3.0 - 1.0 - 0.2 - 0.5 - 0.05 - 0.3 - 0.2)
    assert list(report.PHASES) == list(phases)
