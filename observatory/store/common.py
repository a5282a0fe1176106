"""Opening a store's groups and arrays, with a per-process cache of local stores' metadata.

Opening a run otherwise reads a dozen ``zarr.json`` files (the root, the run, its analysis
groups and their arrays), each a round trip through zarr's event loop that costs more than the
read of a head.  Opened nodes of a local store opened to read are kept while their metadata
files are unchanged, so an unchanged store costs one ``stat`` per node.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore

from observatory.errors import StoreError
from observatory.store.integrity import CheckedStore, checked_read

_CACHED: dict[tuple[Path, str], tuple[tuple, Any]] = {}
_CACHED_MAX = 4096
# A file rewritten within the file system's timestamp granularity (a jiffy on ext4) can keep
# its inode, size and mtime: metadata younger than this is read, never reused.
_SETTLED_NS = 2_000_000_000


def local_root(node: zarr.Group | zarr.Array) -> Path | None:
    """The directory of ``node``'s store if it is a local store opened to read, else None."""
    store = node.store
    if isinstance(store, CheckedStore) and isinstance(store._store, LocalStore):
        return Path(store._store.root)
    return None


def cached_node(root: Path, path: str, open_node: Callable[[], Any]) -> Any:
    """``open_node()``, the node at ``path`` of the local store ``root``; None if its metadata
    file is absent.  The node opened earlier is returned instead while its ``zarr.json`` has
    the same inode, mtime and size."""
    try:
        return cached(root, path, [f"{path}/zarr.json".lstrip("/")], open_node)
    except (FileNotFoundError, NotADirectoryError):
        return None


def cached(root: Path, key: str, files: list[str], compute: Callable[[], Any]) -> Any:
    """``compute()`` from the files ``files`` of the local store ``root``, or what it returned
    for ``key`` before if none of them has changed since (a missing file raises)."""
    stats = [(root / name).stat() for name in files]
    signature = tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in stats)
    hit = _CACHED.get((root, key))
    if hit is not None and hit[0] == signature:
        return hit[1]
    value = compute()
    if time.time_ns() - max(st.st_mtime_ns for st in stats) >= _SETTLED_NS:
        if len(_CACHED) >= _CACHED_MAX:
            _CACHED.clear()
        _CACHED[(root, key)] = (signature, value)
    return value


def read_whole(array: zarr.Array) -> np.ndarray:
    """All of a small array (an analysis's ``step`` array), read-only, reused while its files
    are unchanged in a local store (see :func:`cached`)."""

    def read() -> np.ndarray:
        values = checked_read(array, slice(None))
        values.setflags(write=False)
        return values

    root = local_root(array)
    n_chunks = math.ceil(array.shape[0] / array.chunks[0])
    keys = ["zarr.json"] + [array.metadata.encode_chunk_key((i,)) for i in range(n_chunks)]
    try:
        if root is not None:
            return cached(root, f"{array.path}#", [f"{array.path}/{k}" for k in keys], read)
    except (FileNotFoundError, NotADirectoryError):  # a missing chunk: the read says which
        pass
    return read()


def child(group: zarr.Group, path: str) -> zarr.Group | zarr.Array | None:
    """``group[path]``, or None if absent (metadata reused while unchanged, see above)."""
    root = local_root(group)
    try:
        if root is not None:
            return cached_node(root, f"{group.path}/{path}".strip("/"), lambda: group[path])
        return group[path]
    except KeyError:
        return None


def children(group: zarr.Group, kind: type) -> list[tuple[str, Any]]:
    """The members of ``group`` of type ``kind`` (``zarr.Group`` or ``zarr.Array``), by name."""
    root = local_root(group)
    if root is None:
        members = group.groups() if kind is zarr.Group else group.arrays()
        return sorted(members, key=lambda member: member[0])
    with os.scandir(root / group.path) as entries:
        names = sorted(entry.name for entry in entries if entry.is_dir())
    members = ((name, child(group, name)) for name in names)
    return [(name, node) for name, node in members if isinstance(node, kind)]


def node(parent: zarr.Group, path: str, where: Path | str) -> Any:
    """``parent[path]`` or None if absent; unreadable metadata is a :class:`StoreError`."""
    try:
        return child(parent, path)  # one metadata read (a test with ``in`` first would be two)
    except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise StoreError(f"{where}/{path}/zarr.json: metadata is damaged ({reason})") from None
