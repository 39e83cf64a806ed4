"""Conformance: every registered backend, in every dtype it supports, computes the spec.

One table (CONFORMANCE) holds what differs between backends: how many steps are compared at
every step, and any tolerance that differs from the defaults. Everything else comes from the
backend's own declarations: its dtypes and batch support (the registry) and its optional
capabilities (the Backend interface). A new backend needs one row here.

The checks, each against numpy at the same dtype (numpy float64 is itself checked against the
pure-Python tape and the original algorithm, tests/test_numpy_backend.py):
- the losses at every step (and the spec's public check points), float32 really in float32;
- the parameters after a few steps; gradients where the backend exposes them;
- other sizes, with batches where supported (padding);
- sampling logits with the key/value cache, and the samples themselves in float64;
- reloading the parameters resets the optimizer; prepare() leaves the parameters alone;
- one compiled trace serves every sequence length (for backends that trace);
- unknown devices, unsupported dtypes and batches are refused with BackendUnavailable.
Backends are prepared once per session and shared (tests/conftest.py, `pool`).
"""
from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass, field

import numpy as np
import pytest

from backends import REGISTRY, BackendUnavailable, availability, backend_class, backend_info
from backends.contract import DTYPES, adam_step
from bench.parity import LOSS_TOLERANCE
from bench.checkpoints import CheckpointChecker
from bench.training import sample, train
from tests.helpers import (SAMPLE_TOKENS, every_length, make_backend, max_parameter_difference,
                           train_losses)

CHECK_POINTS = ["3.3660", "3.4243", "3.1778"]  # SPEC.md: losses of steps 1-3, four decimals


@dataclass(frozen=True)
class Conformance:
    # Steps compared with numpy at every step (the spec's 1,000 unless a backend is too slow).
    steps: int = 1000
    # Largest parameter difference to numpy at the same dtype: rounding only (a wrong gradient
    # moves a parameter by about the learning rate, 1e-2, in one step).
    parameter_atol: dict = field(default_factory=lambda: {"float32": 1e-5, "float64": 1e-12})
    logits_atol: dict = field(default_factory=lambda: {"float32": 1e-5, "float64": 1e-12})
    # New traces or compilations (trace_counts) a prepared backend may make for all sequence
    # lengths.
    max_traces: int = 1


CONFORMANCE: dict[str, Conformance] = {
    "python": Conformance(steps=30),  # ~13 ms a step
    "numpy": Conformance(),
    "torch": Conformance(),
    # model: a graph specialised to length 1 and one dynamic graph (automatic dynamic shapes);
    # optimizer_step: one compile, its frame traced twice (again after the graph break at the
    # LR scheduler's wrapper of optimizer.step)
    "torch-compile": Conformance(max_traces=2),
    "mlx": Conformance(),
    "mlx-compile": Conformance(),
    "jax": Conformance(),
    "max": Conformance(),
    "mojo-tape": Conformance(logits_atol={"float32": 1e-5, "float64": 1e-10}),
    "torch-tuned": Conformance(),
    "torch-compile-tuned": Conformance(),
    "mlx-tuned": Conformance(),
    "jax-tuned": Conformance(),
    "max-loop": Conformance(),
    "mojo": Conformance(logits_atol={"float32": 1e-5, "float64": 1e-10}),
}

# The suite's own backends (tests may add fault backends to this process's registry).
BUILT_IN = [name for name, info in REGISTRY.items() if info.target.startswith("backends.")]
CASES = [pytest.param(name, dtype, id=f"{name}-{dtype}")
         for name in BUILT_IN for dtype in backend_info(name).dtypes]
BACKENDS = [pytest.param(name, id=name) for name in BUILT_IN]


def precise_dtype(name: str) -> str:
    """The most precise dtype a backend has: where its checks can be tightest."""
    return "float64" if "float64" in backend_info(name).dtypes else "float32"


def other_sizes(name: str, request):
    """The spec at other sizes: with batches when the backend supports them."""
    return request.getfixturevalue("batched_spec" if backend_info(name).batches
                                   else "small_spec")


def test_every_backend_has_a_row():
    assert set(CONFORMANCE) == set(BUILT_IN)


def private_names(source: str, class_name: str) -> list[str]:
    """The private names (`_x`, not dunders) that the module-level code and the class
    `class_name` reach on anything but self/cls: attributes, getattr strings and imports.
    Other classes of the module (a tuned row sharing it) are not looked at."""
    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    tree = ast.parse(source)
    scopes = [node for node in tree.body
              if not isinstance(node, ast.ClassDef) or node.name == class_name]
    found = []
    for node in (inner for scope in scopes for inner in ast.walk(scope)):
        if isinstance(node, ast.Attribute) and private(node.attr) and not (
                isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            found.append(f"line {node.lineno}: .{node.attr}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr") and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and private(node.args[1].value)):
            found.append(f"line {node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [
                node.module or "", *(alias.name for alias in node.names)]
            found += [f"line {node.lineno}: import {module}" for module in modules
                      if any(private(part) for part in module.split("."))]
    return found


@pytest.mark.parametrize("name", [name for name in BUILT_IN
                                  if backend_info(name).division == "idiomatic"])
def test_idiomatic_backends_use_no_private_name(name):
    """Idiomatic rows use their framework's public API only: no `_name` of a module or object
    (the backend's own `self._x` is its business)."""
    module_name, _, class_name = backend_info(name).target.partition(":")
    with open(importlib.util.find_spec(module_name).origin) as handle:
        assert private_names(handle.read(), class_name) == []


def test_the_private_name_check_finds_them():
    source = ("import torch._dynamo\nfrom jax._src import x\n"
              "class A:\n    def f(self, m):\n        self._ok(); m._bad(); torch._fused_adam_()\n"
              "        getattr(m, '_hidden')\n"
              "class B:\n    def g(self, m):\n        m._elsewhere()\n")
    found = private_names(source, "A")
    assert len(found) == 5 and not any("_elsewhere" in item or "_ok" in item for item in found)


@pytest.mark.parametrize("name", [name for name in BUILT_IN
                                  if backend_info(name).division == "tuned"])
def test_tuned_backends_declare_their_tunings(name):
    assert backend_info(name).tunings and all(backend_info(name).tunings)


@pytest.mark.parametrize("name", BACKENDS)
def test_registry_names_its_class(name):
    if not availability(name).available:
        pytest.skip(availability(name).reason)
    assert backend_class(name).name == name


# ---- training ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, dtype", CASES)
def test_losses_match_numpy_at_every_step(name, dtype, pool, tiny_spec, numpy_runs):
    steps = CONFORMANCE[name].steps
    backend = pool.get(name, dtype, tiny_spec)
    losses = train_losses(backend, tiny_spec, steps)
    assert len(losses) == steps
    assert [f"{loss:.4f}" for loss in losses[:3]] == CHECK_POINTS
    reference_losses, reference_parameters = numpy_runs[dtype]
    assert np.abs(losses - reference_losses[:steps]).max() < LOSS_TOLERANCE[dtype]
    if dtype == "float32":  # really float32: it differs from the float64 run, slightly
        difference = np.abs(losses - numpy_runs["float64"][0][:steps]).max()
        assert 0 < difference < LOSS_TOLERANCE["float32"]
    elif steps == 1000:
        differences = max_parameter_difference(backend.parameters(), reference_parameters)
        assert max(differences.values()) < 1e-9, differences


@pytest.mark.parametrize("name, dtype", CASES)
def test_parameters_after_a_few_steps_match_numpy(name, dtype, pool, tiny_spec):
    backend = pool.get(name, dtype, tiny_spec)
    reference = make_backend("numpy", tiny_spec, dtype)
    np.testing.assert_allclose(train_losses(backend, tiny_spec, 5),
                               train_losses(reference, tiny_spec, 5),
                               atol=LOSS_TOLERANCE[dtype], rtol=0)
    differences = max_parameter_difference(backend.parameters(), reference.parameters())
    assert set(differences) == set(tiny_spec.parameters)
    assert max(differences.values()) < CONFORMANCE[name].parameter_atol[dtype], differences
    # and training moved them: the comparison is not between two copies of the start
    moved = max_parameter_difference(backend.parameters(), tiny_spec.parameters)
    assert min(moved.values()) > 1e-3, moved


@pytest.mark.parametrize("spec_name, step", [("tiny_spec", 0), ("tiny_spec", 7), ("other", 1)])
@pytest.mark.parametrize("name", BACKENDS)
def test_gradients_match_numpy(name, spec_name, step, pool, request):
    if not availability(name).available:
        pytest.skip(availability(name).reason)
    if not backend_class(name).provides_gradients:
        pytest.skip(f"{name} does not expose its gradients")
    spec = other_sizes(name, request) if spec_name == "other" else request.getfixturevalue(
        spec_name)
    dtype = precise_dtype(name)
    batch = spec.step_batch(step)
    loss, gradients = pool.get(name, dtype, spec).loss_and_gradients(batch)
    expected_loss, expected = make_backend("numpy", spec, "float64").loss_and_gradients(batch)
    assert loss == pytest.approx(expected_loss, abs=1e-12 if dtype == "float64" else 1e-5)
    assert set(gradients) == set(expected)
    for parameter in expected:
        # float32: rounding only, relative to each gradient's size
        atol = 1e-12 if dtype == "float64" else 1e-6 + 1e-4 * np.abs(expected[parameter]).max()
        np.testing.assert_allclose(gradients[parameter], expected[parameter], atol=atol, rtol=0,
                                   err_msg=parameter)
    assert max(np.abs(g).max() for g in expected.values()) > 1e-2  # non-trivial gradients


@pytest.mark.parametrize("name, dtype", CASES)
def test_adam_moments_match_numpy(name, dtype, pool, tiny_spec, request):
    """The moments the checkpoint parity check starts from (bench.checkpoints): zeros after a
    load, then numpy's after a few steps, at the spec's size and at another (with padding)."""
    assert backend_class(name).provides_moments, f"{name} must expose its Adam moments"
    for spec in (tiny_spec, other_sizes(name, request)):
        backend = pool.get(name, dtype, spec)
        backend.load_parameters(spec.parameters)
        first, second = backend.optimizer_moments()
        assert set(first) == set(second) == set(spec.parameters)
        assert all(not np.any(value) for value in [*first.values(), *second.values()])
        reference = make_backend("numpy", spec, dtype)
        train_losses(backend, spec, 3)
        train_losses(reference, spec, 3)
        for got, expected in zip(backend.optimizer_moments(), reference.optimizer_moments()):
            for parameter, value in expected.items():
                assert got[parameter].shape == value.shape, parameter
                scale = np.abs(value).max()
                # summation order differs between implementations: relative rounding after 3 steps
                atol = 1e-10 * max(scale, 1e-12) if dtype == "float64" else 1e-4 * scale + 1e-12
                np.testing.assert_allclose(got[parameter], value, atol=atol, rtol=0,
                                           err_msg=f"{parameter} ({spec.config.n_embd} wide)")
        backend.load_parameters(spec.parameters)  # the pool's backend starts where it did


@pytest.mark.parametrize("name, dtype", CASES)
def test_checkpoint_check_passes_at_every_step(name, dtype, pool, request):
    """The harness's checkpoint parity check (bench.checkpoints), at every one of 12 steps of
    another size (with padded batches where supported)."""
    spec = other_sizes(name, request)
    steps = min(12, CONFORMANCE[name].steps)
    backend = pool.get(name, dtype, spec)
    backend.load_parameters(spec.parameters)
    checker = CheckpointChecker(spec.config, spec.tokenizer.vocab_size, dtype, steps)
    checker.steps = set(range(steps))
    train(backend, spec, steps, checker=checker)
    summary = checker.summary()
    assert summary["passed"], summary["message"]
    assert len(summary["steps"]) + summary["inconclusive"] == steps


@pytest.mark.parametrize("name", BACKENDS)
def test_other_sizes_match_numpy(name, pool, request):
    """Two layers, another width, two heads, a shorter block; three documents per step of
    different lengths (padding) for backends with batches."""
    spec = other_sizes(name, request)
    if spec.config.batch_size > 1:
        assert any(len(set(spec.step_batch(step).lengths.tolist())) > 1 for step in range(50))
    dtype = precise_dtype(name)
    steps = min(50, CONFORMANCE[name].steps)
    backend = pool.get(name, dtype, spec)
    reference = make_backend("numpy", spec, dtype)
    losses = train_losses(backend, spec, steps)
    assert np.abs(losses - train_losses(reference, spec, steps)).max() < LOSS_TOLERANCE[dtype]
    differences = max_parameter_difference(backend.parameters(), reference.parameters())
    assert max(differences.values()) < {"float64": 1e-10, "float32": 1e-5}[dtype], differences
    assert_same_logits(backend, reference, SAMPLE_TOKENS[: spec.config.block_size],
                       CONFORMANCE[name].logits_atol[dtype])


@pytest.mark.parametrize("name, dtype", CASES)
def test_reloading_resets_the_optimizer(name, dtype, pool, tiny_spec):
    backend = pool.get(name, dtype, tiny_spec)
    first = train_losses(backend, tiny_spec, 5)
    backend.load_parameters(tiny_spec.parameters)
    np.testing.assert_array_equal(train_losses(backend, tiny_spec, 5), first)


@pytest.mark.parametrize("name, dtype", CASES)
def test_prepare_leaves_the_parameters_alone(name, dtype, pool, tiny_spec):
    pool.get(name, dtype, tiny_spec)
    after_prepare = pool.after_prepare[name, dtype, id(tiny_spec)]
    differences = max_parameter_difference(after_prepare, tiny_spec.parameters)
    # float32 holds the spec's float64 values to its rounding
    assert max(differences.values()) <= (0 if dtype == "float64" else 1e-7), differences


@pytest.mark.parametrize("name", BACKENDS)
def test_one_trace_serves_every_sequence_length(name, pool, tiny_spec):
    dtype = backend_info(name).default_dtype
    backend = pool.get(name, dtype, tiny_spec)
    reference = make_backend("numpy", tiny_spec, dtype)
    before = backend.trace_counts()
    for step, batch in enumerate(every_length(tiny_spec)):
        adam = adam_step(tiny_spec.config, step)
        assert backend.train_step(batch, adam) == pytest.approx(
            reference.train_step(batch, adam), abs=LOSS_TOLERANCE[dtype])
    # backends that trace or compile count it: a bounded number of new traces (none if
    # prepare() traced already) for all the lengths, not one per length
    new = {key: count - before.get(key, 0) for key, count in backend.trace_counts().items()}
    assert all(count <= CONFORMANCE[name].max_traces for count in new.values()), new


# ---- sampling ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, dtype", CASES)
def test_sampling_logits_match_numpy_after_training(name, dtype, pool, tiny_spec):
    backend = pool.get(name, dtype, tiny_spec)
    reference = make_backend("numpy", tiny_spec, dtype)
    steps = min(20, CONFORMANCE[name].steps)
    train_losses(backend, tiny_spec, steps)
    train_losses(reference, tiny_spec, steps)
    for _ in range(2):  # a second pass checks that reset_cache empties the cache
        assert_same_logits(backend, reference, SAMPLE_TOKENS, CONFORMANCE[name].logits_atol[dtype])


def assert_same_logits(backend, reference, tokens: list[int], atol: float) -> None:
    """Both models fed `tokens` from an empty key/value cache give the same logits."""
    backend.reset_cache()
    reference.reset_cache()
    for position, token in enumerate(tokens):
        logits = np.asarray(backend.next_logits(token, position))
        assert logits.dtype == np.float64 and logits.shape == (backend.vocab_size,)
        np.testing.assert_allclose(logits, reference.next_logits(token, position), atol=atol,
                                   rtol=0, err_msg=f"position {position}")


@pytest.mark.parametrize("name", [case for case in BACKENDS
                                  if "float64" in backend_info(case.values[0]).dtypes])
def test_float64_samples_are_numpys(name, pool, tiny_spec):
    backend = pool.get(name, "float64", tiny_spec)
    reference = make_backend("numpy", tiny_spec, "float64")
    steps = min(100, CONFORMANCE[name].steps)
    train_losses(backend, tiny_spec, steps)
    train_losses(reference, tiny_spec, steps)
    samples = sample(backend, tiny_spec).samples
    assert samples == sample(reference, tiny_spec).samples
    assert len(samples) == tiny_spec.config.num_samples and any(samples)


# ---- what a backend refuses ------------------------------------------------------------------
@pytest.mark.parametrize("device", ["tpu", "not-a-device"])
@pytest.mark.parametrize("name", BACKENDS)
def test_unknown_devices_are_unavailable(name, device, tiny_spec):
    if not availability(name).available:
        pytest.skip(availability(name).reason)
    with pytest.raises(BackendUnavailable, match=device):
        make_backend(name, tiny_spec, backend_info(name).default_dtype, device)


@pytest.mark.parametrize("name", BACKENDS)
def test_unsupported_dtypes_and_batches_are_unavailable(name, tiny_spec, batched_spec):
    if not availability(name).available:
        pytest.skip(availability(name).reason)
    info = backend_info(name)
    for dtype in set(DTYPES) - set(info.dtypes):
        with pytest.raises(BackendUnavailable, match=f"does not support dtype {dtype}"):
            make_backend(name, tiny_spec, dtype)
    if not info.batches:
        with pytest.raises(BackendUnavailable, match="batch_size"):
            make_backend(name, batched_spec, info.default_dtype)

