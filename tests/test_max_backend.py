"""What is specific to the MAX backends (the shared checks against numpy are in
tests/test_conformance.py): prepare() compiles and reports both graphs; sampling reads the
parameters the training graph updated; devices; max-loop's K steps per call, full and partial
calls, and its one-step entry point continuing from the same state.

Skipped when MAX is not installed. Graphs are compiled once per config and shared with the
conformance tests through the session's backend pool; a cold compile takes minutes on 2 cores,
later ones hit MAX's cache (~/.cache/modular, or $MODULAR_CACHE_DIR).
"""
import numpy as np
import pytest

pytest.importorskip("max")

from backends.contract import BackendUnavailable, adam_step  # noqa: E402  (after the skip)
from bench.parity import LOSS_TOLERANCE  # noqa: E402
from bench.training import prepare_batches  # noqa: E402
from tests.helpers import make_backend, max_parameter_difference, train_losses  # noqa: E402


def test_prepare_reports_both_compilations(pool, tiny_spec):
    backend = pool.get("max", "float32", tiny_spec)
    assert backend.trace_counts() == {"compile_train_graph_s": 1, "compile_infer_graph_s": 1}
    assert all(seconds > 0 for seconds in backend.compile_seconds.values())
    details = backend.details()
    assert details["train_graph_kernels"] > 0 and details["infer_graph_kernels"] > 0


def test_sampling_uses_the_trained_parameters(pool, tiny_spec):
    backend = pool.get("max", "float32", tiny_spec)
    backend.reset_cache()
    before = backend.next_logits(26, 0)
    train_losses(backend, tiny_spec, 3)
    backend.reset_cache()
    assert np.abs(backend.next_logits(26, 0) - before).max() > 1e-3


def test_asking_for_a_missing_accelerator_is_unavailable(tiny_spec):
    from max.driver import accelerator_count
    if accelerator_count() > 0:
        pytest.skip("MAX sees an accelerator here")
    with pytest.raises(BackendUnavailable, match="no accelerator"):
        make_backend("max", tiny_spec, "float32", "gpu")
    assert make_backend("max", tiny_spec, "float32").device == "cpu"


def test_loop_backend_runs_full_and_partial_calls(pool, tiny_spec):
    backend = pool.get("max-loop", "float32", tiny_spec)
    assert set(backend.compile_seconds) == {"compile_train_loop_graph_s",
                                            "compile_infer_graph_s"}
    K = backend.steps_per_call
    steps = 2 * K + 3  # two full calls and a partial one
    batches = prepare_batches(tiny_spec, steps + 2)
    adams = [adam_step(tiny_spec.config, step) for step in range(steps + 2)]
    losses = backend.train_steps(batches[:steps], adams[:steps])
    # the one-step entry point continues from the same state
    losses += [backend.train_step(batches[step], adams[step]) for step in (steps, steps + 1)]
    reference = make_backend("numpy", tiny_spec, "float32")
    expected = train_losses(reference, tiny_spec, steps + 2)
    assert len(losses) == steps + 2
    assert np.abs(np.array(losses) - expected).max() < LOSS_TOLERANCE["float32"]
    differences = max_parameter_difference(backend.parameters(), reference.parameters())
    assert max(differences.values()) < 1e-5, differences
