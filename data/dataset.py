"""The names dataset: found locally, or downloaded once from its canonical address, always
verified against the spec's sha256 before anything trains on it.

Lookup order: an explicit path (`--dataset PATH` or the MICROGPT_BENCH_DATASET environment
variable), then the cache `data/cache/names.txt` (ignored by git), then a download into that
cache. A file whose checksum is wrong is refused unless the caller asks for a custom dataset.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.command import UsageError
from bench.files import write_atomically

DATASET_URL = "https://raw.githubusercontent.com/karpathy/makemore/988aa59/names.txt"
DATASET_SHA256 = "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"
DATASET_ENV_VAR = "MICROGPT_BENCH_DATASET"
CACHE_PATH = Path(__file__).resolve().parent / "cache" / "names.txt"
DOWNLOAD_TIMEOUT_S = 30

_HOW_TO_POINT = (
    f"point the suite at a local copy with --dataset PATH or {DATASET_ENV_VAR}=PATH, "
    f"or copy it to {CACHE_PATH}")


class DatasetError(UsageError):
    """The dataset cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Dataset:
    docs: list[str]
    path: str
    sha256: str
    standard: bool  # True only when the checksum is the spec's

    def describe(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "standard": self.standard,
                "documents": len(self.docs)}


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_documents(text: str) -> list[str]:
    """Every line, stripped, that is not empty, in file order (SPEC.md)."""
    return [line.strip() for line in text.split("\n") if line.strip()]


def load_dataset(path: str | os.PathLike | None = None, allow_custom: bool = False,
                 cache_path: Path = CACHE_PATH, url: str = DATASET_URL) -> Dataset:
    """Return the verified documents. `path` overrides the environment variable and the cache;
    `allow_custom` accepts a file whose checksum is not the spec's (recorded as non-standard)."""
    path = path or os.environ.get(DATASET_ENV_VAR) or None
    if path is not None:
        path = Path(path)
        return _verified(_read(path), path, allow_custom)
    if not cache_path.is_file():
        raw = _download(url, cache_path)
        if raw is not None:  # the cache folder could not be written: used as downloaded
            return _verified(raw, cache_path, allow_custom, cached=True)
    return _verified(_read(cache_path), cache_path, allow_custom, cached=True)


# names.txt is 228 kB; a custom dataset may be larger, but not without bound.
MAX_DATASET_BYTES = 256 * 2 ** 20


def _read(path: Path) -> bytes:
    """The bytes of a dataset file, or a DatasetError saying what the path is instead: missing,
    a directory, a symbolic-link loop, a device or pipe (which could block or never end),
    unreadable, or too large."""
    shown = os.fsdecode(path).encode("utf-8", "surrogateescape").decode("utf-8",
                                                                       "backslashreplace")
    try:
        info = path.stat()
    except FileNotFoundError:
        kind = "is a dangling symbolic link" if path.is_symlink() else "does not exist"
        raise DatasetError(f"dataset file {shown} {kind}; {_HOW_TO_POINT}") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise DatasetError(f"dataset file {shown} is a symbolic-link loop; "
                               f"{_HOW_TO_POINT}") from None
        raise DatasetError(f"dataset file {shown} cannot be read ({error.strerror or error}); "
                           f"{_HOW_TO_POINT}") from None
    if stat.S_ISDIR(info.st_mode):
        raise DatasetError(f"dataset {shown} is a directory, not a file; give the path of "
                           f"names.txt")
    if not stat.S_ISREG(info.st_mode):
        raise DatasetError(f"dataset {shown} is not a regular file (a device, pipe or socket); "
                           f"give the path of names.txt")
    if info.st_size > MAX_DATASET_BYTES:
        raise DatasetError(f"dataset {shown} is {info.st_size:,} bytes, more than the "
                           f"{MAX_DATASET_BYTES:,} a names dataset can be")
    try:
        return path.read_bytes()
    except OSError as error:
        raise DatasetError(f"dataset file {shown} cannot be read ({error.strerror or error})"
                           ) from None


def _verified(raw: bytes, path: Path, allow_custom: bool, cached: bool = False) -> Dataset:
    digest = sha256_of(raw)
    standard = digest == DATASET_SHA256
    if not standard and not allow_custom:
        fix = (f"delete {path} to download it again, or {_HOW_TO_POINT}" if cached
               else _HOW_TO_POINT)
        raise DatasetError(
            f"dataset {path} has sha256 {digest[:16]}..., not the spec's {DATASET_SHA256[:16]}... "
            f"(corrupt, truncated or another file); {fix}. To train on a different file on "
            f"purpose, pass --custom-dataset (the result is then marked non-standard).")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DatasetError(f"dataset {path} is not UTF-8 text ({error})") from None
    docs = parse_documents(text)
    if not docs:
        raise DatasetError(f"dataset {path} holds no documents (no non-empty lines)")
    return Dataset(docs=docs, path=str(path), sha256=digest, standard=standard)


def _download(url: str, cache_path: Path) -> bytes | None:
    """Download and cache the dataset; returns the bytes only when they could not be
    cached."""
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            raw = response.read()
    except (urllib.error.URLError, OSError) as error:
        raise DatasetError(
            f"names.txt is not cached and downloading {url} failed ({error}); "
            f"if this machine is offline, {_HOW_TO_POINT}") from None
    digest = sha256_of(raw)
    if digest != DATASET_SHA256:
        raise DatasetError(
            f"downloaded {url} but its sha256 is {digest[:16]}..., not the spec's "
            f"{DATASET_SHA256[:16]}...; nothing was cached. Try again, or {_HOW_TO_POINT}")
    try:
        write_atomically(cache_path, raw)
    except OSError:  # a read-only checkout: use it without caching it
        return raw
    return None
