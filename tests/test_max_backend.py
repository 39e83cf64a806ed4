"""The MAX backends against the numpy float32 reference: losses over 60 steps and over every
step, parameters after a few steps, the gradients inside the compiled step (read through Adam's
first moment), two layers with batches and padding, sampling logits with the key/value cache,
one compiled graph for every sequence length; dtype and device errors; max-loop's K steps per
call.

Skipped when MAX is not installed. Graphs are compiled once per config and shared through
module-scoped fixtures: tiny (training + sampling graphs), a two-layer batched config (training
graph on the matmul path + sampling graph) and max-loop (its loop graph). Measured on 2 shared
cores: about 7 minutes with a cold MAX cache (tiny 150 s, two-layer 165 s, loop 110 s), about
30 s with a warm one (~/.cache/modular, or $MODULAR_CACHE_DIR).
"""
import numpy as np
import pytest

pytest.importorskip("max")

from backends import max_graphs  # noqa: E402  (after the skip)
from backends.contract import BackendUnavailable, TokenBatch  # noqa: E402
from backends.max_backend import MaxBackend, MaxLoopBackend  # noqa: E402
from backends.contract import adam_step, preset  # noqa: E402
from bench.parity import LOSS_TOLERANCE  # noqa: E402
from backends.contract import build_spec  # noqa: E402
from bench.training import prepare_batches  # noqa: E402
from tests.helpers import (  # noqa: E402
    make_backend, max_parameter_difference, step_batch, train_losses)

TOLERANCE = LOSS_TOLERANCE["float32"]
# Largest parameter difference to numpy float32 after a few steps: rounding only (a wrong
# gradient moves a parameter by about the learning rate, 1e-2, in one step).
PARAMETER_TOLERANCE = 1e-5
# A full block of tokens for the sampling graph: BOS, then characters.
SAMPLE_TOKENS = [26, 4, 12, 12, 0, 19, 8, 13, 0, 26, 1, 2, 3, 4, 5, 6]


@pytest.fixture(scope="module")
def compiled(tiny_spec):
    """The tiny config's backend with both graphs compiled once for the module, with what
    prepare() returned and the state it left. Tests reload the spec's parameters (which also
    zeroes Adam's moments) through `fresh`."""
    backend = make_backend("max", tiny_spec, "float32")
    durations = backend.prepare()
    after_prepare = backend.parameters(), *backend.adam_moments()
    return backend, durations, after_prepare


@pytest.fixture
def fresh(compiled, tiny_spec):
    backend = compiled[0]
    backend.load_parameters(tiny_spec.parameters)
    return backend


@pytest.fixture(scope="module")
def two_layer_batched_spec(dataset):
    """Two layers, other widths, three documents per step: rows of different lengths."""
    return build_spec(dataset.docs, preset("tiny", n_layer=2, n_embd=8, n_head=2, block_size=8,
                                           batch_size=3))


@pytest.fixture(scope="module")
def compiled_batched(two_layer_batched_spec):
    """Its training graph uses matmul kernels for every linear layer (the larger presets'
    path), so that the tests cover both formulations of the products; its sampling graph the
    default one."""
    backend = make_backend("max", two_layer_batched_spec, "float32")
    saved_limit = max_graphs.CONTRACT_MAX_ELEMENTS
    max_graphs.CONTRACT_MAX_ELEMENTS = 0
    try:
        backend._ensure_train_model()
    finally:
        max_graphs.CONTRACT_MAX_ELEMENTS = saved_limit
    backend.prepare()  # compiles what is left: the sampling graph
    return backend


def numpy_reference(spec):
    return make_backend("numpy", spec, "float32")


def first_step_gradients(backend, spec, batch):
    """The gradient the compiled step computed, from one step on freshly loaded parameters:
    Adam's first moment starts at zero, so afterwards m = (1 - beta1) * g exactly."""
    backend.load_parameters(spec.parameters)
    loss = backend.train_step(batch, adam_step(spec.config, 0))
    first_moment, _ = backend.adam_moments()
    scale = 1 - spec.config.beta1
    return loss, {name: value / scale for name, value in first_moment.items()}


def assert_gradients_match(gradients, expected):
    assert set(gradients) == set(expected)
    for name in expected:
        # float32 rounding only; relative to each gradient's size
        tolerance = 1e-6 + 1e-4 * np.abs(expected[name]).max()
        np.testing.assert_allclose(gradients[name], expected[name], atol=tolerance, rtol=0,
                                   err_msg=name)
    assert max(np.abs(g).max() for g in expected.values()) > 1e-2  # non-trivial gradients


# ---- compilation -------------------------------------------------------------------------------
def test_prepare_reports_both_compilations(compiled):
    backend, durations, _ = compiled
    assert set(durations) == {"compile_train_graph_s", "compile_infer_graph_s"}
    assert all(seconds > 0 for seconds in durations.values())
    details = backend.details()
    assert details["train_graph_kernels"] > 0 and details["infer_graph_kernels"] > 0


def test_prepare_leaves_the_parameters_alone(compiled, tiny_spec):
    parameters, first_moment, second_moment = compiled[2]
    differences = max_parameter_difference(parameters, tiny_spec.parameters)
    assert max(differences.values()) < 1e-7, differences  # float32 rounding of the spec's
    assert not any(value.any() for value in first_moment.values())
    assert not any(value.any() for value in second_moment.values())


def test_one_graph_serves_every_sequence_length(fresh, tiny_spec):
    block, bos = tiny_spec.config.block_size, tiny_spec.tokenizer.bos
    # every length from 1 to block_size: [BOS] + n - 1 characters (+ BOS when it fits)
    batches = [TokenBatch.from_sequences([([bos] + [n % 26] * (n - 1) + [bos])[: block + 1]],
                                         block, bos) for n in range(1, block + 1)]
    assert sorted(int(batch.lengths[0]) for batch in batches) == list(range(1, block + 1))
    model = fresh.train_model
    reference = numpy_reference(tiny_spec)
    for step, batch in enumerate(batches):
        adam = adam_step(tiny_spec.config, step)
        assert fresh.train_step(batch, adam) == pytest.approx(
            reference.train_step(batch, adam), abs=TOLERANCE)
    assert fresh.train_model is model  # nothing was recompiled


# ---- parity ------------------------------------------------------------------------------------
def test_losses_match_numpy_float32_over_60_steps(fresh, tiny_spec):
    losses = train_losses(fresh, tiny_spec, 60)
    reference = numpy_reference(tiny_spec)
    expected = train_losses(reference, tiny_spec, 60)
    assert len(losses) == 60
    assert np.abs(losses - expected).max() < TOLERANCE
    # the spec's public check points
    assert [f"{loss:.4f}" for loss in losses[:3]] == ["3.3660", "3.4243", "3.1778"]
    differences = max_parameter_difference(fresh.parameters(), reference.parameters())
    assert max(differences.values()) < PARAMETER_TOLERANCE, differences


@pytest.mark.slow
def test_losses_match_numpy_float32_at_every_step(fresh, tiny_spec):
    losses = train_losses(fresh, tiny_spec, 1000)
    expected = train_losses(numpy_reference(tiny_spec), tiny_spec, 1000)
    assert np.abs(losses - expected).max() < TOLERANCE


def test_parameters_after_a_few_steps_match_numpy(fresh, tiny_spec):
    reference = numpy_reference(tiny_spec)
    np.testing.assert_allclose(train_losses(fresh, tiny_spec, 5),
                               train_losses(reference, tiny_spec, 5), atol=TOLERANCE, rtol=0)
    differences = max_parameter_difference(fresh.parameters(), reference.parameters())
    assert set(differences) == set(tiny_spec.parameters)
    assert max(differences.values()) < PARAMETER_TOLERANCE, differences
    # and training moved them: the comparison is not between two copies of the start
    moved = max_parameter_difference(fresh.parameters(), tiny_spec.parameters)
    assert min(moved.values()) > 1e-3, moved


def test_adam_moments_match_numpy_after_a_few_steps(fresh, tiny_spec):
    reference = numpy_reference(tiny_spec)
    train_losses(fresh, tiny_spec, 5)
    train_losses(reference, tiny_spec, 5)
    first_moment, second_moment = fresh.adam_moments()
    # numpy keeps its moments in one flat buffer, parameters in draw order
    flat_first = np.concatenate([first_moment[name].ravel() for name in reference.params])
    flat_second = np.concatenate([second_moment[name].ravel() for name in reference.params])
    np.testing.assert_allclose(flat_first, reference.adam_m, atol=1e-7, rtol=0)
    np.testing.assert_allclose(flat_second, reference.adam_v, atol=1e-8, rtol=0)
    assert np.abs(reference.adam_v).max() > 1e-4  # non-trivial moments


@pytest.mark.parametrize("step", [0, 7, 12])
def test_gradients_match_numpy(step, compiled, tiny_spec):
    backend = compiled[0]
    batch = step_batch(tiny_spec, step)
    loss, gradients = first_step_gradients(backend, tiny_spec, batch)
    expected_loss, expected = numpy_reference(tiny_spec).loss_and_gradients(batch)
    assert loss == pytest.approx(expected_loss, abs=1e-6)
    assert_gradients_match(gradients, expected)


def test_gradients_match_numpy_with_batches_and_padding(compiled_batched,
                                                        two_layer_batched_spec):
    spec = two_layer_batched_spec
    batch = next(batch for batch in prepare_batches(spec, 20)
                 if len(set(batch.lengths.tolist())) > 1)  # rows of different lengths
    loss, gradients = first_step_gradients(compiled_batched, spec, batch)
    expected_loss, expected = numpy_reference(spec).loss_and_gradients(batch)
    assert loss == pytest.approx(expected_loss, abs=1e-6)
    assert_gradients_match(gradients, expected)


def test_two_layers_with_batches_match_numpy(compiled_batched, two_layer_batched_spec):
    spec = two_layer_batched_spec
    backend = compiled_batched
    backend.load_parameters(spec.parameters)
    assert any(len(set(batch.lengths.tolist())) > 1 for batch in prepare_batches(spec, 50))
    losses = train_losses(backend, spec, 50)
    reference = numpy_reference(spec)
    assert np.abs(losses - train_losses(reference, spec, 50)).max() < TOLERANCE
    differences = max_parameter_difference(backend.parameters(), reference.parameters())
    assert max(differences.values()) < PARAMETER_TOLERANCE, differences


# ---- sampling ----------------------------------------------------------------------------------
def test_sampling_logits_match_numpy_after_training(fresh, tiny_spec):
    reference = numpy_reference(tiny_spec)
    train_losses(fresh, tiny_spec, 20)
    train_losses(reference, tiny_spec, 20)
    for _ in range(2):  # a second pass: stale cache rows from the first must not leak in
        fresh.reset_cache()
        reference.reset_cache()
        for position, token in enumerate(SAMPLE_TOKENS):
            logits = fresh.next_logits(token, position)
            assert logits.dtype == np.float64
            assert logits.shape == (tiny_spec.tokenizer.vocab_size,)
            np.testing.assert_allclose(logits, reference.next_logits(token, position),
                                       atol=1e-5, rtol=0)


def test_sampling_uses_the_trained_parameters(fresh, tiny_spec):
    fresh.reset_cache()
    before = fresh.next_logits(26, 0)
    train_losses(fresh, tiny_spec, 3)
    fresh.reset_cache()
    assert np.abs(fresh.next_logits(26, 0) - before).max() > 1e-3


def test_two_layer_sampling_logits_match_numpy(compiled_batched, two_layer_batched_spec):
    spec = two_layer_batched_spec
    compiled_batched.load_parameters(spec.parameters)
    reference = numpy_reference(spec)
    compiled_batched.reset_cache()
    for position, token in enumerate(SAMPLE_TOKENS[: spec.config.block_size]):
        np.testing.assert_allclose(compiled_batched.next_logits(token, position),
                                   reference.next_logits(token, position), atol=1e-5, rtol=0)


# ---- dtypes, devices ---------------------------------------------------------------------------
def test_float32_only(tiny_spec):
    assert MaxBackend.supported_dtypes == ("float32",) and MaxBackend.default_dtype == "float32"
    with pytest.raises(BackendUnavailable, match="float64"):
        make_backend("max", tiny_spec, "float64")


@pytest.mark.parametrize("device", ["tpu", "mps", "not-a-device"])
def test_unknown_devices_are_unavailable(device, tiny_spec):
    with pytest.raises(BackendUnavailable):
        make_backend("max", tiny_spec, "float32", device)


def test_asking_for_a_missing_accelerator_is_unavailable(tiny_spec):
    from max.driver import accelerator_count
    if accelerator_count() > 0:
        pytest.skip("MAX sees an accelerator here")
    with pytest.raises(BackendUnavailable, match="no accelerator"):
        make_backend("max", tiny_spec, "float32", "gpu")
    assert make_backend("max", tiny_spec, "float32").device == "cpu"


# ---- max-loop ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_loop_backend_matches_numpy(tiny_spec):
    backend = make_backend("max-loop", tiny_spec, "float32")
    assert isinstance(backend, MaxLoopBackend)
    durations = backend.prepare()
    assert set(durations) == {"compile_train_loop_graph_s", "compile_infer_graph_s"}
    K = backend.steps_per_call
    steps = 2 * K + 3  # two full calls and a partial one
    batches = prepare_batches(tiny_spec, steps + 2)
    adams = [adam_step(tiny_spec.config, step) for step in range(steps + 2)]
    losses = backend.train_steps(batches[:steps], adams[:steps])
    # the one-step entry point continues from the same state
    losses += [backend.train_step(batches[step], adams[step]) for step in (steps, steps + 1)]
    reference = numpy_reference(tiny_spec)
    expected = train_losses(reference, tiny_spec, steps + 2)
    assert len(losses) == steps + 2
    assert np.abs(np.array(losses) - expected).max() < TOLERANCE
    differences = max_parameter_difference(backend.parameters(), reference.parameters())
    assert max(differences.values()) < PARAMETER_TOLERANCE, differences
