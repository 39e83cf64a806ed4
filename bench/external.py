"""Programs outside the suite, in the same table: `bench.py --external NAME='COMMAND ...'`
(README, "Other implementations in the same table").

The command is split like a shell would (but run without one), in the caller's working
directory, under the backends' timeout and memory limit, and its output read as the original
program prints it: `step K / N | loss X` lines (possibly ending in \\r) and optional
`sample K: NAME` lines. The losses are checked against the float64 reference of the same N and
--config, within the print rounding plus the float32 slack of bench.parity. Verdicts: ok,
different init (first loss off but the run learns: timed, not verified), parity-failed,
diverged. ms/step is the process's wall time / N, so it includes process start and the
program's own setup and sampling.
"""
from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import statistics
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from pathlib import Path

from bench.command import UsageError, describe_interrupt
from bench.parity import LOSS_TOLERANCE
from bench.record import (LOSSES, MEDIAN_MS, STEP_MS, STEPS_COMPLETED, TRAIN, TRAIN_S,
                          Status)
from bench.runner import Interrupted, failure_of, supervise
from bench.training import DIVERGENCE_FACTOR

KIND = "external"
DEVICE = "external"
DTYPE = "unknown"  # the suite cannot know what precision a program computes in
# On top of the print rounding: the float32 tolerance, since the program may compute in float32.
PRECISION_SLACK = LOSS_TOLERANCE["float32"]
TIMING_NOTE = ("wall time of the whole process / N steps: includes process start, imports, "
               "data loading, setup and sampling")

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf(?:inity)?)"
# K and N of at most 12 digits: anything longer is not a step count (and is not parsed).
STEP_LINE = re.compile(rf"\bstep\s+(\d{{1,12}})\s*/\s*(\d{{1,12}})\s*\|\s*loss\s*:?\s*"
                       rf"({_NUMBER})(?![\w.])", re.IGNORECASE)
# What a step line must hold to be checked: N a plausible number of steps (the suite's own
# --steps bound), a loss that is a positive number (cross-entropy is > 0; NaN and inf are
# read, as divergence), printed to at least 3 decimals (the original prints 4), since the
# tolerance is taken from the printed digits.
MAX_STEPS = 1_000_000
MAX_PRINT_ROUNDING = 5e-4
# Sample lines kept, and their length: a program's output never grows the result file much.
MAX_SAMPLES = 1000
MAX_SAMPLE_CHARS = 200
SAMPLE_LINE = re.compile(r"^\s*sample\s+(\d+)\s*:\s?(.*?)\s*$", re.IGNORECASE)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


class ExternalSpecError(UsageError):
    """A malformed --external option or a command that does not exist (a usage error)."""


@dataclass(frozen=True)
class ExternalCommand:
    name: str
    argv: list[str]


def parse_external_option(text: str, taken_names=()) -> ExternalCommand:
    """`NAME=COMMAND ...` -> ExternalCommand; raises ExternalSpecError with the fix."""
    name, separator, command = text.partition("=")
    name = name.strip()
    if not separator or not command.strip():
        raise ExternalSpecError(f"--external {text!r}: expected NAME='COMMAND ...', e.g. "
                                f"--external microgpt='python microgpt.py'")
    if not NAME_PATTERN.match(name):
        raise ExternalSpecError(f"--external {text!r}: the name {name!r} must be letters, "
                                f"digits and . _ + - (it becomes the table's backend column)")
    if name in taken_names:
        raise ExternalSpecError(f"--external {name}: the name is already used by a backend "
                                f"or another --external; choose another")
    try:
        argv = shlex.split(command)
    except ValueError as error:
        raise ExternalSpecError(f"--external {name}: cannot split the command ({error})") from None
    if shutil.which(argv[0]) is None:
        raise ExternalSpecError(f"--external {name}: {_why_not_runnable(argv[0])}")
    return ExternalCommand(name, argv)


def _why_not_runnable(program: str) -> str:
    path = Path(program)
    has_folder = os.sep in program or (os.altsep and os.altsep in program)
    try:
        exists = path.exists()
        is_dir = path.is_dir()
    except OSError as error:  # a symlink loop, a name too long
        return f"command {program!r} cannot be used: {error.strerror or error}"
    if has_folder:
        if is_dir:
            return f"command {program!r} is a directory, not a program"
        if exists and not os.access(path, os.X_OK):
            return (f"command {program!r} is not executable (chmod +x it, or run it through "
                    f"its interpreter, e.g. 'python {program}')")
        if not exists:
            return f"command {program!r} not found (no such file)"
    elif exists and not is_dir:
        return (f"command {program!r} not found on PATH (to run the file in this folder, "
                f"write ./{program})")
    return f"command {program!r} not found (not on PATH and not an executable file)"


# ---- reading the output ------------------------------------------------------------------
@dataclass
class StepLoss:
    step: int  # 1-based, as printed
    loss: float
    half_unit: float  # half a unit in the last printed digit: the print rounding


@dataclass
class ParsedOutput:
    steps: dict[int, StepLoss] = field(default_factory=dict)
    totals: set[int] = field(default_factory=set)  # the N of every step line
    samples: dict[int, str] = field(default_factory=dict)

    problems: list[str] = field(default_factory=list)  # step lines that cannot be checked

    def feed(self, line: str) -> StepLoss | bool:
        """Read one line; returns the StepLoss of a step line, True for a sample line and
        False for anything else. A step line that cannot be checked (an implausible N, a loss
        that is not a positive number or has too few digits) is noted in `problems`."""
        match = STEP_LINE.search(line)
        if match:
            step, total, text = int(match[1]), int(match[2]), match[3]
            problem = _step_problem(step, total, text)
            if problem:
                if len(self.problems) < 5:
                    self.problems.append(problem)
                return True
            self.totals.add(total)
            self.steps[step] = StepLoss(step, float(text), _half_unit(text))
            return self.steps[step]
        match = SAMPLE_LINE.match(line)
        if match and len(match[1]) <= 9:
            if len(self.samples) < MAX_SAMPLES or int(match[1]) in self.samples:
                self.samples[int(match[1])] = match[2][:MAX_SAMPLE_CHARS]
            return True
        return False

    @property
    def ordered(self) -> list[StepLoss]:
        return [self.steps[step] for step in sorted(self.steps)]


def _step_problem(step: int, total: int, text: str) -> str | None:
    line = f"`step {step} / {total} | loss {text}`"
    if not 1 <= total <= MAX_STEPS:
        return (f"{line}: N={total:,} is not a plausible number of steps (1..{MAX_STEPS:,})")
    if not 1 <= step <= total:
        return f"{line}: the step is outside 1..N"
    value = float(text)
    if math.isnan(value) or math.isinf(value):
        return None  # read: the run diverged
    if value <= 0:
        return f"{line}: a loss must be a positive number (cross-entropy is > 0)"
    if _half_unit(text) > MAX_PRINT_ROUNDING or _half_unit(text) == 0:
        return (f"{line}: printed with too few digits to be checked (rounding "
                f"+-{_half_unit(text):g}); print at least 3 decimals, as the original's 4")
    return None


def _half_unit(text: str) -> float:
    try:
        exponent = Decimal(text).as_tuple().exponent
    except InvalidOperation:
        return 0.0
    return 0.5 * 10.0 ** exponent if isinstance(exponent, int) else 0.0


# ---- the verdict -------------------------------------------------------------------------
def judge(printed: list[StepLoss], reference: list[float],
          vocab_size: int) -> tuple[Status, str, dict]:
    """(status, message, parity dict) for the printed losses against the reference losses
    (reference[k - 1] is step k's)."""
    diverged_above = DIVERGENCE_FACTOR * math.log(vocab_size)
    for entry in printed:
        if not math.isfinite(entry.loss):
            return Status.DIVERGED, f"loss is {entry.loss} at step {entry.step}", {}
        if entry.loss > diverged_above:
            return Status.DIVERGED, f"loss {entry.loss:.4g} at step {entry.step}", {}
    diffs = [abs(entry.loss - reference[entry.step - 1]) for entry in printed]
    tolerances = [entry.half_unit + PRECISION_SLACK for entry in printed]
    failing = [i for i, (diff, tol) in enumerate(zip(diffs, tolerances)) if diff > tol]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    first = printed[0]
    tolerance_text = (f"tolerance {tolerances[worst]:.3g} = {printed[worst].half_unit:g} print "
                      f"rounding + {PRECISION_SLACK:g} float32 slack")
    parity = {"passed": not failing, "max_abs_diff": diffs[worst],
              "worst_step": printed[worst].step, "tolerance": tolerances[worst],
              "steps_compared": len(printed), "reference": "numpy float64",
              "first_failing_step": printed[failing[0]].step if failing else None}
    if not failing:
        message = (f"matches the float64 reference over {len(printed)} printed steps: max |diff| "
                   f"{diffs[worst]:.3g} at step {printed[worst].step} ({tolerance_text})")
        return Status.OK, _with_message(parity, message), parity
    if failing[0] != 0:
        bad = printed[failing[0]]
        message = (f"step {first.step} matches the float64 reference but step {bad.step} does "
                   f"not: loss {bad.loss} vs {reference[bad.step - 1]:.6f} (|diff| "
                   f"{diffs[failing[0]]:.3g}); max |diff| {diffs[worst]:.3g} at step "
                   f"{printed[worst].step} ({tolerance_text})")
        return Status.PARITY_FAILED, _with_message(parity, message), parity
    start = f"step {first.step} loss {first.loss} is not the reference's " \
            f"{reference[first.step - 1]:.4f} (|diff| {diffs[0]:.3g})"
    learning, trend = _learns([entry.loss for entry in printed])
    if learning:
        message = (f"{start}: another initialisation or data order; the run is sane ({trend}), "
                   f"so it is timed, but its losses cannot be checked")
        return Status.DIFFERENT_INIT, _with_message(parity, message), parity
    message = f"{start}, and the loss does not decrease ({trend})"
    return Status.PARITY_FAILED, _with_message(parity, message), parity


def _with_message(parity: dict, message: str) -> str:
    parity["message"] = message
    return message


def _learns(losses: list[float]) -> tuple[bool, str]:
    """Whether the loss goes down: the mean of the last quarter of the printed losses below the
    mean of the first quarter. Too few lines to tell counts as learning."""
    if len(losses) < 8:
        return True, f"{len(losses)} printed losses, too few to see a trend"
    quarter = len(losses) // 4
    early, late = statistics.fmean(losses[:quarter]), statistics.fmean(losses[-quarter:])
    return late < early, f"mean loss {early:.3f} over the first quarter, {late:.3f} over the last"


# ---- one external run --------------------------------------------------------------------
def run_external(external: ExternalCommand, *, config, vocab_size: int, reference_for,
                 timeout_s: float, memory_limit_mb: int | None = None, on_event=None) -> dict:
    """Run the program once and return its run record (never raises for a failure of the
    program; raises Interrupted on Ctrl-C after stopping it). `reference_for(num_steps, steps)`
    gives the reference losses of the first `steps` steps of a `num_steps`-step run."""
    on_event = on_event or (lambda event: None)
    parsed = ParsedOutput()

    def on_line(line: str) -> bool:
        found = parsed.feed(line)
        if isinstance(found, StepLoss):
            on_event({"event": "losses", "losses": [found.loss], "total": max(parsed.totals)})
        return bool(found)

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # a Python program then prints as it goes
    outcome = supervise(external.argv, timeout_s=timeout_s, memory_limit_mb=memory_limit_mb,
                        env=env, on_stdout_line=on_line)
    printed = parsed.ordered
    total = max(parsed.totals) if parsed.totals else None
    record = {
        "backend": external.name, "kind": KIND, "command": external.argv, "device": DEVICE,
        "dtype": DTYPE, "config": (config.replace(num_steps=total) if total else config).to_dict(),
        "steps": total, "status": Status.ERROR, "returncode": outcome.returncode,
        "wall_s": outcome.wall_s,
        TRAIN: {LOSSES: [entry.loss for entry in printed],
                "loss_steps": [entry.step for entry in printed],
                STEPS_COMPLETED: printed[-1].step if printed else 0},
        "stdout_tail": outcome.stdout_tail, "stderr_tail": outcome.stderr_tail,
    }
    if parsed.samples:
        record["infer"] = {"samples": [parsed.samples[k] for k in sorted(parsed.samples)]}
    where = external.name + (f" after printing step {printed[-1].step} of {total}"
                             if printed else "")
    if outcome.interrupted:
        record.update(status=Status.INTERRUPTED,
                      error=f"interrupted by {describe_interrupt(outcome.interrupt)}, {where}")
        raise Interrupted(record, outcome.interrupt)
    problem = _output_problem(external.name, printed, parsed.totals, outcome.stdout_tail,
                              parsed.problems)
    verdict, reference = None, None
    if printed and not problem:
        try:
            reference = reference_for(total, printed[-1].step)
        except Exception as error:  # bench.reference.ReferenceFailed: over the limits
            reference, problem = None, (f"the float64 reference of its {total} steps could "
                                        f"not be computed: {error}")
    if reference is not None:
        verdict = judge(printed, reference, vocab_size)
        if verdict[2]:  # kept for failed runs too, as a diagnosis
            record["parity"] = verdict[2]

    if outcome.returncode != 0 or outcome.timed_out:
        status, message = failure_of(outcome, timeout_s, memory_limit_mb, where)
        record.update(status=status, error=message)
        return record
    if problem:
        record["error"] = problem
        return record
    status, message, _ = verdict
    if status in (Status.OK, Status.DIFFERENT_INIT) and printed[-1].step != total:
        # Its wall time is not that of N steps: not timed.
        record["error"] = (f"{external.name} exited 0 after printing step {printed[-1].step} "
                           f"of {total}: the run did not finish, so it is not timed")
        return record
    record["status"] = status
    if status != Status.OK:
        record["error"] = message
    if status in (Status.OK, Status.DIFFERENT_INIT, Status.PARITY_FAILED):
        # The same fields as a backend's per-step figures, so it sits in the same table.
        ms_per_step = 1e3 * outcome.wall_s / total
        record[TRAIN].update({MEDIAN_MS.key: ms_per_step, STEP_MS["mean"]: ms_per_step,
                              TRAIN_S.key: outcome.wall_s, "timing": TIMING_NOTE})
    return record


def _output_problem(name: str, printed: list[StepLoss], totals: set[int],
                    stdout_tail: list[str], problems: list[str] = ()) -> str | None:
    """Why the output cannot be checked at all, or None."""
    if problems:
        return f"{name} printed a step line that cannot be checked: {problems[0]}"
    if not printed:
        last = next((line for line in reversed(stdout_tail) if line.strip()), "")
        return (f"{name} printed no `step K / N | loss X` lines"
                + (f"; its last output line: {last.strip()[:200]!r}" if last
                   else " (its output was empty)"))
    if len(totals) > 1:
        return f"{name} printed step lines with different totals N: {sorted(totals)}"
    if printed[0].step < 1 or printed[-1].step > max(totals):
        return (f"{name} printed step numbers outside 1..N: steps {printed[0].step}.."
                f"{printed[-1].step} of {max(totals)}")
    return None
