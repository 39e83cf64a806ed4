"""The suite under hostile input and faults (issue 14): nothing lost, nothing left running, no
traceback, and exit codes a CI job can trust.

Each group is one mechanism, probed by a parametrised matrix of the ways to break it:

- options: every bound (steps, timeout, warmup, repeat, samples, memory, batch, device) and
  every clash is a one-line usage error, exit 2, before anything runs, nothing written;
- outputs (bench.files.claim / write_atomically): a result path is claimed exclusively before
  the reference run; nothing replaces a file it did not create (an input, a committed report,
  a dangling link) without --overwrite; a failed save leaves the last complete file and no
  temporary file;
- processes (bench.runner.supervise): the whole process tree is killed on a timeout, Ctrl-C,
  SIGTERM, SIGHUP and kill -9 of the runner; a program is reported by its exit, not by a
  background child holding its output; output is bounded;
- result files (bench.results.validate): compare and report refuse every malformed field with
  one line and exit 2 (compare never 1);
- integrity: the test hook cannot replace a backend and is recorded; external loss lines must
  be plausible; compare never calls a regression from single runs; report counts a file once;
  abtest refuses a --base that does not exist.

Fast: numpy with 20 steps, the fault backends of tests/fault_backends.py, small timeouts.
"""
from __future__ import annotations

import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backends import EXTRA_BACKENDS_ENV_VAR
from bench import cli, compare, external, files, report, results, runner
from bench.command import ExitCode
from tests.fault_backends import (FAULT_PIDFILE_ENV_VAR, STEP_SLEEP_ENV_VAR, registry_value)
from tests.test_stats import synthetic_document

REPO = Path(__file__).resolve().parents[1]
STEPS = 20
FAST = ["--backend", "numpy", "--steps", str(STEPS), "--warmup", "0", "--samples", "2",
        "--quiet"]


def bench(*args, cwd=REPO, env=None, timeout=120, **popen):
    return subprocess.run([sys.executable, str(REPO / "bench.py"), *args], cwd=cwd,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, **popen)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its parent is gone for our purpose
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def wait_gone(pids, seconds=10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = [pid for pid in pids if alive(pid)]
        if not left:
            return []
        time.sleep(0.05)
    return [pid for pid in pids if alive(pid)]


def one_error_line(stderr: str, message: str) -> None:
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("Reference:")]
    assert "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert message in lines[0], lines[0]


@pytest.fixture(scope="module")
def names_copy(tmp_path_factory, dataset):
    directory = tmp_path_factory.mktemp("dataset")
    path = directory / "names.txt"
    path.write_bytes(Path(dataset.path).read_bytes())
    return path


# ==== 1. options: bounds and clashes, before anything runs ====================================
@pytest.fixture
def place(tmp_path):
    (tmp_path / "taken.json").write_text("{}")
    (tmp_path / "folder").mkdir()
    (tmp_path / "dangling.json").symlink_to(tmp_path / "nowhere.json")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "program.sh").write_text("#!/bin/sh\necho hi\n")  # not executable
    (tmp_path / "fifo.txt").touch() if not hasattr(os, "mkfifo") else os.mkfifo(
        tmp_path / "fifo.txt")
    return tmp_path


USAGE = [
    # item 8: --steps bounded, never pre-built in the runner
    (["--steps", "1000000000"], "--steps must be at most 1,000,000"),
    (["--steps", "1000001"], "--steps must be at most 1,000,000"),
    (["--warmup", "100000000"], "--warmup must be between 0 and 1,000,000"),
    (["--repeat", "1000000"], "--repeat must be between 1 and 10,000"),
    (["--samples", "10000000"], "--samples must be between 0 and 100,000"),
    (["--batch-size", "100000"], "--batch-size must be at most 4,096"),
    # item 7: --timeout finite, > 0, bounded
    (["--timeout", "inf"], "--timeout must be > 0 and at most 604800 s"),
    (["--timeout=-inf"], "--timeout must be > 0"),
    (["--timeout", "nan"], "--timeout must be > 0"),
    (["--timeout", "1e300"], "--timeout must be > 0"),
    (["--timeout", "-1"], "--timeout must be > 0"),
    (["--timeout", "abc"], "argument --timeout: invalid float value"),
    # item 13: a memory limit the OS cannot take
    (["--memory-limit", "100000000000000"], "--memory-limit must be > 0 (MB) and at most"),
    (["--memory-limit", "-5"], "--memory-limit must be > 0"),
    # item 18: device names checked before the reference run
    (["--device", "tpu"], "--device 'tpu' is not a device name"),
    (["--device", "cuda:x"], "is not a device name"),
    (["--device", ""], "is not a device name"),
    (["--device", "cpu;rm"], "is not a device name"),
    # rough: --all with --backend
    (["--all"], "--all runs every backend; it cannot be combined with --backend"),
    # item 1 and the writer: outputs
    (["--json", "{dir}/x.md"], "the Markdown table is written beside the result file"),
    (["--json", "{dir}/x.json.md"], "the same file"),
    (["--json", "{dir}/taken.json"], "taken.json exists; choose another --json path or pass "
                                     "--overwrite"),
    (["--json", "{dir}/dangling.json"], "dangling.json is a symbolic link"),
    (["--json", "{dir}/folder"], "is a directory"),
    (["--json", "{dir}/loop"], "loop is a symbolic link"),
    (["--json", "/proc/no-such-dir/x.json"], "cannot write the result file /proc/no-such-dir"),
    (["--json", "{dir}/taken.json/x.json"], "cannot write the result file"),
    # datasets: what the path is
    (["--dataset", "{dir}/folder"], "is a directory, not a file"),
    (["--dataset", "{dir}/loop"], "is a symbolic-link loop"),
    (["--dataset", "{dir}/dangling.json"], "is a dangling symbolic link"),
    (["--dataset", "{dir}/fifo.txt"], "is not a regular file"),
    (["--dataset", "/dev/zero"], "is not a regular file"),
    (["--dataset", "{dir}/missing.txt"], "does not exist"),
    # externals: what the command is
    (["--external", "x={dir}/program.sh"], "is not executable (chmod +x it"),
    (["--external", "x={dir}/folder"], "is a directory, not a program"),
    (["--external", "x={dir}/missing"], "not found (no such file)"),
    (["--external", "x=no-such-program-h7"], "command 'no-such-program-h7' not found"),
    (["--external", "x="], "expected NAME='COMMAND ...'"),
    (["--external", "x=a 'b"], "cannot split the command"),
    (["--external", "bad name=echo"], "must be letters, digits"),
    (["--external", "x=echo", "--external", "x=echo"], "the name is already used"),
]


@pytest.mark.parametrize("args, message", USAGE, ids=[" ".join(args) for args, _ in USAGE])
def test_usage_errors_exit_2_before_anything_runs(args, message, place, capsys):
    args = [arg.format(dir=place) for arg in args]
    before = sorted(os.listdir(place))
    assert cli.main([*FAST, *args]) == ExitCode.USAGE
    one_error_line(capsys.readouterr().err, message.format(dir=place))
    assert sorted(os.listdir(place)) == before  # nothing written
    assert (place / "taken.json").read_text() == "{}"


SWEEP_USAGE = [
    (["--timeout", "nan"], "--timeout must be > 0"),
    (["--timeout", "inf"], "--timeout must be > 0"),
    (["--budget", "nan"], "--budget must be > 0"),
    (["--steps", "10000000"], "--steps and --warmup must be at most 1,000,000"),
    (["--json", "{dir}/s.md"], "the Markdown table is written beside it"),
    (["--json", "{dir}/taken.json"], "taken.json exists"),
    (["--json", "{dir}/dangling.json"], "is a symbolic link"),
]


@pytest.mark.parametrize("args, message", SWEEP_USAGE,
                         ids=[" ".join(args) for args, _ in SWEEP_USAGE])
def test_sweep_shares_the_bounds_and_the_claim(args, message, place, capsys):
    from bench import sweep
    args = [arg.format(dir=place) for arg in args]
    before = sorted(os.listdir(place))
    assert sweep.main(["--backend", "numpy", "--presets", "tiny", "--batch-sizes", "1",
                       "--steps", "5", *args]) == ExitCode.USAGE
    one_error_line(capsys.readouterr().err, message.format(dir=place))
    assert sorted(os.listdir(place)) == before


@pytest.mark.parametrize("args, message", [
    (["--max-slowdown", "nan"], "--max-slowdown must be a finite number >= 0"),
    (["--max-slowdown", "inf"], "--max-slowdown must be a finite number >= 0"),
    (["--alpha", "nan"], "--alpha must be between 0 and 1"),
    (["--alpha", "1"], "--alpha must be between 0 and 1"),
    (["--statistic", "max"], "invalid choice"),
])
def test_compare_options(args, message, good, capsys):
    _check_refused(compare, [str(good), str(good), *args], capsys, message)


def test_result_path_never_replaces_an_input(names_copy, tmp_path, capsys):
    """--overwrite may replace an earlier result, never the dataset it reads."""
    before = names_copy.read_bytes()
    target = tmp_path / "names.json"
    target.symlink_to(names_copy)
    for path in (target, names_copy.with_suffix(".json")):
        if path == target:
            args = ["--json", str(path), "--overwrite", "--dataset", str(names_copy)]
        else:
            args = ["--json", str(names_copy.with_suffix(".json")), "--overwrite",
                    "--dataset", str(names_copy.with_suffix(".md"))]
            names_copy.with_suffix(".md").write_bytes(before)
        assert cli.main([*FAST, *args]) == ExitCode.USAGE
    assert names_copy.read_bytes() == before
    assert "is also an input of this command" in capsys.readouterr().err


def test_dangling_link_is_replaced_only_with_overwrite(tmp_path):
    link = tmp_path / "r.json"
    link.symlink_to(tmp_path / "elsewhere" / "r.json")
    completed = bench(*FAST, "--json", str(link))
    assert completed.returncode == ExitCode.USAGE
    completed = bench(*FAST, "--json", str(link), "--overwrite")
    assert completed.returncode == ExitCode.OK, completed.stderr
    assert not link.is_symlink() and results.load(link)["complete"]  # the link, not its target
    assert not (tmp_path / "elsewhere").exists()


# ==== 2. outputs: claimed before the reference, written atomically ============================
def test_two_runs_with_the_same_json_one_wins(tmp_path):
    """Item 2: both start together; exactly one gets the path, the other exits 2 at once."""
    path = tmp_path / "same.json"
    command = [sys.executable, "bench.py", *FAST, "--json", str(path)]
    processes = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=120) for process in processes]
    codes = sorted(process.returncode for process in processes)
    assert codes == [ExitCode.OK, ExitCode.USAGE], outputs
    loser = outputs[[p.returncode for p in processes].index(ExitCode.USAGE)][1]
    assert "Traceback" not in loser and ("exists" in loser or "another process" in loser)
    document = results.load(path)
    assert document["complete"] and len(document["runs"]) == 1


def test_claim_is_exclusive_and_released(tmp_path):
    first = files.claim([tmp_path / "a.json", tmp_path / "a.md"])
    with pytest.raises(files.OutputError, match="exists"):
        files.claim([tmp_path / "b.json", tmp_path / "a.md"])
    assert not (tmp_path / "b.json").exists()  # what the failed claim created is removed
    first.release()
    assert os.listdir(tmp_path) == []
    overwritten = tmp_path / "kept.json"
    overwritten.write_text("earlier")
    files.claim([overwritten], overwrite=True).release()
    assert overwritten.read_text() == "earlier"  # never removes what it did not create


@pytest.mark.parametrize("error", [28, 27, 5], ids=["ENOSPC", "EFBIG", "EIO"])
def test_failed_atomic_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch, error):
    path = tmp_path / "r.json"
    path.write_text("old")

    def failing(*args):
        raise OSError(error, os.strerror(error))
    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        files.write_atomically(path, "new" * 1000)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_at_the_save_keeps_the_last_complete_file(tmp_path):
    """Item 13: a save that fails (here: EFBIG, as a full disk fails) is one line, exit 3, the
    file keeps its last complete save, and no temporary file is left."""
    path = tmp_path / "r.json"
    chatty = tmp_path / "chatty.py"
    chatty.write_text("for i in range(40):\n    print('x' * 2000)\n"
                      "print('step 1 / 1 | loss 3.3660')\n")
    completed = subprocess.run(
        [sys.executable, "bench.py", *FAST, "--external", f"chatty={sys.executable} {chatty}",
         "--json", str(path)], cwd=REPO, capture_output=True, text=True, timeout=120,
        preexec_fn=_limit_file_size(16_000))
    assert completed.returncode == ExitCode.OUTPUT, completed.stderr
    assert "Traceback" not in completed.stderr
    last = completed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot save the results to") and "File too large" in last
    assert "keeps its last complete save, with 1 of the 2 runs measured" in last
    document = results.load(path)  # valid JSON: the last complete save
    assert not document["complete"]
    assert sorted(os.listdir(tmp_path)) == ["chatty.py", "r.json", "r.md"]


@pytest.mark.parametrize("how", ["closed", "broken-pipe"])
def test_closed_stdout_loses_only_the_table(tmp_path, how):
    path = tmp_path / "r.json"
    command = [sys.executable, "bench.py", *FAST, "--json", str(path)]
    if how == "closed":
        process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=lambda: os.close(1))
    else:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        process.stdout.close()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == ExitCode.OK, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    assert results.load(path)["complete"]


@pytest.mark.parametrize("scale, code", [(1.0, ExitCode.OK), (2.0, ExitCode.FAILED)])
def test_compare_with_a_broken_stdout_keeps_its_verdict(tmp_path, scale, code):
    """Rich turns a broken pipe into exit 1, which would read as "regression"."""
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(synthetic_document(repeats=5, seed=1)))
    b.write_text(json.dumps(synthetic_document(repeats=5, seed=2, scale=scale)))
    process = subprocess.Popen([sys.executable, "bench.py", "compare", str(a), str(b)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    process.stdout.close()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code and "Traceback" not in stderr, stderr


def test_non_utf8_path(tmp_path):
    path = os.fsencode(tmp_path) + b"/r\xff\xfe.json"
    completed = subprocess.run([sys.executable, "bench.py", *FAST, "--json", path], cwd=REPO,
                               capture_output=True, timeout=120)
    assert completed.returncode == ExitCode.OK, completed.stderr
    assert b"Traceback" not in completed.stderr and b"\\xff" in completed.stderr
    assert results.load(os.fsdecode(path))["complete"]
    assert os.path.exists(os.fsencode(tmp_path) + b"/r\xff\xfe.md")


# ==== 3. processes: nothing left running ======================================================
def _start(tmp_path, *args, env=None):
    path = tmp_path / "r.json"
    process = subprocess.Popen(
        [sys.executable, "bench.py", "--steps", str(STEPS), "--warmup", "0", "--quiet",
         "--json", str(path), *args], cwd=REPO, env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return process, path


def _wait_for_file(path: Path, process, seconds=60.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while True:
        if path.exists() and len(path.read_text().split()) >= 2:
            return [int(pid) for pid in path.read_text().split()]
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


SPAWNER = "sh -c 'sleep 300 & echo $$ $! > {pids}; wait'"


@pytest.mark.parametrize("how, code", [
    ("SIGTERM", 143), ("SIGHUP", 129), ("SIGINT", 130), ("SIGKILL", -9)])
def test_runner_ending_kills_the_external_tree(tmp_path, how, code):
    """Item 5: the external and the child it started in the background are gone, whatever
    ends the runner (SIGTERM: what CI sends on cancel; kill -9: the reaper)."""
    pids = tmp_path / "pids"
    process, path = _start(tmp_path, "--backend", "numpy", "--timeout", "200",
                           "--external", "spawner=" + SPAWNER.format(pids=pids))
    children = _wait_for_file(pids, process)
    process.send_signal(getattr(signal, how))
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert wait_gone(children) == []
    if how != "SIGKILL":
        assert "Traceback" not in stderr
        document = results.load(path)
        run = next(run for run in document["runs"] if run["backend"] == "spawner")
        assert run["status"] == "interrupted"
        assert run["error"].startswith("interrupted by " + (
            "the user (Ctrl-C)" if how == "SIGINT" else f"{how} (terminated)"))
        assert document["runs"][0]["status"] == "ok"  # numpy, finished before, kept


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_runner_ending_kills_the_worker(tmp_path, how):
    pidfile = tmp_path / "worker.pid"
    process, path = _start(tmp_path, "--backend", "slow", "--timeout", "200", env={
        EXTRA_BACKENDS_ENV_VAR: registry_value("slow"), FAULT_PIDFILE_ENV_VAR: str(pidfile),
        STEP_SLEEP_ENV_VAR: "2"})
    deadline = time.monotonic() + 60
    while not pidfile.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    worker = int(pidfile.read_text())
    process.send_signal(getattr(signal, how))
    process.communicate(timeout=60)
    assert wait_gone([worker]) == []


def _children(pid: int) -> list[tuple[int, str]]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parent = int(handle.read().split(")")[-1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    command = handle.read().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ValueError, IndexError):
                continue
            if parent == pid:
                found.append((int(entry), command))
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
@pytest.mark.parametrize("how, code", [("SIGTERM", 143), ("SIGKILL", -9)])
def test_reference_run_is_supervised_too(tmp_path, how, code):
    """Item 8: a reference that is not cached runs in a supervised process; the runner's end
    ends it, and a run stopped before anything was measured leaves no result file."""
    path = tmp_path / "r.json"
    process = subprocess.Popen(
        [sys.executable, "bench.py", "--backend", "numpy", "--steps", "987654", "--quiet",
         "--json", str(path)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    deadline = time.monotonic() + 60
    while True:
        reference = [pid for pid, command in _children(process.pid)
                     if "bench.reference" in command]
        if reference:
            break
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(getattr(signal, how))
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert wait_gone(reference) == []
    if how == "SIGTERM":
        assert "Traceback" not in stderr and "during the reference run" in stderr
        assert not path.exists() and not path.with_suffix(".md").exists()


@pytest.mark.parametrize("program, status", [
    # item 6: exits 0, a background child keeps its stdout open
    ("sh -c 'sleep 300 & echo \"step 1 / 1 | loss 3.3660\"'", "ok"),
    ("sh -c 'sleep 300 & echo \"step 1 / 1 | loss 3.3660\"; exit 3'", "crashed"),
    ("sh -c 'sleep 300 >/dev/null 2>&1 & echo \"step 1 / 1 | loss 3.3660\"'", "ok"),
])
def test_a_program_is_judged_by_its_exit(tmp_path, program, status):
    started = time.monotonic()
    completed = bench(*FAST, "--timeout", "60", "--external", f"bg={program}",
                      "--json", str(tmp_path / "r.json"))
    assert time.monotonic() - started < 40, "waited for the background child"
    run = results.load(tmp_path / "r.json")["runs"][1]
    assert run["status"] == status, (run, completed.stderr)
    assert run["wall_s"] < 10


def test_timeout_kills_the_whole_group():
    pids = []
    outcome = runner.supervise(["sh", "-c", "sleep 300 & echo $!; sleep 300"], timeout_s=1,
                               on_stdout_line=lambda line: pids.append(int(line)) or True)
    assert outcome.timed_out and outcome.returncode == -signal.SIGKILL
    assert wait_gone(pids) == []


def test_output_is_bounded_and_lines_split_on_carriage_returns():
    script = ("import sys\n"
              "sys.stdout.write('a\\rb\\r\\nc\\n')\n"
              "sys.stdout.write('x' * 5_000_000 + '\\nafter\\n')\n"
              "sys.stderr.write(('e' * 3000 + '\\n') * 100)\n")
    seen = []
    outcome = runner.supervise([sys.executable, "-c", script], timeout_s=30,
                               on_stdout_line=lambda line: seen.append(line) or False)
    assert outcome.returncode == 0
    assert seen[:3] == ["a", "b", "c"] and seen[-1] == "after"
    assert max(map(len, seen)) <= runner.MAX_LINE_BYTES + 20
    assert len(outcome.stderr_tail) == runner.TAIL_LINES
    assert max(map(len, outcome.stdout_tail + outcome.stderr_tail)) <= runner.TAIL_LINE_CHARS + 6


def test_a_callback_that_raises_does_not_hang_the_run():
    def broken(line):
        raise KeyError("events")
    outcome = runner.supervise([sys.executable, "-c", "print('x\\n' * 200000)"], timeout_s=30,
                               on_stdout_line=broken)
    assert outcome.returncode == 0 and not outcome.timed_out


def test_reaper_kills_registered_groups_when_its_pipe_closes():
    reaper = runner._Reaper()
    victim = subprocess.Popen(["sleep", "300"], start_new_session=True)
    reaper.watch(victim.pid)
    reaper.process.stdin.close()  # as when the runner dies
    assert victim.wait(timeout=10) == -signal.SIGKILL


# ==== 4. externals: only plausible loss lines are believed ====================================
PARSE = [
    ("step 1 / 20 | loss 0e1", "a loss must be a positive number"),
    ("step 1 / 20 | loss 0.0000", "a loss must be a positive number"),
    ("step 1 / 20 | loss -3.3660", "a loss must be a positive number"),
    ("step 1 / 20 | loss 3", "too few digits"),
    ("step 1 / 20 | loss 3.4", "too few digits"),
    ("step 1 / 20 | loss 3e0", "too few digits"),
    ("step 1 / 100000000000 | loss 3.3660", "is not a plausible number of steps"),
    ("step 1 / 0 | loss 3.3660", "is not a plausible number of steps"),
    ("step 0 / 20 | loss 3.3660", "outside 1..N"),
    ("step 21 / 20 | loss 3.3660", "outside 1..N"),
]


@pytest.mark.parametrize("line, problem", PARSE, ids=[line for line, _ in PARSE])
def test_implausible_step_lines_are_not_believed(line, problem):
    parsed = external.ParsedOutput()
    parsed.feed(line)
    assert not parsed.steps and problem in parsed.problems[0]


@pytest.mark.parametrize("line", ["step 1 / 1234567890123 | loss 3.3660",
                                  "step 1 / 20 | loss 3.3660abc", "step 1 / 20 | loss 3.36.60"])
def test_malformed_step_lines_are_ignored(line):
    parsed = external.ParsedOutput()
    parsed.feed(line)
    assert not parsed.steps


@pytest.mark.parametrize("line, loss", [("step    1 / 1000 | loss 3.3660", 3.3660),
                                        ("step 1/20 | loss: 3.366012", 3.366012),
                                        ("step 1 / 20 | loss 3.3660e+00", 3.366),
                                        ("step 3 / 20 | loss nan", None)])
def test_plausible_step_lines_are_read(line, loss):
    parsed = external.ParsedOutput()
    entry = parsed.feed(line)
    assert not parsed.problems and entry.loss == pytest.approx(loss, nan_ok=True) \
        if loss is not None else entry.loss != entry.loss


def test_samples_are_bounded():
    parsed = external.ParsedOutput()
    for index in range(5000):
        parsed.feed(f"sample {index}: " + "n" * 1000)
    assert len(parsed.samples) == external.MAX_SAMPLES
    assert max(map(len, parsed.samples.values())) == external.MAX_SAMPLE_CHARS


@pytest.fixture(scope="module")
def hostile_externals(tmp_path_factory, dataset):
    """Item 10 and 11 end to end: externals that print implausible lines or floods."""
    directory = tmp_path_factory.mktemp("hostile-externals")
    reference = "3.3660"
    programs = {
        "zero": f"for k in range(1, {STEPS + 1}): print(f'step {{k}} / {STEPS} | loss 0e1')",
        "hugen": "print('step 1 / 100000000000 | loss 3.3660')",
        "coarse": f"for k in range(1, {STEPS + 1}): print(f'step {{k}} / {STEPS} | loss 3')",
        "early": f"print('step 1 / {STEPS} | loss {reference}')",
        "flood": ("import sys\n"
                  "for _ in range(3): sys.stdout.write('y' * 5_000_000 + '\\n')\n"
                  "for k in range(20000): print(f'sample {k}: ' + 'z' * 500)\n"
                  "print('step 1 / 1 | loss 3.3660')\n"),
    }
    options = []
    for name, source in programs.items():
        (directory / f"{name}.py").write_text(source + "\n")
        options += ["--external", f"{name}={sys.executable} {directory / name}.py"]
    path = directory / "r.json"
    completed = bench(*FAST, "--timeout", "60", "--json", str(path), *options)
    return completed, path, {run["backend"]: run for run in results.load(path)["runs"]}


@pytest.mark.parametrize("name, status, message", [
    ("zero", "error", "a loss must be a positive number"),
    ("hugen", "error", "not a plausible number of steps"),
    ("coarse", "error", "too few digits"),
    ("early", "incomplete", "exited 0 after printing step 1 of 20: the run did not finish"),
    # its 20,000 'zzz...' samples are read (bounded) and checked against the reference's
    ("flood", "samples differ", "printed samples differ"),
])
def test_hostile_externals(hostile_externals, name, status, message):
    completed, path, runs = hostile_externals
    assert "Traceback" not in completed.stderr and completed.returncode == ExitCode.FAILED
    run = runs[name]
    assert run["status"] == status and message in run.get("error", ""), run.get("error")
    if status != "ok":
        assert "ms_per_step_median" not in run["train"]  # never timed


def test_external_output_is_stored_bounded(hostile_externals):
    _, path, runs = hostile_externals
    assert path.stat().st_size < 1_000_000
    assert len(runs["flood"]["infer"]["samples"]) == external.MAX_SAMPLES


# ==== 5. integrity: the test hook =============================================================
def test_hook_cannot_replace_a_backend(capsys, monkeypatch):
    monkeypatch.setenv(EXTRA_BACKENDS_ENV_VAR, "numpy=tests.fault_backends:SlowBackend")
    assert cli.main(FAST) == ExitCode.USAGE
    assert cli.main(["--list"]) == ExitCode.USAGE
    assert "'numpy' is a registered backend" in capsys.readouterr().err


def test_list_imports_nothing_from_the_hook(tmp_path):
    (tmp_path / "booby.py").write_text(
        f"open({str(tmp_path / 'imported')!r}, 'w').close()\nclass B: pass\n")
    completed = bench("--list", env={EXTRA_BACKENDS_ENV_VAR: "booby=booby:B",
                                     "PYTHONPATH": str(tmp_path)})
    assert completed.returncode == ExitCode.OK, completed.stderr
    assert not (tmp_path / "imported").exists()


def test_runs_of_hook_backends_are_recorded_as_such(tmp_path):
    path = tmp_path / "r.json"
    completed = bench(*FAST, "--backend", "slow", "--json", str(path),
                      env={EXTRA_BACKENDS_ENV_VAR: registry_value("slow"),
                           STEP_SLEEP_ENV_VAR: "0"})
    assert completed.returncode == ExitCode.OK, completed.stderr
    document = results.load(path)
    runs = {run["backend"]: run for run in document["runs"]}
    assert runs["slow"]["test_hook"] is True
    assert runs["slow"]["test_hook_target"] == "tests.fault_backends:SlowBackend"
    assert "test_hook" not in runs["numpy"]
    assert document["test_hook"]["backends"] == {"slow": "tests.fault_backends:SlowBackend"}
    assert "**Test hook**" in path.with_suffix(".md").read_text()


# ==== 6. result files: one validated loader for compare and report ============================
def _set(path: str, value):
    def change(document):
        *parents, last = path.split(".")
        target = document
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        if value is _DELETE:
            del target[int(last) if last.isdigit() else last]
        else:
            target[int(last) if last.isdigit() else last] = value
    return change


_DELETE = object()
MALFORMED = {
    "median-string": (_set("runs.0.train.ms_per_step_median", "abc"), "finite number >= 0"),
    "median-nan": (_set("runs.0.train.ms_per_step_median", float("nan")), "finite number"),
    "median-inf": (_set("runs.0.train.ms_per_step_median", float("inf")), "finite number"),
    "median-negative": (_set("runs.0.train.ms_per_step_median", -1.0), "finite number >= 0"),
    "median-bool": (_set("runs.0.train.ms_per_step_median", True), "finite number >= 0"),
    "q1-list": (_set("runs.0.train.ms_per_step_q1", [1]), "finite number >= 0"),
    "min-object": (_set("runs.0.train.ms_per_step_min", {}), "finite number >= 0"),
    "total-string": (_set("runs.0.train.total_s", "1"), "finite number >= 0"),
    "step-seconds-string": (_set("runs.0.train.step_seconds", "x"), "a list"),
    "step-seconds-item": (_set("runs.0.train.step_seconds.3", "x"), "finite number >= 0"),
    "step-seconds-negative": (_set("runs.0.train.step_seconds.3", -0.1), "finite number"),
    "losses-string": (_set("runs.0.train.losses", "x"), "a list"),
    "losses-item": (_set("runs.0.train.losses.0", None), "a number"),
    "train-list": (_set("runs.0.train", []), "an object"),
    "tokens-per-s": (_set("runs.0.infer.tokens_per_s", "fast"), "finite number >= 0"),
    "samples-numbers": (_set("runs.0.infer.samples", [1]), "a string"),
    "runs-numbers": (_set("runs", [1]), "an object"),
    "runs-empty-objects": (_set("runs", [{}]), "runs[0].backend"),
    "runs-object": (_set("runs", {}), "has no list of runs"),
    "backend-number": (_set("runs.0.backend", 5), "a non-empty string"),
    "backend-empty": (_set("runs.0.backend", ""), "a non-empty string"),
    "status-unknown": (_set("runs.0.status", "fine"), "runs[0].status"),
    "status-missing": (_set("runs.0.status", _DELETE), "runs[0].status"),
    "dtype-number": (_set("runs.0.dtype", 32), "a string"),
    "device-list": (_set("runs.0.device", ["cpu"]), "a string"),
    "config-string": (_set("runs.0.config", "tiny"), "an object"),
    "config-unhashable": (_set("runs.0.config.n_layer", [1]), "a number or a string"),
    "steps-bool": (_set("runs.0.steps", True), "an integer >= 0"),
    "steps-negative": (_set("runs.0.steps", -3), "an integer >= 0"),
    "repeat-float": (_set("runs.0.repeat", 0.5), "an integer >= 0"),
    "environment-string": (_set("environment", "x"), "environment: expected an object"),
    "environment-missing": (_set("environment", _DELETE), "environment: expected an object"),
    "fingerprint-number": (_set("environment.machine_fingerprint", 7), "a string"),
    "cpu-string": (_set("environment.cpu", "fast"), "an object"),
    "threads-list": (_set("environment.thread_settings", [1]), "an object"),
    "schema-true": (_set("schema_version", True), "schema_version True is not supported"),
    "schema-string": (_set("schema_version", "1"), "schema_version '1' is not supported"),
    "schema-float": (_set("schema_version", 1.0), "schema_version 1.0 is not supported"),
    "suite-missing": (_set("suite", _DELETE), "not a microgpt-bench result file"),
    "command-number": (_set("command", 5), "a list"),
    "versions-number": (_set("runs.0.framework_versions", {"numpy": 2}), "a string"),
    "parity-passed-string": (_set("runs.0.parity.passed", "yes"), "true or false"),
}


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.json"
    path.write_text(json.dumps(synthetic_document(
        (("numpy", "float32", 0.3),), repeats=3, seed=1)))
    return path


def _check_refused(tool, args, capsys, message):
    code = tool.main(args)
    error = capsys.readouterr().err
    assert code == ExitCode.USAGE, error
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1, error
    assert error.startswith("error: ") and message in error, error


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_result_files_exit_2(name, good, tmp_path, capsys):
    """Item 12 and rough: valid JSON with wrong types; compare never exits 1 for it."""
    change, message = MALFORMED[name]
    document = synthetic_document((("numpy", "float32", 0.3),), repeats=3, seed=2, scale=3.0)
    change(document)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(document, allow_nan=True))
    _check_refused(compare, [str(good), str(bad)], capsys, message)
    _check_refused(compare, [str(bad), str(good)], capsys, message)
    _check_refused(report, [str(bad), "--out", str(tmp_path / "out"), "--no-charts"], capsys,
                   message)
    assert not (tmp_path / "out" / "report.md").exists()


UNREADABLE = {
    "empty": (b"", "not valid JSON"),
    "list": (b"[]", "not a microgpt-bench result file"),
    "string": (b'"hello"', "not a microgpt-bench result file"),
    "null": (b"null", "not a microgpt-bench result file"),
    "not-utf8": (b'{"suite": "\xff"}', "not valid JSON"),
    "nested": (b"[" * 100_000 + b"]" * 100_000, "microgpt-bench result file"),
    "huge-int": (b'{"suite": "microgpt-bench", "schema_version": ' + b"9" * 5000 + b"}",
                 "not valid JSON"),
    "cut": (b'{"suite": "microgpt-bench", "runs": [', "perhaps cut short"),
}


@pytest.mark.parametrize("name", sorted(UNREADABLE))
def test_unreadable_result_files_exit_2(name, good, tmp_path, capsys):
    content, message = UNREADABLE[name]
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    _check_refused(compare, [str(good), str(bad)], capsys, message)
    _check_refused(report, [str(bad), "--out", str(tmp_path / "out")], capsys, message)


@pytest.mark.parametrize("kind", ["directory", "fifo", "missing"])
def test_result_paths_that_are_not_files(kind, good, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    if kind == "directory":
        bad.mkdir()
    elif kind == "fifo":
        os.mkfifo(bad)
    message = {"directory": "is a directory", "fifo": "not a regular file",
               "missing": "no such file"}[kind]
    _check_refused(compare, [str(good), str(bad)], capsys, message)


# ==== 7. compare, report, abtest: outputs and verdicts ========================================
def test_compare_json_never_replaces_an_input(tmp_path, capsys):
    """Item 3."""
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(synthetic_document(repeats=3, seed=1)))
    b.write_text(json.dumps(synthetic_document(repeats=3, seed=2)))
    before = b.read_text()
    for extra in ([], ["--overwrite"]):
        _check_refused(compare, [str(a), str(b), "--json", str(b), *extra], capsys,
                       "is also an input of this command")
    link = tmp_path / "link.json"
    link.symlink_to(a)
    _check_refused(compare, [str(a), str(b), "--json", str(link), "--overwrite"], capsys,
                   "is also an input")
    assert b.read_text() == before
    other = tmp_path / "other.json"
    other.write_text("mine")
    _check_refused(compare, [str(a), str(b), "--json", str(other)], capsys, "exists")
    assert compare.main([str(a), str(b), "--json", str(other), "--overwrite"]) == ExitCode.OK
    assert json.loads(other.read_text())["rows"]
    _check_refused(compare, [str(a), str(b), "--json", str(tmp_path)], capsys,
                   "is a directory")
    _check_refused(compare, [str(a), str(b), "--json", "/proc/nope/c.json"], capsys,
                   "cannot write")


@pytest.mark.parametrize("scale", [1.0, 1.5, 3.0, 0.5])
@pytest.mark.parametrize("repeats", [1, 2])
def test_compare_never_calls_significance_from_few_runs(tmp_path, capsys, scale, repeats):
    """Item 15: per-step times are not independent samples."""
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(synthetic_document(repeats=repeats, seed=1, steps=500)))
    b.write_text(json.dumps(synthetic_document(repeats=repeats, seed=2, steps=500,
                                               scale=scale)))
    assert compare.main([str(a), str(b)]) == ExitCode.OK
    output = capsys.readouterr().out
    assert "too few runs for significance" in output and "REGRESSION" not in output


def test_report_counts_a_file_once(tmp_path, capsys):
    """Item 16: the same file twice, through a link, or a copy, adds no runs."""
    a = tmp_path / "a.json"
    a.write_text(json.dumps(synthetic_document(repeats=3, seed=1)))
    (tmp_path / "link.json").symlink_to(a)
    (tmp_path / "copy.json").write_bytes(a.read_bytes())
    out = tmp_path / "out"
    assert report.main([str(a), str(a), str(tmp_path / "link.json"), str(tmp_path / "copy.json"),
                        "--out", str(out), "--no-charts"]) == ExitCode.OK
    assert capsys.readouterr().err.count("counted once") == 3
    rows = (out / "summary.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].split(",")[rows[0].split(",").index("n")] == "3"


def test_report_without_out_makes_a_new_folder(tmp_path, monkeypatch, capsys):
    """Item 4: the committed results/report is never written by default."""
    monkeypatch.setattr(report, "RESULTS_DIR", tmp_path / "results")
    committed = tmp_path / "results" / "report"
    committed.mkdir(parents=True)
    (committed / "report.md").write_text("committed")
    a = tmp_path / "a.json"
    a.write_text(json.dumps(synthetic_document(repeats=2)))
    assert report.main([str(a), "--no-charts"]) == ExitCode.OK
    assert report.main([str(a), "--no-charts"]) == ExitCode.OK
    made = sorted(path.name for path in (tmp_path / "results").iterdir())
    assert len(made) == 3 and made[0] == "report"
    assert (committed / "report.md").read_text() == "committed"


def test_report_never_replaces_what_it_did_not_write(tmp_path, capsys):
    a = tmp_path / "a.json"
    a.write_text(json.dumps(synthetic_document(repeats=2)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("someone's notes")
    (out / "loss_curves-old.png").write_bytes(b"old chart")
    (out / "notes.txt").write_text("unrelated")
    _check_refused(report, [str(a), "--out", str(out), "--no-charts"], capsys,
                   "was not written by bench.py report")
    assert (out / "report.md").read_text() == "someone's notes"
    assert report.main([str(a), "--out", str(out), "--no-charts", "--overwrite"]) == 0
    assert not (out / "loss_curves-old.png").exists()  # no stale chart left beside it
    assert (out / "notes.txt").read_text() == "unrelated"
    # Its own folder: written again without --overwrite; charts it no longer draws go.
    (out / "training_time.png").write_bytes(b"chart of an earlier report")
    manifest = json.loads((out / report.MANIFEST).read_text())
    (out / report.MANIFEST).write_text(json.dumps(manifest + ["training_time.png"]))
    assert report.main([str(a), "--out", str(out), "--no-charts"]) == ExitCode.OK
    assert not (out / "training_time.png").exists()
    assert sorted(os.listdir(out)) == [report.MANIFEST, "notes.txt", "report.md", "summary.csv"]


@pytest.mark.parametrize("out", ["file", "input"])
def test_report_out_that_is_not_a_folder(tmp_path, capsys, out):
    a = tmp_path / "report.md"  # an input named like an output, in the output folder
    a.write_text(json.dumps(synthetic_document(repeats=2)))
    if out == "file":
        _check_refused(report, [str(a), "--out", str(a)], capsys, "is not a folder")
    else:
        _check_refused(report, [str(a), "--out", str(tmp_path), "--overwrite", "--no-charts"],
                       capsys, "is one of the input files")
        assert json.loads(a.read_text())["suite"] == "microgpt-bench"


@pytest.fixture
def git_repo(tmp_path):
    import shutil
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e"}
    for args in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "one"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, env=env,
                       capture_output=True)
    return repo


@pytest.mark.parametrize("args, message", [
    (["--base", "no-such-commit-7f3a"], "--base no-such-commit-7f3a: no such commit"),
    (["--base", "HEAD~5"], "no such commit"),
    (["--rounds", "2"], "--rounds must be >= 3"),
    (["--steps", "100000000"], "--steps must be at most 1,000,000"),
    (["--alpha", "nan"], "--alpha between 0 and 1"),
])
def test_abtest_refuses_what_a_gate_must_not_pass(git_repo, capsys, args, message):
    """Item 17: a typo in --base is exit 2, not a skip."""
    from bench import abtest
    _check_refused(abtest, ["--repo", str(git_repo), *args], capsys, message)


def test_abtest_without_a_parent_still_skips(git_repo, capsys):
    from bench import abtest
    assert abtest.main(["--repo", str(git_repo)]) == ExitCode.OK
    assert "A/B skipped" in capsys.readouterr().out


# ==== 8. the run itself: datasets, reference, summary =========================================
@pytest.mark.parametrize("via", ["option", "environment"])
def test_relative_dataset_from_another_folder(names_copy, via):
    """Item 14: the workers get the file the runner checked."""
    args = ["--dataset", "names.txt"] if via == "option" else []
    env = {"MICROGPT_BENCH_DATASET": "names.txt"} if via == "environment" else {}
    path = names_copy.parent / f"r-{via}.json"
    completed = bench(*FAST, *args, "--json", str(path), cwd=names_copy.parent, env=env)
    assert completed.returncode == ExitCode.OK, completed.stderr
    assert results.load(path)["runs"][0]["status"] == "ok"


def test_dataset_download_into_a_read_only_cache(names_copy, tmp_path):
    from data import dataset
    cache = Path("/proc/read-only-cache/names.txt")
    loaded = dataset.load_dataset(cache_path=cache, url=names_copy.as_uri())
    assert loaded.standard and loaded.docs


def test_reference_cache_that_cannot_be_written(monkeypatch, tmp_path):
    from bench import parity, reference
    monkeypatch.setattr(parity, "REFERENCE_CACHE_DIR", Path("/proc/read-only/reference"))
    assert Path(reference._cache_dir()) != parity.REFERENCE_CACHE_DIR


def test_reference_run_is_bounded_by_the_timeout(tmp_path, dataset, monkeypatch):
    """Item 8: a reference that is not cached runs in a supervised process."""
    from backends.contract import build_spec, preset
    from bench import reference
    monkeypatch.setattr(reference, "_cached", lambda *args: None)
    spec = build_spec(dataset.docs, preset("tiny", num_steps=100_000))
    started = time.monotonic()
    with pytest.raises(reference.ReferenceFailed, match="no result within the timeout of 1 s"):
        reference.bounded_reference(spec, 100_000, dataset, timeout_s=1)
    assert time.monotonic() - started < 15


def _summary_document():
    document = synthetic_document((("torch-compile-tuned", "float32", 0.1025),
                                   ("numpy", "float64", 0.2303), ("python", "float64", 12.7979)),
                                  repeats=3)
    document["runs"].append({**document["runs"][0], "backend": "mojo-tape-external-port",
                             "status": "parity-failed", "error": "DOES NOT MATCH"})
    for run in document["runs"]:
        if run["backend"] == "numpy":
            run["infer"]["tokens_per_s"] = None  # --samples 0
    return document


@pytest.mark.parametrize("width", [40, 60, 80, 120])
def test_summary_stays_readable_at_any_width(width):
    """Rough: values are never cut to '0.…'; in 80 columns it is a table."""
    from rich.console import Console
    from bench.stats import summarize_runs
    buffer = io.StringIO()
    document = _summary_document()
    cli.print_summary(document, Console(file=buffer, width=width))
    text = buffer.getvalue()
    assert "…" not in text and "0.…" not in text
    rows = summarize_runs(document["runs"])
    values = [f"{row['ms_per_step_median']:.4f}" for row in rows if row.get("n")]
    for value in ("torch-compile-tuned", "parity-failed", "mojo-tape-external-port", *values):
        assert value in text, value
    if width >= 80:  # a table, no line wider than the terminal
        assert all(len(line) <= width for line in text.splitlines()[:len(rows) + 4])
        assert any(line.split()[:1] == ["torch-compile-tuned"] for line in text.splitlines())


def test_no_samples_show_a_dash_not_zero(tmp_path):
    path = tmp_path / "r.json"
    completed = bench(*FAST[:-3], "--samples", "0", "--json", str(path), env={"COLUMNS": "80"})
    assert completed.returncode == ExitCode.OK, completed.stderr
    run = results.load(path)["runs"][0]
    assert run["infer"]["tokens_per_s"] is None
    assert "0 tok/s" not in completed.stdout and "| - | 1 |" in path.with_suffix(".md").read_text()
