"""The float64 reference of a benchmark run (bench.parity.reference_losses), bounded like every
other run: unless it is already cached, it is computed in a supervised process of its own
(`python -m bench.reference REQUEST.json RESULT.json`), under --timeout and --memory-limit,
and killed with its process group on Ctrl-C, SIGTERM or the runner's death.

The reference samples an external program's samples are checked against
(`bounded_reference_samples`) are the same numpy float64 run's, drawn after its training by
bench.training.sample, computed and cached the same way.

The cache lives in data/cache/reference; where that folder cannot be written (a read-only
checkout) the reference is computed in a temporary folder instead, never failing the run.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

from bench import parity
from bench.files import REPO_ROOT, write_atomically


class ReferenceFailed(Exception):
    """The reference could not be computed within the limits: the message says why."""


def _cached(spec, steps: int, dataset_sha256: str):
    """The cached reference, or None (read in-process: instant)."""
    key = getattr(parity, "_cache_key", None)
    if key is None:
        return None
    try:
        path = parity.REFERENCE_CACHE_DIR / f"{key(spec, steps, dataset_sha256)}.json"
        if not path.is_file():
            return None
        cached = json.loads(path.read_text())
        return parity.ReferenceLosses.from_dict(cached)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def bounded_reference(spec, steps: int, dataset, *, timeout_s: float,
                      memory_limit_mb: int | None = None):
    """The reference losses of `steps` steps at `spec`'s config; raises ReferenceFailed, or the
    KeyboardInterrupt / bench.command.Terminated that stopped it (after killing it)."""
    cached = _cached(spec, steps, dataset.sha256)
    if cached is not None:
        return cached
    result = _run_bounded({"config": spec.config.to_dict(), "steps": steps,
                           "dataset_path": os.path.abspath(dataset.path),
                           "custom_dataset": not dataset.standard},
                          f"the float64 reference run (numpy, {steps} steps)", timeout_s,
                          memory_limit_mb)
    try:
        return parity.ReferenceLosses.from_dict(result)
    except (KeyError, TypeError):
        raise ReferenceFailed(f"the float64 reference run (numpy, {steps} steps) wrote no "
                              f"losses") from None


def _samples_cache_path(spec, steps: int, dataset_sha256: str,
                        directory: Path | None = None) -> Path:
    identity = json.dumps({"config": spec.config.to_dict(), "steps": steps,
                           "dataset": dataset_sha256, "what": "samples"}, sort_keys=True)
    key = hashlib.sha256(identity.encode()).hexdigest()[:20]
    return Path(directory or parity.REFERENCE_CACHE_DIR) / f"samples-{key}.json"


def _cached_samples(path: Path, count: int) -> list[str] | None:
    """The first `count` cached samples, or None (a cache that holds fewer is recomputed)."""
    try:
        samples = json.loads(path.read_text())["samples"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(samples, list) or len(samples) < count:
        return None
    return samples[:count]


def reference_samples(spec, steps: int, count: int) -> list[str]:
    """The first `count` names the numpy float64 reference draws after `steps` training steps
    (the samples of the spec's stream continue one another, so a longer list extends a
    shorter one)."""
    from backends import create_backend
    from bench.training import sample, train
    backend = create_backend("numpy", spec.config, spec.tokenizer.vocab_size, "float64")
    backend.load_parameters(spec.parameters)
    train(backend, spec, steps)
    return sample(backend, spec, count).samples


def bounded_reference_samples(spec, steps: int, count: int, dataset, *, timeout_s: float,
                              memory_limit_mb: int | None = None) -> list[str]:
    """The reference's first `count` samples after `steps` steps at `spec`'s config; cached,
    else computed in a supervised process like the losses. Raises ReferenceFailed, or the
    interrupt that stopped it."""
    cached = _cached_samples(_samples_cache_path(spec, steps, dataset.sha256), count)
    if cached is not None:
        return cached
    result = _run_bounded({"config": spec.config.to_dict(), "steps": steps, "samples": count,
                           "dataset_path": os.path.abspath(dataset.path),
                           "custom_dataset": not dataset.standard},
                          f"the float64 reference samples (numpy, {steps} steps, {count} "
                          f"samples)", timeout_s, memory_limit_mb)
    if not isinstance(result.get("samples"), list):
        raise ReferenceFailed("the reference samples run wrote no samples")
    return result["samples"][:count]


def _run_bounded(request: dict, what: str, timeout_s: float,
                 memory_limit_mb: int | None) -> dict:
    """`python -m bench.reference` on `request`, supervised; its result, or ReferenceFailed."""
    from bench.runner import failure_of, supervise
    with tempfile.TemporaryDirectory(prefix="microgpt-bench-reference-") as workdir:
        request_path = os.path.join(workdir, "request.json")
        result_path = os.path.join(workdir, "result.json")
        with open(request_path, "w") as handle:
            json.dump(request, handle)
        env = {**os.environ}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                          env.get("PYTHONPATH")]))
        outcome = supervise([sys.executable, "-m", "bench.reference", request_path,
                             result_path], timeout_s=timeout_s,
                            memory_limit_mb=memory_limit_mb, env=env, cwd=REPO_ROOT)
        if outcome.interrupted:
            raise outcome.interrupt
        if outcome.returncode == 0 and not outcome.timed_out:
            try:
                with open(result_path) as handle:
                    result = json.load(handle)
                if isinstance(result, dict):
                    return result
            except (OSError, ValueError):
                pass
        _, message = failure_of(outcome, timeout_s, memory_limit_mb, what)
        raise ReferenceFailed(message)


def _cache_dir():
    """The shared cache where it can be written, else a temporary folder."""
    directory = parity.REFERENCE_CACHE_DIR
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if os.access(directory, os.W_OK):
            return directory
    except OSError:
        pass
    return tempfile.mkdtemp(prefix="microgpt-bench-reference-cache-")


def main(argv: list[str]) -> int:
    from backends.contract import GPTConfig, build_spec
    from data.dataset import load_dataset
    request_path, result_path = argv
    with open(request_path) as handle:
        request = json.load(handle)
    dataset = load_dataset(request["dataset_path"], request["custom_dataset"])
    spec = build_spec(dataset.docs, GPTConfig.from_dict(request["config"]))
    if "samples" in request:
        samples = reference_samples(spec, request["steps"], request["samples"])
        text = json.dumps({"samples": samples})
        cache = _samples_cache_path(spec, request["steps"], dataset.sha256, Path(_cache_dir()))
        write_atomically(cache, text)
        write_atomically(result_path, text)
        return 0
    losses = parity.reference_losses(spec, request["steps"], dataset.sha256,
                                     cache_dir=Path(_cache_dir()))
    write_atomically(result_path, json.dumps(losses.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
