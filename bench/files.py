"""Where the suite's files live, and the one way it writes a file.

Every file the suite writes goes through this module:

- `claim(paths, overwrite=...)` takes the output paths of a command before it measures
  anything: each path that does not exist is created exclusively (O_CREAT | O_EXCL, so two
  processes can never both get it, and a symbolic link, even a dangling one, is never
  followed); an existing path (a file, a link) is refused unless `overwrite`; a directory, an
  input of the same command, or two outputs that are the same file are always refused. A path
  that cannot be created is an OutputError (a usage error) before anything runs.
- `write_atomically(path, content)` writes beside the target and renames, so a reader never
  sees half a file, and a failure (a full disk, a vanished folder) leaves the previous version
  and no temporary file behind.
- `Claim.release()` removes the files the claim created, for a command that ends before it
  wrote anything worth keeping (never a file it did not create).
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from bench.command import UsageError

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "results"


class OutputError(UsageError):
    """An output path that cannot or must not be written: one line, exit code 2."""


def display(path) -> str:
    """A path as printable text: bytes that are not UTF-8 (kept by Python as surrogates) are
    shown as \\xNN instead of breaking the output."""
    text = os.fsdecode(os.fspath(path))
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _encoded(content: str | bytes) -> bytes:
    if isinstance(content, (bytes, bytearray)):
        return bytes(content)
    if not isinstance(content, str):
        raise TypeError(f"write_atomically writes str or bytes, not {type(content).__name__}")
    return content.encode("utf-8", "surrogateescape").decode(
        "utf-8", "backslashreplace").encode("utf-8")


def write_atomically(path: str | os.PathLike, content: str | bytes) -> None:
    """Write beside the target and rename, so that a reader never sees half a file and a crash
    or a full disk never leaves one (the old file, if any, stays until the new one is complete,
    and the temporary file is removed whatever happens). Raises OSError."""
    path = Path(path)
    data = _encoded(content)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp",
                                             prefix=f".{path.name[:80]}.")
    try:
        with open(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; results are for reading
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _describe_existing(path: Path) -> str:
    if path.is_symlink():
        target = os.readlink(path)
        state = "" if path.exists() else ", which does not exist"
        return f"{display(path)} is a symbolic link (to {display(target)}{state})"
    return f"{display(path)} exists"


class Claim:
    """The output paths a command owns. `created` are the ones it created (and may remove)."""

    def __init__(self, paths: list[Path], created: list[Path]):
        self.paths, self.created = paths, created

    def release(self) -> None:
        """Remove the files this claim created (for a command that ends with nothing worth
        keeping); files it was allowed to overwrite are left as they are."""
        for path in self.created:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self.created = []


def claim(paths: list[Path], *, overwrite: bool = False, inputs=(), what: str = "output",
          hint: str = "choose another path or pass --overwrite") -> Claim:
    """Take `paths` for writing (see the module docstring); raises OutputError, having
    removed whatever it created, when one cannot be taken."""
    paths = [Path(path) for path in paths]
    for index, path in enumerate(paths):
        for other in paths[:index]:
            if os.path.abspath(path) == os.path.abspath(other) or _same_file(path, other):
                raise OutputError(f"{display(path)}: two outputs of this command would be the "
                                  f"same file; choose another name")
        for source in inputs:
            if _same_file(path, Path(source)):
                raise OutputError(f"{what} {display(path)} is also an input of this command; "
                                  f"it would be replaced by the output. Choose another path")
    created: list[Path] = []
    try:
        for path in paths:
            if _claim_one(path, overwrite, what, hint):
                created.append(path)
    except BaseException:
        Claim(paths, created).release()
        raise
    return Claim(paths, created)


def _claim_one(path: Path, overwrite: bool, what: str, hint: str) -> bool:
    """True when this call created `path`."""
    if path.is_dir():
        raise OutputError(f"{what} {display(path)} is a directory; give a file name")
    if os.path.lexists(path):
        if not overwrite:
            raise OutputError(f"{_describe_existing(path)}; {hint}")
        if not os.access(path.parent, os.W_OK):
            raise OutputError(f"cannot write the {what} {display(path)}: its folder is not "
                              f"writable")
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot write the {what} {display(path)}: its folder cannot be "
                          f"created ({error.strerror or error})") from None
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        os.close(os.open(path, flags, 0o644))
    except FileExistsError:
        raise OutputError(f"{display(path)} was created by another process just now (another "
                          f"run with the same path?); {hint}") from None
    except OSError as error:
        reason = error.strerror or str(error)
        if error.errno == errno.EISDIR:
            reason = "it is a directory"
        raise OutputError(f"cannot write the {what} {display(path)}: {reason}") from None
    return True


def new_directory(parent: Path, stem: str) -> Path:
    """A folder `parent/stem`, `parent/stem-1`, ... that did not exist, created exclusively."""
    parent.mkdir(parents=True, exist_ok=True)
    counter = 0
    while True:
        path = parent / (stem if counter == 0 else f"{stem}-{counter}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            counter += 1
