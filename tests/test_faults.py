"""The runner survives faults: nothing already measured is lost and every failure says what
happened.

Broken backends (tests/fault_backends.py: numpy with one fault injected at step 5) run through
the real CLI, runner and worker, registered by the worker's test hook
MICROGPT_BENCH_EXTRA_BACKENDS. One invocation runs numpy beside all of them; the others send
SIGINT to bench.py or SIGKILL to a worker while a slow backend trains.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import results
from backends.contract import preset
from bench.parity import reference_losses
from bench.runner import ProcessOutcome, describe_exit, failure_of, stderr_reason
from backends.contract import build_spec
from backends import EXTRA_BACKENDS_ENV_VAR, register_extra_backends
from tests.fault_backends import (FAULT_PIDFILE_ENV_VAR, FAULT_STEP_ENV_VAR, STEP_SLEEP_ENV_VAR,
                                  registry_value)

REPO = Path(__file__).resolve().parents[1]
STEPS = 20
FAULT_STEP = 5  # 0-based: steps 1..5 finish, the sixth faults
TIMEOUT_S = 6
MEMORY_LIMIT_MB = 1500
FAULTS = ("segfault", "abort", "raising", "hanging", "nan", "diverging", "drifting", "noisy",
          "memory-hog")


def bench_command(*args) -> list[str]:
    return [sys.executable, "bench.py", "--steps", str(STEPS), "--warmup", "0", "--samples", "2",
            "--quiet", *args]


def fault_env(*names, **extra) -> dict:
    return {**os.environ, EXTRA_BACKENDS_ENV_VAR: registry_value(*names),
            FAULT_STEP_ENV_VAR: str(FAULT_STEP), **extra}


@pytest.fixture(scope="module")
def reference(dataset):
    spec = build_spec(dataset.docs, preset("tiny", num_steps=STEPS))
    return reference_losses(spec, STEPS, dataset.sha256)


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "run.json"
    backends = [arg for name in ("numpy", *FAULTS) for arg in ("--backend", name)]
    completed = subprocess.run(
        bench_command(*backends, "--dtype", "float64", "--timeout", str(TIMEOUT_S),
                      "--memory-limit", str(MEMORY_LIMIT_MB), "--json", str(path)),
        cwd=REPO, env=fault_env(*FAULTS), capture_output=True, text=True, timeout=180)
    document = results.load(path)
    return completed, document, {run["backend"]: run for run in document["runs"]}


def test_others_complete_and_every_fault_recorded(fault_run):
    completed, document, runs = fault_run
    assert completed.returncode == 1, completed.stderr
    assert "Traceback" not in completed.stderr
    assert document["complete"] and set(runs) == {"numpy", *FAULTS}
    for name in ("numpy", "noisy"):  # noisy prints a fake event line: ignored, not fatal
        assert runs[name]["status"] == "ok"
        assert len(runs[name]["train"]["losses"]) == STEPS
        assert len(runs[name]["infer"]["samples"]) == 2


# (status, the error's text, steps whose losses must have been kept)
EXPECTED = {
    "segfault": ("crashed", "worker during train after 5 steps: killed by SIGSEGV (segmentation "
                            "fault): Fatal Python error: Segmentation fault", 5),
    "abort": ("crashed", "worker during train after 5 steps: killed by SIGABRT (aborted): Fatal "
                         "Python error: Aborted", 5),
    "raising": ("error", "RuntimeError: injected failure in train_step (during train after 5 "
                         "steps)", 5),
    "hanging": ("timeout", f"worker during train after 5 steps: no result within the timeout of "
                           f"{TIMEOUT_S} s; killed", 5),
    "nan": ("diverged", "loss is nan at step 6", 6),
    "memory-hog": ("out-of-memory", f"out of memory under the --memory-limit of "
                                    f"{MEMORY_LIMIT_MB} MB; MemoryError: Unable to allocate 16.0 "
                                    f"GiB", 5),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fault_reason_and_partial_losses(fault_run, reference, name):
    completed, document, runs = fault_run
    status, message, kept = EXPECTED[name]
    run = runs[name]
    assert run["status"] == status
    assert run["error"].startswith(message), run["error"]
    losses = run["train"]["losses"]
    assert len(losses) == kept
    # The steps finished before the fault are the real ones (float64: equal to the reference).
    assert max(abs(a - b) for a, b in zip(losses[:FAULT_STEP], reference)) < 1e-9
    # Reported in the table's notes, the Markdown file, and the per-run line.
    line = f"{name} (float64): {status}: {run['error']}"
    assert line in completed.stdout
    assert f"- {line}" in results.markdown_report(document)


def test_real_divergence_stops_early(fault_run):
    run = fault_run[2]["diverging"]
    assert run["status"] == "diverged"
    # numpy's log-softmax loss stays finite: 3e5, far past the guard
    assert run["error"].startswith("loss ") and run["error"].endswith(" at step 2")
    assert float(run["error"].split()[1]) > 1e4
    assert len(run["train"]["losses"]) == 2 < STEPS


def test_wrong_maths_fails_parity_with_its_losses(fault_run, reference):
    run = fault_run[2]["drifting"]
    assert run["status"] == "parity-failed"
    assert run["error"].startswith("DOES NOT MATCH the float64 reference over 20 steps")
    losses = run["train"]["losses"]
    assert len(losses) == STEPS and abs(losses[0] - reference[0]) < 1e-9
    assert not run["parity"]["passed"] and run["parity"]["worst_step"] > 1


def test_crash_reasons_keep_stderr(fault_run):
    run = fault_run[2]["segfault"]
    assert any("Fatal Python error: Segmentation fault" in line for line in run["stderr_tail"])
    assert run["returncode"] == -signal.SIGSEGV


# ---- interrupting and killing ----------------------------------------------------------------
def wait_for_pid(pidfile: Path, process: subprocess.Popen, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while not pidfile.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the slow backend never started training"
        time.sleep(0.02)
    return int(pidfile.read_text())


def start_with_slow_backend(tmp_path, *args) -> tuple[subprocess.Popen, Path, Path]:
    pidfile, path = tmp_path / "worker.pid", tmp_path / "run.json"
    process = subprocess.Popen(
        bench_command("--backend", "numpy", "--backend", "slow", "--backend", "python",
                      *args, "--json", str(path)),
        cwd=REPO, env=fault_env("slow", **{FAULT_PIDFILE_ENV_VAR: str(pidfile),
                                           STEP_SLEEP_ENV_VAR: "0.05"}),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # Python turns SIGINT into KeyboardInterrupt only where it is not ignored (a background
        # job of a non-interactive shell ignores it).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return process, pidfile, path


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ctrl_c_keeps_finished_runs_in_valid_json(tmp_path):
    process, pidfile, path = start_with_slow_backend(tmp_path)
    worker = wait_for_pid(pidfile, process)
    time.sleep(0.3)  # a few steps into training
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and f"Finished runs are in {path}" in stderr
    document = results.load(path)  # valid JSON of the current schema
    assert not document["complete"]
    runs = {run["backend"]: run for run in document["runs"]}
    assert set(runs) == {"numpy", "slow"}  # python never started
    assert runs["numpy"]["status"] == "ok" and len(runs["numpy"]["train"]["losses"]) == STEPS
    slow = runs["slow"]
    assert slow["status"] == "interrupted"
    assert slow["error"].startswith("interrupted by the user (Ctrl-C), worker during train after")
    assert 0 < len(slow["train"]["losses"]) < STEPS and slow["parity"]["passed"]
    assert "**Incomplete**" in path.with_suffix(".md").read_text()
    time.sleep(0.2)
    assert not alive(worker)  # the worker was stopped, not orphaned


def test_killed_worker_leaves_a_complete_file_for_the_others(tmp_path):
    process, pidfile, path = start_with_slow_backend(tmp_path)
    worker = wait_for_pid(pidfile, process)
    time.sleep(0.3)
    os.kill(worker, signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr
    document = results.load(path)
    assert document["complete"]
    runs = {run["backend"]: run for run in document["runs"]}
    assert runs["numpy"]["status"] == runs["python"]["status"] == "ok"
    assert len(runs["python"]["train"]["losses"]) == STEPS
    slow = runs["slow"]
    assert slow["status"] == "crashed"
    assert "killed by SIGKILL (not by the runner" in slow["error"]
    assert 0 < len(slow["train"]["losses"]) < STEPS


@pytest.mark.slow
def test_killed_worker_during_all(tmp_path):
    """`--all` (every backend available here, ~35 s on 2 cores) with the slow backend killed."""
    pidfile, path = tmp_path / "worker.pid", tmp_path / "run.json"
    process = subprocess.Popen(
        bench_command("--all", "--json", str(path)), cwd=REPO,
        env=fault_env("slow", **{FAULT_PIDFILE_ENV_VAR: str(pidfile)}),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    worker = wait_for_pid(pidfile, process, timeout=600)
    time.sleep(0.3)
    os.kill(worker, signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 1, stderr
    document = results.load(path)
    assert document["complete"]
    runs = {run["backend"]: run for run in document["runs"]}
    assert runs["slow"]["status"] == "crashed"
    assert len(runs) >= 3 and runs["numpy"]["status"] == runs["python"]["status"] == "ok"
    for run in runs.values():  # every other backend has its whole record
        if run["backend"] != "slow" and run["status"] == "ok":
            assert len(run["train"]["losses"]) == STEPS and run["infer"]["samples"]


# ---- classifying a process's end, without processes ------------------------------------------
def outcome(returncode, *stderr, timed_out=False):
    return ProcessOutcome(returncode=returncode, timed_out=timed_out, stderr_tail=list(stderr))


def test_cpp_bad_alloc_abort_is_out_of_memory():
    status, message = failure_of(outcome(-signal.SIGABRT, "terminate called after throwing an "
                                         "instance of 'std::bad_alloc'", "  what():  "
                                         "std::bad_alloc"), 10, 512, "worker during compile")
    assert status == "out-of-memory"
    assert message == ("out of memory under the --memory-limit of 512 MB; worker during compile: "
                       "killed by SIGABRT (aborted): terminate called after throwing an instance "
                       "of 'std::bad_alloc'")


def test_library_that_cannot_be_mapped_is_out_of_memory():
    status, message = failure_of(outcome(1, "OSError: libfoo.so: failed to map segment from "
                                         "shared object"), 10, None, "worker during setup")
    assert status == "out-of-memory" and "(no --memory-limit set)" in message


def test_stderr_reason_skips_stack_listings():
    lines = ["Fatal Python error: Segmentation fault", "", "Current thread 0x1 (most recent call "
             "first):", '  File "x.py", line 3 in f', "", "Extension modules: numpy (total: 1)"]
    assert stderr_reason(lines) == "Fatal Python error: Segmentation fault"
    assert stderr_reason(["Traceback (most recent call last):", '  File "a.py", line 1',
                          "ValueError: bad"]) == "ValueError: bad"
    assert describe_exit(-signal.SIGKILL).startswith("killed by SIGKILL (not by the runner")
    assert describe_exit(3) == "exited with code 3"
    assert failure_of(outcome(-9, timed_out=True), 2.5, None, "w")[1] == (
        "w: no result within the timeout of 2.5 s; killed")


def test_extra_backends_hook():
    from backends import REGISTRY
    names = register_extra_backends({EXTRA_BACKENDS_ENV_VAR: registry_value("slow")})
    try:
        assert names == ["slow"] and not REGISTRY["slow"].in_default_run
    finally:
        REGISTRY.pop("slow")
    with pytest.raises(ValueError, match="is not name=module:Class"):
        register_extra_backends({EXTRA_BACKENDS_ENV_VAR: "broken"})
    assert register_extra_backends({}) == []

