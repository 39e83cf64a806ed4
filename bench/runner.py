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
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from backends.contract import GPTConfig
from bench.command import describe_interrupt
from bench.files import REPO_ROOT
from bench.parity import parity_verdict
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
    """Ctrl-C (or SIGTERM, SIGHUP) during a run; carries the partial record of the run that
    was stopped and the interrupt (bench.command.interrupt_exit_code gives its exit code)."""

    def __init__(self, record: dict, interrupt: BaseException | None = None):
        super().__init__("interrupted")
        self.record, self.interrupt = record, interrupt


# ---- watching a process ------------------------------------------------------------------
# A line of a supervised process longer than this is cut (the rest of it is read and dropped):
# memory stays bounded whatever a program prints. Lines kept in a tail are cut shorter still.
MAX_LINE_BYTES = 1 << 20
TAIL_LINE_CHARS = 1000


@dataclass
class ProcessOutcome:
    """How a supervised process ended. `returncode` is None when it could not be started
    (`launch_error` says why). `interrupt` is the KeyboardInterrupt (Ctrl-C) or
    bench.command.Terminated (SIGTERM, SIGHUP) that stopped it."""
    returncode: int | None = None
    launch_error: str | None = None
    timed_out: bool = False
    interrupted: bool = False
    interrupt: BaseException | None = None
    wall_s: float = 0.0
    stdout_tail: list[str] = field(default_factory=list)
    stderr_tail: list[str] = field(default_factory=list)


# Linux: the child asks the kernel for SIGKILL when the runner dies (even by kill -9). Resolved
# here, in the parent, so that the child only makes one call between fork and exec.
try:
    import ctypes
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError, ImportError):  # pragma: no cover - not Linux, or no libc
    _PRCTL = None
_PR_SET_PDEATHSIG = 1


def _child_setup(memory_limit_mb: int | None, parent_pid: int):
    """Runs in the child between fork and exec: the parent-death signal, and the memory
    limit."""
    limit = memory_limit_mb * 2 ** 20 if memory_limit_mb else None

    def apply():
        if _PRCTL is not None:
            _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent_pid:  # the runner died before the call: die with it
                os.kill(os.getpid(), signal.SIGKILL)
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


# The reaper: one small process per runner, in a session of its own, that reads the process
# groups the runner starts from a pipe only the runner holds. When the runner ends in any way
# (kill -9 included), the pipe reaches end-of-file and the reaper kills every group still
# registered: the workers, the --external programs and anything they started in their group.
_REAPER_SOURCE = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
groups = set()
for line in sys.stdin:
    sign, group = line[:1], line[1:].strip()
    if group.isdigit():
        (groups.add if sign == "+" else groups.discard)(int(group))
for group in groups:
    try:
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass
"""


class _Reaper:
    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.owner = None
        self.lock = threading.Lock()

    def _send(self, line: str) -> None:
        with self.lock:
            if self.process is None or self.owner != os.getpid() or self.process.poll() is not None:
                try:
                    self.process = subprocess.Popen(
                        [sys.executable, "-S", "-I", "-c", _REAPER_SOURCE],
                        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
                    self.owner = os.getpid()
                except OSError:
                    self.process = None
                    return  # the parent-death signal still covers the direct child
            try:
                self.process.stdin.write(line.encode())
                self.process.stdin.flush()
            except (OSError, ValueError):
                self.process = None

    def watch(self, group: int) -> None:
        self._send(f"+{group}\n")

    def forget(self, group: int) -> None:
        self._send(f"-{group}\n")


REAPER = _Reaper()


def _read_lines(stream, handle, limit: int = MAX_LINE_BYTES, on_read=None) -> None:
    """Call `handle(text)` for every line of a binary stream until end-of-file. Lines end at
    \n, \r or \r\n (programs that redraw a line print \r); a line longer than `limit` bytes
    is cut there and its rest dropped, so memory stays bounded. `on_read()` is called once per
    read, before the lines it completed are handled (bench.external times step lines by it).

    A line is handled in the read that brings its end, \r included, so its arrival time is
    that of the program's write; the \n of a \r\n split between two reads is skipped."""
    pending, dropping, after_carriage_return = b"", False, False
    while True:
        chunk = stream.read(65536)  # unbuffered: what is there, up to 64 KiB
        if not chunk:
            break
        if on_read is not None:
            on_read()
        if after_carriage_return and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        after_carriage_return = chunk.endswith(b"\r")
        pending += chunk
        parts = re.split(rb"\r\n|\r|\n", pending)
        pending = parts.pop()
        for part in parts:
            if not dropping:
                handle(part.decode("utf-8", "replace"))
            dropping = False
        if len(pending) > limit:
            if not dropping:
                handle(pending[:limit].decode("utf-8", "replace") + " [line cut]")
            pending, dropping = b"", True
    if pending.rstrip(b"\r") and not dropping:
        handle(pending.rstrip(b"\r").decode("utf-8", "replace"))


def _kept(line: str) -> str:
    line = line.rstrip()
    return line if len(line) <= TAIL_LINE_CHARS else line[:TAIL_LINE_CHARS] + " [cut]"


def supervise(argv: list[str], *, timeout_s: float, memory_limit_mb: int | None = None,
              env: dict | None = None, cwd=None, on_stdout_line=None, on_stdout_read=None,
              on_stderr_line=None) -> ProcessOutcome:
    """Run `argv` in a process group of its own and never leave anything of it running.

    Each stdout line goes to `on_stdout_line` (lines it returns True for are consumed, the
    others kept in the tail), and `on_stdout_read()` is called at each read of stdout, before
    its lines (their arrival time); each stderr line goes to `on_stderr_line` too. The tails
    keep the last TAIL_LINES lines, each cut to TAIL_LINE_CHARS. The process is waited for,
    not its output: when it exits, the whole group is killed at once (so a background child
    holding its stdout cannot hold the run up), then the output already written is read to its
    end. After `timeout_s`, on Ctrl-C or SIGTERM (reported as `interrupted`, not raised), or
    on any error here, the group is killed too. If the runner itself dies, even by kill -9,
    the child's parent-death signal (Linux) and the reaper process kill the group."""
    on_stdout_line = on_stdout_line or (lambda line: False)
    outcome = ProcessOutcome()
    stdout_tail: deque[str] = deque(maxlen=TAIL_LINES)
    stderr_tail: deque[str] = deque(maxlen=TAIL_LINES)
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, bufsize=0,
            start_new_session=True,  # its own process group: Ctrl-C reaches only the runner
            preexec_fn=_child_setup(memory_limit_mb, os.getpid()))
    except (OSError, ValueError, subprocess.SubprocessError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        if isinstance(error, PermissionError):
            reason = "not executable (permission denied)"
        outcome.launch_error = f"cannot start {argv[0]!r}: {reason}"
        return outcome
    group = process.pid
    REAPER.watch(group)

    def kill_group():
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def on_stdout(text: str) -> None:
        try:
            consumed = on_stdout_line(text)
        except Exception:  # a line the callback cannot take (a malformed event): output
            consumed = False
        if not consumed:
            stdout_tail.append(_kept(text))

    def on_stderr(text: str) -> None:
        stderr_tail.append(_kept(text))
        if on_stderr_line is not None:
            try:
                on_stderr_line(text)
            except Exception:  # as for stdout: the tail is kept whatever the callback does
                pass

    readers = [threading.Thread(target=_read_lines, args=(process.stdout, on_stdout),
                                kwargs={"on_read": on_stdout_read}, daemon=True),
               threading.Thread(target=_read_lines, args=(process.stderr, on_stderr),
                                daemon=True)]
    deadline = started + timeout_s
    try:
        for reader in readers:
            reader.start()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                outcome.timed_out = True
                break
            try:
                process.wait(timeout=min(remaining, 0.5))
                break
            except subprocess.TimeoutExpired:
                continue
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM/SIGHUP (bench.command)
        outcome.interrupted, outcome.interrupt = True, interrupt
    finally:
        # Whatever happened here (an interrupt, a bug in a callback), neither the process nor
        # anything it left running in its group outlives this call.
        kill_group()
        process.wait()
        REAPER.forget(group)
    outcome.wall_s = time.monotonic() - started
    for reader in readers:  # every writer is dead: the output ends where it was
        if reader.ident is not None:  # an interrupt can come before the second one starts
            reader.join(timeout=5)
    outcome.returncode = process.returncode
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
            except (ValueError, OSError):
                pass  # written atomically, so this cannot happen; treated as no result
            if not isinstance(worker_record, dict):
                worker_record = None

    where = f"worker during {progress['phase']}" + (
        f" after {len(losses_so_far)} steps" if losses_so_far else "")
    if outcome.interrupted:
        record = _partial_record(request, Status.INTERRUPTED,
                                 f"interrupted by {describe_interrupt(outcome.interrupt)}, "
                                 f"{where}", losses_so_far,
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
        raise Interrupted(record, outcome.interrupt)
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
    parity = parity_verdict(losses, reference, record["dtype"],
                            (record.get(TRAIN) or {}).get("checkpoints"))
    record["parity"] = parity
    if record["status"] == Status.OK and not parity["passed"]:
        record["status"] = Status.PARITY_FAILED
        record["error"] = parity["message"]
    return record
