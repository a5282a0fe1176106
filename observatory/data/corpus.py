"""Corpora: a token stream cut into ``context``-token windows, read by O(1) random access.

Packing rule.  Text: each document's tokens followed by EOS (token 0), document after
document in the order of the source files (folders sorted by path), cut at ``max_tokens``.
Token files: their tokens as they are (their own EOS tokens, if any, stay), file after file.
With ``bos = true`` (the default) window ``i`` is BOS (token 0) and then the stream's tokens
``i * (context - 1)`` to ``(i + 1) * (context - 1) - 1``; with ``bos = false`` it is the tokens
``i * context`` to ``(i + 1) * context - 1``.  The tail that fills no window is dropped.  The
synthetic induction corpus is a stream of whole sequences (each begins with BOS) cut with
stride ``context``.  Text and token files stay on disk, memory-mapped (see
:mod:`observatory.data.cache`): a batch reads its windows only.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch

from observatory.data.order import DATA_ORDER_RULE
from observatory.data.synthetic import induction_corpus, induction_definition
from observatory.errors import DataError, StoreError
from observatory.models import BOS_TOKEN
from observatory.spec import DataSpec

if TYPE_CHECKING:
    from observatory.data.tokenizer import TextTokenizer
    from observatory.store import FamilyStore


@dataclass(frozen=True, eq=False)
class Corpus:
    """A token stream cut into windows of ``context`` tokens (see the packing rule above).

    ``len(corpus)`` is the number of windows; ``batch_indices`` index them.
    """

    stream: np.ndarray  # 1-D tokens, memory-mapped for text and token files
    context: int
    bos: bool  # each window starts with BOS, then context - 1 stream tokens
    fingerprint: str
    counts: np.ndarray  # occurrences of each token id in the stream
    record: dict = field(default_factory=dict)  # what the store records about the corpus

    @property
    def _stride(self) -> int:
        return self.context - self.bos

    def __len__(self) -> int:
        return len(self.stream) // self._stride

    def windows(self, indices: np.ndarray) -> np.ndarray:
        """The windows at ``indices``: ``tokens[len(indices), context]`` (int64)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        stream = self.stream
        if isinstance(stream, np.memmap) and stream.filename is not None:
            tokens = _read_windows(stream, indices, self._stride).astype(np.int64)
        else:
            positions = indices[:, None] * self._stride + np.arange(self._stride)
            tokens = np.asarray(stream[positions], dtype=np.int64)  # one gather, no loop
        if not self.bos:
            return tokens
        bos = np.full((len(indices), 1), BOS_TOKEN, dtype=np.int64)
        return np.concatenate([bos, tokens], axis=1)

    def batch(self, indices: np.ndarray) -> torch.Tensor:
        """The token batch ``[batch, context]`` (int64) made of the windows at ``indices``."""
        return torch.from_numpy(self.windows(indices))

    def token_counts(self, vocab_size: int) -> np.ndarray:
        """``counts[vocab_size]``: occurrences of each token id in the corpus's stream."""
        counts = np.zeros(max(vocab_size, len(self.counts)), dtype=np.int64)
        counts[: len(self.counts)] = self.counts
        return counts[:vocab_size]

    def __reduce__(self):
        # A memory-mapped stream travels as its file (to dask workers), not as its tokens.
        stream = self.stream
        if isinstance(stream, np.memmap) and stream.filename is not None:
            where = (stream.filename, stream.dtype.str, stream.offset, len(stream))
            return (
                _reopened,
                (where, self.context, self.bos, self.fingerprint, self.counts, self.record),
            )
        return (
            Corpus,
            (stream, self.context, self.bos, self.fingerprint, self.counts, self.record),
        )


def _read_windows(stream: np.memmap, indices: np.ndarray, stride: int) -> np.ndarray:
    """``stream[i * stride : (i + 1) * stride]`` for each ``i`` in ``indices``, read from the
    file: a page fault on a memory map maps a whole (large) folio of the page cache into the
    process, so windows gathered through the map would make training's memory grow with the
    part of the corpus visited; read, the pages stay in the page cache alone."""
    out = np.empty((len(indices), stride), dtype=stream.dtype)
    row_bytes = stride * stream.dtype.itemsize
    fd = os.open(stream.filename, os.O_RDONLY)
    try:
        for row, index in zip(out, indices.tolist(), strict=True):
            if os.preadv(fd, [row], stream.offset + index * row_bytes) != row_bytes:
                raise DataError(f"{stream.filename}: window {index} is past the end of the file")
    finally:
        os.close(fd)
    return out


def _reopened(where, *fields) -> Corpus:
    filename, dtype, offset, length = where
    stream = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=(length,))
    return Corpus(stream, *fields)


def build_corpus(
    spec: DataSpec,
    *,
    context: int,
    vocab_size: int,
    tokenizer: TextTokenizer | None = None,
    progress: bool = False,
) -> Corpus:
    """Build the corpus that ``spec`` describes, with its fingerprint.

    Text is tokenized into the token cache unless it is there already; token files are
    hashed once (the digest is cached).

    Parameters
    ----------
    spec
        The ``[data]`` table of a run spec.
    context
        Tokens per window.
    vocab_size
        Size of the model vocabulary.
    tokenizer
        Use this tokenizer (a stored one) instead of the one ``spec`` names.
    progress
        Show progress bars while training a BPE and tokenizing.

    Returns
    -------
    Corpus
        The windows, and a fingerprint hashing the tokenizer, the definition, every token and
        the packing.

    Raises
    ------
    DataError
        One line naming the file, if the corpus cannot be read or has no window.
    """
    from observatory.data.sources import text_stream, token_stream

    if spec.source == "induction":
        tokens = induction_corpus(spec, context=context, vocab_size=vocab_size)
        digest = hashlib.sha256(json.dumps(induction_definition(spec, context)).encode())
        digest.update(tokens.tobytes())
        counts = np.bincount(tokens.ravel(), minlength=vocab_size)
        record = {"source": "induction"}
        return Corpus(tokens.reshape(-1), context, False, digest.hexdigest()[:16], counts, record)
    make = text_stream if spec.source == "text" else token_stream
    stream = make(spec, vocab_size=vocab_size, tokenizer=tokenizer, progress=progress)
    packing = {"stream": stream.entry.meta["fingerprint"], "context": context, "bos": spec.bos}
    corpus = Corpus(
        stream=stream.tokens,
        context=context,
        bos=spec.bos,
        fingerprint=hashlib.sha256(json.dumps(packing).encode()).hexdigest()[:16],
        counts=stream.entry.counts(),
        record=stream.record | {"bos": spec.bos},
    )
    if len(corpus) == 0:
        raise DataError(
            f"{stream.origin}: the corpus has {len(corpus.stream)} tokens, fewer than one "
            f"window of {context}"
        )
    return corpus


def data_record(corpus: Corpus, context: int) -> dict:
    """The corpus facts a family store records (JSON): fingerprint, windows, tokenizer, ..."""
    return corpus.record | {
        "fingerprint": corpus.fingerprint,
        "n_sequences": len(corpus),
        "context": context,
        "order_rule": DATA_ORDER_RULE,
    }


def stored_corpus(family: FamilyStore) -> Corpus:
    """The corpus a store was trained on, rebuilt (via the token cache) and fingerprint-checked.

    Text is tokenized with the tokenizer the store recorded, not the one the spec names.

    Raises
    ------
    StoreError
        If the rebuilt corpus differs from the one the store was trained on.
    """
    from observatory.data.tokenizer import TextTokenizer

    spec, record = family.spec, family.attrs["data"]
    kind = record.get("tokenizer_kind")
    tokenizer = None if kind is None else TextTokenizer(kind, record.get("tokenizer"))
    corpus = _cached_corpus(spec.data, spec.train.context, spec.model.vocab_size, tokenizer)
    stored = record["fingerprint"]
    if corpus.fingerprint != stored:
        raise StoreError(
            f"{family.path}: the corpus rebuilt from the stored spec has fingerprint "
            f"{corpus.fingerprint}, but the store was trained on {stored} (changed corpus files?)"
        )
    return corpus


def recorded_corpus(family: FamilyStore) -> Corpus | None:
    """:func:`stored_corpus` where the store records the corpus it was trained on; None where
    it records none (ingested checkpoints): then only the spec says what the corpus was."""
    if family.attrs["data"].get("fingerprint") is None:
        return None
    return stored_corpus(family)


@lru_cache(maxsize=2)
def _cached_corpus(
    data: DataSpec, context: int, vocab_size: int, tokenizer: TextTokenizer | None
) -> Corpus:
    return build_corpus(data, context=context, vocab_size=vocab_size, tokenizer=tokenizer)
