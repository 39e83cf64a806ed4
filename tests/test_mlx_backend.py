"""The mlx backend against the numpy reference: float64 losses and parameters at every one of
the 1,000 steps, float32 within its tolerance (and really float32), parameters after a few
steps, the hand-written backward pass against numpy and against MLX's own autodiff, two
layers with batches, sampling logits and samples; one compiled step serves every sequence
length; prepare() leaves the state alone; device and dtype errors.

Skipped when mlx is not installed. mx.compile traces the training step three times in this file
(tiny float32, tiny float64, a two-layer batched config). On a machine that has never compiled
them, MLX's CPU backend builds each fused kernel with the C++ compiler (about 10 s per dtype,
cached under $TMPDIR/mlx afterwards; about 50 s for the whole file then); with a warm cache
the whole file takes 7-20 s here, depending on the machine's load.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from backends import mlx_backend  # noqa: E402  (after the skip)
from backends.contract import BackendUnavailable, TokenBatch  # noqa: E402
from backends.mlx_backend import MLXBackend  # noqa: E402
from backends.contract import adam_step, preset  # noqa: E402
from bench.parity import LOSS_TOLERANCE  # noqa: E402
from backends.contract import build_spec  # noqa: E402
from bench.training import prepare_batches, sample  # noqa: E402
from tests.helpers import (  # noqa: E402
    make_backend, max_parameter_difference, step_batch, train_losses)

DTYPES = ["float32", "float64"]
# Largest parameter difference to numpy at the same dtype after a few steps: rounding only.
# (A wrong gradient moves a parameter by about the learning rate, 1e-2, in one step.)
PARAMETER_TOLERANCE = {"float32": 1e-5, "float64": 1e-12}


@pytest.fixture(scope="module")
def backends(tiny_spec):
    """One prepared backend per dtype (one mx.compile trace each), on the CPU so that the
    float64 one exists on every machine. Tests that train reload the spec's parameters first
    (which also zeroes Adam's moments)."""
    built = {}
    for dtype in DTYPES:
        backend = make_backend("mlx", tiny_spec, dtype, "cpu")
        backend.prepare()
        built[dtype] = backend
    return built


@pytest.fixture
def fresh(backends, tiny_spec):
    def get(dtype):
        backend = backends[dtype]
        backend.load_parameters(tiny_spec.parameters)
        return backend
    return get


@pytest.fixture(scope="module")
def two_layer_batched_spec(dataset):
    """Two layers, other widths, three documents per step: rows of different lengths."""
    return build_spec(dataset.docs, preset("tiny", n_layer=2, n_embd=8, n_head=2, block_size=8,
                                           batch_size=3))


# ---- parity ----------------------------------------------------------------------------------
def test_float64_matches_numpy_at_every_step(fresh, tiny_spec, numpy_runs):
    backend = fresh("float64")
    losses = train_losses(backend, tiny_spec, 1000)
    reference_losses, reference_parameters = numpy_runs["float64"]
    assert len(losses) == 1000
    assert np.abs(losses - reference_losses).max() < LOSS_TOLERANCE["float64"]
    differences = max_parameter_difference(backend.parameters(), reference_parameters)
    assert max(differences.values()) < 1e-9, differences


def test_float32_matches_numpy_float32_at_every_step(fresh, tiny_spec, numpy_runs):
    backend = fresh("float32")
    assert all(array.dtype == mx.float32 for array in backend.state)
    losses = train_losses(backend, tiny_spec, 1000)
    assert np.abs(losses - numpy_runs["float32"][0]).max() < LOSS_TOLERANCE["float32"]
    # really float32: it differs from the float64 run, slightly
    assert 0 < np.abs(losses - numpy_runs["float64"][0]).max() < LOSS_TOLERANCE["float32"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_parameters_after_a_few_steps_match_numpy(dtype, fresh, tiny_spec):
    backend = fresh(dtype)
    reference = make_backend("numpy", tiny_spec, dtype)
    np.testing.assert_allclose(train_losses(backend, tiny_spec, 5),
                               train_losses(reference, tiny_spec, 5),
                               atol=LOSS_TOLERANCE[dtype], rtol=0)
    differences = max_parameter_difference(backend.parameters(), reference.parameters())
    assert set(differences) == set(tiny_spec.parameters)
    assert max(differences.values()) < PARAMETER_TOLERANCE[dtype], differences
    # and training moved them: the comparison is not between two copies of the start
    moved = max_parameter_difference(backend.parameters(), tiny_spec.parameters)
    assert min(moved.values()) > 1e-3, moved


def test_parameters_round_trip_through_the_weight_buffer(fresh, tiny_spec):
    backend = fresh("float64")
    returned = backend.parameters()
    assert list(returned) == list(tiny_spec.parameters)  # the spec's names, in draw order
    for name, value in tiny_spec.parameters.items():
        assert returned[name].dtype == np.float64
        np.testing.assert_array_equal(returned[name], value, err_msg=name)


# ---- the hand-written backward pass --------------------------------------------------------
@pytest.mark.parametrize("spec_name, step", [("tiny_spec", 0), ("tiny_spec", 7),
                                             ("small_spec", 3), ("two_layer_batched_spec", 1)])
def test_gradients_match_numpy(spec_name, step, request):
    spec = request.getfixturevalue(spec_name)
    batch = step_batch(spec, step)
    backend = make_backend("mlx", spec, "float64", "cpu")
    loss, grads = backend.loss_and_gradients(batch)
    expected_loss, expected = make_backend("numpy", spec, "float64").loss_and_gradients(batch)
    assert loss == pytest.approx(expected_loss, abs=1e-12)
    assert set(grads) == set(expected)
    for name in expected:
        np.testing.assert_allclose(grads[name], expected[name], atol=1e-12, rtol=0,
                                   err_msg=name)
    assert max(np.abs(g).max() for g in expected.values()) > 1e-2  # non-trivial gradients


@pytest.mark.parametrize("spec_name", ["tiny_spec", "two_layer_batched_spec"])
def test_backward_matches_mlx_autodiff(spec_name, request):
    """The hand-written backward against mx.value_and_grad of the same forward pass."""
    spec = request.getfixturevalue(spec_name)
    backend = make_backend("mlx", spec, "float64", "cpu")
    tokens, lengths = backend._token_inputs(step_batch(spec, 2))
    weights = backend.state[0]
    loss, grad = backend._forward_backward(weights, tokens, lengths)
    autodiff_loss, autodiff_grad = mx.value_and_grad(backend.forward_loss)(weights, tokens,
                                                                          lengths)
    assert loss.item() == pytest.approx(autodiff_loss.item(), abs=1e-14)
    np.testing.assert_allclose(np.array(grad), np.array(autodiff_grad), atol=1e-13, rtol=0)


def test_float64_softmax_is_accurate_to_float64():
    """MLX's CPU exp is a float32 polynomial even for float64 inputs; the float64 path must not
    use it (it would put the losses ~1e-7 away from the reference)."""
    ops = mlx_backend.PreciseExpOps()
    values = np.random.default_rng(0).normal(scale=4.0, size=(8, 27))
    expected = np.exp(values - values.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    softmax = np.array(ops.softmax(mx.array(values, dtype=mx.float64)))
    np.testing.assert_allclose(softmax, expected, atol=1e-15, rtol=0)
    logsumexp = np.array(ops.logsumexp(mx.array(values, dtype=mx.float64)))[:, 0]
    np.testing.assert_allclose(logsumexp, np.log(np.exp(values).sum(-1)), atol=1e-14, rtol=0)


def test_two_layers_with_batches_match_numpy(two_layer_batched_spec):
    spec = two_layer_batched_spec
    batches = prepare_batches(spec, 50)
    assert any(len(set(batch.lengths.tolist())) > 1 for batch in batches)  # padding is used
    backend = make_backend("mlx", spec, "float64", "cpu")
    backend.prepare()
    losses = train_losses(backend, spec, 50)
    reference = make_backend("numpy", spec, "float64")
    assert np.abs(losses - train_losses(reference, spec, 50)).max() < LOSS_TOLERANCE["float64"]
    differences = max_parameter_difference(backend.parameters(), reference.parameters())
    assert max(differences.values()) < 1e-10, differences
    assert backend.trace_count == 1


# ---- sampling ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_sampling_logits_match_numpy_after_training(dtype, fresh, tiny_spec):
    backend = fresh(dtype)
    reference = make_backend("numpy", tiny_spec, dtype)
    train_losses(backend, tiny_spec, 20)
    train_losses(reference, tiny_spec, 20)
    tolerance = 1e-5 if dtype == "float32" else 1e-12
    tokens = [26, 4, 12, 12, 0, 19, 8, 13, 0, 26, 1, 2, 3, 4, 5, 6]  # a full block
    for _ in range(2):  # a second pass checks that reset_cache empties the cache
        backend.reset_cache()
        reference.reset_cache()
        for position, token in enumerate(tokens):
            logits = backend.next_logits(token, position)
            assert logits.dtype == np.float64 and logits.shape == (tiny_spec.tokenizer.vocab_size,)
            np.testing.assert_allclose(logits, reference.next_logits(token, position),
                                       atol=tolerance, rtol=0)
    assert backend.sampling_trace_count == 1  # one trace for every position


def test_float64_samples_are_numpys(fresh, tiny_spec):
    backend = fresh("float64")
    reference = make_backend("numpy", tiny_spec, "float64")
    train_losses(backend, tiny_spec, 100)
    train_losses(reference, tiny_spec, 100)
    samples = sample(backend, tiny_spec).samples
    assert samples == sample(reference, tiny_spec).samples
    assert len(samples) == tiny_spec.config.num_samples and any(samples)


# ---- compilation -------------------------------------------------------------------------------
def test_varying_lengths_do_not_recompile(fresh, tiny_spec):
    backend = fresh("float32")
    block, bos = tiny_spec.config.block_size, tiny_spec.tokenizer.bos
    # every length from 1 to block_size: [BOS] + n - 1 characters (+ BOS when it fits)
    batches = [TokenBatch.from_sequences([([bos] + [n % 26] * (n - 1) + [bos])[: block + 1]],
                                         block, bos) for n in range(1, block + 1)]
    assert sorted(int(batch.lengths[0]) for batch in batches) == list(range(1, block + 1))
    assert backend.trace_count == 1  # traced once, in prepare
    for step, batch in enumerate(batches):
        assert np.isfinite(backend.train_step(batch, adam_step(tiny_spec.config, step)))
    assert backend.trace_count == 1  # mx.compile traces again for any new input shape


def test_prepare_leaves_the_state_alone(fresh, tiny_spec):
    backend = fresh("float64")
    train_losses(backend, tiny_spec, 3)  # non-zero moments
    before = [np.array(array) for array in backend.state]
    assert before[1].any() and before[2].any()
    durations = backend.prepare()
    assert set(durations) == {"compile_train_step", "compile_next_logits"}
    assert all(seconds >= 0 for seconds in durations.values())
    for old, new in zip(before, backend.state):
        np.testing.assert_array_equal(old, np.array(new))
    assert backend.trace_count == 1


def test_load_parameters_resets_the_optimizer(fresh, tiny_spec):
    backend = fresh("float64")
    first = train_losses(backend, tiny_spec, 5)
    backend.load_parameters(tiny_spec.parameters)
    np.testing.assert_array_equal(train_losses(backend, tiny_spec, 5), first)


# ---- devices, dtypes, details -----------------------------------------------------------------
def test_defaults_and_details(tiny_spec, backends):
    assert MLXBackend.default_dtype == "float32"
    assert MLXBackend.name == "mlx" and MLXBackend.requires == ("mlx",)
    backend = make_backend("mlx", tiny_spec, "float32")  # MLX's own choice of device
    assert backend.device == ("gpu" if mx.is_available(mx.gpu) else "cpu")
    details = backends["float64"].details()
    assert details["device"] == "cpu" and details["backward"] == "hand-written"


@pytest.mark.parametrize("device", ["gpu", "cuda", "metal"])
def test_asking_for_a_missing_gpu_is_unavailable(device, tiny_spec):
    if mx.is_available(mx.gpu):
        pytest.skip("this machine has a GPU")
    with pytest.raises(BackendUnavailable, match="no GPU"):
        make_backend("mlx", tiny_spec, "float32", device)


@pytest.mark.parametrize("device", ["tpu", "mps", "not-a-device"])
def test_unknown_devices_are_unavailable(device, tiny_spec):
    with pytest.raises(BackendUnavailable, match="no device"):
        make_backend("mlx", tiny_spec, "float32", device)


def test_the_gpu_has_no_float64(tiny_spec, monkeypatch):
    monkeypatch.setattr(mlx_backend, "_gpu_available", lambda: True)
    with pytest.raises(BackendUnavailable, match="float64"):
        make_backend("mlx", tiny_spec, "float64", "gpu")


# ---- the benchmark worker's process settings --------------------------------------------------
REPO = Path(__file__).resolve().parents[1]


def run_in_worker(tmp_path, **environment):
    """One short mlx run through bench.py (a worker process of its own); its result."""
    path = tmp_path / f"mlx-{len(list(tmp_path.glob('*.json')))}.json"
    completed = subprocess.run(
        [sys.executable, "bench.py", "--backend", "mlx", "--device", "cpu", "--steps", "20",
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
    unpinned = run_in_worker(tmp_path, **{mlx_backend.PIN_ENV_VAR: "0"})
    assert "left to the OS" in unpinned["process_settings"]["cpu_affinity"]
