"""What is specific to the torch and torch-compile backends (the shared checks against numpy are
in tests/test_conformance.py): eager torch's host-built step inputs and its fused Adam call
against the spec's formula; torch-compile's one graph through Dynamo's guards and its refusal of
other shapes; devices, threads and the C++ compiler torch.compile needs.

Skipped when torch is not installed. Compiled steps are shared with the conformance tests
through the session's backend pool.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import backends  # noqa: E402  (after the skip)
from backends import availability, devices, torch_tuned  # noqa: E402
from backends.contract import BackendUnavailable, TokenBatch, adam_step  # noqa: E402
from tests.helpers import every_length, make_backend  # noqa: E402

needs_compiler = pytest.mark.skipif(not availability("torch-compile-tuned").available,
                                    reason=availability("torch-compile-tuned").reason)
DTYPES = ["float32", "float64"]


def test_step_inputs_of_padded_rows(batched_spec):
    """The eager step's host-built inputs: the one-hot selector picks wte[token] + wpe[position]
    for every column, and only real positions carry a target and a weight (1 / count each)."""
    spec = batched_spec
    batch = next(batch for batch in map(spec.step_batch, range(50))
                 if len(set(batch.lengths.tolist())) > 1)  # rows of different lengths
    backend = make_backend("torch-tuned", spec, "float64")
    inputs = backend._stage(batch)
    B, T, V = len(batch.lengths), int(batch.lengths.max()), spec.tokenizer.vocab_size
    assert inputs.batch_rows == B and inputs.selector.shape == (V + spec.config.block_size, B * T)
    embed = backend.weights["embed"].numpy()  # wte rows, then wpe rows
    expected = np.concatenate([embed[batch.padded[b, :T]] + embed[V: V + T] for b in range(B)])
    np.testing.assert_array_equal((inputs.selector.T @ backend.weights["embed"]).numpy(),
                                  expected)
    real = batch.position_mask[:, :T].reshape(-1).astype(bool)
    count = real.sum()
    assert 0 < count < B * T  # some columns are padding
    np.testing.assert_allclose(inputs.weights.numpy()[0], real / count, rtol=0, atol=0)
    targets = inputs.targets.numpy()
    assert (targets[:, ~real] == 0).all()
    columns = np.flatnonzero(real)
    np.testing.assert_array_equal(targets[batch.padded[:, 1: T + 1].reshape(-1)[real], columns],
                                  -1 / count)
    assert np.count_nonzero(targets) == count


@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_is_the_specs_update(dtype, tiny_spec):
    """torch's fused Adam kernel, called with the step count s + 1, is the spec's update."""
    backend = make_backend("torch-tuned", tiny_spec, dtype)
    generator = torch.Generator().manual_seed(0)
    size = backend.flat.numel()
    random = lambda: torch.randn(size, generator=generator, dtype=torch.float64)  # noqa: E731
    state = {"flat": random(), "flat_grad": random(), "adam_m": 0.1 * random(),
             "adam_v": 0.1 * random().abs()}
    for name, value in state.items():
        getattr(backend, name).copy_(value)
    config = tiny_spec.config
    adam = adam_step(config, 6)
    backend._adam_update(adam)
    p, g, m, v = (value.numpy() for value in state.values())
    m = config.beta1 * m + (1 - config.beta1) * g
    v = config.beta2 * v + (1 - config.beta2) * g * g
    p = p - adam.learning_rate * (m / adam.bias_correction1) / (
        np.sqrt(v / adam.bias_correction2) + config.eps)
    tolerance = 1e-6 if dtype == "float32" else 1e-14
    for name, expected in (("adam_m", m), ("adam_v", v), ("flat", p)):
        np.testing.assert_allclose(getattr(backend, name).double().numpy(), expected,
                                   atol=tolerance, rtol=0, err_msg=name)
    # and the update moved the parameters by about the learning rate
    assert np.abs(p - state["flat"].numpy()).max() > 1e-3


@needs_compiler
def test_varying_lengths_do_not_recompile(pool, tiny_spec):
    from torch._dynamo.utils import counters
    backend = pool.get("torch-compile-tuned", "float32", tiny_spec)
    assert backend.graphs_compiled <= 1  # in prepare (0 when the code was already compiled)
    graphs_before = counters["stats"]["unique_graphs"]
    # Through Dynamo (the path on CUDA and MPS): one graph serves every length; a recompile
    # would raise inside this stance.
    with torch.compiler.set_stance("fail_on_recompile"):
        for step, batch in enumerate(every_length(tiny_spec)):
            backend._step_scalars_numpy[:] = [0.01, 0.5, 0.5]
            loss = backend.compiled.guarded(
                backend.flat, backend.adam_m, backend.adam_v, torch.from_numpy(batch.padded),
                torch.from_numpy(batch.lengths), backend.step_scalars, backend.causal_mask)
            assert np.isfinite(loss.item())
    # The backend's own path on the CPU calls that graph directly.
    assert backend.details()["calls"].startswith("compiled graph called directly")
    for step, batch in enumerate(every_length(tiny_spec)):
        assert np.isfinite(backend.train_step(batch, adam_step(tiny_spec.config, step)))
    assert counters["stats"]["unique_graphs"] == graphs_before
    assert backend.details()["graphs_compiled"] <= 1


@needs_compiler
def test_the_compiled_step_refuses_other_shapes(pool, tiny_spec):
    backend = pool.get("torch-compile-tuned", "float32", tiny_spec)
    block, bos = tiny_spec.config.block_size, tiny_spec.tokenizer.bos
    two_rows = TokenBatch.from_sequences([[bos, 1, bos]] * 2, block, bos)  # B = 2, compiled for 1
    with pytest.raises(ValueError, match="compiled for"):
        backend.train_step(two_rows, adam_step(tiny_spec.config, 0))


def test_default_device_is_the_best_available(tiny_spec):
    backend = make_backend("torch-tuned", tiny_spec, "float32")
    expected = ("cuda" if torch.cuda.is_available()
                else "mps" if devices.mps_available() else "cpu")
    assert backend.device == expected


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "gpu"])
def test_asking_for_a_missing_gpu_is_unavailable(device, tiny_spec):
    if torch.cuda.is_available() or devices.mps_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(BackendUnavailable, match="not available"):
        make_backend("torch-tuned", tiny_spec, "float32", device)


def test_asking_for_missing_mps_is_unavailable(tiny_spec):
    if devices.mps_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(BackendUnavailable, match="mps"):
        make_backend("torch-compile-tuned", tiny_spec, "float32", "mps")


def test_a_cuda_index_beyond_the_devices_is_unavailable(tiny_spec):
    with pytest.raises(BackendUnavailable, match="not available"):
        make_backend("torch-tuned", tiny_spec, "float32", f"cuda:{torch.cuda.device_count() + 3}")


def test_mps_has_no_float64(tiny_spec, monkeypatch):
    monkeypatch.setattr(devices, "mps_available", lambda: True)
    with pytest.raises(BackendUnavailable, match="float64"):
        make_backend("torch-tuned", tiny_spec, "float64", "mps")


def test_torch_compile_without_a_cpp_compiler_is_unavailable(monkeypatch):
    monkeypatch.setattr(backends.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    found = availability("torch-compile-tuned")
    assert not found.available and "C++ compiler" in found.reason
    assert availability("torch-tuned").available  # eager torch needs none


@needs_compiler
def test_explicit_cpu_and_details(tiny_spec):
    backend = make_backend("torch-compile-tuned", tiny_spec, "float64", "cpu")
    assert backend.device == "cpu" and backend.flat.dtype == torch.float64
    details = backend.details()
    assert details["threads"] == torch.get_num_threads()
    if details["threads_from"].startswith("backend default"):
        assert details["threads"] == torch_tuned.TorchTunedBackend.cpu_threads
    assert details["compile"]["fullgraph"] is True
