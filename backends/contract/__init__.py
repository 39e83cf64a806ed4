"""The contract between the harness (bench/) and the backends: the config and presets, the
parameter layout, the Adam step scalars, the spec's data order and initial weights, and the
`Backend` interface. Backends import this package and nothing else of the suite.

The rules these types implement are written down in SPEC.md at the top of the repository.
"""
from backends.contract.config import (DTYPES, PRESETS, RMS_EPS, AdamStep, ConfigError,
                                      GPTConfig, ParameterLayout, adam_step, parameter_shapes,
                                      preset, training_flops)
from backends.contract.interface import (DIVISIONS, Availability, Backend, BackendInfo,
                                         BackendUnavailable)
from backends.contract.spec import SpecInstance, TokenBatch, Tokenizer, build_spec

__all__ = ["DIVISIONS", "DTYPES", "PRESETS", "RMS_EPS", "AdamStep", "Availability", "Backend",
           "BackendInfo", "BackendUnavailable", "ConfigError", "GPTConfig", "ParameterLayout",
           "SpecInstance", "TokenBatch", "Tokenizer", "adam_step", "build_spec", "parameter_shapes",
           "preset", "training_flops"]
