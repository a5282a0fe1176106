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


BRANCH_ORDER_RULE = (
    "from the fork f on, step k reads entries [(k - f) * batch, (k - f + 1) * batch) of the "
    "data order's stream of windows (its epochs one after another) from entry s on, with the "
    "dropped windows removed; s = f * batch, except for a branch of a branch that keeps its "
    "parent's data order: s is the entry the parent's stream had reached at f, and the parent's "
    "dropped windows stay dropped"
)


class BranchOrder:
    """The data order of a branch forked at step ``fork``: :data:`BRANCH_ORDER_RULE`.

    The stream is that of ``data_seed`` (the parent's, or the one a branch re-draws with);
    with no window dropped it is the plain order, so step ``k`` reads what
    :func:`batch_indices` gives.  A pure function of the step, like the plain order.

    Parameters
    ----------
    data_seed, batch_size, dataset_size
        As in :func:`batch_indices`.
    fork
        The step the branch continues from.
    dropped
        Corpus indices the branch never reads (sorted, unique, fewer than ``dataset_size``).
    start
        The entry of the stream the fork's batch starts at (default ``fork * batch_size``);
        a branch of a branch continues its parent's stream from :meth:`entry_at` the fork.
    """

    def __init__(
        self,
        *,
        data_seed: int,
        fork: int,
        batch_size: int,
        dataset_size: int,
        dropped,
        start: int | None = None,
    ):
        self.data_seed, self.fork, self.batch_size = data_seed, fork, batch_size
        self.dataset_size = dataset_size
        self.start = fork * batch_size if start is None else start
        self.keep = np.ones(dataset_size, dtype=bool)
        self.keep[np.asarray(dropped, dtype=np.int64)] = False
        self.per_epoch = int(self.keep.sum())  # windows an epoch keeps
        self.first_epoch, self.offset = divmod(self.start, dataset_size)
        self._kept: dict[int, np.ndarray] = {}

    @property
    def dropped(self) -> np.ndarray:
        """The corpus indices this order never reads (sorted)."""
        return np.flatnonzero(~self.keep)

    def _epoch(self, epoch: int) -> np.ndarray:
        """The kept windows of ``epoch`` in order (the first epoch from the start entry on)."""
        if epoch not in self._kept:
            order = _epoch_order(self.data_seed, epoch, self.dataset_size)
            if epoch == self.first_epoch:
                order = order[self.offset :]
            if len(self._kept) > 2:  # steps go forward: two epochs at a time are enough
                self._kept.pop(min(self._kept))
            self._kept[epoch] = order[self.keep[order]]
        return self._kept[epoch]

    def _located(self, position: int) -> tuple[int, int]:
        """``(epoch, position in its kept windows)`` of entry ``position`` of this stream."""
        if not self.per_epoch:
            raise ValueError("every window is dropped")
        epoch, first = self.first_epoch, len(self._epoch(self.first_epoch))
        if position >= first:
            skipped, position = divmod(position - first, self.per_epoch)
            epoch += 1 + skipped
        return epoch, position

    def indices(self, step: int) -> np.ndarray:
        """Corpus indices (int64) of the batch of ``step`` (``>= fork``)."""
        if self.per_epoch == self.dataset_size and self.start == self.fork * self.batch_size:
            return batch_indices(
                data_seed=self.data_seed,
                step=step,
                batch_size=self.batch_size,
                dataset_size=self.dataset_size,
            )
        epoch, position = self._located((step - self.fork) * self.batch_size)
        parts, remaining = [], self.batch_size
        while remaining:
            part = self._epoch(epoch)[position : position + remaining]
            parts.append(part)
            remaining -= len(part)
            epoch, position = epoch + 1, 0
        return np.concatenate(parts, dtype=np.int64)

    def entry_at(self, step: int) -> int:
        """The entry of the seed's stream (counting every window) that the batch of ``step``
        (``>= fork``) starts at: where a branch forked at ``step`` that keeps this order
        continues."""
        epoch, position = self._located((step - self.fork) * self.batch_size)
        order = _epoch_order(self.data_seed, epoch, self.dataset_size)
        skip = self.offset if epoch == self.first_epoch else 0
        kept = np.flatnonzero(self.keep[order[skip:]])
        return epoch * self.dataset_size + skip + int(kept[position])
