"""The run record: one run of a backend (bench.worker, bench.runner) or of an external program
(bench.external), as a result file holds it in its "runs" list, and the names every module
reads it by.

A run record is a JSON object: backend, dtype, device, config, steps, `status` (Status; every
status but ok carries `error`, except an external program's different init, which carries a
`note`) and the sections "setup" (seconds), "train" (losses, step times and their
statistics), "infer" (samples, throughput) and "parity". The tables read a few
numbers of it (Figure); a summary row (bench.stats.summarize_runs) holds the same numbers under
the same keys, combined over repeats, plus the row-only keys below.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Status(str, Enum):
    """How a run ended. A str, so result files hold its value and compare equal to it."""
    OK = "ok"
    PARITY_FAILED = "parity-failed"
    UNAVAILABLE = "unavailable"
    ERROR = "error"
    CRASHED = "crashed"
    TIMEOUT = "timeout"
    OUT_OF_MEMORY = "out-of-memory"
    DIVERGED = "diverged"
    INTERRUPTED = "interrupted"
    # An --external program that trains sanely from its own initialisation: timed, but its
    # losses cannot be checked against the reference.
    DIFFERENT_INIT = "different init"
    # Whole-run verdicts of an external program (bench.external, SPEC.md "External programs"):
    # it exited 0 without printing every step 1..N (or every sample it announced); a printed
    # loss is off the reference by more than its print rounding allows; its samples are not
    # the reference's; it could not be started (not found, not executable, exit 126/127).
    INCOMPLETE = "incomplete"
    LOSS_DIFFERS = "loss differs"
    SAMPLES_DIFFER = "samples differ"
    CANNOT_START = "cannot start"

    # The value in f-strings and str() on every Python version (3.11 changed Enum's format).
    __str__ = str.__str__
    __format__ = str.__format__


# Runs whose timings count, and that do not fail a benchmark run.
TIMED_STATUSES = (Status.OK, Status.DIFFERENT_INIT)

SETUP, TRAIN, INFER = "setup", "train", "infer"
LOSSES = "losses"  # in "train": one per step
STEP_SECONDS = "step_seconds"  # in "train": every timed step, raw
STEPS_COMPLETED = "steps_completed"  # in "train"

# The statistics of a run's step times in ms (steps 2..N), by their names in
# bench.stats.describe, and their keys in the "train" section.
STEP_MS = {"median": "ms_per_step_median", "mean": "ms_per_step_mean",
           "min": "ms_per_step_min", "max": "ms_per_step_max", "q1": "ms_per_step_q1",
           "q3": "ms_per_step_q3", "iqr": "ms_per_step_iqr", "std": "ms_per_step_stdev"}


@dataclass(frozen=True)
class Figure:
    """One number of a run record: its section and key. A summary row holds it under the same
    key (bench.stats.summarize_runs)."""
    section: str
    key: str

    def of(self, run: dict):
        """The value in this run, or None (section "" is the record itself)."""
        return (run.get(self.section) or {} if self.section else run).get(self.key)


MEDIAN_MS = Figure(TRAIN, STEP_MS["median"])
Q1_MS = Figure(TRAIN, STEP_MS["q1"])
MIN_MS = Figure(TRAIN, STEP_MS["min"])
STEP_IQR_MS = Figure(TRAIN, STEP_MS["iqr"])
FIRST_STEP_MS = Figure(TRAIN, "first_step_ms")
TRAIN_S = Figure(TRAIN, "total_s")  # every timed step, the first included
COMPILE_S = Figure(SETUP, "compile_s")
TOKENS_PER_S = Figure(INFER, "tokens_per_s")
SAMPLING_S = Figure(INFER, "total_s")
FLOPS_PER_STEP = Figure(TRAIN, "flops_per_step")  # the spec's work, real lengths, mean
# Process start to exit of the worker, as `time` would measure a program: interpreter start,
# imports, data, compile, the suite's warm-up steps, training, sampling, teardown.
END_TO_END_S = Figure("", "wall_s")
# How an external program's ms/step was measured (bench.external): its steady state, read from
# the arrival times of its step lines, or, where those arrive in batches, end-to-end time / N.
TIMING_BASIS = Figure(TRAIN, "ms_per_step_basis")
BASIS_STEADY_STATE = "steady state"
BASIS_END_TO_END = "end-to-end / N"
# The phases of a run (seconds), for the chart of where the time goes.
IMPORT_S, DATA_S, INIT_S, WARMUP_S = (Figure(SETUP, key) for key in (
    "import_s", "data_s", "init_s", "warmup_s"))

# The figures a summary row shows, each the median over the row's timed runs.
ROW_FIGURES = (MEDIAN_MS, STEP_IQR_MS, FIRST_STEP_MS, TRAIN_S, COMPILE_S, TOKENS_PER_S,
               FLOPS_PER_STEP, END_TO_END_S, IMPORT_S, DATA_S, INIT_S, WARMUP_S)
SAMPLING_ROW_KEY = "sampling_s"  # SAMPLING_S in a summary row (its key is TRAIN_S's too)
# The figures a summary row describes over repeats (bench.stats.describe), in row["repeats"]
# under these names.
REPEATS = {MEDIAN_MS: "ms_per_step", TRAIN_S: "total_s", TOKENS_PER_S: "tokens_per_s"}

# Keys only a summary row has.
CI_LOW, CI_HIGH = "ms_per_step_ci_low", "ms_per_step_ci_high"  # over repeats
SPEEDUP_VS_SLOWEST, SPEEDUP_VS_NUMPY = "speedup_vs_slowest", "speedup_vs_numpy"
FINAL_LOSS = "final_loss"
GFLOPS = "gflops"  # achieved: FLOPS_PER_STEP over the median step time
PERCENT_OF_PEAK = "percent_of_peak"  # GFLOPS against the machine's measured peak
DIVISION, TUNINGS = "division", "tunings"  # from the run records (registry at run time)


def losses_of(run: dict) -> list[float]:
    return (run.get(TRAIN) or {}).get(LOSSES) or []


def is_timed(run: dict) -> bool:
    """A run whose time per step counts: it passed (or is an external program's own init)
    and has a time per step."""
    return run.get("status") in TIMED_STATUSES and (MEDIAN_MS.of(run) or 0) > 0
