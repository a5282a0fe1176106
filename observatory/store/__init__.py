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

A run ingested from Hugging Face checkpoint folders (``observatory ingest``) has the same layout
without ``state/`` and ``batch_indices``: its ``origin`` attribute says where it came from.

Checkpoint arrays are chunked along ``step``: a chunk file holds up to
``checkpoints_per_shard`` checkpoints of an array (the schedule split into equal blocks).  The
weights with per-head dims are also chunked per layer and per head (one file each), so that one
head of one layer across all checkpoints reads only its own bytes, in one request per file; the
other arrays are split per layer (or block of rows) where a chunk would exceed ``WRITE_PIECE``.
Arrays are created at their final length (every scheduled checkpoint, every step) and filled
as checkpoints are committed; a run's
``committed_checkpoints``/``committed_steps`` attrs are updated last: readers use only what
those markers cover, so a crash never exposes a half-written checkpoint, and every chunk inside
them exists (a missing one is damage: see :class:`_CheckedStore`).  A run's attrs are written
after its arrays: a run without them was interrupted while being created and is not listed.

A store lives at a local path or at any fsspec URL (``s3://``, ``gs://``, ... read-write;
``http(s)://`` read-only); credentials and endpoints come from the environment and fsspec's
configuration, never from the store.  Every file is written whole (a rename on disk, one PUT
on an object store) and the markers last, so the commit protocol needs no atomic directory
operation: on a store with read-after-write consistency (S3), a reader that sees the markers
sees every object they cover.
"""

from __future__ import annotations

import bisect
import datetime
import hashlib
import json
import math
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

import dask.array as da
import numcodecs.blosc
import numpy as np
import xarray as xr
import zarr
from dask.base import tokenize
from xarray.backends import BackendArray
from xarray.core import indexing
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from observatory.errors import StoreError
from observatory.memory import release_free_memory
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
WRITE_PIECE = 2**22  # most bytes the writer hands zarr at once: about one chunk (see _write_rows)
# Copies of a piece while zarr writes it: the piece, its bytes, compressed, with its checksum.
ENCODING_COPIES = 4
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


def _compressors(store: StoreSpec, *, weights: bool = False) -> list:
    """Blosc (not for ``weights`` unless the spec asks), then a CRC32C checksum: a damaged
    chunk fails to read instead of decoding wrong."""
    if weights and not store.compress_weights:
        return [Crc32cCodec()]
    blosc = BloscCodec(cname=store.compressor, clevel=store.compression_level, shuffle="shuffle")
    return [blosc, Crc32cCodec()]


# Names of the metadata documents zarr may look for; every other key of a store is a chunk.
_METADATA_KEYS = ("zarr.json", ".zgroup", ".zarray", ".zattrs", ".zmetadata")
# Array settings for every write: zarr skips chunks equal to the fill value by default, but a
# reader must be able to tell a missing chunk (damage) from one that was never written.
_WRITE_CONFIG = {"write_empty_chunks": True}


class _ChunkMissing(Exception):
    """Raised inside zarr by :class:`_CheckedStore` for a chunk key that has no data."""


class _CheckedStore(WrapperStore):
    """A read-only view of a store in which a missing chunk is an error, not the fill value.

    zarr reads an absent chunk (or shard) as the array's fill value.  Writers store every chunk
    of every array, even one equal to the fill value, and readers only read what the commit
    markers cover, so an absent chunk in a reader's selection can only mean damage.  Checking
    it here, in the one place every read goes through, costs nothing on the hot paths (the
    answer ``None`` of the store is already there) and works for any zarr store (local or
    fsspec), unlike a manifest that every write would have to maintain.
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


def _checked_store(where: str | Path) -> _CheckedStore:
    if isinstance(where, Path):
        return _CheckedStore(LocalStore(where, read_only=True))
    base = FsspecStore.from_url(where, storage_options=_storage_options(where), read_only=True)
    return _CheckedStore(base)


def _checked(array: zarr.Array) -> zarr.Array:
    """``array`` as read through a :class:`_CheckedStore` (opened again if it is not)."""
    if isinstance(array.store, _CheckedStore):
        return array
    store = _CheckedStore(array.store.with_read_only(True))
    return zarr.open_array(store=store, path=array.path, mode="r", zarr_format=3)


# Opened metadata of local stores, kept per process while its files are unchanged.  Opening a
# run otherwise reads a dozen zarr.json files (the root, the run, its analysis groups and their
# arrays), each a round trip through zarr's event loop that costs more than the read of a head.
_CACHED: dict[tuple[Path, str], tuple[tuple, Any]] = {}
_CACHED_MAX = 4096
# A file rewritten within the file system's timestamp granularity (a jiffy on ext4) can keep
# its inode, size and mtime: metadata younger than this is read, never reused.
_SETTLED_NS = 2_000_000_000


def _local_root(node: zarr.Group | zarr.Array) -> Path | None:
    """The directory of ``node``'s store if it is a local store opened to read, else None."""
    store = node.store
    if isinstance(store, _CheckedStore) and isinstance(store._store, LocalStore):
        return Path(store._store.root)
    return None


def _cached_node(root: Path, path: str, open_node: Callable[[], Any]) -> Any:
    """``open_node()``, the node at ``path`` of the local store ``root``; None if its metadata
    file is absent.  The node opened earlier is returned instead while its ``zarr.json`` has
    the same inode, mtime and size, so an unchanged store costs one ``stat`` per node."""
    try:
        return _cached(root, path, [f"{path}/zarr.json".lstrip("/")], open_node)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _cached(root: Path, key: str, files: list[str], compute: Callable[[], Any]) -> Any:
    """``compute()`` from the files ``files`` of the local store ``root``, or what it returned
    for ``key`` before if none of them has changed since (a missing file raises)."""
    stats = [(root / name).stat() for name in files]
    signature = tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in stats)
    cached = _CACHED.get((root, key))
    if cached is not None and cached[0] == signature:
        return cached[1]
    value = compute()
    if time.time_ns() - max(st.st_mtime_ns for st in stats) >= _SETTLED_NS:
        if len(_CACHED) >= _CACHED_MAX:
            _CACHED.clear()
        _CACHED[(root, key)] = (signature, value)
    return value


def _read_whole(array: zarr.Array) -> np.ndarray:
    """All of a small array (an analysis's ``step`` array), read-only, reused while its files
    are unchanged in a local store (see :func:`_cached`)."""

    def read() -> np.ndarray:
        values = _read(array, slice(None))
        values.setflags(write=False)
        return values

    root = _local_root(array)
    n_chunks = math.ceil(array.shape[0] / array.chunks[0])
    keys = ["zarr.json"] + [array.metadata.encode_chunk_key((i,)) for i in range(n_chunks)]
    try:
        if root is not None:
            return _cached(root, f"{array.path}#", [f"{array.path}/{k}" for k in keys], read)
    except (FileNotFoundError, NotADirectoryError):  # a missing chunk: the read says which
        pass
    return read()


def _child(group: zarr.Group, path: str) -> zarr.Group | zarr.Array | None:
    """``group[path]``, or None if absent (metadata reused while unchanged, see above)."""
    root = _local_root(group)
    try:
        if root is not None:
            return _cached_node(root, f"{group.path}/{path}".strip("/"), lambda: group[path])
        return group[path]
    except KeyError:
        return None


def _children(group: zarr.Group, kind: type) -> list[tuple[str, Any]]:
    """The members of ``group`` of type ``kind`` (``zarr.Group`` or ``zarr.Array``), by name."""
    root = _local_root(group)
    if root is None:
        members = group.groups() if kind is zarr.Group else group.arrays()
        return sorted(members, key=lambda member: member[0])
    with os.scandir(root / group.path) as entries:
        names = sorted(entry.name for entry in entries if entry.is_dir())
    members = ((name, _child(group, name)) for name in names)
    return [(name, node) for name, node in members if isinstance(node, kind)]


def _read(array: zarr.Array, selection: Any, steps: Callable | None = None) -> np.ndarray:
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
    per = (array.shards or array.chunks)[0]
    lo = int(index[0]) * per if index[0].isdigit() else 0
    hi = max(min(lo + per, array.shape[0]) - 1, lo)
    dim = (array.metadata.dimension_names or ("rows",))[0]
    steps = steps() if steps is not None else ()
    if hi < len(steps):
        held = f"checkpoint steps {steps[lo]}..{steps[hi]}"
    else:
        held = f"{dim} {lo}..{hi}"
    return f"stored data is missing: chunk {'/'.join(index)} ({held}) has no file"


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
    if isinstance(path, Path) and path.exists() and not path.is_dir():
        raise StoreError(f"{path}: is a file, not a store; use another --store")
    attrs = {
        "schema_version": SCHEMA_VERSION,
        "spec": spec.to_dict(),
        "versions": library_versions(),
        "data": data,
    }
    if not _exists(path):
        try:  # the attributes are part of the group's one metadata document: no torn store
            return zarr.create_group(
                str(path),
                attributes={ATTRS_KEY: attrs},
                zarr_format=3,
                storage_options=_storage_options(path),
            )
        except zarr.errors.ContainsGroupError:
            pass  # another process created it just now: check it as any existing store
    root = _open_root(path, mode="r+")
    stored = _attrs(root)
    same_spec = spec_from_dict(stored["spec"]) == spec  # keys added since take their defaults
    if not same_spec and not any(True for _ in root.groups()):
        _set_attrs(root, **attrs)  # nothing trained yet (e.g. an earlier spec failed to build)
        return root
    if not same_spec:
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


def _open_root(path: str | Path, *, mode: str) -> zarr.Group:
    if mode != "r":
        _require_writable(path)
    if not _exists(path):
        raise StoreError(f"{path}: no such store")
    # Readers see a missing chunk as an error; writers must see it as "not written yet".
    try:
        if mode == "r":
            root = _read_root(path)
        else:
            root = _open_group(path, mode=mode, zarr_format=3)
    except json.JSONDecodeError as err:
        raise StoreError(f"{path}/zarr.json: metadata is not valid JSON ({err})") from None
    except (FileNotFoundError, ValueError, zarr.errors.NodeTypeValidationError) as err:
        raise StoreError(f"{path}: not a zarr store ({err})") from None
    version_ = _attrs(root).get("schema_version")
    if version_ is None:
        raise StoreError(f"{path}: not an observatory store (no '{ATTRS_KEY}' attributes)")
    if version_ != SCHEMA_VERSION:
        raise StoreError(f"{path}: store schema {version_}; this version reads {SCHEMA_VERSION}")
    return root


def _read_root(path: str | Path) -> zarr.Group:
    """The root group of a store opened to read (its metadata reused while unchanged)."""

    def open_root() -> zarr.Group:
        return zarr.open_group(_checked_store(path), mode="r", zarr_format=3)

    if not isinstance(path, Path):
        return open_root()
    root = _cached_node(path, "", open_root)
    if root is None:
        raise FileNotFoundError(f"{path}/zarr.json is missing")
    return root


def write_size_attrs(root: zarr.Group, size: SizeSpec, *, hf_config: dict[str, Any]) -> None:
    """Record a size's spec and Hugging Face config on its group (created if needed)."""
    try:
        group = root.require_group(size.name)
    except zarr.errors.ContainsGroupError:  # another process created it just now
        group = root[size.name]
    _set_attrs(group, size=size.__dict__, d_head=size.d_head, hf_config=hf_config)


def ingested_note(run_attrs: dict[str, Any]) -> str:
    """``"ingested from <path> (config <hash>), without optimizer state or data order"``."""
    origin = run_attrs["origin"]
    return (
        f"ingested from {origin['path']} (config {origin['config_hash']}), "
        "without optimizer state or data order"
    )


# --------------------------------------------------------------------------------------------
# One writer per run.

LOCK_HEARTBEAT_SECONDS = 5.0  # a holder touches its lock this often ...
LOCK_STALE_SECONDS = 60.0  # ... and a lock untouched for this long has no living holder


class RunLock:
    """Held by the one process that writes a run; a second writer gets a one-line error.

    The lock is a small JSON file (holder host, pid, start time) created with exclusive
    create, in ``<store>.locks/`` beside the store (not inside it, where zarr readers would
    list it).  The holder's thread touches it every ``LOCK_HEARTBEAT_SECONDS``.  A lock whose
    holder is gone is taken over: one whose pid no longer exists on this host at once, any
    other once its heartbeat is ``LOCK_STALE_SECONDS`` old, so a SIGKILLed writer never
    leaves a run locked for good.  On an object store the lock is an object created with a
    conditional put (``If-None-Match: *``, through fsspec's ``mode="create"``) and touched by
    rewriting it; its age is its modification time.

    Parameters
    ----------
    root
        The family root group (from :func:`create_family`).
    run
        The run to lock.
    """

    def __init__(self, root: zarr.Group, run: RunId):
        store = root.store
        while isinstance(store, WrapperStore):
            store = store._store
        name = f"{run.path.replace('/', '.')}.lock"
        if isinstance(store, LocalStore):
            where = Path(store.root)
            self._file = _LocalLockFile(where.parent / f"{where.name}.locks" / name)
        else:  # zarr's filesystem is asynchronous: open a synchronous one on the same URL
            protocol = store.fs.protocol
            protocol = protocol if isinstance(protocol, str) else protocol[0]
            fs, path = _filesystem(f"{protocol}://{store.path.rstrip('/')}.locks/{name}")
            self._file = _ObjectLockFile(fs, path)
        self.path = self._file.path
        self.run = run
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        for _ in range(2):
            if self._file.create(json.dumps(holder)):
                break
            self._take_over_if_stale()
        else:
            raise StoreError(f"{self.run.path}: could not take the lock {self.path}")
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._file.remove()

    def _heartbeat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_SECONDS):
            try:
                self._file.touch()
            except OSError:
                return

    def _take_over_if_stale(self) -> None:
        try:
            text, age = self._file.read()
            holder = json.loads(text or "{}")
        except (OSError, ValueError):
            holder, age = {}, LOCK_STALE_SECONDS  # being written, or torn by a crash
        if not self._holder_gone(holder, age):
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
            raise StoreError(
                f"{self.run.path} is being written by pid {holder.get('pid')} on "
                f"{holder.get('host')} (since {since}); wait for it to finish, then continue "
                "with --resume"
            )
        self._file.remove_stale()

    @staticmethod
    def _holder_gone(holder: dict, age: float) -> bool:
        if age >= LOCK_STALE_SECONDS:
            return True
        if holder.get("host") != socket.gethostname():
            return False
        try:
            os.kill(int(holder.get("pid", 0)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, OverflowError):
            return False
        return _zombie(int(holder["pid"]))  # killed, not yet reaped by its parent


class _LocalLockFile:
    """A lock file on a local disk: ``open(..., "x")``, its mtime as heartbeat."""

    def __init__(self, path: Path):
        self.path = path

    def create(self, text: str) -> bool:
        self.path.parent.mkdir(exist_ok=True)
        try:
            with open(self.path, "x") as file:
                file.write(text)
        except FileExistsError:
            return False
        return True

    def read(self) -> tuple[str, float]:
        return self.path.read_text(), time.time() - self.path.stat().st_mtime

    def touch(self) -> None:
        os.utime(self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        try:
            self.path.parent.rmdir()  # the last writer leaves no trace
        except OSError:
            pass

    def remove_stale(self) -> None:
        # Rename first: of several processes taking over the same stale lock, one wins.
        stale = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            self.path.rename(stale)
            stale.unlink()
        except FileNotFoundError:
            pass


class _ObjectLockFile:
    """A lock object in an fsspec filesystem (S3: a conditional put), rewritten as heartbeat.

    Object stores have no rename: of two processes taking over one stale lock at the same
    moment, both may delete it before one creates it again (the window is one request).
    """

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path

    def create(self, text: str) -> bool:
        try:
            self.fs.pipe_file(self.path, text.encode(), mode="create")
        except FileExistsError:
            return False
        return True

    def read(self) -> tuple[str, float]:
        self.fs.invalidate_cache(self.path)
        modified = self.fs.modified(self.path)
        if modified.tzinfo is None:
            modified = modified.replace(tzinfo=datetime.UTC)
        return self.fs.cat_file(self.path).decode(), time.time() - modified.timestamp()

    def touch(self) -> None:
        self.fs.pipe_file(self.path, self.fs.cat_file(self.path))  # a new modification time

    def remove(self) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass

    remove_stale = remove


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return False


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
    batch_indices: np.ndarray | None  # [batch]; None for an ingested run (no data order)


def _block_length(n: int, most: int) -> int:
    """A chunk's length along a dim of ``n`` (checkpoints, layers): at most ``most``, with
    ``n`` split into equal blocks.

    zarr stores the last chunk of an array at full size; the weights are not compressed, so a
    last block of 47 of 64 checkpoints would store 17 checkpoints of zeros (111 of the demo's
    checkpoints: 15% of its weights' bytes).  Blocks of 56 waste one.
    """
    n = max(n, 1)
    return math.ceil(n / math.ceil(n / most))


def buffer_slots(n_checkpoints: int, per_shard: int, checkpoint_bytes: int) -> int:
    """Checkpoints a run's writer holds before it commits them (its buffer).

    One chunk's worth (a run's ``n_checkpoints`` split into equal blocks of at most
    ``per_shard``, see :func:`_block_length`), and never more than ``MAX_BUFFER_BYTES`` of
    checkpoints of ``checkpoint_bytes`` each (at least one).
    """
    chunk = _block_length(n_checkpoints, per_shard)
    return max(1, min(chunk, MAX_BUFFER_BYTES // max(checkpoint_bytes, 1)))


def writer_memory(n_checkpoints: int, per_shard: int, checkpoint_bytes: int) -> int:
    """Most bytes a run's writer holds: its buffer (:func:`buffer_slots`), the checkpoint on
    its way to it (the training loop's copy), and zarr's encoding of the one piece it writes at
    a time (``ENCODING_COPIES`` x ``WRITE_PIECE``)."""
    slots = buffer_slots(n_checkpoints, per_shard, checkpoint_bytes)
    return (slots + 1) * checkpoint_bytes + ENCODING_COPIES * WRITE_PIECE


def _checkpoint_chunks(dims, shape, shard: int, itemsize: int, per_head: bool, d_head: int):
    """Chunks of an array of ``shard`` checkpoints of a parameter (``dims``, ``shape``).

    Weights with per-head dims are chunked per layer and block of ``d_head`` rows, so one head
    reads only its bytes: plain chunk files, not shards, which would cost a read of the shard
    index first (measured: 0.9 against 0.4 ms a chunk).  The rest are one chunk, split along
    their first (layer) dim, in equal blocks, where a chunk would exceed ``WRITE_PIECE``: the
    writer hands zarr one chunk's width at a time (see ``_write_rows``).
    """
    if per_head:
        per_dim = {"layer": 1} | dict.fromkeys(PER_HEAD_DIMS, d_head)
        return (shard, *(per_dim.get(dim, n) for dim, n in zip(dims, shape, strict=True)))
    row = shard * itemsize * math.prod(shape[1:])
    return (shard, _block_length(shape[0], max(1, WRITE_PIECE // row)), *shape[1:])


class RunWriter:
    """Appends checkpoints and per-step records of one run, on a background thread.

    ``put_checkpoint`` and ``put_step`` return at once; a writer thread buffers checkpoints
    and commits them when a block of ``checkpoints_per_shard`` is full, ``commit_seconds`` have
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
        Fingerprint of the run's data order (checked when the run is reopened); None with
        ``origin``.
    recipe
        What else decides the run's numbers (library versions, threads, CPU), for replay.
    origin
        Where an ingested run comes from (stored as its ``origin`` attribute): such a run has
        weights and, optionally, per-step metrics, but no keyframes (optimizer and RNG state)
        or data order, and can be neither resumed nor replayed.
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
    ):
        self.run = run
        self._shard = _block_length(len(schedule), spec.store.checkpoints_per_shard)
        self._commit_seconds = spec.store.commit_seconds
        self._group = root.require_group(run.path)
        self._state = origin is None  # optimizer state, RNG state and data order
        keyframes = tuple(schedule if keyframes is None else keyframes) if self._state else ()
        if "schedule" not in _attrs(self._group):  # new, or its creation was interrupted
            self._create_arrays(spec, param_shapes, d_head, schedule, keyframes, rng_bytes)
            # The attributes go last: until they exist, readers do not see the run.
            _set_attrs(
                self._group,
                init_seed=self.run.init_seed,
                data_seed=self.run.data_seed,
                schedule=list(schedule),
                total_steps=spec.train.steps,
                parameters=sorted(param_shapes),
                committed_checkpoints=0,
                committed_steps=0,
                complete=False,
                data_order_fingerprint=data_order_fingerprint,
                keyframes=list(keyframes),
                recipe=recipe or {},
                origin=origin,
                layout={name: _array_layout(array) for name, array in self._group.arrays()},
            )
        elif _attrs(self._group).get("origin") is not None:
            note = ingested_note(_attrs(self._group))
            raise StoreError(f"{run.path}: {note}: it cannot be resumed")
        elif _attrs(self._group).get("data_order_fingerprint") != data_order_fingerprint:
            raise StoreError(f"{run.path}: the data order changed since this run was started")
        self._ckpt_arrays = self._checkpoint_arrays()
        checkpoint_bytes = sum(
            a.dtype.itemsize * math.prod(a.shape[1:])
            for arrays in self._ckpt_arrays.values()
            for a in arrays.values()
        )
        self._buffer_slots = buffer_slots(
            len(schedule), spec.store.checkpoints_per_shard, checkpoint_bytes
        )
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.checkpoints_written = 0
        self.busy_seconds = 0.0  # wall time the writer thread spent on storing, not waiting

    # -- layout ------------------------------------------------------------------------------

    def _create_arrays(self, spec, param_shapes, d_head, schedule, keyframes, rng_bytes) -> None:
        # Every array is created at its final length (the schedule's checkpoints, its
        # keyframes, the run's steps), so that any reader sees consistent lengths at any time;
        # only what the commit markers cover is written.
        group = self._group
        lengths = {"step": len(schedule), KEYFRAME: len(keyframes)}
        per_file = spec.store.checkpoints_per_shard
        compressors = _compressors(spec.store)

        def checkpoint_array(
            parent: zarr.Group, name: str, shape, dims, dtype="float32", weights=False, axis="step"
        ):
            shard = _block_length(lengths[axis], per_file)
            per_head = weights and any(dim in PER_HEAD_DIMS for dim in dims)
            chunks = _checkpoint_chunks(
                dims, shape, shard, np.dtype(dtype).itemsize, per_head, d_head
            )
            parent.create_array(
                name,
                shape=(lengths[axis], *shape),
                chunks=chunks,
                dtype=dtype,
                compressors=_compressors(spec.store, weights=weights),
                fill_value=0,
                dimension_names=(axis, *dims),
                attributes={"coordinates": "tokens_seen"} if axis == "step" else {},
                overwrite=True,  # what an interrupted creation left
            )

        def vector(parent: zarr.Group, name: str, dims, dtype, trailing=()):
            parent.create_array(
                name,
                shape=(lengths.get(dims[0], spec.train.steps), *trailing),
                chunks=(METRIC_CHUNK, *trailing),
                dtype=dtype,
                compressors=compressors,
                fill_value=0,
                dimension_names=dims,
                overwrite=True,
            )

        for name, shape in param_shapes.items():
            checkpoint_array(group, name, shape, parameter_dims(name), weights=True)
        if self._state:
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
        if self._state:
            vector(
                group,
                "batch_indices",
                ("train_step", "batch"),
                "int64",
                trailing=(spec.train.batch_size,),
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
        if not self._state:  # an ingested run: weights only
            del paths[KEYFRAME]
        return {
            axis: {key: self._array(path) for key, path in arrays.items()}
            for axis, arrays in paths.items()
        }

    def _array(self, path: str) -> zarr.Array:
        # Every chunk is written, even one equal to the fill value: readers take a missing
        # chunk for damage.  (Checking each chunk for it would also cost more than compressing.)
        return self._group[path].with_config(_WRITE_CONFIG)

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
        """Move the markers back to the given counts before resuming.

        What a crash left past them stays invisible and is overwritten as training goes on;
        the arrays keep their full length (see :meth:`_create_arrays`).
        """
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
        attrs = _attrs(self._group)
        n_ckpt = attrs["committed_checkpoints"]
        rows = {"step": _Rows(self._ckpt_arrays["step"], self._buffer_slots, n_ckpt, self._shard)}
        if KEYFRAME in self._ckpt_arrays:  # an ingested run has no training state
            arrays = self._ckpt_arrays[KEYFRAME]
            rows[KEYFRAME] = _Rows(
                arrays,
                self._buffer_slots,
                _keyframe_count(attrs, n_ckpt),
                arrays[("rng_state",)].chunks[0],
                # Whole chunks only where keyframe chunks fill as checkpoint chunks do.
                keep=attrs["keyframes"] == attrs["schedule"],
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
        _set_attrs(
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
    chunk that an earlier commit left partly filled.  Such merges happen after every commit
    ``commit_seconds`` triggers, and took about three times the chunk in memory (measured on
    the 14M-shaped size: up to 90 MiB more during a commit).
    """

    def __init__(self, arrays: dict, slots: int, committed: int, chunk: int, keep: bool = True):
        self.arrays = arrays
        self.chunk = chunk
        self.keep = keep and chunk <= slots
        self.base = committed - committed % chunk if self.keep else committed
        self.done = self.filled = committed - self.base
        self.blocks = {k: np.zeros((slots, *a.shape[1:]), a.dtype) for k, a in arrays.items()}
        for key, array in arrays.items():  # a resumed run: its chunk's committed rows
            if self.done:
                self.blocks[key][: self.done] = _read(array, slice(self.base, committed))

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
    stop = start + len(block)
    if array.shape[0] < stop:  # a store from before arrays were created full length
        array.resize((stop, *array.shape[1:]))
    # A chunk's width at a time: zarr encodes all the chunks of a write at once, each into
    # new buffers, which for a whole block of the largest array would add about 1.7 times its
    # size (lz4) to the writer's memory.
    rows = slice(start, stop)
    if block.ndim > 1 and block.nbytes > WRITE_PIECE:
        width = array.chunks[1]
        for at in range(0, block.shape[1], width):
            array[rows, at : at + width] = block[:, at : at + width]
    else:
        array[rows] = block


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

    def run(self, size: str, seed: int) -> RunReader:
        """The run of ``size`` and seed index ``seed``; a clear error lists what exists."""
        for run in self.spec.runs():  # the common case: one existence check, not one per run
            if run.size == size and run.seed == seed:
                group = self._group(run.path)
                if group is not None:
                    return RunReader(self, run, group)
        seeds = [run.seed for run in self._size_run_ids(size)]
        raise StoreError(f"{self.path}: no seed {seed} for size {size!r} (seeds: {seeds})")

    def size_runs(self, size: str) -> list[RunReader]:
        """Readers of every run of ``size``, in seed order; a clear error lists the sizes."""
        return [RunReader(self, run) for run in self._size_run_ids(size)]

    def _group(self, path: str) -> zarr.Group | None:
        """The fully created run group at ``path``, or None."""
        group = _node(self.root, path, self.path)
        if group is None or "schedule" not in _attrs(group):  # attrs are written last
            return None
        return group

    def _size_run_ids(self, size: str) -> list[RunId]:
        runs = [run for run in self.runs() if run.size == size]
        if not runs:
            sizes = self.sizes()
            raise StoreError(f"{self.path}: no size {size!r} (sizes: {', '.join(sizes) or 'none'})")
        return runs

    def size_attrs(self, size: str) -> dict[str, Any]:
        return _attrs(_node(self.root, size, self.path))

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


def _node(parent: zarr.Group, path: str, where: Path) -> Any:
    """``parent[path]`` or None if absent; unreadable metadata is a :class:`StoreError`."""
    try:
        return _child(parent, path)  # one metadata read (a test with ``in`` first would be two)
    except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise StoreError(f"{where}/{path}/zarr.json: metadata is damaged ({reason})") from None


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
        self.attrs = _attrs(self.group)
        n_ckpt, n_steps = self.attrs["committed_checkpoints"], self.attrs["committed_steps"]
        schedule, total = self.attrs["schedule"], self.attrs["total_steps"]
        if not (0 <= n_ckpt <= len(schedule) and 0 <= n_steps <= total):
            raise StoreError(
                f"{family.path}/{run.path}: commit markers ({n_ckpt} checkpoints, {n_steps} "
                f"steps) disagree with the schedule ({len(schedule)} checkpoints, {total} steps)"
            )
        self._committed = {"step": n_ckpt, "train_step": n_steps}
        self._arrays: dict[str, zarr.Array] = {}

    def array(self, path: str) -> zarr.Array:
        """The run's array at ``path``, its metadata read once per reader (on a local store:
        once while its file is unchanged, see :func:`_cached`).

        Arrays are created at their final length, so metadata read after the commit markers
        (which this reader read on opening) covers everything the markers promise.
        """
        array = self._arrays.get(path)
        if array is None:
            array = _child(self.group, path)
            if array is None:
                raise KeyError(path)
            if _local_root(array) is None:
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

    def _refuse_if_ingested(self, what: str) -> None:
        if self.origin is not None:
            raise StoreError(f"{self.run.path}: {ingested_note(self.attrs)}: {what}")

    def steps(self) -> np.ndarray:
        """Committed checkpoint steps."""
        # Checkpoints are committed in schedule order (a resumed run continues after its last
        # committed one), so no read of the ``step`` array is needed: it is there for readers
        # that do not know the markers.
        return np.array(self.attrs["schedule"][: self.n_checkpoints], dtype=np.int64)

    def tokens_seen(self) -> np.ndarray:
        return self.read(self.array("tokens_seen"), slice(0, self.n_checkpoints))

    def step_coordinates(self) -> dict[str, np.ndarray]:
        """The stored ``step``, ``tokens_seen`` and ``keyframe`` arrays (their committed part).

        Readers take the steps from the schedule and the commit markers; these arrays are for
        readers that do not know the markers, and for checking that both agree.
        """
        n_keyframes = len(self.keyframe_steps())
        return {
            "step": _read(self.array("step"), slice(0, self.n_checkpoints)),
            "tokens_seen": _read(self.array("tokens_seen"), slice(0, self.n_checkpoints)),
            KEYFRAME: _read(self.array(f"{STATE_GROUP}/{KEYFRAME}"), slice(0, n_keyframes)),
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
        self._refuse_if_ingested("no training state to read")
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
        return self.verify_checkpoints([step])[0]

    def verify_checkpoints(self, steps: Sequence[int]) -> list[np.ndarray]:
        """:meth:`verify_checkpoint` for nearby checkpoints, each array read once over their
        range (a chunk holds up to ``checkpoints_per_shard`` of them: reading it once, not once
        per checkpoint, made ``observatory verify --quick`` many times faster)."""
        steps = [int(step) for step in steps]
        stored = set(self.keyframe_steps().tolist())
        keyframes = [step for step in steps if step in stored]
        position = {step: k for k, step in enumerate(keyframes)}
        try:
            params = self.parameters_for(steps)
            weights = self._rows(WEIGHTS_SHA256, [self.checkpoint_index(s) for s in steps])
            states = self._states_for(keyframes) if keyframes else None
        except StoreError as err:  # a damaged chunk: say which checkpoints it belongs to
            raise StoreError(f"step {steps[0]}: {err}") from None
        digests = []
        for i, step in enumerate(steps):
            digest = weights_digest({name: values[i] for name, values in params.items()})
            recorded = {"weights": (digest, weights[i])}
            if step in position:
                k = position[step]
                moments, rng_state, hashes = states
                now = state_digest(
                    {m: {n: a[k] for n, a in arrays.items()} for m, arrays in moments.items()},
                    rng_state[k],
                )
                recorded["optimizer and RNG state"] = (now, hashes[k])
            for what, (now, then) in recorded.items():
                if not np.array_equal(now, then):
                    raise StoreError(
                        f"{self.run.path}: the {what} of step {step} differ from the hash "
                        "recorded when they were written"
                    )
            digests.append(digest)
        return digests

    def _states_for(self, keyframes: list[int]) -> tuple[dict, np.ndarray, np.ndarray]:
        """AdamW moments (moment -> name -> ``[k, ...]``), RNG states and their recorded hashes
        at several keyframes, each array read once over their range."""
        self._refuse_if_ingested("no training state to read")
        rows = [self.keyframe_index(step) for step in keyframes]
        moments = {
            m: {n: self._rows(f"{STATE_GROUP}/{m}/{n}", rows) for n in self.parameter_names}
            for m in MOMENTS
        }
        rng_state = self._rows(f"{STATE_GROUP}/rng_state", rows)
        return moments, rng_state, self._rows(f"{STATE_GROUP}/{SHA256}", rows)

    def _rows(self, path: str, rows: Sequence[int]) -> np.ndarray:
        """``array[rows]`` of the array at ``path``, read once over the range the rows span."""
        rows = np.asarray(rows)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        return self.read(self.array(path), slice(lo, hi))[rows - lo]

    def recorded_digests(self, step: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The ledger's entries for a checkpoint, as recorded when it was written.

        Returns
        -------
        tuple
            The SHA-256 of the weights (32 ``uint8``, see :func:`weights_digest`) and, at a
            keyframe, of the optimizer and RNG state (:func:`state_digest`), else None.
        """
        index = self.checkpoint_index(step)
        weights = self.read(self.array(WEIGHTS_SHA256), index)
        if step not in self.keyframe_steps():
            return weights, None
        return weights, self.read(self.array(f"{STATE_GROUP}/{SHA256}"), self.keyframe_index(step))

    def parameters_for(self, steps: Sequence[int]) -> dict[str, np.ndarray]:
        """Stacked parameters of several checkpoints, ``[len(steps), ...]`` each.

        Each array is read once over the range the steps span, so a block of nearby
        checkpoints decodes every chunk once rather than once per checkpoint.
        """
        indices = [self.checkpoint_index(step) for step in steps]
        return {name: self._rows(name, indices) for name in self.parameter_names}

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
        count = _keyframe_count(self.attrs, self.n_checkpoints)
        return np.array(self.attrs["keyframes"][:count], dtype=np.int64)

    def batch_indices_between(self, start: int, stop: int) -> np.ndarray:
        """Corpus indices of the batches of training steps ``start .. stop - 1``, one read."""
        if not 0 <= start <= stop <= self.n_steps:
            raise StoreError(
                f"{self.run.path}: no recorded batches for steps {start}..{stop - 1} "
                f"(recorded steps: 0..{self.n_steps - 1})"
            )
        return _read(self.array("batch_indices"), slice(start, stop))

    def batch_indices(self, step: int) -> np.ndarray:
        """Corpus indices of the batch consumed at training step ``step``."""
        self._refuse_if_ingested("no recorded batches")
        if not 0 <= step < self.n_steps:
            raise StoreError(
                f"{self.run.path}: no recorded batch for step {step} "
                f"(recorded steps: 0..{self.n_steps - 1})"
            )
        return self.read(self.array("batch_indices"), step)

    # -- analysis results ---------------------------------------------------------------------

    def analysis_group(self, name: str, *, create: bool = False) -> zarr.Group | None:
        path = f"{ANALYSIS_GROUP}/{name}"
        group = _child(self.group, path)
        if group is None and create:
            return self.group.require_group(path)
        return group

    def analyses(self) -> list[str]:
        group = _child(self.group, ANALYSIS_GROUP)
        return [] if group is None else [name for name, _ in _children(group, zarr.Group)]

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
        arrays = dict(_children(group, zarr.Array))
        steps = arrays.pop("step", None)
        return (np.zeros(0, np.int64) if steps is None else _read_whole(steps)), arrays

    def read_all_analyses(self) -> None:
        """Read every stored analysis result once: a damaged chunk raises :class:`StoreError`."""
        for name in self.analyses():
            steps, arrays = self.analysis_arrays(name)
            for array in arrays.values():
                per_step = (array.metadata.dimension_names or ())[:1] == ("step",)
                _read(array, slice(0, len(steps)) if per_step else Ellipsis)

    # -- lazy reading ------------------------------------------------------------------------

    def lazy_arrays(self, names: Sequence[str] | None = None) -> dict[str, StoredArray]:
        """Every array of the run group (or those named), lazily read, cut to what is committed.

        Those with a leading ``step`` dim (the parameters, ``step``, ``tokens_seen``) end at
        ``n_checkpoints``, those of :data:`STEP_RECORDS` at ``n_steps``.  Nothing is read: the
        dims, shapes and dtypes come from the run's attributes (stores written before they
        were recorded there have the arrays' metadata read instead).
        """
        layout = self.attrs.get("layout")
        if layout is None:
            arrays = self.group.arrays() if names is None else ((n, self.group[n]) for n in names)
            layout = {name: _array_layout(array) for name, array in arrays}
        if names is not None:
            layout = {name: layout[name] for name in names}
        lengths = {"step": self.n_checkpoints, "train_step": self.n_steps}
        return {
            name: StoredArray(self, name, entry, lengths[entry["dims"][0]])
            for name, entry in layout.items()
        }

    def analysis_lazy_arrays(self, name: str, steps: np.ndarray) -> dict[str, StoredArray]:
        """The arrays of an analysis, lazily read; those by ``step`` aligned on ``steps``.

        Row ``i`` of an array with a leading ``step`` dim holds the result at ``steps[i]``, NaN
        where the analysis has not covered that checkpoint.
        """
        covered, arrays = self.analysis_arrays(name)
        position = {int(step): row for row, step in enumerate(covered)}
        rows = np.array([position.get(int(step), -1) for step in steps], dtype=np.int64)
        if np.array_equal(rows, np.arange(len(covered))):
            rows = None  # stored in step order already: read rows as they are
        out = {}
        for key, array in arrays.items():
            entry, path = _array_layout(array), f"{ANALYSIS_GROUP}/{name}/{key}"
            by_step = entry["dims"][0] == "step"
            out[key] = StoredArray(
                self,
                path,
                entry,
                len(steps) if by_step else array.shape[0],
                rows=rows if by_step else None,
                array=array,
                attrs=dict(array.attrs) | {"analysis": name},
            )
        return out

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
        """``array[selection]`` of one of the run's arrays, consistent while a writer commits.

        Chunk files are replaced whole (an atomic rename on disk, one PUT on an object store),
        so a plain chunk is read consistently in one request.  Stores written before per-head
        chunk files keep the weights in shards, which zarr reads with two requests (the index,
        then the chunks it needs), and the writer replaces the partly filled shard that holds
        the last committed checkpoint at every commit.  A read can thus pair one version's
        index with the next version's bytes, which fails to decode or, rarely, decodes as
        another chunk.  So the read is repeated whenever that shard's version (inode and mtime,
        or ETag) changed under it; shards before it are never rewritten.
        """
        self._check_length(array)
        checkpoint_dim = array.metadata.dimension_names[0] == "step"
        steps = self.steps if checkpoint_dim and ANALYSIS_GROUP not in array.path else None
        if array.shards is None:
            return _read(array, selection, steps)
        last = max(self.n_checkpoints - 1, 0) // array.shards[0]
        shard = f"{array.path}/" + array.metadata.encode_chunk_key(
            (last,) + (0,) * (array.ndim - 1)
        )
        version = self.family.object_version
        for attempt in range(READ_ATTEMPTS):
            before = version(shard)
            try:
                values = _read(array, selection, steps)
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


def _require_variables(group, variables: dict[str, Any], where: str) -> None:
    """Stored results must have the variables the analysis declares now (a one-line error)."""
    stored = set(group.array_keys()) - {"step"}
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
        if group is not None:
            _require_variables(group, variables, self.where)
        else:
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
        self._arrays = {
            variable: group[variable].with_config(_WRITE_CONFIG) for variable in variables
        }
        self._steps = group["step"].with_config(_WRITE_CONFIG)
        self._done = set(_read(self._steps, slice(None)).tolist())
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
            config=_WRITE_CONFIG,
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


# --------------------------------------------------------------------------------------------
# Lazy reading: stored arrays as xarray backend arrays that read only what is indexed.


def _array_layout(array: zarr.Array) -> dict[str, Any]:
    """What a lazy array needs to know without reading: dims, shape after the first dim, ..."""
    names = array.metadata.dimension_names
    if names is None or None in names:
        raise StoreError(f"{array.path}: array has no dimension names")
    return {
        "dims": list(names),
        "shape": list(array.shape[1:]),
        "dtype": str(array.dtype),
        "chunks": list(array.chunks),
    }


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
        Its dims, shape after the first dim, dtype and chunks (see ``_array_layout``).
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
