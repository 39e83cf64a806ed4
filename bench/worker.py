"""One backend, one process: `python -m bench.worker REQUEST.json RESULT.json`.

The runner starts this in a fresh interpreter for every backend run, so a crash, a hang or a
leak in one framework cannot touch another's results, and import and compile costs are paid (and
measured) per run. Progress goes to stdout as lines starting with EVENT_PREFIX; the result is
written atomically to RESULT.json at the end. Phases, each timed apart:

  setup    import the backend module, load and verify the dataset, build the spec, construct
           the backend and load the initial parameters
  compile  backend.prepare(): whatever the backend builds before its first step
  warmup   a few training steps, then the initial parameters are loaded again (so the timed run
           starts from the spec's state with warm caches)
  train    the timed steps (bench.training.train)
  sample   the timed sampling
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback

EVENT_PREFIX = "@@microgpt-bench "


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


def run(request: dict) -> dict:
    result = {key: request[key] for key in ("backend", "dtype", "steps")}
    result["config"] = request["config"]
    result["status"] = "error"
    clock = time.perf_counter

    emit("phase", phase="setup")
    start = clock()
    from backends import BackendUnavailable, get_backend_class
    from bench.config import GPTConfig
    from bench.spec import build_spec
    from bench.training import sample, train
    from data.dataset import load_dataset

    backend_class = get_backend_class(request["backend"])
    availability = backend_class.availability()
    if not availability.available:
        result.update(status="unavailable", error=availability.reason,
                      install_hint=availability.install_hint)
        return result
    import_s = clock() - start

    start = clock()
    dataset = load_dataset(request.get("dataset_path"), request.get("custom_dataset", False))
    config = GPTConfig.from_dict(request["config"])
    spec = build_spec(dataset.docs, config)
    data_s = clock() - start

    start = clock()
    try:
        backend = backend_class(config, spec.tokenizer.vocab_size, request["dtype"],
                                request.get("device"))
    except BackendUnavailable as error:
        result.update(status="unavailable", error=str(error))
        return result
    backend.load_parameters(spec.parameters)
    backend.sync()
    init_s = clock() - start
    result["device"] = backend.device
    result["framework_versions"] = backend_class.framework_versions()
    result["setup"] = {"import_s": import_s, "data_s": data_s, "init_s": init_s}

    emit("phase", phase="compile")
    start = clock()
    compile_parts = backend.prepare()
    backend.sync()
    result["setup"]["compile_s"] = clock() - start
    result["setup"]["compile_parts"] = compile_parts

    warmup_steps = min(request.get("warmup_steps", 0), request["steps"])
    if warmup_steps:
        emit("phase", phase="warmup", steps=warmup_steps)
        start = clock()
        train(backend, spec, warmup_steps)
        backend.load_parameters(spec.parameters)
        backend.sync()
        result["setup"]["warmup_s"] = clock() - start
        result["setup"]["warmup_steps"] = warmup_steps

    emit("phase", phase="train", steps=request["steps"])
    report_every = max(1, request["steps"] // 50)
    pending = []

    def on_step(step, loss):
        pending.append(loss)
        if len(pending) >= report_every or step + 1 == request["steps"]:
            emit("losses", first_step=step + 1 - len(pending), losses=list(pending))
            pending.clear()

    training = train(backend, spec, request["steps"], on_step=on_step)
    if pending:
        emit("losses", first_step=len(training.losses) - len(pending), losses=list(pending))
    result["train"] = {"losses": training.losses, "step_seconds": training.step_seconds,
                       "steps_completed": len(training.losses), **step_statistics(
                           training.step_seconds)}
    if training.stopped_reason:
        result.update(status="diverged", error=training.stopped_reason)
        return result

    emit("phase", phase="sample")
    sampling = sample(backend, spec, request.get("num_samples"))
    result["infer"] = {
        "samples": sampling.samples, "tokens": sampling.tokens, "total_s": sampling.total_seconds,
        "tokens_per_s": sampling.tokens / sampling.total_seconds if sampling.total_seconds else None,
    }
    result["details"] = backend.details()
    result["dataset"] = dataset.describe()
    result["status"] = "ok"
    return result


def main(argv: list[str]) -> int:
    request_path, result_path = argv
    with open(request_path) as handle:
        request = json.load(handle)
    try:
        result = run(request)
    except Exception as error:  # reported to the runner as this run's failure, with context
        result = {key: request.get(key) for key in ("backend", "dtype", "steps", "config")}
        result.update(status="error", error=f"{type(error).__name__}: {error}",
                      traceback=traceback.format_exc()[-4000:])
    write_json_atomically(result_path, result)
    emit("done", status=result["status"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
