"""Lazy reading: a run's stored arrays as xarray backend arrays that read only what is indexed.

Nothing is read to build them: dims, shapes and dtypes come from the run's ``layout``
attribute (or an analysis array's metadata), and lengths from the commit markers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from dask.base import tokenize
from xarray.backends import BackendArray
from xarray.core import indexing

from observatory.store.layout import ANALYSIS_GROUP, array_layout
from observatory.store.results import analysis_arrays

if TYPE_CHECKING:
    from observatory.store.reader import RunReader


def lazy_arrays(reader: RunReader, names: Sequence[str] | None = None) -> dict[str, StoredArray]:
    """Every array of a run group (or those named), lazily read, cut to what is committed.

    Those with a leading ``step`` dim (the parameters, ``step``, ``tokens_seen``) end at
    ``n_checkpoints``, those of :data:`~observatory.store.layout.STEP_RECORDS` at ``n_steps``.
    """
    layout = reader.attrs["layout"]
    if names is not None:
        layout = {name: layout[name] for name in names}
    lengths = {"step": reader.n_checkpoints, "train_step": reader.n_steps}
    return {
        name: StoredArray(reader, name, entry, lengths[entry["dims"][0]])
        for name, entry in layout.items()
    }


def analysis_lazy_arrays(reader: RunReader, name: str, steps: np.ndarray) -> dict[str, StoredArray]:
    """The arrays of an analysis, lazily read; those by ``step`` aligned on ``steps``.

    Row ``i`` of an array with a leading ``step`` dim holds the result at ``steps[i]``, NaN
    where the analysis has not covered that checkpoint.
    """
    covered, arrays = analysis_arrays(reader, name)
    position = {int(step): row for row, step in enumerate(covered)}
    rows = np.array([position.get(int(step), -1) for step in steps], dtype=np.int64)
    if np.array_equal(rows, np.arange(len(covered))):
        rows = None  # stored in step order already: read rows as they are
    out = {}
    for key, array in arrays.items():
        entry, path = array_layout(array), f"{ANALYSIS_GROUP}/{name}/{key}"
        by_step = entry["dims"][0] == "step"
        out[key] = StoredArray(
            reader,
            path,
            entry,
            len(steps) if by_step else array.shape[0],
            rows=rows if by_step else None,
            array=array,
            attrs=dict(array.attrs) | {"analysis": name},
        )
    return out


class LazyArray(BackendArray):
    """An array read region by region when indexed: by xarray, or by dask with slices.

    Subclasses set ``dims``, ``shape``, ``dtype``, ``chunks`` (the preferred dask chunks),
    ``token`` (a tuple that identifies the data) and ``attrs``, and implement :meth:`read`.
    """

    dims: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    token: tuple
    attrs: dict[str, Any]

    def read(self, key: tuple) -> np.ndarray:
        """``self[key]`` for a tuple of ints, slices with positive steps and at most one sorted
        integer array (outer indexing)."""
        raise NotImplementedError

    def __getitem__(self, key: indexing.ExplicitIndexer | tuple) -> np.ndarray:
        if isinstance(key, indexing.ExplicitIndexer):
            support = indexing.IndexingSupport.OUTER_1VECTOR
            return indexing.explicit_indexing_adapter(key, self.shape, support, self.read)
        return self.read(key)  # dask's tuple of slices

    def variable(self, *, chunked: bool = False) -> xr.Variable:
        """The array as an xarray variable: lazily indexed (a selection reads only its region
        when its values are needed), or, if ``chunked``, dask-backed in the preferred chunks."""
        if chunked:
            meta = np.empty((0,) * self.ndim, dtype=self.dtype)
            name = f"observatory-{tokenize(*self.token)}"
            data = da.from_array(self, chunks=self.chunks, name=name, meta=meta)
        else:
            data = indexing.LazilyIndexedArray(self)
        return xr.Variable(self.dims, data, self.attrs)


class StoredArray(LazyArray):
    """One array of a run, read through :meth:`RunReader.read`.

    Reads stay consistent while the run's writer commits, and a damaged chunk is a
    :class:`StoreError`.  The zarr array is opened at the first read.

    Parameters
    ----------
    reader
        The run.
    path
        The array's path in the run group.
    layout
        Its dims, shape after the first dim, dtype and chunks (see
        :func:`~observatory.store.layout.array_layout`).
    length
        Entries along the first dim (the committed ones).
    rows
        Optional stored row of every entry along the first dim (-1: none, read as NaN).
    array, attrs
        The zarr array if it is open already, and attributes for the variable.
    """

    def __init__(
        self,
        reader: RunReader,
        path: str,
        layout: dict[str, Any],
        length: int,
        *,
        rows: np.ndarray | None = None,
        array: zarr.Array | None = None,
        attrs: dict[str, Any] | None = None,
    ):
        self.reader, self.path, self.rows = reader, path, rows
        if array is not None:  # opened already: saves the reader a metadata read
            reader._arrays.setdefault(path, array)
        self.dims = tuple(layout["dims"])
        self.shape = (length, *layout["shape"])
        self.dtype = np.dtype(layout["dtype"])
        self.chunks = tuple(layout["chunks"])
        self.attrs = attrs or {}
        where = (str(reader.family.path), reader.run.path, path, self.shape)
        where += (self.dims, self.dtype.str, self.chunks)
        self.token = where if rows is None else (*where, rows.tobytes())

    def read(self, key: tuple) -> np.ndarray:
        array = self.reader.array(self.path)
        key = resolved(key, self.shape)
        if self.rows is None:
            return self.reader.read(array, key)
        return read_rows(lambda k: self.reader.read(array, k), self.rows, key, self.dtype)


def resolved(key: tuple, shape: tuple[int, ...]) -> tuple:
    """``key`` with each slice's bounds resolved against ``shape`` (``slice(0, n, 1)``)."""
    return tuple(
        slice(*k.indices(n)) if isinstance(k, slice) else k for k, n in zip(key, shape, strict=True)
    )


def read_rows(
    read: Callable[[tuple], np.ndarray], rows: np.ndarray, key: tuple, dtype: np.dtype
) -> np.ndarray:
    """``key`` of an array whose entry ``i`` along the first dim is row ``rows[i]`` of what
    ``read`` reads (``-1``: no row, read as NaN), with one region read for every row.

    ``key`` holds ints, slices with positive steps (their ``indices`` resolved) and arrays.
    """
    stored = np.atleast_1d(rows[key[0]])
    found = stored >= 0
    low, high = (stored[found].min(), stored[found].max() + 1) if found.any() else (0, 0)
    block = read((slice(int(low), int(high)), *key[1:]))
    out = np.full((len(stored), *block.shape[1:]), np.nan, dtype=dtype)
    out[found] = block[stored[found] - low]
    return out if isinstance(key[0], slice | np.ndarray) else out[0]
