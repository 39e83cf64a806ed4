"""What is specific to the jax-tuned backend (the shared checks against numpy are in
tests/test_conformance.py): with x64 switched on for the process, a float32 step still computes
in float32 throughout (its HLO has no f64); synchronous dispatch in a fresh process; devices;
details.

Skipped when JAX is not installed.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")

from backends import devices  # noqa: E402  (after the skip)
from backends.contract import BackendUnavailable, adam_step  # noqa: E402
from tests.helpers import make_backend  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_float32_step_has_no_float64_in_it(pool, tiny_spec):
    """x64 is on in this process (the float64 backend needs it): the float32 graphs must still
    be float32 throughout, with no f64 constant or convert anywhere."""
    assert jax.config.jax_enable_x64
    batch, adam = tiny_spec.step_batch(0), adam_step(tiny_spec.config, 0)
    backend = pool.get("jax-tuned", "float32", tiny_spec)
    text = backend.lowered_train_step_text(batch, adam)
    assert "f32" in text and "f64" not in text
    sampling = backend._sample_step.lower(backend.flat, backend.cache_keys, backend.cache_values,
                                          np.array([0, 0], dtype=np.int32)).as_text()
    assert "f32" in sampling and "f64" not in sampling
    # and the float64 step is float64
    assert "f64" in pool.get("jax-tuned", "float64", tiny_spec).lowered_train_step_text(batch, adam)


def test_default_device_and_details(pool, tiny_spec):
    backend = pool.get("jax-tuned", "float32", tiny_spec)
    expected = "gpu" if devices.jax_devices("gpu") else "cpu"
    assert backend.device == expected
    details = backend.details()
    assert details["x64_enabled"] is True and details["device"] == expected


def test_inline_dispatch_takes_effect_in_a_fresh_process():
    """As in a benchmark worker, where nothing used JAX before the backend's import (in this
    shared test process another JAX row may have)."""
    program = ("from backends import create_backend\n"
               "from backends.contract import preset\n"
               "backend = create_backend('jax-tuned', preset('tiny'), 27, 'float32')\n"
               "print(backend.details()['inline_cpu_dispatch'])\n")
    completed = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.parametrize("device", ["gpu", "cuda"])
def test_asking_for_a_missing_gpu_is_unavailable(device, tiny_spec):
    if devices.jax_devices("gpu"):
        pytest.skip("this machine has a GPU")
    with pytest.raises(BackendUnavailable, match="gpu"):
        make_backend("jax-tuned", tiny_spec, "float32", device)


def test_explicit_cpu(tiny_spec):
    backend = make_backend("jax-tuned", tiny_spec, "float64", "cpu")
    assert backend.device == "cpu" and backend.flat.dtype == np.float64
    assert backend.jax_device.platform == "cpu"
