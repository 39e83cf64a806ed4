"""Deliberately broken backends for the fault tests (never registered in the real suite).

The tests register them through the worker's test hook,
MICROGPT_BENCH_EXTRA_BACKENDS="name=tests.fault_backends:Class,...", so that they run through the
real CLI, runner and worker. Each is the numpy backend with one fault injected at the step
FAULT_STEP_ENV_VAR names (0-based step of the run; the tests use --warmup 0, so the first run of
steps is the timed one). FAULT_PIDFILE_ENV_VAR, when set, receives the worker's pid at the first
step, so a test can kill or interrupt a run that is known to be training.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import time

import numpy as np

from backends.numpy_backend import NumpyBackend

FAULT_STEP_ENV_VAR = "MICROGPT_BENCH_FAULT_STEP"
FAULT_PIDFILE_ENV_VAR = "MICROGPT_BENCH_FAULT_PIDFILE"
STEP_SLEEP_ENV_VAR = "MICROGPT_BENCH_FAULT_STEP_SLEEP"


class FaultBackend(NumpyBackend):
    """numpy with `fault()` called instead of the step at the fault step."""
    name = "fault"

    def __init__(self, config, vocab_size, dtype, device=None):
        super().__init__(config, vocab_size, dtype, device)
        self.fault_step = int(os.environ.get(FAULT_STEP_ENV_VAR, "5"))

    def train_step(self, batch, adam):
        pidfile = os.environ.get(FAULT_PIDFILE_ENV_VAR)
        if pidfile and adam.step == 0:
            with open(pidfile + ".tmp", "w") as handle:
                handle.write(str(os.getpid()))
            os.replace(pidfile + ".tmp", pidfile)
        if adam.step == self.fault_step:
            return self.fault(batch, adam)
        return super().train_step(batch, adam)

    def fault(self, batch, adam):
        return super().train_step(batch, adam)


class SegfaultBackend(FaultBackend):
    """A real segmentation fault in native code (reading address 0)."""
    name = "segfault"

    def fault(self, batch, adam):
        ctypes.string_at(0)


class AbortBackend(FaultBackend):
    """abort(), as a failed assertion in a C++ library does."""
    name = "abort"

    def fault(self, batch, adam):
        os.abort()


class RaisingBackend(FaultBackend):
    name = "raising"

    def fault(self, batch, adam):
        raise RuntimeError("injected failure in train_step")


class HangingBackend(FaultBackend):
    name = "hanging"

    def fault(self, batch, adam):
        time.sleep(3600)


class MemoryHogBackend(FaultBackend):
    """Asks for 16 GiB at once (np.empty: without a memory limit nothing is touched)."""
    name = "memory-hog"

    def fault(self, batch, adam):
        self.hoard = np.empty(16 * 2 ** 30, dtype=np.uint8)
        return super().fault(batch, adam)


class NaNBackend(FaultBackend):
    name = "nan"

    def fault(self, batch, adam):
        super().fault(batch, adam)
        return float("nan")


class DivergingBackend(FaultBackend):
    """A learning rate 1000x too large from the start: the loss really runs away (float64:
    3e5 at step 2 on the tiny config, past the divergence guard)."""
    name = "diverging"

    def train_step(self, batch, adam):
        return NumpyBackend.train_step(
            self, batch, dataclasses.replace(adam, learning_rate=1000 * adam.learning_rate))


class DriftingBackend(FaultBackend):
    """Slightly wrong maths: 5% too large a learning rate. Step 1 matches (its loss comes before
    the first update); the later losses drift past the tolerance."""
    name = "drifting"

    def train_step(self, batch, adam):
        return NumpyBackend.train_step(
            self, batch, dataclasses.replace(adam, learning_rate=1.05 * adam.learning_rate))


class WrongGradientBackend(FaultBackend):
    """A small error in one gradient, from the fault step on: layer 0's MLP output matrix gets
    1% of its gradient's neighbour added to each element (a direction error, which Adam does
    not normalise away as it would a uniform scale). The run still learns like the reference,
    so only a check of the step itself can see it."""
    name = "wrong-gradient"
    tensor = "layer0.mlp_fc2"
    error = 0.01

    def __init__(self, config, vocab_size, dtype, device=None):
        super().__init__(config, vocab_size, dtype, device)
        self.step_index = 0

    def train_step(self, batch, adam):
        self.step_index = adam.step
        return super().train_step(batch, adam)

    def _loss_and_backward(self, batch):
        loss = super()._loss_and_backward(batch)
        if self.step_index >= self.fault_step:
            gradient = self.grads[self.tensor]
            gradient += self.error * np.roll(gradient, 1, axis=1)
        return loss


class SlowBackend(FaultBackend):
    """Correct, but sleeps STEP_SLEEP_ENV_VAR seconds (default 0.05) every step: a run that is
    still training when the test interrupts or kills it."""
    name = "slow"

    def train_step(self, batch, adam):
        time.sleep(float(os.environ.get(STEP_SLEEP_ENV_VAR, "0.05")))
        return super().train_step(batch, adam)


class NoisyBackend(FaultBackend):
    """Correct, but prints to stdout, including a line that looks like a runner event and is
    not JSON: the runner must keep it as output and go on."""
    name = "noisy"

    def fault(self, batch, adam):
        print("@@microgpt-bench {this is not json", flush=True)
        print("hello from the backend", flush=True)
        return super().fault(batch, adam)


ALL = {cls.name: cls for cls in (SegfaultBackend, AbortBackend, RaisingBackend, HangingBackend,
                                 MemoryHogBackend, NaNBackend, DivergingBackend, DriftingBackend,
                                 WrongGradientBackend, SlowBackend, NoisyBackend)}


def registry_value(*names: str) -> str:
    """The MICROGPT_BENCH_EXTRA_BACKENDS value registering these fault backends."""
    return ",".join(f"{name}=tests.fault_backends:{ALL[name].__name__}" for name in names)
