"""Modular MAX backends: the whole training step (forward, hand-derived backward, Adam) as one
compiled MAX graph, and sampling as a second graph with a key/value cache. float32 only.

- `MaxBackend` (`max`): one graph call per training step.
- `MaxLoopBackend` (`max-loop`): up to K training steps per graph call, looped inside the graph
  by a MAX while loop (protocol in its docstring).

The graphs are built in `backends/max_graphs.py`. Parameters and both Adam moments live in one
engine-owned buffer `state [3, P]`: each training call takes it and returns the next one, which
replaces it (outputs fed back as inputs; nothing goes to the host). Per step only the step's
padded tokens, lengths and two Adam scalars go in, written into input buffers allocated once
(on the CPU they share memory with numpy arrays), and only the loss comes back. Compilation
happens in `prepare()`; MAX caches compiled graphs under ~/.cache/modular (or
$MODULAR_CACHE_DIR), so a later process with the same graph compiles much faster (on a 2-core
CPU a cold tiny training graph takes minutes, a cached one seconds). The training graphs have a
symbolic batch dimension and sampling has none, so each model config compiles one training
graph per row (`max`, `max-loop`) and one sampling graph shared by both rows, whatever the
batch size: a scaling sweep's later batch sizes find them in the cache.

MAX runs work asynchronously: an engine copy (`inplace_copy_from`) may read its source after
the call returns, so host arrays handed to one must stay alive until the device is synchronized
(`_copy_in`), and step inputs are rewritten only after the previous step has finished.
"""
from __future__ import annotations

import time

import numpy as np

from backends.contract import AdamStep, Backend, BackendUnavailable, TokenBatch

ACCELERATOR_NAMES = ("gpu", "cuda", "accelerator")


def _adam_scalars(adam: AdamStep) -> tuple[float, float]:
    # The numpy float32 backend rounds exactly these two products to float32.
    return adam.learning_rate / adam.bias_correction1, 1.0 / adam.bias_correction2


class MaxBackend(Backend):
    """One compiled MAX graph call per training step; parameters stay in the engine."""

    name = "max"
    provides_gradients = True
    provides_moments = True

    def __init__(self, config, vocab_size, dtype="float32", device=None):
        super().__init__(config, vocab_size, dtype, device)
        from max.driver import CPU, Accelerator, Buffer
        from max.engine import InferenceSession
        from max.graph import DeviceRef

        from backends.max_graphs import STATE_ROWS

        self._Buffer = Buffer
        self.max_device = Accelerator() if self.device == "gpu" else CPU()
        self.host_device = CPU()
        self.on_host = self.device == "cpu"
        self.device_ref = DeviceRef.from_device(self.max_device)
        self.session = InferenceSession(devices=[self.max_device])
        L, T, C = config.n_layer, config.block_size, config.n_embd

        # Engine-owned state: parameters, Adam m, Adam v, [3, P] float32.
        self.state = self._new_buffer((STATE_ROWS, self.layout.total), np.float32)
        # Keys and values for sampling, [2, n_layer, T, C].
        self.cache = self._new_buffer((2, L, T, C), np.float32)
        self.host_token_position = np.zeros(2, np.int32)
        self.sample_input = self._staged(self.host_token_position)
        self._make_step_inputs()
        self.train_model = None
        self.infer_model = None
        self.compile_seconds: dict[str, float] = {}
        self.compilations: dict[str, int] = {}  # graphs compiled, by label

    def _make_step_inputs(self):
        B, T = self.config.batch_size, self.config.block_size
        self.host_tokens = np.zeros((B, T + 1), np.int32)
        self.host_lengths = np.zeros(B, np.int32)
        self.host_adam = np.zeros(2, np.float32)
        self.step_inputs = [self._staged(array) for array in
                            (self.host_tokens, self.host_lengths, self.host_adam)]
        self.step_buffers = [device for _, device in self.step_inputs]

    # ---- devices and buffers ---------------------------------------------------------------
    @staticmethod
    def _accelerator_count() -> int:
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

    def _new_buffer(self, shape, dtype):
        from max.dtype import DType
        buffer = self._Buffer(DType.from_numpy(np.dtype(dtype)), list(shape),
                              device=self.max_device)
        self._copy_in(buffer, np.zeros(shape, dtype))
        return buffer

    def _staged(self, host_array: np.ndarray):
        """(host buffer viewing host_array, buffer the graph reads). On the CPU they are one
        buffer sharing host_array's memory, so writing the array is the whole upload."""
        host = self._Buffer.from_numpy(host_array)
        if self.on_host:
            return host, host
        from max.dtype import DType
        device = self._Buffer(DType.from_numpy(host_array.dtype), list(host_array.shape),
                              device=self.max_device)
        return host, device

    def _upload(self, *staged_inputs) -> None:
        """Copy staged host arrays to their device buffers (nothing to do on the CPU)."""
        if not self.on_host:
            for host, device in staged_inputs:
                device.inplace_copy_from(host)

    def _copy_in(self, destination, array: np.ndarray) -> None:
        """Copy a host array into an engine buffer and wait: the copy runs asynchronously and
        would otherwise read `array` after it is freed."""
        source = self._Buffer.from_numpy(np.ascontiguousarray(array))
        destination.inplace_copy_from(source)
        self.max_device.synchronize()

    def _to_host(self, buffer) -> np.ndarray:
        self.max_device.synchronize()
        return buffer.to_numpy() if self.on_host else buffer.to(self.host_device).to_numpy()

    def _execute(self, model, inputs):
        return model.execute(*inputs)  # MAX's public entry point

    # ---- compilation -----------------------------------------------------------------------
    def _compile(self, label: str, build):
        start = time.perf_counter()
        graph = build(self.config, self.vocab_size, self.layout, self.device_ref)
        model = self.session.load(graph)
        self.compile_seconds[label] = time.perf_counter() - start
        self.compilations[label] = self.compilations.get(label, 0) + 1
        return model

    def _ensure_train_model(self):
        if self.train_model is None:
            from backends.max_graphs import build_train_graph
            self.train_model = self._compile("compile_train_graph_s", build_train_graph)
        return self.train_model

    def _ensure_infer_model(self):
        if self.infer_model is None:
            from backends.max_graphs import build_infer_graph
            self.infer_model = self._compile("compile_infer_graph_s", build_infer_graph)
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
        self._copy_in(self.state, state)

    def parameters(self):
        views = self.layout.split(self._to_host(self.state)[0])
        return {name: value.astype(np.float64) for name, value in views.items()}

    def optimizer_moments(self):
        """Adam's moments, rows 1 and 2 of the engine state, by name, [out, in], float64."""
        state = self._to_host(self.state)
        return tuple({name: value.astype(np.float64) for name, value in
                      self.layout.split(state[row]).items()} for row in (1, 2))

    def loss_and_gradients(self, batch):
        """The compiled step's own gradient: one step with learning rate 0 from zeroed
        moments leaves the parameters as they were and m = (1 - beta1) * gradient. The state
        is restored afterwards."""
        saved = self._to_host(self.state).copy()
        zeroed = saved.copy()
        zeroed[1:] = 0
        self._copy_in(self.state, zeroed)
        cfg = self.config
        loss = self.train_step(batch, AdamStep(step=0, learning_rate=0.0,
                                               bias_correction1=1 - cfg.beta1,
                                               bias_correction2=1 - cfg.beta2))
        first_moment = self._to_host(self.state)[1].astype(np.float64) / (1 - cfg.beta1)
        self._copy_in(self.state, saved)
        return loss, self.layout.split(first_moment)

    # ---- training --------------------------------------------------------------------------
    def train_step(self, batch: TokenBatch, adam: AdamStep) -> float:
        model = self._ensure_train_model()
        # Safe to overwrite: the previous step finished before it returned.
        self.host_tokens[...] = batch.padded
        self.host_lengths[...] = batch.lengths
        self.host_adam[:] = _adam_scalars(adam)
        self._upload(*self.step_inputs)
        loss, self.state = self._execute(model, [self.state, *self.step_buffers])
        value = loss.item() if self.on_host else loss.to(self.host_device).item()
        # Reading the loss waits for that output; also wait for the whole call before the step
        # inputs can be rewritten (free when already done, under a microsecond).
        self.max_device.synchronize()
        return value

    def sync(self):
        self.max_device.synchronize()

    # ---- sampling --------------------------------------------------------------------------
    def reset_cache(self):
        # The graph masks cache rows after the current position; zeroing is for tidiness.
        self._copy_in(self.cache, np.zeros(tuple(self.cache.shape), np.float32))

    def next_logits(self, token, position):
        model = self._ensure_infer_model()
        self.host_token_position[0] = token
        self.host_token_position[1] = position
        self._upload(self.sample_input)
        logits, = self._execute(model, [self.state, self.cache, self.sample_input[1]])
        values = self._to_host(logits)
        return values.astype(np.float64)

    def trace_counts(self):
        return dict(self.compilations)

    def details(self):
        kernels = {}
        for label, model in (("train_graph_kernels", self.train_model),
                             ("infer_graph_kernels", self.infer_model)):
            if model is not None:
                kernels[label] = sum(1 for kernel in model.kernel_summaries
                                     if kernel not in ("mgp.buffer.alloc", "index.constant"))
        return {"max_device": str(self.max_device), "state": "one [3, P] engine buffer",
                "train_graph_batch": "symbolic (one graph for every batch size)",
                **kernels, **self.compile_seconds}


class MaxLoopBackend(MaxBackend):
    """`max` with the training loop inside the graph: a MAX while loop runs up to
    `steps_per_call` (K) training steps per graph call.

    Protocol: `train_steps(batches, adams) -> list[float]` takes any number of consecutive
    steps, runs them in graph calls of at most K steps each (the step data for a call is packed
    into [K, ...] inputs; a count input says how many of the K slots are real) and returns
    every step's loss (one [K] loss vector comes back per call). `train_step` is the same graph
    with a count of 1, so the backend also runs under the one-step-at-a-time runner, but what
    it saves (the per-call Python and dispatch cost, about 10-15 us of a 0.2 ms step on a
    2-core CPU) only shows when a runner hands it K steps at once and credits each step
    1/count of the call. Parameters, moments, losses and sampling are exactly as in `max` (the
    loop body is the same step).
    """

    name = "max-loop"
    steps_per_call = 50

    def _make_step_inputs(self):
        K, B, T = self.steps_per_call, self.config.batch_size, self.config.block_size
        self.host_tokens = np.zeros((K, B, T + 1), np.int32)
        self.host_lengths = np.zeros((K, B), np.int32)
        self.host_adam = np.zeros((K, 2), np.float32)
        self.host_count = np.zeros(1, np.int32)
        self.step_inputs = [self._staged(array) for array in
                            (self.host_tokens, self.host_lengths, self.host_adam,
                             self.host_count)]
        self.step_buffers = [device for _, device in self.step_inputs]

    def _ensure_train_model(self):
        if self.train_model is None:
            from backends.max_graphs import build_train_loop_graph

            def build(config, vocab_size, layout, device_ref):
                return build_train_loop_graph(config, vocab_size, layout, device_ref,
                                              self.steps_per_call)
            self.train_model = self._compile("compile_train_loop_graph_s", build)
        return self.train_model

    def _execute(self, model, inputs):
        # Model.execute validates and converts every argument in Python; the inputs here are
        # already engine buffers of the right type, so call the engine directly when this MAX
        # version has that (private) entry point. A declared tuning of this row.
        execute = getattr(model, "_execute_device_tensors", None)
        return execute(inputs) if execute is not None else model.execute(*inputs)

    def _run_chunk(self, batches, adams) -> list[float]:
        model = self._ensure_train_model()
        count = len(batches)
        for slot, (batch, adam) in enumerate(zip(batches, adams)):
            self.host_tokens[slot] = batch.padded
            self.host_lengths[slot] = batch.lengths
            self.host_adam[slot] = _adam_scalars(adam)
        self.host_count[0] = count
        self._upload(*self.step_inputs)
        losses, self.state = self._execute(model, [self.state, *self.step_buffers])
        values = self._to_host(losses)[:count]
        return [float(value) for value in values]

    def train_steps(self, batches: list[TokenBatch], adams: list[AdamStep]) -> list[float]:
        if len(batches) != len(adams):
            raise ValueError("train_steps needs one AdamStep per batch")
        K = self.steps_per_call
        losses = []
        for start in range(0, len(batches), K):
            losses += self._run_chunk(batches[start: start + K], adams[start: start + K])
        return losses

    def train_step(self, batch, adam):
        return self._run_chunk([batch], [adam])[0]

    def details(self):
        return {**super().details(), "steps_per_call": self.steps_per_call}
