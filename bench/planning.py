"""Which backends and dtypes a command runs: shared by the benchmark command and the sweep.

Planning reads only the registry's declarations (backends.REGISTRY), so it imports no
framework; whatever only a backend's own import can tell (no GPU, a failed build) is reported
by its worker as `unavailable`.
"""
from __future__ import annotations

from backends import REGISTRY, availability, backend_info


def check_known(names: list[str]) -> None:
    """Raise UnknownBackend for the first name that is not registered."""
    for name in names:
        backend_info(name)


def default_backends(include_slow: bool = False) -> list[str]:
    """The registered backends that can run here: those of a plain run, or all (--all)."""
    return [name for name, info in REGISTRY.items()
            if (include_slow or info.in_default_run) and availability(name).available]


def select_backends(named: list[str], include_slow: bool = False) -> list[str]:
    """The backends named (in order, once each), or the default ones when none is named."""
    check_known(named)
    return list(dict.fromkeys(named)) if named else default_backends(include_slow)


def plan_runs(names: list[str], dtypes: list[str]) -> list[tuple[str, str]]:
    """(backend, dtype) pairs; "default" is each backend's own dtype. A named dtype a backend
    lacks still becomes a run, reported as unavailable by its worker, so the table says why it
    is missing."""
    pairs = []
    for name in names:
        for dtype in dtypes or ["default"]:
            pairs.append((name, backend_info(name).default_dtype if dtype == "default" else dtype))
    return list(dict.fromkeys(pairs))
