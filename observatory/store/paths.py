"""Where a store lives: a local directory or an fsspec URL.

A store lives at a local path or at any fsspec URL (``s3://``, ``gs://``, ... read-write;
``http(s)://`` read-only); credentials and endpoints come from the environment and fsspec's
configuration, never from the store.  Every file is written whole (a rename on disk, one PUT
on an object store) and the commit markers last, so the commit protocol needs no atomic
directory operation: on a store with read-after-write consistency (S3), a reader that sees the
markers sees every object they cover.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import zarr

from observatory.errors import StoreError

READ_ONLY_PROTOCOLS = ("http", "https")


def location(path: str | os.PathLike) -> str | Path:
    """A store location: a local :class:`~pathlib.Path`, or a URL for fsspec (``s3://...``).

    URLs stay strings (a ``Path`` would fold ``//``); ``file://`` URLs become paths.
    """
    text = os.fspath(path)
    if "://" in text and not text.startswith("file://"):
        return text.rstrip("/")
    return Path(text.removeprefix("file://"))


def storage_options(where: str | Path) -> dict[str, Any] | None:
    """fsspec options for a URL (None for a local path)."""
    # A store changes while it is read (training, analysis jobs): never reuse a listing.
    return None if isinstance(where, Path) else {"use_listings_cache": False}


def open_group(where: str | Path, *, mode: str, **kwargs) -> zarr.Group:
    return zarr.open_group(str(where), mode=mode, storage_options=storage_options(where), **kwargs)


def filesystem(where: str):
    """The fsspec filesystem of a URL (configured from the environment) and the path in it."""
    import fsspec

    return fsspec.core.url_to_fs(where, **storage_options(where))


def exists(where: str | Path) -> bool:
    """Whether a store exists at ``where``."""
    if isinstance(where, Path):
        return where.exists()
    fs, path = filesystem(where)
    return fs.exists(f"{path}/zarr.json")  # object stores have no directories


def require_writable(where: str | Path) -> None:
    if isinstance(where, str) and where.partition("://")[0] in READ_ONLY_PROTOCOLS:
        raise StoreError(f"{where}: http(s) stores are read-only")
