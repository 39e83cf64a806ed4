"""The A/B gate (bench.abtest) on temporary git repositories: it skips cleanly (exit 0) where
there is nothing to compare against, and with stand-in `bench.py` scripts that write synthetic
result files it runs the whole worktree + interleaved rounds + compare path in seconds: a
slower parent passes, a slower HEAD fails with exit 1, and the worktree is removed afterwards.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bench import abtest
from bench.command import ExitCode
from tests.test_stats import synthetic_document

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")

GIT_IDENTITY = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
                "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}

# A stand-in for bench.py: writes the synthetic document next to it to --json, with its
# timings scaled by a little noise so that each "run" differs, as real runs do.
FAKE_BENCH = '''
import json, random, sys
arguments = sys.argv
document = json.load(open("template.json"))
noise = random.Random().uniform(0.98, 1.02)
for run in document["runs"]:
    for key in ("ms_per_step_median", "ms_per_step_q1", "ms_per_step_min"):
        run["train"][key] *= noise
    run["train"]["step_seconds"] = [s * noise for s in run["train"]["step_seconds"]]
json.dump(document, open(arguments[arguments.index("--json") + 1], "w"))
'''
FAILING_BENCH = "import sys\nsys.exit('this old bench.py cannot run')\n"


def git(repo: Path, *args: str) -> str:
    completed = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                               env={**os.environ, **GIT_IDENTITY}, check=True)
    return completed.stdout.strip()


def commit(repo: Path, files: dict[str, str], message: str) -> None:
    for name, text in files.items():
        (repo / name).write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)


def bench_files(ms: float) -> dict[str, str]:
    document = synthetic_document((("numpy", "float32", ms),), repeats=1, steps=30)
    return {"bench.py": FAKE_BENCH, "template.json": json.dumps(document)}


@pytest.fixture
def repo(tmp_path):
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q")
    return path


def test_no_parent_commit_is_skipped(repo, capsys):
    commit(repo, bench_files(1.0), "first")
    with pytest.raises(abtest.Skip, match="no commit HEAD~1"):
        abtest.run_abtest(repo)
    assert abtest.main(["--repo", str(repo)]) == ExitCode.OK
    assert "A/B skipped" in capsys.readouterr().out


def test_parent_without_bench_is_skipped(repo):
    commit(repo, {"README": "nothing to run yet"}, "first")
    commit(repo, bench_files(1.0), "second")
    with pytest.raises(abtest.Skip, match="has no bench.py"):
        abtest.run_abtest(repo)


def test_not_a_checkout_is_skipped(tmp_path):
    with pytest.raises(abtest.Skip, match="not a git checkout"):
        abtest.run_abtest(tmp_path)


def test_parent_that_cannot_run_is_skipped(repo):
    commit(repo, {"bench.py": FAILING_BENCH}, "old")
    commit(repo, bench_files(1.0), "new")
    with pytest.raises(abtest.Skip, match="cannot run the benchmark"):
        abtest.run_abtest(repo, rounds=2, log=lambda line: None)
    assert len(git(repo, "worktree", "list").splitlines()) == 1


def test_faster_head_passes_and_slower_head_fails(repo, tmp_path):
    commit(repo, bench_files(1.0), "base")
    commit(repo, bench_files(0.7), "faster")
    comparison, summary = abtest.run_abtest(repo, rounds=4, log=lambda line: None)
    assert comparison.regressions == [] and comparison.rows[0].verdict == "faster"
    assert len(summary["per_run_ms"]["head"]) == len(summary["per_run_ms"]["base"]) == 4

    commit(repo, bench_files(1.5), "slower")
    out = tmp_path / "ab.json"
    assert abtest.main(["--repo", str(repo), "--rounds", "4", "--json", str(out)]) \
        == ExitCode.FAILED
    summary = json.loads(out.read_text())
    assert summary["comparison"]["regressions"] == ["numpy float32"]
    assert summary["comparison"]["rows"][0]["ratio"] == pytest.approx(1.5 / 0.7, rel=0.05)
    # The parent's worktree is gone.
    assert len(git(repo, "worktree", "list").splitlines()) == 1
