"""The main job end to end: bench.py runs backends in subprocesses, checks parity and writes a
result file with the documented schema and a Markdown table beside it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import results

REPO = Path(__file__).resolve().parents[1]
STEPS = 30


@pytest.fixture(scope="module")
def result_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("results") / "run.json"
    completed = subprocess.run(
        [sys.executable, "bench.py", "--backend", "python", "--backend", "numpy",
         "--dtype", "float64", "--dtype", "float32", "--steps", str(STEPS), "--samples", "5",
         "--warmup", "2", "--json", str(path), "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    return path, completed


def test_exit_code_and_table(result_file):
    path, completed = result_file
    assert completed.returncode == 1, completed.stderr  # python float32 is unavailable
    assert "numpy" in completed.stdout and "ms/step" in completed.stdout
    markdown = path.with_suffix(".md").read_text()
    assert "| numpy | idiomatic | cpu | float64 | ok |" in markdown
    assert "| python | idiomatic | - | float32 | unavailable |" in markdown


def test_result_file_schema(result_file):
    path, _ = result_file
    document = results.load(path)
    assert document["schema_version"] == results.SCHEMA_VERSION and document["complete"]
    environment = document["environment"]
    for key in ("cpu", "os", "python", "git", "machine_fingerprint"):
        assert key in environment
    runs = {(run["backend"], run["dtype"]): run for run in document["runs"]}
    assert set(runs) == {("python", "float64"), ("python", "float32"), ("numpy", "float64"),
                         ("numpy", "float32")}
    for key in [("python", "float64"), ("numpy", "float64"), ("numpy", "float32")]:
        run = runs[key]
        assert run["status"] == "ok" and run["device"] == "cpu"
        assert run["config"]["n_embd"] == 16 and run["config"]["num_steps"] == STEPS
        assert len(run["train"]["losses"]) == STEPS == len(run["train"]["step_seconds"])
        assert 0 < run["train"]["ms_per_step_median"] and 0 < run["train"]["total_s"]
        assert run["parity"]["passed"] and run["parity"]["steps_compared"] == STEPS
        assert len(run["infer"]["samples"]) == 5 and run["infer"]["tokens_per_s"] > 0
        assert "numpy" in run["framework_versions"] or key[0] == "python"
        assert "process_settings" not in run  # only backends that ask for some (mlx) have it
    assert runs[("python", "float32")]["status"] == "unavailable"
    assert "float32" in runs[("python", "float32")]["error"]
    # Same weights, same stream: float64 backends sample the same names.
    assert (runs[("python", "float64")]["infer"]["samples"]
            == runs[("numpy", "float64")]["infer"]["samples"])
    assert f"{runs[('numpy', 'float64')]['train']['losses'][0]:.4f}" == "3.3660"


def test_loader_refuses_other_schemas(tmp_path, result_file):
    path, _ = result_file
    document = json.loads(path.read_text())
    document["schema_version"] = 99
    other = tmp_path / "other.json"
    other.write_text(json.dumps(document))
    with pytest.raises(results.ResultFileError, match="schema_version 99"):
        results.load(other)
    cut = tmp_path / "cut.json"
    cut.write_text(path.read_text()[:200])
    with pytest.raises(results.ResultFileError, match="cut short"):
        results.load(cut)
