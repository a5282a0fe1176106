"""Lazy queries over a family store: xarray views of every run, models and batches at a step.

Every array is a dask view of the zarr store: opening reads metadata and the small step
coordinates only, and a selection such as ``ds["W_Q"].sel(layer=1, head=2)`` reads just that
head's chunks when computed.  Only committed checkpoints and step records are visible, so a
store can be opened while a run is still training.

Dims: ``seed`` (runs of a family), ``step`` (checkpoint steps, with ``tokens_seen``),
``train_step`` (per-step metrics and batches), the parameter dims of
:data:`observatory.models.PARAMETER_DIMS` for the raw Hugging Face parameters, and ``head``,
``d_head`` for the TransformerLens-style per-head views of :data:`VIEW_DIMS`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import dask.array as da
import numpy as np
import torch
import xarray as xr
import zarr
from dask.base import tokenize
from transformers import AutoConfig, PreTrainedModel

from observatory.data import Corpus
from observatory.errors import StoreError
from observatory.models import (
    PER_HEAD_DIMS,
    model_from_config,
    parameter_dims,
    transformer_lens_weights,
    unstack_layers,
)
from observatory.spec import DataSpec
from observatory.store import STEP_RECORDS, FamilyStore, RunReader

# Dims of the per-head views of :func:`observatory.models.transformer_lens_weights`,
# after the leading ``step`` dim.
VIEW_DIMS: dict[str, tuple[str, ...]] = {
    "W_Q": ("layer", "head", "d_model", "d_head"),
    "W_K": ("layer", "head", "d_model", "d_head"),
    "W_V": ("layer", "head", "d_model", "d_head"),
    "W_O": ("layer", "head", "d_head", "d_model"),
    "b_Q": ("layer", "head", "d_head"),
    "b_K": ("layer", "head", "d_head"),
    "b_V": ("layer", "head", "d_head"),
    "b_O": ("layer", "d_model"),
    "W_E": ("d_vocab", "d_model"),
    "W_U": ("d_model", "d_vocab"),
    "W_pos": ("n_ctx", "d_model"),
}


# --------------------------------------------------------------------------------------------
# xarray views.


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
    nodes: dict[str, xr.Dataset] = {"/": xr.Dataset(attrs=family.attrs)}
    for size in family.sizes():
        nodes[size] = xr.Dataset(attrs=family.size_attrs(size))
    for run in family.runs():
        nodes[run.path] = _run_dataset(RunReader(family, run))
    return xr.DataTree.from_dict(nodes, name=family.spec.name)


def open_run(path: str | Path, *, size: str, seed: int) -> xr.Dataset:
    """Open one run as a lazy dataset of its committed checkpoints and step records.

    Parameters
    ----------
    path
        The family store.
    size
        Size name, as in the spec's ``[[model.sizes]]``.
    seed
        Seed index (position in the spec's seed list).

    Returns
    -------
    xarray.Dataset
        Dask-backed variables: the raw Hugging Face parameters under their stacked names
        (``[step, layer, ...]``), the per-head views of :data:`VIEW_DIMS` (``W_Q``, ``W_O``,
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
    return _run_dataset(FamilyStore(path).run(size, seed))


def open_family(path: str | Path, *, size: str, seeds: Sequence[int] | None = None) -> xr.Dataset:
    """Open every run of one size as a single lazy dataset with a ``seed`` dim.

    Parameters
    ----------
    path
        The family store.
    size
        Size name.
    seeds
        Seed indices to include (default: every run of the size in the store).

    Returns
    -------
    xarray.Dataset
        The datasets of :func:`open_run` concatenated along ``seed`` (with ``init_seed`` and
        ``data_seed`` as coordinates on it).  Checkpoint steps and training steps are the
        union over the runs, so a run that has committed fewer checkpoints than the others
        (still training, or stopped) reads as NaN where it has no data.

    Raises
    ------
    StoreError
        If the store, size or a seed does not exist (the message lists what does).

    Examples
    --------
    >>> ds = obs.open_family("store/induction.zarr", size="l2-d64")
    >>> ds["W_Q"].sel(layer=1, head=2).sel(step=slice(100, 600)).mean("d_model").compute()
    """
    family = FamilyStore(path)
    if seeds is None:
        readers = family.size_runs(size)
    else:
        readers = [family.run(size, seed) for seed in seeds]
    datasets = [_run_dataset(reader) for reader in readers]
    tokens_seen: dict[int, int] = {}
    for ds in datasets:
        tokens_seen.update(ds["tokens_seen"].to_series().items())
    combined = xr.concat(
        [ds.drop_vars("tokens_seen") for ds in datasets],
        dim="seed",
        data_vars="all",
        coords="different",
        compat="equals",
        join="outer",
        combine_attrs="drop_conflicts",
    )
    steps = combined["step"].values.tolist()
    return combined.assign_coords(tokens_seen=("step", [tokens_seen[s] for s in steps]))


def _run_dataset(reader: RunReader) -> xr.Dataset:
    """The lazy dataset of one run (see :func:`open_run`)."""
    family, run = reader.family, reader.run
    n_ckpt, n_steps = reader.n_checkpoints, reader.n_steps
    arrays = reader.arrays()
    variables = {
        name: _variable(arrays[name], n_ckpt, reader=reader) for name in reader.parameter_names
    }
    views = transformer_lens_weights(
        {name: variable.data for name, variable in variables.items()},
        architecture=family.spec.model.architecture,
        n_heads=family.spec.size(run.size).n_heads,
    )
    variables |= {name: xr.Variable(("step", *VIEW_DIMS[name]), v) for name, v in views.items()}
    # The writer stores step records consecutively from 0: nothing to read for the coordinate.
    train_step = np.arange(n_steps, dtype=np.int64)
    records = [name for name in STEP_RECORDS if name != "train_step"]
    variables |= {name: _variable(arrays[name], n_steps, reader=reader) for name in records}
    ds = xr.Dataset(
        variables,
        coords=_run_coords(reader) | {"train_step": train_step},
        attrs={
            "family": family.spec.name,
            "size": run.size,
            "architecture": family.spec.model.architecture,
            "store": str(family.path),
        },
    )
    analyses = _analysis_variables(reader, ds["step"].values)
    try:
        return ds.assign(analyses)
    except ValueError as err:  # e.g. an analysis dim whose size clashes with the run's
        first_line = str(err).splitlines()[0]
        raise StoreError(f"{run.path}: analysis results do not fit the run: {first_line}") from None


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
    }


def _analysis_variables(reader: RunReader, steps: np.ndarray) -> dict[str, xr.DataArray]:
    """Every array of every analysis group, aligned on the run's committed checkpoint steps."""
    out: dict[str, xr.DataArray] = {}
    for name in reader.analyses():
        covered, arrays = reader.analysis_arrays(name)
        for key, array in arrays.items():
            if key in out:
                raise StoreError(
                    f"{reader.run.path}: analyses {out[key].attrs['analysis']!r} and {name!r} "
                    f"both have an array {key!r}"
                )
            if _dims(array)[0] == "step":
                variable = _variable(array, len(covered), covered, reader=reader)
                values = xr.DataArray(variable, coords={"step": covered}).reindex(step=steps)
            else:
                values = xr.DataArray(_variable(array, None, reader=reader))
            out[key] = values.assign_attrs(dict(array.attrs), analysis=name)
    return out


class _StoredArray:
    """A run's array as dask reads it: through :meth:`RunReader.read`.

    That read stays consistent while the run's writer commits more checkpoints, and reports a
    damaged chunk as a :class:`StoreError`.
    """

    def __init__(self, reader: RunReader, array: zarr.Array):
        self.reader, self.array = reader, array
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __getitem__(self, selection: object) -> np.ndarray:
        return self.reader.read(self.array, selection)


def _variable(array: zarr.Array, n: int | None, *content: object, reader: RunReader) -> xr.Variable:
    """A dask-backed variable of ``array[:n]``, one task per stored chunk (reads nothing).

    The dask name hashes the array's path, ``n`` and ``content`` (whatever else identifies
    the data), not the array itself: committed entries never change, and hashing a zarr array
    costs more than everything else here.
    """
    name = f"observatory-{tokenize(str(array.store_path), n, *content)}"
    meta = np.empty((0,) * array.ndim, dtype=array.dtype)
    source = _StoredArray(reader, array)
    data = da.from_array(source, chunks=array.chunks, name=name, meta=meta)[:n]
    return xr.Variable(_dims(array), data)


def _dims(array: zarr.Array) -> tuple[str, ...]:
    names = array.metadata.dimension_names
    if names is None or None in names:
        raise StoreError(f"{array.path}: array has no dimension names")
    return tuple(names)


# --------------------------------------------------------------------------------------------
# Direct reads of one head.


# Where each per-head view lives in the stacked HF parameters: the parameter, and the view's
# position among the d_head-sized blocks that each head owns along the parameter's per-head dim
# (GPT-NeoX fuses q, k, v: rows are [head, (q, k, v), d_head]).
HEAD_BLOCKS: dict[str, dict[str, tuple[str, int, int]]] = {
    "gpt_neox": {
        f"{kind}_{key}": (f"gpt_neox.layers.attention.query_key_value.{name}", part, 3)
        for kind, name in (("W", "weight"), ("b", "bias"))
        for part, key in enumerate("QKV")
    }
    | {"W_O": ("gpt_neox.layers.attention.dense.weight", 0, 1)},
    "attn_only": {
        f"{kind}_{key}": (f"layers.attn.{key.lower()}_proj.{name}", 0, 1)
        for kind, name in (("W", "weight"), ("b", "bias"))
        for key in "QKV"
    }
    | {"W_O": ("layers.attn.o_proj.weight", 0, 1)},
}


def head_weights(
    path: str | Path, *, size: str, seed: int, layer: int, head: int, weight: str = "W_Q"
) -> xr.DataArray:
    """One head's weight at every committed checkpoint, read straight from its chunks.

    The fast path for a single head: it reads that head's rows of the stacked parameter (one
    chunk per shard of checkpoints) without building the lazy dataset, and returns the same
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
    spec = reader.family.spec
    blocks, shape = HEAD_BLOCKS[spec.model.architecture], spec.size(size)
    if weight not in blocks:
        raise StoreError(f"no per-head weight {weight!r} (per-head weights: {', '.join(blocks)})")
    for what, index, count in (("layer", layer, shape.n_layers), ("head", head, shape.n_heads)):
        if not 0 <= index < count:
            raise StoreError(f"{reader.run.path}: no {what} {index} ({what}s: 0..{count - 1})")
    name, part, parts = blocks[weight]
    dims = parameter_dims(name)  # (layer, ...) with one per-head dim
    per_head = next(dim for dim in dims if dim in PER_HEAD_DIMS)
    start = (head * parts + part) * shape.d_head
    select = {"layer": layer, per_head: slice(start, start + shape.d_head)}
    region = (slice(0, reader.n_checkpoints), *(select.get(dim, slice(None)) for dim in dims))
    values = reader.read(reader.parameter_array(name), region)
    kept = ["d_head" if dim == per_head else dim for dim in dims if dim != "layer"]
    out = xr.DataArray(values, dims=("step", *kept), coords=_run_coords(reader), name=weight)
    return out.transpose("step", *VIEW_DIMS[weight][2:])


# --------------------------------------------------------------------------------------------
# Models and batches.


def model_at(path: str | Path, *, size: str, seed: int, step: int) -> PreTrainedModel:
    """The Hugging Face model of one run with its weights at checkpoint ``step``.

    Parameters
    ----------
    path
        The family store.
    size
        Size name.
    seed
        Seed index.
    step
        The weights after ``step`` updates.  A committed checkpoint is read; any other
        recorded step is replayed from the nearest keyframe before it (with a warning that
        says so; see :func:`observatory.replayer.replay`).

    Returns
    -------
    transformers.PreTrainedModel
        A GPT-NeoX or attention-only model (eager attention, eval mode) whose logits equal
        those of the trainer's model at that step.  The global torch RNG is left untouched.

    Raises
    ------
    StoreError
        If the store, size, seed or step does not exist (the message lists what does).
    """
    reader = FamilyStore(path).run(size, seed)
    if step not in reader.steps() and 0 <= step <= reader.n_steps:
        from observatory.replayer import model_at_step

        return model_at_step(path, size=size, seed=seed, step=step)
    model = _empty_model(reader)
    model.load_state_dict(unstack_layers(reader.parameters_at(step)), strict=True)
    return model.eval()


def models_at(
    path: str | Path, *, size: str, seed: int, steps: Sequence[int]
) -> Iterator[tuple[int, PreTrainedModel]]:
    """The model of one run at each of several checkpoints, for scoring them in turn.

    Reads each parameter array once for all ``steps`` and loads the weights into one model,
    which is yielded again for every step: use it before asking for the next.

    Parameters
    ----------
    path
        The family store.
    size
        Size name.
    seed
        Seed index.
    steps
        Committed checkpoint steps, best close together (they share chunks).

    Yields
    ------
    tuple of (int, transformers.PreTrainedModel)
        The step and the model (eval mode) with that step's weights.
    """
    reader = FamilyStore(path).run(size, seed)
    stacked = reader.parameters_for(steps)
    model = _empty_model(reader).eval()
    for row, step in enumerate(steps):
        weights = unstack_layers({name: values[row] for name, values in stacked.items()})
        model.load_state_dict(weights, strict=True)
        yield step, model


def _empty_model(reader: RunReader) -> PreTrainedModel:
    config = AutoConfig.for_model(**reader.family.size_attrs(reader.run.size)["hf_config"])
    with torch.random.fork_rng(devices=[]):  # the throwaway initialisation draws numbers
        return model_from_config(config)


def batch_at(path: str | Path, *, size: str, seed: int, step: int) -> torch.Tensor:
    """The token batch that a run consumed at training step ``step``.

    The corpus is rebuilt from the stored spec (and cached) and must have the fingerprint
    recorded in the store; the batch's corpus indices are the ones the trainer recorded.

    Parameters
    ----------
    path
        The family store.
    size
        Size name.
    seed
        Seed index.
    step
        Training step (0-based): the batch of the update from checkpoint ``step`` to
        ``step + 1``.

    Returns
    -------
    torch.Tensor
        ``tokens[batch, context]`` (int64).

    Raises
    ------
    StoreError
        If the store, size, seed or step does not exist, or the rebuilt corpus differs from
        the one the store was trained on.
    """
    family = FamilyStore(path)
    indices = family.run(size, seed).batch_indices(step)
    return stored_corpus(family).batch(indices)


def stored_corpus(family: FamilyStore) -> Corpus:
    """The corpus a store was trained on, rebuilt from its spec (cached) and fingerprint-checked.

    Raises
    ------
    StoreError
        If the rebuilt corpus differs from the one the store was trained on.
    """
    spec = family.spec
    corpus = _corpus(spec.data, spec.train.context, spec.model.vocab_size)
    stored = family.attrs["data"]["fingerprint"]
    if corpus.fingerprint != stored:
        raise StoreError(
            f"{family.path}: the corpus rebuilt from the stored spec has fingerprint "
            f"{corpus.fingerprint}, but the store was trained on {stored} (changed corpus files?)"
        )
    return corpus


@lru_cache(maxsize=2)
def _corpus(data: DataSpec, context: int, vocab_size: int) -> Corpus:
    return data.build(context=context, vocab_size=vocab_size)


# --------------------------------------------------------------------------------------------
# Summary.


def describe(path: str | Path) -> str:
    """A human-readable summary of a store: runs, seeds, checkpoints, tokens seen, disk use.

    Parameters
    ----------
    path
        The family store.

    Returns
    -------
    str
        Several lines: the family and its corpus, then one line per run with its seeds,
        status, committed checkpoints and their steps, tokens seen at the last checkpoint,
        bytes on disk and analyses.  This is what ``observatory inspect`` prints.

    Raises
    ------
    StoreError
        If the store is missing or is not an observatory store.
    """
    family = FamilyStore(path)
    spec, data = family.spec, family.attrs["data"]
    runs = family.runs()
    lines = [
        f"{family.path}: family {spec.name!r} ({spec.model.architecture}, vocab "
        f"{spec.model.vocab_size}), {len(runs)} run{'s' * (len(runs) != 1)}, "
        f"{_human_bytes(family.disk_bytes())} on disk",
        f"corpus: {spec.data.source}, {data.get('n_sequences', '?')} sequences of "
        f"{spec.train.context} tokens, fingerprint {data['fingerprint']}; "
        f"{spec.train.steps} steps of {spec.train.batch_size} sequences per run",
    ]
    header = ("run", "init", "data", "status", "checkpoints", "steps", "tokens seen", "disk", "")
    for size_name in family.sizes():
        size = spec.size(size_name)
        lines.append(
            f"{size_name}: {size.n_layers} layers, d_model {size.d_model}, {size.n_heads} heads"
        )
        rows = [header]
        for reader in (RunReader(family, run) for run in runs if run.size == size_name):
            steps, tokens = reader.steps(), reader.tokens_seen()
            analyses = reader.analyses()
            rows.append(
                (
                    reader.run.path.rpartition("/")[2],
                    str(reader.run.init_seed),
                    str(reader.run.data_seed),
                    "complete" if reader.complete else "incomplete",
                    f"{reader.n_checkpoints}/{len(reader.attrs['schedule'])}",
                    _summarize(steps),
                    f"{int(tokens[-1]):,}" if len(tokens) else "0",
                    _human_bytes(family.disk_bytes(reader.run.path)),
                    f"analyses: {', '.join(analyses)}" if analyses else "",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines.extend(
            "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in rows
        )
    return "\n".join(lines)


def _summarize(steps: np.ndarray, head: int = 5) -> str:
    shown = [str(int(s)) for s in steps[:head]]
    if len(steps) > head + 1:
        shown.append("...")
    if len(steps) > head:
        shown.append(str(int(steps[-1])))
    return ", ".join(shown) or "none"


def _human_bytes(n: float) -> str:
    units = ["B", "kB", "MB", "GB", "TB"]
    while n >= 1000 and len(units) > 1:
        n /= 1000
        units.pop(0)
    return f"{n:.1f} {units[0]}"
