"""Programs outside the suite, in the same table (README, "Any program in the same table"):
`bench.py --external NAME='COMMAND ...'` for quick use, `bench.py --external-file port.toml`
for a program described in full (examples/microgpt_port/port.toml is the template).

What the suite does with one:

- runs it without a shell, in its own folder, under the backends' timeout and memory limit,
  after placing a copy of the suite's verified dataset where it reads its data, and after its
  build command (once, cached by the description's content); `{steps}` and `{samples}` in its
  command become the run's --steps and --samples;
- reads its stdout as it arrives: `step K / N | loss X` lines (possibly ended by \\r) and
  `sample K: NAME` lines, or the description's own patterns;
- times it from the arrival of its step lines: the steady state is the median interval between
  consecutive step lines after the first (the backends' steps 2..N), beside the time to the
  first step line and the end-to-end wall time. Output that arrives in batches (buffered) has
  no steady state to read: then ms/step is end-to-end / N, and says so;
- judges the whole run (SPEC.md, "External programs"): `ok` only when it printed every step
  1..N, exited 0, every loss is within half a unit of its last printed digit of the float64
  reference (plus the float32 allowance only when it declares float32), and its samples are the
  reference's. Otherwise `incomplete`, `loss differs`, `samples differ`, `different init` (its
  own initialisation: timed, not verified), `diverged`, `cannot start`, or a process failure.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import statistics
import time
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib

from bench.command import UsageError, describe_interrupt
from bench.files import REPO_ROOT, display, write_atomically
from bench.parity import FLOAT32_DRIFT_FACTOR, LOSS_TOLERANCE
from bench.record import (BASIS_END_TO_END, BASIS_STEADY_STATE, LOSSES, STEP_MS,
                          STEPS_COMPLETED, TIMING_BASIS, TRAIN, Status)
from bench.runner import (Interrupted, describe_exit, failure_of, stderr_reason, supervise)
from bench.stats import describe
from bench.training import DIVERGENCE_FACTOR

KIND = "external"
DEVICE = "external"
DTYPE = "unknown"  # what a program without a description computes in is not known
PRECISIONS = ("float32", "float64")

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf(?:inity)?)"
# K and N of at most 12 digits: anything longer is not a step count (and is not parsed).
STEP_LINE = re.compile(rf"\bstep\s+(?P<step>\d{{1,12}})\s*/\s*(?P<total>\d{{1,12}})\s*\|\s*"
                       rf"loss\s*:?\s*(?P<loss>{_NUMBER})(?![\w.])", re.IGNORECASE)
# What a step line must hold to be checked: N a plausible number of steps (the suite's own
# --steps bound), a loss that is a positive number (cross-entropy is > 0; NaN and inf are
# read, as divergence), printed to at least 3 decimals (the original prints 4), since the
# tolerance is taken from the printed digits.
MAX_STEPS = 1_000_000
MAX_PRINT_ROUNDING = 5e-4
# Sample lines kept, and their length: a program's output never grows the result file much.
MAX_SAMPLES = 1000
MAX_SAMPLE_CHARS = 200
SAMPLE_LINE = re.compile(r"^\s*sample\s+(?P<index>\d{1,9})\s*:\s?(?P<sample>.*?)\s*$",
                         re.IGNORECASE)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
# Words of a command that the suite replaces by the run's --steps and --samples, so that one
# description follows the options it is run with (str.replace: no other brace is touched).
STEPS_PLACEHOLDER, SAMPLES_PLACEHOLDER = "{steps}", "{samples}"

# The steady state needs one read per step line: when more than this share of the step lines
# came in the same read as the line before, the program's output arrives in batches (a
# buffered stdout, or steps faster than a pipe is read) and the gaps are not step times. Below
# it, a line read late (a busy machine) adds one short and one long interval, one on either
# side of the median, which stays a step time.
MAX_BATCHED_SHARE = 0.25
FLUSH_ADVICE = ("flush stdout after every step line (Python: print(..., flush=True); C and "
                "C++: fflush(stdout) or setvbuf(stdout, NULL, _IOLBF, 0); Rust: "
                "io::stdout().flush())")
# Exit codes with which a shell or a wrapper (env, sh -c, a script) says the program it was
# asked to run was not found (127) or could not be executed (126).
CANNOT_START_CODES = {126: "found but could not be executed", 127: "not found"}

BUILD_CACHE_DIR = REPO_ROOT / "data" / "cache" / "external-builds"
# The line of a failed build that says what went wrong: a compiler's "error:" or
# "error[E0425]:", "fatal error:", or an exception's "...Error:".
_ERROR_LINE = re.compile(r"\b\w*error\b(\[[^\]]*\])?\s*:", re.IGNORECASE)
MAX_DESCRIPTION_BYTES = 1 << 20


class ExternalSpecError(UsageError):
    """A malformed --external option or a command that does not exist (a usage error)."""


class DescriptionError(ExternalSpecError):
    """A description file (--external-file) that cannot be used: the message names the file,
    the key and the fix."""


@dataclass(frozen=True)
class ExternalProgram:
    """What to run and how to read it; from `--external NAME=CMD` only `name` and `argv`."""
    name: str
    argv: tuple[str, ...]
    directory: Path | None = None  # None: the suite's working directory
    env: tuple[tuple[str, str], ...] = ()
    dataset_file: str | None = None  # relative to `directory`: where the suite puts names.txt
    precision: str | None = None  # declared float32 / float64; None: not declared
    steps: int | None = None  # N the description announces
    samples: int | None = None  # sample lines the description announces
    build: tuple[str, ...] | None = None
    step_pattern: re.Pattern | None = None
    sample_pattern: re.Pattern | None = None
    description: Path | None = None  # the description file
    content_hash: str | None = None  # of the description (and its folder): the build's key

    @property
    def dtype(self) -> str:
        return self.precision or DTYPE

    @property
    def argv_list(self) -> list[str]:
        return list(self.argv)

    def for_run(self, steps: int, samples: int) -> ExternalProgram:
        """The program as a run of `steps` steps and `samples` samples runs it: its command's
        placeholders replaced, and the N and sample count it must then print set to them."""
        takes_steps = any(STEPS_PLACEHOLDER in part for part in self.argv)
        takes_samples = any(SAMPLES_PLACEHOLDER in part for part in self.argv)
        if not takes_steps and not takes_samples:
            return self
        argv = tuple(part.replace(STEPS_PLACEHOLDER, str(steps))
                     .replace(SAMPLES_PLACEHOLDER, str(samples)) for part in self.argv)
        return replace(self, argv=argv, steps=steps if takes_steps else self.steps,
                       samples=samples if takes_samples else self.samples)


def parse_external_option(text: str, taken_names=()) -> ExternalProgram:
    """`NAME=COMMAND ...` -> ExternalProgram; raises ExternalSpecError with the fix."""
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
    return ExternalProgram(name, tuple(argv))


def _why_not_runnable(program: str, directory: Path | None = None) -> str:
    """Why `program` (as a command's first word, run in `directory`) cannot be started."""
    path = Path(program)
    has_folder = os.sep in program or bool(os.altsep and os.altsep in program)
    where = Path(directory) / path if directory is not None and has_folder else path
    in_folder = f" in {display(directory)}" if directory is not None and has_folder \
        and not path.is_absolute() else ""
    try:
        exists = where.exists()
        is_dir = where.is_dir()
    except OSError as error:  # a symlink loop, a name too long
        return f"command {program!r} cannot be used: {error.strerror or error}"
    if has_folder:
        if is_dir:
            return f"command {program!r} is a directory, not a program"
        if exists and not os.access(where, os.X_OK):
            return (f"command {program!r}{in_folder} is not executable (chmod +x it, or run it "
                    f"through its interpreter, e.g. 'python {program}')")
        if not exists:
            return f"command {program!r} not found{in_folder} (no such file)"
    elif exists and not is_dir:
        return (f"command {program!r} not found on PATH (to run the file in this folder, "
                f"write ./{program})")
    return f"command {program!r} not found (not on PATH and not an executable file)"


# ---- description files ---------------------------------------------------------------------
DESCRIPTION_KEYS = {
    "name": "its name in the table: letters, digits and . _ + -",
    "command": "the program and its arguments, a list of strings (run without a shell; "
               "{steps} and {samples} in it become the run's --steps and --samples)",
    "directory": "the folder it runs in (relative to the description's folder; default: "
                 "that folder)",
    "env": "a table of environment variables to set, NAME = \"value\"",
    "dataset": "the file name, in its folder, under which it reads names.txt (the suite "
               "places a copy of its verified dataset there before each run)",
    "precision": "\"float32\" or \"float64\": what it computes in",
    "steps": "the number of training steps N it runs (and prints), when its command does not "
             "take {steps}",
    "samples": "the number of sample lines it prints, when its command does not take "
               "{samples}",
    "build": "a command run once before its first run, a list of strings (cached until the "
             "description changes)",
    "step_line": "a regular expression for its step lines, with groups (?P<step>...), "
                 "(?P<loss>...) and (?P<total>...) (total optional when steps is given)",
    "sample_line": "a regular expression for its sample lines, with (?P<sample>...) and "
                   "optionally (?P<index>...)",
}


def load_description(path: str | os.PathLike, taken_names=()) -> ExternalProgram:
    """Read and check a description file (TOML); raises DescriptionError saying what to fix."""
    path = Path(path)
    shown = display(path)

    def fail(message: str):
        raise DescriptionError(f"--external-file {shown}: {message}")

    try:
        if not path.is_file():
            fail("no such file" if not path.exists() else "not a regular file")
        raw = path.read_bytes()
    except OSError as error:
        fail(f"cannot read ({error.strerror or error})")
    if len(raw) > MAX_DESCRIPTION_BYTES:
        fail(f"{len(raw):,} bytes, too large for a description (at most "
             f"{MAX_DESCRIPTION_BYTES:,})")
    try:
        table = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        fail(f"not UTF-8 text ({error})")
    except tomllib.TOMLDecodeError as error:
        fail(f"not valid TOML ({error})")

    unknown = sorted(set(table) - set(DESCRIPTION_KEYS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], DESCRIPTION_KEYS, n=1)
        fail(f"unknown key {unknown[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
             + f"; the keys are: {', '.join(DESCRIPTION_KEYS)}")

    def text(key: str, required: bool = False) -> str | None:
        value = table.get(key)
        if value is None:
            if required:
                fail(f"{key} is missing: {DESCRIPTION_KEYS[key]}")
            return None
        if not isinstance(value, str) or not value or "\0" in value:
            fail(f"{key} must be a non-empty string ({DESCRIPTION_KEYS[key]}), got "
                 f"{_shown(value)}")
        return value

    def arguments(key: str, required: bool = False) -> tuple[str, ...] | None:
        value = table.get(key)
        if value is None:
            if required:
                fail(f"{key} is missing: {DESCRIPTION_KEYS[key]}, e.g. {key} = "
                     f"[\"python3\", \"port.py\"]")
            return None
        if (not isinstance(value, list) or not value
                or not all(isinstance(part, str) and "\0" not in part for part in value)
                or not value[0]):
            fail(f"{key} must be a non-empty list of strings, the program first (no shell: "
                 f"[\"make\", \"all\"], not \"make all\"), got {_shown(value)}")
        return tuple(value)

    def count(key: str, low: int, high: int) -> int | None:
        value = table.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            fail(f"{key} must be an integer from {low:,} to {high:,} ({DESCRIPTION_KEYS[key]}), "
                 f"got {_shown(value)}")
        return value

    name = text("name", required=True)
    if not NAME_PATTERN.match(name):
        fail(f"name {name!r} must be letters, digits and . _ + - (it becomes the table's "
             f"backend column)")
    if name in taken_names:
        fail(f"name {name!r} is already used by a backend or another external program; "
             f"choose another")
    argv = arguments("command", required=True)
    build = arguments("build")

    folder = path.resolve().parent
    directory = folder / (text("directory") or ".")
    if not directory.is_dir():
        fail(f"directory {display(directory)} is not a folder (a relative directory is taken "
             f"from the description's folder)")
    directory = directory.resolve()

    env = table.get("env", {})
    if not isinstance(env, dict):
        fail(f"env must be a table of strings, e.g. [env] OMP_NUM_THREADS = \"1\", got "
             f"{_shown(env)}")
    for variable, value in env.items():
        if not variable or "=" in variable or "\0" in variable:
            fail(f"env: {variable!r} is not an environment variable name")
        if not isinstance(value, str) or "\0" in value:
            fail(f"env.{variable} must be a string (quote numbers: \"1\"), got {_shown(value)}")

    dataset_file = text("dataset")
    if dataset_file is not None:
        parts = Path(dataset_file).parts
        if Path(dataset_file).is_absolute() or ".." in parts:
            fail(f"dataset {dataset_file!r} must be a file name inside its directory (no "
                 f"absolute path, no ..): the suite writes names.txt there")
        if (directory / dataset_file).is_dir():
            fail(f"dataset {dataset_file!r} is a folder in {display(directory)}; name the file "
                 f"it reads")

    precision = text("precision")
    if precision is not None and precision not in PRECISIONS:
        fail(f"precision must be \"float32\" or \"float64\", got {precision!r}")
    steps = count("steps", 1, MAX_STEPS)
    samples = count("samples", 0, MAX_SAMPLES)
    for key, value, placeholder in (("steps", steps, STEPS_PLACEHOLDER),
                                    ("samples", samples, SAMPLES_PLACEHOLDER)):
        if value is not None and any(placeholder in part for part in argv):
            fail(f"{key} = {value} and a command that takes {placeholder}: the run's "
                 f"--{key} sets it; remove one")
    step_pattern = _pattern(fail, "step_line", text("step_line"), required=("step", "loss"))
    if (step_pattern is not None and "total" not in step_pattern.groupindex and steps is None
            and not any(STEPS_PLACEHOLDER in part for part in argv)):
        fail(f"step_line has no (?P<total>...) group, so the description must give steps (or "
             f"a command that takes {STEPS_PLACEHOLDER})")
    sample_pattern = _pattern(fail, "sample_line", text("sample_line"), required=("sample",))

    # The build's cache key: the description's bytes and the folder it builds in.
    content_hash = hashlib.sha256(raw + b"\0" + os.fsencode(directory)).hexdigest()[:20]
    return ExternalProgram(
        name=name, argv=argv, directory=directory, env=tuple(sorted(env.items())),
        dataset_file=dataset_file, precision=precision, steps=steps, samples=samples,
        build=build, step_pattern=step_pattern, sample_pattern=sample_pattern,
        description=path, content_hash=content_hash)


def _pattern(fail, key: str, source: str | None, required: tuple[str, ...]):
    if source is None:
        return None
    try:
        pattern = re.compile(source)
    except re.error as error:
        fail(f"{key} is not a valid regular expression ({error})")
    missing = [group for group in required if group not in pattern.groupindex]
    if missing:
        groups = ", ".join(f"(?P<{group}>...)" for group in missing)
        fail(f"{key} needs the named group(s) {groups}: {DESCRIPTION_KEYS[key]}")
    return pattern


def _shown(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- reading the output ------------------------------------------------------------------
@dataclass
class StepLoss:
    step: int  # 1-based, as printed
    loss: float
    half_unit: float  # half a unit in the last printed digit: the print rounding


@dataclass
class ParsedOutput:
    """The step and sample lines of a program's output, read with the original's format or a
    description's patterns (`total` is N when the step lines do not print it)."""
    step_pattern: re.Pattern | None = None
    sample_pattern: re.Pattern | None = None
    total: int | None = None
    steps: dict[int, StepLoss] = field(default_factory=dict)
    totals: set[int] = field(default_factory=set)  # the N of every step line
    samples: dict[int, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # step lines that cannot be checked

    def feed(self, line: str) -> StepLoss | bool:
        """Read one line; returns the StepLoss of a step line, True for a sample line (or a
        step line that cannot be checked, noted in `problems`) and False for anything else."""
        match = (self.step_pattern or STEP_LINE).search(line)
        if match:
            step_text, text = match["step"], match["loss"]
            total_text = match.groupdict().get("total")
            problem = _step_problem(step_text, total_text, self.total, text)
            if problem:
                if len(self.problems) < 5:
                    self.problems.append(problem)
                return True
            total = int(total_text) if total_text is not None else self.total
            self.totals.add(total)
            step = int(step_text)
            self.steps[step] = StepLoss(step, float(text), _half_unit(text))
            return self.steps[step]
        match = (self.sample_pattern or SAMPLE_LINE).search(line)
        if match:
            index_text = match.groupdict().get("index")
            index = (int(index_text) if index_text is not None and index_text.isdigit()
                     and len(index_text) <= 9 else len(self.samples) + 1)
            if len(self.samples) < MAX_SAMPLES or index in self.samples:
                self.samples[index] = (match["sample"] or "").strip()[:MAX_SAMPLE_CHARS]
            return True
        return False

    @property
    def ordered(self) -> list[StepLoss]:
        return [self.steps[step] for step in sorted(self.steps)]


def _step_problem(step_text: str, total_text: str | None, default_total: int | None,
                  loss_text: str) -> str | None:
    line = f"`step {step_text} / {total_text or default_total} | loss {loss_text}`"
    if not (step_text or "").isdigit() or len(step_text) > 12:
        return f"{line}: the step is not a whole number"
    if total_text is not None and (not total_text.isdigit() or len(total_text) > 12):
        return f"{line}: N is not a whole number"
    step = int(step_text)
    total = int(total_text) if total_text is not None else default_total
    if total is None:
        return f"{line}: no N (the number of steps) in the line or the description"
    if not 1 <= total <= MAX_STEPS:
        return (f"{line}: N={total:,} is not a plausible number of steps (1..{MAX_STEPS:,})")
    if not 1 <= step <= total:
        return f"{line}: the step is outside 1..N"
    try:
        value = float(loss_text)
    except (TypeError, ValueError):
        return f"{line}: the loss is not a number"
    if math.isnan(value) or math.isinf(value):
        return None  # read: the run diverged
    if value <= 0:
        return f"{line}: a loss must be a positive number (cross-entropy is > 0)"
    if _half_unit(loss_text) > MAX_PRINT_ROUNDING or _half_unit(loss_text) == 0:
        return (f"{line}: printed with too few digits to be checked (rounding "
                f"+-{_half_unit(loss_text):g}); print at least 3 decimals, as the original's 4")
    return None


def _half_unit(text: str) -> float:
    try:
        exponent = Decimal(text.strip()).as_tuple().exponent
    except InvalidOperation:
        return 0.0
    return 0.5 * 10.0 ** exponent if isinstance(exponent, int) else 0.0


# ---- the verdict on the losses -------------------------------------------------------------
def allowance(reference, precision: str | None, step: int) -> float:
    """What a program may differ from the reference at `step` on top of its print rounding:
    the float32 allowance (with its drift term at this config) only when it declares float32;
    the float64 tolerance otherwise, whatever it prints."""
    if precision == "float32":
        drift = getattr(reference, "float32_drift", None)
        return LOSS_TOLERANCE["float32"] + (FLOAT32_DRIFT_FACTOR * drift[step - 1]
                                            if drift else 0.0)
    return LOSS_TOLERANCE["float64"]


def judge(printed: list[StepLoss], reference: list[float], vocab_size: int,
          precision: str | None = None) -> tuple[Status, str, dict]:
    """(status, message, parity dict) for the printed losses against the reference losses
    (reference[k - 1] is step k's): ok, diverged, different init (the first loss is off but
    the run learns) or loss differs (with the first step that does)."""
    diverged_above = DIVERGENCE_FACTOR * math.log(vocab_size)
    for entry in printed:
        if not math.isfinite(entry.loss):
            return Status.DIVERGED, f"loss is {entry.loss} at step {entry.step}", {}
        if entry.loss > diverged_above:
            return Status.DIVERGED, f"loss {entry.loss:.4g} at step {entry.step}", {}
    diffs = [abs(entry.loss - reference[entry.step - 1]) for entry in printed]
    tolerances = [entry.half_unit + allowance(reference, precision, entry.step)
                  for entry in printed]
    failing = [i for i, (diff, tol) in enumerate(zip(diffs, tolerances)) if diff > tol]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    first = printed[0]
    declared = (f"{precision} declared" if precision else "precision not declared: held to "
                "float64")
    tolerance_text = (f"tolerance {tolerances[worst]:.3g} = {printed[worst].half_unit:g} print "
                      f"rounding + {tolerances[worst] - printed[worst].half_unit:.3g} "
                      f"({declared})")
    parity = {"passed": not failing, "max_abs_diff": diffs[worst],
              "worst_step": printed[worst].step, "tolerance": tolerances[worst],
              "steps_compared": len(printed), "reference": "numpy float64",
              "precision": precision,
              "first_failing_step": printed[failing[0]].step if failing else None}
    if not failing:
        message = (f"matches the float64 reference over {len(printed)} printed steps: max |diff| "
                   f"{diffs[worst]:.3g} at step {printed[worst].step} ({tolerance_text})")
        return Status.OK, _with_message(parity, message), parity
    hint = ("" if precision else "; a float32 program declares precision = \"float32\" in "
            "a description file (--external-file)")
    if failing[0] != 0:
        bad = printed[failing[0]]
        message = (f"step {first.step} matches the float64 reference but step {bad.step} does "
                   f"not: loss {bad.loss} vs {reference[bad.step - 1]:.6f} (|diff| "
                   f"{diffs[failing[0]]:.3g}, tolerance {tolerances[failing[0]]:.3g}); max "
                   f"|diff| {diffs[worst]:.3g} at step {printed[worst].step}{hint}")
        return Status.LOSS_DIFFERS, _with_message(parity, message), parity
    start = (f"step {first.step} loss {first.loss} is not the reference's "
             f"{reference[first.step - 1]:.6f} (|diff| {diffs[0]:.3g}, tolerance "
             f"{tolerances[0]:.3g})")
    learning, trend = _learns([entry.loss for entry in printed])
    close = diffs[0] < 10 * tolerances[0]  # a near miss is a rounding question, not an init
    if learning and not close:
        message = (f"{start}: another initialisation or data order; the run is sane ({trend}), "
                   f"so it is timed, but its losses cannot be checked")
        return Status.DIFFERENT_INIT, _with_message(parity, message), parity
    message = start + (f"{hint}" if close else f", and the loss does not decrease ({trend})")
    return Status.LOSS_DIFFERS, _with_message(parity, message), parity


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


def missing_steps(printed: list[StepLoss], total: int) -> list[int]:
    """The steps of 1..N that were not printed, in order."""
    seen = {entry.step for entry in printed}
    return [step for step in range(1, total + 1) if step not in seen]


def compare_samples(printed: dict[int, str], reference: list[str]) -> str | None:
    """None when every printed sample is the reference's of the same number, else what the
    first that is not says (and how many are not)."""
    wrong = [index for index in sorted(printed)
             if not 1 <= index <= len(reference) or printed[index] != reference[index - 1]]
    if not wrong:
        return None
    first = wrong[0]
    if not 1 <= first <= len(reference):
        what = f"sample {first} is outside 1..{len(reference)} (samples are numbered from 1)"
    else:
        what = (f"sample {first} is {printed[first]!r} where the reference draws "
                f"{reference[first - 1]!r}")
    return f"{what}; {len(wrong)} of {len(printed)} printed samples differ"


# ---- timing from the arrival of the step lines ---------------------------------------------
def line_timing(arrivals: dict[int, tuple[float, int]], launched: float, wall_s: float,
                total: int) -> dict:
    """How long the program took, from the arrival of its step lines: `arrivals[step]` is
    (perf_counter time, number of the read that brought it). Returns the run record's "timing"
    block: the steady state (statistics of the intervals between consecutive step lines after
    the first, in ms) or why there is none, the time to the first step line, the end-to-end
    time, and the basis of the ms/step the tables show."""
    steps = sorted(arrivals)
    timing = {"end_to_end_s": wall_s,
              "first_step_line_s": arrivals[steps[0]][0] - launched if steps else None,
              "last_step_line_s": arrivals[steps[-1]][0] - launched if steps else None,
              "steady_state": None, "steady_state_unavailable": None,
              "basis": BASIS_END_TO_END, "end_to_end_per_step_ms": 1e3 * wall_s / total}
    pairs = [(arrivals[step], arrivals[step + 1]) for step in steps if step + 1 in arrivals]
    if not pairs:
        timing["steady_state_unavailable"] = (
            "fewer than two consecutive step lines: no interval between step lines to time")
        return timing
    batched = sum(1 for before, after in pairs if after[1] == before[1])
    timing["step_lines_in_the_same_read"] = batched
    if batched > MAX_BATCHED_SHARE * len(pairs):
        timing["steady_state_unavailable"] = (
            f"{batched} of {len(pairs)} step lines arrived in the same read as the line before: "
            f"its output reaches the suite in batches (buffered, or steps faster than a pipe is "
            f"read), so the gaps between lines are not step times; {FLUSH_ADVICE}")
        return timing
    summary = describe([1e3 * (after[0] - before[0]) for before, after in pairs])
    summary["std"] = summary["std"] or 0.0
    timing["steady_state"] = {name: summary[name] for name in STEP_MS}
    timing["steady_state"]["intervals"] = len(pairs)
    timing["basis"] = BASIS_STEADY_STATE
    return timing


def timed_figures(timing: dict) -> dict:
    """The "train" figures the tables read, from a timing block: the steady state, or the
    end-to-end time / N where there is none (each with its basis)."""
    steady = timing.get("steady_state")
    if steady:
        figures = {key: steady[name] for name, key in STEP_MS.items()}
    else:
        per_step = timing["end_to_end_per_step_ms"]
        figures = {STEP_MS["median"]: per_step, STEP_MS["mean"]: per_step}
    figures[TIMING_BASIS.key] = timing["basis"]
    return figures


# ---- before a run: its build and its data ------------------------------------------------
def first_error_line(lines: list[tuple[float, str]]) -> str | None:
    """The earliest line that reads like an error (`error:`, `error[E0425]:`, `NameError:`)."""
    for _, line in sorted(lines, key=lambda item: item[0]):
        if _ERROR_LINE.search(line):
            return line.strip()[:300]
    return None


def build_program(program: ExternalProgram, *, timeout_s: float,
                  cache_dir: Path = BUILD_CACHE_DIR) -> tuple[str | None, bool]:
    """Run the description's build command once: (None, cached) when the program is built
    (cached: an earlier build of the same description), else (why not, False): the build's
    first error line. Raises the KeyboardInterrupt that stopped it (after killing it). Not
    under --memory-limit: compilers need what they need."""
    marker = cache_dir / f"{program.content_hash}.json"
    if marker.is_file():
        return None, True
    lines: list[tuple[float, str]] = []

    def keep(line: str) -> bool:
        lines.append((time.perf_counter(), line))
        del lines[:-10_000]  # bounded; the first error line comes early
        return False

    env = {**os.environ, **dict(program.env)}
    outcome = supervise(list(program.build), timeout_s=timeout_s, env=env,
                        cwd=program.directory, on_stdout_line=keep, on_stderr_line=keep)
    command = shlex.join(program.build)
    if outcome.interrupted:
        raise outcome.interrupt
    if outcome.launch_error:
        return (f"build `{command}` cannot start: "
                f"{_why_not_runnable(program.build[0], program.directory)}"), False
    if outcome.timed_out:
        return (f"build `{command}` did not finish within the timeout of {timeout_s:g} s; "
                f"killed"), False
    if outcome.returncode != 0:
        reason = (first_error_line(lines) or stderr_reason(outcome.stderr_tail)
                  or next((line for _, line in reversed(lines) if line.strip()), ""))
        return (f"build `{command}` failed: {describe_exit(outcome.returncode)}"
                + (f": {reason.strip()[:300]}" if reason else "")), False
    try:
        write_atomically(marker, json.dumps({
            "name": program.name, "build": list(program.build),
            "directory": str(program.directory), "description": str(program.description),
            "seconds": outcome.wall_s,
            "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
    except OSError:
        pass  # a read-only cache: the build simply runs again next time
    return None, False


def failed_build_record(program: ExternalProgram, config, message: str) -> dict:
    return {**_record_base(program, config, None), "status": Status.ERROR, "error": message,
            TRAIN: {LOSSES: [], STEPS_COMPLETED: 0}}


def place_dataset(program: ExternalProgram, dataset_path: str, sha256: str) -> None:
    """Copy the suite's verified dataset to where the program reads it (checked again on the
    way: the program gets exactly the file the suite verified). Raises OSError."""
    data = Path(dataset_path).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise OSError(f"{display(dataset_path)} changed since it was verified")
    target = program.directory / program.dataset_file
    if target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data:
        return
    write_atomically(target, data)


# ---- one external run --------------------------------------------------------------------
def _record_base(program: ExternalProgram, config, total: int | None) -> dict:
    record = {"backend": program.name, "kind": KIND, "command": program.argv_list,
              "device": DEVICE, "dtype": program.dtype,
              "config": (config.replace(num_steps=total) if total else config).to_dict(),
              "steps": total}
    if program.precision:
        record["precision"] = program.precision
    if program.description is not None:
        record["description"] = display(program.description)
        record["directory"] = display(program.directory)
    return record


def run_external(program: ExternalProgram, *, config, vocab_size: int, reference_for,
                 reference_samples_for=None, dataset=None, timeout_s: float,
                 memory_limit_mb: int | None = None, on_event=None) -> dict:
    """Run the program once and return its run record (never raises for a failure of the
    program; raises Interrupted on Ctrl-C after stopping it).

    `reference_for(num_steps, steps)` gives the reference losses of the first `steps` steps of
    a `num_steps`-step run; `reference_samples_for(num_steps, count)` the first `count` samples
    of that run (None: samples are not checked); `dataset` the verified dataset (.path and
    .sha256), placed where a description says the program reads it."""
    on_event = on_event or (lambda event: None)
    parsed = ParsedOutput(program.step_pattern, program.sample_pattern, program.steps)
    arrivals: dict[int, tuple[float, int]] = {}
    reads = {"count": 0, "time": 0.0}

    def on_read() -> None:
        reads["count"] += 1
        reads["time"] = time.perf_counter()

    def on_line(line: str) -> bool:
        found = parsed.feed(line)
        if isinstance(found, StepLoss):
            # The time of the read that brought the line: when the step was done, to within
            # the program's own flush.
            arrivals[found.step] = (reads["time"] or time.perf_counter(), reads["count"])
            on_event({"event": "losses", "losses": [found.loss], "total": max(parsed.totals)})
        return bool(found)

    if program.dataset_file is not None and dataset is not None:
        try:
            place_dataset(program, dataset.path, dataset.sha256)
        except OSError as error:
            return {**_record_base(program, config, program.steps), "status": Status.ERROR,
                    "error": f"cannot place the dataset at "
                             f"{display(program.directory / program.dataset_file)}: "
                             f"{getattr(error, 'strerror', None) or error}",
                    TRAIN: {LOSSES: [], STEPS_COMPLETED: 0}}

    # A Python program then prints as it goes; the description's variables come last.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **dict(program.env)}
    launched = time.perf_counter()
    outcome = supervise(program.argv_list, timeout_s=timeout_s,
                        memory_limit_mb=memory_limit_mb, env=env, cwd=program.directory,
                        on_stdout_line=on_line, on_stdout_read=on_read)
    printed = parsed.ordered
    total = program.steps or (max(parsed.totals) if parsed.totals else None)
    record = {
        **_record_base(program, config, total), "status": Status.ERROR,
        "returncode": outcome.returncode, "wall_s": outcome.wall_s,
        TRAIN: {LOSSES: [entry.loss for entry in printed],
                "loss_steps": [entry.step for entry in printed],
                "step_line_s": [arrivals[entry.step][0] - launched for entry in printed],
                STEPS_COMPLETED: printed[-1].step if printed else 0},
        "stdout_tail": outcome.stdout_tail, "stderr_tail": outcome.stderr_tail,
    }
    if parsed.samples:
        record["infer"] = {"samples": [parsed.samples[k] for k in sorted(parsed.samples)]}
    where = program.name + (f" after printing step {printed[-1].step} of {total}"
                            if printed else "")
    if outcome.interrupted:
        record.update(status=Status.INTERRUPTED,
                      error=f"interrupted by {describe_interrupt(outcome.interrupt)}, {where}")
        raise Interrupted(record, outcome.interrupt)
    if outcome.launch_error:
        record.update(status=Status.CANNOT_START, error=f"{program.name} cannot start: "
                      f"{_why_not_runnable(program.argv[0], program.directory)}")
        return record
    if outcome.returncode in CANNOT_START_CODES and not printed:
        reason = stderr_reason(outcome.stderr_tail)
        record.update(status=Status.CANNOT_START, error=(
            f"{program.name} exited with code {outcome.returncode} before printing a step line: "
            f"the command it runs was {CANNOT_START_CODES[outcome.returncode]}"
            + (f" ({reason})" if reason else "")))
        return record
    if printed and total:
        record["timing"] = line_timing(arrivals, launched, outcome.wall_s, total)

    problem = _output_problem(program, printed, parsed.totals, outcome.stdout_tail,
                              parsed.problems)
    verdict, reference = None, None
    if printed and not problem:
        try:
            reference = reference_for(total, printed[-1].step)
        except Exception as error:  # bench.reference.ReferenceFailed: over the limits
            reference, problem = None, (f"the float64 reference of its {total} steps could "
                                        f"not be computed: {error}")
    if reference is not None:
        verdict = judge(printed, reference, vocab_size, program.precision)
        if verdict[2]:  # kept for failed runs too, as a diagnosis
            record["parity"] = verdict[2]

    if outcome.returncode != 0 or outcome.timed_out:
        status, message = failure_of(outcome, timeout_s, memory_limit_mb, where)
        record.update(status=status, error=message)
        return record
    if problem:
        record["error"] = problem
        return record
    status, message, parity = verdict
    if status in (Status.DIVERGED, Status.LOSS_DIFFERS):
        record.update(status=status, error=message)
        return record
    missing = missing_steps(printed, total)
    if missing:
        record.update(status=Status.INCOMPLETE, error=_incomplete_message(
            program.name, printed, total, missing))
        return record
    if status == Status.DIFFERENT_INIT:
        # Its own initialisation: its samples cannot be the reference's; timed, not verified.
        record.update(status=status, note=message)
        record[TRAIN].update(timed_figures(record["timing"]))
        return record
    sample_problem = _sample_problem(program, parsed.samples, total, reference_samples_for)
    if sample_problem is not None:
        sample_status, message = sample_problem
        parity.update(passed=False, samples=message)
        record.update(status=sample_status, error=message)
        return record
    parity["samples"] = (f"{len(parsed.samples)} samples equal the reference's"
                         if parsed.samples else "no sample lines printed: sampling not checked")
    record["status"] = Status.OK
    record[TRAIN].update(timed_figures(record["timing"]))
    return record


def _incomplete_message(name: str, printed: list[StepLoss], total: int,
                        missing: list[int]) -> str:
    last = printed[-1].step
    if missing[0] > last:  # every step up to the last printed one
        return (f"{name} exited 0 after printing step {last} of {total}: the run did not "
                f"finish, so it is not timed")
    return (f"{name} exited 0 with {len(missing):,} of its {total:,} steps never printed "
            f"(the first: step {missing[0]}); last step reached {last}, so it is not timed")


def _sample_problem(program: ExternalProgram, samples: dict[int, str], total: int,
                    reference_samples_for) -> tuple[Status, str] | None:
    """(status, why) when the samples do not pass: fewer than the description announces
    (incomplete), or not the reference's (samples differ); None when they do."""
    if program.samples is not None and len(samples) < program.samples:
        return Status.INCOMPLETE, (f"{program.name} printed every step but {len(samples)} of "
                                   f"the {program.samples} sample lines its description "
                                   f"announces")
    if not samples or reference_samples_for is None:
        return None
    wanted = min(max(samples), MAX_SAMPLES)
    try:
        reference = reference_samples_for(total, max(wanted, 1))
    except Exception as error:  # bench.reference.ReferenceFailed: over the limits
        return Status.ERROR, f"the reference samples could not be computed: {error}"
    differ = compare_samples(samples, reference)
    return (Status.SAMPLES_DIFFER, differ) if differ else None


def _output_problem(program: ExternalProgram, printed: list[StepLoss], totals: set[int],
                    stdout_tail: list[str], problems: list[str] = ()) -> str | None:
    """Why the output cannot be checked at all, or None."""
    name = program.name
    if problems:
        return f"{name} printed a step line that cannot be checked: {problems[0]}"
    if not printed:
        last = next((line for line in reversed(stdout_tail) if line.strip()), "")
        what = ("lines matching its step_line pattern" if program.step_pattern
                else "`step K / N | loss X` lines")
        return (f"{name} printed no {what}"
                + (f"; its last output line: {last.strip()[:200]!r}" if last
                   else " (its output was empty)"))
    if len(totals) > 1:
        return f"{name} printed step lines with different totals N: {sorted(totals)}"
    if program.steps is not None and totals and max(totals) != program.steps:
        return (f"{name} prints N = {max(totals):,} steps but its description says steps = "
                f"{program.steps:,}")
    return None
