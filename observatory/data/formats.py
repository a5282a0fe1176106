"""PLACEHOLDER for the corpus formats (the real module, written in parallel, replaces this file).

Only plain text files and folders, ``.npy`` and flat ``.bin`` token files, with the
interface the rest of :mod:`observatory.data` is written against.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from observatory.errors import DataError


@dataclass(frozen=True)
class Document:
    """One document's text and where it comes from (a file, and a line or row)."""

    text: str
    origin: str


def text_documents(
    paths: Sequence[Path], *, field: str = "text", glob: str = "*", errors: str = "strict"
) -> Iterator[Document]:
    """The documents of ``paths`` in a stable order: files as given, folders searched by glob."""
    del field  # plain text files have no fields
    for entry in paths:
        files = sorted(entry.rglob(glob)) if entry.is_dir() else [entry]
        for file in (f for f in files if f.is_file()):
            data = file.read_bytes()
            try:
                text = data.decode("utf-8", errors=errors)
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{file}: not UTF-8 text ({err.reason} at byte {err.start}); "
                    "set data.errors = 'replace' to replace undecodable bytes"
                ) from None
            yield Document(text=text, origin=str(file))


@dataclass(frozen=True)
class TokenFile:
    """A token file's tokens (1-D, memory-mapped, the file's dtype) and document offsets."""

    tokens: np.ndarray
    doc_offsets: np.ndarray
    origin: str


def token_files(paths: Sequence[Path], *, dtype: str | None = None) -> list[TokenFile]:
    """Memory-map each ``.npy`` or flat ``.bin`` token file (one document per file)."""
    out = []
    for path in paths:
        if path.suffix == ".npy":
            tokens = np.load(path, mmap_mode="r")
        elif dtype is None:
            raise DataError(f"{path}: a flat token file needs data.dtype")
        else:
            tokens = np.memmap(path, dtype=dtype, mode="r")
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise DataError(
                f"{path}: expected 1-D integer tokens, got {tokens.dtype}{tokens.shape}"
            )
        offsets = np.array([0, len(tokens)], dtype=np.int64)
        out.append(TokenFile(tokens=tokens, doc_offsets=offsets, origin=str(path)))
    return out


def max_token(tf: TokenFile) -> int:
    """The largest token id of a token file, read in chunks."""
    step = 1 << 24
    return max(
        (int(tf.tokens[i : i + step].max()) for i in range(0, len(tf.tokens), step)), default=-1
    )
