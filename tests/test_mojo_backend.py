"""What is specific to the mojo and mojo-tape backends (the shared checks against numpy are in
tests/test_conformance.py): the compiled tape has the python backend's graph; parameters loaded
before the build; bad input refused instead of read out of bounds; the build's caching, call
overhead and compiler-error reporting; running from another working directory.

Skipped when the mojo package is not installed. Each Mojo extension is compiled once per
machine and source (cached in backends/mojo/__mojocache__) and loaded once per process.
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

from backends import availability, mojo_backend  # noqa: E402  (after the skip)
from backends.contract import BackendUnavailable, TokenBatch, adam_step  # noqa: E402
from tests.helpers import make_backend, max_parameter_difference  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
MOJO_BACKENDS = ["mojo", "mojo-tape"]


def test_the_compiled_tape_has_the_python_backends_graph(tiny_spec):
    """Same nodes and edges as backends/python_tape.py: only compilation differs."""
    batch = tiny_spec.step_batch(0)
    python = make_backend("python", tiny_spec, "float64")
    python.train_step(batch, adam_step(tiny_spec.config, 0))
    python_nodes = len(python.tape.values)  # the step's graph stays until the next step
    python_edges = sum(len(children) for children in python.tape.children)
    tape = make_backend("mojo-tape", tiny_spec, "float64")
    assert tape.tape_size(batch.sequences[0]) == (python_nodes, python_edges)


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
    for name in MOJO_BACKENDS:
        found = availability(name)
        assert not found.available and "mojo" in found.reason
        assert found.install_hint == 'python -m pip install ".[mojo]" -c constraints.txt'
        with pytest.raises(BackendUnavailable, match="mojo"):
            make_backend(name, tiny_spec, "float64")


def test_a_compiler_error_is_reported(tmp_path, tiny_spec):
    source = tmp_path / "broken_module.mojo"
    source.write_text("def broken() -> Int:\n    return undefined_name\n")

    class BrokenBackend(mojo_backend.MojoBackend):
        extension = "broken_module"
        source_dir = tmp_path

    def construct():
        return BrokenBackend(tiny_spec.config, tiny_spec.tokenizer.vocab_size, "float64")

    backend = construct()  # nothing compiled yet, nothing known
    with pytest.raises(BackendUnavailable, match="undefined_name"):
        backend.prepare()
    with pytest.raises(BackendUnavailable) as refused:  # now known without compiling again
        construct()
    assert "failed to build broken_module.mojo" in str(refused.value)
    assert "undefined_name" in str(refused.value)
    source.write_text("def fixed() -> Int:\n    return 1\n")  # a new source: worth a try
    construct()


def test_runs_from_another_working_directory(tmp_path, numpy_runs):
    script = (
        "import json\n"
        "from backends import create_backend\n"
        "from backends.contract import build_spec, preset\n"
        "from bench.training import train\n"
        "from data.dataset import load_dataset\n"
        "spec = build_spec(load_dataset().docs, preset('tiny'))\n"
        "backend = create_backend('mojo', spec.config, spec.tokenizer.vocab_size, 'float64')\n"
        "backend.load_parameters(spec.parameters)\n"
        "durations = backend.prepare()\n"
        "print(json.dumps({'losses': train(backend, spec, 3).losses, **durations}))\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=environment,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert np.abs(np.array(result["losses"]) - numpy_runs["float64"][0][:3]).max() < 1e-9
    assert not list(tmp_path.iterdir())  # nothing written where it was run from
