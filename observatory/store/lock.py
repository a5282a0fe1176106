"""One writer per run: a lock file beside the store, with a heartbeat."""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
from pathlib import Path

import zarr
from zarr.storage import LocalStore, WrapperStore

from observatory.errors import StoreError
from observatory.spec import RunId
from observatory.store.paths import filesystem, remote_errors

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
            fs, path = filesystem(f"{protocol}://{store.path.rstrip('/')}.locks/{name}")
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
            with remote_errors(self.path):  # e.g. credentials that may read but not write
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
