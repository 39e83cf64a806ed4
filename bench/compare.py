"""`python bench.py compare BASE.json NEW.json`: did NEW get slower than BASE?

For every backend configuration (backend, dtype, device, model config) present in both files:
the ratio NEW/BASE of the per-step medians, whether the difference is statistically significant,
and a verdict. Then the geometric mean of the ratios over all configurations.

Which test: with at least 3 runs (repeats, each a fresh process) on each side, Welch's t-test on
the logarithms of the per-run medians, since run-to-run variation is the noise that matters
and speed changes are ratios (the test also gives a 95% confidence interval of the ratio).
With fewer runs no test is made and the verdict is "too few runs for significance" (never a
regression): the steps of one run are not independent samples, so a rank test on them calls
noise significant (one slow phase of the machine slows hundreds of steps at once).

Exit codes (bench.command.ExitCode): 0 no significant slowdown beyond --max-slowdown (or too
few runs to tell); 1 a regression (significant AND slower than the threshold), and only that;
2 an error: a file that cannot be read, is not valid JSON, has another schema version or a
field of the wrong type (bench.results.validate), a --json output that cannot be claimed,
results from different machines (unless --allow-cross-machine), a run in NEW that failed its
parity check or crashed, or nothing in common to compare.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import results, stats
from bench.command import ArgumentParser, ExitCode, UsageError, run_guarded, stdout_console
from bench.files import claim, display, write_atomically
from bench.record import (MEDIAN_MS, MIN_MS, Q1_MS, TIMED_STATUSES, Status,
                          is_timed)

# Which per-run figure is compared. The median step is what the tables show. On a busy shared
# machine other processes add time to some steps of a run (often more than half of them), never
# take it away, so the first quartile and the fastest step move far less between runs of the
# same code.
STATISTICS = {"median": MEDIAN_MS, "q1": Q1_MS, "min": MIN_MS}
DEFAULT_STATISTIC = "median"
DEFAULT_MAX_SLOWDOWN = 0.10
DEFAULT_ALPHA = 0.05
MIN_RUNS_FOR_RUN_LEVEL_TEST = 3
TOO_FEW_RUNS = "too few runs for significance"


class CompareError(UsageError):
    """A reason the two files cannot be compared: one line, exit code 2."""


@dataclass
class ConfigComparison:
    backend: str
    dtype: str
    device: str | None
    config: str
    base_ms: float  # median over runs of each run's `statistic` of its step times
    new_ms: float
    ratio: float  # new / base: above 1 is slower
    base_n: int
    new_n: int
    test: str
    p_value: float | None
    significant: bool
    ratio_ci: tuple[float, float] | None  # 95% CI of the ratio (Welch on logs only)
    verdict: str  # "regression", "slower", "faster", "no significant change"
    statistic: str = DEFAULT_STATISTIC
    # Run-to-run IQR of the per-run figure over its median, per side (None below 3 runs).
    base_spread: float | None = None
    new_spread: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.backend} {self.dtype}"


@dataclass
class Comparison:
    rows: list[ConfigComparison]
    geometric_mean_ratio: float | None
    max_slowdown: float
    alpha: float
    notes: list[str]
    warnings: list[str]
    statistic: str = DEFAULT_STATISTIC

    @property
    def regressions(self) -> list[ConfigComparison]:
        return [row for row in self.rows if row.verdict == "regression"]

    def to_dict(self) -> dict:
        return {"rows": [asdict(row) for row in self.rows],
                "geometric_mean_ratio": self.geometric_mean_ratio,
                "max_slowdown": self.max_slowdown, "alpha": self.alpha,
                "statistic": self.statistic, "notes": self.notes,
                "warnings": self.warnings,
                "regressions": [row.label for row in self.regressions]}


# ---- the comparison ------------------------------------------------------------------------
def _match_key(run: dict) -> tuple:
    """Configurations are matched on everything but the number of steps (which changes the
    total, not the time per step)."""
    config = {key: value for key, value in (run.get("config") or {}).items()
              if key != "num_steps"}
    return (run["backend"], run.get("dtype"), run.get("device"), stats.config_key(config),
            run.get("implementation"))


def _ok_groups(document: dict) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for run in document["runs"]:
        if is_timed(run):
            groups.setdefault(_match_key(run), []).append(run)
    return groups


def check_comparable(base: dict, new: dict, allow_cross_machine: bool,
                     base_name: str = "BASE", new_name: str = "NEW") -> list[str]:
    """Raise CompareError where a comparison would mislead; return notes about lesser
    differences (thread settings, CPU pinning) that the reader should know."""
    base_env, new_env = base.get("environment") or {}, new.get("environment") or {}
    base_machine = base_env.get("machine_fingerprint")
    new_machine = new_env.get("machine_fingerprint")
    notes = []
    if base_machine != new_machine:
        message = (f"{base_name} and {new_name} were measured on different machines "
                   f"({results.describe_machine(base_env)} [{base_machine}] vs "
                   f"{results.describe_machine(new_env)} [{new_machine}])")
        if not allow_cross_machine:
            raise CompareError(message + "; timings are not comparable. Measure both on one "
                               "machine (see `python -m bench.abtest`) or pass "
                               "--allow-cross-machine")
        notes.append(message + ": ratios mix code and machine differences")
    base_threads = base_env.get("thread_settings") or {}
    new_threads = new_env.get("thread_settings") or {}
    if base_threads != new_threads:
        notes.append(f"thread settings differ: {base_name} {base_threads} vs "
                     f"{new_name} {new_threads}")
    base_affinity = (base_env.get("cpu") or {}).get("affinity")
    new_affinity = (new_env.get("cpu") or {}).get("affinity")
    if base_affinity and new_affinity and base_affinity != new_affinity:
        notes.append(f"CPU affinity differs: {base_affinity} vs {new_affinity}")
    failed = [run for run in new["runs"]
              if run.get("status") not in (*TIMED_STATUSES, Status.UNAVAILABLE)]
    if failed:
        run = failed[0]
        raise CompareError(f"{new_name}: {run['backend']} {run.get('dtype')} "
                           f"({stats.config_label(run.get('config'))}) did not pass: "
                           f"{run['status']}: {run.get('error', '')}".rstrip(": "))
    return notes


def _per_run(runs: list[dict], statistic: str) -> tuple[list[float], str]:
    """Each run's figure, and the statistic it is. External programs (bench.external) have
    only a whole-run time per step, recorded as the median: they are compared on that."""
    values = [STATISTICS[statistic].of(run) for run in runs]
    if all(value is not None and value > 0 for value in values):
        return values, statistic
    values = [MEDIAN_MS.of(run) for run in runs]
    return values, "median"


def compare_configuration(base_runs: list[dict], new_runs: list[dict], max_slowdown: float,
                          alpha: float, statistic: str = DEFAULT_STATISTIC) -> ConfigComparison:
    (base_values, base_statistic), (new_values, new_statistic) = (
        _per_run(base_runs, statistic), _per_run(new_runs, statistic))
    notes, ratio_ci, p_value = [], None, None
    if base_statistic != statistic or new_statistic != statistic:
        # Only whole-run times on at least one side: compare like with like.
        (base_values, _), (new_values, _) = (_per_run(base_runs, "median"),
                                             _per_run(new_runs, "median"))
        notes.append(f"no per-step {statistic} recorded (an external program?): compared "
                     f"on the median instead")
        statistic = "median"
    base_ms, new_ms = statistics.median(base_values), statistics.median(new_values)
    ratio = new_ms / base_ms
    if min(len(base_runs), len(new_runs)) >= MIN_RUNS_FOR_RUN_LEVEL_TEST:
        result = stats.welch_t_test([math.log(value) for value in new_values],
                                    [math.log(value) for value in base_values])
        test = (f"Welch t on log per-run {statistic} of step times ({len(base_runs)} vs "
                f"{len(new_runs)} runs)")
        p_value = result.p_value
        ratio_ci = (math.exp(result["ci_low"]), math.exp(result["ci_high"]))
    else:
        # The steps of one run are not independent samples (one slow phase of the machine
        # slows hundreds of them at once), so they cannot tell a regression from noise: only
        # runs can, and a test needs a few of them on each side.
        test = (f"none: too few runs for significance ({len(base_runs)} vs {len(new_runs)}; "
                f"use --repeat {MIN_RUNS_FOR_RUN_LEVEL_TEST} or more on each side)")
    significant = p_value is not None and p_value < alpha
    if p_value is None and min(len(base_runs), len(new_runs)) < MIN_RUNS_FOR_RUN_LEVEL_TEST:
        verdict = TOO_FEW_RUNS
    elif significant and ratio > 1 + max_slowdown:
        verdict = "regression"
    elif significant and ratio > 1:
        verdict = "slower"
    elif significant and ratio < 1:
        verdict = "faster"
    else:
        verdict = "no significant change"
    first = base_runs[0]
    steps = {run.get("steps") for run in base_runs + new_runs}
    if len(steps) > 1:
        notes.append(f"step counts differ ({', '.join(str(s) for s in sorted(steps))}); "
                     f"only the time per step is compared")
    return ConfigComparison(
        backend=first["backend"], dtype=first.get("dtype"), device=first.get("device"),
        config=stats.config_label(first.get("config")), base_ms=base_ms, new_ms=new_ms,
        ratio=ratio, base_n=len(base_runs), new_n=len(new_runs), test=test, p_value=p_value,
        significant=significant, ratio_ci=ratio_ci, verdict=verdict, statistic=statistic,
        base_spread=_spread(base_values), new_spread=_spread(new_values), notes=notes)


def _implementation(runs: list[dict]) -> str:
    run = runs[0]
    if not run.get("implementation"):
        return "an implementation it did not record (a result file from before divisions)"
    return f"{run['implementation']} ({run.get('division', '?')} division)"


def _spread(values: list[float]) -> float | None:
    if len(values) < stats.MIN_RUNS_FOR_SPREAD:
        return None
    summary = stats.describe(values)
    return summary["iqr"] / summary["median"]


def compare_documents(base: dict, new: dict, max_slowdown: float = DEFAULT_MAX_SLOWDOWN,
                      alpha: float = DEFAULT_ALPHA, allow_cross_machine: bool = False,
                      base_name: str = "BASE", new_name: str = "NEW",
                      statistic: str = DEFAULT_STATISTIC) -> Comparison:
    notes = check_comparable(base, new, allow_cross_machine, base_name, new_name)
    base_groups, new_groups = _ok_groups(base), _ok_groups(new)
    rows = [compare_configuration(base_groups[key], new_groups[key], max_slowdown, alpha,
                                  statistic) for key in base_groups if key in new_groups]
    for key in base_groups:
        if key not in new_groups:
            moved = next((other for other in new_groups if other[:4] == key[:4]), None)
            if moved is not None:  # the same name, another implementation
                notes.append(
                    f"{key[0]} {key[1]}: not compared: {base_name} ran "
                    f"{_implementation(base_groups[key])}, {new_name} ran "
                    f"{_implementation(new_groups[moved])}; a name that changed implementation "
                    f"(or division) is a different row")
            else:
                notes.append(f"only in {base_name}: {key[0]} {key[1]} (not compared)")
    for key in new_groups:
        if key not in base_groups and not any(other[:4] == key[:4] for other in base_groups):
            notes.append(f"only in {new_name}: {key[0]} {key[1]} (not compared)")
    if not rows:
        moved = [note for note in notes if "not compared:" in note]
        raise CompareError(f"{base_name} and {new_name} have no successful backend "
                           f"configuration in common (backend, dtype, device, model config and "
                           f"implementation must match)" + "".join(f"; {note}" for note in moved))
    geometric_mean = math.exp(statistics.fmean(math.log(row.ratio) for row in rows))
    warnings = []
    for row in rows:
        for name, spread in ((base_name, row.base_spread), (new_name, row.new_spread)):
            if spread is not None and spread > stats.SPREAD_WARNING:
                warnings.append(
                    f"{name} {row.label}: unstable: the run-to-run IQR of the per-run "
                    f"{statistic} is {spread:.0%} of its median (over "
                    f"{stats.SPREAD_WARNING:.0%}), so only large changes can be significant; "
                    + stats.QUIETER_MACHINE_ADVICE
                    + ("" if statistic == "min" else ", or compare with --statistic min"))
    return Comparison(rows, geometric_mean, max_slowdown, alpha, notes, warnings, statistic)


# ---- output --------------------------------------------------------------------------------
def describe_ratio(ratio: float) -> str:
    if ratio >= 1:
        return f"{ratio:.3f}x slower" if ratio > 1 else "same"
    return f"{1 / ratio:.3f}x faster"


def print_comparison(comparison: Comparison, console, base_name: str, new_name: str) -> None:
    from rich.table import Table
    several_configs = len({row.config for row in comparison.rows}) > 1
    what = ("median ms per training step" if comparison.statistic == "median" else
             f"ms per training step, per-run {comparison.statistic} of the steps, median over "
             f"runs")
    table = Table(title=f"microgpt-bench compare: {new_name} against {base_name} ({what})")
    columns = ["backend", "dtype", "device", *(["config"] if several_configs else []),
               "base ms", "new ms", "new/base", "change", "95% CI of ratio", "p", "runs",
               "verdict"]
    for column in columns:
        table.add_column(column, justify="left" if column in (
            "backend", "dtype", "device", "config", "change", "verdict") else "right")
    colours = {"regression": "bold red", "slower": "yellow", "faster": "green"}
    for row in comparison.rows:
        ci = (f"{row.ratio_ci[0]:.3f}..{row.ratio_ci[1]:.3f}" if row.ratio_ci else "-")
        verdict = row.verdict
        if verdict in colours:
            verdict = f"[{colours[verdict]}]{verdict}[/{colours[verdict]}]"
        table.add_row(row.backend, row.dtype, row.device or "-",
                      *([row.config] if several_configs else []),
                      f"{row.base_ms:.4f}", f"{row.new_ms:.4f}", f"{row.ratio:.3f}",
                      describe_ratio(row.ratio), ci,
                      "-" if row.p_value is None else f"{row.p_value:.3g}",
                      f"{row.base_n} vs {row.new_n}", verdict)
    console.print(table)
    console.print(f"Geometric mean of new/base over {len(comparison.rows)} configuration(s): "
                  f"{comparison.geometric_mean_ratio:.3f} "
                  f"({describe_ratio(comparison.geometric_mean_ratio)})", highlight=False)
    tests = sorted({row.test for row in comparison.rows})
    console.print("Test: " + "; ".join(tests) + f". Significant: p < {comparison.alpha:g}. "
                  f"Regression: significant and more than {comparison.max_slowdown:.0%} slower.",
                  highlight=False)
    for note in comparison.notes + [f"{row.label}: {note}" for row in comparison.rows
                                    for note in row.notes]:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    for warning in comparison.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="bench.py compare",
        description="Compare two result files: per backend configuration the ratio NEW/BASE "
                    "of the median time per step, whether it is significant, and the geometric "
                    "mean. Exit 0: no significant slowdown beyond --max-slowdown; 1: a "
                    "regression; 2: an error (unreadable file, other schema, other machine, "
                    "a failed run in NEW).")
    parser.add_argument("base", type=Path, metavar="BASE.json")
    parser.add_argument("new", type=Path, metavar="NEW.json")
    parser.add_argument("--max-slowdown", type=float, default=DEFAULT_MAX_SLOWDOWN,
                        metavar="FRACTION",
                        help="a significant slowdown above this fraction is a regression "
                             f"(default {DEFAULT_MAX_SLOWDOWN:g}, i.e. 10%%)")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                        help=f"significance level of the test (default {DEFAULT_ALPHA:g})")
    parser.add_argument("--allow-cross-machine", action="store_true",
                        help="compare files from different machines (their ratios then mix "
                             "code and hardware)")
    parser.add_argument("--statistic", choices=list(STATISTICS), default=DEFAULT_STATISTIC,
                        help="per-run figure compared: the median step (default, as in the "
                             "tables), or the first quartile / fastest step, steadier on a "
                             "busy machine")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write the comparison as JSON (a new file: never one of the "
                             "inputs, an existing file only with --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow --json to replace an existing file that is not an input")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_guarded(lambda: _main(build_parser().parse_args(argv)))


def _main(args) -> int:
    if not (math.isfinite(args.max_slowdown) and args.max_slowdown >= 0):
        raise CompareError("--max-slowdown must be a finite number >= 0")
    if not 0 < args.alpha < 1:
        raise CompareError("--alpha must be between 0 and 1")
    base, new = results.load(args.base), results.load(args.new)
    base_name, new_name = display(args.base), display(args.new)
    comparison = compare_documents(base, new, args.max_slowdown, args.alpha,
                                   args.allow_cross_machine, base_name, new_name,
                                   args.statistic)
    # The output is claimed before anything is printed: it can never replace an input, and
    # an existing file only with --overwrite.
    taken = claim([args.json], overwrite=args.overwrite, inputs=[args.base, args.new],
                  what="--json", hint="choose another path or pass --overwrite") \
        if args.json else None
    console = stdout_console(wide=160)  # a closed stdout loses the table, not the verdict
    try:
        print_comparison(comparison, console, base_name, new_name)
    except (OSError, ValueError):  # stdout closed: the verdict is the exit code
        pass
    if args.json:
        try:
            write_atomically(args.json, json.dumps(comparison.to_dict(), indent=1) + "\n")
        except OSError as error:
            taken.release()
            raise UsageError(f"cannot write --json {display(args.json)}: "
                             f"{error.strerror or error}") from None
    with contextlib.suppress(OSError, ValueError):
        if comparison.regressions:
            names = ", ".join(f"{row.label} ({row.config}) {row.ratio:.3f}x"
                              for row in comparison.regressions)
            console.print(f"[bold red]REGRESSION[/bold red]: {names} (more than "
                          f"{args.max_slowdown:.0%} slower, p < {args.alpha:g})",
                          highlight=False)
        elif any(row.verdict == TOO_FEW_RUNS for row in comparison.rows):
            console.print(f"[yellow]OK, but {TOO_FEW_RUNS}[/yellow]: no regression can be "
                          f"called with fewer than {MIN_RUNS_FOR_RUN_LEVEL_TEST} runs per side "
                          f"(bench.py --repeat {MIN_RUNS_FOR_RUN_LEVEL_TEST} or more)",
                          highlight=False)
        else:
            console.print("[green]OK[/green]: no significant slowdown beyond "
                          f"{args.max_slowdown:.0%}", highlight=False)
    return ExitCode.FAILED if comparison.regressions else ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
