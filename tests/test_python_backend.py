"""The pure-Python tape against the original algorithm (one object per scalar) and the spec's
public check points."""
import numpy as np
import pytest

from bench.training import sample, softmax_probabilities
from tests.helpers import make_backend, train_losses
from tests.original_algorithm import OriginalModel

ORIGINAL_STEPS = 4  # the one-object-per-scalar oracle takes ~0.25 s a step


def test_public_check_points(tiny_spec):
    losses = train_losses(make_backend("python", tiny_spec, "float64"), tiny_spec, 3)
    assert [f"{loss:.4f}" for loss in losses] == ["3.3660", "3.4243", "3.1778"]


@pytest.mark.parametrize("spec_name", ["tiny_spec", "small_spec"])
def test_matches_the_original_algorithm(spec_name, request):
    spec = request.getfixturevalue(spec_name)
    oracle = OriginalModel(spec.config, spec.parameters)
    expected = [oracle.train_step(spec.step_sequences(step)[0], step)
                for step in range(ORIGINAL_STEPS)]
    backend = make_backend("python", spec, "float64")
    losses = train_losses(backend, spec, ORIGINAL_STEPS)
    np.testing.assert_allclose(losses, expected, rtol=0, atol=1e-12)
    params = backend.parameters()
    for name, rows in oracle.state.items():
        np.testing.assert_allclose(params[name], [[v.data for v in row] for row in rows],
                                   rtol=0, atol=1e-12, err_msg=name)


def test_sampling_logits_match_the_original(tiny_spec):
    oracle = OriginalModel(tiny_spec.config, tiny_spec.parameters)
    backend = make_backend("python", tiny_spec, "float64")
    backend.reset_cache()
    keys, values = [[]], [[]]
    for position, token in enumerate([26, 4, 12, 12, 0]):
        expected = [v.data for v in oracle.forward(token, position, keys, values)]
        np.testing.assert_allclose(backend.next_logits(token, position), expected,
                                   rtol=0, atol=1e-13)


def test_samples_are_names_from_the_stream(tiny_spec):
    backend = make_backend("python", tiny_spec, "float64")
    first = sample(backend, tiny_spec, 5)
    again = sample(backend, tiny_spec, 5)
    assert first.samples == again.samples  # the stream restarts from the spec's state
    assert all(name.isalpha() and name.islower() for name in first.samples if name)
    assert first.tokens >= 5


def test_host_softmax_matches_the_original_order_of_operations():
    probs = softmax_probabilities([1.0, 2.0, 3.0], 0.5)
    scaled = [2.0, 4.0, 6.0]
    exps = [np.exp(s - 6.0) for s in scaled]
    assert probs == pytest.approx([e / sum(exps) for e in exps], rel=1e-15)
    assert sum(probs) == pytest.approx(1.0)
