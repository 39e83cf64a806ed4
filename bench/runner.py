"""Runs one backend in its own process (bench.worker), watches it, and turns whatever happened
(a result, a crash, a hang, running out of memory, an interrupt) into one run record with its
parity verdict. `supervise` is the process watcher; bench.external uses it for programs outside
the suite.

Nothing a worker has already measured is lost: it logs every step's loss into a shared-memory
file the runner reads when it ends (bench.worker.LossLog), so a run that crashes, is killed or
times out half-way keeps the steps it finished, marked with the reason. Progress events arrive
on its stdout meanwhile. The reason is one line: how the process ended (signal or exit code),
the phase it was in, and the telling line of its stderr (a Python exception, "Fatal Python
error: Segmentation fault", a C++ "terminate called ...").
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from backends.contract import GPTConfig
from bench.files import REPO_ROOT
from bench.parity import compare_losses
from bench.record import LOSSES, STEPS_COMPLETED, TRAIN, Status, losses_of
from bench.worker import EVENT_PREFIX, read_loss_log

TAIL_LINES = 40

# What a process that ran out of memory leaves on stderr: Python's MemoryError and numpy's
# "Unable to allocate", C++'s std::bad_alloc, glibc/OS "Cannot allocate memory" (ENOMEM), the
# dynamic loader's "failed to map segment" (a library that no longer fits under an
# address-space limit) and the frameworks' own "out of memory" messages.
_OUT_OF_MEMORY = re.compile(r"MemoryError|Unable to allocate|bad_alloc|Cannot allocate memory|"
                            r"failed to map segment|out of memory|OutOfMemory|\bOOM\b",
                            re.IGNORECASE)

_SIGNAL_MEANINGS = {
    "SIGSEGV": "segmentation fault", "SIGBUS": "bus error", "SIGABRT": "aborted",
    "SIGFPE": "floating-point exception", "SIGILL": "illegal instruction",
    "SIGKILL": "not by the runner: another process or the system's out-of-memory killer",
    "SIGTERM": "terminated",
}


@dataclass
class RunRequest:
    backend: str
    dtype: str
    config: GPTConfig
    steps: int
    device: str | None = None
    warmup_steps: int = 10
    num_samples: int | None = None
    dataset_path: str | None = None
    custom_dataset: bool = False
    timeout_s: float = 1800.0
    memory_limit_mb: int | None = None  # address-space limit of the worker (None: no limit)
    extra_env: dict = field(default_factory=dict)

    def worker_request(self) -> dict:
        request = asdict(self)
        request["config"] = self.config.to_dict()
        for key in ("timeout_s", "memory_limit_mb", "extra_env"):
            request.pop(key)
        return request


class Interrupted(Exception):
    """Ctrl-C during a run; carries the partial record of the run that was stopped."""

    def __init__(self, record: dict):
        super().__init__("interrupted")
        self.record = record


# ---- watching a process ------------------------------------------------------------------
@dataclass
class ProcessOutcome:
    """How a supervised process ended. `returncode` is None when it could not be started
    (`launch_error` says why)."""
    returncode: int | None = None
    launch_error: str | None = None
    timed_out: bool = False
    interrupted: bool = False
    wall_s: float = 0.0
    stdout_tail: list[str] = field(default_factory=list)
    stderr_tail: list[str] = field(default_factory=list)


def _limit_memory(megabytes: int):
    def apply():
        import resource
        limit = megabytes * 2 ** 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


def supervise(argv: list[str], *, timeout_s: float, memory_limit_mb: int | None = None,
              env: dict | None = None, cwd=None, on_stdout_line=None) -> ProcessOutcome:
    """Run `argv` in its own process group, feed each stdout line to `on_stdout_line` (lines
    it returns True for are consumed, the others are kept in the tail), kill the group after
    `timeout_s` or on Ctrl-C, and never leave it running. Ctrl-C is reported as
    `interrupted`, not raised."""
    on_stdout_line = on_stdout_line or (lambda line: False)
    outcome = ProcessOutcome()
    stdout_tail: deque[str] = deque(maxlen=TAIL_LINES)
    stderr_tail: deque[str] = deque(maxlen=TAIL_LINES)
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, errors="replace",  # text: \r ends a line too
            start_new_session=True,  # its own process group: Ctrl-C reaches only the runner
            preexec_fn=_limit_memory(memory_limit_mb) if memory_limit_mb else None)
    except OSError as error:
        outcome.launch_error = f"cannot start {argv[0]!r}: {error.strerror or error}"
        return outcome
    timed_out = threading.Event()

    def kill_group():
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def on_timeout():
        timed_out.set()
        kill_group()

    def drain_stderr():
        for line in process.stderr:
            stderr_tail.append(line.rstrip())

    watchdog = threading.Timer(timeout_s, on_timeout)
    stderr_reader = threading.Thread(target=drain_stderr, daemon=True)
    try:
        watchdog.start()
        stderr_reader.start()
        for line in process.stdout:
            if not on_stdout_line(line):
                stdout_tail.append(line.rstrip())
        process.wait()
    except KeyboardInterrupt:
        outcome.interrupted = True
    finally:
        # Whatever happened here (Ctrl-C, a bug in a callback), neither the process nor
        # anything it left running in its group outlives this call.
        watchdog.cancel()
        kill_group()
        process.wait()
    stderr_reader.join(timeout=5)
    outcome.returncode = process.returncode
    outcome.timed_out = timed_out.is_set()
    outcome.wall_s = time.monotonic() - started
    outcome.stdout_tail, outcome.stderr_tail = list(stdout_tail), list(stderr_tail)
    return outcome


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            return f"killed by signal {-returncode}"
        meaning = _SIGNAL_MEANINGS.get(name)
        return f"killed by {name}" + (f" ({meaning})" if meaning else "")
    return f"exited with code {returncode}"


def stderr_reason(lines: list[str]) -> str:
    """The line of a stderr tail that says what went wrong: a fatal-error banner, else the
    last line that is not part of a stack listing."""
    for line in lines:
        if line.startswith(("Fatal Python error", "terminate called")):
            return line.strip()
    skip = ("Traceback", "Current thread", "Thread 0x", "Extension modules", "Stack (most",
            "  ", "\t", "File ")
    for line in reversed(lines):
        if line.strip() and not line.startswith(skip):
            return line.strip()[:300]
    return ""


def is_out_of_memory(*texts) -> bool:
    return any(_OUT_OF_MEMORY.search(text or "") for text in texts)


def failure_of(outcome: ProcessOutcome, timeout_s: float, memory_limit_mb: int | None,
               what: str) -> tuple[Status, str]:
    """(status, one-line reason) for a process that ended without a result. `what` names the
    process and where it was ("worker during train after 12 steps")."""
    if outcome.launch_error:
        return Status.ERROR, outcome.launch_error
    if outcome.timed_out:
        return Status.TIMEOUT, (f"{what}: no result within the timeout of {timeout_s:g} s; "
                                f"killed")
    reason = stderr_reason(outcome.stderr_tail)
    message = f"{what}: {describe_exit(outcome.returncode)}" + (f": {reason}" if reason else "")
    if is_out_of_memory(*outcome.stderr_tail):
        return Status.OUT_OF_MEMORY, out_of_memory_message(message, memory_limit_mb)
    return Status.CRASHED, message


def out_of_memory_message(message: str, memory_limit_mb: int | None) -> str:
    limit = (f"under the --memory-limit of {memory_limit_mb} MB" if memory_limit_mb
             else "(no --memory-limit set)")
    return f"out of memory {limit}; {message}"


# ---- one backend run ---------------------------------------------------------------------
def run_backend(request: RunRequest, reference: list[float] | None, on_event=None) -> dict:
    """Run one backend in a subprocess and return its run record (never raises for a backend
    failure; raises Interrupted on Ctrl-C after stopping the worker)."""
    on_event = on_event or (lambda event: None)
    losses_so_far: list[float] = []
    progress = {"phase": "start"}

    def on_line(line: str) -> bool:
        if not line.startswith(EVENT_PREFIX):
            return False
        try:
            event = json.loads(line[len(EVENT_PREFIX):])
        except ValueError:
            return False  # something that only looks like an event: keep it as output
        if event.get("event") == "losses":
            losses_so_far.extend(event["losses"])
        elif event.get("event") == "phase":
            progress["phase"] = event["phase"]
            if event.get("device"):
                progress["device"] = event["device"]
        on_event(event)
        return True

    with tempfile.TemporaryDirectory(prefix="microgpt-bench-") as workdir:
        request_path = os.path.join(workdir, "request.json")
        result_path = os.path.join(workdir, "result.json")
        loss_log_path = os.path.join(workdir, "losses.bin")
        open(loss_log_path, "wb").close()
        with open(request_path, "w") as handle:
            json.dump({**request.worker_request(), "loss_log": loss_log_path}, handle)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **request.extra_env}
        # Run from the checkout whatever the caller's working directory.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                          env.get("PYTHONPATH")]))
        outcome = supervise([sys.executable, "-m", "bench.worker", request_path, result_path],
                            timeout_s=request.timeout_s, memory_limit_mb=request.memory_limit_mb,
                            env=env, cwd=REPO_ROOT, on_stdout_line=on_line)
        # Every loss the worker logged, up to the moment it ended (events lag behind).
        logged = read_loss_log(loss_log_path)
        if len(logged) > len(losses_so_far):
            losses_so_far[:] = logged
        worker_record = None
        if not (outcome.interrupted or outcome.timed_out) and os.path.exists(result_path):
            try:
                with open(result_path) as handle:
                    worker_record = json.load(handle)
            except ValueError:
                pass  # written atomically, so this cannot happen; treated as no result

    where = f"worker during {progress['phase']}" + (
        f" after {len(losses_so_far)} steps" if losses_so_far else "")
    if outcome.interrupted:
        record = _partial_record(request, Status.INTERRUPTED,
                                 f"interrupted by the user (Ctrl-C), {where}", losses_so_far,
                                 outcome)
    elif worker_record is not None:
        record = worker_record
        if record.get("status") == Status.ERROR:
            record["stderr_tail"] = outcome.stderr_tail
            if is_out_of_memory(record.get("error")):
                record["status"] = Status.OUT_OF_MEMORY
                record["error"] = out_of_memory_message(record["error"],
                                                        request.memory_limit_mb)
        if len(losses_so_far) > len(losses_of(record)):
            record.setdefault(TRAIN, {}).update({LOSSES: losses_so_far,
                                                 STEPS_COMPLETED: len(losses_so_far)})
    else:
        status, message = failure_of(outcome, request.timeout_s, request.memory_limit_mb,
                                     where)
        record = _partial_record(request, status, message, losses_so_far, outcome)
    if record.get("device") is None:
        record["device"] = progress.get("device")
    record["wall_s"] = outcome.wall_s
    record = _with_parity(record, reference)
    if outcome.interrupted:
        raise Interrupted(record)
    return record


def _partial_record(request: RunRequest, status: Status, error: str, losses: list[float],
                    outcome: ProcessOutcome) -> dict:
    return {
        "backend": request.backend, "dtype": request.dtype, "device": request.device,
        "config": request.config.to_dict(), "steps": request.steps, "status": status,
        "error": error, TRAIN: {LOSSES: list(losses), STEPS_COMPLETED: len(losses)},
        "returncode": outcome.returncode,
        "stdout_tail": outcome.stdout_tail, "stderr_tail": outcome.stderr_tail,
    }


def _with_parity(record: dict, reference: list[float] | None) -> dict:
    """Attach the parity verdict; an otherwise-ok run whose losses do not match is demoted."""
    losses = losses_of(record)
    if reference is None or not losses:
        return record
    parity = compare_losses(losses, reference, record["dtype"])
    record["parity"] = parity.to_dict()
    if record["status"] == Status.OK and not parity.passed:
        record["status"] = Status.PARITY_FAILED
        record["error"] = parity.message
    return record
