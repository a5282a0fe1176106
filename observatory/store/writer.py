"""Writing one run: checkpoints and per-step records appended on a background thread.

A commit writes every new row of every array first and the run's commit markers last, so
readers, who use only what the markers cover, never see a half-written checkpoint.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import numcodecs.blosc
import numpy as np
import zarr

from observatory.errors import StoreError
from observatory.memory import release_free_memory
from observatory.models import PER_HEAD_DIMS, parameter_dims
from observatory.spec import RunId, RunSpec
from observatory.store import layout
from observatory.store.integrity import checked_read, state_digest, weights_digest
from observatory.store.layout import (
    KEYFRAME,
    METRIC_CHUNK,
    MOMENTS,
    SHA256,
    STATE_GROUP,
    STEP_METRICS,
    WEIGHTS_SHA256,
    WRITE_CONFIG,
    Checkpoint,
    StepRecord,
    array_layout,
    attrs_of,
    block_length,
    checkpoint_chunks,
    compressors,
    ingested_note,
    keyframe_count,
    read_checkpoint,
    set_attrs,
)

MAX_BUFFER_BYTES = 2**30  # checkpoints a writer holds in memory before it commits them
# Copies of a piece while zarr writes it: the piece, its bytes, compressed, with its checksum.
ENCODING_COPIES = 4


def buffer_slots(n_checkpoints: int, per_chunk: int, checkpoint_bytes: int) -> int:
    """Checkpoints a run's writer holds before it commits them (its buffer).

    One chunk's worth (a run's ``n_checkpoints`` split into equal blocks of at most
    ``per_chunk``, see :func:`~observatory.store.layout.block_length`), and never more than
    ``MAX_BUFFER_BYTES`` of checkpoints of ``checkpoint_bytes`` each (at least one).
    """
    chunk = block_length(n_checkpoints, per_chunk)
    return max(1, min(chunk, MAX_BUFFER_BYTES // max(checkpoint_bytes, 1)))


def writer_memory(n_checkpoints: int, per_chunk: int, checkpoint_bytes: int) -> int:
    """Most bytes a run's writer holds: its buffer (:func:`buffer_slots`), the checkpoint on
    its way to it (the training loop's copy), and zarr's encoding of the one piece it writes at
    a time (``ENCODING_COPIES`` x ``WRITE_PIECE``)."""
    slots = buffer_slots(n_checkpoints, per_chunk, checkpoint_bytes)
    return (slots + 1) * checkpoint_bytes + ENCODING_COPIES * layout.WRITE_PIECE


# A file takes whole blocks of this size on the usual local file systems (ext4, xfs, APFS).
FILE_BLOCK = 4096
# Most bytes a chunk's codecs add to data that does not compress: Blosc's header and
# per-block flags (at most 32 bytes in Blosc 1 and 2), then the 4-byte CRC32C.
CODEC_OVERHEAD = 64
# Room for what training adds to a run's metadata document: commit markers, completion, the
# devices it trained on.
METADATA_GROWTH = FILE_BLOCK


def disk_bound(
    spec: RunSpec,
    run: RunId,
    *,
    param_shapes: dict[str, tuple[int, ...]],
    d_head: int,
    schedule: tuple[int, ...],
    keyframes: tuple[int, ...],
    rng_bytes: int,
    recipe: dict[str, Any],
) -> int:
    """Most bytes a run takes on a local disk once finished: an upper bound from its layout.

    The run's arrays and attributes are created in memory as :class:`RunWriter` creates them
    (the arguments are its own), then counted: every chunk at its full size (zarr stores the
    last chunk of an array whole), uncompressed plus ``CODEC_OVERHEAD`` (what compressed
    data turns out smaller only loosens the bound), each metadata document at its size plus
    ``METADATA_GROWTH``, each file in whole ``FILE_BLOCK`` blocks, and one largest chunk more
    for the file a commit is replacing.
    """
    documents: dict[str, Any] = {}
    group = zarr.open_group(zarr.storage.MemoryStore(documents), mode="w", zarr_format=3)
    _create_arrays(group, spec, param_shapes, d_head, schedule, keyframes, rng_bytes, True)
    first = _first_attrs(
        group,
        run,
        spec,
        param_shapes,
        schedule,
        keyframes,
        origin=None,
        recipe=recipe,
        data_order_fingerprint="0" * 64,  # no shorter than a real fingerprint
    )
    set_attrs(group, **first)
    chunk_files = [
        (array.nchunks, _blocks(math.prod(array.chunks) * array.dtype.itemsize + CODEC_OVERHEAD))
        for _, array in group.members(max_depth=None)
        if isinstance(array, zarr.Array)
    ]
    metadata = sum(_blocks(len(doc) + METADATA_GROWTH) for doc in documents.values())
    return sum(n * size for n, size in chunk_files) + metadata + max(s for _, s in chunk_files)


def _blocks(n_bytes: int) -> int:
    return -(-n_bytes // FILE_BLOCK) * FILE_BLOCK


class RunWriter:
    """Appends checkpoints and per-step records of one run, on a background thread.

    ``put_checkpoint`` and ``put_step`` return at once; a writer thread buffers checkpoints
    and commits them when a block of ``checkpoints_per_chunk`` is full, ``commit_seconds`` have
    passed or the buffer holds ``MAX_BUFFER_BYTES``, so that each file is written once (for
    small models) and the training loop never waits on disk.  The writer thread also hashes
    each checkpoint into the run's ledger (see :func:`weights_digest`), committed with it.

    Parameters
    ----------
    root
        The family root group (from :func:`create_family`).
    run
        Which run.
    spec
        The family spec (for the chunk size, commit interval and compression).
    param_shapes
        Shape of each stacked parameter (without the ``step`` dim).
    d_head
        Head size: per-head dims are chunked in blocks of ``d_head``.
    schedule
        Every checkpoint step the run will write.
    keyframes
        The checkpoint steps that also hold the optimizer and RNG state (default: all).
    rng_bytes
        Size of the torch RNG state.
    data_order_fingerprint
        Fingerprint of the run's data order (checked when the run is reopened); None with
        ``origin``.
    recipe
        What else decides the run's numbers (library versions, threads, CPU), for replay.
    origin
        Where an ingested run comes from (stored as its ``origin`` attribute): such a run has
        weights and, optionally, per-step metrics, but no keyframes (optimizer and RNG state)
        or data order, and can be neither resumed nor replayed.
    branch
        A branch's provenance (parent, ``fork`` step, intervention): its checkpoints and step
        records before the fork are its parent's (read through the parent, not stored here);
        its first commit is the fork's keyframe.
    """

    def __init__(
        self,
        root: zarr.Group,
        run: RunId,
        spec: RunSpec,
        *,
        param_shapes: dict[str, tuple[int, ...]],
        d_head: int,
        schedule: tuple[int, ...],
        rng_bytes: int,
        data_order_fingerprint: str | None,
        keyframes: tuple[int, ...] | None = None,
        recipe: dict[str, Any] | None = None,
        origin: dict[str, Any] | None = None,
        branch: dict[str, Any] | None = None,
    ):
        self.run = run
        self._chunk = block_length(len(schedule), spec.store.checkpoints_per_chunk)
        self._commit_seconds = spec.store.commit_seconds
        self._group = root.require_group(run.path)
        self._state = origin is None  # optimizer state, RNG state and data order
        keyframes = tuple(schedule if keyframes is None else keyframes) if self._state else ()
        if "schedule" not in attrs_of(self._group):  # new, or its creation was interrupted
            self._create_arrays(spec, param_shapes, d_head, schedule, keyframes, rng_bytes)
            first = _first_attrs(
                self._group,
                run,
                spec,
                param_shapes,
                schedule,
                keyframes,
                data_order_fingerprint=data_order_fingerprint,
                recipe=recipe,
                origin=origin,
            )
            if branch is not None:
                first |= _branch_attrs(branch, schedule, keyframes)
            # The attributes go last: until they exist, readers do not see the run.
            set_attrs(self._group, **first)
        elif attrs_of(self._group).get("origin") is not None:
            note = ingested_note(attrs_of(self._group))
            raise StoreError(f"{run.path}: {note}: it cannot be resumed")
        elif attrs_of(self._group).get("data_order_fingerprint") != data_order_fingerprint:
            raise StoreError(f"{run.path}: the data order changed since this run was started")
        self._ckpt_arrays = self._checkpoint_arrays()
        checkpoint_bytes = sum(
            a.dtype.itemsize * math.prod(a.shape[1:])
            for arrays in self._ckpt_arrays.values()
            for a in arrays.values()
        )
        self._buffer_slots = buffer_slots(
            len(schedule), spec.store.checkpoints_per_chunk, checkpoint_bytes
        )
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.checkpoints_written = 0
        self.busy_seconds = 0.0  # wall time the writer thread spent on storing, not waiting

    # -- layout ------------------------------------------------------------------------------

    def _create_arrays(self, spec, param_shapes, d_head, schedule, keyframes, rng_bytes) -> None:
        _create_arrays(
            self._group, spec, param_shapes, d_head, schedule, keyframes, rng_bytes, self._state
        )

    def _checkpoint_arrays(self) -> dict[str, dict[tuple[str, ...], zarr.Array]]:
        """Arrays with a leading ``step`` (``"step"``) or ``keyframe`` dim (``"keyframe"``),
        keyed as in :func:`_checkpoint_rows`."""
        names = attrs_of(self._group)["parameters"]
        paths = {
            "step": {("params", name): name for name in names}
            | {("step",): "step", ("tokens_seen",): "tokens_seen", ("sha256",): WEIGHTS_SHA256},
            KEYFRAME: {
                (moment, name): f"{STATE_GROUP}/{moment}/{name}"
                for moment in MOMENTS
                for name in names
            }
            | {
                ("rng_state",): f"{STATE_GROUP}/rng_state",
                ("step",): f"{STATE_GROUP}/{KEYFRAME}",
                ("sha256",): f"{STATE_GROUP}/{SHA256}",
            },
        }
        if not self._state:  # an ingested run: weights only
            del paths[KEYFRAME]
        return {
            axis: {key: self._array(path) for key, path in arrays.items()}
            for axis, arrays in paths.items()
        }

    def _array(self, path: str) -> zarr.Array:
        # Every chunk is written, even one equal to the fill value: readers take a missing
        # chunk for damage.  (Checking each chunk for it would also cost more than compressing.)
        return self._group[path].with_config(WRITE_CONFIG)

    # -- state -------------------------------------------------------------------------------

    @property
    def committed(self) -> tuple[int, int]:
        """(committed checkpoints, committed per-step records)."""
        attrs = attrs_of(self._group)
        return attrs["committed_checkpoints"], attrs["committed_steps"]

    @property
    def complete(self) -> bool:
        return bool(attrs_of(self._group)["complete"])

    def record_device(self, device: dict[str, str]) -> None:
        """Add the device this call trains on (type, name, CUDA and cuDNN versions) to the
        run's ``devices``: a resumed run lists every device it was trained on."""
        devices = attrs_of(self._group).get("devices", [])
        if device not in devices:
            set_attrs(self._group, devices=[*devices, device])

    def truncate(self, n_checkpoints: int, n_steps: int) -> None:
        """Move the markers back to the given counts before resuming.

        What a crash left past them stays invisible and is overwritten as training goes on;
        the arrays keep their full length (see :meth:`_create_arrays`).
        """
        set_attrs(self._group, committed_checkpoints=n_checkpoints, committed_steps=n_steps)

    def last_keyframe(self) -> Checkpoint:
        """The last committed keyframe (a whole training state), for resuming."""
        keyframe = keyframe_count(attrs_of(self._group), self.committed[0]) - 1
        if keyframe < 0:
            raise StoreError(f"{self.run.path}: no committed checkpoint to resume from")
        attrs = attrs_of(self._group)
        index = attrs["schedule"].index(attrs["keyframes"][keyframe])
        return read_checkpoint(self._group, attrs["parameters"], index, keyframe, checked_read)

    # -- writing -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread."""
        # Blosc's own threads would compete with torch's for the cores the loop is using.
        numcodecs.blosc.use_threads = False
        self._thread = threading.Thread(target=self._loop, name=f"writer {self.run.path}")
        self._thread.start()

    def put_checkpoint(self, checkpoint: Checkpoint) -> None:
        self._check()
        self._queue.put(checkpoint)

    def put_step(self, record: StepRecord) -> None:
        self._check()
        self._queue.put(record)

    def close(self, *, complete: bool) -> None:
        """Commit everything buffered, stop the thread, and mark the run complete if asked."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self._check()
        if complete:
            set_attrs(self._group, complete=True)

    def _check(self) -> None:
        if self._error is not None:
            error = self._error
            raise StoreError(f"{self.run.path}: writing the store failed: {error}") from error

    def _loop(self) -> None:
        rows = self._rows()
        steps = rows["step"]
        records = []
        last_commit = time.monotonic()
        try:
            while True:
                item = self._queue.get()  # a StepRecord, a Checkpoint, or None to stop
                started = time.perf_counter()
                stop = commit = item is None
                if isinstance(item, StepRecord):
                    records.append(item)
                elif isinstance(item, Checkpoint):
                    for axis, row in _checkpoint_rows(item).items():
                        rows[axis].add(row)
                    item = row = None  # the blocks hold it now: free it before a commit
                    commit = (
                        (steps.base + steps.filled) % steps.chunk == 0  # the chunk is full
                        or steps.filled == self._buffer_slots
                        or time.monotonic() - last_commit >= self._commit_seconds
                    )
                if commit:
                    self._commit(rows, records)
                    records, last_commit = [], time.monotonic()
                self.busy_seconds += time.perf_counter() - started
                if stop:
                    return
        except BaseException as err:  # reported to the training thread by _check()
            self._error = err

    def _rows(self) -> dict[str, _Rows]:
        """The blocks the writer copies checkpoints into, per axis, from the committed rows."""
        attrs = attrs_of(self._group)
        n_ckpt = attrs["committed_checkpoints"]
        branch = attrs.get("branch") or {}  # a branch stores its rows from the fork on only
        rows = {
            "step": _Rows(
                self._ckpt_arrays["step"],
                self._buffer_slots,
                n_ckpt,
                self._chunk,
                own_from=branch.get("fork_checkpoint", 0),
            )
        }
        if KEYFRAME in self._ckpt_arrays:  # an ingested run has no training state
            arrays = self._ckpt_arrays[KEYFRAME]
            rows[KEYFRAME] = _Rows(
                arrays,
                self._buffer_slots,
                keyframe_count(attrs, n_ckpt),
                arrays[("rng_state",)].chunks[0],
                # Whole chunks only where keyframe chunks fill as checkpoint chunks do.
                keep=attrs["keyframes"] == attrs["schedule"],
                own_from=branch.get("fork_keyframe", 0),
            )
        return rows

    def _commit(self, rows: dict[str, _Rows], records: list[StepRecord]) -> None:
        """Write the new checkpoint ``rows`` and the step ``records``, then the markers."""
        n_ckpt, n_steps = self.committed
        n_new = rows["step"].new
        for axis_rows in rows.values():
            axis_rows.write()
        if records:
            if records[0].step != n_steps:
                raise StoreError(f"step records start at {records[0].step}, expected {n_steps}")
            columns = {
                "train_step": [r.step for r in records],
                "train_tokens": [r.tokens_seen for r in records],
                "batch_indices": [r.batch_indices for r in records],
                **{m: [getattr(r, m) for r in records] for m in STEP_METRICS},
            }
            if not self._state:
                del columns["batch_indices"]
            for name, values in columns.items():
                _write_rows(self._array(name), np.stack(values), n_steps)
        # The markers go last: readers never see a checkpoint before all its arrays are written.
        set_attrs(
            self._group,
            committed_checkpoints=n_ckpt + n_new,
            committed_steps=n_steps + len(records),
        )
        self.checkpoints_written += n_new
        # Copied checkpoints and zarr's encoding buffers were freed into the heap: hand back.
        release_free_memory()


class _Rows:
    """The checkpoint rows of one axis (``step`` or ``keyframe``) that a writer holds.

    One block per array, allocated once and reused, so a commit hands zarr whole blocks
    without stacking or allocating them.  Block row 0 is store row ``base``; rows
    ``[done, filled)`` are not committed yet.  With ``keep``, rows stay after a commit until
    their chunk is full, and each commit writes whole chunks (rows past ``filled`` hold older
    values, which the markers do not cover): zarr then never reads back, decodes and merges a
    chunk that an earlier commit left partly filled (which happens after every commit
    ``commit_seconds`` triggers, and holds several copies of the chunk in memory).  A branch's
    rows before ``own_from`` are its parent's: they are written as zeros, never read.
    """

    def __init__(
        self,
        arrays: dict,
        slots: int,
        committed: int,
        chunk: int,
        keep: bool = True,
        own_from: int = 0,
    ):
        self.arrays = arrays
        self.chunk = chunk
        self.keep = keep and chunk <= slots
        self.base = committed - committed % chunk if self.keep else committed
        self.done = self.filled = committed - self.base
        self.blocks = {k: np.zeros((slots, *a.shape[1:]), a.dtype) for k, a in arrays.items()}
        own = max(self.base, min(own_from, committed))
        for key, array in arrays.items():  # a resumed run: its chunk's committed rows
            if committed > own:
                rows = checked_read(array, slice(own, committed))
                self.blocks[key][own - self.base : self.done] = rows

    @property
    def new(self) -> int:
        return self.filled - self.done

    def add(self, row: dict[tuple[str, ...], Any]) -> None:
        for key, value in row.items():
            self.blocks[key][self.filled] = value
        self.filled += 1

    def write(self) -> None:
        """Write the new rows (their whole chunk, with ``keep``); free full chunks' rows."""
        if not self.new:
            return
        for key, array in self.arrays.items():
            low, high = self.done, self.filled
            if self.keep and array.chunks[0] == self.chunk:
                low, high = 0, max(high, min(self.chunk, array.shape[0] - self.base))
            _write_rows(array, self.blocks[key][low:high], self.base + low)
        self.done = self.filled
        if not self.keep or self.filled == self.chunk:
            self.base, self.done, self.filled = self.base + self.filled, 0, 0


def _write_rows(array: zarr.Array, block: np.ndarray, start: int) -> None:
    """Write ``block`` to ``array[start:start + len(block)]``."""
    # A chunk's width at a time: zarr encodes all the chunks of a write at once, each into
    # new buffers, which for a whole block of the largest array would multiply what the
    # writer holds.
    rows = slice(start, start + len(block))
    if block.ndim > 1 and block.nbytes > layout.WRITE_PIECE:
        width = array.chunks[1]
        for at in range(0, block.shape[1], width):
            array[rows, at : at + width] = block[:, at : at + width]
    else:
        array[rows] = block


def _checkpoint_rows(checkpoint: Checkpoint) -> dict[str, dict[tuple[str, ...], Any]]:
    """The row a checkpoint adds to each array, by axis, keyed as in ``_checkpoint_arrays``."""
    params = checkpoint.params
    rows: dict[str, dict[tuple[str, ...], Any]] = {
        "step": {("params", name): array for name, array in params.items()}
        | {
            ("step",): checkpoint.step,
            ("tokens_seen",): checkpoint.tokens_seen,
            ("sha256",): weights_digest(params),
        }
    }
    if checkpoint.is_keyframe:
        rows[KEYFRAME] = {
            (moment, name): array
            for moment, arrays in checkpoint.moments.items()
            for name, array in arrays.items()
        } | {
            ("rng_state",): checkpoint.rng_state,
            ("step",): checkpoint.step,
            ("sha256",): state_digest(checkpoint.moments, checkpoint.rng_state),
        }
    return rows


def _create_arrays(group, spec, param_shapes, d_head, schedule, keyframes, rng_bytes, with_state):
    """A new run's arrays in ``group``; ``with_state``, also its optimizer and RNG state and
    data order (an ingested run has none)."""
    # Every array is created at its final length (the schedule's checkpoints, its keyframes,
    # the run's steps), so that any reader sees consistent lengths at any time; only what the
    # commit markers cover is written.
    per_chunk = spec.store.checkpoints_per_chunk
    steps = _ArrayMaker(spec, len(schedule), "step", per_chunk, d_head)
    for name, shape in param_shapes.items():
        steps.checkpoints(group, name, shape, parameter_dims(name), weights=True)
    if with_state:
        state = group.require_group(STATE_GROUP)
        # The training state is stored at keyframes only: its own axis, with their steps.
        frames = _ArrayMaker(spec, len(keyframes), KEYFRAME, per_chunk, d_head)
        for moment in MOMENTS:
            moments = state.require_group(moment)
            for name, shape in param_shapes.items():
                frames.checkpoints(moments, name, shape, parameter_dims(name))
        frames.checkpoints(state, "rng_state", (rng_bytes,), ("rng_byte",), dtype="uint8")
        frames.vector(state, KEYFRAME, (), "int64")
        frames.vector(state, SHA256, ("sha256_byte",), "uint8", trailing=(32,))
    steps.vector(group, "step", (), "int64")
    steps.vector(group, "tokens_seen", (), "int64")
    steps.vector(group, WEIGHTS_SHA256, ("sha256_byte",), "uint8", trailing=(32,))
    records = _ArrayMaker(spec, spec.train.steps, "train_step", per_chunk, d_head)
    records.vector(group, "train_step", (), "int64")
    records.vector(group, "train_tokens", (), "int64")
    for metric in STEP_METRICS:
        records.vector(group, metric, (), "float32")
    if with_state:
        batch = (spec.train.batch_size,)
        records.vector(group, "batch_indices", ("batch",), "int64", trailing=batch)


def _first_attrs(group, run, spec, param_shapes, schedule, keyframes, **given) -> dict[str, Any]:
    """The attributes of a new run (``given``: its data order fingerprint, recipe, origin),
    once its arrays are in ``group``."""
    return {
        "init_seed": run.init_seed,
        "data_seed": run.data_seed,
        "schedule": list(schedule),
        "total_steps": spec.train.steps,
        "parameters": sorted(param_shapes),
        "committed_checkpoints": 0,
        "committed_steps": 0,
        "complete": False,
        "data_order_fingerprint": given["data_order_fingerprint"],
        "keyframes": list(keyframes),
        "recipe": given["recipe"] or {},
        "origin": given["origin"],
        "layout": {name: array_layout(array) for name, array in group.arrays()},
    }


def _branch_attrs(branch: dict[str, Any], schedule, keyframes) -> dict[str, Any]:
    """A new branch's attributes: its provenance, where its own rows start (the fork's
    checkpoint and keyframe) and its commit markers, which cover its parent's rows before."""
    fork = branch["fork"]
    record = branch | {
        "fork_checkpoint": list(schedule).index(fork),
        "fork_keyframe": list(keyframes).index(fork),
    }
    return {
        "branch": record,
        "committed_checkpoints": record["fork_checkpoint"],
        "committed_steps": fork,
    }


@dataclass(frozen=True)
class _ArrayMaker:
    """Creates the arrays of one axis of a run (``step``, ``keyframe`` or ``train_step``) at
    their final ``length``, filled with zeros until written."""

    spec: RunSpec
    length: int
    axis: str
    per_chunk: int
    d_head: int

    def checkpoints(
        self, parent: zarr.Group, name: str, shape, dims, dtype="float32", weights=False
    ) -> None:
        """An array of checkpoints (or keyframes), chunked by :func:`checkpoint_chunks`."""
        per_chunk = block_length(self.length, self.per_chunk)
        per_head = weights and any(dim in PER_HEAD_DIMS for dim in dims)
        itemsize = np.dtype(dtype).itemsize
        parent.create_array(
            name,
            shape=(self.length, *shape),
            chunks=checkpoint_chunks(dims, shape, per_chunk, itemsize, per_head, self.d_head),
            dtype=dtype,
            compressors=compressors(self.spec.store, weights=weights),
            fill_value=0,
            dimension_names=(self.axis, *dims),
            attributes={"coordinates": "tokens_seen"} if self.axis == "step" else {},
            overwrite=True,  # what an interrupted creation left
        )

    def vector(self, parent: zarr.Group, name: str, dims, dtype, trailing=()) -> None:
        """A small array along the axis (steps, metrics, digests), in chunks of
        ``METRIC_CHUNK`` entries."""
        parent.create_array(
            name,
            shape=(self.length, *trailing),
            chunks=(METRIC_CHUNK, *trailing),
            dtype=dtype,
            compressors=compressors(self.spec.store),
            fill_value=0,
            dimension_names=(self.axis, *dims),
            overwrite=True,
        )
