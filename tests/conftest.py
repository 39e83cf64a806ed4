"""Fixtures shared by every test module: the verified dataset, the spec instances the tests use,
the numpy reference runs, and one pool of prepared backends.

The dataset cache is seeded from ../shared/data/names.txt when that copy exists (CI and the
developers' machines), so the tests never need the network. The pool builds each (backend,
dtype, config) once per session, so every compiled artifact (torch.compile graphs, XLA
executables, MAX graphs, Mojo builds) is paid for once however many tests use it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from backends import availability
from backends.contract import build_spec, preset
from data.dataset import CACHE_PATH, load_dataset
from tests.helpers import make_backend, train_losses

SHARED_COPY = Path(__file__).resolve().parents[2] / "shared" / "data" / "names.txt"


def pytest_configure(config):
    if not CACHE_PATH.is_file() and SHARED_COPY.is_file():
        CACHE_PATH.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SHARED_COPY, CACHE_PATH)


@pytest.fixture(scope="session")
def dataset():
    return load_dataset()


@pytest.fixture(scope="session")
def tiny_spec(dataset):
    return build_spec(dataset.docs, preset("tiny"))


# Other sizes, so that no backend hard-codes the tiny shapes: two layers, another width, two
# heads, a shorter block (names get cut).
OTHER_SIZES = dict(n_layer=2, n_embd=8, n_head=2, block_size=8)


@pytest.fixture(scope="session")
def small_spec(dataset):
    return build_spec(dataset.docs, preset("tiny", **OTHER_SIZES))


@pytest.fixture(scope="session")
def batched_spec(dataset):
    """The other sizes with three documents per step: rows of different lengths, padded."""
    return build_spec(dataset.docs, preset("tiny", **OTHER_SIZES, batch_size=3))


@pytest.fixture(scope="session")
def numpy_runs(tiny_spec):
    """numpy over the spec's 1,000 steps in each dtype: losses and final parameters, the
    reference the other backends are compared with (computed once per session)."""
    runs = {}
    for dtype in ("float32", "float64"):
        backend = make_backend("numpy", tiny_spec, dtype)
        runs[dtype] = train_losses(backend, tiny_spec, 1000), backend.parameters()
    return runs


class BackendPool:
    """One prepared backend per (name, dtype, spec) for the session. `get` reloads the spec's
    parameters (which also zeroes Adam's moments), so every test starts from the spec's state.
    `after_prepare` holds the parameters each backend reported right after prepare()."""

    def __init__(self):
        self.backends, self.after_prepare = {}, {}

    def get(self, name, dtype, spec):
        found = availability(name)
        if not found.available:
            pytest.skip(f"{name}: {found.reason}")
        key = (name, dtype, id(spec))
        if key not in self.backends:
            backend = make_backend(name, spec, dtype)
            backend.prepare()
            self.after_prepare[key] = backend.parameters()
            self.backends[key] = backend
        backend = self.backends[key]
        backend.load_parameters(spec.parameters)
        return backend


@pytest.fixture(scope="session")
def pool():
    return BackendPool()
