"""Training corpora and data order.

A corpus is a fixed array of token sequences ``[n_sequences, context]``, each starting with BOS.
The data order is a pure function of (data seed, epoch, dataset size): epoch ``e`` visits the
corpus in the order ``numpy.random.default_rng([data_seed, e]).permutation(n_sequences)``, so
the sample indices of any step can be recomputed, and the trainer also records them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from observatory.errors import SpecError, StoreError
from observatory.models import BOS_TOKEN
from observatory.spec import DataSpec

if TYPE_CHECKING:
    from observatory.store import FamilyStore

DATA_ORDER_RULE = "epoch e visits numpy.random.default_rng([data_seed, e]).permutation(n_sequences)"


@dataclass(frozen=True)
class Corpus:
    """Token sequences ``tokens[n_sequences, context]`` (int64) and their content fingerprint."""

    tokens: np.ndarray
    fingerprint: str

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def batch(self, indices: np.ndarray) -> torch.Tensor:
        """The token batch ``[batch, context]`` made of the sequences at ``indices``."""
        return torch.from_numpy(self.tokens[indices])


def _fingerprint(definition: dict, tokens: np.ndarray) -> str:
    digest = hashlib.sha256(json.dumps(definition, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(tokens).tobytes())
    return digest.hexdigest()[:16]


def _bigram_chain(rng: np.random.Generator, vocab_size: int, length: int) -> np.ndarray:
    """A sparse Markov-bigram background: each token has 4 likely successors."""
    successors = rng.integers(1, vocab_size, size=(vocab_size, 4))
    out = np.empty(length, dtype=np.int64)
    out[0] = rng.integers(1, vocab_size)
    choices = rng.integers(0, 4, size=length)
    for i in range(1, length):
        out[i] = successors[out[i - 1], choices[i]]
    return out


def induction_corpus(spec: DataSpec, *, context: int, vocab_size: int) -> np.ndarray:
    """Sequences that repeat a random block whose length is drawn per sequence.

    Only in-context copying predicts the repeats; a varying period stops the model from
    copying by absolute position. A ``bigram_fraction`` of the sequences is a Markov-bigram
    background instead.

    Returns
    -------
    numpy.ndarray
        ``tokens[n_sequences, context]``: BOS, then tokens from ``1 .. vocab_size - 1``.
    """
    rng = np.random.default_rng(spec.seed)
    tokens = np.empty((spec.n_sequences, context), dtype=np.int64)
    tokens[:, 0] = BOS_TOKEN
    periods = rng.integers(spec.period_min, spec.period_max + 1, size=spec.n_sequences)
    background = rng.random(spec.n_sequences) < spec.bigram_fraction
    for i, period in enumerate(periods):
        if background[i]:
            tokens[i, 1:] = _bigram_chain(rng, vocab_size, context - 1)
        else:
            block = rng.integers(1, vocab_size, size=period)
            tokens[i, 1:] = np.resize(block, context - 1)
    return tokens


def text_files(spec: DataSpec) -> list[Path]:
    """The corpus files, in a stable order: files as given, directories searched by ``glob``."""
    files: list[Path] = []
    for entry in spec.corpus_paths():
        if not entry.exists():
            raise SpecError(f"data.paths: corpus path {str(entry)!r} does not exist")
        files.extend(sorted(entry.rglob(spec.glob)) if entry.is_dir() else [entry])
    return [f for f in files if f.is_file()]


def text_corpus(spec: DataSpec, *, context: int) -> np.ndarray:
    """Byte-level sequences cut from the concatenated files: BOS + ``context - 1`` bytes each."""
    chunks, total = [], 0
    for path in text_files(spec):
        data = path.read_bytes()[: spec.max_bytes - total]
        chunks.append(data)
        total += len(data)
        if total >= spec.max_bytes:
            break
    data = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    n_sequences = len(data) // (context - 1)
    if n_sequences == 0:
        raise SpecError(f"data.paths: the text corpus has {len(data)} bytes, fewer than a context")
    tokens = np.empty((n_sequences, context), dtype=np.int64)
    tokens[:, 0] = BOS_TOKEN
    tokens[:, 1:] = data[: n_sequences * (context - 1)].reshape(n_sequences, context - 1)
    return tokens


def build_corpus(spec: DataSpec, *, context: int, vocab_size: int) -> Corpus:
    """Build the corpus that ``spec`` describes, with its fingerprint.

    Parameters
    ----------
    spec
        The ``[data]`` table of a run spec.
    context
        Tokens per sequence.
    vocab_size
        Size of the model vocabulary.

    Returns
    -------
    Corpus
        The sequences and a fingerprint hashing the definition and every token.
    """
    if spec.source == "induction":
        tokens = induction_corpus(spec, context=context, vocab_size=vocab_size)
    else:
        tokens = text_corpus(spec, context=context)
    definition = {"spec": spec.__dict__ | {"paths": list(spec.paths)}, "context": context}
    return Corpus(tokens=tokens, fingerprint=_fingerprint(definition, tokens))


def stored_corpus(family: FamilyStore) -> Corpus:
    """The corpus a store was trained on, rebuilt from its spec (cached) and fingerprint-checked.

    Raises
    ------
    StoreError
        If the rebuilt corpus differs from the one the store was trained on.
    """
    spec = family.spec
    corpus = _cached_corpus(spec.data, spec.train.context, spec.model.vocab_size)
    stored = family.attrs["data"]["fingerprint"]
    if corpus.fingerprint != stored:
        raise StoreError(
            f"{family.path}: the corpus rebuilt from the stored spec has fingerprint "
            f"{corpus.fingerprint}, but the store was trained on {stored} (changed corpus files?)"
        )
    return corpus


@lru_cache(maxsize=2)
def _cached_corpus(data: DataSpec, context: int, vocab_size: int) -> Corpus:
    return build_corpus(data, context=context, vocab_size=vocab_size)


@lru_cache(maxsize=4)
def _epoch_order(data_seed: int, epoch: int, dataset_size: int) -> np.ndarray:
    return np.random.default_rng([data_seed, epoch]).permutation(dataset_size)


def batch_indices(*, data_seed: int, step: int, batch_size: int, dataset_size: int) -> np.ndarray:
    """Corpus indices of the sequences in the batch of ``step`` (a pure function).

    Parameters
    ----------
    data_seed
        The run's data-order seed.
    step
        Training step (0-based).
    batch_size
        Sequences per step.
    dataset_size
        Number of sequences in the corpus.

    Returns
    -------
    numpy.ndarray
        ``indices[batch]`` (int64).
    """
    # Slices of consecutive epoch orders: called every training step, so no masks or unique.
    parts, remaining = [], batch_size
    epoch, offset = divmod(step * batch_size, dataset_size)
    while remaining:
        part = _epoch_order(data_seed, epoch, dataset_size)[offset : offset + remaining]
        parts.append(part)
        remaining -= len(part)
        epoch, offset = epoch + 1, 0
    return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)


def data_order_fingerprint(*, data_seed: int, dataset_size: int) -> str:
    """Hash of the rule and of the first epoch's order, to detect a changed data order."""
    digest = hashlib.sha256(f"{DATA_ORDER_RULE}|{data_seed}|{dataset_size}".encode())
    digest.update(_epoch_order(data_seed, 0, dataset_size).tobytes())
    return digest.hexdigest()[:16]
