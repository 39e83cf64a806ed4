"""Where the suite's files live, and the one way it writes a file: atomically."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "results"


def write_atomically(path: str | os.PathLike, content: str | bytes) -> None:
    """Write beside the target and rename, so that a reader never sees half a file and a crash
    never leaves one (the old file, if any, stays until the new one is complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("wb" if isinstance(content, bytes) else "w",
                                         dir=path.parent, delete=False, suffix=".tmp",
                                         prefix=f".{path.name}.")
    try:
        with handle:
            handle.write(content)
        os.chmod(handle.name, 0o644)  # NamedTemporaryFile creates 0600; results are for reading
        os.replace(handle.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
        raise
