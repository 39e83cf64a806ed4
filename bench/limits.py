"""What this machine and the suite itself can resolve: the harness floor and the machine's peak.

- The harness floor: the per-step cost of the timed loop (bench.training.train: the clock read
  twice, the loss appended, the call) around a backend that does nothing. A difference between
  two rows smaller than this is below what the suite can resolve.
- The peak: a single-core float32 matrix product large enough to run at the core's arithmetic
  speed (numpy's BLAS on one thread, best of several), measured once per machine and cached.
  Rows report their achieved GFLOP/s as a share of it: near 0% means a step is overhead
  (dispatch, Python, kernel launches), not arithmetic.
Both go into every result file's environment block.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from backends.contract import Backend, SpecInstance
from bench.files import REPO_ROOT, write_atomically

PEAK_CACHE_DIR = REPO_ROOT / "data" / "cache" / "machine"
PEAK_SIZE = 512  # [512, 512] float32: 268 MFLOP a product, in cache-friendly blocks
# Run in a fresh interpreter so that the thread settings take effect before numpy loads.
_PEAK_PROGRAM = f"""
import time, numpy as np
a = np.random.default_rng(0).standard_normal(({PEAK_SIZE}, {PEAK_SIZE})).astype(np.float32)
b = a.copy(); c = a @ b
best = float("inf")
for _ in range(20):
    start = time.perf_counter(); np.matmul(a, b, out=c)
    best = min(best, time.perf_counter() - start)
print(2 * {PEAK_SIZE} ** 3 / best / 1e9)
"""
ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                     "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")}


class NullBackend(Backend):
    """A backend that does nothing: what the timed loop costs by itself."""
    name = "null"

    def load_parameters(self, parameters):
        pass

    def train_step(self, batch, adam):
        return 1.0

    def reset_cache(self):
        pass

    def next_logits(self, token, position):
        return [0.0] * self.vocab_size

    def parameters(self):
        return {}


def harness_floor_ms(spec: SpecInstance, steps: int = 2000) -> float:
    """Median ms per step of bench.training.train around NullBackend."""
    from bench.training import train
    backend = NullBackend(spec.config, spec.tokenizer.vocab_size, "float64")
    seconds = train(backend, spec, min(steps, spec.config.num_steps)).step_seconds
    return 1e3 * statistics.median(seconds[1:] or seconds)


def machine_peak(fingerprint: str) -> dict:
    """{"gflops": ..., "method": ...}: the single-core float32 matmul peak, cached per machine
    fingerprint; {"gflops": None, "error": ...} if it cannot be measured."""
    path = PEAK_CACHE_DIR / f"peak-{fingerprint}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    method = (f"float32 [{PEAK_SIZE}x{PEAK_SIZE}] @ [{PEAK_SIZE}x{PEAK_SIZE}] with numpy's BLAS "
              "on one thread, best of 20")
    try:
        completed = subprocess.run([sys.executable, "-c", _PEAK_PROGRAM], capture_output=True,
                                   text=True, timeout=120, env={**os.environ, **ONE_THREAD})
        peak = {"gflops": float(completed.stdout.strip()), "method": method}
    except (OSError, ValueError, subprocess.SubprocessError) as error:
        return {"gflops": None, "method": method, "error": str(error)[:200]}
    try:
        write_atomically(path, json.dumps(peak) + "\n")
    except OSError:  # a read-only checkout measures again next time
        pass
    return peak
