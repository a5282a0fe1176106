"""A read returns exactly the stored values or fails: the checked store and the ledger's digests.

Every read of a store goes through :class:`CheckedStore`, in which a missing chunk is an error
rather than the fill value, and through :func:`checked_read`, which turns a missing or damaged
chunk (CRC32C, Blosc or file errors) into a one-line :class:`StoreError`.  The ledger hashes
every checkpoint's weights and every keyframe's state when they are written
(:func:`weights_digest`, :func:`state_digest`); :mod:`observatory.store.ledger` checks them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore, WrapperStore

from observatory.errors import StoreError
from observatory.store.paths import zarr_store

# Names of the metadata documents zarr may look for; every other key of a store is a chunk.
_METADATA_KEYS = ("zarr.json", ".zgroup", ".zarray", ".zattrs", ".zmetadata")


class _ChunkMissing(Exception):
    """Raised inside zarr by :class:`CheckedStore` for a chunk key that has no data."""


class CheckedStore(WrapperStore):
    """A read-only view of a store in which a missing chunk is an error, not the fill value.

    zarr reads an absent chunk as the array's fill value.  Writers store every chunk of every
    array, even one equal to the fill value, and readers only read what the commit markers
    cover, so an absent chunk in a reader's selection can only mean damage.  Checking it here,
    in the one place every read goes through, costs nothing on the hot paths (the answer
    ``None`` of the store is already there) and works for any zarr store (local or fsspec),
    unlike a manifest that every write would have to maintain.
    """

    async def get(self, key, prototype, byte_range=None):
        value = await self._store.get(key, prototype, byte_range)
        if value is None and not key.endswith(_METADATA_KEYS):
            raise _ChunkMissing(key)
        return value

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        values = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), value in zip(key_ranges, values, strict=True):
            if value is None and not key.endswith(_METADATA_KEYS):
                raise _ChunkMissing(key)
        return values

    def __str__(self) -> str:
        return str(self._store)


def checked_store(where: str | Path) -> CheckedStore:
    """The store at ``where`` opened to read, through a :class:`CheckedStore`."""
    if isinstance(where, Path):
        return CheckedStore(LocalStore(where, read_only=True))
    return CheckedStore(zarr_store(where, read_only=True))


def _checked(array: zarr.Array) -> zarr.Array:
    """``array`` as read through a :class:`CheckedStore` (opened again if it is not)."""
    if isinstance(array.store, CheckedStore):
        return array
    store = CheckedStore(array.store.with_read_only(True))
    return zarr.open_array(store=store, path=array.path, mode="r", zarr_format=3)


def checked_read(array: zarr.Array, selection: Any, steps: Callable | None = None) -> np.ndarray:
    """``array[selection]``; a damaged or missing chunk is a :class:`StoreError`.

    ``steps()`` returns the checkpoint steps along the array's first dim, to name the steps
    a missing chunk held.
    """
    where = str(array.store_path).removeprefix("file://")
    try:
        return _checked(array)[selection]
    except _ChunkMissing as err:
        raise StoreError(f"{where}: {_missing_chunk(array, str(err), steps)}") from None
    except (ValueError, RuntimeError, OSError) as err:  # checksum, Blosc or file errors
        reason = str(err).split(". ")[0].splitlines()[0] if str(err) else type(err).__name__
        raise StoreError(f"{where}: stored data is damaged and cannot be read ({reason})") from None


def _missing_chunk(array: zarr.Array, key: str, steps: Callable | None) -> str:
    """What a missing chunk ``key`` of ``array`` held, for an error message."""
    index = key.rpartition(f"{array.path}/c/")[2].split("/")
    per = array.chunks[0]
    lo = int(index[0]) * per if index[0].isdigit() else 0
    hi = max(min(lo + per, array.shape[0]) - 1, lo)
    dim = (array.metadata.dimension_names or ("rows",))[0]
    steps = steps() if steps is not None else ()
    if hi < len(steps):
        held = f"checkpoint steps {steps[lo]}..{steps[hi]}"
    else:
        held = f"{dim} {lo}..{hi}"
    return f"stored data is missing: chunk {'/'.join(index)} ({held}) has no file"


def weights_digest(params: dict[str, np.ndarray]) -> np.ndarray:
    """SHA-256 of a checkpoint's weights: the provenance ledger's entry for it.

    Canonical byte order: parameters by name, each as its name, dtype and shape, then its
    values in C order, little-endian.  Returns 32 ``uint8``.
    """
    digest = hashlib.sha256()
    for name in sorted(params):
        array = np.ascontiguousarray(params[name])
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        digest.update(f"{name}|{array.dtype.str}|{array.shape}\n".encode())
        digest.update(memoryview(array).cast("B"))
    return np.frombuffer(digest.digest(), dtype=np.uint8)


def state_digest(moments: dict[str, dict[str, np.ndarray]], rng_state: np.ndarray) -> np.ndarray:
    """SHA-256 of a keyframe's optimizer and RNG state (as :func:`weights_digest`)."""
    flat = {f"{m}/{name}": a for m, arrays in moments.items() for name, a in arrays.items()}
    return weights_digest(flat | {"rng_state": np.asarray(rng_state)})
