"""The repeated-random-token probe (Olsson et al. 2022, "In-context Learning and Induction Heads").

One probe, generated from a recorded seed, is shared by every checkpoint and seed of a family.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from observatory.models import BOS_TOKEN


@dataclass(frozen=True)
class Probe:
    """A repeated-random-token probe and the parameters actually used to build it.

    ``tokens[n_sequences, 1 + block_length * repeats]`` (int64): BOS, then a random block of
    ``block_length`` distinct non-BOS tokens repeated ``repeats`` times.
    """

    tokens: np.ndarray
    block_length: int
    repeats: int
    seed: int
    # Drawn from the tokens that occur in the training corpus (None: the whole vocabulary):
    # ``{"n_candidates", "exclude_rarest", "exclude_commonest"}``.
    corpus_tokens: dict[str, float | int] | None = None

    @property
    def attrs(self) -> dict[str, int | float | str]:
        """The probe's parameters, to store as attributes next to any score computed on it."""
        attrs: dict[str, int | float | str] = {
            "probe": "repeated_random_tokens",
            "probe_n_sequences": int(self.tokens.shape[0]),
            "probe_block_length": self.block_length,
            "probe_repeats": self.repeats,
            "probe_seed": self.seed,
        }
        if self.corpus_tokens is not None:
            attrs["probe_tokens_from"] = "training corpus"
            attrs |= {f"probe_{key}": value for key, value in self.corpus_tokens.items()}
        return attrs


# Olsson et al. avoid the rarest and commonest tokens: these fractions of the tokens that
# occur in the corpus (by count) are left out of a probe drawn from a corpus.
EXCLUDE_RAREST = 0.1
EXCLUDE_COMMONEST = 0.1


def corpus_candidates(
    token_counts: np.ndarray,
    *,
    exclude_rarest: float = EXCLUDE_RAREST,
    exclude_commonest: float = EXCLUDE_COMMONEST,
) -> np.ndarray:
    """The tokens a probe may use: those that occur, without the rarest and commonest.

    Parameters
    ----------
    token_counts
        ``token_counts[vocab_size]``: occurrences of each token in the training corpus.
    exclude_rarest, exclude_commonest
        Fractions (of the non-BOS tokens that occur) left out at either end of the ranking
        by count; at least two tokens are always kept.

    Returns
    -------
    numpy.ndarray
        The candidate tokens (int64), sorted.
    """
    counts = np.asarray(token_counts)
    occurring = np.flatnonzero(counts > 0)
    occurring = occurring[occurring != BOS_TOKEN]
    ranked = occurring[np.argsort(counts[occurring], kind="stable")]  # rarest first
    n = len(ranked)
    low, high = int(exclude_rarest * n), n - int(exclude_commonest * n)
    if high - low < 2:
        low, high = 0, n
    return np.sort(ranked[low:high]).astype(np.int64)


def repeated_tokens(
    *,
    vocab_size: int,
    n_ctx: int,
    seed: int,
    n_sequences: int = 10,
    block_length: int = 25,
    repeats: int = 4,
    token_counts: np.ndarray | None = None,
) -> Probe:
    """Build the repeated-random-token probe, shrunk to fit the context if needed.

    Olsson et al. use 25 random tokens repeated 4 times after a BOS, averaged over ~10
    sequences. Fitting rule, applied in order until ``1 + block_length * repeats <= n_ctx``:

    1. ``block_length`` is capped at the number of candidate tokens so a block never repeats a
       token
       (each block is drawn without replacement from the non-BOS tokens, so every query in a
       later repeat has exactly one induction target per earlier repeat);
    2. ``repeats`` is reduced, down to 2;
    3. ``block_length`` is reduced to ``(n_ctx - 1) // 2``.

    Parameters
    ----------
    vocab_size
        ``d_vocab`` of the model; without ``token_counts`` tokens are drawn uniformly from
        ``1 .. vocab_size - 1`` (token 0 is BOS): right for the synthetic corpora, whose
        vocabularies are uniform.
    n_ctx
        The longest sequence the probe may have (the model's context).
    seed
        Seed of ``numpy.random.default_rng``; record it (``Probe.attrs``).
    n_sequences
        Number of probe sequences (``batch``).
    block_length, repeats
        Requested block length and number of repeats (see the fitting rule).
    token_counts
        ``token_counts[vocab_size]``, occurrences of each token in the training corpus: draw
        only from :func:`corpus_candidates` (tokens that occur, without the rarest and
        commonest, as Olsson et al.), so that no probe token has an untrained embedding.

    Returns
    -------
    Probe
        ``tokens[n_sequences, 1 + block_length * repeats]`` and the parameters used.

    Raises
    ------
    ValueError
        If ``n_ctx < 3`` or ``vocab_size < 2`` (no room for a block repeated twice), or fewer
        than 2 non-BOS tokens occur in the corpus.
    """
    if n_ctx < 3 or vocab_size < 2:
        raise ValueError(f"need n_ctx >= 3 and vocab_size >= 2, got {n_ctx=}, {vocab_size=}")
    corpus_tokens = None
    if token_counts is None:
        candidates = np.array([t for t in range(vocab_size) if t != BOS_TOKEN], dtype=np.int64)
    else:
        candidates = corpus_candidates(token_counts)
        if len(candidates) < 2:
            raise ValueError("fewer than 2 non-BOS tokens occur in the corpus")
        corpus_tokens = {
            "n_candidates": len(candidates),
            "exclude_rarest": EXCLUDE_RAREST,
            "exclude_commonest": EXCLUDE_COMMONEST,
        }
    block_length = min(block_length, len(candidates))
    while repeats > 2 and 1 + block_length * repeats > n_ctx:
        repeats -= 1
    repeats = max(repeats, 2)
    block_length = min(block_length, (n_ctx - 1) // repeats)
    rng = np.random.default_rng(seed)
    blocks = np.stack(
        [rng.choice(candidates, size=block_length, replace=False) for _ in range(n_sequences)]
    )  # [n_sequences, block_length]
    bos = np.full((n_sequences, 1), BOS_TOKEN, dtype=np.int64)
    tokens = np.concatenate([bos, np.tile(blocks, (1, repeats))], axis=1)
    return Probe(
        tokens=tokens,
        block_length=block_length,
        repeats=repeats,
        seed=seed,
        corpus_tokens=corpus_tokens,
    )
