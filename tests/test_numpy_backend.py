"""The numpy backend, the suite's float64 reference: finite-difference gradients for every
parameter tensor, parity with the pure-Python tape at every one of the 1,000 steps, padding that
changes nothing, and sampling logits against a full forward pass. (The checks every backend
shares are in tests/test_conformance.py.)"""
import numpy as np
import pytest

from backends import numpy_backend
from backends.contract import TokenBatch, build_spec, preset
from bench.parity import LOSS_TOLERANCE
from bench.training import sample
from tests.helpers import make_backend, max_parameter_difference, train_losses


def finite_difference_errors(backend, batch, entries_per_tensor=8, h=1e-6, seed=0):
    """Max |analytic - central difference| per tensor, over a few random entries each."""
    _, grads = backend.loss_and_gradients(batch)
    rng = np.random.default_rng(seed)
    errors = {}
    for name, param in backend.params.items():
        worst = 0.0
        flat_indices = rng.choice(param.size, size=min(entries_per_tensor, param.size),
                                  replace=False)
        if name == "wte":  # make sure rows that the batch uses are probed
            used = np.unique(batch.padded[:, :-1])
            flat_indices = np.concatenate([flat_indices, used * param.shape[1]])
        for flat_index in flat_indices:
            index = np.unravel_index(flat_index, param.shape)
            original = param[index]
            param[index] = original + h
            plus, _ = backend.loss_and_gradients(batch)
            param[index] = original - h
            minus, _ = backend.loss_and_gradients(batch)
            param[index] = original
            worst = max(worst, abs((plus - minus) / (2 * h) - grads[name][index]))
        errors[name] = worst
    return errors


@pytest.mark.parametrize("spec_name, step", [("tiny_spec", 0), ("tiny_spec", 5),
                                             ("small_spec", 3)])
def test_gradients_match_finite_differences(spec_name, step, request):
    spec = request.getfixturevalue(spec_name)
    backend = make_backend("numpy", spec, "float64")
    errors = finite_difference_errors(backend, spec.step_batch(step))
    assert set(errors) == set(spec.parameters)  # every parameter tensor is covered
    assert max(errors.values()) < 1e-7, errors


def test_batched_gradients_match_finite_differences(dataset):
    spec = build_spec(dataset.docs, preset("tiny", batch_size=3))
    backend = make_backend("numpy", spec, "float64")
    batch = spec.step_batch(1)
    assert len(set(batch.lengths.tolist())) > 1  # rows of different lengths: padding is used
    errors = finite_difference_errors(backend, batch)
    assert max(errors.values()) < 1e-7, errors


def test_the_gradient_check_catches_a_wrong_backward(tiny_spec, monkeypatch):
    # Drop the second term of the rmsnorm derivative: the check above must notice.
    monkeypatch.setattr(numpy_backend, "rmsnorm_backward", lambda x, scale, dy: scale * dy)
    backend = make_backend("numpy", tiny_spec, "float64")
    errors = finite_difference_errors(backend, tiny_spec.step_batch(0))
    assert max(errors.values()) > 1e-4


def test_float64_matches_the_python_tape_at_every_step(tiny_spec):
    steps = tiny_spec.config.num_steps
    python = make_backend("python", tiny_spec, "float64")
    numpy = make_backend("numpy", tiny_spec, "float64")
    python_losses = train_losses(python, tiny_spec, steps)
    numpy_losses = train_losses(numpy, tiny_spec, steps)
    assert len(numpy_losses) == steps == 1000
    assert np.abs(python_losses - numpy_losses).max() < LOSS_TOLERANCE["float64"]
    assert max(max_parameter_difference(python.parameters(), numpy.parameters()).values()) < 1e-9
    # Same weights, same generator stream: the same names.
    assert sample(python, tiny_spec).samples == sample(numpy, tiny_spec).samples


def test_float64_matches_the_python_tape_on_two_layers(small_spec):
    python_losses = train_losses(make_backend("python", small_spec, "float64"), small_spec, 40)
    numpy_losses = train_losses(make_backend("numpy", small_spec, "float64"), small_spec, 40)
    assert np.abs(python_losses - numpy_losses).max() < 1e-9


def test_batch_of_one_equals_the_unpadded_step(tiny_spec):
    """Padding a row to the block size must not change its loss (causal attention + mask)."""
    backend = make_backend("numpy", tiny_spec, "float64")
    batch = tiny_spec.step_batch(0)
    loss, grads = backend.loss_and_gradients(batch)
    # Force the padded, masked path with a second, identical row: the mean loss is unchanged.
    doubled = TokenBatch.from_sequences(batch.sequences * 2, tiny_spec.config.block_size,
                                        tiny_spec.tokenizer.bos)
    doubled_loss, doubled_grads = backend.loss_and_gradients(doubled)
    assert doubled_loss == pytest.approx(loss, abs=1e-14)
    for name in grads:
        np.testing.assert_allclose(doubled_grads[name], grads[name], atol=1e-14)


def test_sampling_logits_match_a_full_forward(tiny_spec):
    backend = make_backend("numpy", tiny_spec, "float64")
    tokens = [26, 4, 12, 12, 0]
    logits, _ = backend._forward(np.array([tokens]))
    backend.reset_cache()
    for position, token in enumerate(tokens):
        np.testing.assert_allclose(backend.next_logits(token, position), logits[0, position],
                                   atol=1e-13)
