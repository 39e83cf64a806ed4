"""The spec's one random stream: documents, tokenizer, initial weights, sampling state."""
import random

import numpy as np

from backends.contract import build_spec, preset


def test_documents_and_tokenizer(dataset, tiny_spec):
    assert len(dataset.docs) == 32033 and dataset.standard
    assert sorted(tiny_spec.docs) == sorted(dataset.docs)
    assert tiny_spec.docs != dataset.docs  # shuffled
    assert tiny_spec.tokenizer.vocab_size == 27 and tiny_spec.tokenizer.bos == 26
    assert "".join(tiny_spec.tokenizer.chars) == "abcdefghijklmnopqrstuvwxyz"


def test_weights_follow_the_one_stream(dataset, tiny_spec):
    # Re-derive independently: seed, shuffle, then gauss draws row-major in the spec's order.
    rng = random.Random(42)
    docs = list(dataset.docs)
    rng.shuffle(docs)
    assert docs == tiny_spec.docs
    wte = [[rng.gauss(0, 0.08) for _ in range(16)] for _ in range(27)]
    wpe_first_row = [rng.gauss(0, 0.08) for _ in range(16)]
    np.testing.assert_array_equal(tiny_spec.parameters["wte"], np.array(wte))
    np.testing.assert_array_equal(tiny_spec.parameters["wpe"][0], np.array(wpe_first_row))
    assert sum(p.size for p in tiny_spec.parameters.values()) == 4192
    assert all(p.dtype == np.float64 for p in tiny_spec.parameters.values())


def test_sampling_continues_the_stream(dataset, tiny_spec):
    rng = random.Random(42)
    docs = list(dataset.docs)
    rng.shuffle(docs)
    for _ in range(4192):
        rng.gauss(0, 0.08)
    assert tiny_spec.sampling_rng().random() == rng.random()
    # Each call starts from the same state.
    assert tiny_spec.sampling_rng().random() == tiny_spec.sampling_rng().random()


def test_step_sequences(tiny_spec):
    bos = tiny_spec.tokenizer.bos
    (tokens,) = tiny_spec.step_sequences(0)
    doc = tiny_spec.docs[0]
    assert tokens == [bos] + tiny_spec.tokenizer.encode(doc) + [bos]
    assert tiny_spec.step_sequences(len(tiny_spec.docs)) == tiny_spec.step_sequences(0)


def test_long_documents_are_cut_to_the_block(dataset):
    spec = build_spec(dataset.docs, preset("tiny", block_size=4))
    assert all(len(spec.step_sequences(step)[0]) <= 5 for step in range(200))


def test_batches_take_consecutive_documents(dataset):
    spec = build_spec(dataset.docs, preset("tiny", batch_size=3))
    rows = spec.step_sequences(2)
    assert len(rows) == 3
    assert [spec.tokenizer.decode(r[1:-1]) for r in rows] == spec.docs[6:9]
