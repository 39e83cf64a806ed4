"""The torch and torch-compile backends against the numpy reference: float64 losses and
parameters at every one of the 1,000 steps, float32 within its tolerance, parameters after a few
steps, gradients (eager torch's hand-written backward pass), its host-built step inputs and its
fused Adam call against the spec's formula, two layers with batches, sampling logits;
torch-compile compiles once whatever the sequence lengths; device, dtype and compiler errors.

Skipped when torch is not installed. torch.compile compiles three graphs per session (tiny
float32, tiny float64, a two-layer batched config); the backend module shares each compiled step
between backends of the same config, and the module-scoped fixtures share the backends. On the
(busy) 2-core CI machine the file takes ~80 s with a cold Inductor cache (/tmp/torchinductor_*)
and ~22 s with a warm one.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from backends import torch_backend  # noqa: E402  (after the skip)
from backends.contract import BackendUnavailable, TokenBatch  # noqa: E402
from backends.torch_backend import TorchBackend, TorchCompileBackend  # noqa: E402
from backends.contract import adam_step, preset  # noqa: E402
from bench.parity import LOSS_TOLERANCE  # noqa: E402
from backends.contract import build_spec  # noqa: E402
from bench.training import prepare_batches, sample  # noqa: E402
from tests.helpers import (  # noqa: E402
    make_backend, max_parameter_difference, step_batch, train_losses)

# Inductor imports torch.utils.mkldnn, which uses the deprecated torch.jit.script_method
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")

# torch-compile also needs a C++ compiler for Inductor; without one its tests skip
COMPILE_AVAILABILITY = TorchCompileBackend.availability()
needs_compiler = pytest.mark.skipif(not COMPILE_AVAILABILITY.available,
                                    reason=COMPILE_AVAILABILITY.reason)
AVAILABLE_BACKENDS = ["torch"] + (["torch-compile"] if COMPILE_AVAILABILITY.available else [])
BACKENDS = ["torch", pytest.param("torch-compile", marks=needs_compiler)]
DTYPES = ["float32", "float64"]
# Largest parameter difference to numpy at the same dtype after a few steps: rounding only.
# (A wrong gradient moves a parameter by about the learning rate, 1e-2, in one step.)
PARAMETER_TOLERANCE = {"float32": 1e-5, "float64": 1e-12}


@pytest.fixture(scope="module")
def backends(tiny_spec):
    """One prepared backend per (name, dtype): torch-compile compiles twice here.
    Tests that train reload the spec's parameters first (which also zeroes Adam's moments)."""
    built = {}
    for name in AVAILABLE_BACKENDS:
        for dtype in DTYPES:
            backend = make_backend(name, tiny_spec, dtype)
            backend.prepare()
            built[name, dtype] = backend
    return built


@pytest.fixture
def fresh(backends, tiny_spec):
    def get(name, dtype):
        backend = backends[name, dtype]
        backend.load_parameters(tiny_spec.parameters)
        return backend
    return get


@pytest.fixture(scope="module")
def two_layer_batched_spec(dataset):
    """Two layers, other widths, three documents per step: rows of different lengths."""
    return build_spec(dataset.docs, preset("tiny", n_layer=2, n_embd=8, n_head=2, block_size=8,
                                           batch_size=3))


# ---- parity ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKENDS)
def test_float64_matches_numpy_at_every_step(name, fresh, tiny_spec, numpy_runs):
    backend = fresh(name, "float64")
    losses = train_losses(backend, tiny_spec, 1000)
    reference_losses, reference_parameters = numpy_runs["float64"]
    assert len(losses) == 1000
    assert np.abs(losses - reference_losses).max() < LOSS_TOLERANCE["float64"]
    differences = max_parameter_difference(backend.parameters(), reference_parameters)
    assert max(differences.values()) < 1e-9, differences


@pytest.mark.parametrize("name", BACKENDS)
def test_float32_matches_numpy_float32_at_every_step(name, fresh, tiny_spec, numpy_runs):
    backend = fresh(name, "float32")
    assert backend.flat.dtype == torch.float32
    losses = train_losses(backend, tiny_spec, 1000)
    assert np.abs(losses - numpy_runs["float32"][0]).max() < LOSS_TOLERANCE["float32"]
    # really float32: it differs from the float64 run, slightly
    assert 0 < np.abs(losses - numpy_runs["float64"][0]).max() < LOSS_TOLERANCE["float32"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", BACKENDS)
def test_parameters_after_a_few_steps_match_numpy(name, dtype, fresh, tiny_spec):
    backend = fresh(name, dtype)
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
def test_gradients_match_numpy(spec_name, step, request):
    spec = request.getfixturevalue(spec_name)
    batch = step_batch(spec, step)
    backend = make_backend("torch", spec, "float64")
    loss, grads = backend.loss_and_gradients(batch)
    expected_loss, expected = make_backend("numpy", spec, "float64").loss_and_gradients(batch)
    assert loss == pytest.approx(expected_loss, abs=1e-12)
    assert set(grads) == set(expected)
    for name in expected:
        np.testing.assert_allclose(grads[name], expected[name], atol=1e-12, rtol=0,
                                   err_msg=name)
    assert max(np.abs(g).max() for g in expected.values()) > 1e-2  # non-trivial gradients


def test_step_inputs_of_padded_rows(two_layer_batched_spec):
    """The eager step's host-built inputs: the one-hot selector picks wte[token] + wpe[position]
    for every column, and only real positions carry a target and a weight (1 / count each)."""
    spec = two_layer_batched_spec
    batch = next(batch for batch in prepare_batches(spec, 50)
                 if len(set(batch.lengths.tolist())) > 1)  # rows of different lengths
    backend = make_backend("torch", spec, "float64")
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
    backend = make_backend("torch", tiny_spec, dtype)
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


@pytest.mark.parametrize("name", BACKENDS)
def test_two_layers_with_batches_match_numpy(name, two_layer_batched_spec):
    spec = two_layer_batched_spec
    batches = prepare_batches(spec, 50)
    assert any(len(set(batch.lengths.tolist())) > 1 for batch in batches)  # padding is used
    backend = make_backend(name, spec, "float64")
    backend.prepare()
    losses = train_losses(backend, spec, 50)
    reference = make_backend("numpy", spec, "float64")
    assert np.abs(losses - train_losses(reference, spec, 50)).max() < LOSS_TOLERANCE["float64"]
    differences = max_parameter_difference(backend.parameters(), reference.parameters())
    assert max(differences.values()) < 1e-10, differences


# ---- sampling ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", BACKENDS)
def test_sampling_logits_match_numpy_after_training(name, dtype, fresh, tiny_spec):
    backend = fresh(name, dtype)
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


def test_float64_samples_are_numpys(fresh, tiny_spec):
    backend = fresh("torch", "float64")
    reference = make_backend("numpy", tiny_spec, "float64")
    train_losses(backend, tiny_spec, 100)
    train_losses(reference, tiny_spec, 100)
    samples = sample(backend, tiny_spec).samples
    assert samples == sample(reference, tiny_spec).samples
    assert len(samples) == tiny_spec.config.num_samples and any(samples)


# ---- compilation -------------------------------------------------------------------------------
def every_length(spec):
    """One single-row batch per length 1 .. block_size: [BOS] + n - 1 characters (+ BOS)."""
    block, bos = spec.config.block_size, spec.tokenizer.bos
    batches = [TokenBatch.from_sequences([([bos] + [n % 26] * (n - 1) + [bos])[: block + 1]],
                                         block, bos) for n in range(1, block + 1)]
    assert sorted(int(batch.lengths[0]) for batch in batches) == list(range(1, block + 1))
    return batches


@needs_compiler
def test_varying_lengths_do_not_recompile(fresh, tiny_spec):
    from torch._dynamo.utils import counters
    backend = fresh("torch-compile", "float32")
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
def test_the_compiled_step_refuses_other_shapes(fresh, tiny_spec):
    backend = fresh("torch-compile", "float32")
    block, bos = tiny_spec.config.block_size, tiny_spec.tokenizer.bos
    two_rows = TokenBatch.from_sequences([[bos, 1, bos]] * 2, block, bos)  # B = 2, compiled for 1
    with pytest.raises(ValueError, match="compiled for"):
        backend.train_step(two_rows, adam_step(tiny_spec.config, 0))


def test_prepare_leaves_the_parameters_alone(tiny_spec):
    for name in AVAILABLE_BACKENDS:
        backend = make_backend(name, tiny_spec, "float64")
        backend.prepare()  # compiled already by the module fixture: the cached graph is reused
        differences = max_parameter_difference(backend.parameters(), tiny_spec.parameters)
        assert max(differences.values()) == 0, (name, differences)
        assert not backend.adam_m.any() and not backend.adam_v.any()


def test_load_parameters_resets_the_optimizer(fresh, tiny_spec):
    for name in AVAILABLE_BACKENDS:
        backend = fresh(name, "float64")
        first = train_losses(backend, tiny_spec, 5)
        backend.load_parameters(tiny_spec.parameters)
        np.testing.assert_array_equal(train_losses(backend, tiny_spec, 5), first)


# ---- devices, dtypes, details -----------------------------------------------------------------
def test_default_device_is_the_best_available(tiny_spec):
    backend = make_backend("torch", tiny_spec, "float32")
    expected = ("cuda" if torch.cuda.is_available()
                else "mps" if torch_backend._mps_available() else "cpu")
    assert backend.device == expected
    assert TorchBackend.default_dtype == "float32"


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "gpu"])
def test_asking_for_a_missing_gpu_is_unavailable(device, tiny_spec):
    if torch.cuda.is_available() or torch_backend._mps_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(BackendUnavailable, match="not available"):
        make_backend("torch", tiny_spec, "float32", device)


def test_asking_for_missing_mps_is_unavailable(tiny_spec):
    if torch_backend._mps_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(BackendUnavailable, match="mps"):
        make_backend("torch-compile", tiny_spec, "float32", "mps")


def test_a_cuda_index_beyond_the_devices_is_unavailable(tiny_spec):
    with pytest.raises(BackendUnavailable, match="not available"):
        make_backend("torch", tiny_spec, "float32", f"cuda:{torch.cuda.device_count() + 3}")


@pytest.mark.parametrize("device", ["tpu", "not-a-device"])
def test_unknown_devices_are_unavailable(device, tiny_spec):
    with pytest.raises(BackendUnavailable):
        make_backend("torch", tiny_spec, "float32", device)


def test_mps_has_no_float64(tiny_spec, monkeypatch):
    monkeypatch.setattr(torch_backend, "_mps_available", lambda: True)
    with pytest.raises(BackendUnavailable, match="float64"):
        make_backend("torch", tiny_spec, "float64", "mps")


def test_torch_compile_without_a_cpp_compiler_is_unavailable(monkeypatch):
    monkeypatch.setattr(torch_backend.shutil, "which", lambda name: None)
    availability = TorchCompileBackend.availability()
    assert not availability.available and "C++ compiler" in availability.reason
    assert TorchBackend.availability().available  # eager torch needs none


@needs_compiler
def test_explicit_cpu_and_details(tiny_spec):
    backend = make_backend("torch-compile", tiny_spec, "float64", "cpu")
    assert backend.device == "cpu" and backend.flat.dtype == torch.float64
    details = backend.details()
    assert details["threads"] == torch.get_num_threads()
    if details["threads_from"].startswith("backend default"):
        assert details["threads"] == TorchBackend.cpu_threads
    assert details["compile"]["fullgraph"] is True
    assert TorchCompileBackend.name == "torch-compile" and TorchBackend.name == "torch"
