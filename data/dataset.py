"""The names dataset: found locally, or downloaded once from its canonical address, always
verified against the spec's sha256 before anything trains on it.

Lookup order: an explicit path (`--dataset PATH` or the MICROGPT_BENCH_DATASET environment
variable), then the cache `data/cache/names.txt` (ignored by git), then a download into that
cache. A file whose checksum is wrong is refused unless the caller asks for a custom dataset.
"""
from __future__ import annotations

import hashlib
import os
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
        if not path.is_file():
            raise DatasetError(f"dataset file {path} does not exist; {_HOW_TO_POINT}")
        return _verified(path.read_bytes(), path, allow_custom)
    if not cache_path.is_file():
        _download(url, cache_path)
    return _verified(cache_path.read_bytes(), cache_path, allow_custom,
                     cached=True)


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


def _download(url: str, cache_path: Path) -> None:
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
    write_atomically(cache_path, raw)
