"""Result files: a versioned JSON document (environment + runs) written atomically after every
run, a Markdown table beside it, and a loader that refuses files it does not understand.

Schema (SCHEMA_VERSION 1):
  {"schema_version": 1, "suite": "microgpt-bench", "created": ISO time, "command": [...],
   "environment": {...bench.environment...}, "complete": bool,
   "runs": [{"backend", "device", "dtype", "config", "status", "error"?, "repeat"?,
             "setup": {...seconds...}, "train": {"losses": [...], "step_seconds": [...],
             "ms_per_step_median", "total_s", ...}, "infer": {"samples", "tokens_per_s", ...},
             "parity": {...}, "framework_versions": {...},
             "sweep"?: {"preset", "batch_size", "label", "parameters", ...}}],
   "sweep"?: {"presets", "batch_sizes", "steps", "budget_s", "skipped": [...], ...}}
The "sweep" keys appear only in files written by `bench.py sweep` (bench.sweep).

The Markdown beside it: the summary table (bench.stats.summarize_runs: medians over repeats,
95% confidence intervals), instability warnings, a sweep's pivot table, and failed runs.
"""
from __future__ import annotations

import datetime
import json
import os
import tempfile
from pathlib import Path

from bench.stats import TIMED_STATUSES, summarize_runs, summary_notes

SCHEMA_VERSION = 1
RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"


class ResultFileError(ValueError):
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


def write_atomically(path: Path, text: str) -> None:
    """Write beside the target and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp",
                                     prefix=f".{path.name}.") as handle:
        handle.write(text)
    os.chmod(handle.name, 0o644)  # NamedTemporaryFile creates 0600; results are for reading
    os.replace(handle.name, path)


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
def _fmt(value, spec: str, empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def summary_rows(runs: list[dict]) -> list[dict]:
    """One row per (backend, dtype, device, config) with the figures the tables show. With
    repeats, the row holds the median over repeats of each run's per-step median, and the
    confidence interval over repeats (see bench.stats.summarize_runs)."""
    return summarize_runs(runs)


def format_ci(row: dict, spec: str = ".4f") -> str:
    low, high = row.get("ms_per_step_ci_low"), row.get("ms_per_step_ci_high")
    if low is None or high is None:
        return "-"
    return f"{format(low, spec)}..{format(high, spec)}"


def _speedup(value) -> str:
    return "-" if value is None else format(value, ".2f" if value < 10 else ".1f") + "x"


def markdown_table(rows: list[dict]) -> str:
    """The summary as a Markdown table; a config column appears when rows differ in config."""
    several_configs = len({row.get("config_key") for row in rows}) > 1
    columns = ["backend", "device", "dtype", *(["config"] if several_configs else []), "status",
               "ms/step (median)", "95% CI", "step IQR", "first step ms", "total s",
               "compile s", "vs slowest", "vs numpy", "final loss", "sampling tok/s", "n"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] * len(columns)) + "|"]
    for row in rows:
        cells = [row["backend"], str(row.get("device") or "-"), str(row["dtype"])]
        if several_configs:
            cells.append(str(row.get("config", "-")))
        cells += [
            row["status"],
            _fmt(row.get("ms_per_step_median"), ".4f"),
            format_ci(row),
            _fmt(row.get("ms_per_step_iqr"), ".4f"),
            _fmt(row.get("first_step_ms"), ".3f"),
            _fmt(row.get("total_s"), ".3f"),
            _fmt(row.get("compile_s"), ".2f"),
            _speedup(row.get("speedup_vs_slowest")),
            _speedup(row.get("speedup_vs_numpy")),
            _fmt(row.get("final_loss"), ".4f"),
            _fmt(row.get("tokens_per_s"), ",.0f"),
            str(row.get("n", 1)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


TABLE_FOOTNOTE = (
    "Times are per training step after warm-up (median over steps 2..N of a run; the first "
    "step is shown apart). With repeats (each a fresh process), ms/step is the median over runs "
    "of those per-run medians, and \"95% CI\" is the t-based 95% confidence interval of their "
    "mean (n >= 2). \"step IQR\" is the spread of step times inside one run: each step "
    "trains on names of other lengths, so part of it is the workload, not noise. "
    "\"vs slowest\"/\"vs numpy\" divide medians measured in this file, within one model "
    "config. Only rows with status ok passed the parity check against the float64 reference.")


def warning_lines(rows: list[dict]) -> list[str]:
    """Instability warnings and notes to show under a table (see bench.stats.summary_notes)."""
    return summary_notes(rows)


def markdown_report(document: dict) -> str:
    env = document.get("environment", {})
    versions = {}
    for run in document.get("runs", []):
        versions.update(run.get("framework_versions") or {})
    rows = summary_rows(document.get("runs", []))
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
    notes = warning_lines(rows)
    if notes:
        parts += ["", "## Warnings", ""] + [f"- {note}" for note in notes]
    runs = document.get("runs", [])
    for title, selected in (
            ("Runs that did not pass", [run for run in runs
                                        if run.get("status") not in TIMED_STATUSES]),
            ("Timed but not verifiable against the reference",
             [run for run in runs if run.get("status") in TIMED_STATUSES
              and run.get("status") != "ok"])):
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
    for row in summary_rows(document.get("runs", [])):
        label = row["config"]  # config_label: the same text as the sweep's own label
        columns.setdefault(label, sizes.get(label, (0, 0)))
        value = row.get("ms_per_step_median")
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
