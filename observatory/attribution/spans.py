"""What every per-step result along an exact replay shares: the span and its tasks, the check
of the replayed weights, and the stored rows.

A result of the updates ``[start, stop)`` of one run (an attribution, the training dynamics)
is computed by replaying the span with the trainer's own step.  :func:`open_span` checks the
arguments and the run before anything runs; the span is split at the run's keyframes into
tasks (:func:`spans`), each replaying from its own keyframe, run in this process or as dask
tasks (:func:`map_spans`); a task compares the weights it reaches at its end with the stored
checkpoint there (:func:`check_stop`).  The combined result is one dataset with rows by
``train_step``, stored in the run through the analyses' writer (:func:`write_rows`) and read
back as the same dataset (:func:`read_rows`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from observatory import arguments
from observatory.arguments import ArgumentError
from observatory.errors import StoreError
from observatory.jobs.cluster import dask_client
from observatory.models import stack_layers
from observatory.store import AnalysisWriter, FamilyStore, ResultKind, analyses, read_results
from observatory.train.replay import ReplaySource


@dataclass(frozen=True)
class Span:
    """The updates ``start .. stop - 1`` of one run or branch, checked: its store (opened for
    writing the result) and its replay source."""

    family: FamilyStore
    source: ReplaySource
    size: str
    seed: int
    start: int
    stop: int
    branch: str = ""

    @property
    def parts(self) -> list[tuple[int, int]]:
        """The tasks' spans: ``[start, stop)`` split at the run's keyframes."""
        return spans(self.source, self.start, self.stop)

    @property
    def where(self) -> dict[str, Any]:
        """Where its result is stored, as the result's attributes (``run``: its path)."""
        return where(self.family, self.source.reader)


def where(family: FamilyStore, reader) -> dict[str, Any]:
    """The attributes that say which run or branch of which store a result belongs to."""
    run = reader.run
    place = {"store": str(family.path), "size": run.size, "seed": run.seed}
    return place | {"branch": run.branch, "run": run.path}


def open_span(
    store: str | Path, *, size: str, seed: int, start: int, stop: int, branch: str = ""
) -> Span:
    """The span of updates ``[start, stop)`` of a run (or its branch ``branch``, ``"a/b"`` for
    a branch of a branch), checked before anything runs.

    A branch's span may start before its fork: its steps there are its parent's, replayed
    through the parent as the branch's own replay does, its intervention acting from the fork on.

    Raises
    ------
    ArgumentError
        If ``start`` or ``stop`` is not a non-negative integer, or ``stop <= start``.
    StoreError
        If the run or branch does not exist or cannot be replayed here, or the steps are not
        recorded.
    """
    start, stop = arguments.index(start, "start"), arguments.index(stop, "stop")
    if stop <= start:
        raise ArgumentError(f"stop: must be after start ({start}), got {stop}")
    family = FamilyStore(store, mode="r+")
    source = ReplaySource.open(family.path, size=size, seed=seed, strict=True, branch=branch)
    source.check_range(start, stop)
    source.keyframe_before(start)
    return Span(family, source, size, seed, start, stop, branch)


def result_name(name: Any) -> str:
    """``name`` as the name of a stored result: an identifier (a group name).

    Raises
    ------
    ArgumentError
        If it is not a non-empty str that is an identifier.
    """
    name = arguments.name(name, "name")
    if not name.isidentifier():
        raise ArgumentError(f"name: expected an identifier (a group name), got {name!r}")
    return name


def spans(source: ReplaySource, start: int, stop: int) -> list[tuple[int, int]]:
    """``[start, stop)`` split at the run's keyframes: the tasks' spans, in order."""
    keyframes = source.reader.keyframe_steps()
    inner = [int(k) for k in keyframes if start < k < stop]
    edges = [start, *inner, stop]
    return list(zip(edges[:-1], edges[1:], strict=True))


def map_spans(
    task: Callable[..., Any],
    span: Span,
    *args: Any,
    workers: int = 0,
    scheduler: str | None = None,
) -> list[Any]:
    """``task(store, size, seed, branch, part, *args)`` for each of the span's parts, in order.

    With ``workers`` and no ``scheduler`` (0 and None) in this process; else as dask tasks on
    a local cluster of ``workers`` processes or on the scheduler at ``scheduler``, each of
    ``args`` sent once to every worker.  A task's numbers must not depend on where it runs.
    """
    call = (str(span.family.path), span.size, span.seed, span.branch)
    if not (workers or scheduler):
        return [task(*call, part, *args) for part in span.parts]
    with dask_client(scheduler=scheduler, workers=workers) as client:
        # each in a list of its own: scatter would split a sequence into one future per item
        sent = [client.scatter([arg], broadcast=True)[0] for arg in args]
        futures = [client.submit(task, *call, part, *sent, pure=False) for part in span.parts]
        return client.gather(futures)


def flat_weights(model) -> torch.Tensor:
    """The weights flattened in ``named_parameters`` order (float64, a copy)."""
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def check_stop(source: ReplaySource, stop: int, model, hint: str = "") -> tuple[int, ...]:
    """Compare the weights replayed to ``stop`` with the stored checkpoint there, if any.

    Returns
    -------
    tuple of int
        ``(stop,)`` if a checkpoint was compared, else ``()``.

    Raises
    ------
    StoreError
        If they differ (``hint`` says what may have changed the model).
    """
    if stop not in set(source.reader.steps().tolist()):
        return ()
    stored = source.reader.parameters_at(stop)
    here = stack_layers({name: p.detach() for name, p in model.named_parameters()})
    for name, values in stored.items():
        if not np.array_equal(np.asarray(here[name]), values):
            raise StoreError(
                f"{source.reader.run.path}: the weights replayed to step {stop} differ from the "
                f"stored checkpoint ({name}){hint}"
            )
    return (stop,)


def write_rows(
    span: Span, name: str, dataset: xr.Dataset, kind: ResultKind, nonfinite: Sequence[str] = ()
) -> None:
    """Store a dataset as the run's (or branch's) ``<kind.group>/<name>`` (replacing it): its
    variables with
    a leading row dim as rows, the others as constants, its attributes as the parameters.

    ``nonfinite``: variables whose NaN or infinite values are results.
    """
    rows = [v for v in dataset.data_vars if dataset[v].dims[:1] == (kind.row_dim,)]
    constants = {
        v: (dataset[v].dims, dataset[v].values) for v in dataset.data_vars if v not in rows
    }
    writer = AnalysisWriter(
        span.family.run(span.size, span.seed, span.branch),
        name,
        attrs=dict(dataset.attrs),
        variables={v: (dataset[v].dims[1:], dataset[v].shape[1:]) for v in rows},
        constants=constants,
        nonfinite=tuple(nonfinite),
        recompute=True,
        kind=kind,
        dtypes={v: str(dataset[v].dtype) for v in rows},
    )
    writer.append(dataset[kind.row_dim].values, {v: dataset[v].values for v in rows})
    writer.flush()


def read_rows(
    store: str | Path,
    *,
    size: str,
    seed: int,
    name: str | None,
    kind: ResultKind,
    order: Sequence[str],
    branch: str = "",
) -> xr.Dataset:
    """A result stored by :func:`write_rows`, read back: its variables in ``order``, the rows as
    the row coordinate, the parameters as attributes (plus ``store``, ``size``, ``seed``,
    ``branch``, ``run`` and ``name``).  ``name=None`` reads the run's (or branch's) only
    result of the kind.

    Raises
    ------
    StoreError
        If the run has no such result (the message lists the stored ones), or ``name`` is None
        and it has several or none.
    """
    family = FamilyStore(store)
    reader = family.run(size, seed, branch)
    if name is None:
        stored = analyses(reader, kind=kind)
        if not stored:
            raise StoreError(f"{reader.run.path}: no {kind.noun} stored")
        if len(stored) > 1:
            raise StoreError(
                f"{reader.run.path}: {len(stored)} {kind.noun} results stored "
                f"({kind.group}: {', '.join(stored)}); pass the name of one"
            )
        name = stored[0]
    rows, arrays, parameters = read_results(reader, name, kind=kind)
    dataset = xr.Dataset(
        {key: (dims, values) for key, (dims, values) in arrays.items()},
        coords={kind.row_dim: rows},
        attrs=parameters,
    )
    ordered = [v for v in order if v in dataset]
    return dataset[ordered].assign_attrs(where(family, reader), name=name)
