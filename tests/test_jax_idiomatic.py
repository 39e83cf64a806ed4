"""What is specific to the jax backend (the shared checks against numpy are in
tests/test_conformance.py): optax's schedule and bias correction against the spec, float32
staying float32 with x64 on, one compilation across reloads, details.

Skipped when JAX or optax is not installed.
"""
import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402  (after the skip)
import optax  # noqa: E402

from backends import devices  # noqa: E402
from backends.contract import adam_step  # noqa: E402
from tests.helpers import make_backend, train_losses  # noqa: E402


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_schedule_is_the_specs_at_every_step(dtype, tiny_spec):
    """On the int32 count optax keeps, under jit as optax calls it. (JAX divides int32 in
    float32 even with x64, so the backend casts the count first; XLA may then round s / N in
    the last bit: 1 ulp of lr in float64.)"""
    cfg = tiny_spec.config
    backend = make_backend("jax", tiny_spec, dtype)
    counts = jnp.arange(cfg.num_steps, dtype=jnp.int32)
    rates = np.asarray(jax.jit(backend.schedule)(counts)).astype(np.float64)
    expected = np.array([adam_step(cfg, s).learning_rate for s in range(cfg.num_steps)])
    assert np.abs(rates - expected).max() < {"float64": 1e-17, "float32": 2e-9}[dtype]


def test_optax_adam_is_the_specs_update(tiny_spec):
    """optax.adam as configured, 1,000 steps on a random vector, against the spec's formula
    (bias corrections 1 - beta ** (s + 1)) with the harness's float64 scalars."""
    cfg = tiny_spec.config
    optimizer = make_backend("jax", tiny_spec, "float64").optimizer
    rng = np.random.default_rng(1)
    w, m, v = rng.normal(size=64), 0.0, 0.0
    params = {"w": jnp.asarray(w)}
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    worst = 0.0
    for step in range(cfg.num_steps):
        gradient = rng.normal(size=64)
        updates, state = update({"w": jnp.asarray(gradient)}, state, params)
        params = optax.apply_updates(params, updates)
        adam = adam_step(cfg, step)
        m = cfg.beta1 * m + (1 - cfg.beta1) * gradient
        v = cfg.beta2 * v + (1 - cfg.beta2) * gradient * gradient
        w = w - (adam.learning_rate / adam.bias_correction1) * m / (
            np.sqrt(v / adam.bias_correction2) + cfg.eps)
        worst = max(worst, np.abs(np.asarray(params["w"]) - w).max())
    assert worst < 1e-15


def test_float32_stays_float32(pool, tiny_spec):
    assert jax.config.jax_enable_x64
    backend = pool.get("jax", "float32", tiny_spec)
    train_losses(backend, tiny_spec, 2)
    floats = [leaf for leaf in jax.tree.leaves((backend.params, backend.opt_state))
              if jnp.issubdtype(leaf.dtype, jnp.floating)]
    assert floats and all(leaf.dtype == jnp.float32 for leaf in floats)
    loss, grads = backend._loss_and_gradients(backend.params, tiny_spec.step_batch(0).padded,
                                              tiny_spec.step_batch(0).lengths)
    assert loss.dtype == jnp.float32
    assert all(g.dtype == jnp.float32 for g in grads.values())


def test_no_compilation_after_prepare_even_across_reloads(pool, tiny_spec, caplog):
    """The first steps after a reload reuse prepare's executable (the optimizer state is put
    on the device committed, like the step's outputs)."""
    backend = pool.get("jax", "float64", tiny_spec)
    with jax.log_compiles():
        for _ in range(2):
            backend.load_parameters(tiny_spec.parameters)
            train_losses(backend, tiny_spec, 3)
    assert not [r for r in caplog.records if "ompil" in r.getMessage()], caplog.text
    assert backend.trace_counts()["train_step"] == 1


def test_default_device_and_details(pool, tiny_spec):
    backend = pool.get("jax", "float32", tiny_spec)
    expected = "gpu" if devices.jax_devices("gpu") else "cpu"
    assert backend.device == expected
    details = backend.details()
    assert details["x64_enabled"] is True and details["device"] == expected
    assert "optax.linear_schedule" in details["schedule"]
