"""The command line: `python bench.py [options]` runs backends; `python bench.py compare|report|
sweep ...` are the tools built on result files (their own modules).

Exit codes of a benchmark run: 0 every run passed (status ok); 1 a run failed (crash, timeout,
parity mismatch, divergence, or a backend named explicitly that cannot run here); 2 bad usage
or input (unknown backend, invalid config, unusable dataset, result file exists); 130 Ctrl-C
(the result file then holds every run that finished).
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from backends import REGISTRY, availability, get_backend_class
from backends.base import DTYPES
from bench import results
from bench.config import PRESETS, ConfigError, preset
from bench.environment import collect_environment
from bench.parity import reference_losses
from bench.runner import Interrupted, RunRequest, run_backend
from bench.spec import build_spec
from bench.stats import summarize_runs
from data.dataset import DATASET_ENV_VAR, DatasetError, load_dataset

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
SUBCOMMANDS = {"compare": "bench.compare", "report": "bench.report", "sweep": "bench.sweep"}


class UsageError(Exception):
    """A user mistake: printed as one line, exit code 2, no traceback."""


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="bench.py",
        description="Train and sample the spec'd MicroGPT on each backend and time it. "
                    "Subcommands: compare BASE.json NEW.json | report FILE... | sweep "
                    "(see `bench.py SUBCOMMAND --help`).")
    parser.add_argument("--backend", action="append", metavar="NAME", default=[],
                        help=f"run this backend (repeatable); one of: {', '.join(REGISTRY)}")
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
                        help="kill a backend run after this long (default 1800)")
    parser.add_argument("--memory-limit", type=int, default=None, metavar="MB",
                        help="address-space limit for each backend process")
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
    console = Console(stderr=True)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            import importlib
            return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
        return run_command(build_parser().parse_args(argv), argv)
    except (UsageError, ConfigError, DatasetError, results.ResultFileError) as error:
        console.print(f"[red]error:[/red] {error}", highlight=False)
        return EXIT_USAGE


def list_backends() -> int:
    table = Table(title="microgpt-bench backends")
    for column in ("backend", "available", "dtypes", "in default run", "why not / install"):
        table.add_column(column)
    for name, entry in REGISTRY.items():
        status = availability(name)
        dtypes = "-"
        if status.available:
            dtypes = ", ".join(get_backend_class(name).supported_dtypes)
        why = "" if status.available else f"{status.reason}. {status.install_hint}".strip()
        table.add_row(name, "yes" if status.available else "no", dtypes,
                      "yes" if entry.in_default_run else "no (--backend or --all)", why)
    _stdout_console().print(table)
    return EXIT_OK


def select_backends(args) -> list[str]:
    unknown = [name for name in args.backend if name not in REGISTRY]
    if unknown:
        raise UsageError(f"unknown backend {unknown[0]!r}; valid backends: "
                         f"{', '.join(REGISTRY)}")
    if args.backend:
        return list(dict.fromkeys(args.backend))
    return [name for name, entry in REGISTRY.items()
            if (args.all or entry.in_default_run) and availability(name).available]


def plan_runs(names: list[str], dtypes: list[str]) -> list[tuple[str, str]]:
    """(backend, dtype) pairs; a named dtype a backend lacks still becomes a run, reported as
    unavailable by the worker, so the table says why it is missing."""
    pairs = []
    for name in names:
        backend_dtypes = dtypes or ["default"]
        for dtype in backend_dtypes:
            if dtype == "default":
                try:
                    dtype = get_backend_class(name).default_dtype
                except Exception:  # a module that fails to import: let the worker report it
                    dtype = "float32"
            pairs.append((name, dtype))
    return list(dict.fromkeys(pairs))


def run_command(args, argv: list[str]) -> int:
    if args.list:
        return list_backends()
    if args.repeat < 1:
        raise UsageError("--repeat must be >= 1")
    if args.warmup < 0:
        raise UsageError("--warmup must be >= 0")
    if args.timeout <= 0:
        raise UsageError("--timeout must be > 0")
    config = preset(args.config, num_steps=args.steps, batch_size=args.batch_size)
    names = select_backends(args)
    if not names:
        raise UsageError("no backend can run here; see `python bench.py --list`")
    if args.json is not None and args.json.exists() and not args.overwrite:
        raise UsageError(f"{args.json} exists; choose another --json path or pass --overwrite")

    console = Console(stderr=True)
    dataset = load_dataset(args.dataset, args.custom_dataset)
    spec = build_spec(dataset.docs, config)
    console.print(f"Reference: numpy float64, {config.num_steps} steps ...", highlight=False)
    reference = reference_losses(spec, config.num_steps, dataset.sha256)

    environment = collect_environment()
    document = results.new_document(environment, ["bench.py", *argv])
    document["dataset"] = dataset.describe()
    path = args.json or results.default_result_path(environment)
    pairs = plan_runs(names, args.dtype)
    order_rng = random.Random(args.seed)
    exit_code = EXIT_OK
    try:
        for round_index in range(args.repeat):
            round_pairs = list(pairs)
            if round_index > 0:  # interleave: a slow phase of the machine hits every backend
                order_rng.shuffle(round_pairs)
            for backend, dtype in round_pairs:
                request = RunRequest(
                    backend=backend, dtype=dtype, config=config, steps=config.num_steps,
                    device=args.device, warmup_steps=args.warmup, num_samples=args.samples,
                    dataset_path=args.dataset, custom_dataset=args.custom_dataset,
                    timeout_s=args.timeout, memory_limit_mb=args.memory_limit)
                label = f"{backend} {dtype}" + (f" #{round_index + 1}" if args.repeat > 1 else "")
                record = _run_with_progress(request, reference, label, console, args.quiet)
                record["repeat"] = round_index
                document["runs"].append(record)
                results.save(document, path)
                _print_run_line(console, label, record)
    except Interrupted as interrupt:
        interrupt.record["repeat"] = round_index
        document["runs"].append(interrupt.record)
        results.save(document, path)
        console.print(f"[yellow]Interrupted.[/yellow] Finished runs are in {path}")
        return EXIT_INTERRUPTED
    document["complete"] = True
    results.save(document, path)
    print_summary(document)
    console.print(f"Results: {path} and {path.with_suffix('.md')}", highlight=False)
    if any(run["status"] != "ok" for run in document["runs"]):
        exit_code = EXIT_FAILED
    return exit_code


def _run_with_progress(request: RunRequest, reference, label: str, console: Console,
                       quiet: bool) -> dict:
    if quiet or not console.is_terminal:
        return run_backend(request, reference)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(f"{label}: setup", total=request.steps, detail="")

        def on_event(event):
            if event["event"] == "phase":
                progress.update(task, description=f"{label}: {event['phase']}")
            elif event["event"] == "losses":
                progress.advance(task, len(event["losses"]))
                progress.update(task, detail=f"loss {event['losses'][-1]:.4f}")
        return run_backend(request, reference, on_event)


def _print_run_line(console: Console, label: str, record: dict) -> None:
    train = record.get("train", {})
    if record["status"] == "ok":
        console.print(f"  {label}: ok, {train['ms_per_step_median']:.4f} ms/step, "
                      f"final loss {train['losses'][-1]:.4f}", highlight=False)
    else:
        console.print(f"  {label}: [red]{record['status']}[/red]: {record.get('error', '')}",
                      highlight=False)


def print_summary(document: dict) -> None:
    rows = summarize_runs(document["runs"])
    table = Table(title="microgpt-bench: training (median ms per step) and sampling")
    columns = [("backend", None), ("device", None), ("dtype", None), ("status", None),
               ("ms/step", "ms_per_step_median"), ("IQR", "ms_per_step_iqr"),
               ("first ms", "first_step_ms"), ("total s", "total_s"),
               ("compile s", "compile_s"), ("vs slowest", "speedup_vs_slowest"),
               ("vs numpy", "speedup_vs_numpy"), ("final loss", "final_loss"),
               ("tok/s", "tokens_per_s"), ("n", "n")]
    for title, _ in columns:
        table.add_column(title, justify="left" if title in ("backend", "status") else "right")
    formats = {"ms_per_step_median": ".4f", "ms_per_step_iqr": ".4f", "first_step_ms": ".3f",
               "total_s": ".3f", "compile_s": ".2f", "speedup_vs_slowest": ".1f",
               "speedup_vs_numpy": ".2f", "final_loss": ".4f", "tokens_per_s": ",.0f"}
    for row in rows:
        cells = []
        for title, field in columns:
            value = row.get(field or title)
            if value is None:
                cells.append("-")
            elif field in formats:
                suffix = "x" if field.startswith("speedup") else ""
                cells.append(format(value, formats[field]) + suffix)
            else:
                text = str(value)
                cells.append(f"[red]{text}[/red]" if title == "status" and text != "ok"
                             else text)
        table.add_row(*cells)
    _stdout_console().print(table)


def _stdout_console() -> Console:
    # Wide enough for the full table when output goes to a file or a CI log.
    return Console(width=None if sys.stdout.isatty() else 200)
