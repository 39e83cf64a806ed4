"""mojo and mojo-tape backends: the spec in Mojo, called from Python as extension modules.

- `mojo` (MojoBackend): backends/mojo/microgpt_native.mojo, the numpy backend's maths on
  contiguous buffers: forward pass, hand-derived backward, Adam, SIMD kernels; float32 and
  float64; batches.
- `mojo-tape` (MojoTapeBackend): backends/mojo/microgpt_tape.mojo, the python backend's scalar
  autograd tape, compiled, so that the results separate what compiling buys from what changing
  the algorithm buys.

Build: each .mojo file is compiled once with the `mojo` pip package's compiler
(`mojo build --emit shared-lib`, optimised for the host CPU) into
backends/mojo/__mojocache__/<name>.<key>.so, where the key hashes the source, the compiler
version and the CPU; later processes load the cached library. The build happens in prepare()
(or lazily on first use) and is reported as the named duration `mojo_build_s`, with
`mojo_build_cache_hit` in details(). A compiler failure raises BackendUnavailable with the
compiler's message, and leaves a note next to the cache that availability() reports until the
source or the compiler changes.

All model state (parameters, Adam moments, activations, the key/value cache) lives in the Mojo
object between calls; a step passes the token lists and the three Adam scalars and gets the loss
back as a float. Parameters cross as float64 buffers (numpy arrays, by address) only when loaded
and when read back (the Adam moments likewise, when read back).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import platform
import tempfile
import time
import timeit
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import ClassVar

import numpy as np

from backends.contract import Backend, BackendUnavailable

SOURCE_DIR = Path(__file__).resolve().parent / "mojo"
# Error messages keep the compiler's first lines: the first error is the one that matters.
ERROR_LINES_SHOWN = 20


class MojoBuildError(RuntimeError):
    """The Mojo compiler could not build (or Python could not load) an extension module."""


@dataclass(frozen=True)
class LoadedExtension:
    module: ModuleType
    path: Path
    seconds: float  # compile and load, or load only on a cache hit
    cache_hit: bool


# Loaded once per process: initialising a Mojo extension twice would register its Python types
# twice, which Mojo refuses.
_LOADED: dict[Path, LoadedExtension] = {}


def cache_dir(source_dir: Path = SOURCE_DIR) -> Path:
    """__mojocache__ next to the sources, or a per-user temporary folder when the checkout is
    read-only."""
    in_tree = source_dir / "__mojocache__"
    if os.access(in_tree if in_tree.is_dir() else source_dir, os.W_OK):
        return in_tree
    return Path(tempfile.gettempdir()) / f"microgpt-bench-mojocache-{os.getuid()}"


def _cpu_model() -> str:
    # The compiler targets the host CPU, so a library built on one machine must not be loaded
    # on another (a shared or copied checkout).
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def build_key(source: Path) -> str:
    """Hash of what the compiled library depends on: source, compiler version, machine."""
    hasher = hashlib.sha256(source.read_bytes())
    try:
        compiler = importlib.metadata.version("mojo")
    except importlib.metadata.PackageNotFoundError:
        compiler = "unknown"
    for part in (compiler, platform.machine(), _cpu_model()):
        hasher.update(b"\0" + part.encode())
    return hasher.hexdigest()[:16]


def _paths(name: str, source_dir: Path) -> tuple[Path, Path, Path]:
    """(source, compiled library, compiler-error note) of extension `name`."""
    source = source_dir / f"{name}.mojo"
    key = build_key(source) if source.is_file() else "missing"
    folder = cache_dir(source_dir)
    return source, folder / f"{name}.{key}.so", folder / f"{name}.{key}.error.txt"


def _shorten(message: str) -> str:
    """The compiler's first error on the first line (one-line displays keep it), then its
    first lines of output."""
    lines = message.strip().splitlines() or ["no output"]
    first_error = next((line for line in lines if "error:" in line), lines[0])
    if len(lines) > ERROR_LINES_SHOWN:
        lines = lines[:ERROR_LINES_SHOWN] + [f"... ({len(lines) - ERROR_LINES_SHOWN} more lines)"]
    return "\n".join([first_error.strip(), *lines])


def build_problem(name: str, source_dir: Path = SOURCE_DIR) -> str | None:
    """Why extension `name` cannot be built here, as far as can be told cheaply (nothing is
    compiled): a missing source, or a failed build of this exact source and compiler (a
    missing compiler shows when the build runs)."""
    source, library, error_note = _paths(name, source_dir)
    if library.is_file():
        return None
    if not source.is_file():
        return f"the Mojo source {source} is missing"
    if error_note.is_file():
        return (f"the Mojo compiler failed to build {source.name} (delete {error_note} to "
                f"retry): {_shorten(error_note.read_text())}")
    return None


def _compile(source: Path, library: Path, error_note: Path) -> None:
    try:
        from mojo.run import subprocess_run_mojo
    except ImportError as error:
        raise MojoBuildError(f"the mojo package cannot run its compiler: {error}") from error
    library.parent.mkdir(parents=True, exist_ok=True)
    # Build under a private name, then rename: a concurrent process never loads half a file.
    partial = library.with_name(f".{library.stem}.{os.getpid()}.partial.so")
    arguments = ["build", str(source), "--emit", "shared-lib", "-o", str(partial)]
    try:
        completed = subprocess_run_mojo(arguments, capture_output=True, text=True)
    except (OSError, RuntimeError) as error:
        raise MojoBuildError(f"could not run the Mojo compiler: {error}") from error
    if completed.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        message = (completed.stderr or completed.stdout or "no output").strip()
        error_note.write_text(message + "\n")
        raise MojoBuildError(f"`mojo build` of {source.name} failed (exit status "
                             f"{completed.returncode}): {_shorten(message)}")
    os.replace(partial, library)
    # Drop the libraries and notes of older sources (never this build's files).
    for stale in library.parent.glob(f"{source.stem}.*"):
        if stale.name.endswith((".so", ".error.txt")) and stale != library:
            stale.unlink(missing_ok=True)


def _load(name: str, library: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, library)
    with warnings.catch_warnings():
        # Mojo names its Python types without a module prefix; CPython warns about that once
        # per type. Harmless: the types are only used through this module.
        warnings.filterwarnings("ignore", "builtin type .* has no __module__",
                                DeprecationWarning)
        module = importlib.util.module_from_spec(spec)  # runs the library's PyInit_<name>
    spec.loader.exec_module(module)
    return module


def load_extension(name: str, source_dir: Path = SOURCE_DIR) -> LoadedExtension:
    """Extension module `name` (source_dir/name.mojo): from this process's cache, from the
    compiled-library cache, or compiled now. Raises MojoBuildError with the compiler's
    message."""
    source, library, error_note = _paths(name, source_dir)
    if library in _LOADED:
        return _LOADED[library]
    if not source.is_file():
        raise MojoBuildError(f"the Mojo source {source} is missing")
    start = time.perf_counter()
    cache_hit = library.is_file()
    if not cache_hit:
        _compile(source, library, error_note)
    try:
        module = _load(name, library)
    except ImportError as error:
        raise MojoBuildError(f"could not load the compiled {library}: {error} (delete it to "
                             f"rebuild)") from error
    _LOADED[library] = LoadedExtension(module, library, time.perf_counter() - start, cache_hit)
    error_note.unlink(missing_ok=True)
    return _LOADED[library]


def median_call_ns(function, *args, calls: int = 2000, repeats: int = 15) -> float:
    """Median over `repeats` blocks of the mean time of one call in a block of `calls`, ns.
    The call is timeit's statement itself (no wrapper function around it)."""
    names = {f"a{i}": arg for i, arg in enumerate(args)}
    statement = f"function({', '.join(names)})"
    timer = timeit.Timer(statement, globals={"function": function, **names})
    return 1e9 * float(np.median(timer.repeat(repeat=repeats, number=calls))) / calls


def _python_noop():
    return None


class _MojoExtensionBackend(Backend):
    """What both Mojo backends share: the build, the model object, parameters and sampling."""

    extension: ClassVar[str]  # the .mojo file (and Python module) name
    source_dir: ClassVar[Path] = SOURCE_DIR
    model_classes: ClassVar[dict[str, str]]  # dtype -> Mojo type bound in the module

    provides_gradients = True
    provides_moments = True

    def __init__(self, config, vocab_size, dtype, device=None):
        super().__init__(config, vocab_size, dtype, device)
        # Known without compiling: a missing compiler, or an earlier failed build of this
        # exact source.
        problem = build_problem(self.extension, self.source_dir)
        if problem:
            raise BackendUnavailable(problem)
        self._extension: LoadedExtension | None = None
        self._model = None
        self._pending_parameters: np.ndarray | None = None  # loaded before the build
        self._num_parameters = self.layout.total
        self._logits = np.zeros(vocab_size)  # next_logits writes here (float64)
        self._logits_address = self._logits.ctypes.data
        self._call_overhead: dict[str, float] | None = None

    # ---- the build ------------------------------------------------------------------------
    def _ensure_model(self):
        if self._model is None:
            try:
                self._extension = load_extension(self.extension, self.source_dir)
            except MojoBuildError as error:
                raise BackendUnavailable(str(error)) from error
            cfg = self.config
            model_class = getattr(self._extension.module, self.model_classes[self.dtype])
            self._model = model_class(self.vocab_size, cfg.n_embd, cfg.n_head, cfg.n_layer,
                                      cfg.block_size, cfg.beta1, cfg.beta2, cfg.eps)
            assert self._model.num_parameters() == self._num_parameters
            if self._pending_parameters is not None:
                self._model.load_parameters(self._pending_parameters.ctypes.data,
                                            self._num_parameters)
                self._pending_parameters = None
        return self._model

    def prepare(self):
        """Builds (or loads the cached) extension: `mojo_build_s` is what this process paid,
        the compilation on a cache miss, the load of the library on a hit."""
        self._ensure_model()
        return {"mojo_build_s": self._extension.seconds}

    # ---- parameters -----------------------------------------------------------------------
    def load_parameters(self, parameters):
        for name, shape in self.shapes.items():
            if np.shape(parameters[name]) != shape:
                raise ValueError(f"parameter {name} has shape {np.shape(parameters[name])}, "
                                 f"expected {shape}")
        flat = self.layout.flatten(parameters)
        if self._model is None:
            self._pending_parameters = flat
        else:
            self._model.load_parameters(flat.ctypes.data, flat.size)

    def parameters(self):
        flat = np.empty(self._num_parameters)
        self._ensure_model().copy_parameters(flat.ctypes.data, flat.size)
        return self.layout.split(flat)

    def optimizer_moments(self):
        """Adam's (m, v) as float64 arrays by name; zeros after load_parameters."""
        m, v = np.empty(self._num_parameters), np.empty(self._num_parameters)
        self._ensure_model().copy_moments(m.ctypes.data, v.ctypes.data, m.size)
        return self.layout.split(m), self.layout.split(v)

    def _loss_and_gradients(self, tokens):
        flat = np.empty(self._num_parameters)
        loss = self._ensure_model().loss_and_gradients(tokens, flat.ctypes.data)
        return loss, self.layout.split(flat)

    # ---- sampling -------------------------------------------------------------------------
    def reset_cache(self):
        self._ensure_model().reset_cache()

    def next_logits(self, token, position):
        self._ensure_model().next_logits(token, position, self._logits_address)
        return self._logits.copy()

    # ---- reporting ------------------------------------------------------------------------
    def _measure_call_overhead(self) -> dict[str, float]:
        """Median ns per call from Python: a plain Python function (the baseline) and a no-op
        Mojo function; subclasses add their own."""
        return {
            "python_noop_call_ns": median_call_ns(_python_noop),
            "mojo_noop_function_call_ns": median_call_ns(self._extension.module.noop),
        }

    def details(self):
        self._ensure_model()
        if self._call_overhead is None:  # measured here, outside every timed phase
            self._call_overhead = self._measure_call_overhead()
        extension = self._extension
        return {
            "compile": "mojo build --emit shared-lib (ahead of time, -O3, host CPU), "
                       "loaded as a Python extension module",
            "mojo_extension": extension.path.name,
            "mojo_build_s": extension.seconds,
            "mojo_build_cache_hit": extension.cache_hit,
            "threads": 1,
            **{key: round(value, 1) for key, value in self._call_overhead.items()},
        }


class MojoBackend(_MojoExtensionBackend):
    name = "mojo"
    extension = "microgpt_native"
    model_classes = {"float32": "NativeModel32", "float64": "NativeModel64"}

    _step = None  # train_step32/64 bound to the model's address (see _bind_step)

    def _bind_step(self):
        """The step as the module-level function train_step32/64 with the model's address bound
        (functools.partial keeps the vectorcall path): a Mojo method call costs about 90 ns more
        than a function call (details(): mojo_noop_method_call_ns against
        mojo_noop_function_call_ns). self._model keeps the object at that address alive. The
        tokens still cross as Python lists: reading them in Mojo costs about 50 ns a step,
        less than fetching a numpy array's address from Python (batch.padded.ctypes.data)."""
        model = self._ensure_model()
        function = getattr(self._extension.module, f"train_step{self.dtype[-2:]}")
        self._step = functools.partial(function, model.address())
        return self._step

    def train_step(self, batch, adam):
        step = self._step or self._bind_step()
        return step(batch.sequences, adam.learning_rate, adam.bias_correction1,
                    adam.bias_correction2)

    def loss_and_gradients(self, batch):
        """The loss and every gradient (float64 arrays), without updating (for tests)."""
        return self._loss_and_gradients(batch.sequences)

    def _measure_call_overhead(self):
        overhead = super()._measure_call_overhead()
        model = self._model
        overhead["mojo_noop_method_call_ns"] = median_call_ns(model.noop)
        # train_step's own argument passing (a typical 8-token row, three floats), no work.
        tokens = [[token % self.vocab_size for token in range(8)]]
        overhead["train_step_call_overhead_ns"] = median_call_ns(
            model.train_step_overhead, tokens, 0.01, 0.15, 0.01)
        return overhead

    def details(self):
        details = super().details()
        simd = self._extension.module.simd_width(self.dtype)
        details["simd_width"] = f"{simd} x {self.dtype}"
        return details


class MojoTapeBackend(_MojoExtensionBackend):
    name = "mojo-tape"
    extension = "microgpt_tape"
    model_classes = {"float32": "TapeModel32", "float64": "TapeModel64"}

    def __init__(self, config, vocab_size, dtype, device=None):
        super().__init__(config, vocab_size, dtype, device)
        self._full_block_tape: tuple[int, int] | None = None

    def train_step(self, batch, adam):
        model = self._model if self._model is not None else self._ensure_model()
        return model.train_step(batch.sequences[0], adam.learning_rate, adam.bias_correction1,
                                adam.bias_correction2)

    def loss_and_gradients(self, batch):
        """The loss and every gradient (float64 arrays), without updating (for tests)."""
        return self._loss_and_gradients(batch.sequences[0])

    def tape_size(self, tokens: list[int]) -> tuple[int, int]:
        """(nodes, edges) of the training graph of one token list, parameters included. Empties
        the key/value cache (the tape is rebuilt); the parameters are untouched."""
        return tuple(self._ensure_model().tape_size(tokens))

    def prepare(self):
        durations = super().prepare()
        # The graph of a full-length sequence, for the report; measured here, before sampling
        # fills the tape with a key/value cache.
        self._full_block_tape = self.tape_size([0] * (self.config.block_size + 1))
        return durations

    def details(self):
        details = super().details()
        if self._full_block_tape is not None:
            nodes, edges = self._full_block_tape
            details.update(tape_nodes_full_block=nodes, tape_edges_full_block=edges)
        return details
