"""Checkpoint parity: at a few steps of a run, outside the clock, redo the backend's step in
float64 from the backend's own state and compare (SPEC.md, "Parity").

Comparing whole loss trajectories stops working as models grow: float32 rounding is amplified
step after step (a ReLU gate flips, Adam turns a rounding-level gradient into a full-size
update), and two correct float32 runs of `small` part ways by 1e-2 within a hundred steps. The
error of one step does not grow that way. So at each checkpoint step s the harness takes the
backend's parameters P and Adam moments (m, v) before the step and after it, and checks:

- the loss: the backend's loss against the float64 loss at P (numpy float64, same batch);
- the gradient: the backend's own gradient, read back from its moments as
  g = (m_after - beta1 m_before) / (1 - beta1), against the float64 gradient at P, per tensor
  (relative L2 error): this is the check a wrong backward pass fails;
- the second moment: v_after against beta2 v_before + (1 - beta2) g_ref^2, per tensor;
- the update: P_after - P against Adam's update computed in float64 from the backend's own
  m_after and v_after, per tensor: the optimiser arithmetic, the schedule, bias corrections.

Each is tight at any size and any length of run, since it never compares two trajectories.
Tolerances are per dtype (CHECKPOINT_TOLERANCE) and are measured margins over what correct
float32 backends show (README, "Parity").

One thing float32 rounding can change by more than rounding: a ReLU whose pre-activation is
within rounding of zero may fall on the other side, moving the gradient by that position's
whole share (1e-2 relative at `medium`, once in ~40 steps). When a float32 gradient or second
moment fails and the float64 forward pass has such a gate (numpy's `relu_margin` below
GATE_MARGIN), the checkpoint is inconclusive and the next step is checked in its place, up to
MAX_RETRIES times; a wrong gradient fails at the first step without such a gate.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from backends.contract import AdamStep, Backend, GPTConfig, TokenBatch

# Checkpoints per run: the first step, then evenly spaced up to the last step.
CHECKPOINTS_PER_RUN = 10


@dataclass(frozen=True)
class CheckpointTolerance:
    loss: float  # |loss - float64 loss| at the same parameters
    gradient: float  # per-tensor ||g - g_ref|| / ||g_ref||
    second_moment: float  # per-tensor relative L2 of v
    update: float  # per-tensor ||dP - dP_ref|| / ||dP_ref||, plus the dtype's rounding of P


CHECKPOINT_TOLERANCE = {
    "float64": CheckpointTolerance(loss=1e-9, gradient=1e-8, second_moment=1e-8, update=1e-8),
    "float32": CheckpointTolerance(loss=1e-4, gradient=1e-4, second_moment=1e-4, update=1e-4),
}
GATE_MARGIN = 1e-5
MAX_RETRIES = 5
# Storing P in float32 rounds it by up to half an ulp; late in a run the update (lr decays to
# zero) is not much larger, so the update's tolerance adds this many ulps of |P| per element.
ROUNDING_ULPS = 2.0


def checkpoint_steps(steps: int, count: int = CHECKPOINTS_PER_RUN) -> list[int]:
    """0-based steps to check: the first, the last, and evenly spaced between."""
    if steps <= 0:
        return []
    if steps <= count:
        return list(range(steps))
    return sorted({round(i * (steps - 1) / (count - 1)) for i in range(count)})


@dataclass
class StateSnapshot:
    parameters: dict[str, np.ndarray]
    first_moment: dict[str, np.ndarray]
    second_moment: dict[str, np.ndarray]

    @classmethod
    def of(cls, backend: Backend) -> "StateSnapshot":
        first, second = backend.optimizer_moments()
        return cls(backend.parameters(), first, second)


@dataclass
class CheckpointResult:
    step: int  # 1-based, as the original prints steps
    loss: float
    reference_loss: float
    loss_error: float
    gradient_error: float
    gradient_tensor: str  # where the gradient error is largest
    second_moment_error: float
    update_error: float
    update_tensor: str
    passed: bool
    failure: str = ""  # which check failed, in words
    # A float32 failure at a step with a ReLU gate within rounding of zero: not counted, the
    # next step is checked instead.
    inconclusive: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _relative_error(got: np.ndarray, expected: np.ndarray, allowance: float = 0.0) -> float:
    """||got - expected|| / ||expected||, after forgiving `allowance` (an L2 norm) of error;
    a tensor whose expected value is all zeros must be matched to the allowance."""
    error = max(0.0, float(np.linalg.norm(got - expected)) - allowance)
    scale = float(np.linalg.norm(expected))
    if error == 0.0:
        return 0.0
    return error / scale if scale > 0 else math.inf


def _worst(errors: dict[str, float]) -> tuple[float, str]:
    name = max(errors, key=errors.get)
    return errors[name], name


class CheckpointChecker:
    """Compares a backend's steps at the checkpoints with float64 steps from its own state.

    Needs the backend's `optimizer_moments` (Backend.provides_moments). The float64 step is
    numpy's `loss_and_gradients`, the backend the suite's reference losses come from."""

    def __init__(self, config: GPTConfig, vocab_size: int, dtype: str, steps: int):
        from backends import create_backend  # the registry imports backends lazily
        self.config = config
        self.dtype = dtype
        self.tolerance = CHECKPOINT_TOLERANCE[dtype]
        self.epsilon = float(np.finfo(dtype).eps)
        self.run_steps = steps
        self.steps = set(checkpoint_steps(steps))
        self.reference = create_backend("numpy", config, vocab_size, "float64")
        self.results: list[CheckpointResult] = []
        self.retries = 0

    def wants(self, step: int) -> bool:
        return step in self.steps

    def check(self, step: int, before: StateSnapshot, after: StateSnapshot, loss: float,
              batch: TokenBatch, adam: AdamStep) -> CheckpointResult:
        cfg, tol = self.config, self.tolerance
        self.reference.load_parameters(before.parameters)
        reference_loss, reference_gradients = self.reference.loss_and_gradients(batch)
        gradient_errors, moment_errors, update_errors = {}, {}, {}
        for name, reference_gradient in reference_gradients.items():
            m_before, v_before = before.first_moment[name], before.second_moment[name]
            m_after, v_after = after.first_moment[name], after.second_moment[name]
            gradient = (m_after - cfg.beta1 * m_before) / (1 - cfg.beta1)
            gradient_errors[name] = _relative_error(gradient, reference_gradient)
            expected_v = cfg.beta2 * v_before + (1 - cfg.beta2) * reference_gradient ** 2
            moment_errors[name] = _relative_error(v_after, expected_v)
            update = after.parameters[name] - before.parameters[name]
            expected_update = -adam.learning_rate * (m_after / adam.bias_correction1) / (
                np.sqrt(v_after / adam.bias_correction2) + cfg.eps)
            rounding = ROUNDING_ULPS * self.epsilon * float(np.linalg.norm(after.parameters[name]))
            update_errors[name] = _relative_error(update, expected_update, rounding)
        gradient_error, gradient_tensor = _worst(gradient_errors)
        moment_error, _ = _worst(moment_errors)
        update_error, update_tensor = _worst(update_errors)
        loss_error = abs(loss - reference_loss) if math.isfinite(loss) else math.inf
        failures = [text for text, failed in (
            (f"loss {loss:.6f} vs {reference_loss:.6f} (|diff| {loss_error:.3g} > "
             f"{tol.loss:g})", not loss_error <= tol.loss),
            (f"gradient of {gradient_tensor} off by {gradient_error:.3g} (relative, > "
             f"{tol.gradient:g})", not gradient_error <= tol.gradient),
            (f"second moment off by {moment_error:.3g} (relative, > {tol.second_moment:g})",
             not moment_error <= tol.second_moment),
            (f"update of {update_tensor} off by {update_error:.3g} (relative, > "
             f"{tol.update:g})", not update_error <= tol.update)) if failed]
        result = CheckpointResult(
            step=step + 1, loss=loss, reference_loss=reference_loss, loss_error=loss_error,
            gradient_error=gradient_error, gradient_tensor=gradient_tensor,
            second_moment_error=moment_error, update_error=update_error,
            update_tensor=update_tensor, passed=not failures, failure="; ".join(failures))
        gradient_only = failures and loss_error <= tol.loss and update_error <= tol.update
        if gradient_only and self.dtype == "float32" and self.retries < MAX_RETRIES:
            margin = self.reference.relu_margin(batch)
            if margin < GATE_MARGIN:
                # The run's last step has no later step to check instead: it is left out, and
                # the verdict rests on the other checkpoints (a wrong backward shows at each).
                last = step + 1 >= self.run_steps
                result.inconclusive = True
                result.failure += (f" at a ReLU gate {margin:.2g} (relative) from zero: "
                                   + ("inconclusive, the run's last step" if last else
                                      f"inconclusive, step {step + 2} checked instead"))
                self.retries += 1
                if not last:
                    self.steps.add(step + 1)
        self.results.append(result)
        return result

    def summary(self) -> dict:
        """The checkpoint block of the run's parity verdict."""
        counted = [result for result in self.results if not result.inconclusive]
        failed = [result for result in counted if not result.passed]
        tol = self.tolerance
        worst = {key: max((getattr(result, key) for result in counted), default=0.0)
                 for key in ("loss_error", "gradient_error", "second_moment_error",
                             "update_error")}
        if not counted:
            message = "no checkpoint step was checked"
        elif failed:
            message = (f"checkpoint step {failed[0].step} DOES NOT MATCH a float64 step from "
                       f"its own state: {failed[0].failure}")
        else:
            message = (f"{len(counted)} checkpoint steps match float64 steps from their own "
                       f"state (max loss error {worst['loss_error']:.2g}, gradient "
                       f"{worst['gradient_error']:.2g}, update {worst['update_error']:.2g}; "
                       f"tolerances {tol.loss:g}, {tol.gradient:g}, {tol.update:g} for "
                       f"{self.dtype})")
        inconclusive = len(self.results) - len(counted)
        if inconclusive:
            message += (f"; {inconclusive} inconclusive at a float32 ReLU gate, replaced by "
                        f"the next step (left out at the run's last step)")
        return {"passed": bool(counted) and not failed, "steps": [r.step for r in counted],
                "failed_steps": [r.step for r in failed], "inconclusive": inconclusive,
                "worst": worst, "tolerance": asdict(tol), "message": message,
                "results": [result.to_dict() for result in self.results]}
