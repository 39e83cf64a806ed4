"""The CI performance gate: this checkout (A, HEAD) against its parent commit (B, HEAD~1),
measured on the same machine in the same job. `python -m bench.abtest` (or
`python bench.py abtest`).

Why A/B and not a stored baseline: a CI runner's speed drifts between jobs and machines by
more than the regressions worth catching, so both sides are measured together. The parent is
checked out with `git worktree` into a temporary folder (removed afterwards). Rounds alternate
the order (AB, BA, AB, ...), each side a fresh `python bench.py` process per round, so slow
phases of a shared machine hit both sides alike. Each run's fastest step (or --statistic
median / q1) is compared with bench.compare (Welch's t-test on the logarithms; a regression is
significant AND slower than --max-slowdown). The defaults were chosen by comparing unchanged
code with itself on a loaded shared 2-core machine (README, "CI: an A/B gate").

Exit codes (bench.command.ExitCode): 0 no regression, or skipped (no parent commit, the parent
has no bench.py or not the backend, or the parent's benchmark fails: there is nothing to
compare against); 1 a significant slowdown beyond the threshold; 2 this checkout's own
benchmark failed (or bad usage).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import compare, results
from bench.command import (ArgumentParser, ExitCode, UsageError, describe_interrupt,
                           install_termination_handlers, interrupt_exit_code, print_error,
                           run_guarded, stdout_console)
from bench.files import REPO_ROOT, claim, write_atomically
from bench.runner import supervise
from bench.record import MEDIAN_MS, MIN_MS, Q1_MS, Status
DEFAULT_BACKENDS = ("numpy",)
DEFAULT_ROUNDS = 12
DEFAULT_STEPS = 300
DEFAULT_WARMUP = 20
DEFAULT_MAX_SLOWDOWN = 0.10
DEFAULT_ALPHA = 0.01
# Per run, the fastest step: on a busy shared machine other processes add time to some steps,
# never take it away, so a run's fastest step moves least between runs of the same code.
DEFAULT_STATISTIC = "min"
RUN_TIMEOUT_S = 600


class Skip(Exception):
    """The comparison cannot be made (nothing to compare against): exit 0 with the message."""


class ABError(UsageError):
    """This checkout's benchmark failed or the usage was wrong: exit 2."""


def git(repo: Path, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    completed = subprocess.run(["git", "-C", str(repo), *args], capture_output=True,
                               text=True, timeout=120)
    if check and completed.returncode != 0:
        raise Skip(f"`git {' '.join(args)}` failed: {completed.stderr.strip()}")
    return completed


def resolve_base(repo: Path, revision: str, required: bool = False) -> str:
    """The commit to compare against, or Skip with the reason. A revision the user named
    (`required`) that does not resolve is an ABError (exit 2): a typo must not pass a gate."""
    if git(repo, "rev-parse", "--git-dir").returncode != 0:
        if required:
            raise ABError(f"--base {revision}: {repo} is not a git checkout")
        raise Skip(f"{repo} is not a git checkout")
    found = git(repo, "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}")
    if found.returncode != 0 and required:
        raise ABError(f"--base {revision}: no such commit in {repo} (check the name; "
                      f"`git log --oneline` lists commits)")
    if found.returncode != 0:
        shallow = git(repo, "rev-parse", "--is-shallow-repository").stdout.strip() == "true"
        raise Skip(f"no commit {revision} to compare against"
                   + (" (shallow clone: fetch at least 2 commits, e.g. actions/checkout "
                      "with fetch-depth: 2)" if shallow else " (first commit?)"))
    commit = found.stdout.strip()
    if git(repo, "cat-file", "-e", f"{commit}:bench.py").returncode != 0:
        raise Skip(f"{revision} ({commit[:10]}) has no bench.py: nothing to benchmark")
    return commit


class Worktree:
    """`git worktree add --detach` of a commit into a temporary folder; removed on exit."""

    def __init__(self, repo: Path, commit: str):
        self.repo, self.commit = repo, commit
        self.parent = Path(tempfile.mkdtemp(prefix="microgpt-abtest-"))
        self.path = self.parent / "base"

    def __enter__(self) -> Path:
        added = git(self.repo, "worktree", "add", "--detach", str(self.path), self.commit)
        if added.returncode != 0:
            shutil.rmtree(self.parent, ignore_errors=True)
            raise Skip(f"cannot check out {self.commit[:10]} with git worktree: "
                       f"{added.stderr.strip()}")
        return self.path

    def __exit__(self, *exc_info) -> None:
        git(self.repo, "worktree", "remove", "--force", str(self.path))
        shutil.rmtree(self.parent, ignore_errors=True)
        git(self.repo, "worktree", "prune")


def bench_command(backends: list[str], steps: int, warmup: int, json_path: Path) -> list[str]:
    command = [sys.executable, "bench.py"]
    for backend in backends:
        command += ["--backend", backend]
    return command + ["--steps", str(steps), "--warmup", str(warmup), "--json", str(json_path),
                      "--quiet"]


def run_side(root: Path, backends: list[str], steps: int, warmup: int, json_path: Path,
             env: dict) -> tuple[dict | None, str]:
    """One `bench.py` process in `root`; the result document (None if there is none) and the
    tail of its output for error messages."""
    # Supervised like every process the suite starts: its whole process tree is killed on a
    # timeout, on Ctrl-C or SIGTERM, and when this process dies.
    outcome = supervise(bench_command(backends, steps, warmup, json_path), cwd=root, env=env,
                        timeout_s=RUN_TIMEOUT_S)
    if outcome.interrupted:
        raise outcome.interrupt
    output = "\n".join(outcome.stdout_tail + outcome.stderr_tail).strip()
    if outcome.timed_out:
        return None, f"timed out after {RUN_TIMEOUT_S} s"
    if outcome.launch_error:
        return None, outcome.launch_error
    if not json_path.exists() or json_path.stat().st_size == 0:
        return None, output[-2000:] or f"exit code {outcome.returncode}"
    try:
        return results.load(json_path), output[-2000:]
    except results.ResultFileError as error:
        return None, str(error)


def merged_document(documents: list[dict]) -> dict:
    """The runs of every round of one side as one document (repeat = round)."""
    merged = dict(documents[0])
    merged["runs"] = []
    for round_index, document in enumerate(documents):
        for run in document["runs"]:
            merged["runs"].append({**run, "repeat": round_index})
    return merged


def _environment(repo: Path) -> dict:
    env = dict(os.environ)
    # Both sides read the dataset this checkout already verified (a worktree has no cache).
    if "MICROGPT_BENCH_DATASET" not in env:
        try:
            from data.dataset import load_dataset
            env["MICROGPT_BENCH_DATASET"] = load_dataset().path
        except Exception:  # the head's own run will report a missing dataset
            pass
    env.pop("PYTHONPATH", None)  # each side imports its own tree
    return env


def run_abtest(repo: Path = REPO_ROOT, base_revision: str | None = None,
               backends: tuple[str, ...] = DEFAULT_BACKENDS, rounds: int = DEFAULT_ROUNDS,
               steps: int = DEFAULT_STEPS, warmup: int = DEFAULT_WARMUP,
               max_slowdown: float = DEFAULT_MAX_SLOWDOWN, alpha: float = DEFAULT_ALPHA,
               statistic: str = DEFAULT_STATISTIC,
               log=print) -> tuple[compare.Comparison, dict]:
    """Measure and compare; raises Skip or ABError. Returns the comparison and a summary.
    `base_revision` None compares with HEAD~1 (skipped where there is none); a named one must
    exist."""
    commit = (resolve_base(repo, "HEAD~1") if base_revision is None
              else resolve_base(repo, base_revision, required=True))
    head = git(repo, "rev-parse", "HEAD").stdout.strip()
    env = _environment(repo)
    started = time.monotonic()
    with Worktree(repo, commit) as base_root, tempfile.TemporaryDirectory(
            prefix="microgpt-abtest-results-") as scratch:
        scratch = Path(scratch)
        sides = {"A": repo, "B": base_root}
        documents: dict[str, list[dict]] = {"A": [], "B": []}
        backends = list(backends)
        for round_index in range(rounds):
            order = ("A", "B") if round_index % 2 == 0 else ("B", "A")
            for side in order:
                path = scratch / f"{side}-{round_index}.json"
                document, output = run_side(sides[side], backends, steps, warmup, path, env)
                if document is None:
                    if side == "A":
                        raise ABError(f"this checkout's benchmark failed: {output}")
                    raise Skip(f"the parent {commit[:10]} cannot run the benchmark "
                               f"({output.splitlines()[-1] if output else 'no output'})")
                failed = [run for run in document["runs"] if run.get("status") != Status.OK]
                if failed and side == "A":
                    run = failed[0]
                    raise ABError(f"this checkout's {run['backend']} {run.get('dtype')} run "
                                  f"did not pass: {run['status']}: {run.get('error', '')}")
                if failed:  # the parent lacks a backend or it fails there: drop it
                    for run in failed:
                        log(f"parent {commit[:10]}: {run['backend']} {run.get('dtype')} "
                            f"{run['status']} ({run.get('error', '')}); not compared")
                    backends = [name for name in backends
                                if name not in {run["backend"] for run in failed}]
                    if not backends:
                        raise Skip(f"the parent {commit[:10]} runs none of the backends")
                    documents = {key: [_only(doc, backends) for doc in docs]
                                 for key, docs in documents.items()}
                    document = _only(document, backends)
                documents[side].append(document)
            log(f"round {round_index + 1}/{rounds}: " + ", ".join(
                f"{side} {_figures(documents[side][-1], statistic)}" for side in ("A", "B")))
        base_document = merged_document(documents["B"])
        head_document = merged_document(documents["A"])
    try:
        comparison = compare.compare_documents(
            base_document, head_document, max_slowdown, alpha, allow_cross_machine=True,
            base_name=f"parent {commit[:10]}", new_name=f"HEAD {head[:10]}",
            statistic=statistic)
    except compare.CompareError as error:
        raise Skip(f"cannot compare with the parent: {error}") from None
    summary = {"head": head, "base": commit, "rounds": rounds, "steps": steps,
               "warmup": warmup, "backends": backends, "max_slowdown": max_slowdown,
               "alpha": alpha, "statistic": statistic,
               "elapsed_s": time.monotonic() - started,
               "comparison": comparison.to_dict(),
               # The raw per-run medians, so that thresholds can be re-evaluated afterwards.
               "per_run_ms": {side: [[run["backend"], run.get("dtype"), run["repeat"],
                                      MEDIAN_MS.of(run), Q1_MS.of(run), MIN_MS.of(run)]
                                     for run in document["runs"] if run.get("status") == Status.OK]
                              for side, document in (("head", head_document),
                                                     ("base", base_document))}}
    return comparison, summary


def _only(document: dict, backends: list[str]) -> dict:
    return {**document, "runs": [run for run in document["runs"] if run["backend"] in backends]}


def _figures(document: dict, statistic: str) -> str:
    figure = compare.STATISTICS[statistic]
    return " ".join(f"{run['backend']} {statistic} {figure.of(run) or float('nan'):.4f} ms"
                    for run in document["runs"] if run.get("status") == Status.OK)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m bench.abtest",
        description="CI performance gate: benchmark this checkout against its parent commit "
                    "on this machine, interleaved, and fail on a significant slowdown. Exit 0: "
                    "no regression (or skipped: nothing to compare against); 1: regression; "
                    "2: this checkout's benchmark failed.")
    parser.add_argument("--backend", action="append", default=[], metavar="NAME",
                        help=f"backend to compare (repeatable; default "
                             f"{', '.join(DEFAULT_BACKENDS)})")
    parser.add_argument("--base", default=None, metavar="REV",
                        help="the commit to compare against (default HEAD~1, skipped when "
                             "there is none; a named REV that does not exist is an error)")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                        help=f"runs per side, alternating AB/BA (default {DEFAULT_ROUNDS})")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"training steps per run (default {DEFAULT_STEPS})")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                        help=f"warm-up steps per run (default {DEFAULT_WARMUP})")
    parser.add_argument("--max-slowdown", type=float, default=DEFAULT_MAX_SLOWDOWN,
                        metavar="FRACTION",
                        help=f"fail on a significant slowdown above this (default "
                             f"{DEFAULT_MAX_SLOWDOWN:g})")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                        help=f"significance level (default {DEFAULT_ALPHA:g})")
    parser.add_argument("--statistic", choices=list(compare.STATISTICS),
                        default=DEFAULT_STATISTIC,
                        help=f"per-run figure compared (default {DEFAULT_STATISTIC}: the "
                             f"fastest step of each run)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="write the comparison and settings as JSON (a new file, or "
                             "with --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow --json to replace an existing file")
    parser.add_argument("--repo", type=Path, default=REPO_ROOT, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    install_termination_handlers()
    try:
        return run_guarded(lambda: _main(build_parser().parse_args(argv)))
    except KeyboardInterrupt as interrupt:  # the worktree and every run were cleaned up
        print_error(f"interrupted by {describe_interrupt(interrupt)}")
        return interrupt_exit_code(interrupt)


def _main(args) -> int:
    console = stdout_console(wide=160)
    if args.rounds < compare.MIN_RUNS_FOR_RUN_LEVEL_TEST or args.steps < 2:
        raise UsageError(f"--rounds must be >= {compare.MIN_RUNS_FOR_RUN_LEVEL_TEST} (fewer "
                         f"runs cannot show a significant change) and --steps >= 2")
    if args.steps > 1_000_000 or args.rounds > 10_000 or not 0 <= args.warmup <= 1_000_000:
        raise UsageError("--steps must be at most 1,000,000, --rounds at most 10,000 and "
                         "--warmup between 0 and 1,000,000")
    if not (math.isfinite(args.max_slowdown) and args.max_slowdown >= 0) \
            or not 0 < args.alpha < 1:
        raise UsageError("--max-slowdown must be a finite number >= 0 and --alpha between 0 "
                         "and 1")
    if args.json:
        claim([args.json], overwrite=args.overwrite, what="--json")
    backends = tuple(dict.fromkeys(args.backend)) or DEFAULT_BACKENDS
    console.print(f"A/B: this checkout against {args.base or 'HEAD~1'}; {', '.join(backends)}; "
                  f"{args.rounds} rounds of {args.steps} steps; per-run {args.statistic} of "
                  f"the step times; regression = p < {args.alpha:g} and more than "
                  f"{args.max_slowdown:.0%} slower", highlight=False)
    try:
        comparison, summary = run_abtest(
            args.repo, args.base, backends, args.rounds, args.steps, args.warmup,
            args.max_slowdown, args.alpha, args.statistic,
            log=lambda line: console.print(f"  {line}", highlight=False))
    except Skip as skip:
        console.print(f"[yellow]A/B skipped:[/yellow] {skip}", highlight=False)
        if args.json:
            write_atomically(args.json, json.dumps({"skipped": str(skip)}) + "\n")
        return ExitCode.OK
    compare.print_comparison(comparison, console, f"parent {summary['base'][:10]}",
                             f"HEAD {summary['head'][:10]}")
    if args.json:
        write_atomically(args.json, json.dumps(summary, indent=1) + "\n")
    console.print(f"A/B took {summary['elapsed_s']:.0f} s", highlight=False)
    if comparison.regressions:
        names = ", ".join(f"{row.label} {row.ratio:.3f}x" for row in comparison.regressions)
        console.print(f"[bold red]REGRESSION[/bold red]: {names} slower than the parent "
                      f"(more than {args.max_slowdown:.0%}, p < {args.alpha:g})",
                      highlight=False)
        return ExitCode.FAILED
    console.print(f"[green]OK[/green]: no significant slowdown beyond "
                  f"{args.max_slowdown:.0%} against the parent", highlight=False)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
