"""Lazy xarray datasets of a family store: a tree of every run, one run, one size's runs.

Opening a store reads its attributes only.  Every array is lazy: a selection such as
``ds["W_Q"].sel(layer=1, head=2)`` reads just that head's bytes when its values are needed
(one region read of the stored parameter, however the view reshapes it).  :func:`open_run`,
:func:`open_family` and :func:`open` give lazily indexed arrays, as ``xarray.open_dataset``
does without ``chunks``; with ``chunks={}`` they are dask arrays in the store's chunks.
Only committed checkpoints and step records are visible, so a store can be opened while a run
is still training.  Datasets are built once per process for the same store state and handed
out as shallow copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from observatory import arguments
from observatory.errors import StoreError
from observatory.models.naming import VIEW_DIMS
from observatory.models.registry import architecture
from observatory.query.views import View, views
from observatory.store import (
    FamilyStore,
    LazyArray,
    RunReader,
    analyses,
    analysis_lazy_arrays,
    lazy_arrays,
    read_rows,
    resolved,
)


def open(path: str | Path) -> xr.DataTree:
    """Open a family store as a tree ``family / size / seed<k>`` of lazy run datasets.

    Parameters
    ----------
    path
        The family store (``*.zarr``).

    Returns
    -------
    xarray.DataTree
        The root carries the store's attributes (spec, library versions, corpus facts), each
        size node its size spec and Hugging Face config, and each ``seed<k>`` node the
        dataset that :func:`open_run` returns.  Only metadata and the step coordinates are
        read.

    Raises
    ------
    StoreError
        If the store is missing or is not an observatory store.

    Examples
    --------
    >>> tree = obs.open("store/induction.zarr")
    >>> tree["l2-d64/seed0"]["loss"].plot()
    """
    family = FamilyStore(path)
    runs: dict[str, dict[str, xr.DataTree]] = {}
    for reader in family.readers():  # size by size, in spec order
        size, name = reader.run.path.split("/")
        # DataTree copies the dataset (shallowly), so the shared one is never handed out
        runs.setdefault(size, {})[name] = xr.DataTree(_shared_dataset(*_run_parts(reader), reader))
    # Children are attached through the setter, which does not copy them again (the
    # constructor and DataTree.from_dict do, and copies dominate the cost of opening).
    root = xr.DataTree(xr.Dataset(attrs=family.attrs), name=family.spec.name)
    sizes = {size: xr.DataTree(xr.Dataset(attrs=family.size_attrs(size))) for size in runs}
    for size, node in sizes.items():
        node.children = runs[size]
    root.children = sizes
    return root


def open_run(
    path: str | Path, *, size: str, seed: int, chunks: dict | None = None, branch: str = ""
) -> xr.Dataset:
    """Open one run as a lazy dataset of its committed checkpoints and step records.

    Parameters
    ----------
    path
        The family store.
    size
        Size name, as in the spec's ``[[model.sizes]]``.
    seed
        Seed index (position in the spec's seed list).
    chunks
        ``None`` (default): lazily indexed arrays, as ``xarray.open_dataset`` gives without
        ``chunks``.  ``{}``: dask arrays in the store's chunks; any other value is then passed
        to :meth:`xarray.Dataset.chunk`.
    branch
        Open this branch of the run instead (its steps before the fork are its parent's;
        ``"a/b"`` for a branch ``b`` of the branch ``a``); its dataset has the scalar
        coordinates ``branch`` and ``fork``.

    Returns
    -------
    xarray.Dataset
        Lazily indexed variables (a selection reads only its region of the store, when its
        values are needed): the raw Hugging Face parameters under their stacked names
        (``[step, layer, ...]``), the per-head views of
        :data:`~observatory.models.naming.VIEW_DIMS` (``W_Q``, ``W_O``,
        ``b_Q``, ``W_E``, ``W_U``, ...), the per-step ``loss``, ``lr``, ``grad_norm``,
        ``train_tokens`` and ``batch_indices`` on the ``train_step`` dim, and every array of
        the run's analysis groups (NaN at checkpoints an analysis has not covered).
        Coordinates: ``step``, ``tokens_seen``, ``train_step`` and the scalars ``seed``,
        ``init_seed``, ``data_seed`` and ``complete`` (every scheduled step trained).

    Raises
    ------
    StoreError
        If the store, size or seed does not exist (the message lists what does).
    """
    reader = FamilyStore(path).run(size, seed, branch)
    return _run_dataset(reader, arguments.chunks(chunks))


def open_family(
    path: str | Path,
    *,
    size: str | None = None,
    seeds: Sequence[int] | None = None,
    chunks: dict | None = None,
    branches: bool = False,
) -> xr.Dataset:
    """Open every run of one size as a single lazy dataset with a leading ``seed`` dim.

    Parameters
    ----------
    path, size
        The family store, and the size's name (see :func:`resolve_size`: it may be omitted
        when the store has a single size).
    seeds
        Which runs: seed indices (default: every run of the size in the store).
    chunks
        ``None`` (default): lazily indexed arrays; ``{}``: dask arrays in the store's chunks
        (one run per chunk along ``seed``), for computations larger than memory; any other
        value is then passed to :meth:`xarray.Dataset.chunk`.
    branches
        Also every branch of the selected runs, at every depth: the leading dim is then
        ``run``, indexed by ``seed`` and ``branch`` (``""`` for the runs themselves;
        ``ds.sel(branch="")`` is the dataset without branches along ``seed``; ``"a/b"`` for a
        branch ``b`` of the branch ``a``), with ``fork`` (-1 for a run) on it.

    Returns
    -------
    xarray.Dataset
        The variables of :func:`open_run` with a leading ``seed`` dim (``init_seed``,
        ``data_seed`` and ``complete`` are coordinates on it).  Checkpoint steps and training
        steps are the union over the runs, so a run that has committed fewer checkpoints than
        the others (still training, or stopped) reads as NaN where it has no data, as does a
        run without an analysis that others have.  A selection reads only its region of each
        selected run.

    Raises
    ------
    StoreError
        If the store, size or a seed does not exist (the message lists what does), or no size
        is given for a store of several.

    Examples
    --------
    >>> ds = obs.open_family("store/induction.zarr", size="l2-d64")
    >>> ds["W_Q"].sel(layer=1, head=2).sel(step=slice(100, 600)).mean("d_model")
    """
    family, chunks = FamilyStore(path), arguments.chunks(chunks)
    size = resolve_size(family, size)
    if seeds is None:
        readers = family.size_runs(size)
    else:
        readers = [family.run(size, seed) for seed in arguments.indices(seeds, "seeds")]
        if not readers:
            raise arguments.ArgumentError("seeds: empty; give at least one seed, or None for all")
    if branches:
        readers = [
            reader
            for run in readers
            for reader in [run]
            + [family.run(size, run.run.seed, name) for name in family.branches(size, run.run.seed)]
        ]
    runs = [_run_arrays(reader) for reader in readers]
    steps = np.unique(np.concatenate([reader.steps() for reader in readers]))
    train_steps = np.arange(max(reader.n_steps for reader in readers), dtype=np.int64)
    rows = {
        "step": [_rows(steps, reader.steps()) for reader in readers],
        "train_step": [_rows(train_steps, train_steps[: reader.n_steps]) for reader in readers],
    }
    names = list(dict.fromkeys(name for arrays in runs for name in arrays))
    lead = "run" if branches else "seed"
    arrays = {name: _Stacked([arrays.get(name) for arrays in runs], rows, lead) for name in names}
    coords = {
        "seed": (lead, [reader.run.seed for reader in readers]),
        "init_seed": (lead, [reader.run.init_seed for reader in readers]),
        "data_seed": (lead, [reader.run.data_seed for reader in readers]),
        "complete": (lead, [reader.complete for reader in readers]),
        "step": steps,
        "tokens_seen": ("step", steps * family.spec.train.tokens_per_step),
        "train_step": train_steps,
    }
    if branches:
        coords["branch"] = (lead, [reader.run.branch for reader in readers])
        coords["fork"] = (lead, [(reader.branch or {"fork": -1})["fork"] for reader in readers])
    ds = _dataset(arrays, coords, readers[0], chunks)
    return ds.set_xindex(["seed", "branch"]) if branches else ds


def resolve_size(family: FamilyStore, size: str | None) -> str:
    """``size``, or the store's only size where ``size`` is None.

    Raises
    ------
    StoreError
        If ``size`` is None and the store has several sizes (the message lists them).
    """
    if size is not None:
        return arguments.name(size, "size")
    sizes = family.sizes()
    if len(sizes) != 1:
        raise StoreError(f"{family.path}: several sizes ({', '.join(sizes)}); choose one (--size)")
    return sizes[0]


def _run_dataset(reader: RunReader, chunks: dict | None = None) -> xr.Dataset:
    """The lazy dataset of one run (see :func:`open_run`)."""
    return _dataset(*_run_parts(reader), reader, chunks)


def _run_parts(reader: RunReader) -> tuple[dict[str, LazyArray], dict]:
    """The lazy arrays and the coordinates of one run's dataset."""
    coords = _run_coords(reader) | {"train_step": np.arange(reader.n_steps, dtype=np.int64)}
    return _run_arrays(reader), coords


def _run_arrays(reader: RunReader) -> dict[str, LazyArray]:
    """Every lazy array of one run: stored, TransformerLens views, analysis results."""
    arrays: dict[str, LazyArray] = lazy_arrays(reader)
    arrays |= views(arrays, architecture=reader.family.spec.model.architecture)
    for name in ("step", "tokens_seen", "train_step"):  # coordinates, derived without reading
        del arrays[name]
    steps = reader.steps()
    for name in analyses(reader):
        for key, array in analysis_lazy_arrays(reader, name, steps).items():
            if key in arrays:
                owner = arrays[key].attrs.get("analysis")
                raise StoreError(
                    f"{reader.run.path}: analysis {name!r} has an array {key!r}, as "
                    + (f"analysis {owner!r} has" if owner else "the run has")
                )
            arrays[key] = array
    return arrays


# Datasets built before, by everything they were built from (see _shared_dataset).
_DATASETS: dict[tuple, xr.Dataset] = {}
_DATASETS_MAX = 16


def _dataset(
    arrays: dict[str, LazyArray], coords: dict, reader: RunReader, chunks: dict | None
) -> xr.Dataset:
    """The dataset of ``arrays``: lazily indexed, or dask-backed if ``chunks`` is given.

    A shallow copy of the shared dataset (:func:`_shared_dataset`), so that a user's edits
    never reach the next call.
    """
    ds = _shared_dataset(arrays, coords, reader, chunked=chunks is not None).copy(deep=False)
    return ds.chunk(chunks) if chunks else ds


def _shared_dataset(
    arrays: dict[str, LazyArray], coords: dict, reader: RunReader, *, chunked: bool = False
) -> xr.Dataset:
    """The dataset of ``arrays``, built once per process: never hand it out, copy it.

    The arrays' tokens name everything a read depends on (store, array, layout, committed
    length, rows; the zarr metadata is looked up at each read), so a dataset of the same
    tokens, attributes and coordinates is built once, and reopening an unchanged store costs
    no more than checking it.
    """
    spec = reader.family.spec
    key = (
        (str(reader.family.path), spec.name, spec.model.architecture, reader.run.size),
        tuple((name, array.token, repr(array.attrs)) for name, array in arrays.items()),
        tuple((name, _frozen(value)) for name, value in coords.items()),
        chunked,
    )
    ds = _DATASETS.get(key)
    if ds is None:
        ds = _build_dataset(arrays, coords, reader, chunked=chunked)
        if len(_DATASETS) >= _DATASETS_MAX:
            del _DATASETS[next(iter(_DATASETS))]
        _DATASETS[key] = ds
    return ds


def _frozen(value: object) -> object:
    """A coordinate's value as a hashable key."""
    if isinstance(value, tuple):
        return tuple(_frozen(item) for item in value)
    if isinstance(value, np.ndarray | list):
        array = np.asarray(value)
        return array.dtype.str, array.shape, array.tobytes()
    return value


def _build_dataset(
    arrays: dict[str, LazyArray], coords: dict, reader: RunReader, *, chunked: bool
) -> xr.Dataset:
    family = reader.family
    variables = {name: array.variable(chunked=chunked) for name, array in arrays.items()}
    try:
        return xr.Dataset(
            variables,
            coords=coords,
            attrs={
                "family": family.spec.name,
                "size": reader.run.size,
                "architecture": family.spec.model.architecture,
                "store": str(family.path),
            },
        )
    except ValueError as err:  # e.g. an analysis dim whose size clashes with the run's
        first_line = str(err).splitlines()[0]
        raise StoreError(
            f"{family.path}: analysis results do not fit the runs: {first_line}"
        ) from None


def _run_coords(reader: RunReader) -> dict[str, object]:
    """Checkpoint steps with the tokens seen at each, and the run's seeds."""
    run = reader.run
    steps = reader.steps()
    return {
        "step": steps,
        # derived, not read: one request less on every open
        "tokens_seen": ("step", steps * reader.family.spec.train.tokens_per_step),
        "seed": run.seed,
        "init_seed": run.init_seed,
        "data_seed": run.data_seed,
        "complete": reader.complete,  # every scheduled step trained
    } | ({"branch": run.branch, "fork": reader.branch["fork"]} if run.branch else {})


def _rows(entries: np.ndarray, present: np.ndarray) -> np.ndarray | None:
    """Row of each of ``entries`` among ``present`` (a sorted subset; -1: absent); None if
    ``present`` is all of ``entries``."""
    if len(present) == len(entries):
        return None
    rows = np.full(len(entries), -1, dtype=np.int64)
    rows[np.searchsorted(entries, present)] = np.arange(len(present))
    return rows


class _Stacked(LazyArray):
    """One variable of several runs, stacked along a leading ``seed`` dim.

    Entries along ``step`` and ``train_step`` are aligned on the family's (``rows[dim][i]``:
    the row of each family entry in run ``i``'s array, -1 where it has none); a run without
    the variable (``None``) reads as NaN, and so does a missing entry.
    """

    def __init__(self, sources: list[LazyArray | None], rows: dict[str, list], lead: str = "seed"):
        first = next(source for source in sources if source is not None)
        dim, self.sources = first.dims[0], sources
        self.rows = rows.get(dim, [None] * len(sources))
        # the family's entries along the first dim: a run's rows, or all of any run's
        length = next((len(r) for r in self.rows if r is not None), first.shape[0])
        self.dims = (lead, *first.dims)
        self.shape = (len(sources), length, *first.shape[1:])
        kept = 1 if dim in rows else 0  # the dims every run must share, from the first
        for source in sources:
            if source is not None and (source.dims, source.shape[kept:]) != (
                first.dims,
                first.shape[kept:],
            ):
                raise StoreError(
                    f"{first.token[0]}: runs disagree on the dims or shape of {first.token[2]!r}"
                )
        gaps = None in sources or any(r is not None and (r < 0).any() for r in self.rows)
        self.dtype = np.dtype("float64") if gaps and first.dtype.kind not in "fc" else first.dtype
        self.chunks = (1, *first.chunks)
        self.attrs = first.attrs
        self.token = tuple(
            (None, None) if s is None else (s.token, None if r is None else r.tobytes())
            for s, r in zip(sources, self.rows, strict=True)
        )

    def read(self, key: tuple) -> np.ndarray:
        key = resolved(key, self.shape)
        if isinstance(key[0], int | np.integer):
            return self._read_run(int(key[0]), key[1:])
        runs = np.arange(len(self.sources))[key[0]]
        return np.stack([self._read_run(int(i), key[1:]) for i in runs])

    def _read_run(self, i: int, key: tuple) -> np.ndarray:
        source, rows = self.sources[i], self.rows[i]
        if source is None:
            return np.full(_selected_shape(key, self.shape[1:]), np.nan, dtype=self.dtype)
        if rows is None:
            return source.read(key).astype(self.dtype, copy=False)
        return read_rows(source.read, rows, key, self.dtype)


def _selected_shape(key: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of ``key`` (ints, resolved slices, arrays) of an array of ``shape``."""
    return tuple(
        len(range(*k.indices(n))) if isinstance(k, slice) else len(k)
        for k, n in zip(key, shape, strict=True)
        if not isinstance(k, int | np.integer)
    )


def head_weights(
    path: str | Path, *, size: str, seed: int, layer: int, head: int, weight: str = "W_Q"
) -> xr.DataArray:
    """One head's weight at every committed checkpoint, read straight from its chunks.

    The fast path for a single head: it reads that head's rows of the stacked parameter (one
    chunk file per block of checkpoints) without building the lazy dataset, and returns the same
    values as ``open_run(...)[weight].sel(layer=layer, head=head)``.

    Parameters
    ----------
    path
        The family store.
    size
        Size name.
    seed
        Seed index.
    layer
        Layer index.
    head
        Head index within the layer.
    weight
        ``"W_Q"``, ``"W_K"``, ``"W_V"``, ``"W_O"``, ``"b_Q"``, ``"b_K"`` or ``"b_V"``.

    Returns
    -------
    xarray.DataArray
        In memory, dims ``(step, d_model, d_head)`` (``W_O``: ``(step, d_head, d_model)``,
        biases: ``(step, d_head)``), with the coordinates of :func:`open_run`.

    Raises
    ------
    StoreError
        If the store, size, seed, layer, head or weight does not exist.
    """
    reader = FamilyStore(path).run(size, seed)
    layer, head = arguments.index(layer, "layer"), arguments.index(head, "head")
    weight = arguments.name(weight, "weight")
    spec = reader.family.spec
    blocks, shape = architecture(spec.model.architecture).head_blocks, spec.size(size)
    if weight not in blocks:
        raise StoreError(f"no per-head weight {weight!r} (per-head weights: {', '.join(blocks)})")
    for what, index, count in (("layer", layer, shape.n_layers), ("head", head, shape.n_heads)):
        if not 0 <= index < count:
            raise StoreError(f"{reader.run.path}: no {what} {index} ({what}s: 0..{count - 1})")
    name, part, parts = blocks[weight]
    dims = ("step", *VIEW_DIMS[weight])
    view = View(lazy_arrays(reader, [name])[name], dims, block=(part, parts))
    values = view.read((slice(None), layer, head, *[slice(None)] * (len(dims) - 3)))
    return xr.DataArray(values, dims=dims[:1] + dims[3:], coords=_run_coords(reader), name=weight)
