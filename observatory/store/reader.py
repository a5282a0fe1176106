"""Reading a family store: its spec and runs, and each run's committed checkpoints.

Readers use only what a run's commit markers cover, and opening a run checks its metadata
against them, so that a store that disagrees with itself is an error rather than wrong or
misaligned values.  Analysis results are read by :mod:`observatory.store.results`, the ledger
is checked by :mod:`observatory.store.ledger`, and :mod:`observatory.store.lazy` wraps a run's
arrays for xarray.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from observatory import arguments
from observatory.errors import StoreError
from observatory.spec import BRANCHES, RunId, RunSpec, spec_from_dict
from observatory.store.common import child, children, local_root, node
from observatory.store.integrity import checked_read
from observatory.store.layout import (
    ANALYSIS_GROUP,
    STEP_METRICS,
    Checkpoint,
    attrs_of,
    ingested_note,
    keyframe_count,
    open_root,
    read_checkpoint,
)
from observatory.store.paths import filesystem, location, remote_errors


@lru_cache(maxsize=8)
def _parse_spec(text: str) -> RunSpec:
    """The spec stored as JSON ``text``, parsed and validated once per process.

    Stores are opened for every query (and for every checkpoint an analysis worker loads);
    validating the spec each time would cost more than the rest of opening the store.
    """
    return spec_from_dict(json.loads(text))


class FamilyStore:
    """Read access to a family store: its spec, runs and their committed checkpoints.

    Parameters
    ----------
    path
        The store directory or URL (see :func:`location`).
    mode
        ``"r"`` to read, ``"r+"`` to add analysis results.

    Raises
    ------
    StoreError
        If the store is missing or is not an observatory store.
    """

    def __init__(self, path: str | os.PathLike, *, mode: str = "r"):
        self.path = location(path)
        self.root = open_root(self.path, mode=mode)
        self.attrs = attrs_of(self.root)
        self.spec = _parse_spec(json.dumps(self.attrs["spec"], sort_keys=True))

    def sizes(self) -> list[str]:
        """Sizes that have at least one run in the store, in spec order."""
        present = {run.size for run in self.runs()}
        return [s.name for s in self.spec.model.sizes if s.name in present]

    def runs(self) -> list[RunId]:
        """Runs that exist in the store (started, possibly unfinished).

        A run whose creation was interrupted (arrays without the attributes that are written
        last) does not exist for readers; ``observatory train --resume`` creates it again.
        """
        return [run for run in self.spec.runs() if self._group(run.path) is not None]

    def readers(self) -> list[RunReader]:
        """Readers of every run in the store (as :meth:`runs`), one lookup per run."""
        found = ((run, self._group(run.path)) for run in self.spec.runs())
        return [RunReader(self, run, group) for run, group in found if group is not None]

    def run(self, size: str, seed: int, branch: str = "") -> RunReader:
        """The run of ``size`` and seed index ``seed`` (or its branch ``branch``); a clear
        error lists what exists."""
        size, seed = arguments.name(size, "size"), arguments.index(seed, "seed")
        for run in self.spec.runs():  # the common case: one existence check, not one per run
            if run.size == size and run.seed == seed:
                group = self._group(run.path)
                if group is not None and branch:
                    return self._branch(run, arguments.name(branch, "branch"))
                if group is not None:
                    return RunReader(self, run, group)
        seeds = [run.seed for run in self._size_run_ids(size)]
        raise StoreError(f"{self.path}: no seed {seed} for size {size!r} (seeds: {seeds})")

    def branches(self, size: str, seed: int) -> list[str]:
        """Names of the branches of a run (created, possibly unfinished), at every depth: a
        branch ``b`` of its branch ``a`` is ``"a/b"``, listed after ``a``; in name order."""
        return self._branches_in(self.run(size, seed).run.path)

    def _branches_in(self, path: str, prefix: str = "") -> list[str]:
        group = node(self.root, f"{path}/{BRANCHES}", self.path)
        if group is None:
            return []
        found = []
        for name, member in children(group, zarr.Group):
            if "schedule" in attrs_of(member):  # attrs are written last
                found.append(f"{prefix}{name}")
                found.extend(self._branches_in(f"{path}/{BRANCHES}/{name}", f"{prefix}{name}/"))
        return found

    def _branch(self, run: RunId, name: str) -> RunReader:
        branch = dataclasses.replace(run, branch=name)
        group = self._group(branch.path)
        if group is None:
            there = ", ".join(self.branches(run.size, run.seed)) or "none"
            raise StoreError(f"{self.path}: {run.path} has no branch {name!r} (branches: {there})")
        return RunReader(self, branch, group)

    def size_runs(self, size: str) -> list[RunReader]:
        """Readers of every run of ``size``, in seed order; a clear error lists the sizes."""
        size = arguments.name(size, "size")
        return [RunReader(self, run) for run in self._size_run_ids(size)]

    def _group(self, path: str) -> zarr.Group | None:
        """The fully created run group at ``path``, or None."""
        group = node(self.root, path, self.path)
        if group is None or "schedule" not in attrs_of(group):  # attrs are written last
            return None
        return group

    def _size_run_ids(self, size: str) -> list[RunId]:
        runs = [run for run in self.runs() if run.size == size]
        if not runs:
            sizes = self.sizes()
            raise StoreError(f"{self.path}: no size {size!r} (sizes: {', '.join(sizes) or 'none'})")
        return runs

    def size_attrs(self, size: str) -> dict[str, Any]:
        return attrs_of(node(self.root, size, self.path))

    def disk_bytes(self, subpath: str = "") -> int:
        """Bytes stored under the store (or one of its groups)."""
        if isinstance(self.path, Path):
            base = self.path / subpath
            return sum(f.stat().st_size for f in base.rglob("*") if f.is_file())
        fs, root = filesystem(self.path)
        with remote_errors(self.path):
            return int(fs.du(f"{root}/{subpath}".rstrip("/"), total=True))


class RunReader:
    """Committed checkpoints, metrics and data order of one run (read-only).

    Opening checks the run's metadata against its commit markers (markers within the
    schedule and the arrays' lengths), so that a store that disagrees with itself is an error
    rather than wrong or misaligned values.
    """

    def __init__(self, family: FamilyStore, run: RunId, group: zarr.Group | None = None):
        self.family = family
        self.run = run
        self.group = group if group is not None else family._group(run.path)
        if self.group is None:
            raise StoreError(f"{family.path}: no run {run.path}")
        self.attrs = attrs_of(self.group)
        n_ckpt, n_steps = self.attrs["committed_checkpoints"], self.attrs["committed_steps"]
        schedule, total = self.attrs["schedule"], self.attrs["total_steps"]
        if not (0 <= n_ckpt <= len(schedule) and 0 <= n_steps <= total):
            raise StoreError(
                f"{family.path}/{run.path}: commit markers ({n_ckpt} checkpoints, {n_steps} "
                f"steps) disagree with the schedule ({len(schedule)} checkpoints, {total} steps)"
            )
        self._committed = {"step": n_ckpt, "train_step": n_steps}
        self._arrays: dict[str, zarr.Array] = {}
        # A branch's rows before its fork are its parent's: read through the parent's reader.
        self.parent: RunReader | None = None
        self._own_from: dict[str, int] = {}
        if self.branch is not None:
            parent = self.branch["parent"]
            self.parent = family.run(parent["size"], parent["seed"], parent.get("branch", ""))
            self._own_from = {
                "step": self.branch["fork_checkpoint"],
                "keyframe": self.branch["fork_keyframe"],
                "train_step": self.branch["fork"],
            }

    @property
    def branch(self) -> dict[str, Any] | None:
        """A branch's provenance (parent, fork step, intervention and its SHA-256, the
        definitions of ablation and freezing); None for a run."""
        return self.attrs.get("branch")

    def lineage(self) -> list[dict[str, Any]]:
        """The branches from the run to this one, the first branch first: each one's ``path``,
        ``fork``, ``intervention`` and ``intervention_sha256`` (empty for a run)."""
        if self.branch is None:
            return []
        keys = ("fork", "intervention", "intervention_sha256")
        own = {"path": self.run.path} | {key: self.branch[key] for key in keys}
        return [*self.parent.lineage(), own]

    def array(self, path: str) -> zarr.Array:
        """The run's array at ``path``, its metadata read once per reader (on a local store:
        once while its file is unchanged, see :func:`~observatory.store.common.cached`).

        Arrays are created at their final length, so metadata read after the commit markers
        (which this reader read on opening) covers everything the markers promise.
        """
        array = self._arrays.get(path)
        if array is None:
            array = child(self.group, path)
            if array is None:
                raise KeyError(path)
            if local_root(array) is None:
                self._arrays[path] = array
        return array

    @property
    def n_checkpoints(self) -> int:
        return self.attrs["committed_checkpoints"]

    @property
    def n_steps(self) -> int:
        return self.attrs["committed_steps"]

    @property
    def complete(self) -> bool:
        return bool(self.attrs["complete"])

    @property
    def parameter_names(self) -> list[str]:
        return list(self.attrs["parameters"])

    @property
    def origin(self) -> dict[str, Any] | None:
        """Where an ingested run comes from (path, config hash, ...); None for a trained run."""
        return self.attrs.get("origin")

    def refuse_if_ingested(self, what: str) -> None:
        if self.origin is not None:
            raise StoreError(f"{self.run.path}: {ingested_note(self.attrs)}: {what}")

    def steps(self) -> np.ndarray:
        """Committed checkpoint steps."""
        # Checkpoints are committed in schedule order (a resumed run continues after its last
        # committed one), so no read of the ``step`` array is needed: it is there for readers
        # that do not know the markers.
        return np.array(self.attrs["schedule"][: self.n_checkpoints], dtype=np.int64)

    def own_steps(self) -> np.ndarray:
        """Committed checkpoint steps this run holds itself: a branch's from its fork on (the
        ones before are its parent's), every one of a run."""
        return self.steps()[self._own_from.get("step", 0) :]

    def tokens_seen(self) -> np.ndarray:
        return self.read(self.array("tokens_seen"), slice(0, self.n_checkpoints))

    def checkpoint_index(self, step: int) -> int:
        """Position of ``step`` on the checkpoint axis; a clear error if it is not committed."""
        step, steps = arguments.index(step, "step"), self.steps()
        hits = np.flatnonzero(steps == step)
        if len(hits) == 0:
            raise StoreError(
                f"{self.run.path}: no committed checkpoint at step {step} "
                f"({_nearest(steps, step)}{len(steps)} committed: {_shown(steps)})"
            )
        return int(hits[0])

    def parameter_array(self, name: str) -> zarr.Array:
        """The raw zarr array of a stacked parameter; only ``[:n_checkpoints]`` is committed."""
        return self._checked_array(name)

    def parameters_at(self, step: int) -> dict[str, np.ndarray]:
        """Stacked parameters of the checkpoint at ``step``."""
        index = self.checkpoint_index(step)
        return {name: self.read(self.array(name), index) for name in self.parameter_names}

    def checkpoint(self, step: int) -> Checkpoint:
        """The whole training state after ``step``: weights, AdamW moments and RNG state.

        Parameters
        ----------
        step
            A committed keyframe step (see :meth:`keyframe_steps`).

        Returns
        -------
        Checkpoint
            What training resumes from: continuing from it replays the run exactly.
        """
        self.refuse_if_ingested("no training state to read")
        index = self.checkpoint_index(step)
        keyframe = self.keyframe_index(step)
        return read_checkpoint(self.group, self.parameter_names, index, keyframe, self.read)

    def keyframe_index(self, step: int) -> int:
        """Position of ``step`` on the keyframe axis; a clear error if it holds weights only."""
        keyframes = self.keyframe_steps()
        hits = np.flatnonzero(keyframes == step)
        if not len(hits):
            raise StoreError(
                f"{self.run.path}: step {step} stores weights only, no optimizer state "
                f"(committed keyframes: {_shown(keyframes)})"
            )
        return int(hits[0])

    def parameters_for(self, steps: Sequence[int]) -> dict[str, np.ndarray]:
        """Stacked parameters of several checkpoints, ``[len(steps), ...]`` each.

        Each array is read once over the range the steps span, so a block of nearby
        checkpoints decodes every chunk once rather than once per checkpoint.
        """
        indices = [self.checkpoint_index(step) for step in steps]
        return {name: self.read_indices(name, indices) for name in self.parameter_names}

    def read_indices(self, path: str, indices: Sequence[int]) -> np.ndarray:
        """``array[indices]`` of the array at ``path``, read once over the range they span."""
        indices = np.asarray(indices)
        lo, hi = int(indices.min()), int(indices.max()) + 1
        return self.read(self.array(path), slice(lo, hi))[indices - lo]

    def metrics(self) -> dict[str, np.ndarray]:
        """Per-step ``train_step``, ``loss``, ``lr``, ``grad_norm``, ``train_tokens``."""
        n = self.n_steps
        names = ("train_step", "train_tokens", *STEP_METRICS)
        return {name: self.read(self.array(name), slice(0, n)) for name in names}

    @property
    def recipe(self) -> dict[str, Any]:
        """Library versions, threads and CPU the run was trained with (empty if not recorded)."""
        return dict(self.attrs.get("recipe", {}))

    def keyframe_steps(self) -> np.ndarray:
        """Committed checkpoint steps that hold the whole training state (replay starts there)."""
        count = keyframe_count(self.attrs, self.n_checkpoints)
        return np.array(self.attrs["keyframes"][:count], dtype=np.int64)

    def batch_indices_between(self, start: int, stop: int) -> np.ndarray:
        """Corpus indices of the batches of training steps ``start .. stop - 1``, one read."""
        if not 0 <= start <= stop <= self.n_steps:
            raise StoreError(
                f"{self.run.path}: no recorded batches for steps {start}..{stop - 1} "
                f"(recorded steps: 0..{self.n_steps - 1})"
            )
        return self.read(self.array("batch_indices"), slice(start, stop))

    def batch_indices(self, step: int) -> np.ndarray:
        """Corpus indices of the batch consumed at training step ``step``."""
        self.refuse_if_ingested("no recorded batches")
        step = arguments.index(step, "step")
        if not step < self.n_steps:
            raise StoreError(
                f"{self.run.path}: no recorded batch for step {step} "
                f"(recorded steps: 0..{self.n_steps - 1})"
            )
        return self.read(self.array("batch_indices"), step)

    def _checked_array(self, path: str) -> zarr.Array:
        array = self.array(path)
        self._check_length(array)
        return array

    def _check_length(self, array: zarr.Array) -> None:
        """A :class:`StoreError` if ``array`` is shorter than the commit markers say."""
        dim = (array.metadata.dimension_names or (None,))[0]
        needed = self._committed.get(dim, 0)
        if array.shape[0] < needed and f"/{ANALYSIS_GROUP}/" not in f"/{array.path}":
            raise StoreError(
                f"{self.family.path}/{array.path}: metadata disagrees with the commit markers "
                f"({array.shape[0]} entries along {dim!r}, {needed} committed)"
            )

    def read(self, array: zarr.Array, selection: Any) -> np.ndarray:
        """``array[selection]`` of one of the run's arrays; a missing or damaged chunk is a
        one-line :class:`StoreError`.

        Chunk files are replaced whole (an atomic rename on disk, one PUT on an object store),
        so a chunk is read consistently in one request while a writer commits.
        """
        self._check_length(array)
        dim = array.metadata.dimension_names[0]
        own = f"/{ANALYSIS_GROUP}/" not in f"/{array.path}"
        if own and self._own_from.get(dim):
            return self._stitched(array, selection, self._own_from[dim])
        steps = self.steps if dim == "step" and own else None
        return checked_read(array, selection, steps)

    def _stitched(self, array: zarr.Array, selection: Any, split: int) -> np.ndarray:
        """``array[selection]`` of a branch: rows before ``split`` from its parent's array."""
        key = selection if isinstance(selection, tuple) else (selection,)
        first, rest = key[0], key[1:]
        parent = self.parent.array(array.path.removeprefix(self.group.path).lstrip("/"))
        if isinstance(first, int | np.integer):
            source = parent if first < split else array
            return (self.parent.read if first < split else checked_read)(source, key)
        rows = np.arange(array.shape[0])[first]
        before, after = rows[rows < split], rows[rows >= split]
        parts = []
        if len(before):
            block = self.parent.read(parent, (slice(before[0], before[-1] + 1), *rest))
            parts.append(block[before - before[0]])
        if len(after):
            block = checked_read(array, (slice(after[0], after[-1] + 1), *rest))
            parts.append(block[after - after[0]])
        if not parts:
            return checked_read(array, key)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _nearest(steps: np.ndarray, step: int) -> str:
    """The committed steps on either side of ``step``, for an error message: ``"nearest: 2, 4;
    "``."""
    at = int(np.searchsorted(steps, step))
    near = [int(s) for s in steps[max(at - 1, 0) : at + 1]]
    return f"nearest: {', '.join(map(str, near))}; " if near else ""


def _shown(steps: np.ndarray) -> str:
    shown = ", ".join(map(str, steps[:6]))
    if len(steps) > 6:
        shown += f", ..., {steps[-1]}"
    return shown or "none"
