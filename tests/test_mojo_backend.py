"""The mojo and mojo-tape backends against the numpy float64 reference: losses at every one of
the 1,000 steps, parameters, gradients, other sizes, batches, sampling logits; the compiled tape
has the python backend's graph; the build's caching and error reporting.

Skipped when the mojo package is not installed. Each Mojo extension is compiled once per
machine and source (cached in backends/mojo/__mojocache__; about 17 s of CPU each, so 35-110 s
of wall time for both on a cold cache on 2 busy cores) and loaded once per process; with the
cache warm this file takes about 7 s.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("mojo") is None:
    pytest.skip("mojo is not installed", allow_module_level=True)

from backends import mojo_backend  # noqa: E402  (after the skip)
from backends.contract import BackendUnavailable, TokenBatch  # noqa: E402
from backends.contract import adam_step, preset  # noqa: E402
from bench.parity import LOSS_TOLERANCE  # noqa: E402
from backends.contract import build_spec  # noqa: E402
from bench.training import sample  # noqa: E402
from tests.helpers import (  # noqa: E402
    make_backend, max_parameter_difference, step_batch, train_losses)

REPO_ROOT = Path(__file__).resolve().parents[1]
MOJO_BACKENDS = ["mojo", "mojo-tape"]


@pytest.fixture(scope="module")
def numpy_reference(tiny_spec):
    """numpy float64 over the spec's 1,000 steps: losses and final parameters."""
    backend = make_backend("numpy", tiny_spec, "float64")
    losses = train_losses(backend, tiny_spec, tiny_spec.config.num_steps)
    return losses, backend.parameters()


@pytest.fixture(scope="module")
def trained(tiny_spec):
    """Each Mojo backend in float64 after the spec's 1,000 steps (one build each, shared)."""
    runs = {}
    for name in MOJO_BACKENDS:
        backend = make_backend(name, tiny_spec, "float64")
        backend.prepare()
        runs[name] = backend, train_losses(backend, tiny_spec, tiny_spec.config.num_steps)
    return runs


@pytest.mark.parametrize("name", MOJO_BACKENDS)
def test_float64_matches_numpy_at_every_step(name, trained, numpy_reference):
    backend, losses = trained[name]
    reference_losses, reference_parameters = numpy_reference
    assert len(losses) == 1000
    assert np.abs(losses - reference_losses).max() < LOSS_TOLERANCE["float64"]
    differences = max_parameter_difference(backend.parameters(), reference_parameters)
    assert max(differences.values()) < 1e-9, differences


@pytest.mark.parametrize("name", MOJO_BACKENDS)
def test_float32_is_within_tolerance(name, tiny_spec, numpy_reference):
    steps = 1000 if name == "mojo" else 200
    losses = train_losses(make_backend(name, tiny_spec, "float32"), tiny_spec, steps)
    difference = np.abs(losses - numpy_reference[0][:steps]).max()
    assert 0 < difference < LOSS_TOLERANCE["float32"]  # differs (really float32), but slightly


@pytest.mark.parametrize("name", MOJO_BACKENDS)
@pytest.mark.parametrize("spec_name, step", [("tiny_spec", 0), ("tiny_spec", 7),
                                             ("small_spec", 3)])
def test_gradients_match_numpy(name, spec_name, step, request):
    spec = request.getfixturevalue(spec_name)
    batch = step_batch(spec, step)
    loss, grads = make_backend(name, spec, "float64").loss_and_gradients(batch)
    expected_loss, expected = make_backend("numpy", spec, "float64").loss_and_gradients(batch)
    assert loss == pytest.approx(expected_loss, abs=1e-12)
    assert grads.keys() == expected.keys()
    for parameter in expected:
        np.testing.assert_allclose(grads[parameter], expected[parameter], rtol=0, atol=1e-12,
                                   err_msg=parameter)


@pytest.mark.parametrize("name", MOJO_BACKENDS)
def test_two_layers_match_numpy(name, small_spec):
    backend = make_backend(name, small_spec, "float64")
    reference = make_backend("numpy", small_spec, "float64")
    losses = train_losses(backend, small_spec, 100)
    assert np.abs(losses - train_losses(reference, small_spec, 100)).max() < 1e-9
    differences = max_parameter_difference(backend.parameters(), reference.parameters())
    assert max(differences.values()) < 1e-9, differences


def test_batches_match_numpy(dataset):
    spec = build_spec(dataset.docs, preset("tiny", batch_size=3))
    batch = step_batch(spec, 1)
    assert len(set(batch.lengths.tolist())) > 1  # rows of different lengths
    backend = make_backend("mojo", spec, "float64")
    reference = make_backend("numpy", spec, "float64")
    loss, grads = backend.loss_and_gradients(batch)
    expected_loss, expected = reference.loss_and_gradients(batch)
    assert loss == pytest.approx(expected_loss, abs=1e-12)
    for parameter in expected:
        np.testing.assert_allclose(grads[parameter], expected[parameter], atol=1e-12)
    losses = train_losses(backend, spec, 50)
    assert np.abs(losses - train_losses(reference, spec, 50)).max() < 1e-9


def test_the_tape_rejects_batches(dataset):
    spec = build_spec(dataset.docs, preset("tiny", batch_size=2))
    with pytest.raises(BackendUnavailable, match="batch_size"):
        make_backend("mojo-tape", spec, "float64")


@pytest.mark.parametrize("name", MOJO_BACKENDS)
def test_sampling_matches_numpy(name, tiny_spec):
    backend = make_backend(name, tiny_spec, "float64")
    reference = make_backend("numpy", tiny_spec, "float64")
    train_losses(backend, tiny_spec, 20)  # trained weights (equal to ~1e-13): logits of some
    train_losses(reference, tiny_spec, 20)  # spread
    tokens = [26, 4, 12, 12, 0, 13, 4, 11, 11, 0, 1, 2, 3, 4, 5, 6]  # all 16 positions
    for model in (backend, reference):
        model.reset_cache()
    for position, token in enumerate(tokens):
        logits = backend.next_logits(token, position)
        assert logits.dtype == np.float64 and logits.shape == (tiny_spec.tokenizer.vocab_size,)
        np.testing.assert_allclose(logits, reference.next_logits(token, position), rtol=0,
                                   atol=1e-10, err_msg=f"position {position}")
    assert sample(backend, tiny_spec).samples == sample(reference, tiny_spec).samples


def test_the_compiled_tape_has_the_python_backends_graph(tiny_spec):
    """Same nodes and edges as backends/python_tape.py: only compilation differs."""
    batch = step_batch(tiny_spec, 0)
    python = make_backend("python", tiny_spec, "float64")
    python.train_step(batch, adam_step(tiny_spec.config, 0))
    python_nodes = len(python.tape.values)  # the step's graph stays until the next step
    python_edges = sum(len(children) for children in python.tape.children)
    tape = make_backend("mojo-tape", tiny_spec, "float64")
    assert tape.tape_size(batch.sequences[0]) == (python_nodes, python_edges)


@pytest.mark.parametrize("name", MOJO_BACKENDS)
def test_load_parameters_resets_the_optimizer(name, tiny_spec):
    backend = make_backend(name, tiny_spec, "float64")
    first = train_losses(backend, tiny_spec, 5)
    backend.load_parameters(tiny_spec.parameters)
    np.testing.assert_array_equal(train_losses(backend, tiny_spec, 5), first)


@pytest.mark.parametrize("name", MOJO_BACKENDS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_parameters_round_trip(name, dtype, tiny_spec):
    backend = make_backend(name, tiny_spec, dtype)  # not prepared: loaded when built
    expected = {key: value.astype(dtype).astype(np.float64)
                for key, value in tiny_spec.parameters.items()}
    assert max(max_parameter_difference(backend.parameters(), expected).values()) == 0


@pytest.mark.parametrize("name", MOJO_BACKENDS)
def test_bad_input_raises_instead_of_reading_out_of_bounds(name, tiny_spec):
    backend = make_backend(name, tiny_spec, "float64")
    adam = adam_step(tiny_spec.config, 0)
    vocab, block = tiny_spec.tokenizer.vocab_size, tiny_spec.config.block_size
    with pytest.raises(Exception, match="outside"):
        backend.train_step(TokenBatch.from_sequences([[26, vocab, 26]], block, 26), adam)
    with pytest.raises(Exception, match="Python ints"):
        backend.train_step(TokenBatch(sequences=[[26, "a", 26]], padded=None, lengths=None), adam)
    too_long = [0] * (block + 2)
    with pytest.raises(Exception, match="block_size"):
        backend.train_step(TokenBatch(sequences=[too_long], padded=None, lengths=None), adam)
    backend.reset_cache()
    with pytest.raises(Exception, match="cache length"):
        backend.next_logits(26, 1)  # position 0 first
    # Nothing was changed by the refused calls.
    differences = max_parameter_difference(backend.parameters(), tiny_spec.parameters)
    assert max(differences.values()) == 0


@pytest.mark.parametrize("name", MOJO_BACKENDS)
def test_prepare_reports_the_build_and_the_call_overhead(name, tiny_spec):
    backend = make_backend(name, tiny_spec, "float64")
    durations = backend.prepare()
    assert set(durations) == {"mojo_build_s"} and durations["mojo_build_s"] >= 0
    details = backend.details()
    assert isinstance(details["mojo_build_cache_hit"], bool)
    assert details["mojo_extension"].endswith(".so")
    assert 0 < details["mojo_noop_function_call_ns"] < 1e5
    if name == "mojo":
        assert 0 < details["train_step_call_overhead_ns"] < 1e5
    else:
        assert details["tape_nodes_full_block"] > tiny_spec.config.num_parameters(27)


def test_unavailable_without_the_mojo_package(tiny_spec, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "mojo" else real_find_spec(name))
    for backend_class in (mojo_backend.MojoBackend, mojo_backend.MojoTapeBackend):
        availability = backend_class.availability()
        assert not availability.available and "mojo" in availability.reason
        assert availability.install_hint == 'python -m pip install ".[mojo]" -c constraints.txt'
        with pytest.raises(BackendUnavailable, match="mojo"):
            backend_class(tiny_spec.config, tiny_spec.tokenizer.vocab_size, "float64")


def test_a_compiler_error_is_reported(tmp_path, tiny_spec):
    source = tmp_path / "broken_module.mojo"
    source.write_text("def broken() -> Int:\n    return undefined_name\n")

    class BrokenBackend(mojo_backend.MojoBackend):
        extension = "broken_module"
        source_dir = tmp_path

    assert BrokenBackend.availability().available  # nothing compiled yet, nothing known
    backend = BrokenBackend(tiny_spec.config, tiny_spec.tokenizer.vocab_size, "float64")
    with pytest.raises(BackendUnavailable, match="undefined_name"):
        backend.prepare()
    availability = BrokenBackend.availability()  # now known without compiling again
    assert not availability.available
    assert "failed to build broken_module.mojo" in availability.reason
    assert "undefined_name" in availability.reason
    source.write_text("def fixed() -> Int:\n    return 1\n")  # a new source: worth a try
    assert BrokenBackend.availability().available


def test_runs_from_another_working_directory(tmp_path, numpy_reference):
    script = (
        "import json\n"
        "from backends.mojo_backend import MojoBackend\n"
        "from backends.contract import preset\n"
        "from backends.contract import build_spec\n"
        "from bench.training import train\n"
        "from data.dataset import load_dataset\n"
        "spec = build_spec(load_dataset().docs, preset('tiny'))\n"
        "backend = MojoBackend(spec.config, spec.tokenizer.vocab_size, 'float64')\n"
        "backend.load_parameters(spec.parameters)\n"
        "durations = backend.prepare()\n"
        "print(json.dumps({'losses': train(backend, spec, 3).losses, **durations}))\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=environment,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert np.abs(np.array(result["losses"]) - numpy_reference[0][:3]).max() < 1e-9
    assert not list(tmp_path.iterdir())  # nothing written where it was run from

