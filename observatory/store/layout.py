"""The zarr layout of an observatory store: names, attributes, chunking and the schema version.

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
            rng_state     [keyframe, rng_byte]     torch RNG state at each keyframe
            exp_avg/<param>, exp_avg_sq/<param>    AdamW moments, same layout as the params
          analysis/<name>/                         analysis results (written by analysis jobs)
          attribution/<name>/                      attributions [train_step, ...] (obs.attribute)

A run ingested from Hugging Face checkpoint folders (``observatory ingest``) has the same layout
without ``state/`` and ``batch_indices``: its ``origin`` attribute says where it came from.

Checkpoint arrays are chunked along ``step``: a chunk file holds up to
``checkpoints_per_chunk`` checkpoints of an array (the schedule split into equal blocks).  The
weights with per-head dims are also chunked per layer and per head (one file each), so that one
head of one layer across all checkpoints reads only its own bytes, in one request per file; the
other arrays are split per layer (or block of rows) where a chunk would exceed ``WRITE_PIECE``.
Arrays are created at their final length (every scheduled checkpoint, every step) and filled
as checkpoints are committed; a run's ``committed_checkpoints``/``committed_steps`` attrs are
updated last: readers use only what those markers cover, so a crash never exposes a
half-written checkpoint, and every chunk inside them exists (a missing one is damage: see
:mod:`observatory.store.integrity`).  A run's attrs are written after its arrays: a run without
them was interrupted while being created and is not listed.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from observatory.errors import StoreError
from observatory.models import PER_HEAD_DIMS
from observatory.spec import RunSpec, SizeSpec, StoreSpec, spec_from_dict
from observatory.store.common import cached_node
from observatory.store.integrity import checked_store
from observatory.store.paths import (
    exists,
    location,
    missing,
    open_group,
    require_writable,
    zarr_target,
)

SCHEMA_VERSION = 3  # a store of another version is refused on opening
ATTRS_KEY = "observatory"
STATE_GROUP = "state"
ANALYSIS_GROUP = "analysis"
ATTRIBUTION_GROUP = "attribution"  # attributions along the trajectory, by training step
DYNAMICS_GROUP = "dynamics"  # per-step gradient and update norms of a replay, by training step
MOMENTS = ("exp_avg", "exp_avg_sq")
KEYFRAME = "keyframe"  # the axis of the training state, and the array of its steps
WEIGHTS_SHA256 = "weights_sha256"  # the ledger: a hash of each checkpoint's weights
SHA256 = "sha256"  # ... and of each keyframe's optimizer and RNG state, in state/
STEP_METRICS = ("loss", "lr", "grad_norm")
METRIC_CHUNK = 4096
WRITE_PIECE = 2**22  # most bytes the writer hands zarr at once: about one chunk
# Arrays of a run with a leading ``train_step`` dim: one entry per training step.
STEP_RECORDS = ("train_step", "train_tokens", *STEP_METRICS, "batch_indices")
# Array settings for every write: zarr skips chunks equal to the fill value by default, but a
# reader must be able to tell a missing chunk (damage) from one that was never written.
WRITE_CONFIG = {"write_empty_chunks": True}


def library_versions() -> dict[str, str]:
    return {name: version(name) for name in ("observatory", "torch", "transformers", "zarr")}


def attrs_of(node: zarr.Group | zarr.Array) -> dict[str, Any]:
    """The observatory attributes of a group (empty if it has none)."""
    return dict(node.attrs.get(ATTRS_KEY, {}))


def set_attrs(node: zarr.Group, **updates: Any) -> None:
    """Update the observatory attributes of a group (one metadata document, written whole)."""
    node.attrs[ATTRS_KEY] = attrs_of(node) | updates


def compressors(store: StoreSpec, *, weights: bool = False) -> list:
    """Blosc (not for ``weights`` unless the spec asks), then a CRC32C checksum: a damaged
    chunk fails to read instead of decoding wrong."""
    if weights and not store.compress_weights:
        return [Crc32cCodec()]
    blosc = BloscCodec(cname=store.compressor, clevel=store.compression_level, shuffle="shuffle")
    return [blosc, Crc32cCodec()]


def block_length(n: int, most: int) -> int:
    """A chunk's length along a dim of ``n`` (checkpoints, layers): at most ``most``, with
    ``n`` split into equal blocks.

    zarr stores the last chunk of an array at full size and the weights are not compressed, so
    equal blocks keep a short last block from storing padding.
    """
    n = max(n, 1)
    return math.ceil(n / math.ceil(n / most))


def checkpoint_chunks(dims, shape, per_chunk: int, itemsize: int, per_head: bool, d_head: int):
    """Chunks of an array of ``per_chunk`` checkpoints of a parameter (``dims``, ``shape``).

    Weights with per-head dims are chunked per layer and block of ``d_head`` rows, so one head
    reads only its bytes, in one request per file.  The rest are one chunk, split along their
    first (layer) dim, in equal blocks, where a chunk would exceed ``WRITE_PIECE``: the writer
    hands zarr one chunk's width at a time.
    """
    if per_head:
        per_dim = {"layer": 1} | dict.fromkeys(PER_HEAD_DIMS, d_head)
        return (per_chunk, *(per_dim.get(dim, n) for dim, n in zip(dims, shape, strict=True)))
    row = per_chunk * itemsize * math.prod(shape[1:])
    return (per_chunk, block_length(shape[0], max(1, WRITE_PIECE // row)), *shape[1:])


def array_layout(array: zarr.Array) -> dict[str, Any]:
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


def read_checkpoint(group: zarr.Group, names: list[str], index: int, keyframe: int | None, read):
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


def keyframe_count(attrs: dict[str, Any], n_checkpoints: int) -> int:
    """How many keyframes the first ``n_checkpoints`` checkpoints of a run (``attrs``) hold."""
    if not n_checkpoints:
        return 0
    last = attrs["schedule"][n_checkpoints - 1]
    return bisect.bisect_right(attrs["keyframes"], last)


def ingested_note(run_attrs: dict[str, Any]) -> str:
    """``"ingested from <path> (config <hash>), without optimizer state or data order"``; for
    an exported branch, ``(config <hash>; the export of branch <path>, forked at step <k>)``."""
    origin = run_attrs["origin"]
    branch = origin.get("branch")
    of = (
        f"; the export of branch {branch['path']}, forked at step {branch['fork']}"
        if branch
        else ""
    )
    return (
        f"ingested from {origin['path']} (config {origin['config_hash']}{of}), "
        "without optimizer state or data order"
    )


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
    require_writable(path)
    if isinstance(path, Path) and path.exists() and not path.is_dir():
        raise StoreError(f"{path}: is a file, not a store; use another --store")
    attrs = {
        "schema_version": SCHEMA_VERSION,
        "spec": spec.to_dict(),
        "versions": library_versions(),
        "data": data,
    }
    if not exists(path) or _empty_directory(path):
        _create_root(path, attrs)  # or another process just did: checked as any existing store
    root = open_root(path, mode="r+")
    stored = attrs_of(root)
    same_spec = spec_from_dict(stored["spec"]) == spec  # keys added since take their defaults
    if not same_spec and not any(True for _ in root.groups()):
        set_attrs(root, **attrs)  # nothing trained yet (e.g. an earlier spec failed to build)
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


def _empty_directory(path: str | Path) -> bool:
    return isinstance(path, Path) and path.is_dir() and not any(path.iterdir())


def _create_root(path: str | Path, attrs: dict[str, Any]) -> None:
    """Create the store's root group, its attributes in the same one metadata document.

    Whoever opens the store at the same time sees no store or a whole one, never a torn one: a
    local store is built in a hidden sibling directory and renamed into place (a rename that
    fails because another process got there first leaves theirs); on an object store the one
    ``zarr.json`` object appears whole.
    """
    metadata = {"attributes": {ATTRS_KEY: attrs}, "zarr_format": 3}
    if not isinstance(path, Path):
        with contextlib.suppress(zarr.errors.ContainsGroupError):
            zarr.create_group(zarr_target(path, read_only=False), **metadata)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".creating", dir=path.parent))
    try:
        zarr.create_group(str(staging), **metadata)
        staging.rename(path)  # atomic; replaces an empty directory, fails on a non-empty one
    except OSError:
        if not path.exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def open_root(path: str | Path, *, mode: str) -> zarr.Group:
    """The root group of an existing store of this schema version (a one-line error if not)."""
    if mode != "r":
        require_writable(path)
    if not exists(path):
        raise StoreError(f"{path}: {missing(path)}")
    # Readers see a missing chunk as an error; writers must see it as "not written yet".
    try:
        root = _read_root(path) if mode == "r" else open_group(path, mode=mode, zarr_format=3)
    except json.JSONDecodeError as err:
        raise StoreError(f"{path}/zarr.json: metadata is not valid JSON ({err})") from None
    except (FileNotFoundError, ValueError, zarr.errors.NodeTypeValidationError) as err:
        raise StoreError(f"{path}: not a zarr store ({err})") from None
    stored = attrs_of(root).get("schema_version")
    if stored is None:
        raise StoreError(f"{path}: not an observatory store (no '{ATTRS_KEY}' attributes)")
    if stored != SCHEMA_VERSION:
        raise StoreError(
            f"{path}: store schema version {stored}; this version of observatory reads "
            f"schema version {SCHEMA_VERSION} only"
        )
    return root


def _read_root(path: str | Path) -> zarr.Group:
    """The root group of a store opened to read (its metadata reused while unchanged)."""

    def open_checked() -> zarr.Group:
        return zarr.open_group(checked_store(path), mode="r", zarr_format=3)

    if not isinstance(path, Path):
        return open_checked()
    root = cached_node(path, "", open_checked)
    if root is None:
        raise FileNotFoundError(f"{path}/zarr.json is missing")
    return root


def write_size_attrs(root: zarr.Group, size: SizeSpec, *, hf_config: dict[str, Any]) -> None:
    """Record a size's spec and Hugging Face config on its group (created if needed)."""
    try:
        group = root.require_group(size.name)
    except zarr.errors.ContainsGroupError:  # another process created it just now
        group = root[size.name]
    set_attrs(group, size=size.__dict__, d_head=size.d_head, hf_config=hf_config)
