"""`bench.py report`: merging result files (one machine, several machines), the Markdown and
CSV tables, and the PNG charts (written, non-trivial; skipped cleanly without matplotlib)."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from bench import report, results
from bench.command import ExitCode
from backends.contract import preset
from tests.test_stats import synthetic_document, synthetic_run

CONFIGS = (("numpy", "float32", 0.3), ("numpy", "float64", 0.35), ("python", "float64", 25.0))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write(directory: Path, name: str, document: dict) -> Path:
    path = directory / name
    path.write_text(json.dumps(document))
    return path


def test_merge_same_machine_adds_repeats():
    first = synthetic_document(CONFIGS, repeats=2, seed=1)
    second = synthetic_document(CONFIGS[:1], repeats=3, seed=2)
    machines = report.merge_documents([("a.json", first), ("b.json", second)])
    assert len(machines) == 1 and machines[0].files == ["a.json", "b.json"]
    numpy_runs = [run for run in machines[0].runs
                  if (run["backend"], run["dtype"]) == ("numpy", "float32")]
    # Repeats of the second file follow those of the first.
    assert sorted(run["repeat"] for run in numpy_runs) == [0, 1, 2, 3, 4]
    rows = report.csv_rows(machines)
    assert [row["n"] for row in rows] == [5, 2, 2]


def test_merge_several_machines_side_by_side():
    here = synthetic_document(CONFIGS, repeats=2, seed=1)
    there = synthetic_document(CONFIGS[:2], repeats=2, seed=2, fingerprint="ffff", scale=0.5)
    machines = report.merge_documents([("here.json", here), ("there.json", there)])
    assert [machine.name for machine in machines] == ["M1", "M2"]
    table = report.side_by_side_table(machines)
    python_line = next(line for line in table.splitlines() if line.startswith("| python"))
    assert python_line.rstrip(" |").endswith("-")  # M2 has no python run
    assert "| M1 | M2 |" in table


@pytest.fixture(scope="module")
def written_report(tmp_path_factory):
    pytest.importorskip("matplotlib")
    directory = tmp_path_factory.mktemp("report")
    small = preset("small", num_steps=60).to_dict()
    here = synthetic_document(CONFIGS, repeats=3, seed=1)
    here["runs"] += synthetic_document(CONFIGS[:2], repeats=1, seed=3, config=small)["runs"]
    there = synthetic_document(CONFIGS[:2], repeats=2, seed=2, fingerprint="ffff", scale=0.5)
    paths = [write(directory, "here.json", here), write(directory, "there.json", there)]
    out = directory / "out"
    written, note = report.write_report(paths, out)
    return out, written, note


def test_report_files(written_report):
    out, written, note = written_report
    assert note is None
    names = {path.name for path in written}
    assert {"report.md", "summary.csv", "training_time.png", "sampling_throughput.png",
            "scaling-M1.png", "loss_curves-M2.png"} <= names
    assert any(name.startswith("loss_curves-M1-tiny") for name in names)
    for path in written:
        if path.suffix == ".png":
            data = path.read_bytes()
            assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, path
    markdown = (out / "report.md").read_text()
    assert "## M1: Test CPU" in markdown and "## Side by side" in markdown
    assert "![training_time](training_time.png)" in markdown
    with open(out / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 + 2 + 2  # M1: three tiny and two small; M2: two tiny
    numpy_m1 = next(row for row in rows if row["machine"] == "M1"
                    and row["backend"] == "numpy" and row["dtype"] == "float32"
                    and row["config"] == "tiny")
    assert int(numpy_m1["n"]) == 3
    assert float(numpy_m1["ms_per_step_ci_low"]) < float(numpy_m1["ms_per_step_median"])


def test_without_matplotlib_tables_are_still_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    path = write(tmp_path, "run.json", synthetic_document(CONFIGS, repeats=2))
    written, note = report.write_report([path], tmp_path / "out")
    assert [path.name for path in written] == ["report.md", "summary.csv"]
    assert "matplotlib" in note and "pip install" in note


def test_bad_input_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"suite": "microgpt-bench", "schema_version": 0, "runs": []}))
    assert report.main([str(bad), "--out", str(tmp_path / "out")]) == ExitCode.USAGE
    assert "schema_version 0" in capsys.readouterr().err


# ---- external programs' rows ---------------------------------------------------------------
def external_run(name, ms, steps=60, repeat=0, status="ok", basis="steady state", **extra):
    """An external program's run record as bench.external writes it (timed from its lines)."""
    run = synthetic_run(name, "unknown", ms, repeat, steps=steps, status=status, noise=0)
    run.pop("error", None)
    run.update(kind="external", device="external", command=["python3", "port.py"], **extra)
    run["train"]["ms_per_step_basis"] = basis
    run["timing"] = {"basis": basis, "steady_state": {"median": ms, "iqr": 0.1, "intervals":
                                                      steps - 1},
                     "first_step_line_s": 2.5, "end_to_end_s": 3.0 + steps * ms * 1e-3,
                     "end_to_end_per_step_ms": (3.0 + steps * ms * 1e-3) / steps * 1e3}
    return run


def test_external_rows_read_right():
    document = synthetic_document(repeats=0)
    document["runs"].append(synthetic_run("numpy", "float32", 0.3, noise=0))
    document["command"] = ["bench.py", "--external", "slow=python3 port.py --steps 100"]
    note = "step 1 loss 3.6 is not the reference's 3.366: another initialisation"
    document["runs"] += [
        external_run("slow", 0.3 * 1724),  # vs numpy: 1,724 times slower
        external_run("buffered", 2.0, basis="end-to-end / N"),
        external_run("short", 1.0, steps=100),
        *(external_run("ownit", 1.0, repeat=k, status="different init", note=note)
          for k in range(2)),
        *(external_run("cut", 1.0, repeat=k, status="incomplete",
                       error="cut exited 0 after printing step 10 of 60") for k in range(2)),
    ]
    markdown = results.markdown_report(document)
    slow = next(line for line in markdown.splitlines() if line.startswith("| slow |"))
    assert "1,724.0x slower" in slow
    buffered = next(line for line in markdown.splitlines() if line.startswith("| buffered |"))
    assert "2.0000 (end-to-end / N)" in buffered
    # Rows of 60 and 100 steps: a steps column and a warning.
    assert "| steps |" in markdown and "rows of different step counts" in markdown
    assert "External programs (device \"external\") are timed from outside" in markdown
    assert "- slow (unknown, 60 steps): `python3 port.py`; precision not declared; steady " \
           "state 517.2000 ms/step" in markdown
    # A note said once per configuration, a different init's note not as an error.
    assert markdown.count("cut exited 0 after printing step 10 of 60") == 1
    assert "cut (unknown, 60 steps) (runs #1, #2): incomplete:" in markdown
    assert "ownit (unknown, 60 steps) (runs #1, #2): different init: " + note in markdown
    assert ("- Command: `python bench.py --external 'slow=python3 port.py --steps 100'`"
            in markdown)


def test_footnote_without_external_rows_is_the_backends_alone():
    markdown = results.markdown_report(synthetic_document(CONFIGS, repeats=1))
    assert "External programs" not in markdown and "| steps |" not in markdown
