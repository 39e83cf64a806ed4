"""`bench.py compare`: the ratio, the significance test and above all the exit codes (0 no
regression, 1 regression, 2 error) on synthetic result documents that follow the schema."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import compare
from bench.command import ExitCode
from tests.test_stats import synthetic_document

REPO = Path(__file__).resolve().parents[1]
CONFIGS = (("numpy", "float32", 0.3), ("numpy", "float64", 0.35), ("python", "float64", 25.0))


def write(tmp_path: Path, name: str, document: dict) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(document))
    return str(path)


@pytest.fixture
def base(tmp_path):
    return write(tmp_path, "base.json", synthetic_document(CONFIGS, repeats=5, seed=1))


def test_same_numbers_pass(tmp_path, base, capsys):
    same = write(tmp_path, "same.json", synthetic_document(CONFIGS, repeats=5, seed=2))
    assert compare.main([base, same]) == ExitCode.OK
    output = capsys.readouterr().out
    assert "no significant change" in output and "Geometric mean" in output


def test_clear_slowdown_is_a_regression(tmp_path, base, capsys):
    slowed = write(tmp_path, "slow.json",
                   synthetic_document(CONFIGS, repeats=5, seed=2, scale=1.5))
    out_json = tmp_path / "comparison.json"
    assert compare.main([base, slowed, "--json", str(out_json)]) == ExitCode.FAILED
    assert "REGRESSION" in capsys.readouterr().out
    comparison = json.loads(out_json.read_text())
    assert comparison["geometric_mean_ratio"] == pytest.approx(1.5, rel=0.03)
    assert len(comparison["regressions"]) == 3
    for row in comparison["rows"]:
        assert row["verdict"] == "regression" and row["p_value"] < 0.01
        assert row["ratio_ci"][0] < row["ratio"] < row["ratio_ci"][1]
    # A threshold above the slowdown: significant, but not a regression.
    assert compare.main([base, slowed, "--max-slowdown", "0.6"]) == ExitCode.OK


def test_speedup_is_not_a_regression(tmp_path, base):
    faster = write(tmp_path, "fast.json",
                   synthetic_document(CONFIGS, repeats=5, seed=2, scale=0.5))
    assert compare.main([base, faster]) == ExitCode.OK
    comparison = compare.compare_documents(json.loads(Path(base).read_text()),
                                           json.loads(Path(faster).read_text()))
    assert {row.verdict for row in comparison.rows} == {"faster"}


def test_single_runs_never_claim_significance(tmp_path):
    """Per-step times are not independent samples (one slow phase of the machine slows many
    steps at once): with fewer than 3 runs a side no test is made, and no regression called."""
    base = synthetic_document(CONFIGS[:1], repeats=1, seed=1, steps=200)
    slowed = synthetic_document(CONFIGS[:1], repeats=1, seed=2, steps=200, scale=1.3)
    same = synthetic_document(CONFIGS[:1], repeats=1, seed=3, steps=200)
    for new in (slowed, same):
        row = compare.compare_documents(base, new).rows[0]
        assert row.verdict == "too few runs for significance" and row.p_value is None
        assert "too few runs" in row.test
    assert compare.compare_documents(base, slowed).rows[0].ratio == pytest.approx(1.3, rel=0.05)


@pytest.mark.parametrize("change, message", [
    (lambda document: document.update(schema_version=99), "schema_version 99"),
    (lambda document: document["environment"].update(machine_fingerprint="ffff"),
     "different machines"),
    (lambda document: document["runs"][0].update(status="parity-failed",
                                                 error="DOES NOT MATCH"), "parity-failed"),
    (lambda document: document["runs"][1].update(status="crashed", error="killed"), "crashed"),
    (lambda document: document.update(runs=[]), "no successful backend configuration"),
])
def test_errors_exit_2_with_one_line(tmp_path, base, capsys, change, message):
    document = synthetic_document(CONFIGS, repeats=5, seed=2)
    change(document)
    new = write(tmp_path, "new.json", document)
    assert compare.main([base, new]) == ExitCode.USAGE
    error = capsys.readouterr().err
    assert "error:" in error and "Traceback" not in error
    assert message in error and len(error.strip().splitlines()) == 1


def test_cross_machine_allowed_on_request(tmp_path, base, capsys):
    other = write(tmp_path, "other.json",
                  synthetic_document(CONFIGS, repeats=5, seed=2, fingerprint="ffff"))
    assert compare.main([base, other, "--allow-cross-machine"]) == ExitCode.OK
    assert "different machines" in capsys.readouterr().out


def test_unreadable_files_exit_2(tmp_path, base, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text('{"suite": "microgpt-bench", "runs": [')
    assert compare.main([base, str(broken)]) == ExitCode.USAGE
    assert compare.main([base, str(tmp_path / "missing.json")]) == ExitCode.USAGE
    assert compare.main([base]) == ExitCode.USAGE  # usage
    errors = capsys.readouterr().err
    assert "not valid JSON" in errors and "no such file" in errors
    assert "Traceback" not in errors


def test_cli_dispatch(tmp_path, base):
    slowed = write(tmp_path, "slow.json",
                   synthetic_document(CONFIGS, repeats=5, seed=2, scale=1.5))
    completed = subprocess.run([sys.executable, "bench.py", "compare", base, slowed],
                               cwd=REPO, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 1, completed.stderr
    assert "regression" in completed.stdout


def test_statistic_choice(tmp_path, base, capsys):
    slowed = write(tmp_path, "slow.json",
                   synthetic_document(CONFIGS, repeats=5, seed=2, scale=1.5))
    assert compare.main([base, slowed, "--statistic", "q1"]) == ExitCode.FAILED
    assert "per-run q1" in capsys.readouterr().out
    # Runs with only a whole-run time (external programs): compared on the median.
    document = synthetic_document(CONFIGS, repeats=5, seed=2, scale=1.5)
    for run in document["runs"]:
        del run["train"]["ms_per_step_q1"]
    without_q1 = write(tmp_path, "external.json", document)
    assert compare.main([base, without_q1, "--statistic", "q1"]) == ExitCode.FAILED
    assert "compared on the median instead" in capsys.readouterr().out


def test_external_program_runs_are_compared_not_errors(tmp_path, base):
    document = synthetic_document(CONFIGS, repeats=5, seed=2)
    for run in document["runs"]:
        if run["backend"] == "python":
            run["status"] = "different init"  # an --external program: timed, not verifiable
    external = write(tmp_path, "external.json", document)
    assert compare.main([base, external]) == ExitCode.OK
