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

    @property
    def attrs(self) -> dict[str, int | str]:
        """The probe's parameters, to store as attributes next to any score computed on it."""
        return {
            "probe": "repeated_random_tokens",
            "probe_n_sequences": int(self.tokens.shape[0]),
            "probe_block_length": self.block_length,
            "probe_repeats": self.repeats,
            "probe_seed": self.seed,
        }


def repeated_tokens(
    *,
    vocab_size: int,
    n_ctx: int,
    seed: int,
    n_sequences: int = 10,
    block_length: int = 25,
    repeats: int = 4,
) -> Probe:
    """Build the repeated-random-token probe, shrunk to fit the context if needed.

    Olsson et al. use 25 random tokens repeated 4 times after a BOS, averaged over ~10
    sequences. Fitting rule, applied in order until ``1 + block_length * repeats <= n_ctx``:

    1. ``block_length`` is capped at ``vocab_size - 1`` so a block never repeats a token
       (each block is drawn without replacement from the non-BOS tokens, so every query in a
       later repeat has exactly one induction target per earlier repeat);
    2. ``repeats`` is reduced, down to 2;
    3. ``block_length`` is reduced to ``(n_ctx - 1) // 2``.

    Parameters
    ----------
    vocab_size
        ``d_vocab`` of the model; tokens are drawn uniformly from ``1 .. vocab_size - 1``
        (token 0 is BOS). The synthetic vocabularies are uniform, so Olsson's advice to avoid
        the rarest and commonest tokens does not apply.
    n_ctx
        The longest sequence the probe may have (the model's context).
    seed
        Seed of ``numpy.random.default_rng``; record it (``Probe.attrs``).
    n_sequences
        Number of probe sequences (``batch``).
    block_length, repeats
        Requested block length and number of repeats (see the fitting rule).

    Returns
    -------
    Probe
        ``tokens[n_sequences, 1 + block_length * repeats]`` and the parameters used.

    Raises
    ------
    ValueError
        If ``n_ctx < 3`` or ``vocab_size < 2`` (no room for a block repeated twice).
    """
    if n_ctx < 3 or vocab_size < 2:
        raise ValueError(f"need n_ctx >= 3 and vocab_size >= 2, got {n_ctx=}, {vocab_size=}")
    block_length = min(block_length, vocab_size - 1)
    while repeats > 2 and 1 + block_length * repeats > n_ctx:
        repeats -= 1
    repeats = max(repeats, 2)
    block_length = min(block_length, (n_ctx - 1) // repeats)
    rng = np.random.default_rng(seed)
    non_bos = np.array([t for t in range(vocab_size) if t != BOS_TOKEN], dtype=np.int64)
    blocks = np.stack(
        [rng.choice(non_bos, size=block_length, replace=False) for _ in range(n_sequences)]
    )  # [n_sequences, block_length]
    bos = np.full((n_sequences, 1), BOS_TOKEN, dtype=np.int64)
    tokens = np.concatenate([bos, np.tile(blocks, (1, repeats))], axis=1)
    return Probe(tokens=tokens, block_length=block_length, repeats=repeats, seed=seed)
