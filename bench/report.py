"""`python bench.py report FILE... [--out DIR]`: result files merged into tables and charts.

Files from the same machine (same environment.machine_fingerprint) are merged: runs of the same
backend configuration count as more repeats. Files from several machines get one table per
machine and a side-by-side table of the time per step. A file given twice (or a copy of it)
counts once. Written to DIR (default: a new folder results/report-<time>; an existing DIR only
where report wrote before, per its manifest, or with --overwrite):

  report.md                 per-machine summary tables, warnings, side-by-side table
  summary.csv               one row per machine and backend configuration, every statistic
  training_time.png         ms per training step and total training time per backend (log)
  sampling_throughput.png   sampled tokens per second per backend (log)
  loss_curves[-CONFIG].png  the loss of every backend over the steps, and each backend's
                            distance from the float64 run, against the parity tolerances
  scaling.png               (files with several model configs, e.g. a sweep) ms per step
                            against parameter count, per backend and batch size (log-log)

matplotlib is imported only to draw; without it the tables are still written.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import io
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from backends.contract import GPTConfig
from bench import results, stats
from bench.command import ArgumentParser, ExitCode, SafeStdout, UsageError, run_guarded
from bench.files import RESULTS_DIR, OutputError, display, new_directory, write_atomically
from bench.parity import LOSS_TOLERANCE
from bench.record import (CI_HIGH, CI_LOW, COMPILE_S, DATA_S, END_TO_END_S, FINAL_LOSS,
                          FIRST_STEP_MS, GFLOPS, IMPORT_S, INIT_S, MEDIAN_MS, REPEATS,
                          SAMPLING_ROW_KEY,
                          SPEEDUP_VS_NUMPY, SPEEDUP_VS_SLOWEST, STEP_IQR_MS, TIMED_STATUSES,
                          TOKENS_PER_S, TRAIN, TRAIN_S, WARMUP_S, Status, losses_of)

# The spec's dataset has 26 letters plus BOS; used for parameter counts of runs that did not
# record their own (sweep runs do).
STANDARD_VOCAB_SIZE = 27


@dataclass
class Machine:
    """The runs of every file measured on one machine."""
    fingerprint: str
    environment: dict
    files: list[str] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)
    name: str = ""  # "M1", "M2", ... in order of appearance

    @property
    def title(self) -> str:
        return f"{self.name}: {results.describe_machine(self.environment)}"


def merge_documents(documents: list[tuple[str, dict]]) -> list[Machine]:
    """Group runs by machine; repeat indices are renumbered so that the runs of a later file
    follow the earlier ones (the first-run warning looks at repeat 0)."""
    machines: dict[str, Machine] = {}
    for source, document in documents:
        environment = document.get("environment") or {}
        fingerprint = environment.get("machine_fingerprint") or "unknown"
        machine = machines.setdefault(fingerprint, Machine(fingerprint, environment))
        machine.files.append(source)
        offset = 1 + max((run.get("repeat", 0) for run in machine.runs), default=-1)
        for run in document["runs"]:
            machine.runs.append({**run, "repeat": offset + run.get("repeat", 0),
                                 "source": source})
    for index, machine in enumerate(machines.values()):
        machine.name = f"M{index + 1}"
    return list(machines.values())


# ---- tables --------------------------------------------------------------------------------
CSV_COLUMNS = [
    "machine", "fingerprint", "cpu", "backend", "dtype", "device", "config", "steps", "status",
    "n", MEDIAN_MS.key, CI_LOW, CI_HIGH, "ms_per_step_runs_iqr", "ms_per_step_runs_min",
    "ms_per_step_runs_max", "ms_per_step_runs_mean", "ms_per_step_runs_std",
    "ms_per_step_step_iqr", FIRST_STEP_MS.key, "total_s_median", "total_s_ci_low",
    "total_s_ci_high", "total_s_runs_std", COMPILE_S.key, TOKENS_PER_S.key, FINAL_LOSS,
    SPEEDUP_VS_NUMPY, SPEEDUP_VS_SLOWEST, "warnings"]
# Summary row fields that are CSV columns under their own name.
_ROW_COLUMNS = ("backend", "dtype", "device", "config", "steps", "status", "n", MEDIAN_MS.key,
                CI_LOW, CI_HIGH, FIRST_STEP_MS.key, COMPILE_S.key, TOKENS_PER_S.key, FINAL_LOSS,
                SPEEDUP_VS_NUMPY, SPEEDUP_VS_SLOWEST)


def csv_rows(machines: list[Machine]) -> list[dict]:
    rows = []
    for machine in machines:
        for row in stats.summarize_runs(machine.runs):
            repeats = row.get("repeats") or {}
            per_run = repeats.get(REPEATS[MEDIAN_MS]) or {}
            totals = repeats.get(REPEATS[TRAIN_S]) or {}
            rows.append({
                "machine": machine.name, "fingerprint": machine.fingerprint,
                "cpu": (machine.environment.get("cpu") or {}).get("model"),
                **{key: row.get(key) for key in _ROW_COLUMNS},
                **{f"ms_per_step_runs_{name}": per_run.get(name)
                   for name in ("iqr", "min", "max", "mean", "std")},
                "ms_per_step_step_iqr": row.get(STEP_IQR_MS.key),
                "total_s_median": row.get(TRAIN_S.key), "total_s_ci_low": totals.get("ci_low"),
                "total_s_ci_high": totals.get("ci_high"), "total_s_runs_std": totals.get("std"),
                "warnings": " | ".join(row.get("warnings") or []),
            })
    return rows


def csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: ("" if value is None else value) for key, value in row.items()})
    return buffer.getvalue()


def side_by_side_table(machines: list[Machine]) -> str:
    """ms/step per configuration (rows) and machine (columns)."""
    cells: dict[tuple, dict[str, str]] = {}
    for machine in machines:
        for row in stats.summarize_runs(machine.runs):
            key = (row["backend"], row["dtype"], row["config"], str(row.get("steps")))
            value = row.get(MEDIAN_MS.key)
            cells.setdefault(key, {})[machine.name] = "-" if value is None else f"{value:.4f}"
    header = ["backend", "dtype", "config", "steps", *(machine.name for machine in machines)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for key, values in cells.items():
        lines.append("| " + " | ".join([*key, *(
            values.get(machine.name, "-") for machine in machines)]) + " |")
    return "\n".join(lines) + "\n"


def markdown_text(machines: list[Machine], charts: list[Path]) -> str:
    parts = ["# microgpt-bench report", ""]
    for machine in machines:
        versions = {}
        for run in machine.runs:
            versions.update(run.get("framework_versions") or {})
        peak = (machine.environment.get("peak") or {}).get("gflops")
        rows = stats.summarize_runs(machine.runs, peak)
        parts += [f"## {machine.title}", "",
                  f"- Fingerprint `{machine.fingerprint}`, Python "
                  f"{(machine.environment.get('python') or {}).get('version', '?')}; frameworks: "
                  + (", ".join(f"{name} {version}" for name, version in sorted(versions.items()))
                     or "none"),
                  f"- Files: {', '.join(f'`{name}`' for name in machine.files)}", "",
                  results.markdown_table(rows)]
        parts += [line + "\n" for line in results.limits_lines(machine.environment)]
        if results.tuning_markdown(rows):
            parts += [results.tuning_markdown(rows).replace("## ", "### ", 1)]
        notes = stats.summary_notes(rows)
        if notes:
            parts += ["Warnings:", ""] + [f"- {note}" for note in notes] + [""]
    if len(machines) > 1:
        parts += ["## Side by side: median ms per training step", "",
                  side_by_side_table(machines),
                  "Machines differ in more than speed (threads, memory, frameworks); compare "
                  "within a column first.", ""]
    parts += ["", results.TABLE_FOOTNOTE, ""]
    if charts:
        parts += ["## Charts", ""] + [f"![{chart.stem}]({chart.name})" for chart in charts]
    return "\n".join(parts) + "\n"


# ---- charts --------------------------------------------------------------------------------
class ChartsUnavailable(Exception):
    pass


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ChartsUnavailable(
            "matplotlib is not installed, so no charts were drawn (tables were written); "
            "install it with: pip install 'microgpt-bench[report]' or pip install matplotlib"
        ) from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as pyplot
    return pyplot


def _row_label(row: dict, rows: list[dict]) -> str:
    """backend dtype, plus the device where it is not the CPU, plus the config (and steps)
    where the rows differ in them."""
    label = f"{row['backend']} {row['dtype']}"
    if row.get("device") not in (None, "cpu"):
        label += f" ({row['device']})"
    configs = {other["config"] for other in rows}
    steps = {other.get("steps") for other in rows}
    details = ([row["config"]] if len(configs) > 1 else []) + (
        [f"{row.get('steps')} steps"] if len(steps) > 1 else [])
    return label + (f" [{', '.join(details)}]" if details else "")


def _timed_rows(machines: list[Machine], field_name: str) -> tuple[list[str], dict]:
    """Labels (sorted fastest first by the first machine that has them) and, per machine, the
    rows with a value for field_name."""
    per_machine = {}
    for machine in machines:
        per_machine[machine.name] = [row for row in stats.summarize_runs(machine.runs)
                                     if row.get(field_name)]
    all_rows = [row for rows in per_machine.values() for row in rows]
    order = {}
    for row in all_rows:
        order.setdefault(_row_label(row, all_rows), row[field_name])
    labels = sorted(order, key=order.get)
    values = {name: {_row_label(row, all_rows): row for row in rows}
              for name, rows in per_machine.items()}
    return labels, values


def _horizontal_bars(axis, labels, values, machines, value_of, error_of, xlabel, title):
    count = max(1, len(machines))
    height = 0.8 / count
    colours = [f"C{index}" for index in range(count)]
    for index, machine in enumerate(machines):
        positions, widths, errors_low, errors_high = [], [], [], []
        for position, label in enumerate(labels):
            row = values[machine.name].get(label)
            if row is None:
                continue
            value = value_of(row)
            low, high = error_of(row) if error_of else (None, None)
            positions.append(position + (index - (count - 1) / 2) * height)
            widths.append(value)
            errors_low.append(max(0.0, value - low) if low is not None else 0.0)
            errors_high.append(max(0.0, high - value) if high is not None else 0.0)
        axis.barh(positions, widths, height=height * 0.9, color=colours[index],
                  xerr=[errors_low, errors_high] if error_of else None, capsize=2,
                  label=machine.title if count > 1 else None)
        for position, value, error_high in zip(positions, widths, errors_high):
            # Right of the error bar, so the number never sits on it.
            axis.annotate(_short_number(value), (value + error_high, position), xytext=(5, 0),
                          textcoords="offset points", va="center", fontsize=8)
    axis.set_yticks(range(len(labels)))
    axis.set_yticklabels(labels)
    axis.invert_yaxis()  # fastest on top
    axis.set_xscale("log")
    axis.set_xlabel(xlabel)
    axis.set_title(title)
    axis.grid(axis="x", which="both", alpha=0.3)
    # Room on the right for the value labels on a log axis.
    low, high = axis.get_xlim()
    axis.set_xlim(low, high * 3)


def _short_number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _ci_or_range(row: dict, figure) -> tuple[float | None, float | None]:
    summary = (row.get("repeats") or {}).get(REPEATS[figure]) or {}
    if summary.get("ci_low") is not None:
        return max(summary["ci_low"], summary["min"] * 0.5), summary["ci_high"]
    return None, None


def chart_training_time(machines: list[Machine], path: Path) -> Path | None:
    pyplot = _pyplot()
    labels, values = _timed_rows(machines, MEDIAN_MS.key)
    if not labels:
        return None
    figure, (left, right) = pyplot.subplots(
        1, 2, figsize=(13, 1.2 + 0.45 * len(labels) * max(1, len(machines) * 0.7)),
        constrained_layout=True)
    _horizontal_bars(left, labels, values, machines, lambda row: row[MEDIAN_MS.key],
                     lambda row: _ci_or_range(row, MEDIAN_MS),
                     "ms per training step (median, log scale)", "Time per training step")
    _horizontal_bars(right, labels, values, machines, lambda row: row[TRAIN_S.key],
                     lambda row: _ci_or_range(row, TRAIN_S),
                     "seconds (median, log scale)", "Total training time (all steps)")
    right.set_yticklabels([])
    if len(machines) > 1:
        figure.legend(*left.get_legend_handles_labels(), loc="lower center",
                      bbox_to_anchor=(0.5, 1.0), fontsize=8)
    figure.suptitle("Training (error bars: 95% CI over repeats, where a backend has 2 or "
                    "more)", fontsize=9, color="dimgrey")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    pyplot.close(figure)
    return path


# Where a run's time goes, in the order it is spent (seconds): what the worker measured of each
# phase, and the rest of the process's life (interpreter start, the suite's own imports,
# teardown) as "start-up and exit".
PHASES = ("start-up and exit", "framework import", "data and init", "compile", "warm-up",
          "first step", "steady training", "sampling")


def phase_seconds(row: dict) -> dict[str, float]:
    """The phases of a summary row (medians over its runs), in seconds; they add up to its
    end-to-end time."""
    value = {figure: row.get(figure.key) or 0.0 for figure in
             (IMPORT_S, DATA_S, INIT_S, COMPILE_S, WARMUP_S, FIRST_STEP_MS, TRAIN_S)}
    first = value[FIRST_STEP_MS] / 1e3
    phases = {"framework import": value[IMPORT_S], "data and init": value[DATA_S] + value[INIT_S],
              "compile": value[COMPILE_S], "warm-up": value[WARMUP_S], "first step": first,
              "steady training": max(value[TRAIN_S] - first, 0.0),
              "sampling": row.get(SAMPLING_ROW_KEY) or 0.0}
    measured = sum(phases.values())
    return {"start-up and exit": max((row.get(END_TO_END_S.key) or measured) - measured, 0.0),
            **phases}


def chart_phases(machines: list[Machine], path: Path) -> Path | None:
    """One stacked bar per row of each machine: where its end-to-end time goes."""
    pyplot = _pyplot()
    rows = [(machine, row) for machine in machines
            for row in stats.summarize_runs(machine.runs) if row.get(END_TO_END_S.key)]
    if not rows:
        return None
    rows.sort(key=lambda item: item[1][END_TO_END_S.key])
    all_rows = [row for _, row in rows]
    labels = [_row_label(row, all_rows) + (f" ({machine.name})" if len(machines) > 1 else "")
              for machine, row in rows]
    figure, axis = pyplot.subplots(figsize=(11, 1.2 + 0.42 * len(rows)), constrained_layout=True)
    left = [0.0] * len(rows)
    colours = pyplot.get_cmap("tab10")
    for index, phase in enumerate(PHASES):
        widths = [phase_seconds(row)[phase] for _, row in rows]
        axis.barh(labels, widths, left=left, color=colours(index), label=phase)
        left = [start + width for start, width in zip(left, widths)]
    axis.invert_yaxis()
    axis.set_xlabel("seconds, process start to exit (medians over repeats)")
    axis.set_title("Where the time goes: end-to-end, by phase")
    figure.legend(*axis.get_legend_handles_labels(), fontsize=8, ncol=4, loc="outside lower center")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    pyplot.close(figure)
    return path


def chart_sampling(machines: list[Machine], path: Path) -> Path | None:
    pyplot = _pyplot()
    labels, values = _timed_rows(machines, TOKENS_PER_S.key)
    if not labels:
        return None
    labels.reverse()  # largest throughput on top after invert_yaxis
    figure, axis = pyplot.subplots(
        figsize=(8, 1.2 + 0.45 * len(labels) * max(1, len(machines) * 0.7)),
        constrained_layout=True)
    _horizontal_bars(axis, labels, values, machines, lambda row: row[TOKENS_PER_S.key],
                     lambda row: _ci_or_range(row, TOKENS_PER_S),
                     "tokens per second (median, log scale)",
                     "Sampling throughput (one token at a time, key/value cache)")
    if len(machines) > 1:
        axis.legend(fontsize=8, loc="lower right")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    pyplot.close(figure)
    return path


def _moving_average(values: list[float], window: int) -> list[float]:
    averaged, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        averaged.append(total / min(index + 1, window))
    return averaged


def _reference_run(runs: list[dict]) -> dict:
    """The run the others are measured against: numpy float64 (the suite's reference) when it
    is there, else any float64 run, else the first."""
    for wanted in (lambda run: run["backend"] == "numpy" and run["dtype"] == "float64",
                   lambda run: run["dtype"] == "float64", lambda run: True):
        for run in runs:
            if wanted(run):
                return run
    raise ValueError("no runs")


def chart_loss_curves(runs: list[dict], path: Path, title: str) -> Path | None:
    """Top: the loss of each backend (moving average, so the curves can be seen; they lie on
    top of each other when backends agree). Bottom: |loss - reference loss| per step on a log
    scale, with the parity tolerances."""
    pyplot = _pyplot()
    curves = {}
    for run in runs:  # one curve per backend configuration (repeats train identically)
        if run.get("status") in (*TIMED_STATUSES, Status.PARITY_FAILED) and losses_of(run):
            curves.setdefault(f"{run['backend']} {run['dtype']}", run)
    if not curves:
        return None
    reference = _reference_run(list(curves.values()))
    reference_label = f"{reference['backend']} {reference['dtype']}"
    reference_losses = losses_of(reference)
    steps = max(len(losses_of(run)) for run in curves.values())
    window = max(1, steps // 25)
    figure, (top, bottom) = pyplot.subplots(2, 1, figsize=(10, 8), sharex=True,
                                            constrained_layout=True,
                                            gridspec_kw={"height_ratios": [3, 2]})
    styles = ["-", "--", "-.", ":"]
    for index, (label, run) in enumerate(curves.items()):
        losses = losses_of(run)
        # External programs may print every k-th step only: their steps are recorded (1-based).
        x = run[TRAIN].get("loss_steps") or list(range(1, len(losses) + 1))
        # Widest first so every later (thinner) line stays visible on top of it.
        width = max(0.8, 3.5 - 0.4 * index)
        top.plot(x, _moving_average(losses, window), styles[index % len(styles)],
                 linewidth=width, color=f"C{index % 10}", label=label)
        if run is reference:
            continue
        pairs = [(step, loss) for step, loss in zip(x, losses)
                 if step <= len(reference_losses)]
        bottom.plot([step for step, _ in pairs],
                    [max(abs(loss - reference_losses[step - 1]), 1e-17) for step, loss in pairs],
                    linewidth=0.8, color=f"C{index % 10}", label=label)
    top.set_ylabel(f"training loss (moving average over {window} steps)")
    top.set_title(title)
    top.legend(fontsize=8, ncol=2)
    top.grid(alpha=0.3)
    for dtype, tolerance in LOSS_TOLERANCE.items():
        bottom.axhline(tolerance, color="grey", linestyle="--", linewidth=0.8)
        bottom.annotate(f"{dtype} tolerance {tolerance:g}", (1, tolerance), xytext=(2, 2),
                        textcoords="offset points", fontsize=7, color="grey")
    bottom.set_yscale("log")
    bottom.set_ylim(1e-17, 1e2)  # headroom above the data for the legend
    bottom.set_xlabel("training step")
    bottom.set_ylabel(f"|loss - {reference_label}|")
    bottom.set_title(f"Distance from {reference_label} at every step "
                     f"(1e-17 stands for exactly equal)", fontsize=10)
    bottom.grid(alpha=0.3)
    if len(curves) > 1:
        bottom.legend(fontsize=7, ncol=3, loc="upper right")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    pyplot.close(figure)
    return path


def parameter_count(run: dict) -> int:
    recorded = (run.get("sweep") or {}).get("parameters")
    if recorded:
        return recorded
    config = GPTConfig.from_dict(run["config"])
    return config.num_parameters(STANDARD_VOCAB_SIZE)


@dataclass(frozen=True)
class ScalingMeasure:
    """What a scaling chart plots against model size: a summary row's key and its axis label;
    `with_ci`: draw the row's 95% CI (of ms/step); `line_at`: a horizontal reference line's
    (value, label), e.g. the machine's peak."""
    key: str
    label: str
    with_ci: bool = False


STEP_TIME = ScalingMeasure(MEDIAN_MS.key, "ms per training step (median, log scale)", True)
COMPILE_TIME = ScalingMeasure(COMPILE_S.key, "compile s (prepare(), log scale)")
ACHIEVED_GFLOPS = ScalingMeasure(GFLOPS, "GFLOP/s achieved (log scale)")


def chart_scaling(runs: list[dict], path: Path, title: str = "Scaling",
                  measure: ScalingMeasure = STEP_TIME, peak_gflops: float | None = None,
                  line_at: tuple[float, str] | None = None) -> Path | None:
    """A figure of each row (ms per step by default) against parameter count, one line per
    backend and dtype, one panel per batch size (log-log, shared y axis): where lines cross,
    the faster backend changes. Rows without a positive value are left out (log scale)."""
    pyplot = _pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter
    points: dict[int, dict[str, list[tuple[int, float, dict]]]] = {}
    tick_names: dict[int, str] = {}
    for row in stats.summarize_runs(runs, peak_gflops):
        if not (row.get(MEDIAN_MS.key) and (row.get(measure.key) or 0) > 0):
            continue
        run = next(run for run in runs if run["backend"] == row["backend"]
                   and run.get("dtype") == row["dtype"]
                   and stats.config_key(run.get("config")) == row["config_key"])
        batch = run["config"].get("batch_size", 1)
        parameters = parameter_count(run)
        tick_names[parameters] = row["config"].split(" b")[0]
        points.setdefault(batch, {}).setdefault(f"{row['backend']} {row['dtype']}", []).append(
            (parameters, row[measure.key], row))
    if not points:
        return None
    batches = sorted(points)
    figure, axes = pyplot.subplots(1, len(batches), figsize=(4.8 * len(batches) + 1.5, 5),
                                   squeeze=False, sharey=True, constrained_layout=True)
    labels = sorted({label for lines in points.values() for label in lines})
    colours = {label: f"C{index % 10}" for index, label in enumerate(labels)}
    markers = "osD^v<>ph*"
    ticks = sorted(tick_names)
    for axis, batch in zip(axes[0], batches):
        for label, line in sorted(points[batch].items()):
            line.sort(key=lambda point: point[0])
            axis.plot([point[0] for point in line], [point[1] for point in line],
                      marker=markers[labels.index(label) % len(markers)],
                      color=colours[label], label=label)
            for parameters, _, row in line if measure.with_ci else ():
                low, high = row.get(CI_LOW), row.get(CI_HIGH)
                if low is not None and high is not None and low > 0:
                    axis.vlines(parameters, low, high, color=colours[label], alpha=0.5)
        if line_at is not None:
            axis.axhline(line_at[0], color="black", linestyle="--", linewidth=1,
                         label=line_at[1])
        axis.set_xscale("log")
        axis.set_yscale("log")
        # Ticks at the presets' sizes, named, instead of powers of ten.
        axis.set_xticks(ticks)
        axis.set_xticklabels([f"{tick_names[tick]}\n{_short_count(tick)}" for tick in ticks],
                             fontsize=8)
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.yaxis.set_minor_formatter(NullFormatter())
        if len(ticks) > 1:
            axis.set_xlim(ticks[0] / 1.6, ticks[-1] * 1.6)
        axis.set_xlabel("model (parameters)")
        axis.set_title(f"batch size {batch}")
        axis.grid(which="major", alpha=0.3)
    axes[0][0].set_ylabel(measure.label)
    # One legend for all panels (same colours everywhere), outside the data.
    handles = {}
    for axis in axes[0]:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    figure.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    pyplot.close(figure)
    return path


def _short_count(count: int) -> str:
    if count >= 1e6:
        return f"{count / 1e6:.1f}M"
    if count >= 1e3:
        return f"{count / 1e3:.1f}k"
    return str(count)


def draw_charts(machines: list[Machine], out: Path) -> list[Path]:
    charts = [chart_training_time(machines, out / "training_time.png"),
              chart_phases(machines, out / "phases.png"),
              chart_sampling(machines, out / "sampling_throughput.png")]
    for machine in machines:
        suffix = f"-{machine.name}" if len(machines) > 1 else ""
        configs: dict[tuple, list[dict]] = {}
        for run in machine.runs:
            configs.setdefault(stats.config_key(run.get("config")), []).append(run)
        for runs in configs.values():
            label = stats.config_label(runs[0].get("config"))
            name = (f"loss_curves{suffix}.png" if len(configs) == 1 else
                    f"loss_curves{suffix}-{_file_safe(label)}-{runs[0].get('steps')}steps.png")
            charts.append(chart_loss_curves(
                runs, out / name, f"Training loss, {label}, {runs[0].get('steps')} steps"
                + (f" ({machine.name})" if suffix else "")))
        shapes = {stats.config_key({key: value for key, value in (run.get("config") or {}).items()
                                    if key not in ("num_steps",)}) for run in machine.runs}
        if len(shapes) > 1:
            charts.append(chart_scaling(
                machine.runs, out / f"scaling{suffix}.png",
                f"ms per training step against model size ({machine.title})"))
    return [chart for chart in charts if chart is not None]


def _file_safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in text)


# ---- command -------------------------------------------------------------------------------
# The files `report` wrote in a folder, so that a later report there may replace them (and
# remove the charts it no longer draws) but never a file it did not write.
MANIFEST = ".microgpt-bench-report.json"
CHART_PATTERNS = ("training_time*.png", "sampling_throughput*.png", "loss_curves*.png",
                  "scaling*.png")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="bench.py report",
        description="Merge result files into Markdown and CSV tables and PNG charts.")
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output folder (default: a new folder results/report-<time>); "
                             "an existing folder is written only where report wrote before, "
                             "or with --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="let --out replace report files (report.md, summary.csv, charts) "
                             "that this command did not write there, and remove old charts")
    parser.add_argument("--no-charts", action="store_true", help="tables only")
    return parser


def load_unique(paths: list[Path]) -> tuple[list[tuple[str, dict]], list[str]]:
    """The documents of `paths`, each file once: the same file named twice (or through a
    link, or a byte-identical copy) would count its runs twice. Returns notes on the ones
    left out."""
    import hashlib
    documents, notes, seen = [], [], {}
    for path in paths:
        document = results.load(path)
        try:
            info = path.stat()
            identity = ("file", info.st_dev, info.st_ino)
        except OSError:
            identity = ("file", str(path))
        digest = ("content", hashlib.sha256(path.read_bytes()).hexdigest())
        earlier = seen.get(identity) or seen.get(digest)
        if earlier is not None:
            notes.append(f"{display(path)} is the same result file as {earlier}: counted once")
            continue
        seen[identity] = seen[digest] = display(path)
        documents.append((display(path), document))
    return documents, notes


def _previous_files(out: Path) -> set[str]:
    try:
        names = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return set()
    return {name for name in names if isinstance(name, str) and "/" not in name
            and name not in ("", ".", "..")} if isinstance(names, list) else set()


def write_report(paths: list[Path], out: Path | None = None, charts: bool = True,
                 overwrite: bool = False, notes: list[str] | None = None
                 ) -> tuple[list[Path], str | None]:
    """Write the report; return the files written and a note when charts could not be drawn.

    Everything is drawn into a staging folder first, then moved in: a failure leaves the
    folder as it was. A file of the same name that report did not write there (its manifest)
    is refused without `overwrite`; charts of an earlier report that this one does not draw
    are removed. Without `out`, a new folder results/report-<time> is made."""
    documents, duplicate_notes = load_unique([Path(path) for path in paths])
    if notes is not None:
        notes.extend(duplicate_notes)
    machines = merge_documents(documents)
    if out is None:
        out = new_directory(RESULTS_DIR, "report-" + datetime.datetime.now().strftime(
            "%Y%m%d-%H%M%S"))
    out = Path(out)
    if os.path.lexists(out) and not out.is_dir():
        raise OutputError(f"--out {display(out)} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    previous = _previous_files(out)
    staging = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    try:
        drawn, chart_note = [], None
        if charts:
            try:
                drawn = draw_charts(machines, staging)
            except ChartsUnavailable as error:
                chart_note = str(error)
        write_atomically(staging / "report.md", markdown_text(machines, drawn))
        write_atomically(staging / "summary.csv", csv_text(csv_rows(machines)))
        names = ["report.md", "summary.csv", *(chart.name for chart in drawn)]
        for name in names:
            target = out / name
            if target.is_dir():
                raise OutputError(f"{display(target)} is a folder; choose another --out")
            for source in paths:
                if os.path.lexists(target) and _same(target, Path(source)):
                    raise OutputError(f"{display(target)} is one of the input files; choose "
                                      f"another --out")
            if os.path.lexists(target) and name not in previous and not overwrite:
                raise OutputError(f"{display(target)} exists and was not written by bench.py "
                                  f"report; choose another --out (or a new folder) or pass "
                                  f"--overwrite")
        stale = previous - set(names)
        if overwrite:
            stale |= {path.name for pattern in CHART_PATTERNS for path in out.glob(pattern)
                      if path.is_file() or path.is_symlink()} - set(names)
        for name in names:
            os.replace(staging / name, out / name)
        for name in stale:
            with contextlib.suppress(OSError):
                (out / name).unlink()
        write_atomically(out / MANIFEST, json.dumps(sorted(names)) + "\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out / name for name in names], chart_note


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_guarded(lambda: _main(build_parser().parse_args(argv)))


def _main(args) -> int:
    from rich.console import Console
    notes: list[str] = []
    try:
        written, chart_note = write_report(args.files, args.out, not args.no_charts,
                                           args.overwrite, notes)
    except OSError as error:
        raise UsageError(f"cannot write the report: {error.strerror or error}") from None
    console = Console(stderr=True, soft_wrap=True)
    for note in notes + ([chart_note] if chart_note else []):
        console.print(f"note: {note}", highlight=False, markup=False)
    out = SafeStdout()
    for path in written:
        out.write(display(path) + "\n")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
