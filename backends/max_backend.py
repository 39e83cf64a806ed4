"""Modular MAX backends: the whole training step (forward, hand-derived backward, Adam) as one
compiled MAX graph, and sampling as a second graph with a key/value cache. float32 only.

- `MaxBackend` (`max`): one graph call per training step.
- `MaxLoopBackend` (`max-loop`): many training steps per graph call, run by a MAX while loop.

The graphs themselves are built in `backends/max_graphs.py`. Parameters and Adam moments live
in one engine-owned buffer `state [3, P]` that the training graph updates in place; each step
only the step's tokens, lengths and two Adam scalars go in, and only the loss comes back.
Compilation happens in `prepare()` (MAX caches compiled graphs under ~/.cache/modular, so a
second process with the same config compiles much faster).
"""
from __future__ import annotations

import time

import numpy as np

from backends.base import Backend, BackendUnavailable, TokenBatch
from bench.config import AdamStep

ACCELERATOR_NAMES = ("gpu", "cuda", "accelerator")


class MaxBackend(Backend):
    """One compiled MAX graph call per training step; parameters stay in the engine."""

    name = "max"
    description = "Modular MAX graphs: forward, hand-derived backward and Adam in one graph"
    requires = ("max",)
    install_hint = 'python -m pip install ".[max]" -c constraints.txt'
    supported_dtypes = ("float32",)
    default_dtype = "float32"
    supports_batches = True

    def __init__(self, config, vocab_size, dtype="float32", device=None):
        super().__init__(config, vocab_size, dtype, device)
        from max.driver import CPU, Accelerator, Buffer
        from max.engine import InferenceSession
        from max.graph import DeviceRef

        from backends.max_graphs import STATE_ROWS, ParameterLayout

        self._Buffer = Buffer
        self.layout = ParameterLayout.for_config(config, vocab_size)
        self.max_device = Accelerator() if self.device == "gpu" else CPU()
        self.device_ref = DeviceRef.from_device(self.max_device)
        self.session = InferenceSession(devices=[self.max_device])
        self.on_host = self.device == "cpu"
        B, T, C, L = config.batch_size, config.block_size, config.n_embd, config.n_layer

        # Engine-owned state: parameters, Adam m, Adam v ([3, P] float32).
        self.state = self._device_buffer(np.zeros((STATE_ROWS, self.layout.total), np.float32))
        # Per-step inputs: host arrays the step writes into, and the buffers the graph reads.
        # On the CPU the buffers share the arrays' memory, so a step copies nothing extra.
        self.host_tokens = np.zeros((B, T + 1), np.int32)
        self.host_lengths = np.zeros(B, np.int32)
        self.host_adam = np.zeros(2, np.float32)
        self.host_token_position = np.zeros(2, np.int32)
        self.step_inputs = [self._input_pair(array) for array in
                            (self.host_tokens, self.host_lengths, self.host_adam)]
        self.sample_input = self._input_pair(self.host_token_position)
        self.cache = self._device_buffer(np.zeros((2, L, T, C), np.float32))
        self.train_model = None
        self.infer_model = None
        self.compile_seconds: dict[str, float] = {}

    # ---- devices and buffers ---------------------------------------------------------------
    @classmethod
    def _accelerator_count(cls) -> int:
        from max.driver import accelerator_count
        return accelerator_count()

    def resolve_device(self, requested):
        if requested is None:
            return "gpu" if self._accelerator_count() > 0 else "cpu"
        if requested == "cpu":
            return "cpu"
        if requested in ACCELERATOR_NAMES:
            if self._accelerator_count() == 0:
                raise BackendUnavailable(f"backend {self.name}: MAX reports no accelerator")
            return "gpu"
        raise BackendUnavailable(f"backend {self.name} runs on cpu or gpu, not {requested!r}")

    def _device_buffer(self, array: np.ndarray):
        """A buffer on the backend's device holding a copy of `array`."""
        host = self._Buffer.from_numpy(np.ascontiguousarray(array).copy())
        return host if self.on_host else host.to(self.max_device)

    def _input_pair(self, host_array: np.ndarray):
        """(host buffer viewing host_array, buffer the graph reads); the same on the CPU."""
        host = self._Buffer.from_numpy(host_array)
        return host, (host if self.on_host else host.to(self.max_device))

    def _upload(self, pair) -> object:
        host, device = pair
        if device is not host:
            device.inplace_copy_from(host)
        return device

    def _state_numpy(self) -> np.ndarray:
        return self.state.to_numpy()  # [3, P]; a copy when the state lives on an accelerator

    # ---- compilation -----------------------------------------------------------------------
    def _compile(self, label: str, graph):
        start = time.perf_counter()
        model = self.session.load(graph)
        self.compile_seconds[label] = time.perf_counter() - start
        return model

    def _ensure_train_model(self):
        if self.train_model is None:
            from backends.max_graphs import build_train_graph
            graph = build_train_graph(self.config, self.vocab_size, self.layout, self.device_ref)
            self.train_model = self._compile("compile_train_graph_s", graph)
        return self.train_model

    def _ensure_infer_model(self):
        if self.infer_model is None:
            from backends.max_graphs import build_infer_graph
            graph = build_infer_graph(self.config, self.vocab_size, self.layout, self.device_ref)
            self.infer_model = self._compile("compile_infer_graph_s", graph)
        return self.infer_model

    def prepare(self):
        self._ensure_train_model()
        self._ensure_infer_model()
        return dict(self.compile_seconds)

    # ---- parameters ------------------------------------------------------------------------
    def load_parameters(self, parameters):
        state = np.zeros((3, self.layout.total), np.float32)  # moments start at zero
        views = self.layout.split(state[0])
        for name, value in parameters.items():
            views[name][...] = value
        self.state.inplace_copy_from(self._Buffer.from_numpy(state))

    def parameters(self):
        views = self.layout.split(self._state_numpy()[0])
        return {name: value.astype(np.float64) for name, value in views.items()}

    def adam_moments(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Adam's (m, v) per parameter as float64 (for tests: after one step from zero
        moments, m = (1 - beta1) * gradient exposes the graph's gradient exactly)."""
        state = self._state_numpy()
        return tuple({name: value.astype(np.float64)
                      for name, value in self.layout.split(state[row]).items()}
                     for row in (1, 2))

    # ---- training --------------------------------------------------------------------------
    def _write_step_inputs(self, batch: TokenBatch, adam: AdamStep, tokens, lengths, scalars):
        tokens[...] = batch.padded
        lengths[...] = batch.lengths
        # The numpy float32 backend rounds exactly these two scalars to float32.
        scalars[0] = adam.learning_rate / adam.bias_correction1
        scalars[1] = 1.0 / adam.bias_correction2

    def train_step(self, batch, adam):
        model = self._ensure_train_model()
        self._write_step_inputs(batch, adam, self.host_tokens, self.host_lengths, self.host_adam)
        tokens, lengths, scalars = (self._upload(pair) for pair in self.step_inputs)
        loss, = model.execute(self.state, tokens, lengths, scalars)
        return loss.item()

    # ---- sampling --------------------------------------------------------------------------
    def reset_cache(self):
        # The graph masks cache rows after the current position, so this is for tidiness only.
        self.cache.inplace_copy_from(self._Buffer.from_numpy(
            np.zeros(tuple(self.cache.shape), np.float32)))

    def next_logits(self, token, position):
        model = self._ensure_infer_model()
        self.host_token_position[0] = token
        self.host_token_position[1] = position
        logits, = model.execute(self.state, self.cache, self._upload(self.sample_input))
        return logits.to_numpy().astype(np.float64)

    def details(self):
        return {"device": str(self.max_device), "graph_inputs": "state [3,P] in place",
                **self.compile_seconds}
