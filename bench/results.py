"""Result files: a versioned JSON document (environment + runs) written atomically after every
run, a Markdown table beside it, and a loader that refuses files it does not understand.

Schema (SCHEMA_VERSION 1):
  {"schema_version": 1, "suite": "microgpt-bench", "created": ISO time, "command": [...],
   "environment": {...bench.environment...}, "complete": bool,
   "runs": [{"backend", "device", "dtype", "config", "status", "error"?, "repeat"?,
             "setup": {...seconds...}, "train": {"losses": [...], "step_seconds": [...],
             "ms_per_step_median", "total_s", ...}, "infer": {"samples", "tokens_per_s", ...},
             "parity": {...}, "framework_versions": {...}}]}
"""
from __future__ import annotations

import datetime
import json
import os
import tempfile
from pathlib import Path

from bench.stats import summarize_runs

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
    """One row per (backend, dtype, device) with the figures the tables show. With repeats,
    the row holds the median over repeats of each run's per-step median."""
    return summarize_runs(runs)


def markdown_table(rows: list[dict]) -> str:
    header = ("| backend | device | dtype | status | ms/step (median) | spread (IQR) | "
              "first step ms | total s | compile s | vs slowest | vs numpy | final loss | "
              "sampling tok/s | n |")
    lines = [header, "|" + "|".join(["---"] * (header.count("|") - 1)) + "|"]
    for row in rows:
        lines.append("| " + " | ".join([
            row["backend"], str(row.get("device") or "-"), row["dtype"], row["status"],
            _fmt(row.get("ms_per_step_median"), ".4f"),
            _fmt(row.get("ms_per_step_iqr"), ".4f"),
            _fmt(row.get("first_step_ms"), ".3f"),
            _fmt(row.get("total_s"), ".3f"),
            _fmt(row.get("compile_s"), ".2f"),
            _fmt(row.get("speedup_vs_slowest"), ".1f", "-") + ("x" if row.get(
                "speedup_vs_slowest") is not None else ""),
            _fmt(row.get("speedup_vs_numpy"), ".2f", "-") + ("x" if row.get(
                "speedup_vs_numpy") is not None else ""),
            _fmt(row.get("final_loss"), ".4f"),
            _fmt(row.get("tokens_per_s"), ",.0f"),
            str(row.get("n", 1)),
        ]) + " |")
    return "\n".join(lines) + "\n"


def markdown_report(document: dict) -> str:
    env = document.get("environment", {})
    cpu = env.get("cpu", {})
    versions = {}
    for run in document.get("runs", []):
        versions.update(run.get("framework_versions") or {})
    rows = summary_rows(document.get("runs", []))
    parts = [
        f"# microgpt-bench results ({document.get('created', '?')})",
        "",
        f"- Machine: {cpu.get('model', '?')}, {cpu.get('usable_cores', '?')} cores, "
        f"{env.get('os', {}).get('platform', '?')}, fingerprint "
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
        "Times are per training step after warm-up (median over steps 2..N; the first step is "
        "shown apart). \"vs slowest\"/\"vs numpy\" divide medians measured in this file. "
        "Only rows with status ok passed the parity check against the float64 reference.",
    ]
    failures = [run for run in document.get("runs", []) if run.get("status") != "ok"]
    if failures:
        parts += ["", "## Runs that did not pass", ""]
        parts += [f"- {run['backend']} ({run.get('dtype')}): {run['status']}: "
                  f"{run.get('error', '')}" for run in failures]
    return "\n".join(parts) + "\n"
