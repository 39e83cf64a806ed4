"""What is specific to the MAX backends (the shared checks against numpy are in
tests/test_conformance.py): prepare() compiles and reports both graphs; one graph per model
config serves every batch size (what keeps the scaling sweep's compile cost down); sampling
reads the parameters the training graph updated; devices; max-loop's K steps per call, full and
partial calls, and its one-step entry point continuing from the same state.

Skipped when MAX is not installed. Graphs are compiled once per config and shared with the
conformance tests through the session's backend pool; a cold compile takes minutes on 2 cores,
later ones hit MAX's cache (~/.cache/modular, or $MODULAR_CACHE_DIR).
"""
import numpy as np
import pytest

pytest.importorskip("max")

from backends.contract import (BackendUnavailable, ParameterLayout, adam_step,  # noqa: E402
                               preset)
from bench.parity import LOSS_TOLERANCE  # noqa: E402
from bench.training import prepare_batches  # noqa: E402
from tests.helpers import make_backend, max_parameter_difference, train_losses  # noqa: E402


def test_prepare_reports_both_compilations(pool, tiny_spec):
    backend = pool.get("max", "float32", tiny_spec)
    assert backend.trace_counts() == {"compile_train_graph_s": 1, "compile_infer_graph_s": 1}
    assert all(seconds > 0 for seconds in backend.compile_seconds.values())
    details = backend.details()
    assert details["train_graph_kernels"] > 0 and details["infer_graph_kernels"] > 0


@pytest.mark.parametrize("name", ["small", "large"])
def test_one_graph_serves_every_batch_size(name):
    """The training graphs' batch dimension is symbolic and nothing else in them depends on the
    batch size: the graph built for batch 1 is the one built for 8 and 32 (so MAX's compile
    cache serves them all), and so is the sampling graph. Built only, not compiled."""
    from max.graph import DeviceRef

    from backends.max_graphs import (BATCH, build_infer_graph, build_train_graph,
                                     build_train_loop_graph)

    def loop(config, vocab_size, layout, device):
        return build_train_loop_graph(config, vocab_size, layout, device, 50)

    for build in (build_train_graph, loop, build_infer_graph):
        texts = set()
        for batch_size in (1, 8, 32):
            config = preset(name, batch_size=batch_size)
            graph = build(config, 27, ParameterLayout.for_config(config, 27), DeviceRef.CPU())
            texts.add(str(graph))
            if build is not build_infer_graph:  # tokens [..., B, T + 1] with B symbolic
                assert graph.inputs[1].tensor.shape[-2] == BATCH
        assert len(texts) == 1, build


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
