"""The one module that knows the zarr layout of an observatory store.

Layout (zarr v3, one store per model family)::

    <family>.zarr/                     attrs["observatory"]: schema version, spec, versions, data
      <size>/                          attrs["observatory"]: size spec, HF config, architecture
        seed<k>/                       attrs["observatory"]: seeds, schedule, commit markers
          step            [step]                   checkpoint steps (committed ones only)
          tokens_seen     [step]
          <param>         [step, (layer,) ...]     HF parameters, per-layer ones stacked
          train_step      [train_step]             per-step metrics ...
          loss, lr, grad_norm, train_tokens [train_step]
          batch_indices   [train_step, batch]      corpus indices of every step's batch
          state/
            rng_state     [step, rng_byte]         torch RNG state at each checkpoint
            exp_avg/<param>, exp_avg_sq/<param>    AdamW moments, same layout as the params
          analysis/<name>/                         analysis results (written by analysis jobs)

Checkpoint arrays are sharded along ``step``: one shard file holds ``checkpoints_per_shard``
checkpoints of an array, split inside into per-layer, per-head chunks so that one head of one
layer across all checkpoints reads only its own bytes.  Arrays are resized as checkpoints are
committed, and a run's ``committed_checkpoints``/``committed_steps`` attrs are updated last:
readers use only what those markers cover, so a crash never exposes a half-written checkpoint.

A store lives at a local path or at any fsspec URL (``s3://``, ``gs://``, ... read-write;
``http(s)://`` read-only); credentials and endpoints come from the environment and fsspec's
configuration, never from the store.  Every file is written whole (a rename on disk, one PUT
on an object store) and the markers last, so the commit protocol needs no atomic directory
operation: on a store with read-after-write consistency (S3), a reader that sees the markers
sees every object they cover.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numcodecs.blosc
import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from observatory.errors import StoreError
from observatory.models import PER_HEAD_DIMS, parameter_dims
from observatory.spec import RunId, RunSpec, SizeSpec, StoreSpec, spec_from_dict

SCHEMA_VERSION = 2  # 2: keyframes (state at every N-th checkpoint), SHA-256 ledger
ATTRS_KEY = "observatory"
STATE_GROUP = "state"
ANALYSIS_GROUP = "analysis"
MOMENTS = ("exp_avg", "exp_avg_sq")
KEYFRAME = "keyframe"  # the axis of the training state, and the array of its steps
WEIGHTS_SHA256 = "weights_sha256"  # the ledger: a hash of each checkpoint's weights
SHA256 = "sha256"  # ... and of each keyframe's optimizer and RNG state, in state/
STEP_METRICS = ("loss", "lr", "grad_norm")
METRIC_CHUNK = 4096
READ_ATTEMPTS = 5  # see RunReader.read
MAX_BUFFER_BYTES = 2**30  # checkpoints a writer holds in memory before it commits them
ANALYSIS_FLUSH_ROWS = 256  # analysis rows buffered before they are written (one chunk) ...
ANALYSIS_FLUSH_SECONDS = 10.0  # ... or after this long
# Arrays of a run with a leading ``train_step`` dim: one entry per training step.
STEP_RECORDS = ("train_step", "train_tokens", *STEP_METRICS, "batch_indices")


def library_versions() -> dict[str, str]:
    return {name: version(name) for name in ("observatory", "torch", "transformers", "zarr")}


def _attrs(node: zarr.Group) -> dict[str, Any]:
    return dict(node.attrs.get(ATTRS_KEY, {}))


def _set_attrs(node: zarr.Group, **updates: Any) -> None:
    node.attrs[ATTRS_KEY] = _attrs(node) | updates


def _compressors(store: StoreSpec) -> list:
    """Blosc, then a CRC32C checksum: a damaged chunk fails to read instead of decoding wrong."""
    blosc = BloscCodec(cname=store.compressor, clevel=store.compression_level, shuffle="shuffle")
    return [blosc, Crc32cCodec()]


def _read(array: zarr.Array, selection: Any) -> np.ndarray:
    """``array[selection]``, with a damaged chunk reported as a :class:`StoreError`."""
    try:
        return array[selection]
    except (ValueError, RuntimeError, OSError) as err:  # checksum, Blosc or file errors
        reason = str(err).split(". ")[0].splitlines()[0] if str(err) else type(err).__name__
        where = str(array.store_path).removeprefix("file://")
        raise StoreError(f"{where}: stored data is damaged and cannot be read ({reason})") from None


# --------------------------------------------------------------------------------------------
# Where a store lives: a local directory or an fsspec URL.

READ_ONLY_PROTOCOLS = ("http", "https")


def location(path: str | os.PathLike) -> str | Path:
    """A store location: a local :class:`~pathlib.Path`, or a URL for fsspec (``s3://...``).

    URLs stay strings (a ``Path`` would fold ``//``); ``file://`` URLs become paths.
    """
    text = os.fspath(path)
    if "://" in text and not text.startswith("file://"):
        return text.rstrip("/")
    return Path(text.removeprefix("file://"))


def _storage_options(where: str | Path) -> dict[str, Any] | None:
    # A store changes while it is read (training, analysis jobs): never reuse a listing.
    return None if isinstance(where, Path) else {"use_listings_cache": False}


def _open_group(where: str | Path, *, mode: str, **kwargs) -> zarr.Group:
    return zarr.open_group(str(where), mode=mode, storage_options=_storage_options(where), **kwargs)


def _filesystem(where: str):
    """The fsspec filesystem of a URL (configured from the environment) and the path in it."""
    import fsspec

    return fsspec.core.url_to_fs(where, **_storage_options(where))


def _exists(where: str | Path) -> bool:
    if isinstance(where, Path):
        return where.exists()
    fs, path = _filesystem(where)
    return fs.exists(f"{path}/zarr.json")  # object stores have no directories


def _require_writable(where: str | Path) -> None:
    if isinstance(where, str) and where.partition("://")[0] in READ_ONLY_PROTOCOLS:
        raise StoreError(f"{where}: http(s) stores are read-only")


# --------------------------------------------------------------------------------------------
# Family level: create / open.


def create_family(path: str | Path, spec: RunSpec, *, data: dict[str, Any]) -> zarr.Group:
    """Create the family store, or open it if it was created by the same spec.

    Parameters
    ----------
    path
        Store directory (``*.zarr``) or URL (``s3://bucket/family.zarr``).
    spec
        The family's run spec, stored in the root attributes.
    data
        Corpus facts to store (fingerprint, number of sequences, ...).

    Raises
    ------
    StoreError
        If the path holds something else, or a store created by a different spec or corpus.
    """
    path = location(path)
    _require_writable(path)
    if _exists(path):
        root = _open_root(path, mode="r+")
        stored = _attrs(root)
        if spec_from_dict(stored["spec"]) != spec:  # keys added since take their defaults
            raise StoreError(
                f"{path}: this store was created by a different spec "
                f"(name {stored['spec'].get('name')!r}); use another --store"
            )
        if stored["data"]["fingerprint"] != data["fingerprint"]:
            raise StoreError(
                f"{path}: the corpus changed since this store was created "
                f"(fingerprint {data['fingerprint']} vs {stored['data']['fingerprint']})"
            )
        return root
    root = _open_group(path, mode="w-")
    _set_attrs(
        root,
        schema_version=SCHEMA_VERSION,
        spec=spec.to_dict(),
        versions=library_versions(),
        data=data,
    )
    return root


def _open_root(path: str | Path, *, mode: str) -> zarr.Group:
    if mode != "r":
        _require_writable(path)
    if not _exists(path):
        raise StoreError(f"{path}: no such store")
    try:
        root = _open_group(path, mode=mode, zarr_format=3)
    except (FileNotFoundError, ValueError, zarr.errors.NodeTypeValidationError) as err:
        raise StoreError(f"{path}: not a zarr store ({err})") from None
    version_ = _attrs(root).get("schema_version")
    if version_ is None:
        raise StoreError(f"{path}: not an observatory store (no '{ATTRS_KEY}' attributes)")
    if version_ != SCHEMA_VERSION:
        raise StoreError(f"{path}: store schema {version_}; this version reads {SCHEMA_VERSION}")
    return root


def write_size_attrs(root: zarr.Group, size: SizeSpec, *, hf_config: dict[str, Any]) -> None:
    """Record a size's spec and Hugging Face config on its group (created if needed)."""
    group = root.require_group(size.name)
    _set_attrs(group, size=size.__dict__, d_head=size.d_head, hf_config=hf_config)


# --------------------------------------------------------------------------------------------
# Writing one run.


@dataclass(frozen=True)
class Checkpoint:
    """A snapshot of the training state after ``step`` updates (arrays are private copies).

    Weights only, or (at a keyframe) the whole state that training continues from.
    """

    step: int
    tokens_seen: int
    params: dict[str, np.ndarray]  # stacked HF parameters
    moments: dict[str, dict[str, np.ndarray]] | None = None  # "exp_avg"/"exp_avg_sq" -> stacked
    rng_state: np.ndarray | None = None  # uint8

    @property
    def is_keyframe(self) -> bool:
        return self.moments is not None


@dataclass(frozen=True)
class StepRecord:
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens_seen: int  # after this step
    batch_indices: np.ndarray  # [batch]


class RunWriter:
    """Appends checkpoints and per-step records of one run, on a background thread.

    ``put_checkpoint`` and ``put_step`` return at once; a writer thread buffers checkpoints
    and commits them when a shard is full, ``commit_seconds`` have passed or the buffer holds
    ``MAX_BUFFER_BYTES``, so that each shard file is written whole (for small models) and the
    training loop never waits on disk.  The writer thread also hashes each checkpoint into the
    run's ledger (see :func:`weights_digest`), committed with it.

    Parameters
    ----------
    root
        The family root group (from :func:`create_family`).
    run
        Which run.
    spec
        The family spec (for the shard size, commit interval and compression).
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
        Fingerprint of the run's data order (checked when the run is reopened).
    recipe
        What else decides the run's numbers (library versions, threads, CPU), for replay.
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
        data_order_fingerprint: str,
        keyframes: tuple[int, ...] | None = None,
        recipe: dict[str, Any] | None = None,
    ):
        self.run = run
        self._shard = spec.store.checkpoints_per_shard
        self._commit_seconds = spec.store.commit_seconds
        self._group = root.require_group(run.path)
        if not _attrs(self._group):
            self._create_arrays(spec, param_shapes, d_head, schedule, rng_bytes)
            _set_attrs(
                self._group,
                data_order_fingerprint=data_order_fingerprint,
                keyframes=list(schedule if keyframes is None else keyframes),
                recipe=recipe or {},
            )
        elif _attrs(self._group).get("data_order_fingerprint") != data_order_fingerprint:
            raise StoreError(f"{run.path}: the data order changed since this run was started")
        self._ckpt_arrays = self._checkpoint_arrays()
        checkpoint_bytes = sum(
            a.dtype.itemsize * math.prod(a.shape[1:])
            for arrays in self._ckpt_arrays.values()
            for a in arrays.values()
        )
        self._buffer_slots = max(1, min(self._shard, MAX_BUFFER_BYTES // checkpoint_bytes))
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.checkpoints_written = 0
        self.busy_seconds = 0.0  # wall time the writer thread spent on storing, not waiting

    # -- layout ------------------------------------------------------------------------------

    def _create_arrays(self, spec, param_shapes, d_head, schedule, rng_bytes) -> None:
        group, shard = self._group, self._shard
        compressors = _compressors(spec.store)

        def checkpoint_array(
            parent: zarr.Group, name: str, shape, dims, dtype="float32", per_head=False, axis="step"
        ):
            # A file holds K whole checkpoints. Per-head arrays are shards whose inner chunks
            # are one layer and one head's block of rows, so one head reads only its bytes;
            # the rest are single chunks, which cost the writer far less.
            chunks = tuple(
                1 if dim == "layer" else d_head if dim in PER_HEAD_DIMS else n
                for dim, n in zip(dims, shape, strict=True)
            )
            sharded = per_head and any(dim in PER_HEAD_DIMS for dim in dims)
            parent.create_array(
                name,
                shape=(0, *shape),
                chunks=(shard, *chunks) if sharded else (shard, *shape),
                shards=(shard, *shape) if sharded else None,
                dtype=dtype,
                compressors=compressors,
                fill_value=0,
                dimension_names=(axis, *dims),
                attributes={"coordinates": "tokens_seen"} if axis == "step" else {},
            )

        def vector(parent: zarr.Group, name: str, dims, dtype, trailing=()):
            parent.create_array(
                name,
                shape=(0, *trailing),
                chunks=(METRIC_CHUNK, *trailing),
                dtype=dtype,
                compressors=compressors,
                fill_value=0,
                dimension_names=dims,
            )

        for name, shape in param_shapes.items():
            checkpoint_array(group, name, shape, parameter_dims(name), per_head=True)
        state = group.require_group(STATE_GROUP)
        # The training state is stored at keyframes only: its own axis, with their steps.
        for moment in MOMENTS:
            moments = state.require_group(moment)
            for name, shape in param_shapes.items():
                checkpoint_array(moments, name, shape, parameter_dims(name), axis=KEYFRAME)
        checkpoint_array(
            state, "rng_state", (rng_bytes,), ("rng_byte",), dtype="uint8", axis=KEYFRAME
        )
        vector(state, KEYFRAME, (KEYFRAME,), "int64")
        vector(state, SHA256, (KEYFRAME, "sha256_byte"), "uint8", trailing=(32,))
        vector(group, "step", ("step",), "int64")
        vector(group, "tokens_seen", ("step",), "int64")
        vector(group, WEIGHTS_SHA256, ("step", "sha256_byte"), "uint8", trailing=(32,))
        vector(group, "train_step", ("train_step",), "int64")
        vector(group, "train_tokens", ("train_step",), "int64")
        for metric in STEP_METRICS:
            vector(group, metric, ("train_step",), "float32")
        vector(
            group,
            "batch_indices",
            ("train_step", "batch"),
            "int64",
            trailing=(spec.train.batch_size,),
        )
        _set_attrs(
            group,
            init_seed=self.run.init_seed,
            data_seed=self.run.data_seed,
            schedule=list(schedule),
            total_steps=spec.train.steps,
            parameters=sorted(param_shapes),
            committed_checkpoints=0,
            committed_steps=0,
            complete=False,
        )

    def _checkpoint_arrays(self) -> dict[str, dict[tuple[str, ...], zarr.Array]]:
        """Arrays with a leading ``step`` (``"step"``) or ``keyframe`` dim (``"keyframe"``),
        keyed as in :func:`_checkpoint_rows`."""
        names = _attrs(self._group)["parameters"]
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
        return {
            axis: {key: self._array(path) for key, path in arrays.items()}
            for axis, arrays in paths.items()
        }

    def _array(self, path: str) -> zarr.Array:
        # Checkpoints are never all zeros worth skipping; checking each chunk for it would
        # cost the writer more than compressing it.
        return self._group[path].with_config({"write_empty_chunks": True})

    # -- state -------------------------------------------------------------------------------

    @property
    def committed(self) -> tuple[int, int]:
        """(committed checkpoints, committed per-step records)."""
        attrs = _attrs(self._group)
        return attrs["committed_checkpoints"], attrs["committed_steps"]

    @property
    def complete(self) -> bool:
        return bool(_attrs(self._group)["complete"])

    def record_device(self, device: dict[str, str]) -> None:
        """Add the device this call trains on (type, name, CUDA and cuDNN versions) to the
        run's ``devices``: a resumed run lists every device it was trained on."""
        devices = _attrs(self._group).get("devices", [])
        if device not in devices:
            _set_attrs(self._group, devices=[*devices, device])

    def truncate(self, n_checkpoints: int, n_steps: int) -> None:
        """Drop anything past the given counts (left by a crash) before resuming."""
        n_keyframes = _keyframe_count(_attrs(self._group), n_checkpoints)
        lengths = {"step": n_checkpoints, KEYFRAME: n_keyframes}
        for axis, arrays in self._ckpt_arrays.items():
            for array in arrays.values():
                array.resize((lengths[axis], *array.shape[1:]))
        for name in ("train_step", "train_tokens", "batch_indices", *STEP_METRICS):
            array = self._group[name]
            array.resize((n_steps, *array.shape[1:]))
        _set_attrs(self._group, committed_checkpoints=n_checkpoints, committed_steps=n_steps)

    def last_keyframe(self) -> Checkpoint:
        """The last committed keyframe (a whole training state), for resuming."""
        keyframe = _keyframe_count(_attrs(self._group), self.committed[0]) - 1
        if keyframe < 0:
            raise StoreError(f"{self.run.path}: no committed checkpoint to resume from")
        attrs = _attrs(self._group)
        index = attrs["schedule"].index(attrs["keyframes"][keyframe])
        return _read_checkpoint(self._group, attrs["parameters"], index, keyframe, _read)

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
            _set_attrs(self._group, complete=True)

    def _check(self) -> None:
        if self._error is not None:
            raise StoreError(f"{self.run.path}: writing the store failed: {self._error}")

    def _loop(self) -> None:
        # Checkpoints are copied on arrival into one block per array, reused from commit to
        # commit, so a commit hands zarr whole blocks without stacking or allocating them.
        blocks = {
            axis: {
                key: np.empty((self._buffer_slots, *array.shape[1:]), dtype=array.dtype)
                for key, array in arrays.items()
            }
            for axis, arrays in self._ckpt_arrays.items()
        }
        filled = dict.fromkeys(blocks, 0)  # rows of each axis's blocks in use
        records = []
        last_commit = time.monotonic()
        try:
            while True:
                item = self._queue.get()  # a StepRecord, a Checkpoint, or None to stop
                started = time.perf_counter()
                commit = item is None
                if isinstance(item, StepRecord):
                    records.append(item)
                elif isinstance(item, Checkpoint):
                    for axis, row in _checkpoint_rows(item).items():
                        for key, value in row.items():
                            blocks[axis][key][filled[axis]] = value
                        filled[axis] += 1
                    buffered = filled["step"]
                    commit = (
                        (self.committed[0] + buffered) % self._shard == 0  # the shard is full
                        or buffered == self._buffer_slots
                        or time.monotonic() - last_commit >= self._commit_seconds
                    )
                if commit:
                    self._commit(
                        {
                            axis: {key: block[: filled[axis]] for key, block in axis_blocks.items()}
                            for axis, axis_blocks in blocks.items()
                        },
                        records,
                    )
                    filled, records, last_commit = dict.fromkeys(blocks, 0), [], time.monotonic()
                self.busy_seconds += time.perf_counter() - started
                if item is None:
                    return
        except BaseException as err:  # reported to the training thread by _check()
            self._error = err

    def _commit(self, checkpoints: dict[str, dict[tuple[str, ...], np.ndarray]], records) -> None:
        """Append ``checkpoints`` (a block per array) and the step ``records``, then the markers."""
        n_ckpt, n_steps = self.committed
        n_new = len(checkpoints["step"][("step",)])
        self._append(self._ckpt_arrays["step"], checkpoints["step"], n_ckpt)
        n_keyframes = _keyframe_count(_attrs(self._group), n_ckpt)
        self._append(self._ckpt_arrays[KEYFRAME], checkpoints[KEYFRAME], n_keyframes)
        if records:
            if records[0].step != n_steps:
                raise StoreError(f"step records start at {records[0].step}, expected {n_steps}")
            columns = {
                "train_step": [r.step for r in records],
                "train_tokens": [r.tokens_seen for r in records],
                "batch_indices": [r.batch_indices for r in records],
                **{m: [getattr(r, m) for r in records] for m in STEP_METRICS},
            }
            arrays = {name: self._group[name] for name in columns}
            self._append(arrays, {name: np.stack(v) for name, v in columns.items()}, n_steps)
        # The markers go last: readers never see a checkpoint before all its arrays are written.
        _set_attrs(
            self._group,
            committed_checkpoints=n_ckpt + n_new,
            committed_steps=n_steps + len(records),
        )
        self.checkpoints_written += n_new

    @staticmethod
    def _append(arrays: dict, blocks: dict[Any, np.ndarray], start: int) -> None:
        for key, array in arrays.items():
            block = blocks[key]
            if not len(block):
                continue
            stop = start + len(block)
            array.resize((stop, *array.shape[1:]))
            array[start:stop] = block


def _read_checkpoint(group: zarr.Group, names: list[str], index: int, keyframe: int | None, read):
    """The checkpoint at ``index`` (and its state at ``keyframe``, if given) of a run group;
    ``read(array, selection)`` reads."""
    params = {name: read(group[name], index) for name in names}
    step, tokens_seen = int(read(group["step"], index)), int(read(group["tokens_seen"], index))
    if keyframe is None:
        return Checkpoint(step=step, tokens_seen=tokens_seen, params=params)
    state = group[STATE_GROUP]
    return Checkpoint(
        step=step,
        tokens_seen=tokens_seen,
        params=params,
        moments={m: {n: read(state[f"{m}/{n}"], keyframe) for n in names} for m in MOMENTS},
        rng_state=read(state["rng_state"], keyframe),
    )


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


def _keyframe_count(attrs: dict[str, Any], n_checkpoints: int) -> int:
    """How many keyframes the first ``n_checkpoints`` checkpoints of a run (``attrs``) hold."""
    if not n_checkpoints:
        return 0
    last = attrs["schedule"][n_checkpoints - 1]
    return bisect.bisect_right(attrs["keyframes"], last)


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


# --------------------------------------------------------------------------------------------
# Reading.


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
        self.root = _open_root(self.path, mode=mode)
        self.attrs = _attrs(self.root)
        self.spec = _parse_spec(json.dumps(self.attrs["spec"], sort_keys=True))

    def sizes(self) -> list[str]:
        """Sizes that have at least one run in the store, in spec order."""
        present = {name for name, _ in self.root.groups()}
        return [s.name for s in self.spec.model.sizes if s.name in present]

    def runs(self) -> list[RunId]:
        """Runs that exist in the store (started, possibly unfinished)."""
        return [run for run in self.spec.runs() if run.path in self.root]

    def run(self, size: str, seed: int) -> RunReader:
        """The run of ``size`` and seed index ``seed``; a clear error lists what exists."""
        for run in self.spec.runs():  # the common case: one existence check, not one per run
            if run.size == size and run.seed == seed and run.path in self.root:
                return RunReader(self, run)
        seeds = [run.seed for run in self._size_run_ids(size)]
        raise StoreError(f"{self.path}: no seed {seed} for size {size!r} (seeds: {seeds})")

    def size_runs(self, size: str) -> list[RunReader]:
        """Readers of every run of ``size``, in seed order; a clear error lists the sizes."""
        return [RunReader(self, run) for run in self._size_run_ids(size)]

    def _size_run_ids(self, size: str) -> list[RunId]:
        runs = [run for run in self.runs() if run.size == size]
        if not runs:
            sizes = self.sizes()
            raise StoreError(f"{self.path}: no size {size!r} (sizes: {', '.join(sizes) or 'none'})")
        return runs

    def size_attrs(self, size: str) -> dict[str, Any]:
        return _attrs(self.root[size])

    def disk_bytes(self, subpath: str = "") -> int:
        """Bytes stored under the store (or one of its groups)."""
        if isinstance(self.path, Path):
            base = self.path / subpath
            return sum(f.stat().st_size for f in base.rglob("*") if f.is_file())
        fs, root = _filesystem(self.path)
        return int(fs.du(f"{root}/{subpath}".rstrip("/"), total=True))

    def object_version(self, key: str) -> Any:
        """What changes when the file or object ``key`` of the store is replaced (``None``
        if absent): inode and mtime on disk, the ETag (or modification time) of an object."""
        if isinstance(self.path, Path):
            try:
                stat = (self.path / key).stat()
            except FileNotFoundError:
                return None
            return stat.st_ino, stat.st_mtime_ns
        fs, root = _filesystem(self.path)
        fs.invalidate_cache(f"{root}/{key}")
        try:
            info = fs.info(f"{root}/{key}")
        except FileNotFoundError:
            return None
        return info.get("ETag") or info.get("LastModified") or info.get("mtime"), info["size"]


_NEW_RUN_ATTRS = {
    "committed_checkpoints": 0,
    "committed_steps": 0,
    "complete": False,
    "schedule": [],
    "parameters": [],
}


class RunReader:
    """Committed checkpoints, metrics and data order of one run (read-only)."""

    def __init__(self, family: FamilyStore, run: RunId):
        self.family = family
        self.run = run
        self.group = family.root[run.path]
        # A run whose writer is still creating it has no attributes yet: nothing committed.
        self.attrs = _NEW_RUN_ATTRS | _attrs(self.group)

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

    def steps(self) -> np.ndarray:
        """Committed checkpoint steps."""
        # Checkpoints are committed in schedule order (a resumed run continues after its last
        # committed one), so no read of the ``step`` array is needed: it is there for readers
        # that do not know the markers.
        return np.array(self.attrs["schedule"][: self.n_checkpoints], dtype=np.int64)

    def tokens_seen(self) -> np.ndarray:
        return self.group["tokens_seen"][: self.n_checkpoints]

    def step_coordinates(self) -> dict[str, np.ndarray]:
        """The stored ``step``, ``tokens_seen`` and ``keyframe`` arrays (their committed part).

        Readers take the steps from the schedule and the commit markers; these arrays are for
        readers that do not know the markers, and for checking that both agree.
        """
        n_keyframes = len(self.keyframe_steps())
        return {
            "step": _read(self.group["step"], slice(0, self.n_checkpoints)),
            "tokens_seen": _read(self.group["tokens_seen"], slice(0, self.n_checkpoints)),
            KEYFRAME: _read(self.group[f"{STATE_GROUP}/{KEYFRAME}"], slice(0, n_keyframes)),
        }

    def checkpoint_index(self, step: int) -> int:
        """Position of ``step`` on the checkpoint axis; a clear error if it is not committed."""
        steps = self.steps()
        hits = np.flatnonzero(steps == step)
        if len(hits) == 0:
            raise StoreError(
                f"{self.run.path}: no committed checkpoint at step {step} "
                f"({len(steps)} committed: {_shown(steps)})"
            )
        return int(hits[0])

    def parameter_array(self, name: str) -> zarr.Array:
        """The raw zarr array of a stacked parameter; only ``[:n_checkpoints]`` is committed."""
        return self.group[name]

    def parameters_at(self, step: int) -> dict[str, np.ndarray]:
        """Stacked parameters of the checkpoint at ``step``."""
        index = self.checkpoint_index(step)
        return {name: self.read(self.group[name], index) for name in self.parameter_names}

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
        index = self.checkpoint_index(step)
        keyframe = self.keyframe_index(step)
        return _read_checkpoint(self.group, self.parameter_names, index, keyframe, self.read)

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

    def verify_checkpoint(self, step: int) -> np.ndarray:
        """Check a checkpoint against the ledger: the hashes recorded when it was written.

        Returns
        -------
        numpy.ndarray
            The SHA-256 of the weights read (32 ``uint8``), which matches the recorded one.

        Raises
        ------
        StoreError
            If the weights (or, at a keyframe, the optimizer and RNG state) read now differ
            from what was written, or cannot be read.
        """
        index = self.checkpoint_index(step)
        try:
            digest = weights_digest(self.parameters_at(step))
            recorded = {"weights": (digest, self.read(self.group[WEIGHTS_SHA256], index))}
            if step in self.keyframe_steps():
                state = self.checkpoint(step)
                keyframe = self.keyframe_index(step)
                recorded["optimizer and RNG state"] = (
                    state_digest(state.moments, state.rng_state),
                    self.read(self.group[f"{STATE_GROUP}/{SHA256}"], keyframe),
                )
        except StoreError as err:  # a damaged chunk: say which checkpoint it belongs to
            raise StoreError(f"step {step}: {err}") from None
        for what, (now, then) in recorded.items():
            if not np.array_equal(now, then):
                raise StoreError(
                    f"{self.run.path}: the {what} of step {step} differ from the hash recorded "
                    "when they were written"
                )
        return digest

    def parameters_for(self, steps: Sequence[int]) -> dict[str, np.ndarray]:
        """Stacked parameters of several checkpoints, ``[len(steps), ...]`` each.

        Each array is read once over the range the steps span, so a block of nearby
        checkpoints decodes every chunk once rather than once per checkpoint.
        """
        indices = np.array([self.checkpoint_index(step) for step in steps])
        lo, hi = int(indices.min()), int(indices.max()) + 1
        arrays = dict(self.group.arrays())
        return {
            name: self.read(arrays[name], slice(lo, hi))[indices - lo]
            for name in self.parameter_names
        }

    def metrics(self) -> dict[str, np.ndarray]:
        """Per-step ``train_step``, ``loss``, ``lr``, ``grad_norm``, ``train_tokens``."""
        n = self.n_steps
        names = ("train_step", "train_tokens", *STEP_METRICS)
        return {name: _read(self.group[name], slice(0, n)) for name in names}

    @property
    def recipe(self) -> dict[str, Any]:
        """Library versions, threads and CPU the run was trained with (empty if not recorded)."""
        return dict(self.attrs.get("recipe", {}))

    def keyframe_steps(self) -> np.ndarray:
        """Committed checkpoint steps that hold the whole training state (replay starts there)."""
        count = _keyframe_count(self.attrs, self.n_checkpoints)
        return np.array(self.attrs["keyframes"][:count], dtype=np.int64)

    def batch_indices_between(self, start: int, stop: int) -> np.ndarray:
        """Corpus indices of the batches of training steps ``start .. stop - 1``, one read."""
        if not 0 <= start <= stop <= self.n_steps:
            raise StoreError(
                f"{self.run.path}: no recorded batches for steps {start}..{stop - 1} "
                f"(recorded steps: 0..{self.n_steps - 1})"
            )
        return _read(self.group["batch_indices"], slice(start, stop))

    def batch_indices(self, step: int) -> np.ndarray:
        """Corpus indices of the batch consumed at training step ``step``."""
        if not 0 <= step < self.n_steps:
            raise StoreError(
                f"{self.run.path}: no recorded batch for step {step} "
                f"(recorded steps: 0..{self.n_steps - 1})"
            )
        return _read(self.group["batch_indices"], step)

    # -- analysis results ---------------------------------------------------------------------

    def analysis_group(self, name: str, *, create: bool = False) -> zarr.Group | None:
        path = f"{ANALYSIS_GROUP}/{name}"
        if path in self.group:
            return self.group[path]
        return self.group.require_group(path) if create else None

    def analyses(self) -> list[str]:
        if ANALYSIS_GROUP not in self.group:
            return []
        return sorted(name for name, _ in self.group[ANALYSIS_GROUP].groups())

    def analysis_parameters(self, name: str) -> dict[str, Any] | None:
        """The parameters an analysis's results were computed with (None: no such analysis)."""
        group = self.analysis_group(name)
        return None if group is None else _attrs(group).get("parameters")

    def analysis_arrays(self, name: str) -> tuple[np.ndarray, dict[str, zarr.Array]]:
        """The checkpoint steps an analysis covers, and its other arrays.

        The group's ``step`` array (see :class:`AnalysisWriter`) lists the checkpoint of each
        row, in any order, and is extended last: the arrays with a leading ``step`` dim are
        valid up to its length.  A group still being created covers no checkpoint yet.
        """
        group = self.analysis_group(name)
        if group is None:
            raise StoreError(f"{self.run.path}: no analysis {name!r} (analyses: {self.analyses()})")
        arrays = dict(group.arrays())
        steps = arrays.pop("step", None)
        return (np.zeros(0, np.int64) if steps is None else steps[:]), arrays

    def read_all_analyses(self) -> None:
        """Read every stored analysis result once: a damaged chunk raises :class:`StoreError`."""
        for name in self.analyses():
            steps, arrays = self.analysis_arrays(name)
            for array in arrays.values():
                per_step = (array.metadata.dimension_names or ())[:1] == ("step",)
                _read(array, slice(0, len(steps)) if per_step else Ellipsis)

    # -- lazy reading ------------------------------------------------------------------------

    def arrays(self) -> dict[str, zarr.Array]:
        """Every array of the run group by name, their metadata fetched concurrently.

        Only ``[:n_checkpoints]`` of the arrays with a leading ``step`` dim (the parameters,
        ``step``, ``tokens_seen``) and ``[:n_steps]`` of those in :data:`STEP_RECORDS` is
        committed.
        """
        return dict(self.group.arrays())

    def read(self, array: zarr.Array, selection: Any) -> np.ndarray:
        """``array[selection]`` of one of the run's arrays, consistent while a writer commits.

        zarr reads a shard with two requests (its index, then the chunks it needs), and the
        writer replaces the partly filled shard that holds the last committed checkpoint at
        every commit.  A read can thus pair one version's index with the next version's bytes,
        which fails to decode or, rarely, decodes as another chunk.  Shards are replaced whole
        (an atomic rename on disk, one PUT on an object store), so the read is repeated
        whenever that shard's version (inode and mtime, or ETag) changed under it; shards
        before it are never rewritten.  Unsharded chunks are read in one request.
        """
        if array.shards is None:
            return _read(array, selection)
        last = max(self.n_checkpoints - 1, 0) // array.shards[0]
        shard = f"{array.path}/" + array.metadata.encode_chunk_key(
            (last,) + (0,) * (array.ndim - 1)
        )
        version = self.family.object_version
        for attempt in range(READ_ATTEMPTS):
            before = version(shard)
            try:
                values = _read(array, selection)
            except StoreError:  # e.g. blosc failing on bytes from another version of the shard
                if attempt == READ_ATTEMPTS - 1 or version(shard) == before:
                    raise
                continue
            if version(shard) == before:
                return values
        raise StoreError(f"{array.path}: its last shard kept changing while it was read")


def _shown(steps: np.ndarray) -> str:
    shown = ", ".join(map(str, steps[:6]))
    if len(steps) > 6:
        shown += f", ..., {steps[-1]}"
    return shown or "none"


class AnalysisWriter:
    """Appends the results of one analysis for one run, checkpoint by checkpoint.

    The group ``<run>/analysis/<name>`` holds one array per result variable with a leading
    ``step`` dim, plus a ``step`` array listing which checkpoint each row belongs to.  Rows are
    appended in any order; ``step`` is extended last, so readers only see finished rows and a
    re-run can skip the checkpoints already listed.  Appended rows are buffered and written
    together (every ``ANALYSIS_FLUSH_ROWS`` rows or ``ANALYSIS_FLUSH_SECONDS``, and on
    :meth:`flush`): each write resizes and rewrites a partly filled chunk of every array.

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
    recompute
        Drop existing results first.
    """

    def __init__(
        self,
        reader: RunReader,
        name: str,
        *,
        attrs: dict[str, Any],
        variables: dict[str, tuple[tuple[str, ...], tuple[int, ...]]],
        recompute: bool = False,
    ):
        self.where = f"{reader.run.path}/{ANALYSIS_GROUP}/{name}"
        self._compressors = _compressors(reader.family.spec.store)
        group = reader.analysis_group(name)
        if group is not None and recompute:
            del reader.group[f"{ANALYSIS_GROUP}/{name}"]
            group = None
        stored = (_attrs(group).get("parameters") or {}) if group is not None else attrs
        if stored != attrs:
            keys = stored.keys() | attrs.keys()
            changed = sorted(k for k in keys if stored.get(k) != attrs.get(k))
            raise StoreError(
                f"{self.where}: existing results were computed with other parameters "
                f"({', '.join(changed)} differ); pass --recompute to replace them"
            )
        if group is None:
            group = reader.analysis_group(name, create=True)
            _set_attrs(group, parameters=attrs)
            for variable, (dims, shape) in variables.items():
                group.create_array(
                    variable,
                    shape=(0, *shape),
                    chunks=(256, *shape),
                    dtype="float32",
                    fill_value=float("nan"),
                    compressors=self._compressors,
                    dimension_names=("step", *dims),
                )
            group.create_array(
                "step",
                shape=(0,),
                chunks=(4096,),
                dtype="int64",
                compressors=self._compressors,
                dimension_names=("step",),
            )
        self.group = group
        self._arrays = {variable: group[variable] for variable in variables}
        self._steps = group["step"]
        self._done = set(self._steps[:].tolist())
        self._buffered: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []
        self._last_flush = time.monotonic()

    def done_steps(self) -> set[int]:
        """Checkpoint steps whose results are stored or buffered."""
        return set(self._done)

    def write_extra(self, name: str, values: np.ndarray, dims: tuple[str, ...]) -> None:
        """Store an array that does not depend on the checkpoint (e.g. the probe tokens)."""
        self.group.create_array(
            name,
            data=values,
            dimension_names=dims,
            overwrite=True,
            chunks=values.shape,
            compressors=self._compressors,
        )

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
