"""The one interface every backend implements, and the small types it speaks in.

The runner owns the training loop and the clock; a backend only knows how to take one step, how
to produce next-token logits with a key/value cache, and how to hand its parameters back as numpy
arrays for parity checks. Framework imports happen inside the backend module (imported only when
that backend is used), never here.
"""
from __future__ import annotations

import abc
import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from bench.config import AdamStep, GPTConfig, parameter_shapes

DTYPES = ("float32", "float64")


class BackendUnavailable(RuntimeError):
    """The backend cannot run here (missing package, no such device, unsupported dtype)."""


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str = ""  # why not, when not available
    install_hint: str = ""


@dataclass(frozen=True)
class TokenBatch:
    """One training step's tokens, prepared by the runner outside the timed region.

    `sequences[b]` is [BOS] + ids + [BOS] cut to at most block_size + 1 tokens (inputs are
    [:-1], targets [1:]). `padded` holds the same rows padded with BOS to block_size + 1, for
    backends that want one fixed shape; `lengths[b]` is the number of predicted positions n.
    """
    sequences: list[list[int]]
    padded: np.ndarray  # int32 [B, block_size + 1]
    lengths: np.ndarray  # int32 [B]

    @classmethod
    def from_sequences(cls, sequences: list[list[int]], block_size: int, pad: int) -> "TokenBatch":
        padded = np.full((len(sequences), block_size + 1), pad, dtype=np.int32)
        for row, tokens in enumerate(sequences):
            padded[row, : len(tokens)] = tokens
        lengths = np.array([len(tokens) - 1 for tokens in sequences], dtype=np.int32)
        return cls(sequences=sequences, padded=padded, lengths=lengths)

    @property
    def position_mask(self) -> np.ndarray:
        """float64 [B, block_size]: 1 where a position is predicted, 0 for padding."""
        positions = np.arange(self.padded.shape[1] - 1)
        return (positions[None, :] < self.lengths[:, None]).astype(np.float64)


class Backend(abc.ABC):
    """One implementation of the spec. Subclasses set the class attributes and the methods."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    # Python packages the backend imports: checked (without importing) for availability, and
    # their versions recorded in the result file.
    requires: ClassVar[tuple[str, ...]] = ()
    install_hint: ClassVar[str] = ""
    supported_dtypes: ClassVar[tuple[str, ...]] = DTYPES
    default_dtype: ClassVar[str] = "float32"  # what a run without --dtype uses
    supports_batches: ClassVar[bool] = False

    def __init__(self, config: GPTConfig, vocab_size: int, dtype: str, device: str | None = None):
        if dtype not in self.supported_dtypes:
            raise BackendUnavailable(
                f"backend {self.name} does not support dtype {dtype}; "
                f"it supports: {', '.join(self.supported_dtypes)}")
        if config.batch_size > 1 and not self.supports_batches:
            raise BackendUnavailable(f"backend {self.name} does not support batch_size > 1")
        self.config = config
        self.vocab_size = vocab_size
        self.dtype = dtype
        self.device = self.resolve_device(device)
        self.shapes = dict(parameter_shapes(config, vocab_size))

    # ---- discovery -------------------------------------------------------------------------
    @classmethod
    def availability(cls) -> Availability:
        missing = [package for package in cls.requires
                   if importlib.util.find_spec(package) is None]
        if missing:
            return Availability(False, f"package {', '.join(missing)} is not installed",
                                cls.install_hint)
        return Availability(True)

    @classmethod
    def framework_versions(cls) -> dict[str, str]:
        versions = {}
        for package in cls.requires:
            try:
                versions[package] = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                versions[package] = "unknown"
        return versions

    def resolve_device(self, requested: str | None) -> str:
        """The device to run on; raise BackendUnavailable for a device this backend lacks."""
        if requested not in (None, "cpu"):
            raise BackendUnavailable(f"backend {self.name} runs on the CPU only, "
                                     f"not on {requested!r}")
        return "cpu"

    # ---- the work --------------------------------------------------------------------------
    @abc.abstractmethod
    def load_parameters(self, parameters: dict[str, np.ndarray]) -> None:
        """Take the spec's float64 parameters (and reset the Adam moments to zero)."""

    def prepare(self) -> dict[str, float]:
        """Compile or build whatever can be built before the first step, without changing
        the parameters. Returns named durations in seconds (reported apart from training)."""
        return {}

    @abc.abstractmethod
    def train_step(self, batch: TokenBatch, adam: AdamStep) -> float:
        """Forward, backward and the Adam update for one step; returns the loss on the host."""

    @abc.abstractmethod
    def reset_cache(self) -> None:
        """Empty the key/value cache before a new sample."""

    @abc.abstractmethod
    def next_logits(self, token: int, position: int) -> np.ndarray:
        """Logits for `token` at `position` (float64, [vocab]; an array or a list), appending
        this position's keys and values to the cache."""

    @abc.abstractmethod
    def parameters(self) -> dict[str, np.ndarray]:
        """The current parameters as float64 numpy arrays, [out, in]."""

    def sync(self) -> None:
        """Wait until queued device work has finished (no-op on synchronous backends)."""

    def configure_process(self) -> dict:
        """Process-wide settings (CPU affinity, ...) this backend wants when it has a process
        of its own, as in the runner's workers; called once, before compilation. Not called in
        a shared process (the tests), where it would change the other backends' conditions.
        Returns what was set, recorded in the result file."""
        return {}

    def details(self) -> dict:
        """Backend-specific facts for the result file (threads, compile mode, ...)."""
        return {}
