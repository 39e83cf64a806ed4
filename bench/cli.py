"""The command line: `python bench.py [options]` runs backends (and --external programs);
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
import random
import signal
import sys
import threading
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from backends import REGISTRY, availability, register_extra_backends
from backends.contract import DTYPES, PRESETS, build_spec, preset
from bench import results
from bench.command import ArgumentParser, ExitCode, UsageError, run_guarded
from bench.environment import collect_environment
from bench.files import RESULTS_DIR
from bench.external import parse_external_option, run_external
from bench.parity import reference_losses
from bench.planning import plan_runs, select_backends
from bench.record import MEDIAN_MS, TIMED_STATUSES, Status, losses_of
from bench.runner import Interrupted, RunRequest, run_backend
from bench.stats import summarize_runs, summary_notes
from data.dataset import DATASET_ENV_VAR, load_dataset

SUBCOMMANDS = {"compare": "bench.compare", "report": "bench.report", "sweep": "bench.sweep",
               "abtest": "bench.abtest"}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="bench.py",
        description="Train and sample the spec'd MicroGPT on each backend and time it. "
                    "Subcommands: compare BASE.json NEW.json | report FILE... | sweep "
                    "(see `bench.py SUBCOMMAND --help`).")
    parser.add_argument("--backend", action="append", metavar="NAME", default=[],
                        help=f"run this backend (repeatable); one of: {', '.join(REGISTRY)}")
    parser.add_argument("--external", action="append", metavar="NAME='COMMAND ...'", default=[],
                        help="also run this program outside the suite (repeatable): it must "
                             "print `step K / N | loss X` lines like the original microgpt.py; "
                             "its losses are checked against the reference and its wall time "
                             "/ N (process start and setup included) is its ms/step")
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
                        help="force a device (cpu, cuda, mps, gpu) for backends that have one")
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
                        help="allow --json to replace an existing file")
    parser.add_argument("--dataset", default=None, metavar="PATH",
                        help=f"use this copy of names.txt (also: {DATASET_ENV_VAR}=PATH)")
    parser.add_argument("--custom-dataset", action="store_true",
                        help="accept a dataset whose checksum is not the spec's (the result "
                             "is marked non-standard)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for the order of backends between rounds (not the model)")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def body() -> int:
        try:
            register_extra_backends()  # the test hook; a no-op unless its variable is set
        except ValueError as error:  # a malformed MICROGPT_BENCH_EXTRA_BACKENDS
            raise UsageError(str(error)) from None
        if argv and argv[0] in SUBCOMMANDS:
            return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
        return run_command(build_parser().parse_args(argv), argv)

    try:
        return run_guarded(body)
    except KeyboardInterrupt:  # outside a run (runs save what they measured themselves)
        Console(stderr=True).print("[yellow]Interrupted.[/yellow]")
        return ExitCode.INTERRUPTED


def list_backends() -> int:
    table = Table(title="microgpt-bench backends")
    for column in ("backend", "available", "dtypes", "in default run", "why not / install"):
        table.add_column(column)
    for name, info in REGISTRY.items():
        status = availability(name)
        why = "" if status.available else f"{status.reason}. {status.install_hint}".strip()
        table.add_row(name, "yes" if status.available else "no", ", ".join(info.dtypes),
                      "yes" if info.in_default_run else "no (--backend or --all)", why)
    _stdout_console().print(table)
    return ExitCode.OK


def parse_externals(options: list[str]) -> list:
    externals, taken = [], set(REGISTRY)
    for option in options:
        external = parse_external_option(option, taken)
        taken.add(external.name)
        externals.append(external)
    return externals


def check_arguments(args) -> None:
    if args.repeat < 1:
        raise UsageError("--repeat must be >= 1")
    if args.warmup < 0:
        raise UsageError("--warmup must be >= 0")
    if args.timeout <= 0:
        raise UsageError("--timeout must be > 0")
    if args.samples is not None and args.samples < 0:
        raise UsageError("--samples must be >= 0")
    if args.memory_limit is not None and args.memory_limit <= 0:
        raise UsageError("--memory-limit must be > 0 (MB)")
    if args.json is not None:
        if args.json.is_dir():
            raise UsageError(f"--json {args.json} is a directory; give a file name")
        if not args.overwrite:
            for path in (args.json, args.json.with_suffix(".md")):
                if path.exists():
                    raise UsageError(f"{path} exists; choose another --json path or pass "
                                     f"--overwrite")


def claim_result_path(args, document: dict, directory: Path = RESULTS_DIR) -> Path:
    """Write the empty document to the result path before the first run, so that a path that
    cannot be written is a usage error and never costs a run. A default path (a new name under
    `directory`) is created exclusively: an earlier result is never overwritten, and two runs
    started in the same second never share a file."""
    if args.json is not None:
        path = args.json
    else:
        while True:
            path = results.default_result_path(document["environment"], directory)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "x"):
                    break
            except FileExistsError:
                continue
            except OSError as error:
                raise UsageError(f"cannot create a result file in {path.parent}: {error}")
    try:
        results.save(document, path)
    except OSError as error:
        raise UsageError(f"cannot write the result file {path}: {error}") from None
    return path


@contextlib.contextmanager
def sigint_deferred(final: bool = False):
    """Ctrl-C during a save takes effect after it (or, for the final save, is ignored), so a
    save is never cut short and the run just measured is never lost."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received and not final:
        raise KeyboardInterrupt


def run_command(args, argv: list[str]) -> int:
    if args.list:
        return list_backends()
    check_arguments(args)
    config = preset(args.config, num_steps=args.steps, batch_size=args.batch_size)
    externals = parse_externals(args.external)
    names = select_backends(args.backend, include_slow=args.all)
    if not names and not externals:
        raise UsageError("no backend can run here; see `python bench.py --list`")

    console = Console(stderr=True, soft_wrap=True)  # one line per message, also in logs
    dataset = load_dataset(args.dataset, args.custom_dataset)
    spec = build_spec(dataset.docs, config)
    console.print(f"Reference: numpy float64, {config.num_steps} steps ...", highlight=False)
    reference = reference_losses(spec, config.num_steps, dataset.sha256)

    def reference_for(num_steps: int, steps: int) -> list[float]:
        """An external program's N sets its learning-rate schedule: its own reference."""
        if num_steps == config.num_steps:
            return reference[:steps]
        other = build_spec(dataset.docs, config.replace(num_steps=num_steps))
        return reference_losses(other, steps, dataset.sha256)

    environment = collect_environment()
    document = results.new_document(environment, ["bench.py", *argv])
    document["dataset"] = dataset.describe()
    path = claim_result_path(args, document)
    plan = [("backend", pair) for pair in plan_runs(names, args.dtype)]
    plan += [("external", external) for external in externals]
    order_rng = random.Random(args.seed)
    round_index = 0
    try:
        for round_index in range(args.repeat):
            round_plan = list(plan)
            if round_index > 0:  # interleave: a slow phase of the machine hits every backend
                order_rng.shuffle(round_plan)
            for kind, item in round_plan:
                suffix = f" #{round_index + 1}" if args.repeat > 1 else ""
                if kind == "backend":
                    backend, dtype = item
                    request = RunRequest(
                        backend=backend, dtype=dtype, config=config, steps=config.num_steps,
                        device=args.device, warmup_steps=args.warmup, num_samples=args.samples,
                        dataset_path=args.dataset, custom_dataset=args.custom_dataset,
                        timeout_s=args.timeout, memory_limit_mb=args.memory_limit)
                    label = f"{backend} {dtype}{suffix}"
                    record = _run_with_progress(
                        lambda on_event: run_backend(request, reference, on_event),
                        label, config.num_steps, console, args.quiet)
                else:
                    label = f"{item.name} (external){suffix}"
                    record = _run_with_progress(
                        lambda on_event: run_external(
                            item, config=config, vocab_size=spec.tokenizer.vocab_size,
                            reference_for=reference_for, timeout_s=args.timeout,
                            memory_limit_mb=args.memory_limit, on_event=on_event),
                        label, None, console, args.quiet)
                record["repeat"] = round_index
                document["runs"].append(record)
                with sigint_deferred():
                    results.save(document, path)
                _print_run_line(console, label, record)
    except (Interrupted, KeyboardInterrupt) as interrupt:
        if isinstance(interrupt, Interrupted):
            interrupt.record["repeat"] = round_index
            document["runs"].append(interrupt.record)
        with sigint_deferred(final=True):
            results.save(document, path)
        console.print(f"[yellow]Interrupted.[/yellow] Finished runs are in {path}",
                      highlight=False)
        return ExitCode.INTERRUPTED
    document["complete"] = True
    with sigint_deferred(final=True):
        results.save(document, path)
    print_summary(document)
    console.print(f"Results: {path} and {path.with_suffix('.md')}", highlight=False)
    return exit_code_of(document["runs"], explicit=set(args.backend))


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
        timing = f"{MEDIAN_MS.of(record):.4f} ms/step, final loss {losses_of(record)[-1]:.4f}"
        if record.get("kind") == "external":
            timing += " (wall time / steps)"
    if record["status"] == Status.OK:
        console.print(f"  {label}: ok, {timing}", highlight=False)
    else:
        colour = "yellow" if record["status"] in TIMED_STATUSES else "red"
        console.print(f"  {label}: [{colour}]{record['status']}[/{colour}]: "
                      f"{record.get('error', '')}" + (f"; {timing}" if timing else ""),
                      highlight=False)


def print_summary(document: dict) -> None:
    rows = summarize_runs(document["runs"])
    table = Table(title="microgpt-bench: training (median ms per step) and sampling")
    columns = results.summary_columns(rows)
    for column in columns:
        table.add_column(column.title, justify="right" if column.numeric else "left")
    for row in rows:
        failed = row["status"] != Status.OK
        table.add_row(*(f"[red]{column.cell(row)}[/red]" if failed and column.field == "status"
                        else column.cell(row) for column in columns))
    console = _stdout_console()
    console.print(table)
    for note in summary_notes(rows):
        console.print(f"  [yellow]warning:[/yellow] {note}", highlight=False, soft_wrap=True)
    # The reason of every run that did not pass, one line each, under the table.
    repeated = any(run.get("repeat") for run in document["runs"])
    for run in document["runs"]:
        if run["status"] != Status.OK:
            repeat = f" #{run.get('repeat', 0) + 1}" if repeated else ""
            console.print(f"  {run['backend']} ({run.get('dtype')}){repeat}: {run['status']}: "
                          f"{run.get('error', '')}", highlight=False, markup=False,
                          soft_wrap=True)
    if any(run.get("kind") == "external" for run in document["runs"]):
        console.print("  External programs: ms/step = wall time of the whole process / steps "
                      "(includes process start and the program's own setup).",
                      highlight=False, soft_wrap=True)


def _stdout_console() -> Console:
    # Wide enough for the full table when output goes to a file or a CI log.
    return Console(width=None if sys.stdout.isatty() else 200)
