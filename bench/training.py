"""The training and sampling loops every backend runs under, with the clock around them.

The runner owns these loops so that every backend is timed the same way: token batches and Adam
scalars are prepared before the clock starts; each timed step is `train_step` (which returns the
loss on the host) followed by `sync`, so queued device work cannot leak into the next step.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from backends.contract import Backend, SpecInstance, TokenBatch, adam_step
from bench.checkpoints import StateSnapshot


@dataclass
class TrainingRun:
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    stopped_reason: str | None = None  # set when training stopped early (NaN, divergence)


@dataclass
class SamplingRun:
    samples: list[str]
    tokens: int
    total_seconds: float


# A loss this far above the initial ln(vocab) means the run diverged; stop rather than spend
# the timeout on garbage. Generous on purpose: the spec's model at the `large` preset spikes to
# ~36 ln(vocab) around step 6 and then recovers (that is the spec's honest behaviour, not a
# fault), while a real runaway ends in inf/NaN.
DIVERGENCE_FACTOR = 100.0


def prepare_batches(spec: SpecInstance, steps: int) -> list[TokenBatch]:
    return [spec.step_batch(step) for step in range(steps)]


def train(backend: Backend, spec: SpecInstance, steps: int | None = None,
          on_step=None, checker=None) -> TrainingRun:
    """Run `steps` (default: the config's num_steps) timed training steps from the backend's
    current state. `on_step(step, loss)` is called outside the timed region.

    A backend with `steps_per_call` > 1 (max-loop) is timed per `train_steps` call of up to
    that many steps, and each step of a call is credited an equal
    share of the call's time: its per-step figures are call averages, not single steps.

    With a `checker` (bench.checkpoints.CheckpointChecker), the backend's state is read before
    and after each checkpoint step, outside the clock, and the step is checked against a
    float64 step from that state; a checkpoint step of a multi-step backend is a call of its
    own."""
    steps = spec.config.num_steps if steps is None else steps
    batches = prepare_batches(spec, steps)
    adam = [adam_step(spec.config, step) for step in range(steps)]
    diverged_above = DIVERGENCE_FACTOR * math.log(spec.tokenizer.vocab_size)
    steps_per_call = backend.steps_per_call
    multi_step = steps_per_call > 1
    run = TrainingRun()
    clock = time.perf_counter
    step = 0
    while step < steps:
        checked = checker is not None and checker.wants(step)
        before = StateSnapshot.of(backend) if checked else None
        count = min(steps_per_call, steps - step, *(
            [next_check - step for next_check in _next_checkpoint(checker, step)])) if (
            multi_step and not checked) else 1
        start = clock()
        if count > 1:
            losses = backend.train_steps(batches[step: step + count], adam[step: step + count])
        else:
            losses = [backend.train_step(batches[step], adam[step])]
        backend.sync()
        elapsed = clock() - start
        if checked:
            checker.check(step, before, StateSnapshot.of(backend), losses[0], batches[step],
                          adam[step])
        for loss in losses:
            run.losses.append(loss)
            run.step_seconds.append(elapsed / count)
            if on_step is not None:
                on_step(step, loss)
            step += 1
            if not math.isfinite(loss):
                run.stopped_reason = f"loss is {loss} at step {step}"
                return run
            if loss > diverged_above:
                run.stopped_reason = f"diverged: loss {loss:.4g} at step {step}"
                return run
    return run


def _next_checkpoint(checker, step: int) -> list[int]:
    """The next checkpoint after `step` (a multi-step call stops short of it), if any."""
    if checker is None:
        return []
    later = [check for check in checker.steps if check > step]
    return [min(later)] if later else []


def softmax_probabilities(logits, temperature: float) -> list[float]:
    """softmax(logits / temperature) in float64 on the host, in the original program's order of
    operations (max subtracted, exp, sum left to right, divide), so that samples drawn from the
    same generator state agree with it."""
    # The original divides as x * t**-1 (its Value.__truediv__); keep that exact form.
    inverse_temperature = temperature ** -1
    scaled = [float(value) * inverse_temperature for value in logits]
    top = max(scaled)
    exps = [math.exp(value - top) for value in scaled]
    inverse_total = sum(exps) ** -1
    return [value * inverse_total for value in exps]


def sample(backend: Backend, spec: SpecInstance, num_samples: int | None = None) -> SamplingRun:
    """Draw names from the spec's generator stream (SPEC.md, "Sampling"), timing the whole."""
    cfg, tokenizer = spec.config, spec.tokenizer
    num_samples = cfg.num_samples if num_samples is None else num_samples
    rng = spec.sampling_rng()
    vocab = range(tokenizer.vocab_size)
    samples, tokens = [], 0
    start = time.perf_counter()
    for _ in range(num_samples):
        backend.reset_cache()
        token, chars = tokenizer.bos, []
        for position in range(cfg.block_size):
            logits = backend.next_logits(token, position)
            tokens += 1
            probs = softmax_probabilities(logits, cfg.temperature)
            token = rng.choices(vocab, weights=probs)[0]
            if token == tokenizer.bos:
                break
            chars.append(tokenizer.chars[token])
        samples.append("".join(chars))
    backend.sync()
    return SamplingRun(samples=samples, tokens=tokens, total_seconds=time.perf_counter() - start)
