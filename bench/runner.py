"""Runs one backend in its own process (bench.worker), watches it, and turns whatever happened
(a result, a crash, a hang, an interrupt) into one run record with its parity verdict.

Nothing a worker has already reported is lost: losses stream in as events while it trains, so a
run that crashes or times out half-way keeps the steps it finished, marked with the reason.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.config import GPTConfig
from bench.parity import compare_losses
from bench.worker import EVENT_PREFIX

REPO_ROOT = Path(__file__).resolve().parents[1]

# Statuses a run can end with. Only "ok" timings are valid; every other status carries `error`.
STATUS_OK = "ok"
STATUS_PARITY_FAILED = "parity-failed"
STATUS_UNAVAILABLE = "unavailable"
STATUS_ERROR = "error"
STATUS_CRASHED = "crashed"
STATUS_TIMEOUT = "timeout"
STATUS_DIVERGED = "diverged"
STATUS_INTERRUPTED = "interrupted"


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


def _limit_memory(megabytes: int):
    def apply():
        import resource
        limit = megabytes * 2 ** 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with code {returncode}"


def run_backend(request: RunRequest, reference: list[float] | None, on_event=None) -> dict:
    """Run one backend in a subprocess and return its run record (never raises for a backend
    failure; raises Interrupted on Ctrl-C after stopping the worker)."""
    on_event = on_event or (lambda event: None)
    with tempfile.TemporaryDirectory(prefix="microgpt-bench-") as workdir:
        request_path = os.path.join(workdir, "request.json")
        result_path = os.path.join(workdir, "result.json")
        with open(request_path, "w") as handle:
            json.dump(request.worker_request(), handle)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **request.extra_env}
        # Run from the checkout whatever the caller's working directory.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                          env.get("PYTHONPATH")]))
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.worker", request_path, result_path],
            cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, errors="replace",
            start_new_session=True,  # its own process group: Ctrl-C reaches only the runner
            preexec_fn=_limit_memory(request.memory_limit_mb) if request.memory_limit_mb else None)
        streamed_losses: list[float] = []
        output_tail: deque[str] = deque(maxlen=40)
        stderr_tail: deque[str] = deque(maxlen=40)
        timed_out = threading.Event()

        def kill_group():
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        def on_timeout():
            timed_out.set()
            kill_group()

        def drain_stderr():
            for line in process.stderr:
                stderr_tail.append(line.rstrip())

        watchdog = threading.Timer(request.timeout_s, on_timeout)
        stderr_reader = threading.Thread(target=drain_stderr, daemon=True)
        watchdog.start()
        stderr_reader.start()
        started = time.monotonic()
        try:
            for line in process.stdout:
                if not line.startswith(EVENT_PREFIX):
                    output_tail.append(line.rstrip())
                    continue
                event = json.loads(line[len(EVENT_PREFIX):])
                if event["event"] == "losses":
                    streamed_losses.extend(event["losses"])
                on_event(event)
            process.wait()
        except KeyboardInterrupt:
            kill_group()
            process.wait()
            record = _partial_record(request, STATUS_INTERRUPTED,
                                     "interrupted by the user (Ctrl-C)", streamed_losses,
                                     output_tail, stderr_tail)
            raise Interrupted(_with_parity(record, reference)) from None
        finally:
            watchdog.cancel()
        stderr_reader.join(timeout=5)
        wall_s = time.monotonic() - started

        if timed_out.is_set():
            record = _partial_record(
                request, STATUS_TIMEOUT,
                f"no result within the timeout of {request.timeout_s:g} s; killed",
                streamed_losses, output_tail, stderr_tail)
        elif os.path.exists(result_path):
            with open(result_path) as handle:
                record = json.load(handle)
            if record.get("status") == STATUS_ERROR and stderr_tail:
                record["stderr_tail"] = list(stderr_tail)
        else:
            reason = _describe_exit(process.returncode)
            if request.memory_limit_mb and any("MemoryError" in line for line in stderr_tail):
                reason += f" (out of memory under the {request.memory_limit_mb} MB limit)"
            record = _partial_record(request, STATUS_CRASHED,
                                     f"worker {reason} before writing a result",
                                     streamed_losses, output_tail, stderr_tail)
        record["wall_s"] = wall_s
        return _with_parity(record, reference)


def _partial_record(request: RunRequest, status: str, error: str, losses: list[float],
                    output_tail, stderr_tail) -> dict:
    return {
        "backend": request.backend, "dtype": request.dtype, "device": request.device,
        "config": request.config.to_dict(), "steps": request.steps, "status": status,
        "error": error, "train": {"losses": list(losses), "steps_completed": len(losses)},
        "stdout_tail": list(output_tail), "stderr_tail": list(stderr_tail),
    }


def _with_parity(record: dict, reference: list[float] | None) -> dict:
    """Attach the parity verdict; an otherwise-ok run whose losses do not match is demoted."""
    losses = record.get("train", {}).get("losses") or []
    if reference is None or not losses:
        return record
    parity = compare_losses(losses, reference, record["dtype"])
    record["parity"] = parity.to_dict()
    if record["status"] == STATUS_OK and not parity.passed:
        record["status"] = STATUS_PARITY_FAILED
        record["error"] = parity.message
    return record
