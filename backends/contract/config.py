"""The model and training configuration (SPEC.md, "Hyper-parameters" and "Presets"), the
parameter shapes and their flat layout, the per-step Adam scalars, and the spec's constants.

`GPTConfig` is the one object every backend, the harness and the tests take. `tiny` is the
spec's default (the original microgpt.py); the larger presets keep every rule of the spec and
exist for scaling runs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

# The dtypes a backend may compute in; the reference computes in float64.
DTYPES = ("float32", "float64")
# rmsnorm(x) = x * (mean(x*x) + RMS_EPS) ** -0.5
RMS_EPS = 1e-5


class ConfigError(ValueError):
    """An invalid configuration; the message names the offending field."""


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int = 1
    n_embd: int = 16
    n_head: int = 4
    block_size: int = 16
    batch_size: int = 1  # documents per step; 1 is the original program (SPEC.md, "Batches")
    num_steps: int = 1000
    learning_rate: float = 0.01
    beta1: float = 0.85
    beta2: float = 0.99
    eps: float = 1e-8
    init_std: float = 0.08
    seed: int = 42
    temperature: float = 0.5
    num_samples: int = 20

    def __post_init__(self):
        positive_ints = ("n_layer", "n_embd", "n_head", "block_size", "batch_size", "num_steps")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if self.num_samples < 0:
            raise ConfigError(f"num_samples must be >= 0, got {self.num_samples!r}")
        if self.n_embd % self.n_head != 0:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for name in ("learning_rate", "init_std", "temperature", "eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def replace(self, **changes) -> "GPTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**values)

    def num_parameters(self, vocab_size: int) -> int:
        return ParameterLayout.for_config(self, vocab_size).total


# Width, depth and context grow together; `tiny` is SPEC.md's default.
PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(),
    "small": GPTConfig(n_layer=2, n_embd=32, n_head=4, block_size=32),
    "medium": GPTConfig(n_layer=4, n_embd=64, n_head=4, block_size=64),
    "large": GPTConfig(n_layer=6, n_embd=128, n_head=8, block_size=64),
}


def preset(name: str, **overrides) -> GPTConfig:
    """The named preset with some fields replaced (e.g. num_steps)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown config preset {name!r}; choose one of: {', '.join(PRESETS)}")
    overrides = {key: value for key, value in overrides.items() if value is not None}
    try:
        return PRESETS[name].replace(**overrides)
    except TypeError as error:  # an unknown field name
        raise ConfigError(str(error)) from None


def parameter_shapes(config: GPTConfig, vocab_size: int) -> list[tuple[str, tuple[int, int]]]:
    """Parameter names and [out, in] shapes in the spec's draw order."""
    d = config.n_embd
    shapes = [
        ("wte", (vocab_size, d)),
        ("wpe", (config.block_size, d)),
        ("lm_head", (vocab_size, d)),
    ]
    for i in range(config.n_layer):
        shapes += [
            (f"layer{i}.attn_wq", (d, d)),
            (f"layer{i}.attn_wk", (d, d)),
            (f"layer{i}.attn_wv", (d, d)),
            (f"layer{i}.attn_wo", (d, d)),
            (f"layer{i}.mlp_fc1", (4 * d, d)),
            (f"layer{i}.mlp_fc2", (d, 4 * d)),
        ]
    return shapes


@dataclass(frozen=True)
class ParameterLayout:
    """Where each parameter lives in one flat buffer: the spec's draw order, each row-major
    (SPEC.md, "Flat layout"). Backends that keep parameters and Adam moments in flat buffers
    use this, so that the order is defined once."""
    entries: tuple[tuple[str, tuple[int, int], int], ...]  # (name, [out, in], offset)
    total: int

    @classmethod
    def for_config(cls, config: GPTConfig, vocab_size: int) -> "ParameterLayout":
        entries, offset = [], 0
        for name, shape in parameter_shapes(config, vocab_size):
            entries.append((name, shape, offset))
            offset += shape[0] * shape[1]
        return cls(tuple(entries), offset)

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {name: shape for name, shape, _ in self.entries}

    def span(self, name: str) -> tuple[int, int]:
        """(start, stop) of parameter `name` in the flat buffer."""
        for entry_name, (rows, cols), offset in self.entries:
            if entry_name == name:
                return offset, offset + rows * cols
        raise KeyError(name)

    def slice(self, flat, first: str, last: str):
        """The flat range from parameter `first` through `last` (adjacent in draw order)."""
        return flat[self.span(first)[0]: self.span(last)[1]]

    def split(self, flat) -> dict:
        """name -> [out, in] view of a flat buffer (numpy array or any tensor with reshape)."""
        return {name: flat[offset: offset + rows * cols].reshape((rows, cols))
                for name, (rows, cols), offset in self.entries}

    def flatten(self, parameters: dict, dtype="float64"):
        """The named [out, in] arrays concatenated into one numpy buffer in layout order."""
        return np.concatenate([np.asarray(parameters[name], dtype=dtype).reshape(-1)
                               for name, _, _ in self.entries])


def training_flops(config: GPTConfig, vocab_size: int, lengths) -> float:
    """Floating-point operations of one training step on sequences of these lengths (the
    predicted positions n of each row): 2 per multiply-add of the forward pass (every layer's
    q, k, v, o and MLP matrices, causal attention over p + 1 keys at position p, the
    language-model head), times 3 for forward plus backward. Padding is not counted: this is
    the work the spec asks for, whatever a backend computes on top."""
    d, layers = config.n_embd, config.n_layer
    per_position = layers * 12 * d * d + vocab_size * d
    total = 0
    for n in lengths:
        n = int(n)
        total += n * per_position + layers * d * n * (n + 1)  # attention: QK and AV
    return 3.0 * 2.0 * total


@dataclass(frozen=True)
class AdamStep:
    """The scalars of one Adam update, computed once in float64 by the harness so that every
    backend applies exactly the same learning rate and bias corrections."""
    step: int
    learning_rate: float  # lr_s = lr * (1 - s / num_steps)
    bias_correction1: float  # 1 - beta1 ** (s + 1)
    bias_correction2: float  # 1 - beta2 ** (s + 1)


def adam_step(config: GPTConfig, step: int) -> AdamStep:
    return AdamStep(
        step=step,
        learning_rate=config.learning_rate * (1 - step / config.num_steps),
        bias_correction1=1 - config.beta1 ** (step + 1),
        bias_correction2=1 - config.beta2 ** (step + 1),
    )
