"""The spec's one random stream and data order (SPEC.md, "Data" and "Random state"): shuffled
documents, the tokenizer, the initial float64 weights, each step's token batch, and the
generator state that sampling continues from.

Everything here is deterministic given the documents and the config, so the harness, every
backend process and the tests rebuild exactly the same instance.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from backends.contract.config import GPTConfig, parameter_shapes


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


@dataclass(frozen=True)
class TokenBatch:
    """One training step's tokens, prepared by the harness outside the timed region.

    `sequences[b]` is [BOS] + ids + [BOS] cut to at most block_size + 1 tokens (inputs are
    [:-1], targets [1:]). `padded` holds the same rows padded with BOS to block_size + 1, for
    backends that want one fixed shape; `lengths[b]` is the number of predicted positions n.
    """
    sequences: list[list[int]]
    padded: np.ndarray  # int32 [B, block_size + 1]
    lengths: np.ndarray  # int32 [B]

    @classmethod
    def from_sequences(cls, sequences: list[list[int]], block_size: int, pad: int) -> "TokenBatch":
        padded = np.full((len(sequences), block_size + 1), pad, dtype=np.int32)
        for row, tokens in enumerate(sequences):
            padded[row, : len(tokens)] = tokens
        lengths = np.array([len(tokens) - 1 for tokens in sequences], dtype=np.int32)
        return cls(sequences=sequences, padded=padded, lengths=lengths)

    @property
    def position_mask(self) -> np.ndarray:
        """float64 [B, block_size]: 1 where a position is predicted, 0 for padding."""
        positions = np.arange(self.padded.shape[1] - 1)
        return (positions[None, :] < self.lengths[:, None]).astype(np.float64)


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

    def step_batch(self, step: int) -> TokenBatch:
        return TokenBatch.from_sequences(self.step_sequences(step), self.config.block_size,
                                         self.tokenizer.bos)


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
