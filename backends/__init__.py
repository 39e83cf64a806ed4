"""The backend registry: every backend by name, with what the suite must know about it before
importing it.

Listing backends, checking whether they can run here and planning runs import no framework:
availability comes from installed-package metadata. A backend's module (and its framework) is
imported only by `create_backend`, which the harness calls in the backend's own worker process.
Adding a backend: one module, one line in REGISTRY, one row in the conformance table
(tests/test_conformance.py).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import shutil

from backends.contract import Availability, Backend, BackendInfo, BackendUnavailable, GPTConfig


def _install_hint(extra: str) -> str:
    return f'python -m pip install ".[{extra}]" -c constraints.txt'


TORCH, MLX, JAX, MAX, MOJO = (_install_hint(extra) for extra in ("torch", "mlx", "jax", "max",
                                                                   "mojo"))
MLX += "  (Linux: installs mlx[cpu]; mlx[cuda] for NVIDIA GPUs)"

REGISTRY: dict[str, BackendInfo] = {info.name: info for info in [
    # ---- idiomatic: each framework as its own documentation teaches it ----------------------
    BackendInfo("python", "backends.python_tape:PythonTapeBackend",
                "pure Python scalar autograd tape (structure of arrays)",
                dtypes=("float64",), default_dtype="float64", in_default_run=False),
    BackendInfo("numpy", "backends.numpy_backend:NumpyBackend",
                "numpy, vectorised forward and hand-derived backward (numpy has no autograd), "
                "flat Adam buffer",
                requires=("numpy",), batches=True),
    BackendInfo("torch", "backends.torch_idiomatic:TorchModuleBackend",
                "PyTorch eager: nn.Module, loss.backward(), torch.optim.Adam with the spec's "
                "per-step learning rate",
                requires=("torch",), install_hint=TORCH, batches=True),
    BackendInfo("torch-compile", "backends.torch_idiomatic:TorchCompiledModuleBackend",
                "the torch row's model under torch.compile, and its optimizer step compiled as "
                "PyTorch's compiled-optimizer recipe shows, called through Dynamo",
                requires=("torch",), install_hint=TORCH, batches=True, needs_cxx_compiler=True),
    BackendInfo("mlx", "backends.mlx_idiomatic:MLXModuleBackend",
                "mlx.nn.Module, nn.value_and_grad, mlx.optimizers.Adam with bias correction and "
                "the spec's schedule, mx.eval each step",
                requires=("mlx",), install_hint=MLX, batches=True),
    BackendInfo("mlx-compile", "backends.mlx_idiomatic:MLXCompiledModuleBackend",
                "the mlx row's step under mx.compile with the model and optimizer state as its "
                "inputs and outputs",
                requires=("mlx",), install_hint=MLX, batches=True),
    BackendInfo("jax", "backends.jax_idiomatic:JaxOptaxBackend",
                "JAX: parameters as a pytree, jax.value_and_grad, optax.adam with a linear "
                "schedule, the step under jax.jit",
                requires=("jax", "optax"), install_hint=JAX, batches=True),
    BackendInfo("max", "backends.max_backend:MaxBackend",
                "Modular MAX graphs: forward, hand-derived backward (MAX graphs have no autograd) "
                "and Adam in one graph, called through the public Model.execute",
                requires=("max",), install_hint=MAX, dtypes=("float32",), batches=True),
    BackendInfo("mojo-tape", "backends.mojo_backend:MojoTapeBackend",
                "Mojo, the python backend's scalar autograd tape compiled (structure of "
                "arrays, reverse walk)",
                requires=("mojo",), install_hint=MOJO, default_dtype="float64"),
    # ---- tuned: anything that keeps parity, every trick declared -----------------------------
    BackendInfo("torch-tuned", "backends.torch_tuned:TorchTunedBackend",
                "PyTorch eager, hand-written forward and backward on views of one flat buffer",
                division="tuned", baseline="torch", tunings=(
                    "hand-derived backward (no autograd)",
                    "private torch._fused_adam_ and torch._softmax_backward_data",
                    "one-hot embedding selector built on the host",
                    "one intra-op thread"),
                requires=("torch",), install_hint=TORCH, batches=True),
    BackendInfo("torch-compile-tuned", "backends.torch_tuned:TorchCompileTunedBackend",
                "forward, torch.func gradients and Adam as one torch.compile graph",
                division="tuned", baseline="torch-compile", tunings=(
                    "whole step (forward, torch.func gradients, Adam) in one graph",
                    "compiled graph called directly, Dynamo's guards skipped after the first call",
                    "inputs padded to block_size: one graph for every length",
                    "one intra-op thread"),
                requires=("torch",), install_hint=TORCH, batches=True, needs_cxx_compiler=True),
    BackendInfo("mlx-tuned", "backends.mlx_tuned:MLXTunedBackend",
                "MLX, the whole step under mx.compile with a hand-written backward",
                division="tuned", baseline="mlx-compile", tunings=(
                    "hand-derived backward",
                    "one weight buffer; all heads' attention as batched matmuls",
                    "Adam written out inside the compiled step",
                    "benchmark worker's threads pinned to one core"),
                requires=("mlx",), install_hint=MLX, batches=True),
    BackendInfo("jax-tuned", "backends.jax_tuned:JaxTunedBackend",
                "JAX, forward, value_and_grad and Adam in one jax.jit over donated flat buffers",
                division="tuned", baseline="jax", tunings=(
                    "hand-written Adam inside the jitted step",
                    "parameters and moments as three flat donated buffers",
                    "a step's inputs packed into one array",
                    "synchronous CPU dispatch"),
                requires=("jax",), install_hint=JAX, batches=True),
    BackendInfo("max-loop", "backends.max_backend:MaxLoopBackend",
                "the max graph inside a MAX while loop",
                division="tuned", baseline="max", tunings=(
                    "up to 50 steps per graph call (per-step figures are call averages)",
                    "private Model._execute_device_tensors entry point"),
                requires=("max",), install_hint=MAX, dtypes=("float32",), batches=True),
    BackendInfo("mojo", "backends.mojo_backend:MojoBackend",
                "native Mojo on contiguous buffers, a Python extension module",
                division="tuned", baseline="mojo-tape", tunings=(
                    "hand-derived backward and Adam in native code",
                    "SIMD kernels on contiguous buffers",
                    "one Python-to-Mojo call per step"),
                requires=("mojo",), install_hint=MOJO, batches=True),
]}


class UnknownBackend(KeyError):
    def __str__(self):
        return f"unknown backend {self.args[0]!r}; valid backends: {', '.join(REGISTRY)}"


def backend_info(name: str) -> BackendInfo:
    if name not in REGISTRY:
        raise UnknownBackend(name)
    return REGISTRY[name]


def _cxx_compiler() -> str | None:
    for compiler in (os.environ.get("CXX", ""), "g++", "c++", "clang++"):
        if compiler and shutil.which(compiler):
            return compiler
    return None


def availability(name: str) -> Availability:
    """Whether `name` can run here and, if not, why, from installed-package metadata: nothing
    is imported. What only the framework can tell (no GPU, a failed native build) is reported
    by the backend's worker as `unavailable`."""
    info = backend_info(name)
    missing = [package for package in info.requires if importlib.util.find_spec(package) is None]
    if missing:
        return Availability(False, f"package {', '.join(missing)} is not installed",
                            info.install_hint)
    if info.needs_cxx_compiler and _cxx_compiler() is None:
        return Availability(False, f"{name} needs a C++ compiler (g++ or clang++, or $CXX) "
                                   "and none was found",
                            "install one, e.g. `apt-get install g++` or `xcode-select --install`")
    return Availability(True)


def framework_versions(name: str) -> dict[str, str]:
    versions = {}
    for package in backend_info(name).requires:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def backend_class(name: str) -> type[Backend]:
    """Import the backend's module (and its framework) and return its class."""
    module_name, _, class_name = backend_info(name).target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


EXTRA_BACKENDS_ENV_VAR = "MICROGPT_BENCH_EXTRA_BACKENDS"


def register_extra_backends(environ=os.environ) -> list[str]:
    """Test hook: add the backends named in MICROGPT_BENCH_EXTRA_BACKENDS
    ("name=module:Class,...") to this process's registry, left out of a plain run. The fault
    tests run deliberately broken backends through the real harness with it. A name that is
    already registered is refused, so the hook can never stand in for a real backend. Returns
    the names added; a malformed entry raises ValueError naming it."""
    names = []
    for item in filter(None, (part.strip()
                              for part in environ.get(EXTRA_BACKENDS_ENV_VAR, "").split(","))):
        name, _, target = item.partition("=")
        module, _, class_name = target.partition(":")
        if not (name and module and class_name):
            raise ValueError(f"{EXTRA_BACKENDS_ENV_VAR}: {item!r} is not name=module:Class")
        if name in REGISTRY and REGISTRY[name].target != target:
            raise ValueError(f"{EXTRA_BACKENDS_ENV_VAR}: {name!r} is a registered backend; "
                             "a test backend needs a name of its own")
        REGISTRY[name] = BackendInfo(name, target, f"test backend {target}",
                                     in_default_run=False)
        names.append(name)
    return names


def create_backend(name: str, config: GPTConfig, vocab_size: int, dtype: str,
                   device: str | None = None) -> Backend:
    """A new backend instance; raises BackendUnavailable when it cannot run this request
    (package missing, dtype or batch size not supported, no such device)."""
    info = backend_info(name)
    found = availability(name)
    if not found.available:
        raise BackendUnavailable(found.reason + (f"; {found.install_hint}"
                                                 if found.install_hint else ""))
    info.check_request(config, dtype)
    return backend_class(name)(config, vocab_size, dtype, device)


__all__ = ["EXTRA_BACKENDS_ENV_VAR", "REGISTRY", "Availability", "Backend", "BackendInfo",
           "BackendUnavailable", "UnknownBackend", "availability", "backend_class", "backend_info",
           "create_backend", "framework_versions", "register_extra_backends"]
