"""The backend registry: every backend by name, its module imported only when it is used.

Importing this package imports no framework; `availability()` looks for packages without
importing them, so `bench.py --list` stays fast and works with nothing installed.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from backends.base import Availability, Backend, BackendUnavailable


@dataclass(frozen=True)
class BackendEntry:
    name: str
    module: str
    class_name: str
    in_default_run: bool = True  # the slow reference backends are left out of a plain run


REGISTRY: dict[str, BackendEntry] = {entry.name: entry for entry in [
    BackendEntry("python", "backends.python_tape", "PythonTapeBackend", in_default_run=False),
    BackendEntry("numpy", "backends.numpy_backend", "NumpyBackend"),
    BackendEntry("torch", "backends.torch_backend", "TorchBackend"),
    BackendEntry("torch-compile", "backends.torch_backend", "TorchCompileBackend"),
    BackendEntry("mlx", "backends.mlx_backend", "MLXBackend"),
    BackendEntry("jax", "backends.jax_backend", "JaxBackend"),
    BackendEntry("max", "backends.max_backend", "MaxBackend"),
    BackendEntry("max-loop", "backends.max_backend", "MaxLoopBackend"),
    BackendEntry("mojo", "backends.mojo_backend", "MojoBackend"),
    BackendEntry("mojo-tape", "backends.mojo_backend", "MojoTapeBackend"),
]}


class UnknownBackend(KeyError):
    def __str__(self):
        return (f"unknown backend {self.args[0]!r}; valid backends: "
                f"{', '.join(REGISTRY)}")


def backend_names() -> list[str]:
    return list(REGISTRY)


def get_backend_class(name: str) -> type[Backend]:
    if name not in REGISTRY:
        raise UnknownBackend(name)
    entry = REGISTRY[name]
    module = importlib.import_module(entry.module)
    return getattr(module, entry.class_name)


def availability(name: str) -> Availability:
    """Whether `name` can run here and, if not, why. Never raises for a registered name."""
    try:
        backend_class = get_backend_class(name)
    except UnknownBackend:
        raise
    except Exception as error:  # a broken or missing backend module must not break --list
        return Availability(False, f"backend module failed to import: {error}")
    return backend_class.availability()


__all__ = ["Availability", "Backend", "BackendEntry", "BackendUnavailable", "REGISTRY",
           "UnknownBackend", "availability", "backend_names", "get_backend_class"]
