"""The runner's timed training loop: one clock reading per call, and backends that run several
steps per call (max-loop) timed per call with an equal share per step."""
from backends.numpy_backend import NumpyBackend
from bench.training import train
from tests.helpers import make_backend


class ChunkedNumpy(NumpyBackend):
    """numpy driven through the several-steps-per-call protocol."""
    steps_per_call = 4

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def train_steps(self, batches, adams):
        self.calls.append(len(batches))
        return [self.train_step(batch, adam) for batch, adam in zip(batches, adams)]


def test_several_steps_per_call(tiny_spec):
    chunked = ChunkedNumpy(tiny_spec.config, tiny_spec.tokenizer.vocab_size, "float64")
    chunked.load_parameters(tiny_spec.parameters)
    seen = []
    run = train(chunked, tiny_spec, 10, on_step=lambda step, loss: seen.append(step))
    assert chunked.calls == [4, 4, 2]
    assert seen == list(range(10))
    reference = train(make_backend("numpy", tiny_spec, "float64"), tiny_spec, 10)
    assert run.losses == reference.losses
    # Each step of a call is credited the same share of that call's time.
    assert run.step_seconds[0] == run.step_seconds[3] and run.step_seconds[8] == run.step_seconds[9]
    assert len(run.step_seconds) == 10


def test_one_step_per_call(tiny_spec):
    run = train(make_backend("numpy", tiny_spec, "float32"), tiny_spec, 5)
    assert len(run.losses) == len(run.step_seconds) == 5 and run.stopped_reason is None
    assert all(seconds > 0 for seconds in run.step_seconds)
