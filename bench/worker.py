"""One backend, one process: `python -m bench.worker REQUEST.json RESULT.json`.

The runner starts this in a fresh interpreter for every run, so a crash, a hang or a leak in
one framework cannot touch another's results, and import and compile costs are paid (and
measured) per run. Progress goes to stdout as EVENT_PREFIX lines (the phase; the losses at most
every EVENT_INTERVAL_S); every step's loss also goes at once into the runner's LossLog, so a
worker that dies loses none of the steps it finished. The run record is written atomically to
RESULT.json at the end, also when the backend raised (status "error", with the phase it failed
in and the losses so far). Phases, each timed apart: setup (import, dataset, spec, initial
parameters), compile (backend.prepare()), warmup (steps thrown away, then the initial
parameters loaded again), train (bench.training.train), sample.

The test hook backends.register_extra_backends applies here as in the CLI, so deliberately
broken backends (tests/fault_backends.py) run through the real runner.
"""
from __future__ import annotations

import faulthandler
import json
import struct
import sys
import time
import traceback

from bench.files import write_atomically
from bench.record import (COMPILE_S, INFER, LOSSES, SAMPLING_S, SETUP, STEP_SECONDS,
                          STEPS_COMPLETED, TOKENS_PER_S, TRAIN, Status)
from bench.stats import step_statistics

EVENT_PREFIX = "@@microgpt-bench "
# Progress events while training are sent at most this often: one per step (a pipe write that
# wakes the runner) would slow the fastest backends' steps measurably.
EVENT_INTERVAL_S = 0.2


class LossLog:
    """The timed run's losses in a file the runner created, through shared memory: a step's
    loss is a store into the page cache, no system call, and it survives the worker being
    killed at any point. Layout: int64 count, then float64 losses (little-endian)."""

    def __init__(self, path: str, capacity: int):
        import mmap
        with open(path, "r+b") as handle:
            handle.truncate(8 * (capacity + 1))
            self.memory = mmap.mmap(handle.fileno(), 8 * (capacity + 1))

    def append(self, index: int, loss: float) -> None:
        struct.pack_into("<d", self.memory, 8 * (index + 1), loss)
        struct.pack_into("<q", self.memory, 0, index + 1)  # after the loss it counts


def read_loss_log(path: str) -> list[float]:
    """The losses a worker logged (empty if it logged none)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError:
        return []
    if len(data) < 8:
        return []
    count = min(struct.unpack_from("<q", data, 0)[0], len(data) // 8 - 1)
    return list(struct.unpack_from(f"<{count}d", data, 8)) if count > 0 else []


def emit(event: str, **fields) -> None:
    sys.stdout.write(EVENT_PREFIX + json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def one_line(error: BaseException, limit: int = 400) -> str:
    """`Type: message` on one line; a message of many lines (numpy's ImportError advice) keeps
    its first and last, which say what and why."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = " ... ".join(lines[:1] + lines[-1:]) if len(lines) > 1 else "".join(lines)
    text = type(error).__name__ + (f": {message}" if message else "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def new_record(request: dict) -> dict:
    record = {key: request.get(key) for key in ("backend", "dtype", "steps", "config")}
    record.update(status=Status.ERROR, phase="setup")
    try:  # which implementation this row is, so that compare never pairs different ones
        from backends import backend_info, register_extra_backends
        register_extra_backends()
        info = backend_info(request["backend"])
        record.update(division=info.division, implementation=info.target,
                      tunings=list(info.tunings))
    except (KeyError, ValueError):  # reported as this run's error by run()
        pass
    return record


def _enter_phase(record: dict, phase: str, **fields) -> None:
    record["phase"] = phase  # where a failure happened, if one does
    emit("phase", phase=phase, **fields)


def run(request: dict, record: dict) -> dict:
    """Fill `record` as the run goes, so that whatever is in it when the backend raises (the
    phase, the losses so far) is reported."""
    clock = time.perf_counter

    _enter_phase(record, "setup")
    start = clock()
    from backends import (BackendUnavailable, availability, backend_class, backend_info,
                          framework_versions, register_extra_backends)
    from backends.contract import GPTConfig, build_spec, training_flops
    from bench.checkpoints import CheckpointChecker
    from bench.training import sample, train
    from data.dataset import load_dataset

    register_extra_backends()
    name = request["backend"]
    found = availability(name)
    if not found.available:
        record.update(status=Status.UNAVAILABLE, error=found.reason,
                      install_hint=found.install_hint)
        return record
    try:
        implementation = backend_class(name)  # imports the framework
    except ImportError as error:  # installed but broken (a missing shared library, ...)
        record.update(status=Status.UNAVAILABLE, error=f"cannot import it: {one_line(error)}")
        return record
    import_s = clock() - start

    start = clock()
    dataset = load_dataset(request.get("dataset_path"), request.get("custom_dataset", False))
    config = GPTConfig.from_dict(request["config"])
    spec = build_spec(dataset.docs, config)
    data_s = clock() - start

    start = clock()
    try:
        backend_info(name).check_request(config, request["dtype"])
        backend = implementation(config, spec.tokenizer.vocab_size, request["dtype"],
                                 request.get("device"))
    except BackendUnavailable as error:
        record.update(status=Status.UNAVAILABLE, error=str(error))
        return record
    backend.load_parameters(spec.parameters)
    backend.sync()
    init_s = clock() - start
    record["device"] = backend.device
    record["framework_versions"] = framework_versions(name)
    record[SETUP] = {"import_s": import_s, "data_s": data_s, "init_s": init_s}
    process_settings = backend.configure_process()
    if process_settings:
        record["process_settings"] = process_settings

    _enter_phase(record, "compile", device=backend.device)
    start = clock()
    try:
        compile_parts = backend.prepare()
    except BackendUnavailable as error:  # e.g. a compiler the backend needs is missing
        record.update(status=Status.UNAVAILABLE, error=str(error))
        return record
    backend.sync()
    record[SETUP][COMPILE_S.key] = clock() - start
    record[SETUP]["compile_parts"] = compile_parts

    warmup_steps = min(request.get("warmup_steps", 0), request["steps"])
    if warmup_steps:
        _enter_phase(record, "warmup", steps=warmup_steps)
        start = clock()
        train(backend, spec, warmup_steps)
        backend.load_parameters(spec.parameters)
        backend.sync()
        record[SETUP]["warmup_s"] = clock() - start
        record[SETUP]["warmup_steps"] = warmup_steps

    _enter_phase(record, "train", steps=request["steps"])
    # Losses so far, kept here so that a backend raising mid-run still reports them, and in the
    # runner's loss log so that a worker that dies keeps them too.
    partial = record[TRAIN] = {LOSSES: [], STEPS_COMPLETED: 0}
    loss_log = LossLog(request["loss_log"], request["steps"]) if request.get(
        "loss_log") else None
    pending, last_event = [], [0.0]

    def on_step(step, loss):
        # Outside the timed region, and cheap: a store into shared memory per step; progress
        # events (a pipe write that wakes the runner) at most every EVENT_INTERVAL_S.
        partial[LOSSES].append(loss)
        partial[STEPS_COMPLETED] = step + 1
        if loss_log is not None:
            loss_log.append(step, loss)
        pending.append(loss)
        now = clock()
        if now - last_event[0] >= EVENT_INTERVAL_S or step + 1 == request["steps"]:
            emit("losses", first_step=step + 1 - len(pending), losses=list(pending))
            pending.clear()
            last_event[0] = now

    # Checkpoint parity (bench.checkpoints): a float64 step from the backend's own state at a
    # few steps, outside the clock.
    checker = (CheckpointChecker(config, spec.tokenizer.vocab_size, request["dtype"],
                                 request["steps"]) if backend.provides_moments else None)
    training = train(backend, spec, request["steps"], on_step=on_step, checker=checker)
    if pending:  # a run that stopped early (NaN, divergence)
        emit("losses", first_step=len(training.losses) - len(pending), losses=list(pending))
    lengths = (spec.step_batch(step).lengths for step in range(len(training.losses)))
    flops = [training_flops(config, spec.tokenizer.vocab_size, row) for row in lengths]
    record[TRAIN] = {LOSSES: training.losses, STEP_SECONDS: training.step_seconds,
                     STEPS_COMPLETED: len(training.losses),
                     # the work the spec asks of a step, its real lengths (no padding), mean
                     "flops_per_step": sum(flops) / len(flops) if flops else None,
                     **step_statistics(training.step_seconds)}
    if checker is not None:
        record[TRAIN]["checkpoints"] = checker.summary()
    if training.stopped_reason:
        reason = training.stopped_reason.removeprefix("diverged: ")  # the status says it
        record.update(status=Status.DIVERGED, error=reason)
        return record

    _enter_phase(record, "sample")
    sampling = sample(backend, spec, request.get("num_samples"))
    record[INFER] = {
        "samples": sampling.samples, "tokens": sampling.tokens,
        SAMPLING_S.key: sampling.total_seconds,
        # No samples drawn (--samples 0): no throughput, not "0 tok/s".
        TOKENS_PER_S.key: (sampling.tokens / sampling.total_seconds
                           if sampling.tokens and sampling.total_seconds else None),
    }
    record["details"] = backend.details()
    record["dataset"] = dataset.describe()
    record["status"] = Status.OK
    record.pop("phase")
    return record


def main(argv: list[str]) -> int:
    # A segfault or abort in native code then leaves the Python stack on stderr, which the
    # runner keeps as the reason.
    faulthandler.enable()
    request_path, result_path = argv
    with open(request_path) as handle:
        request = json.load(handle)
    record = new_record(request)
    try:
        run(request, record)
    except Exception as error:  # reported to the runner as this run's failure, with context
        steps = (record.get(TRAIN) or {}).get(STEPS_COMPLETED)
        where = f"during {record['phase']}" + (f" after {steps} steps" if steps else "")
        record.update(status=Status.ERROR, error=f"{one_line(error)} ({where})",
                      traceback=traceback.format_exc()[-4000:])
    write_atomically(result_path, json.dumps(record))
    emit("done", status=record["status"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
