"""The data order: which corpus windows each training step reads.

The data order is a pure function of (data seed, epoch, dataset size): epoch ``e`` visits the
corpus in the order ``numpy.random.default_rng([data_seed, e]).permutation(n_sequences)``, so
the window indices of any step can be recomputed, and the trainer also records them.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

DATA_ORDER_RULE = "epoch e visits numpy.random.default_rng([data_seed, e]).permutation(n_sequences)"


@lru_cache(maxsize=4)
def _epoch_order(data_seed: int, epoch: int, dataset_size: int) -> np.ndarray:
    # Shuffling an int32 arange draws the same swaps as ``permutation(dataset_size)``, so the
    # order is the same, in half the memory a large corpus's cached order would take.
    dtype = np.int32 if dataset_size < 2**31 else np.int64
    order = np.arange(dataset_size, dtype=dtype)
    np.random.default_rng([data_seed, epoch]).shuffle(order)
    return order


def batch_indices(*, data_seed: int, step: int, batch_size: int, dataset_size: int) -> np.ndarray:
    """Corpus indices of the windows in the batch of ``step`` (a pure function).

    Parameters
    ----------
    data_seed
        The run's data-order seed.
    step
        Training step (0-based).
    batch_size
        Windows per step.
    dataset_size
        Number of windows in the corpus.

    Returns
    -------
    numpy.ndarray
        ``indices[batch]`` (int64).
    """
    # Slices of consecutive epoch orders: called every training step, so no masks or unique.
    parts, remaining = [], batch_size
    epoch, offset = divmod(step * batch_size, dataset_size)
    while remaining:
        part = _epoch_order(data_seed, epoch, dataset_size)[offset : offset + remaining]
        parts.append(part)
        remaining -= len(part)
        epoch, offset = epoch + 1, 0
    return parts[0].astype(np.int64) if len(parts) == 1 else np.concatenate(parts, dtype=np.int64)


def data_order_fingerprint(*, data_seed: int, dataset_size: int) -> str:
    """Hash of the rule and of the first epoch's order, to detect a changed data order."""
    digest = hashlib.sha256(f"{DATA_ORDER_RULE}|{data_seed}|{dataset_size}".encode())
    order = _epoch_order(data_seed, 0, dataset_size)
    for start in range(0, dataset_size, 1 << 20):  # the int64 bytes, a slice at a time
        digest.update(order[start : start + (1 << 20)].astype(np.int64))
    return digest.hexdigest()[:16]
