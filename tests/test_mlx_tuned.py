"""What is specific to the mlx backend (the shared checks against numpy are in
tests/test_conformance.py): the hand-written backward against MLX's own autodiff; the float64
path's exact exp (MLX's CPU exp is float32-precise); devices; the benchmark worker's thread
pinning.

Skipped when mlx is not installed. On a machine that has never compiled them, MLX's CPU backend
builds each fused kernel with the C++ compiler (seconds per dtype, cached under $TMPDIR/mlx).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from backends import devices, mlx_tuned  # noqa: E402  (after the skip)
from backends.contract import BackendUnavailable  # noqa: E402
from tests.helpers import make_backend  # noqa: E402


@pytest.mark.parametrize("spec_name", ["tiny_spec", "batched_spec"])
def test_backward_matches_mlx_autodiff(spec_name, request):
    """The hand-written backward against mx.value_and_grad of the same forward pass."""
    spec = request.getfixturevalue(spec_name)
    backend = make_backend("mlx-tuned", spec, "float64", "cpu")
    tokens, lengths = backend._token_inputs(spec.step_batch(2))
    weights = backend.state[0]
    loss, grad = backend._forward_backward(weights, tokens, lengths)
    autodiff_loss, autodiff_grad = mx.value_and_grad(backend.forward_loss)(weights, tokens,
                                                                          lengths)
    assert loss.item() == pytest.approx(autodiff_loss.item(), abs=1e-14)
    np.testing.assert_allclose(np.array(grad), np.array(autodiff_grad), atol=1e-13, rtol=0)


def test_float64_softmax_is_accurate_to_float64():
    """MLX's CPU exp is a float32 polynomial even for float64 inputs; the float64 path must not
    use it (it would put the losses ~1e-7 away from the reference)."""
    ops = mlx_tuned.PreciseExpOps()
    values = np.random.default_rng(0).normal(scale=4.0, size=(8, 27))
    expected = np.exp(values - values.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    softmax = np.array(ops.softmax(mx.array(values, dtype=mx.float64)))
    np.testing.assert_allclose(softmax, expected, atol=1e-15, rtol=0)
    logsumexp = np.array(ops.logsumexp(mx.array(values, dtype=mx.float64)))[:, 0]
    np.testing.assert_allclose(logsumexp, np.log(np.exp(values).sum(-1)), atol=1e-14, rtol=0)


def test_default_device_and_details(tiny_spec, pool):
    backend = make_backend("mlx-tuned", tiny_spec, "float32")  # MLX's own choice of device
    assert backend.device == ("gpu" if mx.is_available(mx.gpu) else "cpu")
    details = pool.get("mlx-tuned", "float64", tiny_spec).details()
    assert details["device"] == "cpu" and details["backward"] == "hand-written"


@pytest.mark.parametrize("device", ["gpu", "cuda", "metal"])
def test_asking_for_a_missing_gpu_is_unavailable(device, tiny_spec):
    if mx.is_available(mx.gpu):
        pytest.skip("this machine has a GPU")
    with pytest.raises(BackendUnavailable, match="no GPU"):
        make_backend("mlx-tuned", tiny_spec, "float32", device)


def test_the_gpu_has_no_float64(tiny_spec, monkeypatch):
    monkeypatch.setattr(devices, "mlx_gpu_available", lambda: True)
    with pytest.raises(BackendUnavailable, match="float64"):
        make_backend("mlx-tuned", tiny_spec, "float64", "gpu")


# ---- the benchmark worker's process settings --------------------------------------------------
REPO = Path(__file__).resolve().parents[1]


def run_in_worker(tmp_path, **environment):
    """One short mlx run through bench.py (a worker process of its own); its result."""
    path = tmp_path / f"mlx-{len(list(tmp_path.glob('*.json')))}.json"
    completed = subprocess.run(
        [sys.executable, "bench.py", "--backend", "mlx-tuned", "--device", "cpu", "--steps", "20",
         "--samples", "1", "--warmup", "1", "--json", str(path), "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, **environment})
    assert completed.returncode == 0, completed.stdout + completed.stderr
    (run,) = json.loads(path.read_text())["runs"]
    assert run["status"] == "ok"
    return run


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux CPU affinity")
def test_worker_pins_its_threads_to_one_core(tmp_path):
    run = run_in_worker(tmp_path)
    assert len(run["process_settings"]["cpu_affinity"]) == 1  # read back from every thread
    unpinned = run_in_worker(tmp_path, **{mlx_tuned.PIN_ENV_VAR: "0"})
    assert "left to the OS" in unpinned["process_settings"]["cpu_affinity"]
