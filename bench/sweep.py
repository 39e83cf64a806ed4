"""`python bench.py sweep`: how each backend scales with model size and batch size, within a
time budget.

Runs the presets (tiny, small, medium, large) at batch sizes 1, 8 and 32 (above 1 only for
backends that declare batch support), cheapest first by estimated FLOPs, each as an ordinary
parity-checked benchmark run (bench.runner.run_backend) of 200 steps. Before each run (and each
float64 reference) its wall time is projected from the same backend's run of the previous
preset at the same batch size, else its latest run: fixed costs as measured, training and
sampling scaled by FLOPs. A run projected past the time left, or a run of the slow python and
mojo-tape rows projected past --run-limit (they take part only where they fit), is skipped and
listed with the reason; one that still overruns is stopped at the end of the budget and listed the same way.

Writes results/sweep/<time>-<host>.json (a result file whose runs carry "sweep": preset, batch
size, parameters, FLOPs; skipped runs under document["sweep"]["skipped"]), its Markdown table
and its charts against parameters, one panel per batch size: <same name>-scaling.png (ms per
step), -compile.png (compile seconds per backend and shape) and -gflops.png (achieved GFLOP/s
under the machine's measured peak).
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from backends import backend_info
from backends.contract import PRESETS, GPTConfig, build_spec, preset, training_flops
from bench import report, results
from bench.environment import collect_environment
from bench.limits import machine_peak
from bench.reference import ReferenceFailed, bounded_reference
from bench.cli import MAX_REPEAT, MAX_STEPS, MAX_TIMEOUT_S, claim_result, threads_environment
from bench.command import (ArgumentParser, ExitCode, UsageError, describe_interrupt,
                           install_termination_handlers, interrupt_exit_code, print_error,
                           run_guarded)
from bench.files import RESULTS_DIR
from bench.record import MEDIAN_MS, SAMPLING_S, TRAIN_S, Status
from bench.runner import Interrupted, RunRequest, run_backend
from bench.planning import check_known, plan_runs, select_backends
from data.dataset import load_dataset

DEFAULT_STEPS = 200
DEFAULT_BUDGET_S = 900.0
DEFAULT_BATCH_SIZES = (1, 8, 32)
SWEEP_DIR = RESULTS_DIR / "sweep"


# ---- cost model ----------------------------------------------------------------------------
def forward_flops_per_token(config: GPTConfig, vocab_size: int) -> float:
    """Multiply-adds x 2 of one token's forward pass: the matrices of every layer (q, k, v, o:
    4 d^2; MLP: 8 d^2), the language-model head, and attention over up to block_size keys."""
    d = config.n_embd
    matrices = config.n_layer * 12 * d * d + vocab_size * d
    attention = config.n_layer * 2 * config.block_size * d  # scores and weighted values
    return 2.0 * (matrices + attention)


def train_flops_per_step(config: GPTConfig, vocab_size: int) -> float:
    """A step over a full batch of full-length rows (backends with fixed shapes compute that
    whatever the names' lengths): the projection's measure of size."""
    return training_flops(config, vocab_size, [config.block_size] * config.batch_size)


@dataclass(frozen=True)
class SweepPoint:
    preset: str
    batch_size: int
    config: GPTConfig
    parameters: int
    train_flops: float  # per step
    sample_flops: float  # per sampled token

    @property
    def label(self) -> str:
        return self.preset if self.batch_size == 1 else f"{self.preset} b{self.batch_size}"


def sweep_points(presets: list[str], batch_sizes: list[int], steps: int,
                 vocab_size: int) -> list[SweepPoint]:
    """Every (preset, batch size), cheapest first."""
    points = []
    for name in presets:
        for batch_size in batch_sizes:
            config = preset(name, num_steps=steps, batch_size=batch_size)
            points.append(SweepPoint(name, batch_size, config, config.num_parameters(vocab_size),
                                     train_flops_per_step(config, vocab_size),
                                     forward_flops_per_token(config, vocab_size)))
    return sorted(points, key=lambda point: (point.train_flops, point.parameters))


def project_seconds(previous: dict, previous_point: SweepPoint, point: SweepPoint) -> float:
    """Wall time of a run at `point` from a measured run at `previous_point`: fixed costs
    (process start, import, compile) as measured; training and sampling scaled by FLOPs."""
    train_s = TRAIN_S.of(previous) or 0.0
    sample_s = SAMPLING_S.of(previous) or 0.0
    wall_s = previous.get("wall_s") or (train_s + sample_s)
    fixed_s = max(0.0, wall_s - train_s - sample_s)
    steps_ratio = point.config.num_steps / previous_point.config.num_steps
    return (fixed_s + train_s * steps_ratio * point.train_flops / previous_point.train_flops
            + sample_s * point.sample_flops / previous_point.sample_flops)


# ---- the sweep -----------------------------------------------------------------------------
@dataclass
class SweepSettings:
    pairs: list[tuple[str, str]]  # (backend, dtype)
    points: list[SweepPoint]
    budget_s: float
    warmup_steps: int = 5
    num_samples: int | None = None
    repeat: int = 1
    timeout_s: float = 1800.0
    # A run of a slow backend (one that only --all adds: python, mojo-tape) projected past this
    # many seconds is skipped whatever the budget: how a sweep takes them only as far as their
    # runs stay short, while every other backend runs at every point.
    run_limit_s: float | None = None
    dataset_path: str | None = None
    custom_dataset: bool = False
    seed: int = 0
    extra_env: dict = field(default_factory=dict)  # e.g. --threads' variables, for every run


def run_sweep(settings: SweepSettings, document: dict, save, reference_for, runner=run_backend,
              clock=time.monotonic, log=print) -> dict:
    """Run the sweep into `document` (saved with `save(document)` after every run) and return
    it. `reference_for(point)` gives the float64 reference losses; `runner(request, reference)`
    runs one backend (bench.runner.run_backend). Both and `clock` are parameters for tests."""
    started = clock()
    deadline = started + settings.budget_s
    skipped = document["sweep"]["skipped"]
    # (backend, dtype, batch size or None for any) -> its latest successful run and point.
    last_measured: dict[tuple, tuple[dict, SweepPoint]] = {}
    last_reference: tuple[float, SweepPoint] | None = None
    order_rng = random.Random(settings.seed)
    batch_support = {backend: backend_info(backend).batches for backend, _ in settings.pairs}
    slow = {backend for backend, _ in settings.pairs if not backend_info(backend).in_default_run}

    def skip(backend, dtype, point, reason, projected=None):
        skipped.append({"backend": backend, "dtype": dtype, "preset": point.preset,
                        "batch_size": point.batch_size, "parameters": point.parameters,
                        "projected_s": projected, "reason": reason})
        log(f"  {backend} {dtype} {point.label}: skipped ({reason})")

    for point in settings.points:
        candidates = [(backend, dtype) for backend, dtype in settings.pairs
                      if point.batch_size == 1 or batch_support[(backend)]]
        if not candidates:
            continue
        # The reference costs time too: project it like a run (numpy float64 in this process).
        remaining = deadline - clock()
        if last_reference is not None:
            reference_s, reference_point = last_reference
            projected = reference_s * point.train_flops / reference_point.train_flops
            if projected > remaining:
                for backend, dtype in candidates:
                    skip(backend, dtype, point, f"the float64 reference alone is projected at "
                         f"{projected:.0f} s, {max(remaining, 0):.0f} s left", projected)
                continue
        if remaining <= 0:
            for backend, dtype in candidates:
                skip(backend, dtype, point, "budget spent")
            continue
        reference_started = clock()
        reference = reference_for(point)
        last_reference = (clock() - reference_started, point)
        for repeat in range(settings.repeat):
            round_candidates = list(candidates)
            if repeat > 0:
                order_rng.shuffle(round_candidates)
            for backend, dtype in round_candidates:
                if repeat > 0 and not any(
                        run.get("repeat") == 0 and run["backend"] == backend
                        and run.get("dtype") == dtype and run.get("sweep", {}).get("label")
                        == point.label for run in document["runs"]):
                    continue  # skipped in the first round: skipped in all
                remaining = deadline - clock()
                projected = None
                # From the previous preset at the same batch size (FLOPs say little about how
                # well a backend batches), else from the backend's latest run.
                basis = (last_measured.get((backend, dtype, point.batch_size))
                         or last_measured.get((backend, dtype, None)))
                if basis is not None:
                    projected = project_seconds(basis[0], basis[1], point)
                if (backend in slow and projected is not None
                        and settings.run_limit_s is not None and projected > settings.run_limit_s):
                    if repeat == 0:
                        skip(backend, dtype, point, f"projected {projected:.0f} s, over the "
                             f"per-run limit (--run-limit {settings.run_limit_s:.0f} s)",
                             projected)
                    continue
                if remaining <= 0 or (projected is not None and projected > remaining):
                    if repeat == 0:
                        skip(backend, dtype, point,
                             "budget spent" if projected is None else
                             f"projected {projected:.1f} s, {max(remaining, 0):.1f} s left",
                             projected)
                    continue
                request = RunRequest(
                    backend=backend, dtype=dtype, config=point.config,
                    steps=point.config.num_steps, warmup_steps=settings.warmup_steps,
                    num_samples=settings.num_samples, dataset_path=settings.dataset_path,
                    custom_dataset=settings.custom_dataset, extra_env=settings.extra_env,
                    timeout_s=max(1.0, min(settings.timeout_s, remaining)))
                record = runner(request, reference)
                budget_cut = (record.get("status") == Status.TIMEOUT
                              and request.timeout_s < settings.timeout_s)
                if budget_cut:
                    if repeat == 0:
                        skip(backend, dtype, point, f"stopped at the end of the budget after "
                             f"{request.timeout_s:.0f} s (projected "
                             f"{'?' if projected is None else f'{projected:.0f}'} s)",
                             projected)
                    continue
                record["repeat"] = repeat
                record["sweep"] = {"preset": point.preset, "batch_size": point.batch_size,
                                   "label": point.label, "parameters": point.parameters,
                                   "train_flops_per_step": point.train_flops,
                                   "projected_s": projected}
                document["runs"].append(record)
                save(document)
                if record.get("status") == Status.OK:
                    last_measured[(backend, dtype, point.batch_size)] = (record, point)
                    last_measured[(backend, dtype, None)] = (record, point)
                    log(f"  {backend} {dtype} {point.label}: "
                        f"{MEDIAN_MS.of(record):.4f} ms/step, "
                        f"{record.get('wall_s', 0):.1f} s"
                        + (f" (projected {projected:.1f} s)" if projected else ""))
                else:
                    log(f"  {backend} {dtype} {point.label}: {record.get('status')}: "
                        f"{record.get('error', '')}")
    document["sweep"]["elapsed_s"] = clock() - started
    document["complete"] = True
    save(document)
    return document


# ---- charts --------------------------------------------------------------------------------
def draw_sweep_charts(document: dict, path: Path) -> list[Path]:
    """The sweep's three charts beside its result file, against model size per batch size:
    ms per step (-scaling.png: where lines cross, the faster backend changes), compile time
    (-compile.png: what a new shape costs before the first step) and achieved GFLOP/s with
    the machine's measured peak (-gflops.png: how far each row is from the limit)."""
    environment = document.get("environment") or {}
    machine = results.describe_machine(environment)
    steps = document["sweep"]["steps"]
    peak = (environment.get("peak") or {}).get("gflops")
    charts = [
        (report.STEP_TIME, "scaling", f"ms per training step against model size ({steps} "
                                      f"steps; {machine})", None),
        (report.COMPILE_TIME, "compile", f"compile time per backend and shape ({machine})",
         None),
        (report.ACHIEVED_GFLOPS, "gflops", f"achieved GFLOP/s against model size ({machine})",
         (peak, f"measured peak {peak:.1f} GFLOP/s") if peak else None),
    ]
    drawn = []
    for measure, suffix, title, line_at in charts:
        chart = report.chart_scaling(document["runs"], path.with_name(f"{path.stem}-{suffix}.png"),
                                     title, measure, peak, line_at)
        if chart is not None:
            drawn.append(chart)
    return drawn


# ---- command -------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="bench.py sweep",
        description="Run the presets at several batch sizes for the chosen backends within a "
                    "time budget; write a result file and a log-log scaling chart.")
    parser.add_argument("--backend", action="append", default=[], metavar="NAME",
                        help="backend to sweep (repeatable); default: every available backend "
                             "of the default run (not the slow python / mojo-tape)")
    parser.add_argument("--all", action="store_true",
                        help="every backend available here, the slow python and mojo-tape "
                             "included (with --run-limit they run only where they fit)")
    parser.add_argument("--dtype", action="append", default=[],
                        choices=["float32", "float64", "default"],
                        help="dtype (repeatable); default: each backend's own")
    parser.add_argument("--presets", default=",".join(PRESETS),
                        help=f"comma-separated presets (default {','.join(PRESETS)})")
    parser.add_argument("--batch-sizes", type=_int_list, default=list(DEFAULT_BATCH_SIZES),
                        help="comma-separated batch sizes (default 1,8,32; above 1 only for "
                             "backends that support batches)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"training steps per run (default {DEFAULT_STEPS})")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up steps (default 5)")
    parser.add_argument("--samples", type=int, default=None,
                        help="names sampled after training (default 20)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per backend and configuration (default 1)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, metavar="SECONDS",
                        help=f"total time budget (default {DEFAULT_BUDGET_S:.0f} s); runs "
                             "projected to exceed what is left are skipped")
    parser.add_argument("--run-limit", type=float, default=None, metavar="SECONDS",
                        help="skip a run of the slow rows that only --all adds (python, "
                             "mojo-tape) projected to take longer than this, whatever the "
                             "budget: they join the sweep only where they fit (default: no "
                             "limit)")
    parser.add_argument("--timeout", type=float, default=1800.0, metavar="SECONDS",
                        help="kill one run after this long (default 1800)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="intra-op threads for every run alike, as bench.py --threads "
                             "(1 keeps a framework's spinning threads from fighting another "
                             "program for the cores of a shared machine)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="result file (default: a new file under results/sweep/)")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-chart", action="store_true", help="no scaling chart")
    parser.add_argument("--dataset", default=None, metavar="PATH")
    parser.add_argument("--custom-dataset", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    argv = sys.argv[1:] if argv is None else argv
    install_termination_handlers()
    return run_guarded(lambda: _main(build_parser().parse_args(argv), argv,
                                     Console(stderr=True)))


def _main(args, argv: list[str], console) -> int:
    presets = [name.strip() for name in args.presets.split(",") if name.strip()]
    unknown = [name for name in presets if name not in PRESETS]
    if unknown or not presets:
        raise UsageError(f"unknown preset {unknown[0] if unknown else args.presets!r}; "
                         f"choose from {', '.join(PRESETS)}")
    check_known(args.backend)
    for name, value, low in (("--steps", args.steps, 1), ("--repeat", args.repeat, 1),
                             ("--warmup", args.warmup, 0)):
        if value < low:
            raise UsageError(f"{name} must be >= {low}")
    if not (math.isfinite(args.budget) and args.budget > 0):
        raise UsageError("--budget must be > 0 seconds")
    if args.run_limit is not None and not (math.isfinite(args.run_limit)
                                           and args.run_limit > 0):
        raise UsageError("--run-limit must be > 0 seconds")
    if not (math.isfinite(args.timeout) and 0 < args.timeout <= MAX_TIMEOUT_S):
        raise UsageError(f"--timeout must be > 0 and at most {MAX_TIMEOUT_S:.0f} s (7 days), "
                         f"got {args.timeout}")
    if args.threads is not None and not 1 <= args.threads <= 1024:
        raise UsageError(f"--threads must be between 1 and 1,024, got {args.threads}")
    if args.steps > MAX_STEPS or args.warmup > MAX_STEPS or args.repeat > MAX_REPEAT:
        raise UsageError(f"--steps and --warmup must be at most {MAX_STEPS:,}, --repeat at "
                         f"most {MAX_REPEAT:,}")
    if args.json is not None and os.path.abspath(args.json) == os.path.abspath(
            args.json.with_suffix(".md")):
        raise UsageError(f"--json {args.json}: the Markdown table is written beside it under "
                         f"the same name; give the result file a .json name")
    backends = select_backends(args.backend, include_slow=args.all)
    if not backends:
        raise UsageError("no backend can run here; see `python bench.py --list`")

    dataset = load_dataset(args.dataset, args.custom_dataset)
    vocab_size = build_spec(dataset.docs, PRESETS["tiny"]).tokenizer.vocab_size
    points = sweep_points(presets, args.batch_sizes, args.steps, vocab_size)
    settings = SweepSettings(
        pairs=plan_runs(backends, args.dtype), points=points, budget_s=args.budget,
        warmup_steps=args.warmup, num_samples=args.samples, repeat=args.repeat,
        timeout_s=args.timeout, run_limit_s=args.run_limit,
        extra_env=threads_environment(args.threads), dataset_path=os.path.abspath(dataset.path),
        custom_dataset=args.custom_dataset,
        seed=args.seed)

    environment = collect_environment()
    # The "% of peak" columns and the peak line of -gflops.png (cached per machine).
    environment["peak"] = machine_peak(environment["machine_fingerprint"])
    document = results.new_document(environment, ["bench.py", "sweep", *argv])
    document["dataset"] = dataset.describe()
    document["sweep"] = {"presets": presets, "batch_sizes": args.batch_sizes,
                         "steps": args.steps, "budget_s": args.budget, "repeat": args.repeat,
                         "run_limit_s": args.run_limit,
                         "backends": [f"{backend} {dtype}" for backend, dtype in settings.pairs],
                         "skipped": []}
    if args.threads is not None:
        document["threads"] = {"requested": args.threads, "environment": settings.extra_env}
    # Claimed before anything runs, as bench.py's result file (bench.files.claim).
    path, _ = claim_result(args, document, SWEEP_DIR, inputs=[dataset.path])

    def reference_for(point: SweepPoint) -> list[float]:
        spec = build_spec(dataset.docs, point.config)
        return bounded_reference(spec, point.config.num_steps, dataset,
                                 timeout_s=args.timeout)

    console.print(f"Sweep: {', '.join(document['sweep']['backends'])}; presets "
                  f"{', '.join(presets)}; batch sizes {args.batch_sizes}; {args.steps} steps; "
                  f"budget {args.budget:.0f} s", highlight=False)
    try:
        run_sweep(settings, document, lambda doc: results.save(doc, path), reference_for,
                  log=lambda line: console.print(line, highlight=False))
    except (Interrupted, KeyboardInterrupt) as stop:
        interrupt = stop.interrupt if isinstance(stop, Interrupted) else stop
        if isinstance(stop, Interrupted):
            document["runs"].append(stop.record)
        results.save(document, path)
        console.print(f"[yellow]Interrupted[/yellow] by {describe_interrupt(interrupt)}. "
                      f"Finished runs are in {path}", highlight=False)
        return interrupt_exit_code(interrupt)
    except ReferenceFailed as error:
        print_error(f"{error}; the result file keeps the runs measured before it")
        return ExitCode.FAILED
    outputs = [path, path.with_suffix(".md")]
    if not args.no_chart:
        try:
            outputs += draw_sweep_charts(document, path)
        except report.ChartsUnavailable as error:
            console.print(f"[yellow]note:[/yellow] {error}", highlight=False)
    console.print("Results: " + ", ".join(str(output) for output in outputs), highlight=False)
    failed = [run for run in document["runs"] if run.get("status") != Status.OK]
    return ExitCode.FAILED if failed else ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
