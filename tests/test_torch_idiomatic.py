"""What is specific to the idiomatic torch rows (tests/test_conformance.py has the shared
checks against numpy): public API only, torch's own threads, the framework's optimizer and
schedule, torch-compile's calls through Dynamo without recompiles after prepare(), devices.
"""
import ast
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from backends import availability, devices, torch_idiomatic  # noqa: E402  (after the skip)
from backends.contract import BackendUnavailable, adam_step  # noqa: E402
from tests.helpers import every_length, make_backend, train_losses  # noqa: E402

needs_compiler = pytest.mark.skipif(not availability("torch-compile").available,
                                    reason=availability("torch-compile").reason)


def test_no_private_names():
    tree = ast.parse(Path(torch_idiomatic.__file__).read_text())
    for node in ast.walk(tree):
        dunder = isinstance(node, ast.Attribute) and node.attr.endswith("__")  # super().__init__
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not dunder:
            assert isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"), (
                f"line {node.lineno}: .{node.attr}")
        modules = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                   else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        for module in modules:
            if module.split(".")[0] == "torch":
                assert not any(part.startswith("_") for part in module.split(".")), module


@pytest.mark.parametrize("name", ["torch", "torch-compile"])
def test_default_threads_and_details(name, tiny_spec):
    if not availability(name).available:
        pytest.skip(availability(name).reason)
    threads = torch.get_num_threads()
    backend = make_backend(name, tiny_spec, "float32")
    assert torch.get_num_threads() == threads == backend.details()["threads"]
    assert backend.details()["optimizer"] == "torch.optim.Adam (default implementation)"


def test_the_framework_computes_the_update(tiny_spec):
    backend = make_backend("torch", tiny_spec, "float64")
    optimizer = backend.optimizer
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.defaults["foreach"] is None and optimizer.defaults["fused"] is None
    train_losses(backend, tiny_spec, 3)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(adam_step(tiny_spec.config, 3)
                                                            .learning_rate, abs=1e-18)
    backend.load_parameters(tiny_spec.parameters)  # a fresh optimizer and schedule
    assert backend.optimizer is not optimizer and not backend.optimizer.state
    with pytest.raises(RuntimeError, match="optimizer step 0"):  # out of step with the harness
        backend.train_step(tiny_spec.step_batch(5), adam_step(tiny_spec.config, 5))


@needs_compiler
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compiled_steps_do_not_recompile_after_prepare(dtype, pool, tiny_spec):
    backend = pool.get("torch-compile", dtype, tiny_spec)
    # One pass first: in this shared test process the other dtype's instance runs the same
    # compiled code, and Dynamo may have to re-specialise once after it (a benchmark worker
    # has one instance). Then every call goes through Dynamo's guards and none fails: Dynamo
    # raises on a recompile in this stance.
    for step, batch in enumerate(every_length(tiny_spec)):
        backend.train_step(batch, adam_step(tiny_spec.config, step))
    backend.load_parameters(tiny_spec.parameters)
    with torch.compiler.set_stance("fail_on_recompile"):
        for step, batch in enumerate(every_length(tiny_spec)):
            backend.train_step(batch, adam_step(tiny_spec.config, step))
    assert backend.details()["compile"]["calls"].startswith("through Dynamo")


def test_asking_for_a_missing_gpu_is_unavailable(tiny_spec):
    if torch.cuda.is_available() or devices.mps_available():
        pytest.skip("this machine has a GPU")
    for device in ("cuda", "cuda:0", "gpu", "mps"):
        with pytest.raises(BackendUnavailable, match="not available"):
            make_backend("torch", tiny_spec, "float32", device)


def test_mps_has_no_float64(tiny_spec, monkeypatch):
    monkeypatch.setattr(devices, "mps_available", lambda: True)
    with pytest.raises(BackendUnavailable, match="float64"):
        make_backend("torch", tiny_spec, "float64", "mps")
