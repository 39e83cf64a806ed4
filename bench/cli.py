"""The command line: `python bench.py [options]` runs backends and programs outside the suite
(--external, --external-file);
`python bench.py compare|report|sweep ...` are the tools built on result files (their own
modules).

Exit codes (bench.command.ExitCode, README "When things go wrong"): 0 every run passed (ok, or
"different init" for an --external program); 1 a run failed, recorded with its reason (an
unavailable backend fails only when named with --backend); 2 bad usage or input, found before
anything runs, nothing written; 130 Ctrl-C, the result file keeps every finished run.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import random
import re
import shlex
import signal
import sys
import threading
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from backends import EXTRA_BACKENDS_ENV_VAR, REGISTRY, availability, register_extra_backends
from backends.contract import DTYPES, PRESETS, build_spec, preset
from bench import results
from bench.command import (TERMINATION_SIGNALS, ArgumentParser, ExitCode, Terminated,
                           UsageError,
                           describe_interrupt, install_termination_handlers,
                           interrupt_exit_code, print_error, run_guarded, settle_stdout,
                           stdout_console)
from bench.environment import collect_environment
from bench.files import RESULTS_DIR, OutputError, claim, display
from bench.limits import harness_floor_ms, machine_peak
from bench.external import (build_program, failed_build_record, load_description,
                            parse_external_option, run_external)
from bench.planning import plan_runs, select_backends
from bench.record import MEDIAN_MS, TIMED_STATUSES, TOKENS_PER_S, Status, losses_of
from bench.reference import ReferenceFailed, bounded_reference, bounded_reference_samples
from bench.runner import Interrupted, RunRequest, run_backend
from bench.stats import summarize_runs, summary_notes
from data.dataset import DATASET_ENV_VAR, load_dataset

SUBCOMMANDS = {"compare": "bench.compare", "report": "bench.report", "sweep": "bench.sweep",
               "abtest": "bench.abtest"}

# Bounds of the options: a value past them is a usage error, never a run that cannot end or
# a runner that runs out of memory planning it.
MAX_STEPS = 1_000_000
MAX_REPEAT = 10_000
MAX_SAMPLES = 100_000
MAX_BATCH_SIZE = 4096
MAX_TIMEOUT_S = 7 * 24 * 3600.0
MAX_MEMORY_LIMIT_MB = 2 ** 32  # 4 PiB: any real machine, and it fits the OS's limit type
# Device names a backend may be asked for (each backend says whether it has one).
DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:\d{1,3})?|gpu(:\d{1,3})?|mps|metal)$")
DEVICE_NAMES = "cpu, cuda, cuda:N, gpu, gpu:N, mps, metal"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="bench.py",
        description="Train and sample the spec'd MicroGPT on each backend and time it. "
                    "Subcommands: compare BASE.json NEW.json | report FILE... | sweep "
                    "(see `bench.py SUBCOMMAND --help`).")
    parser.add_argument("--backend", action="append", metavar="NAME", default=[],
                        help=f"run this backend (repeatable); one of: {', '.join(REGISTRY)}")
    parser.add_argument("--external", action="append", metavar="NAME='COMMAND ...'", default=[],
                        help="run this program outside the suite (repeatable): it must print "
                             "`step K / N | loss X` and `sample K: NAME` lines like the "
                             "original microgpt.py; it is judged on the whole run and timed "
                             "from the arrival of its step lines. Without --backend or --all "
                             "only the programs named run")
    parser.add_argument("--external-file", action="append", type=Path, metavar="PORT.toml",
                        default=[],
                        help="run the program this description file describes (repeatable): "
                             "its command, folder, data file, precision, build and output "
                             "patterns; examples/microgpt_port/port.toml is the template")
    parser.add_argument("--all", action="store_true",
                        help="run every backend available here (including the slow python)")
    parser.add_argument("--list", action="store_true",
                        help="list the backends, whether they can run here, and why not")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: the config's, 1000)")
    parser.add_argument("--dtype", action="append", choices=[*DTYPES, "default"], default=[],
                        help="dtype (repeatable); default: each backend's own default")
    parser.add_argument("--config", default="tiny", metavar="PRESET",
                        help=f"model preset, one of: {', '.join(PRESETS)} (default tiny)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="documents per step (default 1, as the original)")
    parser.add_argument("--device", default=None,
                        help=f"force a device ({DEVICE_NAMES}) for backends that have one")
    parser.add_argument("--repeat", type=int, default=1, metavar="R",
                        help="run each backend R times, each in a fresh process, in shuffled "
                             "order per round")
    parser.add_argument("--warmup", type=int, default=10, metavar="N",
                        help="training steps run and discarded before timing (default 10)")
    parser.add_argument("--samples", type=int, default=None, metavar="N",
                        help="names to sample after training (default 20)")
    parser.add_argument("--timeout", type=float, default=1800.0, metavar="SECONDS",
                        help="kill a backend run or --external program after this long "
                             "(default 1800)")
    parser.add_argument("--memory-limit", type=int, default=None, metavar="MB",
                        help="address-space (virtual memory) limit for each backend process "
                             "and --external program; a run that exceeds it is reported as "
                             "out-of-memory")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="result file (default: a new timestamped file under results/); "
                             "a Markdown table is written beside it")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow --json to replace an existing file (or symbolic link) and "
                             "the .md beside it")
    parser.add_argument("--dataset", default=None, metavar="PATH",
                        help=f"use this copy of names.txt (also: {DATASET_ENV_VAR}=PATH)")
    parser.add_argument("--custom-dataset", action="store_true",
                        help="accept a dataset whose checksum is not the spec's (the result "
                             "is marked non-standard)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="intra-op threads for every backend of the run alike (sets "
                             "OMP/MKL/OpenBLAS thread variables, and XLA's single-thread flag "
                             "for N = 1, in every worker); default: each framework's own")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for the order of backends between rounds (not the model)")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def body() -> int:
        if argv and argv[0] in SUBCOMMANDS:
            register_test_hook()
            return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
        return run_command(build_parser().parse_args(argv), argv)

    install_termination_handlers()  # SIGTERM, SIGHUP: the same clean-up as Ctrl-C
    try:
        return run_guarded(body)
    except KeyboardInterrupt as interrupt:  # outside a run (runs save what they measured)
        with contextlib.suppress(OSError, ValueError):
            Console(stderr=True).print(f"[yellow]Interrupted[/yellow] by "
                                       f"{describe_interrupt(interrupt)}.", highlight=False)
        return interrupt_exit_code(interrupt)
    finally:
        settle_stdout()


# The backends the test hook registered in this process: name -> "module:Class".
TEST_HOOK_BACKENDS: dict[str, str] = {}


def register_test_hook() -> dict[str, str]:
    """Register MICROGPT_BENCH_EXTRA_BACKENDS (the test hook; a no-op unless set). It cannot
    replace a registered backend, imports nothing, and every run of one of its backends is
    marked in the result file ("test_hook": true, with its target)."""
    try:
        names = register_extra_backends()
    except ValueError as error:  # malformed, or a name that is a real backend's
        raise UsageError(str(error)) from None
    TEST_HOOK_BACKENDS.update({name: REGISTRY[name].target for name in names})
    return TEST_HOOK_BACKENDS


def list_backends() -> int:
    table = Table(title="microgpt-bench backends")
    for column in ("backend", "division", "available", "dtypes", "in default run",
                   "how it is written / tunings", "why not / install"):
        table.add_column(column)
    for name, info in REGISTRY.items():
        status = availability(name)
        why = "" if status.available else f"{status.reason}. {status.install_hint}".strip()
        written = info.summary + "".join(f"\n- {tuning}" for tuning in info.tunings)
        table.add_row(name, info.division, "yes" if status.available else "no",
                      ", ".join(info.dtypes),
                      "yes" if info.in_default_run else "no (--backend or --all)", written, why)
    _stdout_console().print(table)
    return ExitCode.OK


def parse_externals(options: list[str], files: list[Path] = ()) -> list:
    """The --external programs, then the --external-file ones; every name once."""
    externals, taken = [], set(REGISTRY)
    for parse, values in ((parse_external_option, options), (load_description, files)):
        for value in values:
            external = parse(value, taken)
            taken.add(external.name)
            externals.append(external)
    return externals


def _bounded(name: str, value, low, high, unit: str = "") -> None:
    if value is not None and not low <= value <= high:
        raise UsageError(f"{name} must be between {low:,} and {high:,}{unit}, got {value}")


def threads_environment(threads: int | None) -> dict[str, str]:
    """The variables that set every framework's intra-op threads alike (--threads); MLX's CPU
    backend has no such setting."""
    if threads is None:
        return {}
    variables = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                 "OPENBLAS_NUM_THREADS",
                                                 "VECLIB_MAXIMUM_THREADS")}
    if threads == 1:
        variables["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"),
                                                        "--xla_cpu_multi_thread_eigen=false"]))
    return variables


def check_arguments(args) -> None:
    """Every option checked before anything runs (exit 2)."""
    if args.all and args.backend:
        raise UsageError("--all runs every backend; it cannot be combined with --backend "
                         "(name the backends you want, or use --all alone)")
    if args.threads is not None:
        _bounded("--threads", args.threads, 1, 1024)
    if args.repeat < 1:
        raise UsageError("--repeat must be >= 1")
    _bounded("--repeat", args.repeat, 1, MAX_REPEAT)
    if args.warmup < 0:
        raise UsageError("--warmup must be >= 0")
    _bounded("--warmup", args.warmup, 0, MAX_STEPS)
    if args.steps is not None and args.steps > MAX_STEPS:
        raise UsageError(f"--steps must be at most {MAX_STEPS:,}, got {args.steps:,}")
    if args.batch_size is not None and args.batch_size > MAX_BATCH_SIZE:
        raise UsageError(f"--batch-size must be at most {MAX_BATCH_SIZE:,}, got "
                         f"{args.batch_size:,}")
    if not (math.isfinite(args.timeout) and 0 < args.timeout <= MAX_TIMEOUT_S):
        raise UsageError(f"--timeout must be > 0 and at most {MAX_TIMEOUT_S:.0f} s (7 days), "
                         f"got {args.timeout}")
    if args.samples is not None and args.samples < 0:
        raise UsageError("--samples must be >= 0")
    _bounded("--samples", args.samples, 0, MAX_SAMPLES)
    if args.memory_limit is not None and not 0 < args.memory_limit <= MAX_MEMORY_LIMIT_MB:
        raise UsageError(f"--memory-limit must be > 0 (MB) and at most "
                         f"{MAX_MEMORY_LIMIT_MB:,}, got {args.memory_limit:,}")
    if args.device is not None and not DEVICE_PATTERN.match(args.device):
        raise UsageError(f"--device {args.device!r} is not a device name; use one of: "
                         f"{DEVICE_NAMES}")
    if args.json is not None:
        if args.json.is_dir():
            raise UsageError(f"--json {display(args.json)} is a directory; give a file name")
        if os.path.abspath(args.json) == os.path.abspath(markdown_path(args.json)):
            raise UsageError(f"--json {display(args.json)}: the Markdown table is written "
                             f"beside the result file as {display(markdown_path(args.json))}, "
                             f"the same file; give the result file a .json name")


def markdown_path(path: Path) -> Path:
    return path.with_suffix(".md")


def claim_result_path(args, document: dict, directory: Path = RESULTS_DIR,
                      inputs=()) -> Path:
    """The result path claimed (see `claim_result`)."""
    return claim_result(args, document, directory, inputs)[0]


def claim_result(args, document: dict, directory: Path = RESULTS_DIR, inputs=()):
    """Claim the result file and the Markdown beside it before anything runs, and write the
    empty document to it: a path that cannot be written is a usage error and never costs a
    run, and two runs can never share a file. Both are created exclusively (bench.files.claim:
    an existing file or link, even a dangling one, is refused without --overwrite). A default
    path is a new name under `directory`. Returns the path and the claim."""
    if args.json is not None:
        taken = claim([args.json, markdown_path(args.json)], overwrite=args.overwrite,
                      inputs=inputs, what="result file",
                      hint="choose another --json path or pass --overwrite")
        path = args.json
    else:
        while True:
            path = results.default_result_path(document["environment"], directory)
            try:
                taken = claim([path, markdown_path(path)], what="result file")
                break
            except OutputError as error:
                if "exists" in str(error) or "another process" in str(error):
                    continue
                raise
    try:
        results.save(document, path)
    except OSError as error:
        taken.release()
        raise OutputError(f"cannot write the result file {display(path)}: "
                          f"{error.strerror or error}") from None
    return path, taken


@contextlib.contextmanager
def sigint_deferred(final: bool = False):
    """Ctrl-C, SIGTERM or SIGHUP during a save takes effect after it (or, for the final save,
    is ignored), so a save is never cut short and the run just measured is never lost."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    signals = (signal.SIGINT, *TERMINATION_SIGNALS)
    previous = {signum: signal.getsignal(signum) for signum in signals}
    for signum in signals:
        if previous[signum] is not signal.SIG_IGN:
            signal.signal(signum, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received and not final:
        raise (KeyboardInterrupt() if received[0] == signal.SIGINT
               else Terminated(received[0]))


class SaveFailed(Exception):
    """The result file could not be written after runs began (a full disk, ...)."""


def run_command(args, argv: list[str]) -> int:
    register_test_hook()
    if args.list:
        return list_backends()
    check_arguments(args)
    config = preset(args.config, num_steps=args.steps, batch_size=args.batch_size)
    externals = parse_externals(args.external, args.external_file)
    # Programs named alone are run alone: the backends join only when asked for.
    names = (select_backends(args.backend, include_slow=args.all)
             if args.backend or args.all or not externals else [])
    if not names and not externals:
        raise UsageError("no backend can run here; see `python bench.py --list`")

    console = Console(stderr=True, soft_wrap=True)  # one line per message, also in logs
    dataset = load_dataset(args.dataset, args.custom_dataset)
    # The workers run from the checkout: they get the absolute path of the file checked here.
    dataset_path = os.path.abspath(dataset.path)
    spec = build_spec(dataset.docs, config)
    environment = collect_environment()
    document = results.new_document(environment, ["bench.py", *argv])
    document["dataset"] = dataset.describe()
    if TEST_HOOK_BACKENDS:
        document["test_hook"] = {"variable": EXTRA_BACKENDS_ENV_VAR,
                                 "backends": dict(TEST_HOOK_BACKENDS)}
    path, taken = claim_result(args, document, inputs=[dataset.path])
    thread_environment = threads_environment(args.threads)
    if args.threads is not None:
        document["threads"] = {"requested": args.threads, "environment": thread_environment}

    try:
        console.print(f"Reference: numpy float64, {config.num_steps} steps ...", highlight=False)
        reference = bounded_reference(spec, config.num_steps, dataset, timeout_s=args.timeout,
                                      memory_limit_mb=args.memory_limit)
    except ReferenceFailed as error:  # nothing was measured: nothing is kept
        taken.release()
        print_error(f"{error}; nothing was run")
        return ExitCode.FAILED
    except KeyboardInterrupt as interrupt:
        taken.release()
        console.print(f"[yellow]Interrupted[/yellow] by {describe_interrupt(interrupt)} "
                      f"during the reference run; nothing was run", highlight=False)
        return interrupt_exit_code(interrupt)

    def spec_for(num_steps: int):
        """An external program's N sets its learning-rate schedule: its own reference."""
        if num_steps == config.num_steps:
            return spec
        return build_spec(dataset.docs, config.replace(num_steps=num_steps))

    def reference_for(num_steps: int, steps: int) -> list[float]:
        if num_steps == config.num_steps:
            return reference.first(steps)
        return bounded_reference(spec_for(num_steps), steps, dataset, timeout_s=args.timeout,
                                 memory_limit_mb=args.memory_limit)

    def reference_samples_for(num_steps: int, count: int) -> list[str]:
        return bounded_reference_samples(spec_for(num_steps), num_steps, count, dataset,
                                         timeout_s=args.timeout,
                                         memory_limit_mb=args.memory_limit)

    # What the suite itself can resolve on this machine (bench.limits): outside every run.
    environment["harness_floor_ms"] = harness_floor_ms(spec)
    environment["peak"] = machine_peak(environment["machine_fingerprint"])
    saved = [0]  # runs in the last complete save

    def save(final: bool = False) -> None:
        with sigint_deferred(final=final):
            try:
                results.save(document, path)
                saved[0] = len(document["runs"])
            except OSError as error:
                raise SaveFailed(f"cannot save the results to {display(path)}: "
                                 f"{error.strerror or error}") from None

    num_samples = config.num_samples if args.samples is None else args.samples
    externals = [external.for_run(config.num_steps, num_samples) for external in externals]
    plan = [("backend", pair) for pair in plan_runs(names, args.dtype)]
    order_rng = random.Random(args.seed)
    round_index = 0
    try:
        try:
            for external in externals:
                problem = _build(external, console, args.timeout)
                if problem is None:
                    plan.append(("external", external))
                else:  # recorded once: its runs cannot happen
                    record = failed_build_record(external, config, problem)
                    record["repeat"] = 0
                    document["runs"].append(record)
                    save()
                    _print_run_line(console, f"{external.name} (external)", record)
            for round_index in range(args.repeat):
                round_plan = list(plan)
                if round_index > 0:  # interleave: a slow phase of the machine hits every one
                    order_rng.shuffle(round_plan)
                for kind, item in round_plan:
                    suffix = f" #{round_index + 1}" if args.repeat > 1 else ""
                    if kind == "backend":
                        backend, dtype = item
                        request = RunRequest(
                            backend=backend, dtype=dtype, config=config,
                            steps=config.num_steps, device=args.device,
                            warmup_steps=args.warmup, num_samples=args.samples,
                            dataset_path=dataset_path, custom_dataset=args.custom_dataset,
                            timeout_s=args.timeout, memory_limit_mb=args.memory_limit,
                            extra_env=thread_environment)
                        label = f"{backend} {dtype}{suffix}"
                        record = _run_with_progress(
                            lambda on_event: run_backend(request, reference, on_event),
                            label, config.num_steps, console, args.quiet)
                    else:
                        label = f"{item.name} (external){suffix}"
                        record = _run_with_progress(
                            lambda on_event: run_external(
                                item, config=config, vocab_size=spec.tokenizer.vocab_size,
                                reference_for=reference_for,
                                reference_samples_for=reference_samples_for, dataset=dataset,
                                timeout_s=args.timeout, memory_limit_mb=args.memory_limit,
                                on_event=on_event),
                            label, None, console, args.quiet)
                    _mark_test_hook(record)
                    record["repeat"] = round_index
                    document["runs"].append(record)
                    save()
                    _print_run_line(console, label, record)
        except (Interrupted, KeyboardInterrupt) as stop:
            interrupt = stop.interrupt if isinstance(stop, Interrupted) else stop
            if isinstance(stop, Interrupted):
                _mark_test_hook(stop.record)
                stop.record["repeat"] = round_index
                document["runs"].append(stop.record)
            save(final=True)
            console.print(f"[yellow]Interrupted[/yellow] by {describe_interrupt(interrupt)}. "
                          f"Finished runs are in {display(path)}", highlight=False)
            return interrupt_exit_code(interrupt)
        document["complete"] = True
        save(final=True)
    except (SaveFailed, ReferenceFailed) as error:
        print_error(f"{error}; the result file keeps its last complete save, with "
                    f"{saved[0]} of the {len(document['runs'])} runs measured")
        return ExitCode.OUTPUT
    print_summary(document)  # on SafeStdout: a closed stdout loses only the table
    console.print(f"Results: {display(path)} and {display(markdown_path(path))}",
                  highlight=False)
    return exit_code_of(document["runs"], explicit=set(args.backend))


def _build(program, console: Console, timeout_s: float) -> str | None:
    """Run a described program's build command, unless an earlier build of the same
    description did; None when it is built, else why not (its first error line)."""
    if program.build is None:
        return None
    console.print(f"Building {program.name}: {shlex.join(program.build)} ...", highlight=False)
    problem, cached = build_program(program, timeout_s=timeout_s)
    if cached:
        console.print(f"  {program.name}: built before (the description is unchanged); not "
                      f"rebuilt", highlight=False)
    return problem


def _mark_test_hook(record: dict) -> None:
    """A run of a backend the test hook registered says so in the result file."""
    if record.get("backend") in TEST_HOOK_BACKENDS and record.get("kind") != "external":
        record.update(test_hook=True, test_hook_target=TEST_HOOK_BACKENDS[record["backend"]])


def exit_code_of(runs: list[dict], explicit: set[str]) -> int:
    """FAILED when a run failed; an unavailable backend fails only if named explicitly."""
    for run in runs:
        if run["status"] in TIMED_STATUSES:
            continue
        if run["status"] == Status.UNAVAILABLE and run["backend"] not in explicit:
            continue
        return ExitCode.FAILED
    return ExitCode.OK


def _run_with_progress(start_run, label: str, total: int | None, console: Console,
                       quiet: bool) -> dict:
    """`start_run(on_event)` runs one backend or program; a live bar shows its steps on a
    terminal."""
    if quiet or not console.is_terminal:
        return start_run(None)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(f"{label}: setup" if total else f"{label}: running",
                                 total=total, detail="")

        def on_event(event):
            if event["event"] == "phase":
                progress.update(task, description=f"{label}: {event['phase']}")
            elif event["event"] == "losses":
                if event.get("total"):
                    progress.update(task, total=event["total"])
                progress.advance(task, len(event["losses"]))
                progress.update(task, detail=f"loss {event['losses'][-1]:.4f}")
        return start_run(on_event)


def _print_run_line(console: Console, label: str, record: dict) -> None:
    timing = ""
    if record["status"] in TIMED_STATUSES and MEDIAN_MS.of(record) is not None:
        timing = (results.describe_timing(record["timing"]) if record.get("timing")
                  else f"{MEDIAN_MS.of(record):.4f} ms/step")
        timing += f", final loss {losses_of(record)[-1]:.4f}"
    if record["status"] == Status.OK:
        console.print(f"  {label}: ok, {timing}", highlight=False)
    else:
        colour = "yellow" if record["status"] in TIMED_STATUSES else "red"
        # A different init carries a note, not an error: timed, not failed.
        reason = record.get("error") or record.get("note") or ""
        console.print(f"  {label}: [{colour}]{record['status']}[/{colour}]: {reason}"
                      + (f"; {timing}" if timing else ""), highlight=False)


def _ci_percent(row: dict) -> str:
    low, high, median = row.get(results.CI_LOW), row.get(results.CI_HIGH), row.get(MEDIAN_MS.key)
    if low is None or high is None or not median:
        return "-"
    return f"±{(high - low) / 2 / median:.0%}"


def _tokens_per_s(row: dict) -> str:
    value = row.get(TOKENS_PER_S.key)
    return f"{value:,.0f}" if value else "-"  # no samples drawn: nothing to show


# The terminal summary: few enough columns to stay readable in an 80-column terminal (the
# Markdown table beside the result file and the JSON hold every figure).
TERMINAL_COLUMNS = (
    results.Column("backend", "backend", numeric=False),
    results.Column("division", "division", numeric=False),
    results.Column("device", "device", numeric=False),
    results.Column("dtype", "dtype", numeric=False),
    results.CONFIG_COLUMN,
    results.Column("status", "status", numeric=False),
    results.Column("ms/step", MEDIAN_MS.key, results.ms_per_step_cell),
    results.Column("95% CI", results.CI_LOW, _ci_percent),
    results.Column("tok/s", TOKENS_PER_S.key, _tokens_per_s),
    results.Column("n", "n", "d"),
)


def terminal_columns(rows: list[dict]) -> list:
    """Device and config only where rows differ in them (an external program's device is
    "external", which its dtype "unknown" already tells); the division where rows have one
    (files from before divisions do not)."""
    several_devices = len({row.get("device") for row in rows
                           if row.get("device") != "external"}) > 1
    several_labels = len({row.get("config") for row in rows}) > 1
    divisions = any(row.get("division") for row in rows)
    return [column for column in TERMINAL_COLUMNS
            if (column is not results.CONFIG_COLUMN or several_labels)
            and (column.field != "device" or several_devices)
            and (column.field != "division" or divisions)]


def print_summary(document: dict, console: Console | None = None) -> None:
    """The summary table on stdout; where it does not fit the terminal, one line per row
    instead (wrapped, never cut), so that no value is ever lost to the width."""
    from rich import box
    from rich.measure import Measurement
    console = console or _stdout_console()
    environment = document.get("environment") or {}
    rows = summarize_runs(document["runs"], (environment.get("peak") or {}).get("gflops"))
    columns = terminal_columns(rows)
    title = "microgpt-bench: median ms per training step, sampling tokens/s"
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in columns:
        table.add_column(column.title, justify="right" if column.numeric else "left",
                         no_wrap=True)
    for row in rows:
        failed = row["status"] != Status.OK
        table.add_row(*(f"[red]{column.cell(row)}[/red]" if failed and column.field == "status"
                        else column.cell(row) for column in columns))
    if Measurement.get(console, console.options.update_width(100_000), table).maximum \
            <= console.width:
        console.print(table)
    else:
        console.print(title, highlight=False, soft_wrap=True)
        named = ("backend", "status", "dtype", "device", "config")
        for row in rows:
            where = ", ".join(column.cell(row) for column in columns
                              if column.field in named[2:])
            console.print(f"  {row['backend']} ({where}): {row['status']}; " + "; ".join(
                f"{column.title} {column.cell(row)}" for column in columns
                if column.field not in named), highlight=False, markup=False, soft_wrap=True)
    for pair in results.tuning_rows(rows):
        idiomatic, tuned = pair["idiomatic"], pair["tuned"]
        console.print(f"  tuning: {tuned['backend']} is {results.ratio_text(pair['speedup'])} "
                      f"than {idiomatic['backend']} ({idiomatic['dtype']}): "
                      f"{'; '.join(tuned.get('tunings') or [])}", highlight=False,
                      markup=False, soft_wrap=True)
    for line in results.limits_lines(environment):
        console.print(f"  {line}", highlight=False, soft_wrap=True)
    for note in summary_notes(rows):
        console.print(f"  [yellow]warning:[/yellow] {note}", highlight=False, soft_wrap=True)
    # Why the runs that did not pass did not, once per configuration and reason.
    for line in results.run_notes(document["runs"]):
        console.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)
    external = results.external_lines(document["runs"])
    if external:
        console.print("  External programs: ms/step is the steady state (the median interval "
                      "between step lines after the first), unless marked end-to-end / N:",
                      highlight=False, soft_wrap=True)
    for line in external:
        console.print(f"    {line}", highlight=False, markup=False, soft_wrap=True)
    if any(run.get("test_hook") for run in document["runs"]):
        console.print(f"  Test hook: backends registered by {EXTRA_BACKENDS_ENV_VAR} ran; "
                      f"their runs are marked \"test_hook\" in the result file.",
                      highlight=False, soft_wrap=True)
    console.print("  Every figure (IQR, first step, total, compile, ratios): the .md beside the "
                  "result file.", highlight=False, soft_wrap=True)


def _stdout_console() -> Console:
    # A terminal sets the width; a file or a CI log gets a wide one (bench.command).
    return stdout_console()
