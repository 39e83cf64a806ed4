"""Result files: a versioned JSON document (environment + runs) written atomically after every
run, a Markdown table beside it, and a loader that refuses files it does not understand.

Schema (SCHEMA_VERSION 2; version 1 files are read and migrated, see `migrate`):
  {"schema_version": 2, "suite": "microgpt-bench", "created": ISO time, "command": [...],
   "environment": {...bench.environment...}, "complete": bool,
   "threads"?: {"requested", "environment"} (--threads),
   "runs": [run records (bench.record), each with "repeat", "division", "implementation"
            ("module:Class") and "tunings", and, in a sweep, "sweep":
            {"preset", "batch_size", "label", "parameters", ...}],
   "sweep"?: {"presets", "batch_sizes", "steps", "budget_s", "skipped": [...], ...}}
The "sweep" keys appear only in files written by `bench.py sweep` (bench.sweep).

The Markdown beside it: the summary table (bench.stats.summarize_runs: medians over repeats,
95% confidence intervals), instability warnings, a sweep's pivot table, and failed runs.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench.command import UsageError
from bench.files import RESULTS_DIR, display, write_atomically
from bench.record import (CI_HIGH, CI_LOW, COMPILE_S, DIVISION, END_TO_END_S, FINAL_LOSS,
                          FIRST_STEP_MS, GFLOPS, MEDIAN_MS, PERCENT_OF_PEAK, SAMPLING_S,
                          SPEEDUP_VS_NUMPY, SPEEDUP_VS_SLOWEST, STEP_IQR_MS, STEP_MS,
                          TIMED_STATUSES, TIMING_BASIS, BASIS_STEADY_STATE, TOKENS_PER_S,
                          TRAIN_S, TUNINGS, Status)

SAMPLING_S_KEY = SAMPLING_S.key
from bench.stats import several_configs, several_step_counts, summarize_runs, summary_notes

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
# What each backend name ran before version 2 (before the divisions): four names then meant
# today's tuned implementations. Version 1 runs get these, so that no tool pairs them with
# today's idiomatic rows of the same name.
LEGACY_IMPLEMENTATIONS = {
    "torch": "backends.torch_tuned:TorchTunedBackend",
    "torch-compile": "backends.torch_tuned:TorchCompileTunedBackend",
    "mlx": "backends.mlx_tuned:MLXTunedBackend",
    "jax": "backends.jax_tuned:JaxTunedBackend",
}


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


MAX_RESULT_FILE_BYTES = 1 << 30


def load(path: str | os.PathLike) -> dict:
    """The document of a result file, checked against the schema (`validate`): every reader
    (compare, report, abtest) gets a document whose fields have the types it reads, or a
    ResultFileError naming the file and the field (one line, exit code 2)."""
    path = Path(path)
    name = display(path)
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise ResultFileError(f"{name}: is a directory, not a result file")
        if not stat.S_ISREG(info.st_mode):
            raise ResultFileError(f"{name}: not a regular file")
        if info.st_size > MAX_RESULT_FILE_BYTES:
            raise ResultFileError(f"{name}: {info.st_size:,} bytes, too large for a result "
                                  f"file (at most {MAX_RESULT_FILE_BYTES:,})")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ResultFileError(f"{name}: no such file") from None
    except OSError as error:
        raise ResultFileError(f"{name}: cannot read ({error.strerror or error})") from None
    try:
        document = json.loads(raw)
    except RecursionError:
        raise ResultFileError(f"{name}: not a microgpt-bench result file (nested too "
                              f"deeply)") from None
    except ValueError as error:
        raise ResultFileError(f"{name}: not valid JSON, perhaps cut short ({error})") from None
    validate(document, name)
    return migrate(document)


def migrate(document: dict) -> dict:
    """A version 1 document as version 2: each backend run gets the implementation its name
    ran then (LEGACY_IMPLEMENTATIONS, else today's registry entry of the name) and its
    division, marked `"implementation_inferred": true`."""
    if document["schema_version"] != 1:
        return document
    from backends import REGISTRY
    for run in document["runs"]:
        if run.get("kind") == "external" or run.get("implementation"):
            continue
        name = run.get("backend")
        if name in LEGACY_IMPLEMENTATIONS:
            run.update(implementation=LEGACY_IMPLEMENTATIONS[name], division="tuned")
        elif name in REGISTRY:
            info = REGISTRY[name]
            run.update(implementation=info.target, division=info.division)
        run["implementation_inferred"] = True
    document["schema_version"] = SCHEMA_VERSION
    return document


# ---- the schema ----------------------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value) -> str:
    text = (repr(value) if isinstance(value, str)
            else json.dumps(value, allow_nan=True, default=str))
    return text if len(text) <= 60 else text[:57] + "..."


class _Checker:
    """Type checks of one document, each failure one line naming the field."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, expected: str, value) -> None:
        raise ResultFileError(f"{self.source}: {where}: expected {expected}, got "
                              f"{_shown(value)}")

    def object(self, where, value, optional=True) -> dict:
        if value is None and optional:
            return {}
        if not isinstance(value, dict):
            self.fail(where, "an object", value)
        return value

    def list(self, where, value, optional=True) -> list:
        if value is None and optional:
            return []
        if not isinstance(value, list):
            self.fail(where, "a list", value)
        return value

    def text(self, where, value, optional=True, empty=True) -> None:
        if value is None and optional:
            return
        if not isinstance(value, str) or (not empty and not value):
            self.fail(where, "a string" if empty else "a non-empty string", value)

    def boolean(self, where, value) -> None:
        if value is not None and not isinstance(value, bool):
            self.fail(where, "true or false", value)

    def count(self, where, value) -> None:
        if value is not None and not (_is_int(value) and value >= 0):
            self.fail(where, "an integer >= 0", value)

    def time(self, where, value) -> None:
        """A duration or a rate: a finite number >= 0 (or null)."""
        if value is not None and not (_is_number(value) and math.isfinite(value)
                                      and value >= 0):
            self.fail(where, "a finite number >= 0", value)

    def number(self, where, value) -> None:
        if value is not None and not _is_number(value):
            self.fail(where, "a number", value)


_TRAIN_TIMES = (*STEP_MS.values(), FIRST_STEP_MS.key, TRAIN_S.key)
_SETUP_TIMES = ("import_s", "data_s", "init_s", COMPILE_S.key, "warmup_s")
_STATUSES = {status.value for status in Status}


def validate(document, source: str = "result file") -> None:
    """Raise ResultFileError unless `document` is a result file of SCHEMA_VERSION whose every
    field the tools read has its type: numbers where numbers are read (times finite and
    >= 0), runs a list of objects with a backend and a known status, environment an object."""
    check = _Checker(source)
    if not isinstance(document, dict) or document.get("suite") != "microgpt-bench":
        raise ResultFileError(f"{source}: not a microgpt-bench result file")
    version = document.get("schema_version")
    if not _is_int(version) or version not in READABLE_VERSIONS:
        raise ResultFileError(f"{source}: schema_version {version!r} is not supported "
                              f"(this suite reads versions "
                              f"{', '.join(map(str, READABLE_VERSIONS))})")
    if not isinstance(document.get("runs"), list):
        raise ResultFileError(f"{source}: has no list of runs")
    check.text("created", document.get("created"))
    for index, part in enumerate(check.list("command", document.get("command"))):
        check.text(f"command[{index}]", part, optional=False)
    check.boolean("complete", document.get("complete"))
    environment = check.object("environment", document.get("environment"), optional=False)
    for key in ("machine_fingerprint", "hostname"):
        check.text(f"environment.{key}", environment.get(key))
    cpu = check.object("environment.cpu", environment.get("cpu"))
    check.text("environment.cpu.model", cpu.get("model"))
    check.count("environment.cpu.usable_cores", cpu.get("usable_cores"))
    for key in ("os", "python", "thread_settings"):
        check.object(f"environment.{key}", environment.get(key))
    check.text("environment.os.platform", (environment.get("os") or {}).get("platform"))
    check.text("environment.python.version",
               (environment.get("python") or {}).get("version"))
    git = check.object("environment.git", environment.get("git"))
    check.text("environment.git.commit", git.get("commit"))
    for index, gpu in enumerate(check.list("environment.accelerators",
                                           environment.get("accelerators"))):
        check.object(f"environment.accelerators[{index}]", gpu, optional=False)
    check.object("dataset", document.get("dataset"))
    for index, run in enumerate(document["runs"]):
        _validate_run(check, f"runs[{index}]", run)
    sweep = check.object("sweep", document.get("sweep"))
    for index, item in enumerate(check.list("sweep.skipped", sweep.get("skipped"))):
        where = f"sweep.skipped[{index}]"
        check.object(where, item, optional=False)
        for key in ("backend", "dtype", "preset", "reason"):
            check.text(f"{where}.{key}", item.get(key), optional=False)
        for key in ("batch_size", "parameters"):
            check.count(f"{where}.{key}", item.get(key))
            if item.get(key) is None:
                check.fail(f"{where}.{key}", "an integer >= 0", None)
    for key in ("budget_s", "elapsed_s"):
        check.time(f"sweep.{key}", sweep.get(key))


def _validate_run(check: _Checker, where: str, run) -> None:
    check.object(where, run, optional=False)
    check.text(f"{where}.backend", run.get("backend"), optional=False, empty=False)
    status = run.get("status")
    if status not in _STATUSES:
        check.fail(f"{where}.status", "one of " + ", ".join(sorted(_STATUSES)), status)
    for key in ("dtype", "device", "error", "kind"):
        check.text(f"{where}.{key}", run.get(key))
    check.count(f"{where}.steps", run.get("steps"))
    check.count(f"{where}.repeat", run.get("repeat"))
    check.time(f"{where}.wall_s", run.get("wall_s"))
    check.boolean(f"{where}.test_hook", run.get("test_hook"))
    config = check.object(f"{where}.config", run.get("config"))
    for key, value in config.items():
        if not (value is None or isinstance(value, (str, int, float, bool))):
            check.fail(f"{where}.config.{key}", "a number or a string", value)
    setup = check.object(f"{where}.setup", run.get("setup"))
    for key in _SETUP_TIMES:
        check.time(f"{where}.setup.{key}", setup.get(key))
    train = check.object(f"{where}.train", run.get("train"))
    for index, loss in enumerate(check.list(f"{where}.train.losses", train.get("losses"))):
        check.number(f"{where}.train.losses[{index}]", loss)
        if loss is None:
            check.fail(f"{where}.train.losses[{index}]", "a number", None)
    for index, seconds in enumerate(check.list(f"{where}.train.step_seconds",
                                               train.get("step_seconds"))):
        check.time(f"{where}.train.step_seconds[{index}]", seconds)
        if seconds is None:
            check.fail(f"{where}.train.step_seconds[{index}]", "a finite number >= 0", None)
    for index, step in enumerate(check.list(f"{where}.train.loss_steps",
                                            train.get("loss_steps"))):
        if not _is_int(step):
            check.fail(f"{where}.train.loss_steps[{index}]", "an integer", step)
    check.count(f"{where}.train.steps_completed", train.get("steps_completed"))
    for key in _TRAIN_TIMES:
        check.time(f"{where}.train.{key}", train.get(key))
    infer = check.object(f"{where}.infer", run.get("infer"))
    for index, sample in enumerate(check.list(f"{where}.infer.samples", infer.get("samples"))):
        check.text(f"{where}.infer.samples[{index}]", sample, optional=False)
    check.count(f"{where}.infer.tokens", infer.get("tokens"))
    for key in (SAMPLING_S_KEY, TOKENS_PER_S.key):
        check.time(f"{where}.infer.{key}", infer.get(key))
    parity = check.object(f"{where}.parity", run.get("parity"))
    check.boolean(f"{where}.parity.passed", parity.get("passed"))
    check.number(f"{where}.parity.max_abs_diff", parity.get("max_abs_diff"))
    versions = check.object(f"{where}.framework_versions", run.get("framework_versions"))
    for key, value in versions.items():
        check.text(f"{where}.framework_versions.{key}", value, optional=False)
    for key in ("details", "process_settings"):
        check.object(f"{where}.{key}", run.get(key))
    for key in ("stdout_tail", "stderr_tail"):
        for index, line in enumerate(check.list(f"{where}.{key}", run.get(key))):
            check.text(f"{where}.{key}[{index}]", line, optional=False)
    sweep = check.object(f"{where}.sweep", run.get("sweep"))
    if sweep:
        check.text(f"{where}.sweep.label", sweep.get("label"), optional=False)
        for key in ("parameters", "batch_size"):
            check.count(f"{where}.sweep.{key}", sweep.get(key))
            if sweep.get(key) is None:
                check.fail(f"{where}.sweep.{key}", "an integer >= 0", None)


# ---- tables --------------------------------------------------------------------------------
def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _speedup(value) -> str:
    """A ratio of medians with its digits at any size: `7.42x faster`, `1,724.0x slower`
    (`1.00x` for the row itself)."""
    if value is None:
        return "-"
    return "1.00x" if round(value, 2) == 1 else ratio_text(value)


def ms_per_step_cell(row: dict) -> str:
    """The median ms/step, marked where it is not a per-step median: an external program
    whose step lines arrived in batches is timed end-to-end / N (bench.external)."""
    value = row.get(MEDIAN_MS.key)
    if value is None:
        return "-"
    basis = row.get(TIMING_BASIS.key)
    return f"{value:.4f}" + ("" if basis in (None, BASIS_STEADY_STATE) else f" ({basis})")


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
STEPS_COLUMN = Column("steps", "steps", lambda row: _fmt(row.get("steps"), ","))
SUMMARY_COLUMNS = (
    _text("backend"), _text(DIVISION), _text("device"), _text("dtype"), CONFIG_COLUMN,
    STEPS_COLUMN, _text("status"),
    Column("ms/step (median)", MEDIAN_MS.key, ms_per_step_cell),
    Column("95% CI", CI_LOW, _ci),
    Column("step IQR", STEP_IQR_MS.key, ".4f"),
    Column("first step ms", FIRST_STEP_MS.key, ".3f"),
    Column("total s", TRAIN_S.key, ".3f"),
    Column("compile s", COMPILE_S.key, ".2f"),
    Column("end-to-end s", END_TO_END_S.key, ".2f"),
    Column("GFLOP/s", GFLOPS, ".3f"),
    Column("% of peak", PERCENT_OF_PEAK, ".2f"),
    _speedup_column("vs slowest", SPEEDUP_VS_SLOWEST),
    _speedup_column("vs numpy", SPEEDUP_VS_NUMPY),
    Column("final loss", FINAL_LOSS, ".4f"),
    Column("sampling tok/s", TOKENS_PER_S.key,
           lambda row: f"{row[TOKENS_PER_S.key]:,.0f}" if row.get(TOKENS_PER_S.key) else "-"),
    Column("n", "n", "d"),
)


def summary_columns(rows: list[dict]) -> list[Column]:
    """The columns of these rows' table: the config column only when they differ in config,
    the steps column only when they differ in steps."""
    return [column for column in SUMMARY_COLUMNS
            if (column is not CONFIG_COLUMN or several_configs(rows))
            and (column is not STEPS_COLUMN or several_step_counts(rows))]


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
    "config. Only rows with status ok passed the parity check against the float64 reference. "
    "\"end-to-end s\" is the worker process from start to exit, as `time` measures a program "
    "(imports, data, compile, the suite's warm-up steps, training, sampling). \"GFLOP/s\" is "
    "the spec's arithmetic per step (real lengths, no padding) over the median step time; "
    "\"% of peak\" sets it against this machine's measured single-core float32 peak.")
# Under a table with external programs (device "external"): what their figures are instead.
EXTERNAL_FOOTNOTE = (
    "External programs (device \"external\") are timed from outside, from the arrival of "
    "their step lines: their ms/step is the steady state, the median interval between "
    "consecutive step lines after the first (steps 2..N, as for the backends, but including "
    "whatever the program does between two lines, its printing too), and \"step IQR\" the "
    "spread of those intervals; where their lines arrive in batches (buffered output) there "
    "is no steady state and ms/step is \"end-to-end / N\", marked so. Their \"end-to-end s\" "
    "is the program from launch to exit; \"first step ms\", \"total s\" and \"compile s\" "
    "are not measured for them (the time to their first step line is under \"External "
    "programs\").")


def table_footnote(rows: list[dict]) -> str:
    """The note under a summary table, with what external rows' figures are when it has
    any."""
    if any(row.get("kind") == "external" for row in rows):
        return TABLE_FOOTNOTE + " " + EXTERNAL_FOOTNOTE
    return TABLE_FOOTNOTE


def describe_timing(timing: dict) -> str:
    """An external program's timing (bench.external.line_timing) in one line for the terminal
    and the Markdown: each figure named for what it is."""
    steady = timing.get("steady_state")
    parts = []
    if steady:
        parts.append(f"steady state {steady['median']:.4f} ms/step (median of "
                     f"{steady['intervals']:,} intervals between step lines, IQR "
                     f"{steady['iqr']:.4f} ms)")
    else:
        parts.append(f"{timing['end_to_end_per_step_ms']:.4f} ms/step = end-to-end / N (no "
                     f"steady state: {timing.get('steady_state_unavailable')})")
    if timing.get("first_step_line_s") is not None:
        parts.append(f"first step line after {timing['first_step_line_s']:.3f} s")
    parts.append(f"end to end {timing['end_to_end_s']:.3f} s")
    return ", ".join(parts)


def external_lines(runs: list[dict]) -> list[str]:
    """How each external program was run and timed, one line per configuration: its timing
    (steady state, first step line, end to end), its precision and the command that ran it,
    quoted to paste back (the terminal prints them too)."""
    lines = []
    for key, group in _configurations(runs, lambda run: run.get("kind") == "external"):
        # A run that did not pass is not timed, whatever its lines' arrival times say.
        timed = [run for run in group
                 if run.get("timing") and run.get("status") in TIMED_STATUSES]
        latest = (timed or group)[-1]
        where = f" in `{latest['directory']}`" if latest.get("directory") else ""
        described = (f", described by `{latest['description']}`"
                     if latest.get("description") else "")
        what = [f"`{shlex.join(latest.get('command') or [])}`{where}{described}",
                f"precision {latest.get('precision') or 'not declared'}"]
        if timed:
            what.append(describe_timing(latest["timing"])
                        + (f" (run #{latest.get('repeat', 0) + 1} of {len(group)})"
                           if len(group) > 1 else ""))
        lines.append(f"{key}: " + "; ".join(what))
    return lines


def external_markdown(runs: list[dict]) -> str:
    lines = external_lines(runs)
    if not lines:
        return ""
    return "\n".join(["## External programs", "", *(f"- {line}" for line in lines)]) + "\n"


def _configurations(runs: list[dict], keep) -> list[tuple[str, list[dict]]]:
    """The runs `keep` keeps, grouped by configuration (name, dtype and step count), in order,
    as `name (dtype)` labels, `name (dtype, N steps)` where the runs differ in steps."""
    several_counts = several_step_counts(runs)
    groups: dict[str, list[dict]] = {}
    for run in filter(keep, runs):
        steps = run.get("steps")
        label = f"{run['backend']} ({run.get('dtype')}" + (
            f", {steps:,} steps)" if several_counts and isinstance(steps, int) else ")")
        groups.setdefault(label, []).append(run)
    return list(groups.items())


def run_notes(runs: list[dict], keep=lambda run: run.get("status") != Status.OK) -> list[str]:
    """One line per configuration and reason for the runs `keep` keeps (those that did not
    pass): a reason that every repeat shares is said once, with the repeats it applies to."""
    lines = []
    repeated = any(run.get("repeat") for run in runs)
    for label, group in _configurations(runs, keep):
        reasons: dict[tuple, list[dict]] = {}
        for run in group:
            reasons.setdefault((run["status"], run.get("error") or run.get("note") or ""),
                               []).append(run)
        for (status, reason), same in reasons.items():
            which = ""
            if repeated:
                numbers = ", ".join(f"#{run.get('repeat', 0) + 1}" for run in same)
                which = f" (run {numbers})" if len(same) == 1 else f" (runs {numbers})"
            lines.append(f"{label}{which}: {status}: {reason}")
    return lines


def command_text(command: list[str]) -> str:
    """The command a result file was made with, quoted so that it pastes back into a shell
    (`python bench.py ...` when it was bench.py)."""
    if not command:
        return ""
    prefix = "python " if str(command[0]).endswith(".py") else ""
    return prefix + shlex.join(str(part) for part in command)


def limits_lines(environment: dict) -> list[str]:
    """What the suite can resolve here (bench.limits), for under the tables."""
    lines = []
    floor = environment.get("harness_floor_ms")
    if isinstance(floor, (int, float)):
        lines.append(f"Harness floor: the timed loop around a backend that does nothing costs "
                     f"{floor * 1e3:.2f} us per step here; differences below it are not "
                     f"resolved.")
    peak = environment.get("peak") or {}
    if isinstance(peak.get("gflops"), (int, float)):
        lines.append(f"Machine peak: {peak['gflops']:.1f} GFLOP/s ({peak.get('method', '?')}).")
    return lines


def tuning_rows(rows: list[dict]) -> list[dict]:
    """What tuning bought: each tuned row beside the idiomatic row it is measured against
    (its registry baseline), where both were timed at the same dtype, device and config."""
    from backends import REGISTRY
    timed = {(row["backend"], row["dtype"], row.get("device"), row.get("config_key")): row
             for row in rows if row.get(MEDIAN_MS.key)}
    pairs = []
    for (name, dtype, device, config), tuned in timed.items():
        info = REGISTRY.get(name)
        baseline = timed.get((info.baseline, dtype, device, config)) if info else None
        if tuned.get(DIVISION) == "tuned" and baseline is not None:
            pairs.append({"idiomatic": baseline, "tuned": tuned,
                          "speedup": baseline[MEDIAN_MS.key] / tuned[MEDIAN_MS.key]})
    return pairs


def tuning_markdown(rows: list[dict]) -> str:
    pairs = tuning_rows(rows)
    if not pairs:
        return ""
    lines = ["## What tuning buys", "",
             "| idiomatic row | ms/step | tuned row | ms/step | tuned is | tunings |",
             "|---|---|---|---|---|---|"]
    for pair in pairs:
        idiomatic, tuned = pair["idiomatic"], pair["tuned"]
        lines.append(f"| {idiomatic['backend']} {idiomatic['dtype']} | "
                     f"{idiomatic[MEDIAN_MS.key]:.4f} | {tuned['backend']} | "
                     f"{tuned[MEDIAN_MS.key]:.4f} | {ratio_text(pair['speedup'])} | "
                     f"{'; '.join(tuned.get(TUNINGS) or [])} |")
    return "\n".join(lines) + "\n"


def ratio_text(speedup: float) -> str:
    """`3.2x faster` / `1.5x slower`, with digits at any size."""
    if speedup >= 1:
        return f"{speedup:,.{2 if speedup < 10 else 1}f}x faster"
    slower = 1 / speedup
    return f"{slower:,.{2 if slower < 10 else 1}f}x slower"


def markdown_report(document: dict) -> str:
    env = document.get("environment", {})
    versions = {}
    for run in document.get("runs", []):
        versions.update(run.get("framework_versions") or {})
    rows = summarize_runs(document.get("runs", []), (env.get("peak") or {}).get("gflops"))
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
        f"- Command: `{command_text(document.get('command', []))}`",
        "" if document.get("complete") else "- **Incomplete**: the run was stopped early.",
        *([f"- **Test hook**: {', '.join(sorted((document['test_hook'].get('backends') or {})))} "
           f"registered by {document['test_hook'].get('variable')} (test backends, not "
           f"measurements of the suite's backends)", ""]
          if isinstance(document.get("test_hook"), dict) else []),
        "",
        markdown_table(rows),
        table_footnote(rows),
        *(["", *limits_lines(env)] if limits_lines(env) else []),
    ]
    if external_markdown(document.get("runs", [])):
        parts += ["", external_markdown(document.get("runs", []))]
    if tuning_markdown(rows):
        parts += ["", tuning_markdown(rows)]
    tuned = {row["backend"]: row.get(TUNINGS) for row in rows if row.get(DIVISION) == "tuned"}
    if tuned:
        parts += ["", "## Tunings of the tuned rows", ""]
        parts += [f"- {name}: {'; '.join(tunings or ['-'])}" for name, tunings in tuned.items()]
    threads = document.get("threads")
    if isinstance(threads, dict):
        variables = ", ".join(f"{key}={value}"
                              for key, value in (threads.get("environment") or {}).items())
        parts += ["", f"Threads: --threads {threads.get('requested')} for every row "
                      f"({variables})."]
    if document.get("sweep"):
        parts += ["", sweep_markdown(document)]
    notes = summary_notes(rows)
    if notes:
        parts += ["", "## Warnings", ""] + [f"- {note}" for note in notes]
    runs = document.get("runs", [])
    for title, keep in (
            ("Runs that did not pass", lambda run: run.get("status") not in TIMED_STATUSES),
            ("Timed but not verifiable against the reference",
             lambda run: run.get("status") in TIMED_STATUSES and run.get("status") != Status.OK)):
        notes = run_notes(runs, keep)
        if notes:
            parts += ["", f"## {title}", ""] + [f"- {line}" for line in notes]
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


# What a sweep's pivot tables show, one table each: title and the cell of a summary row.
SWEEP_TABLES = (
    ("median ms per training step", lambda row: _fmt(row.get(MEDIAN_MS.key), ".4f")),
    ("compile s (prepare(): what a new shape costs before its first step)",
     lambda row: _fmt(row.get(COMPILE_S.key), ".2f")),
    ("achieved GFLOP/s (% of the measured peak)",
     lambda row: "-" if row.get(GFLOPS) is None else
     f"{row[GFLOPS]:.2f} ({_fmt(row.get(PERCENT_OF_PEAK), '.1f')}%)"),
)


def sweep_markdown(document: dict) -> str:
    """A sweep's pivot tables (median ms per step, compile time and achieved GFLOP/s:
    backends down, configurations across) and the runs it skipped, with the reason."""
    sweep, runs = document["sweep"], document.get("runs", [])
    columns: dict[str, tuple[int, int]] = {}  # configuration label -> (parameters, batch)
    sizes = {run["sweep"]["label"]: (run["sweep"]["parameters"], run["sweep"]["batch_size"])
             for run in runs if run.get("sweep")}
    rows = summarize_runs(runs, ((document.get("environment") or {}).get("peak") or {})
                          .get("gflops"))
    for row in rows:
        columns.setdefault(row["config"], sizes.get(row["config"], (0, 0)))
    skipped = {}
    for item in sweep.get("skipped", []):
        label = (item["preset"] if item["batch_size"] == 1
                 else f"{item['preset']} b{item['batch_size']}")
        columns.setdefault(label, (item["parameters"], item["batch_size"]))
        skipped[(f"{item['backend']} {item['dtype']}", label)] = "skipped"
    ordered = sorted(columns, key=lambda label: (columns[label], label))  # size, then batch
    names = list(dict.fromkeys([f"{row['backend']} {row['dtype']}" for row in rows]
                               + [name for name, _ in skipped]))
    lines = [f"Sweep: {sweep.get('steps')} steps per run, budget "
             f"{sweep.get('budget_s', 0):.0f} s, took {sweep.get('elapsed_s', 0):.0f} s."]
    for title, cell in SWEEP_TABLES:
        cells = {(f"{row['backend']} {row['dtype']}", row["config"]):
                 cell(row) if row.get(MEDIAN_MS.key) is not None else str(row["status"])
                 for row in rows}
        lines += ["", f"## Sweep: {title}", "",
                  "| backend | " + " | ".join(f"{label} ({columns[label][0]:,} params)"
                                             for label in ordered) + " |",
                  "|" + "|".join(["---"] * (len(ordered) + 1)) + "|"]
        lines += [f"| {name} | " + " | ".join({**skipped, **cells}.get((name, label), "-")
                                            for label in ordered) + " |" for name in names]
    if sweep.get("skipped"):
        lines += ["", "Skipped (projection: the backend's run of the previous preset at the same "
                  "batch size, else its latest run, scaled by estimated FLOPs):", ""]
        lines += [f"- {item['backend']} {item['dtype']} {item['preset']} batch "
                  f"{item['batch_size']}: {item['reason']}" for item in sweep["skipped"]]
    return "\n".join(lines) + "\n"
