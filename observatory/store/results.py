"""Results of a run: analysis results by checkpoint, attributions by training step.

Written by :class:`AnalysisWriter`, read back by row.  The group ``<run>/analysis/<name>``
holds one array per result variable with a leading ``step`` dim, plus a ``step`` array listing
which checkpoint each row belongs to (in any order, extended last, so readers only see finished
rows).  Attributions (:mod:`observatory.attribution`) use the same machinery with rows of
training steps: ``<run>/attribution/<name>`` with a leading ``train_step`` dim and a
``train_step`` array (see :class:`ResultKind`), and so do the training dynamics of a replay
(``<run>/dynamics/<name>``).  The group is created with the first rows
of validated results, and readers ignore a group whose row array lists nothing: a job that
fails before its first rows leaves nothing a reader sees.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from observatory.errors import StoreError
from observatory.store.common import child, children, read_whole
from observatory.store.integrity import checked_read
from observatory.store.layout import (
    ANALYSIS_GROUP,
    ATTRIBUTION_GROUP,
    DYNAMICS_GROUP,
    WRITE_CONFIG,
    attrs_of,
    compressors,
    set_attrs,
)

if TYPE_CHECKING:
    from observatory.store.reader import RunReader

ANALYSIS_FLUSH_ROWS = 256  # analysis rows buffered before they are written (one chunk) ...
ANALYSIS_FLUSH_SECONDS = 10.0  # ... or after this long


@dataclass(frozen=True)
class ResultKind:
    """A kind of stored results: the run's group that holds them and the dim of their rows.

    Attributes
    ----------
    group
        The group under the run (``analysis``): one subgroup per name.
    row_dim
        The leading dim of every result array, and the name of the array listing the rows.
    noun
        What error messages call one of them.
    """

    group: str
    row_dim: str
    noun: str


ANALYSIS = ResultKind(ANALYSIS_GROUP, "step", "analysis")
ATTRIBUTION = ResultKind(ATTRIBUTION_GROUP, "train_step", "attribution")
DYNAMICS = ResultKind(DYNAMICS_GROUP, "train_step", "training dynamics")


def analysis_group(
    reader: RunReader, name: str, *, create: bool = False, kind: ResultKind = ANALYSIS
) -> zarr.Group | None:
    """The group of an analysis's (or other ``kind``'s) results (None if absent, unless
    ``create``)."""
    path = f"{kind.group}/{name}"
    group = child(reader.group, path)
    if group is None and create:
        return reader.group.require_group(path)
    return group


def analyses(reader: RunReader, *, kind: ResultKind = ANALYSIS) -> list[str]:
    """Names of the analyses (or other ``kind``) stored for a run (at least one committed row)."""
    group = child(reader.group, kind.group)
    members = [] if group is None else children(group, zarr.Group)
    return [name for name, member in members if _committed(member, kind)]


def _committed(group: zarr.Group, kind: ResultKind = ANALYSIS) -> bool:
    """Whether a results group lists a row: its row array is written last."""
    rows = child(group, kind.row_dim)
    return isinstance(rows, zarr.Array) and rows.shape[0] > 0


def analysis_parameters(
    reader: RunReader, name: str, *, kind: ResultKind = ANALYSIS
) -> dict[str, Any] | None:
    """The parameters an analysis's results were computed with (None: no such analysis)."""
    group = analysis_group(reader, name, kind=kind)
    committed = group is not None and _committed(group, kind)
    return attrs_of(group).get("parameters") if committed else None


def analysis_arrays(
    reader: RunReader, name: str, *, kind: ResultKind = ANALYSIS
) -> tuple[np.ndarray, dict[str, zarr.Array]]:
    """The checkpoint steps an analysis covers (the rows of another ``kind``), and its other
    arrays.

    The group's ``step`` array (see :class:`AnalysisWriter`) lists the checkpoint of each
    row, in any order, and is extended last: the arrays with a leading ``step`` dim are
    valid up to its length.  A group still being created covers no checkpoint yet, and is
    not listed by :func:`analyses`.
    """
    group = analysis_group(reader, name, kind=kind)
    if group is None or not _committed(group, kind):
        known = analyses(reader, kind=kind)
        raise StoreError(f"{reader.run.path}: no {kind.noun} {name!r} ({kind.group}: {known})")
    arrays = dict(children(group, zarr.Array))
    rows = arrays.pop(kind.row_dim, None)
    return (np.zeros(0, np.int64) if rows is None else read_whole(rows)), arrays


def read_results(
    reader: RunReader, name: str, *, kind: ResultKind = ANALYSIS
) -> tuple[np.ndarray, dict[str, tuple[tuple[str, ...], np.ndarray]], dict[str, Any]]:
    """Stored results read whole: the rows, ``{array: (dims, values)}`` and the parameters.

    Arrays with a leading row dim are cut to the listed rows (a writer extends them first).

    Raises
    ------
    StoreError
        If there are no such results, or a chunk is missing or damaged.
    """
    rows, arrays = analysis_arrays(reader, name, kind=kind)
    out = {}
    for key, array in arrays.items():
        dims = tuple(array.metadata.dimension_names or ())  # () for a 0-d array
        values = checked_read(array, ...)
        out[key] = (dims, values[: len(rows)] if dims[:1] == (kind.row_dim,) else values)
    return np.array(rows), out, analysis_parameters(reader, name, kind=kind) or {}


def _require_variables(group, variables: dict[str, Any], where: str, row_dim: str) -> None:
    """Stored results must have the variables the analysis declares now (a one-line error)."""
    stored = set(group.array_keys()) - {row_dim}
    declared = set(variables)
    if not declared <= stored:
        raise StoreError(
            f"{where}: existing results lack {', '.join(sorted(declared - stored))}, which the "
            "analysis now returns (it changed since); pass --recompute to replace them"
        )


class AnalysisWriter:
    """Appends the results of one analysis for one run, checkpoint by checkpoint.

    The group ``<run>/analysis/<name>`` holds one array per result variable with a leading
    ``step`` dim, plus a ``step`` array listing which checkpoint each row belongs to.  Rows are
    appended in any order; ``step`` is extended last, so readers only see finished rows and a
    re-run can skip the checkpoints already listed.  Appended rows are buffered and written
    together (every ``ANALYSIS_FLUSH_ROWS`` rows or ``ANALYSIS_FLUSH_SECONDS``, and on
    :meth:`flush`): each write resizes and rewrites a partly filled chunk of every array.

    Nothing is written before the first rows: the group (parameters, arrays, constants) is
    created, or replaced (``recompute``, or a group that lists no checkpoint, left by a job
    that stopped while creating it), by the first :meth:`flush` that has rows.  A job whose
    analyses all fail therefore leaves the store as it was.

    Parameters
    ----------
    reader
        The run, from a :class:`FamilyStore` opened with ``mode="r+"``.
    name
        Analysis name (the group name).
    attrs
        The analysis parameters (probe seed, conventions, ...), stored on the group.  Existing
        results computed with other parameters are an error unless ``recompute``.
    variables
        ``{variable: (dims_after_step, shape_after_step)}``; stored as float32.
    constants
        ``{name: (dims, values)}``: arrays that do not depend on the checkpoint (e.g. the probe
        tokens), stored with the group.
    nonfinite
        Variables whose NaN or infinite values are results (the attribute ``nonfinite`` is set
        on their arrays).
    recompute
        Replace existing results (at the first flush with rows).
    kind
        What the rows are: checkpoints (:data:`ANALYSIS`, the default) or training steps
        (:data:`ATTRIBUTION`, :data:`DYNAMICS`).
    dtypes
        ``{variable: dtype}`` for variables not stored as float32 (e.g. ``"float64"``,
        ``"int64"``).
    """

    def __init__(
        self,
        reader: RunReader,
        name: str,
        *,
        attrs: dict[str, Any],
        variables: dict[str, tuple[tuple[str, ...], tuple[int, ...]]],
        constants: dict[str, tuple[tuple[str, ...], np.ndarray]] | None = None,
        nonfinite: tuple[str, ...] = (),
        recompute: bool = False,
        kind: ResultKind = ANALYSIS,
        dtypes: Mapping[str, str] | None = None,
    ):
        self.where = f"{reader.run.path}/{kind.group}/{name}"
        self._compressors = compressors(reader.family.spec.store)
        self._reader, self._name, self._kind = reader, name, kind
        self._attrs, self._variables, self._nonfinite = attrs, variables, nonfinite
        self._constants, self._dtypes = constants or {}, dict(dtypes or {})
        group = analysis_group(reader, name, kind=kind)
        if group is not None and (recompute or not _committed(group, kind)):
            group = None  # replaced when the first rows are written
        if group is not None:
            stored = attrs_of(group).get("parameters") or {}
            if stored != attrs:
                keys = stored.keys() | attrs.keys()
                changed = sorted(k for k in keys if stored.get(k) != attrs.get(k))
                raise StoreError(
                    f"{self.where}: existing results were computed with other parameters "
                    f"({', '.join(changed)} differ); pass --recompute to replace them"
                )
            _require_variables(group, variables, self.where, kind.row_dim)
        self.group = group
        self._arrays: dict[str, zarr.Array] = {}
        self._done: set[int] = set()
        if group is not None:
            self._open(group)
        self._buffered: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
        self._last_flush = time.monotonic()

    def _open(self, group: zarr.Group) -> None:
        self._arrays = {v: group[v].with_config(WRITE_CONFIG) for v in self._variables}
        self._steps = group[self._kind.row_dim].with_config(WRITE_CONFIG)
        self._done = set(checked_read(self._steps, slice(None)).tolist())

    def _create(self) -> None:
        """Create (or replace) the group, its arrays and constants; ``step`` last and empty."""
        row_dim, path = self._kind.row_dim, f"{self._kind.group}/{self._name}"
        if child(self._reader.group, path) is not None:
            del self._reader.group[path]
        group = analysis_group(self._reader, self._name, create=True, kind=self._kind)
        set_attrs(group, parameters=self._attrs)
        for variable, (dims, shape) in self._variables.items():
            dtype = np.dtype(self._dtypes.get(variable, "float32"))
            group.create_array(
                variable,
                shape=(0, *shape),
                chunks=(256, *shape),
                dtype=dtype,
                fill_value=float("nan") if dtype.kind == "f" else 0,
                compressors=self._compressors,
                dimension_names=(row_dim, *dims),
                attributes={"nonfinite": True} if variable in self._nonfinite else None,
            )
        for name, (dims, values) in self._constants.items():
            values = np.asarray(values)
            group.create_array(
                name,
                data=values,
                dimension_names=tuple(dims),
                chunks=values.shape,
                compressors=self._compressors,
                config=WRITE_CONFIG,
            )
        group.create_array(
            row_dim,
            shape=(0,),
            chunks=(4096,),
            dtype="int64",
            compressors=self._compressors,
            dimension_names=(row_dim,),
        )
        self.group = group
        done, self._done = self._done, set()
        self._open(group)
        self._done |= done  # the buffered rows

    def done_steps(self) -> set[int]:
        """Checkpoint steps whose results are stored or buffered."""
        return set(self._done)

    def append(self, steps: np.ndarray, values: dict[str, np.ndarray]) -> None:
        """Buffer the rows of ``steps`` (one per checkpoint) for every variable."""
        self._buffered.append((np.asarray(steps), values))
        self._done.update(int(step) for step in steps)
        rows = sum(len(steps) for steps, _ in self._buffered)
        overdue = time.monotonic() - self._last_flush >= ANALYSIS_FLUSH_SECONDS
        if rows >= ANALYSIS_FLUSH_ROWS or overdue:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows, keeping the rows sorted by step.

        ``step`` goes last, so readers never see a partial row.  Rows that all come after the
        stored ones are appended; otherwise every row is rewritten in step order, with
        ``step`` emptied first, so a crash in between loses results (recomputed on the next
        run) but never pairs a step with another step's values.
        """
        if self._buffered and self.group is None:
            self._create()
        if self._buffered:
            steps = np.concatenate([steps for steps, _ in self._buffered])
            values = {
                variable: np.concatenate([v[variable] for _, v in self._buffered])
                for variable in self._arrays
            }
            self._buffered = []
            start = self._steps.shape[0]
            stored = self._steps[:] if start else np.zeros(0, dtype=np.int64)
            if start and steps.min() < stored[-1]:  # interleaved: rewrite everything
                steps = np.concatenate([stored, steps])
                values = {
                    k: np.concatenate([a[:start], values[k]]) for k, a in self._arrays.items()
                }
                self._steps.resize((0,))
                start = 0
            order = np.argsort(steps, kind="stable")
            stop = start + len(steps)
            for variable, array in self._arrays.items():
                array.resize((stop, *array.shape[1:]))
                array[start:stop] = values[variable][order]
            self._steps.resize((stop,))
            self._steps[start:stop] = steps[order]
        self._last_flush = time.monotonic()
