"""Bad input to `bench.py`: every user mistake is one clear line and a non-zero exit code, never a
traceback, and results are never overwritten unless asked.

Usage errors (exit 2) are found before anything runs and write nothing; failures that need the
backend itself to find out (a device or dtype it lacks) are run-level (exit 1) and recorded in
the result file. Most cases call bench.cli.main in-process (fast); a few run `python bench.py`.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import cli, results
from bench.command import ExitCode
from backends import EXTRA_BACKENDS_ENV_VAR

REPO = Path(__file__).resolve().parents[1]
FAST = ["--backend", "numpy", "--steps", "20", "--warmup", "0", "--quiet"]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, dataset):
    directory = tmp_path_factory.mktemp("bad")
    raw = Path(dataset.path).read_bytes()
    (directory / "truncated.txt").write_bytes(raw[: len(raw) // 2])
    (directory / "empty.txt").write_bytes(b"\n\n")
    (directory / "taken.json").write_text("{}")
    (directory / "beside.md").write_text("someone's notes")
    (directory / "folder.json").mkdir()
    return directory


USAGE_ERRORS = [
    (["--backend", "nope"], "unknown backend 'nope'; valid backends: python, numpy"),
    (["--config", "nope"], "unknown config preset 'nope'; choose one of: tiny"),
    (["--steps", "0"], "num_steps must be an integer >= 1, got 0"),
    (["--steps", "-3"], "num_steps must be an integer >= 1, got -3"),
    (["--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
    (["--batch-size", "0"], "batch_size must be an integer >= 1, got 0"),
    (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    (["--repeat", "0"], "--repeat must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--timeout", "0"], "--timeout must be > 0"),
    (["--samples", "-1"], "--samples must be >= 0"),
    (["--memory-limit", "0"], "--memory-limit must be > 0 (MB)"),
    (["--dataset", "{dir}/missing.txt"], "dataset file {dir}/missing.txt does not exist"),
    (["--dataset", "{dir}/truncated.txt"], "not the spec's 0a30b5557f192f32... (corrupt, "
                                           "truncated or another file)"),
    (["--dataset", "{dir}/empty.txt", "--custom-dataset"], "holds no documents"),
    (["--json", "{dir}/taken.json"], "{dir}/taken.json exists; choose another --json path or "
                                     "pass --overwrite"),
    (["--json", "{dir}/beside.json"], "{dir}/beside.md exists"),
    (["--json", "{dir}/folder.json"], "--json {dir}/folder.json is a directory"),
    (["--json", "/proc/no-such-dir/x.json"], "cannot write the result file /proc/no-such-dir"),
    (["--external", "ghost=no-such-program-h7"], "command 'no-such-program-h7' not found"),
    (["--external", "numpy=echo"], "already used by a backend"),
]


@pytest.mark.parametrize("args, message", USAGE_ERRORS,
                         ids=[" ".join(args) for args, _ in USAGE_ERRORS])
def test_usage_error_is_one_line_and_exit_2(args, message, bad_files, capsys):
    args = [arg.format(dir=bad_files) for arg in args]
    before = sorted(bad_files.iterdir())
    assert cli.main([*FAST, *args]) == ExitCode.USAGE
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines[-1].startswith("error: ") and message.format(dir=bad_files) in lines[-1]
    assert all(line.startswith("Reference:") for line in lines[:-1])  # nothing else said
    assert sorted(bad_files.iterdir()) == before  # nothing written
    assert (bad_files / "taken.json").read_text() == "{}"


def test_malformed_test_hook_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv(EXTRA_BACKENDS_ENV_VAR, "oops")
    assert cli.main(FAST) == ExitCode.USAGE
    assert "is not name=module:Class" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--steps", "0"], ["--dataset", "{dir}/truncated.txt"]])
def test_no_traceback_from_the_real_command(args, bad_files):
    args = [arg.format(dir=bad_files) for arg in args]
    completed = subprocess.run([sys.executable, "bench.py", *FAST, *args], cwd=REPO,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert completed.stderr.startswith("error: ") and completed.stderr.count("\n") == 1


# ---- run-level: the backend itself says it cannot -------------------------------------------
def run_bench(*args):
    return subprocess.run([sys.executable, "bench.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_device_the_backend_lacks_is_recorded_and_overwrite_replaces(tmp_path):
    path = tmp_path / "cuda.json"
    path.write_text("an earlier file")
    completed = run_bench(*FAST, "--device", "cuda", "--json", str(path), "--overwrite")
    assert completed.returncode == ExitCode.FAILED
    assert "Traceback" not in completed.stderr
    run = results.load(path)["runs"][0]
    assert run["status"] == "unavailable"
    assert run["error"] == "backend numpy runs on the CPU only, not on 'cuda'"
    assert "numpy (float32): unavailable: backend numpy runs on the CPU only" in completed.stdout


def test_dtype_the_backend_lacks_is_recorded(tmp_path):
    path = tmp_path / "f32.json"
    completed = run_bench("--backend", "python", "--dtype", "float32", "--steps", "20",
                          "--quiet", "--json", str(path))
    assert completed.returncode == ExitCode.FAILED
    run = results.load(path)["runs"][0]
    assert run["status"] == "unavailable"
    assert run["error"] == ("backend python does not support dtype float32; it supports: "
                            "float64")


def test_exit_codes_of_run_statuses():
    def runs(*statuses):
        return [{"backend": f"b{i}", "status": status} for i, status in enumerate(statuses)]
    assert cli.exit_code_of(runs("ok", "different init"), explicit=set()) == ExitCode.OK
    # A dtype a backend lacks in a run that did not name it (--all, or the default set).
    assert cli.exit_code_of(runs("ok", "unavailable"), explicit=set()) == ExitCode.OK
    assert cli.exit_code_of(runs("ok", "unavailable"), explicit={"b1"}) == ExitCode.FAILED
    for status in ("crashed", "timeout", "out-of-memory", "error", "parity-failed", "diverged",
                   "interrupted"):
        assert cli.exit_code_of(runs("ok", status), explicit=set()) == ExitCode.FAILED


# ---- results are never overwritten ----------------------------------------------------------
def test_default_result_path_never_overwrites(tmp_path):
    document = results.new_document({"hostname": "box"}, ["bench.py"])
    args = SimpleNamespace(json=None)
    earlier = results.default_result_path(document["environment"], tmp_path)
    earlier.write_text("an earlier result")
    first = cli.claim_result_path(args, document, tmp_path)
    second = cli.claim_result_path(args, document, tmp_path)
    assert len({earlier, first, second}) == 3
    assert earlier.read_text() == "an earlier result"
    assert results.load(first)["runs"] == [] and results.load(second)["runs"] == []


# ---- result files that cannot be read (what compare/report load) ----------------------------
@pytest.fixture
def saved_document(tmp_path):
    path = tmp_path / "good.json"
    document = results.new_document({}, ["bench.py"])
    document["runs"] = [{"backend": "numpy", "dtype": "float32", "status": "ok",
                         "train": {"losses": [3.3, 3.2]}}]
    results.save(document, path)
    return path


def test_truncated_result_file(saved_document):
    text = saved_document.read_text()
    saved_document.write_text(text[: len(text) // 2])
    with pytest.raises(results.ResultFileError, match="not valid JSON, perhaps cut short"):
        results.load(saved_document)


def test_result_file_of_another_schema_version(saved_document):
    saved_document.write_text(saved_document.read_text().replace('"schema_version": 2',
                                                                 '"schema_version": 99'))
    with pytest.raises(results.ResultFileError, match="schema_version 99 is not supported"):
        results.load(saved_document)


def test_missing_and_foreign_result_files(tmp_path):
    with pytest.raises(results.ResultFileError, match="no such file"):
        results.load(tmp_path / "nope.json")
    (tmp_path / "other.json").write_text('{"hello": 1}')
    with pytest.raises(results.ResultFileError, match="not a microgpt-bench result file"):
        results.load(tmp_path / "other.json")
