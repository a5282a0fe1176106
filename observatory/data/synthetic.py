"""The synthetic induction corpus: sequences that repeat a random block of varying period."""

from __future__ import annotations

import numpy as np

from observatory.models import BOS_TOKEN
from observatory.spec import DataSpec


def _bigram_chain(rng: np.random.Generator, vocab_size: int, length: int) -> np.ndarray:
    """A sparse Markov-bigram background: each token has 4 likely successors."""
    successors = rng.integers(1, vocab_size, size=(vocab_size, 4))
    out = np.empty(length, dtype=np.int64)
    out[0] = rng.integers(1, vocab_size)
    choices = rng.integers(0, 4, size=length)
    for i in range(1, length):
        out[i] = successors[out[i - 1], choices[i]]
    return out


def induction_corpus(spec: DataSpec, *, context: int, vocab_size: int) -> np.ndarray:
    """Sequences that repeat a random block whose length is drawn per sequence.

    Only in-context copying predicts the repeats; a varying period stops the model from
    copying by absolute position. A ``bigram_fraction`` of the sequences is a Markov-bigram
    background instead.

    Returns
    -------
    numpy.ndarray
        ``tokens[n_sequences, context]``: BOS, then tokens from ``1 .. vocab_size - 1``.
    """
    rng = np.random.default_rng(spec.seed)
    tokens = np.empty((spec.n_sequences, context), dtype=np.int64)
    tokens[:, 0] = BOS_TOKEN
    periods = rng.integers(spec.period_min, spec.period_max + 1, size=spec.n_sequences)
    background = rng.random(spec.n_sequences) < spec.bigram_fraction
    for i, period in enumerate(periods):
        if background[i]:
            tokens[i, 1:] = _bigram_chain(rng, vocab_size, context - 1)
        else:
            block = rng.integers(1, vocab_size, size=period)
            tokens[i, 1:] = np.resize(block, context - 1)
    return tokens


def induction_definition(spec: DataSpec, context: int) -> dict:
    """What the synthetic corpus depends on, hashed into its fingerprint."""
    keys = ("source", "seed", "n_sequences", "period_min", "period_max", "bigram_fraction")
    return {key: getattr(spec, key) for key in keys} | {"context": context}
