"""Loading analysis results for the summary and the report (the I/O that analysis/ does not do)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from observatory.query import open_family, resolve_size
from observatory.report.summary import SUMMARY_REQUIRED, Summary, check_results, summarize
from observatory.store import FamilyStore, ResultKind, analyses, analysis_parameters


def load_results(
    path: str | Path,
    *,
    size: str | None = None,
    seeds: list[int] | None = None,
    require: tuple[str, ...] = (),
) -> xr.Dataset:
    """The per-step loss and the analysis results of one size of a family, in memory.

    Every variable of every analysis stored in the runs is loaded (built-in or not, whatever
    its options), so what an analysis writes reaches the summary and the report.

    Parameters
    ----------
    path
        The family store.
    size
        Size name; may be omitted when the store has a single size.
    seeds
        Seed indices to load (default: every run of the size).
    require
        Variables that must hold results for at least one seed (e.g. ``("induction_score",)``).

    Returns
    -------
    xarray.Dataset
        ``loss[seed, train_step]`` and the analyses' variables (``induction_score[seed, step,
        layer, head]``, ...; each with the attribute ``analysis``: the analysis that wrote it),
        loaded, with coordinates ``seed``, ``init_seed``, ``data_seed``, ``complete`` (per
        seed), ``step``, ``tokens_seen``, ``train_step``; ``control_loss[seed, train_step]``
        where the size names a ``control`` size; ``attrs``: ``store``, ``size``,
        ``warmup_steps`` (of the learning rate) and ``analysis_parameters``
        (``{analysis: parameters}`` as recorded by the analysis job).

    Raises
    ------
    StoreError
        If the store, size or a seed does not exist, or a required analysis has no results.
    """
    family = FamilyStore(path)
    size = resolve_size(family, size)
    parameters: dict[str, Any] = {}
    readers = family.size_runs(size)
    if seeds is not None:
        readers = [family.run(size, seed) for seed in seeds]
    for reader in readers:
        for name in analyses(reader):
            parameters.setdefault(name, analysis_parameters(reader, name))
    family_ds = open_family(path, size=size, seeds=seeds)  # no results: NaN
    names = [
        name
        for name, values in family_ds.data_vars.items()
        if name == "loss" or "analysis" in values.attrs
    ]
    ds = family_ds[names].load()
    control = family.spec.size(size).control
    if control is not None:
        ds["control_loss"] = _control_loss(path, family, control, ds)
    ds.attrs = {
        "store": str(family.path),
        "size": size,
        "analysis_parameters": parameters,
        "warmup_steps": family.spec.optimizer.warmup_steps,
    }
    check_results(ds, require)
    return ds


def load_branches(
    path: str | Path, *, size: str | None = None, seeds: list[int] | None = None
) -> xr.Dataset | None:
    """The per-step loss and analysis results of the branches of one size's runs, in memory.

    A branch's checkpoints before its fork are its parent's, and so are their results (the
    analysis job analyses a branch from its fork on): they are read from the parent, so each
    branch has its whole trajectory.

    Parameters
    ----------
    path, size, seeds
        As in :func:`load_results`: the branches of these runs.

    Returns
    -------
    xarray.Dataset or None
        ``loss[branch, train_step]`` and the analyses' variables with a leading ``branch`` dim
        labelled ``"seed0/no-prev"`` (a branch of a branch: ``"seed0/no-prev/late"``, its
        results before its fork filled from its parent branch), with the coordinates ``seed``
        (the run's), ``fork``, ``intervention`` (the stored JSON) and ``intervention_sha256``
        on it; None when the runs have no branches.

    Raises
    ------
    StoreError
        If the store, size or a seed does not exist.
    """
    family = FamilyStore(path)
    size = resolve_size(family, size)
    both = open_family(path, size=size, seeds=seeds, branches=True)
    if not bool((both["branch"] != "").any()):
        return None
    names = [n for n, v in both.data_vars.items() if n == "loss" or "analysis" in v.attrs]
    both = both[names].load().drop_indexes(["run", "seed", "branch"])
    seeds_of, names_of = both["seed"].values, both["branch"].values
    rows = np.flatnonzero(names_of != "")
    # the run or branch each branch forks from ("a" for "a/b"); listed before its branches
    parents = {
        i: int(np.flatnonzero((seeds_of == seeds_of[i]) & (names_of == up))[0])
        for i in rows
        for up in [names_of[i].rpartition("/")[0]]
    }
    for name in names:  # results before the fork are the parent's: the branch has none there
        values = both[name]
        if values.dims[:2] != ("run", "step"):
            continue
        filled = values.values.copy()
        for i, parent in parents.items():  # a parent is filled before its branches
            before = both["step"].values < both["fork"].values[i]
            filled[i, before] = filled[parent, before]
        both[name] = values.copy(data=filled)
    branches = both.isel(run=rows)
    records = [
        family.run(size, int(seeds_of[i]), str(both["branch"].values[i])).branch for i in rows
    ]
    labels = [f"seed{int(seeds_of[i])}/{both['branch'].values[i]}" for i in rows]
    branches = branches.rename(run="branch_run").drop_vars("branch")
    branches = branches.rename(branch_run="branch").assign_coords(
        branch=labels,
        intervention=("branch", [json.dumps(r["intervention"], sort_keys=True) for r in records]),
        intervention_sha256=("branch", [r["intervention_sha256"] for r in records]),
    )
    branches.attrs = {"store": str(family.path), "size": size}
    return branches


def _control_loss(path, family: FamilyStore, control: str, ds: xr.Dataset) -> xr.DataArray:
    """``control_loss[seed, train_step]``: the control size's per-step loss on the same batches
    (NaN where the control run of a seed is not trained)."""
    trained = {run.seed for run in family.runs() if run.size == control}
    seeds = [int(seed) for seed in ds["seed"].values if int(seed) in trained]
    loss = xr.full_like(ds["loss"], float("nan"))
    if seeds:
        found = open_family(path, size=control, seeds=seeds)["loss"].load()
        found = found.reindex(train_step=ds["train_step"])
        loss.loc[{"seed": seeds}] = found.transpose(*loss.dims).values
    loss.attrs = {"control": control, "description": f"per-step training loss of {control}"}
    return loss


def summary(
    path: str | Path,
    *,
    size: str | None = None,
    seeds: list[int] | None = None,
    threshold: float | None = None,
    include_incomplete: bool = False,
) -> Summary:
    """Circuit formation per seed and across seeds of one size of a family store (``obs.summary``).

    Loads the results (:func:`load_results`) and the branches' (:func:`load_branches`) and
    returns :func:`~observatory.report.summary.summarize` of them; see there for the columns.

    Parameters
    ----------
    path, size, seeds
        Which results: as in :func:`load_results`.
    threshold, include_incomplete
        As in :func:`~observatory.report.summary.summarize`.

    Raises
    ------
    StoreError
        If the store, size or a seed does not exist, or nothing was analysed.
    """
    ds = load_results(path, size=size, seeds=seeds, require=SUMMARY_REQUIRED)
    branches = load_branches(path, size=ds.attrs["size"], seeds=seeds)
    return summarize(
        ds, threshold=threshold, include_incomplete=include_incomplete, branches=branches
    )


def stored_results(ds: xr.Dataset, kind: ResultKind) -> list[tuple[int, str]]:
    """``(seed, name)`` of every result of ``kind`` (e.g. ``ATTRIBUTION``) stored in the runs of
    the seeds of ``ds`` (``attrs``: ``store``, ``size``), by seed then name."""
    family, size = FamilyStore(ds.attrs["store"]), str(ds.attrs["size"])
    return [
        (int(seed), name)
        for seed in ds["seed"].values
        for name in sorted(analyses(family.run(size, int(seed)), kind=kind))
    ]
