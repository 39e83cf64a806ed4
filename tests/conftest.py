"""Fixtures shared by every test module: the verified dataset and the spec instances.

The dataset cache is seeded from ../shared/data/names.txt when that copy exists (CI and the
developers' machines), so the tests never need the network.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from backends.contract import preset
from backends.contract import build_spec
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


@pytest.fixture(scope="session")
def small_spec(dataset):
    """A two-layer config with other sizes, so that no backend hard-codes the tiny shapes."""
    return build_spec(dataset.docs, preset("tiny", n_layer=2, n_embd=8, n_head=2, block_size=8))


@pytest.fixture(scope="session")
def numpy_runs(tiny_spec):
    """numpy over the spec's 1,000 steps in each dtype: losses and final parameters, the
    reference the framework backends' tests compare with (computed once per session)."""
    runs = {}
    for dtype in ("float32", "float64"):
        backend = make_backend("numpy", tiny_spec, dtype)
        runs[dtype] = train_losses(backend, tiny_spec, 1000), backend.parameters()
    return runs
