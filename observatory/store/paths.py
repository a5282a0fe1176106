"""Where a store lives: a local directory or an fsspec URL.

A store lives at a local path or at any fsspec URL (``s3://``, ``gs://``, ... read-write;
``http(s)://`` read-only); credentials and endpoints come from the environment and fsspec's
configuration, never from the store.  A remote store answers or fails within bounded time
(:data:`CONNECT_TIMEOUT`, :data:`READ_TIMEOUT`, :data:`ATTEMPTS` for S3 and HTTP), and every
failure to reach it (credentials, access, a missing bucket, an unreachable endpoint) is a
one-line :class:`StoreError` naming the URL (:func:`remote_errors`, :class:`RemoteStore`).
Every file is written whole (a rename on disk, one PUT
on an object store) and the commit markers last, so the commit protocol needs no atomic
directory operation: on a store with read-after-write consistency (S3), a reader that sees the
markers sees every object they cover.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import zarr
from zarr.storage import FsspecStore, WrapperStore

from observatory.errors import StoreError

READ_ONLY_PROTOCOLS = ("http", "https")
# A remote store fails in bounded time instead of hanging a command: seconds to open a
# connection, seconds without a byte while reading, and tries per request (the first included).
CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 20.0
ATTEMPTS = 2


def location(path: str | os.PathLike) -> str | Path:
    """A store location: a local :class:`~pathlib.Path`, or a URL for fsspec (``s3://...``).

    URLs stay strings (a ``Path`` would fold ``//``); ``file://`` URLs become paths.
    """
    if not isinstance(path, (str, os.PathLike)):
        kind = type(path).__name__
        raise StoreError(f"expected a store path or URL (str or pathlib.Path), got {kind}")
    text = os.fspath(path)
    if "://" in text and not text.startswith("file://"):
        if not text.partition("://")[2].strip("/"):
            raise StoreError(f"{text}: no path after '://' (e.g. s3://bucket/family.zarr)")
        return text.rstrip("/")
    return Path(text.removeprefix("file://"))


def storage_options(where: str | Path) -> dict[str, Any] | None:
    """fsspec options for a URL (None for a local path): no listing cache, bounded waits.

    Timeouts set in fsspec's own configuration (``client_kwargs``, ``config_kwargs``) win.
    """
    if isinstance(where, Path):
        return None
    import fsspec

    # A store changes while it is read (training, analysis jobs): never reuse a listing.
    options: dict[str, Any] = {"use_listings_cache": False}
    protocol = where.partition("://")[0]
    if protocol in ("s3", "s3a"):
        bounds = {
            "connect_timeout": CONNECT_TIMEOUT,
            "read_timeout": READ_TIMEOUT,
            "retries": {"max_attempts": ATTEMPTS, "mode": "standard"},
        }
        options["config_kwargs"] = bounds
    elif protocol in READ_ONLY_PROTOCOLS:
        import aiohttp

        timeout = aiohttp.ClientTimeout(connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT)
        options["client_kwargs"] = {"timeout": timeout}
    configured = fsspec.config.conf.get(protocol, {})
    for key in ("config_kwargs", "client_kwargs"):
        if key in options and key in configured:
            options[key] = {**options[key], **configured[key]}
    return options


def _bounded(fs):
    """``fs`` with at most :data:`ATTEMPTS` tries per request (s3fs's own retry loop, which
    no constructor argument sets, comes on top of botocore's)."""
    if hasattr(fs, "retries"):
        fs.retries = ATTEMPTS
    return fs


def zarr_store(where: str, *, read_only: bool) -> RemoteStore:
    """The zarr store of a URL: bounded waits, and failures as one-line :class:`StoreError`."""
    with _opening(where), remote_errors(where):
        options = storage_options(where)
        base = FsspecStore.from_url(where, storage_options=options, read_only=read_only)
    _bounded(base.fs)
    return RemoteStore(base)


def zarr_target(where: str | Path, *, read_only: bool) -> str | RemoteStore:
    """What zarr opens for ``where``: a local path, or a URL's :func:`zarr_store`."""
    return str(where) if isinstance(where, Path) else zarr_store(where, read_only=read_only)


def open_group(where: str | Path, *, mode: str, **kwargs) -> zarr.Group:
    return zarr.open_group(zarr_target(where, read_only=mode == "r"), mode=mode, **kwargs)


def filesystem(where: str):
    """The fsspec filesystem of a URL (configured from the environment) and the path in it."""
    import fsspec

    with _opening(where), remote_errors(where):
        fs, path = fsspec.core.url_to_fs(where, **storage_options(where))
    return _bounded(fs), path


@contextmanager
def _opening(where: str) -> Iterator[None]:
    """A URL whose protocol fsspec does not know, or whose library is not installed, is a
    one-line :class:`StoreError` (fsspec's message says what to install)."""
    try:
        yield
    except ImportError as err:
        raise StoreError(f"{where}: {err}") from None
    except ValueError as err:
        if "protocol" not in str(err).lower():
            raise
        raise StoreError(f"{where}: not a store URL ({err})") from None


def exists(where: str | Path) -> bool:
    """Whether a store exists at ``where`` (a :class:`StoreError` if it cannot be asked)."""
    if isinstance(where, Path):
        return where.exists()
    fs, path = filesystem(where)
    with remote_errors(where):  # ``fs.exists`` would answer "no" for an unreachable server
        try:
            fs.info(f"{path}/zarr.json")  # object stores have no directories
        except FileNotFoundError as err:
            if _absent(err):
                return False
            raise
    return True


def missing(where: str | Path) -> str:
    """Why there is no store at ``where``, for an error message."""
    if isinstance(where, str) and where.partition("://")[0] not in READ_ONLY_PROTOCOLS:
        fs, path = filesystem(where)
        bucket = path.split("/")[0]
        with remote_errors(where):
            if "/" in path and not fs.exists(bucket):
                return f"no such bucket {bucket!r}"
    return "no such store"


@contextmanager
def remote_errors(where: Any) -> Iterator[None]:
    """Turn a failure to reach a remote store into a one-line :class:`StoreError`.

    Only failures of the remote service are translated: a missing object
    (``FileNotFoundError``) and a lost conditional put (``FileExistsError``) are answers the
    callers handle.
    """
    try:
        yield
    except (FileExistsError, StoreError):
        raise
    except Exception as err:
        failure = err.__cause__ if isinstance(err, FileNotFoundError) else err
        cause = None if _absent(err) else _remote_cause(failure)
        if cause is None:
            raise
        raise StoreError(f"{where}: {cause}") from None


def _absent(err: Exception) -> bool:
    """Whether ``err`` says that an object is missing (not that the store could not be asked).

    fsspec's HTTP filesystem reports any failure to ask as ``FileNotFoundError``: only a plain
    one, or one caused by an HTTP 404 or S3's "no such key/bucket", says that it is missing.
    """
    if not isinstance(err, FileNotFoundError):
        return False
    cause = err.__cause__
    if cause is None or getattr(cause, "status", None) == 404:
        return True
    code = getattr(cause, "response", {}).get("Error", {}).get("Code")
    return code in ("404", "NoSuchKey", "NoSuchBucket") or _remote_cause(cause) is None


def _remote_cause(err: BaseException | None) -> str | None:
    """What went wrong, in words, if ``err`` is a remote store's failure (else None)."""
    if not isinstance(err, Exception) or isinstance(err, FileNotFoundError):
        return None
    module = type(err).__module__.partition(".")[0]
    text = (str(err).splitlines() or [""])[0] or type(err).__name__
    if type(err).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return (
            "no S3 credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
            "AWS_PROFILE, or anon = true in fsspec's s3 configuration for a public bucket)"
        )
    if isinstance(err, PermissionError):
        return f"access denied ({text}); check the credentials and the bucket's permissions"
    status = getattr(err, "status", None)
    if module == "aiohttp" and isinstance(status, int):
        return f"the server answered HTTP {status} {getattr(err, 'message', '')}".rstrip()
    if isinstance(err, (TimeoutError, asyncio.TimeoutError)) or "Timeout" in type(err).__name__:
        return f"no answer within {CONNECT_TIMEOUT:g} s to connect or {READ_TIMEOUT:g} s to read"
    if module in ("aiohttp", "botocore") and (
        isinstance(err, OSError) or "Connect" in type(err).__name__
    ):
        return f"cannot reach the server ({text})"
    if module in ("aiohttp", "botocore", "aiobotocore") or isinstance(err, OSError):
        return text
    return None


class RemoteStore(WrapperStore):
    """A remote zarr store whose failures are one-line :class:`StoreError` naming its URL.

    Every zarr read and write of a remote store goes through here, so that a store that
    becomes unreachable halfway through a command still fails in one line.
    """

    async def get(self, key, prototype, byte_range=None):
        with remote_errors(str(self)):
            return await self._store.get(key, prototype, byte_range)

    async def get_partial_values(self, prototype, key_ranges):
        with remote_errors(str(self)):
            return await self._store.get_partial_values(prototype, key_ranges)

    async def exists(self, key):
        with remote_errors(str(self)):
            return await self._store.exists(key)

    async def set(self, key, value):
        with remote_errors(str(self)):
            return await self._store.set(key, value)

    async def set_if_not_exists(self, key, value):
        with remote_errors(str(self)):
            return await self._store.set_if_not_exists(key, value)

    async def delete(self, key):
        with remote_errors(str(self)):
            return await self._store.delete(key)

    async def list_dir(self, prefix):
        with remote_errors(str(self)):
            async for key in self._store.list_dir(prefix):
                yield key

    async def list_prefix(self, prefix):
        with remote_errors(str(self)):
            async for key in self._store.list_prefix(prefix):
                yield key

    def __str__(self) -> str:
        path, protocol = self._store.path, self._store.fs.protocol
        protocol = protocol if isinstance(protocol, str) else protocol[0]
        return path if "://" in path else f"{protocol}://{path}"


def require_writable(where: str | Path) -> None:
    if isinstance(where, str) and where.partition("://")[0] in READ_ONLY_PROTOCOLS:
        raise StoreError(f"{where}: http(s) stores are read-only")
