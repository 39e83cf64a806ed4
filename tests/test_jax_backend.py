"""The jax backend against the numpy reference: float64 losses and parameters at every one of
the 1,000 steps, float32 within its tolerance (and really float32), parameters after a few
steps, gradients, two layers with batches, sampling logits and samples; one compiled step
serves every sequence length; prepare() leaves the state alone; device errors.

Skipped when jax is not installed. XLA compiles the training step three times in this file
(tiny float32, tiny float64, a two-layer batched config), the sampling step twice and the
gradient function three times, 2-5 s each on 2 busy cores; the compiled steps are shared through
module-scoped fixtures. The whole file takes 20-45 s here, depending on the machine's load.
"""
import numpy as np
import pytest

jax = pytest.importorskip("jax")

from backends import jax_backend  # noqa: E402  (after the skip)
from backends.contract import BackendUnavailable, TokenBatch  # noqa: E402
from backends.jax_backend import JaxBackend  # noqa: E402
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
    """One prepared backend per dtype (one XLA compilation each). Tests that train reload the
    spec's parameters first (which also zeroes Adam's moments)."""
    built = {}
    for dtype in DTYPES:
        backend = make_backend("jax", tiny_spec, dtype)
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
    assert backend.flat.dtype == np.float32 and backend.moment2.dtype == np.float32
    losses = train_losses(backend, tiny_spec, 1000)
    assert np.abs(losses - numpy_runs["float32"][0]).max() < LOSS_TOLERANCE["float32"]
    # really float32: it differs from the float64 run, slightly
    assert 0 < np.abs(losses - numpy_runs["float64"][0]).max() < LOSS_TOLERANCE["float32"]


def test_float32_step_has_no_float64_in_it(backends, tiny_spec):
    """x64 is on in this process (the float64 backend needs it): the float32 graphs must still
    be float32 throughout, with no f64 constant or convert anywhere."""
    assert jax.config.jax_enable_x64
    backend = backends["float32"]
    text = backend.lowered_train_step_text(step_batch(tiny_spec, 0), adam_step(tiny_spec.config, 0))
    assert "f32" in text and "f64" not in text
    sampling = backend._sample_step.lower(backend.flat, backend.cache_keys, backend.cache_values,
                                          np.array([0, 0], dtype=np.int32)).as_text()
    assert "f32" in sampling and "f64" not in sampling
    # and the float64 step is float64
    text64 = backends["float64"].lowered_train_step_text(step_batch(tiny_spec, 0),
                                                         adam_step(tiny_spec.config, 0))
    assert "f64" in text64


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


@pytest.mark.parametrize("spec_name, step", [("tiny_spec", 0), ("tiny_spec", 7),
                                             ("small_spec", 3), ("two_layer_batched_spec", 1)])
def test_gradients_match_numpy(spec_name, step, request, fresh):
    spec = request.getfixturevalue(spec_name)
    batch = step_batch(spec, step)
    backend = fresh("float64") if spec_name == "tiny_spec" else make_backend("jax", spec,
                                                                              "float64")
    loss, grads = backend.loss_and_gradients(batch)
    expected_loss, expected = make_backend("numpy", spec, "float64").loss_and_gradients(batch)
    assert loss == pytest.approx(expected_loss, abs=1e-12)
    assert set(grads) == set(expected)
    for name in expected:
        np.testing.assert_allclose(grads[name], expected[name], atol=1e-12, rtol=0,
                                   err_msg=name)
    assert max(np.abs(g).max() for g in expected.values()) > 1e-2  # non-trivial gradients


def test_two_layers_with_batches_match_numpy(two_layer_batched_spec):
    spec = two_layer_batched_spec
    batches = prepare_batches(spec, 50)
    assert any(len(set(batch.lengths.tolist())) > 1 for batch in batches)  # padding is used
    backend = make_backend("jax", spec, "float64")
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
    assert backend.sampling_trace_count == 1  # one compilation for every position


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
    assert backend.trace_count == 1
    assert backend._train_step._cache_size() == 1  # one compiled executable


def test_prepare_leaves_the_state_alone(fresh, tiny_spec):
    backend = fresh("float64")
    train_losses(backend, tiny_spec, 3)  # non-zero moments
    before = [np.asarray(buffer).copy() for buffer in
              (backend.flat, backend.moment1, backend.moment2)]
    assert before[1].any() and before[2].any()
    durations = backend.prepare()
    assert set(durations) == {"compile_train_step", "compile_next_logits"}
    assert all(seconds >= 0 for seconds in durations.values())
    after = [np.asarray(buffer) for buffer in (backend.flat, backend.moment1, backend.moment2)]
    for old, new in zip(before, after):
        np.testing.assert_array_equal(old, new)
    assert backend.trace_count == 1


def test_load_parameters_resets_the_optimizer(fresh, tiny_spec):
    backend = fresh("float64")
    first = train_losses(backend, tiny_spec, 5)
    backend.load_parameters(tiny_spec.parameters)
    np.testing.assert_array_equal(train_losses(backend, tiny_spec, 5), first)


# ---- devices, dtypes, details -----------------------------------------------------------------
def test_defaults_and_details(backends):
    assert JaxBackend.default_dtype == "float32"
    assert JaxBackend.name == "jax" and JaxBackend.requires == ("jax",)
    backend = backends["float32"]
    expected = "gpu" if jax_backend._jax_devices("gpu") else "cpu"
    assert backend.device == expected
    details = backend.details()
    assert details["x64_enabled"] is True and details["device"] == expected
    assert details["inline_cpu_dispatch"] is True  # nothing used JAX before the import


@pytest.mark.parametrize("device", ["gpu", "cuda"])
def test_asking_for_a_missing_gpu_is_unavailable(device, tiny_spec):
    if jax_backend._jax_devices("gpu"):
        pytest.skip("this machine has a GPU")
    with pytest.raises(BackendUnavailable, match="gpu"):
        make_backend("jax", tiny_spec, "float32", device)


@pytest.mark.parametrize("device", ["tpu", "mps", "not-a-device"])
def test_unknown_devices_are_unavailable(device, tiny_spec):
    with pytest.raises(BackendUnavailable, match="no device"):
        make_backend("jax", tiny_spec, "float32", device)


def test_explicit_cpu(tiny_spec):
    backend = make_backend("jax", tiny_spec, "float64", "cpu")
    assert backend.device == "cpu" and backend.flat.dtype == np.float64
    assert backend.jax_device.platform == "cpu"
