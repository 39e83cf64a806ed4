"""The interface every backend implements, and how a backend declares itself to the registry.

The harness owns the training loop and the clock; a backend only knows how to take one step,
how to produce next-token logits with a key/value cache, and how to hand its parameters back as
numpy arrays for parity checks. Optional capabilities are declared here with a default (a flag
or a method that says "not supported"), so the harness never probes a backend with getattr.
Framework imports happen inside a backend's module, never here.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from backends.contract.config import DTYPES, AdamStep, GPTConfig, ParameterLayout
from backends.contract.spec import TokenBatch


class BackendUnavailable(RuntimeError):
    """The backend cannot run here (missing package, no such device, unsupported dtype)."""


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str = ""  # why not, when not available
    install_hint: str = ""


DIVISIONS = ("idiomatic", "tuned")


@dataclass(frozen=True)
class BackendInfo:
    """What the registry knows of a backend without importing it: enough to list it, say
    whether it can run here and plan its runs.

    `division` says which question its row answers (README, "Divisions"): `idiomatic`, the code
    a competent user writes from the framework's own documentation (its autograd, optimizer
    and modules where it has them, public API only, default threads and process settings), or
    `tuned`, anything that keeps parity, with every trick listed in `tunings`."""
    name: str
    target: str  # "module:Class"
    summary: str
    division: str = "idiomatic"
    tunings: tuple[str, ...] = ()
    # For a tuned row: the idiomatic row of the same framework it is measured against (what
    # the tunings bought).
    baseline: str = ""
    requires: tuple[str, ...] = ()  # Python packages it imports (their versions are recorded)
    install_hint: str = ""
    dtypes: tuple[str, ...] = DTYPES
    default_dtype: str = "float32"  # what a run without --dtype uses
    batches: bool = False  # supports batch_size > 1
    in_default_run: bool = True  # the slow reference backends are left out of a plain run
    needs_cxx_compiler: bool = False  # builds native code at run time (torch.compile)

    def __post_init__(self):
        if self.division not in DIVISIONS:
            raise ValueError(f"backend {self.name}: division must be one of {DIVISIONS}")
        if (self.division == "tuned") != bool(self.tunings) or (
                self.baseline and self.division != "tuned"):
            raise ValueError(f"backend {self.name}: a tuned backend lists its tunings (and "
                             "may name its idiomatic baseline), an idiomatic one has neither")

    def check_request(self, config: GPTConfig, dtype: str) -> None:
        """Raise BackendUnavailable for a dtype or batch size this backend does not support."""
        if dtype not in self.dtypes:
            raise BackendUnavailable(f"backend {self.name} does not support dtype {dtype}; "
                                     f"it supports: {', '.join(self.dtypes)}")
        if config.batch_size > 1 and not self.batches:
            raise BackendUnavailable(f"backend {self.name} does not support batch_size > 1")


class Backend(abc.ABC):
    """One implementation of the spec. Construct it through the registry
    (`backends.create_backend`), which checks the dtype and batch size it declares."""

    name: ClassVar[str]
    # Optional capabilities, each with a working default:
    # - training steps per call: > 1 means `train_steps` runs that many steps in one call and
    #   the harness times the call (its per-step figures are call averages);
    steps_per_call: ClassVar[int] = 1
    # - `loss_and_gradients`: the loss and every gradient of one step, without updating
    #   anything (the conformance tests compare gradients with numpy's).
    provides_gradients: ClassVar[bool] = False
    # - `optimizer_moments`: Adam's moments as they stand, so that the harness's checkpoint
    #   parity check (bench.checkpoints) can redo one step in float64 from the backend's own
    #   state. Every registered backend provides it (the conformance suite checks).
    provides_moments: ClassVar[bool] = False

    def __init__(self, config: GPTConfig, vocab_size: int, dtype: str, device: str | None = None):
        self.config = config
        self.vocab_size = vocab_size
        self.dtype = dtype
        self.device = self.resolve_device(device)
        self.layout = ParameterLayout.for_config(config, vocab_size)
        self.shapes = self.layout.shapes

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

    def train_steps(self, batches: list[TokenBatch], adams: list[AdamStep]) -> list[float]:
        """Up to `steps_per_call` steps in one call; returns their losses."""
        return [self.train_step(batch, adam) for batch, adam in zip(batches, adams)]

    def loss_and_gradients(self, batch: TokenBatch) -> tuple[float, dict[str, np.ndarray]]:
        """The step's loss and float64 gradients by name, with no update (when
        `provides_gradients`)."""
        raise NotImplementedError(f"backend {self.name} does not expose its gradients")

    def optimizer_moments(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Adam's first and second moments (m, v) as float64 arrays by name, [out, in] like
        `parameters()`, as they stand after the last step (zeros after `load_parameters`),
        when `provides_moments`."""
        raise NotImplementedError(f"backend {self.name} does not expose its Adam moments")

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

    def trace_counts(self) -> dict[str, int]:
        """How many times each compiled function was traced, for backends that trace (one
        trace must serve every sequence length); empty for those that do not."""
        return {}

    def configure_process(self) -> dict:
        """Process-wide settings (CPU affinity, ...) this backend wants when it has a process
        of its own, as in the harness's workers; called once, before compilation. Not called
        in a shared process (the tests), where it would change the other backends'
        conditions. Returns what was set, recorded in the result file."""
        return {}

    def details(self) -> dict:
        """Backend-specific facts for the result file (threads, compile mode, ...)."""
        return {}
