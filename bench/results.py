"""Result files: a versioned JSON document (environment + runs) written atomically after every
run, a Markdown table beside it, and a loader that refuses files it does not understand.

Schema (SCHEMA_VERSION 1):
  {"schema_version": 1, "suite": "microgpt-bench", "created": ISO time, "command": [...],
   "environment": {...bench.environment...}, "complete": bool,
   "runs": [run records (bench.record), each with "repeat" and, in a sweep, "sweep":
            {"preset", "batch_size", "label", "parameters", ...}],
   "sweep"?: {"presets", "batch_sizes", "steps", "budget_s", "skipped": [...], ...}}
The "sweep" keys appear only in files written by `bench.py sweep` (bench.sweep).

The Markdown beside it: the summary table (bench.stats.summarize_runs: medians over repeats,
95% confidence intervals), instability warnings, a sweep's pivot table, and failed runs.
"""
from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench.command import UsageError
from bench.files import RESULTS_DIR, write_atomically
from bench.record import (CI_HIGH, CI_LOW, COMPILE_S, FINAL_LOSS, FIRST_STEP_MS, MEDIAN_MS,
                          SPEEDUP_VS_NUMPY, SPEEDUP_VS_SLOWEST, STEP_IQR_MS, TIMED_STATUSES,
                          TOKENS_PER_S, TRAIN_S, Status)
from bench.stats import several_configs, summarize_runs, summary_notes

SCHEMA_VERSION = 1


class ResultFileError(UsageError):
    """A result file that cannot be read or is of another schema version."""


def new_document(environment: dict, command: list[str]) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "suite": "microgpt-bench",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "environment": environment,
        "complete": False,
        "runs": [],
    }


def default_result_path(environment: dict, directory: Path = RESULTS_DIR) -> Path:
    """A new file name that no earlier result has: results/<time>-<host>.json."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    host = "".join(ch if ch.isalnum() or ch in "-_" else "-"
                   for ch in environment.get("hostname", "machine"))[:40] or "machine"
    path = directory / f"{stamp}-{host}.json"
    counter = 1
    while path.exists() or path.with_suffix(".md").exists():
        path = directory / f"{stamp}-{host}-{counter}.json"
        counter += 1
    return path


def save(document: dict, path: Path) -> None:
    write_atomically(path, json.dumps(document, indent=1, allow_nan=True) + "\n")
    write_atomically(path.with_suffix(".md"), markdown_report(document))


def load(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ResultFileError(f"{path}: cannot read ({error})") from None
    except ValueError as error:
        raise ResultFileError(f"{path}: not valid JSON, perhaps cut short ({error})") from None
    if not isinstance(document, dict) or document.get("suite") != "microgpt-bench":
        raise ResultFileError(f"{path}: not a microgpt-bench result file")
    version = document.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ResultFileError(f"{path}: schema_version {version!r} is not supported "
                              f"(this suite reads version {SCHEMA_VERSION})")
    if not isinstance(document.get("runs"), list):
        raise ResultFileError(f"{path}: has no list of runs")
    return document


# ---- tables --------------------------------------------------------------------------------
def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _speedup(value) -> str:
    return "-" if value is None else format(value, ".2f" if value < 10 else ".1f") + "x"


def _ci(row: dict) -> str:
    low, high = row.get(CI_LOW), row.get(CI_HIGH)
    return "-" if low is None or high is None else f"{low:.4f}..{high:.4f}"


@dataclass(frozen=True)
class Column:
    """A column of the summary table, in the terminal (bench.cli) and in Markdown alike."""
    title: str
    field: str  # the summary row's key (bench.stats.summarize_runs)
    format: str | Callable = "s"  # a format spec for the value, or the cell text of a row
    numeric: bool = True  # right-aligned in the terminal

    def cell(self, row: dict) -> str:
        if callable(self.format):
            return self.format(row)
        return _fmt(row.get(self.field), self.format)


def _text(field: str) -> Column:
    return Column(field, field, numeric=False)


def _speedup_column(title: str, field: str) -> Column:
    return Column(title, field, lambda row: _speedup(row.get(field)))


CONFIG_COLUMN = _text("config")
SUMMARY_COLUMNS = (
    _text("backend"), _text("device"), _text("dtype"), CONFIG_COLUMN, _text("status"),
    Column("ms/step (median)", MEDIAN_MS.key, ".4f"),
    Column("95% CI", CI_LOW, _ci),
    Column("step IQR", STEP_IQR_MS.key, ".4f"),
    Column("first step ms", FIRST_STEP_MS.key, ".3f"),
    Column("total s", TRAIN_S.key, ".3f"),
    Column("compile s", COMPILE_S.key, ".2f"),
    _speedup_column("vs slowest", SPEEDUP_VS_SLOWEST),
    _speedup_column("vs numpy", SPEEDUP_VS_NUMPY),
    Column("final loss", FINAL_LOSS, ".4f"),
    Column("sampling tok/s", TOKENS_PER_S.key, ",.0f"),
    Column("n", "n", "d"),
)


def summary_columns(rows: list[dict]) -> list[Column]:
    """The columns of these rows' table: the config column only when they differ in config."""
    return [column for column in SUMMARY_COLUMNS
            if column is not CONFIG_COLUMN or several_configs(rows)]


def markdown_table(rows: list[dict]) -> str:
    columns = summary_columns(rows)
    lines = ["| " + " | ".join(column.title for column in columns) + " |",
             "|" + "|".join(["---"] * len(columns)) + "|"]
    lines += ["| " + " | ".join(column.cell(row) for column in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


TABLE_FOOTNOTE = (
    "Times are per training step after warm-up (median over steps 2..N of a run; the first "
    "step is shown apart). With repeats (each a fresh process), ms/step is the median over runs "
    "of those per-run medians, and \"95% CI\" is the t-based 95% confidence interval of their "
    "mean (n >= 2). \"step IQR\" is the spread of step times inside one run: each step "
    "trains on names of other lengths, so part of it is the workload, not noise. "
    "\"vs slowest\"/\"vs numpy\" divide medians measured in this file, within one model "
    "config. Only rows with status ok passed the parity check against the float64 reference.")


def markdown_report(document: dict) -> str:
    env = document.get("environment", {})
    versions = {}
    for run in document.get("runs", []):
        versions.update(run.get("framework_versions") or {})
    rows = summarize_runs(document.get("runs", []))
    parts = [
        f"# microgpt-bench results ({document.get('created', '?')})",
        "",
        f"- Machine: {describe_machine(env)}, fingerprint "
        f"`{env.get('machine_fingerprint', '?')}`",
        f"- Python {env.get('python', {}).get('version', '?')}; frameworks: "
        + (", ".join(f"{name} {version}" for name, version in sorted(versions.items()))
           or "none"),
        f"- Commit: `{(env.get('git') or {}).get('commit') or 'unknown'}`"
        + (" (uncommitted changes)" if (env.get("git") or {}).get("dirty") else ""),
        f"- Command: `{' '.join(document.get('command', []))}`",
        "" if document.get("complete") else "- **Incomplete**: the run was stopped early.",
        "",
        markdown_table(rows),
        TABLE_FOOTNOTE,
    ]
    if document.get("sweep"):
        parts += ["", sweep_markdown(document)]
    notes = summary_notes(rows)
    if notes:
        parts += ["", "## Warnings", ""] + [f"- {note}" for note in notes]
    runs = document.get("runs", [])
    for title, selected in (
            ("Runs that did not pass", [run for run in runs
                                        if run.get("status") not in TIMED_STATUSES]),
            ("Timed but not verifiable against the reference",
             [run for run in runs if run.get("status") in TIMED_STATUSES
              and run.get("status") != Status.OK])):
        if selected:
            parts += ["", f"## {title}", ""]
            parts += [f"- {run['backend']} ({run.get('dtype')}): {run['status']}: "
                      f"{run.get('error', '')}" for run in selected]
    return "\n".join(parts) + "\n"


def describe_machine(environment: dict) -> str:
    """One line: CPU, cores, accelerators, OS (for report headings and compare errors)."""
    cpu = environment.get("cpu", {})
    accelerators = ", ".join(
        f"{gpu.get('name', '?')} (driver {gpu.get('driver', '?')})"
        for gpu in environment.get("accelerators") or [])
    return (f"{cpu.get('model', '?')}, {cpu.get('usable_cores', '?')} cores"
            + (f", {accelerators}" if accelerators else "")
            + f", {environment.get('os', {}).get('platform', '?')}")


def sweep_markdown(document: dict) -> str:
    """A sweep's pivot table (median ms per step: backends down, configurations across) and
    the runs it skipped to stay within its budget."""
    sweep = document["sweep"]
    columns: dict[str, tuple[int, int]] = {}  # configuration label -> (parameters, batch)
    cells: dict[str, dict[str, str]] = {}
    sizes = {run["sweep"]["label"]: (run["sweep"]["parameters"], run["sweep"]["batch_size"])
             for run in document.get("runs", []) if run.get("sweep")}
    for row in summarize_runs(document.get("runs", [])):
        label = row["config"]  # config_label: the same text as the sweep's own label
        columns.setdefault(label, sizes.get(label, (0, 0)))
        value = row.get(MEDIAN_MS.key)
        cells.setdefault(f"{row['backend']} {row['dtype']}", {})[label] = (
            _fmt(value, ".4f") if value is not None else row["status"])
    for skipped in sweep.get("skipped", []):
        label = (skipped["preset"] if skipped["batch_size"] == 1
                 else f"{skipped['preset']} b{skipped['batch_size']}")
        columns.setdefault(label, (skipped["parameters"], skipped["batch_size"]))
        cells.setdefault(f"{skipped['backend']} {skipped['dtype']}", {})[label] = "skipped"
    ordered = sorted(columns, key=lambda label: (columns[label], label))  # size, then batch
    lines = [f"## Sweep: median ms per training step ({sweep.get('steps')} steps per run, "
             f"budget {sweep.get('budget_s', 0):.0f} s, took {sweep.get('elapsed_s', 0):.0f} s)",
             "", "| backend | " + " | ".join(f"{label} ({columns[label][0]:,} params)"
                                              for label in ordered) + " |",
             "|" + "|".join(["---"] * (len(ordered) + 1)) + "|"]
    for name, values in cells.items():
        lines.append(f"| {name} | " + " | ".join(values.get(label, "-") for label in ordered)
                     + " |")
    if sweep.get("skipped"):
        lines += ["", "Skipped to stay within the budget (projection: the backend's run of "
                  "the previous preset at the same batch size, else its latest run, scaled by "
                  "estimated FLOPs):", ""]
        lines += [f"- {item['backend']} {item['dtype']} {item['preset']} batch "
                  f"{item['batch_size']}: {item['reason']}" for item in sweep["skipped"]]
    return "\n".join(lines) + "\n"
