"""The spec's one random stream: shuffled documents, tokenizer, initial float64 weights, and the
generator state that sampling continues from (SPEC.md, "Random state").

Everything here is deterministic given the documents and the config, so the runner, every
backend process and the tests rebuild exactly the same instance.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from bench.config import GPTConfig, parameter_shapes


@dataclass(frozen=True)
class Tokenizer:
    chars: tuple[str, ...]

    @property
    def bos(self) -> int:
        return len(self.chars)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> list[int]:
        index = {ch: i for i, ch in enumerate(self.chars)}
        return [index[ch] for ch in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    @classmethod
    def from_docs(cls, docs: list[str]) -> "Tokenizer":
        return cls(tuple(sorted(set("".join(docs)))))


@dataclass
class SpecInstance:
    config: GPTConfig
    docs: list[str]  # shuffled
    tokenizer: Tokenizer
    parameters: dict[str, np.ndarray]  # float64, [out, in], in the spec's draw order
    sampling_rng_state: object  # random.Random state right after the parameter draws

    def sampling_rng(self) -> random.Random:
        rng = random.Random()
        rng.setstate(self.sampling_rng_state)
        return rng

    def step_sequences(self, step: int) -> list[list[int]]:
        """The token sequences of training step `step`: for each of the batch's documents,
        [BOS] + ids + [BOS] cut to at most block_size + 1 tokens (inputs are [:-1], targets
        [1:], so n = len - 1)."""
        sequences = []
        batch = self.config.batch_size
        for row in range(batch):
            doc = self.docs[(step * batch + row) % len(self.docs)]
            tokens = [self.tokenizer.bos] + self.tokenizer.encode(doc) + [self.tokenizer.bos]
            sequences.append(tokens[: self.config.block_size + 1])
        return sequences


def build_spec(docs: list[str], config: GPTConfig) -> SpecInstance:
    rng = random.Random(config.seed)
    docs = list(docs)
    rng.shuffle(docs)
    tokenizer = Tokenizer.from_docs(docs)
    parameters = {}
    for name, (rows, cols) in parameter_shapes(config, tokenizer.vocab_size):
        # Row-major, one gauss draw per element, exactly as the original's nested lists.
        values = [rng.gauss(0, config.init_std) for _ in range(rows * cols)]
        parameters[name] = np.array(values, dtype=np.float64).reshape(rows, cols)
    return SpecInstance(config=config, docs=docs, tokenizer=tokenizer, parameters=parameters,
                        sampling_rng_state=rng.getstate())
