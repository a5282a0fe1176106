"""The on-disk token cache: token streams written once, memory-mapped by every later use.

An entry is a folder named by the hash of everything its tokens depend on (the tokenizer's
JSON, the source definition, every source file's path, size and mtime), so a changed file or
tokenizer gets a new entry and an entry never changes.  It holds ``tokens.bin`` (the flat
stream, ``uint16`` when the vocabulary fits, else ``uint32``; absent where the stream is a
token file windowed in place), ``offsets.npy`` (document starts, ``int64[n_documents + 1]``),
``counts.npy`` (occurrences of each token id) and ``meta.json`` (token count, dtype, the
fingerprint: SHA-256 of the definition and every token, computed while writing; the sources).
An entry is written into a temporary folder renamed into place when complete: a half-written
entry is never used, and one left by a killed process is removed by the next writer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_CACHE = "~/.cache/observatory"
META = "meta.json"


def cache_root(configured: str | None) -> Path:
    """The cache folder: ``data.cache``, else ``$OBSERVATORY_CACHE``, else ``~/.cache/...``."""
    return Path(configured or os.environ.get("OBSERVATORY_CACHE") or DEFAULT_CACHE).expanduser()


def file_stats(files: list[Path]) -> list[list]:
    """``[resolved path, size, mtime_ns]`` of each file: what a cache entry is valid for."""
    stats = []
    for file in files:
        stat = file.stat()
        stats.append([str(file.resolve()), stat.st_size, stat.st_mtime_ns])
    return stats


def key_of(*parts) -> str:
    """A cache key: the hash of JSON-serialisable ``parts``."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of the vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


@dataclass(frozen=True)
class Entry:
    """A complete cache entry: its folder and its ``meta.json``."""

    path: Path
    meta: dict

    def tokens(self) -> np.ndarray:
        """The stream, memory-mapped (read-only)."""
        n = self.meta["n_tokens"]
        dtype = np.dtype(self.meta["dtype"])
        if n == 0:
            return np.empty(0, dtype=dtype)
        return np.memmap(self.path / "tokens.bin", dtype=dtype, mode="r", shape=(n,))

    def counts(self) -> np.ndarray:
        return np.load(self.path / "counts.npy")

    def offsets(self) -> np.ndarray:
        return np.load(self.path / "offsets.npy", mmap_mode="r")


def open_entry(path: Path) -> Entry | None:
    """The entry at ``path`` if it is complete, else None (never a half-written one)."""
    try:
        meta = json.loads((path / META).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    return Entry(path, meta)


class EntryWriter:
    """Write one entry: add tokens document by document, then :meth:`finish` renames it.

    The fingerprint hashes ``definition`` and then every token as stored (``dtype``), streamed.
    With ``copy=False`` the tokens are hashed and counted but not written (a token file that
    is windowed in place).  ``max_tokens`` cuts the stream, in the middle of a document if
    need be.  Use as a context manager: an error removes the temporary folder.
    """

    def __init__(self, path: Path, definition: dict, *, dtype, copy=True, max_tokens=None):
        self.path, self.dtype, self.max_tokens = path, np.dtype(dtype), max_tokens
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(path.parent)
        self.tmp = path.parent / f".tmp-{path.name}-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self.file = open(self.tmp / "tokens.bin", "wb") if copy else None  # noqa: SIM115
        self.digest = hashlib.sha256(json.dumps(definition, sort_keys=True).encode())
        self.definition = definition
        self.ends: list[np.ndarray] = []  # where documents end, in stream positions
        self.n_tokens = 0
        self.counts = np.zeros(0, dtype=np.int64)

    def __enter__(self) -> EntryWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self.file is not None:
            self.file.close()
        shutil.rmtree(self.tmp, ignore_errors=True)  # after finish(), the folder is renamed

    @property
    def full(self) -> bool:
        return self.max_tokens is not None and self.n_tokens >= self.max_tokens

    def add(self, tokens: np.ndarray, *, document_end: bool = True) -> None:
        """Append ``tokens`` (up to ``max_tokens``); ``document_end`` closes a document."""
        if self.max_tokens is not None:
            tokens = tokens[: self.max_tokens - self.n_tokens]
        stored = np.ascontiguousarray(tokens, dtype=self.dtype)
        self.digest.update(stored.tobytes())
        if self.file is not None:
            self.file.write(stored.tobytes())
        counts = np.bincount(stored, minlength=len(self.counts))
        counts[: len(self.counts)] += self.counts
        self.counts, self.n_tokens = counts, self.n_tokens + len(stored)
        if document_end:
            self.ends.append(np.array([self.n_tokens], dtype=np.int64))

    def end_documents(self, ends: np.ndarray) -> None:
        """Record document ends (stream positions) of tokens added without ``document_end``."""
        self.ends.append(np.minimum(np.asarray(ends, dtype=np.int64), self.n_tokens))

    def finish(self, **facts) -> Entry:
        """Write the offsets, counts and meta and rename the entry into place."""
        # the last document ends with the stream (cut by max_tokens, perhaps)
        ends = np.concatenate([[0], *self.ends, [self.n_tokens]]).astype(np.int64)
        offsets = np.unique(ends)
        np.save(self.tmp / "offsets.npy", offsets)
        np.save(self.tmp / "counts.npy", self.counts)
        meta = {
            "n_tokens": self.n_tokens,
            "n_documents": len(offsets) - 1,
            "dtype": self.dtype.name,
            "fingerprint": self.digest.hexdigest(),
            "definition": self.definition,
        } | facts
        (self.tmp / META).write_text(json.dumps(meta, indent=1))
        if self.file is not None:
            self.file.close()
            self.file = None
        try:
            os.rename(self.tmp, self.path)
        except OSError:  # another process completed the same entry first: theirs is as good
            if open_entry(self.path) is None:  # or a folder that is no entry is in the way
                shutil.rmtree(self.path)
                os.rename(self.tmp, self.path)
        return Entry(self.path, json.loads((self.path / META).read_text()))


def _remove_abandoned(folder: Path) -> None:
    """Remove temporary entries of processes of this host that no longer run."""
    host = socket.gethostname()
    for tmp in folder.glob(".tmp-*"):
        owner, _, pid = tmp.name.rpartition("-")
        if owner.endswith(f"-{host}") and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
