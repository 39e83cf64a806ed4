"""Summaries of runs: one row per backend configuration, over however many repeats it has.

A run's own figures (median and spread of its per-step times) come from the worker; here they
are combined across repeats and compared across backends.
"""
from __future__ import annotations

import statistics


def run_key(run: dict) -> tuple:
    return (run["backend"], run.get("dtype"), run.get("device"))


def group_runs(runs: list[dict]) -> dict[tuple, list[dict]]:
    """Runs grouped by (backend, dtype, device), in order of first appearance."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(run_key(run), []).append(run)
    return groups


def _median_of(runs: list[dict], section: str, field: str):
    values = [run.get(section, {}).get(field) for run in runs]
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def summarize_runs(runs: list[dict]) -> list[dict]:
    rows = []
    for (backend, dtype, device), group in group_runs(runs).items():
        ok = [run for run in group if run.get("status") == "ok"]
        row = {"backend": backend, "dtype": dtype, "device": device, "n": len(ok)}
        if not ok:
            last = group[-1]
            row.update(status=last.get("status", "?"), error=last.get("error"),
                       n=0, final_loss=(last.get("train", {}).get("losses") or [None])[-1])
            rows.append(row)
            continue
        row["status"] = "ok" if len(ok) == len(group) else f"ok ({len(group) - len(ok)} failed)"
        for field in ("ms_per_step_median", "ms_per_step_iqr", "first_step_ms", "total_s"):
            row[field] = _median_of(ok, "train", field)
        row["compile_s"] = _median_of(ok, "setup", "compile_s")
        row["tokens_per_s"] = _median_of(ok, "infer", "tokens_per_s")
        row["final_loss"] = ok[0]["train"]["losses"][-1]
        rows.append(row)
    timed = [row for row in rows if row.get("ms_per_step_median")]
    if timed:
        slowest = max(row["ms_per_step_median"] for row in timed)
        numpy_rows = {row["dtype"]: row for row in timed if row["backend"] == "numpy"}
        for row in timed:
            row["speedup_vs_slowest"] = slowest / row["ms_per_step_median"]
            # Against numpy at the same dtype when there is one, else any numpy row.
            numpy_row = numpy_rows.get(row["dtype"]) or next(iter(numpy_rows.values()), None)
            if numpy_row:
                row["speedup_vs_numpy"] = (numpy_row["ms_per_step_median"]
                                           / row["ms_per_step_median"])
    return rows
