"""The float64 reference of a benchmark run (bench.parity.reference_losses), bounded like every
other run: unless it is already cached, it is computed in a supervised process of its own
(`python -m bench.reference REQUEST.json RESULT.json`), under --timeout and --memory-limit,
and killed with its process group on Ctrl-C, SIGTERM or the runner's death.

The cache lives in data/cache/reference; where that folder cannot be written (a read-only
checkout) the reference is computed in a temporary folder instead, never failing the run.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

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
        return parity.ReferenceLosses(cached["losses"], cached["float32_drift"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def bounded_reference(spec, steps: int, dataset, *, timeout_s: float,
                      memory_limit_mb: int | None = None):
    """The reference losses of `steps` steps at `spec`'s config; raises ReferenceFailed, or the
    KeyboardInterrupt / bench.command.Terminated that stopped it (after killing it)."""
    cached = _cached(spec, steps, dataset.sha256)
    if cached is not None:
        return cached
    from bench.runner import failure_of, supervise
    with tempfile.TemporaryDirectory(prefix="microgpt-bench-reference-") as workdir:
        request_path = os.path.join(workdir, "request.json")
        result_path = os.path.join(workdir, "result.json")
        with open(request_path, "w") as handle:
            json.dump({"config": spec.config.to_dict(), "steps": steps,
                       "dataset_path": os.path.abspath(dataset.path),
                       "custom_dataset": not dataset.standard}, handle)
        env = {**os.environ}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                          env.get("PYTHONPATH")]))
        outcome = supervise([sys.executable, "-m", "bench.reference", request_path,
                             result_path], timeout_s=timeout_s,
                            memory_limit_mb=memory_limit_mb, env=env, cwd=REPO_ROOT)
        if outcome.interrupted:
            raise outcome.interrupt
        what = f"the float64 reference run (numpy, {steps} steps)"
        if outcome.returncode == 0 and not outcome.timed_out:
            try:
                with open(result_path) as handle:
                    result = json.load(handle)
                return parity.ReferenceLosses(result["losses"], result["float32_drift"])
            except (OSError, ValueError, KeyError, TypeError):
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
    from pathlib import Path
    losses = parity.reference_losses(spec, request["steps"], dataset.sha256,
                                     cache_dir=Path(_cache_dir()))
    write_atomically(result_path, json.dumps({"losses": list(losses),
                                              "float32_drift": losses.float32_drift}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
