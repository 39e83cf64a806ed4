"""One backend, one process: `python -m bench.worker REQUEST.json RESULT.json`.

The runner starts this in a fresh interpreter for every backend run, so a crash, a hang or a
leak in one framework cannot touch another's results, and import and compile costs are paid (and
measured) per run. Progress goes to stdout as lines starting with EVENT_PREFIX (the phase, and
the losses every EVENT_INTERVAL_S); every step's loss also goes at once into the runner's loss
log (LossLog: shared memory, so a worker that crashes or is killed loses none of the steps it
finished). The result is written atomically to RESULT.json at the end, also when the backend
raised (then with status "error", the phase it failed in and the losses so far). Phases, each
timed apart:

  setup    import the backend module, load and verify the dataset, build the spec, construct
           the backend and load the initial parameters
  compile  backend.prepare(): whatever the backend builds before its first step
  warmup   a few training steps, then the initial parameters are loaded again (so the timed run
           starts from the spec's state with warm caches)
  train    the timed steps (bench.training.train)
  sample   the timed sampling

The test hook backends.register_extra_backends is applied here as in the CLI, so the fault
tests run deliberately broken backends (tests/fault_backends.py) through the real runner.
"""
from __future__ import annotations

import faulthandler
import json
import os
import statistics
import struct
import sys
import time
import traceback

EVENT_PREFIX = "@@microgpt-bench "
# Progress events while training are sent at most this often: one per step (a pipe write that
# wakes the runner) slowed numpy's median step by ~8% on a busy 2-core machine.
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


def write_json_atomically(path: str, document: dict) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as handle:
        json.dump(document, handle)
    os.replace(temporary, path)


def step_statistics(step_seconds: list[float]) -> dict:
    """Per-step figures in ms. The first step is reported apart (it may include lazy
    compilation); median, quartiles and spread are over the steps after it."""
    if not step_seconds:
        return {}
    steady = step_seconds[1:] or step_seconds
    ms = sorted(1e3 * s for s in steady)
    quartiles = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
    return {
        "first_step_ms": 1e3 * step_seconds[0],
        "ms_per_step_median": statistics.median(ms),
        "ms_per_step_mean": statistics.fmean(ms),
        "ms_per_step_min": ms[0],
        "ms_per_step_max": ms[-1],
        "ms_per_step_q1": quartiles[0],
        "ms_per_step_q3": quartiles[2],
        "ms_per_step_iqr": quartiles[2] - quartiles[0],
        "ms_per_step_stdev": statistics.stdev(ms) if len(ms) > 1 else 0.0,
        "total_s": sum(step_seconds),
    }


def one_line(error: BaseException, limit: int = 400) -> str:
    """`Type: message` on one line; a message of many lines (numpy's ImportError advice) keeps
    its first and last, which say what and why."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = " ... ".join(lines[:1] + lines[-1:]) if len(lines) > 1 else "".join(lines)
    text = type(error).__name__ + (f": {message}" if message else "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def new_result(request: dict) -> dict:
    result = {key: request.get(key) for key in ("backend", "dtype", "steps", "config")}
    result.update(status="error", phase="setup")
    return result


def _enter_phase(result: dict, phase: str, **fields) -> None:
    result["phase"] = phase  # where a failure happened, if one does
    emit("phase", phase=phase, **fields)


def run(request: dict, result: dict) -> dict:
    """Fill `result` as the run goes, so that whatever is in it when the backend raises (the
    phase, the losses so far) is reported."""
    clock = time.perf_counter

    _enter_phase(result, "setup")
    start = clock()
    from backends import (BackendUnavailable, availability, backend_class, backend_info,
                          framework_versions, register_extra_backends)
    from backends.contract import GPTConfig, build_spec
    from bench.training import sample, train
    from data.dataset import load_dataset

    register_extra_backends()
    name = request["backend"]
    found = availability(name)
    if not found.available:
        result.update(status="unavailable", error=found.reason, install_hint=found.install_hint)
        return result
    try:
        implementation = backend_class(name)  # imports the framework
    except ImportError as error:  # installed but broken (a missing shared library, ...)
        result.update(status="unavailable", error=f"cannot import it: {one_line(error)}")
        return result
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
        result.update(status="unavailable", error=str(error))
        return result
    backend.load_parameters(spec.parameters)
    backend.sync()
    init_s = clock() - start
    result["device"] = backend.device
    result["framework_versions"] = framework_versions(name)
    result["setup"] = {"import_s": import_s, "data_s": data_s, "init_s": init_s}
    process_settings = backend.configure_process()
    if process_settings:
        result["process_settings"] = process_settings

    _enter_phase(result, "compile", device=backend.device)
    start = clock()
    try:
        compile_parts = backend.prepare()
    except BackendUnavailable as error:  # e.g. a compiler the backend needs is missing
        result.update(status="unavailable", error=str(error))
        return result
    backend.sync()
    result["setup"]["compile_s"] = clock() - start
    result["setup"]["compile_parts"] = compile_parts

    warmup_steps = min(request.get("warmup_steps", 0), request["steps"])
    if warmup_steps:
        _enter_phase(result, "warmup", steps=warmup_steps)
        start = clock()
        train(backend, spec, warmup_steps)
        backend.load_parameters(spec.parameters)
        backend.sync()
        result["setup"]["warmup_s"] = clock() - start
        result["setup"]["warmup_steps"] = warmup_steps

    _enter_phase(result, "train", steps=request["steps"])
    # Losses so far, kept here so that a backend raising mid-run still reports them, and in the
    # runner's loss log so that a worker that dies keeps them too.
    partial = result["train"] = {"losses": [], "steps_completed": 0}
    loss_log = LossLog(request["loss_log"], request["steps"]) if request.get(
        "loss_log") else None
    pending, last_event = [], [0.0]

    def on_step(step, loss):
        # Outside the timed region, and cheap: a store into shared memory per step; progress
        # events (a pipe write that wakes the runner) at most every EVENT_INTERVAL_S.
        partial["losses"].append(loss)
        partial["steps_completed"] = step + 1
        if loss_log is not None:
            loss_log.append(step, loss)
        pending.append(loss)
        now = clock()
        if now - last_event[0] >= EVENT_INTERVAL_S or step + 1 == request["steps"]:
            emit("losses", first_step=step + 1 - len(pending), losses=list(pending))
            pending.clear()
            last_event[0] = now

    training = train(backend, spec, request["steps"], on_step=on_step)
    if pending:  # a run that stopped early (NaN, divergence)
        emit("losses", first_step=len(training.losses) - len(pending), losses=list(pending))
    result["train"] = {"losses": training.losses, "step_seconds": training.step_seconds,
                       "steps_completed": len(training.losses), **step_statistics(
                           training.step_seconds)}
    if training.stopped_reason:
        reason = training.stopped_reason.removeprefix("diverged: ")  # the status says it
        result.update(status="diverged", error=reason)
        return result

    _enter_phase(result, "sample")
    sampling = sample(backend, spec, request.get("num_samples"))
    result["infer"] = {
        "samples": sampling.samples, "tokens": sampling.tokens, "total_s": sampling.total_seconds,
        "tokens_per_s": sampling.tokens / sampling.total_seconds if sampling.total_seconds else None,
    }
    result["details"] = backend.details()
    result["dataset"] = dataset.describe()
    result["status"] = "ok"
    result.pop("phase")
    return result


def main(argv: list[str]) -> int:
    # A segfault or abort in native code then leaves the Python stack on stderr, which the
    # runner keeps as the reason.
    faulthandler.enable()
    request_path, result_path = argv
    with open(request_path) as handle:
        request = json.load(handle)
    result = new_result(request)
    try:
        run(request, result)
    except Exception as error:  # reported to the runner as this run's failure, with context
        steps = (result.get("train") or {}).get("steps_completed")
        where = f"during {result['phase']}" + (f" after {steps} steps" if steps else "")
        result.update(status="error", error=f"{one_line(error)} ({where})",
                      traceback=traceback.format_exc()[-4000:])
    write_json_atomically(result_path, result)
    emit("done", status=result["status"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
