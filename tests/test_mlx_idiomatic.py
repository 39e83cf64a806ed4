"""What is specific to the mlx and mlx-compile backends (the shared checks against numpy are in
tests/test_conformance.py): the float64 model's exact ops, mlx.optimizers.Adam as configured
against the spec's update, the compiled step surviving reloads, details.

Skipped when mlx is not installed.
"""
import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from backends import mlx_idiomatic  # noqa: E402  (after the skip)
from backends.contract import adam_step  # noqa: E402
from tests.helpers import make_backend, train_losses  # noqa: E402


def test_float64_ops_are_accurate_to_float64():
    """MLX's CPU exp and fast.rms_norm are float32-precise even for float64 inputs."""
    ops = mlx_idiomatic.ExactOps()
    x = np.random.default_rng(0).normal(scale=4.0, size=(8, 27))
    targets = np.arange(8) % 27
    softmax = np.exp(x - x.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    as_mx = mx.array(x, dtype=mx.float64)
    np.testing.assert_allclose(np.array(ops.softmax(as_mx)), softmax, atol=1e-15, rtol=0)
    cross_entropy = np.array(ops.cross_entropy(as_mx, mx.array(targets)))
    np.testing.assert_allclose(cross_entropy, -np.log(softmax[np.arange(8), targets]),
                               atol=1e-14, rtol=0)
    rms = x * (np.mean(x * x, -1, keepdims=True) + 1e-5) ** -0.5
    np.testing.assert_allclose(np.array(ops.rms_norm(as_mx)), rms, atol=1e-15, rtol=0)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_optimizer_makes_the_spec_update(dtype, tiny_spec):
    """mlx.optimizers.Adam as the backend configures it (bias correction, the schedule
    callable; float64 betas for float64) against the spec's formula with the harness's
    scalars."""
    backend = make_backend("mlx", tiny_spec, dtype, "cpu")
    optimizer = backend.make_optimizer()
    rng = np.random.default_rng(1)
    cfg, w, m, v = tiny_spec.config, rng.normal(size=64), 0.0, 0.0
    parameters = {"w": mx.array(w, dtype=backend.mx_dtype)}
    optimizer.init(parameters)
    w = np.array(parameters["w"], dtype=np.float64)
    worst = 0.0
    for step in range(cfg.num_steps):
        gradient = rng.normal(size=64)
        with mx.stream(mx.cpu):
            parameters = optimizer.apply_gradients(
                {"w": mx.array(gradient, dtype=backend.mx_dtype)}, parameters)
        adam = adam_step(cfg, step)
        m = cfg.beta1 * m + (1 - cfg.beta1) * gradient
        v = cfg.beta2 * v + (1 - cfg.beta2) * gradient * gradient
        w = w - (adam.learning_rate / adam.bias_correction1) * m / (
            np.sqrt(v / adam.bias_correction2) + cfg.eps)
        worst = max(worst, np.abs(np.array(parameters["w"], dtype=np.float64) - w).max())
    assert worst < {"float64": 1e-15, "float32": 2e-5}[dtype]  # float32: rounding


def test_float32_bias_corrections_are_why_the_betas_are_arrays():
    """With Python-float betas MLX raises them to the uint64 step in float32; the float64
    backend passes float64 arrays (tests/test_conformance.py holds it to 1e-9)."""
    step = mx.array(1, mx.uint64)
    assert (0.85 ** step).dtype == mx.float32
    assert (mx.array(0.85, dtype=mx.float64) ** step).dtype == mx.float64


def test_the_compiled_step_survives_reloads(pool, tiny_spec):
    backend = pool.get("mlx-compile", "float64", tiny_spec)
    first = train_losses(backend, tiny_spec, 3)
    for _ in range(3):
        backend.load_parameters(tiny_spec.parameters)
        np.testing.assert_array_equal(train_losses(backend, tiny_spec, 3), first)
    assert backend.trace_counts() == {"train_step": 1}  # prepare's trace, reused
    eager = pool.get("mlx", "float64", tiny_spec)
    np.testing.assert_allclose(train_losses(eager, tiny_spec, 3), first, atol=1e-14, rtol=0)


def test_steps_follow_the_optimizer(pool, tiny_spec):
    backend = pool.get("mlx", "float32", tiny_spec)
    with pytest.raises(RuntimeError, match="reload"):
        backend.train_step(tiny_spec.step_batch(3), adam_step(tiny_spec.config, 3))


def test_default_device_and_details(tiny_spec, pool):
    backend = make_backend("mlx", tiny_spec, "float32")
    assert backend.device == ("gpu" if mx.is_available(mx.gpu) else "cpu")
    details = pool.get("mlx-compile", "float64", tiny_spec).details()
    assert details["device"] == "cpu" and details["compile"].startswith("mx.compile")
    assert pool.get("mlx", "float64", tiny_spec).details()["compile"] == "none (eager)"
