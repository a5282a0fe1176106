"""The synthetic induction corpus: sequences that repeat a random block of varying period."""

from __future__ import annotations

import numpy as np

from observatory.models import BOS_TOKEN
from observatory.spec import DataSpec

SUCCESSORS = 4  # each token of the bigram chain is followed by one of 4 tokens


def bigram_table(spec: DataSpec, vocab_size: int) -> np.ndarray:
    """The Markov-bigram table: ``successors[token, SUCCESSORS]``, drawn from ``bigram_seed``.

    One table serves every sequence of the corpus (and the held-out sequences drawn from
    another corpus seed), so the model can learn it in its weights: predicting a bigram token
    needs no context beyond the previous token.
    """
    rng = np.random.default_rng(spec.bigram_seed)
    return rng.integers(1, vocab_size, size=(vocab_size, SUCCESSORS))


def _bigram_chain(rng: np.random.Generator, successors: np.ndarray, length: int) -> np.ndarray:
    """A walk on the bigram table, each successor chosen uniformly."""
    vocab_size = len(successors)
    out = np.empty(length, dtype=np.int64)
    out[0] = rng.integers(1, vocab_size)
    choices = rng.integers(0, SUCCESSORS, size=length)
    for i in range(1, length):
        out[i] = successors[out[i - 1], choices[i]]
    return out


def induction_corpus(spec: DataSpec, *, context: int, vocab_size: int) -> np.ndarray:
    """Sequences that repeat a random block whose length is drawn per sequence.

    Only in-context copying predicts the repeats; a varying period stops the model from
    copying by absolute position. A ``bigram_fraction`` of the sequences is a walk on the
    corpus's Markov-bigram table (:func:`bigram_table`) instead. With ``period_min`` at least
    ``context - 1`` nothing repeats: the sequences are uniform noise.

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
    successors = bigram_table(spec, vocab_size)
    for i, period in enumerate(periods):
        if background[i]:
            tokens[i, 1:] = _bigram_chain(rng, successors, context - 1)
        else:
            block = rng.integers(1, vocab_size, size=period)
            tokens[i, 1:] = np.resize(block, context - 1)
    return tokens


def induction_definition(spec: DataSpec, context: int) -> dict:
    """What the synthetic corpus depends on, hashed into its fingerprint."""
    keys = ("source", "seed", "n_sequences", "period_min", "period_max", "bigram_fraction")
    keys += ("bigram_seed",) * (spec.bigram_fraction > 0)
    return {key: getattr(spec, key) for key in keys} | {"context": context}


RULES = ("none", "bigram", "induction", "mixed")  # what predicts a token of the corpus


def _first_block_rules(block: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``none`` where nothing predicts a token of a block's first occurrence, else ``mixed``:
    its previous token occurred before in the block, or the pair is in the bigram table."""
    out = np.zeros(len(block) - 1, dtype=np.int8)
    for j in range(1, len(block)):
        seen = block[j - 1] in block[: j - 1]
        in_table = block[j] in table[block[j - 1]]
        out[j - 1] = RULES.index("mixed") if seen or in_table else RULES.index("none")
    return out


def token_rules(tokens: np.ndarray, spec: DataSpec, *, vocab_size: int) -> np.ndarray:
    """Which planted rule predicts each token of synthetic windows: the ground truth of
    transitions.

    Parameters
    ----------
    tokens
        ``tokens[sequence, position]``: windows of the corpus ``spec`` (BOS first).
    spec
        The corpus's data spec.
    vocab_size
        The model's vocabulary (the bigram table's size).

    Returns
    -------
    numpy.ndarray
        ``rule[sequence, loss_position]`` (int8, an index into :data:`RULES`) of the token each
        loss position predicts (``tokens[:, t + 1]``): ``bigram`` for the tokens of a bigram
        walk after its first; ``induction`` for the repeats of a block from the second repeated
        token on (the first follows a token that has not occurred before) unless the pair is
        also in the bigram table; ``none`` for the
        tokens of a block's first occurrence that nothing predicts; ``mixed`` for the rest
        (the first token after BOS; first-block tokens that follow an earlier occurrence of
        their previous token, or form a pair of the bigram table: partly predictable).
    """
    rules = np.full((len(tokens), tokens.shape[1] - 1), RULES.index("mixed"), dtype=np.int8)
    table = bigram_table(spec, vocab_size)
    for i, seq in enumerate(tokens[:, 1:]):
        period = next(
            (
                p
                for p in range(spec.period_min, min(spec.period_max, len(seq) - 1) + 1)
                if np.array_equal(seq[p:], seq[:-p])
            ),
            None,
        )
        if period is not None:
            rules[i, 1:period] = _first_block_rules(seq[:period], table)
            rules[i, period + 1 :] = RULES.index("induction")  # token t + 1 >= period + 2
            pairs = np.any(table[seq[period:-1]] == seq[period + 1 :, None], axis=1)
            rules[i, period + 1 :][pairs] = RULES.index("mixed")  # the bigram table helps too
        elif spec.bigram_fraction > 0:
            rules[i, 1:] = RULES.index("bigram")
        else:
            rules[i, 1:] = _first_block_rules(seq, table)
    return rules
