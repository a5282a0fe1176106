"""Token streams of text and token files, through the token cache.

Text: the tokenizer is resolved (``bytes``; ``bpe``, trained on the corpus documents once and
cached; or a ``tokenizer.json``), then the documents are encoded in batches and written into
a cache entry with EOS after each document.  Token files: one file is windowed in place (its
tokens are hashed once, the digest cached under the file's path, size and mtime); several are
copied into one entry.  Either way, reopening costs a listing and a ``stat`` of the sources.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from observatory.data.cache import (
    Entry,
    EntryWriter,
    cache_root,
    file_stats,
    key_of,
    open_entry,
    token_dtype,
)
from observatory.data.formats import (
    Document,
    ReadStats,
    TokenFile,
    text_documents,
    text_source_files,
    token_files,
)
from observatory.data.tokenizer import (
    CONVENTIONS,
    TextTokenizer,
    load_tokenizer,
    train_bpe,
)
from observatory.errors import DataError, SpecError
from observatory.models import BOS_TOKEN
from observatory.spec import DataSpec, RunSpec, _expand

EOS = BOS_TOKEN
ENCODE_BATCH_CHARS = 1 << 22  # documents encoded together (the tokenizer uses every core)
TOKEN_CHUNK = 1 << 22  # tokens of a token file hashed at a time


@dataclass(frozen=True)
class Stream:
    """A corpus's token stream, its cache entry and what the store records about it."""

    tokens: np.ndarray
    entry: Entry
    record: dict
    origin: str  # the corpus, for messages
    fresh: bool  # tokenized (or hashed) just now, not found in the cache


def text_stream(
    spec: DataSpec, *, vocab_size: int, tokenizer: TextTokenizer | None, progress: bool
) -> Stream:
    """The token stream of a text corpus, tokenized into the cache unless it is there."""
    files = text_source_files(spec.corpus_paths(), glob=spec.glob, exclude=spec.exclude)
    origin = ", ".join(spec.paths)
    source = {
        "field": spec.field,
        "glob": spec.glob,
        "exclude": list(spec.exclude),
        "errors": spec.errors,
        "files": file_stats(files),
    }
    tokenizer = tokenizer or _text_tokenizer(spec, vocab_size, source, progress)
    if tokenizer.vocab_size > vocab_size:
        raise DataError(
            f"{spec.tokenizer_name}: the tokenizer has {tokenizer.vocab_size} tokens, more than "
            f"model.vocab_size = {vocab_size}"
        )
    definition = {
        "tokenizer": hashlib.sha256((tokenizer.json or "bytes").encode()).hexdigest(),
        "max_tokens": spec.max_tokens,
    } | {key: source[key] for key in ("field", "glob", "exclude", "errors")}
    path = cache_root(spec.cache) / "tokens" / key_of(definition, source["files"])
    stats = source["files"]
    cached = open_entry(path)
    entry = cached or _tokenize(spec, tokenizer, definition, path, stats, progress)
    record = {
        "source": "text",
        "tokenizer_kind": tokenizer.kind,
        "tokenizer": tokenizer.json,
        **CONVENTIONS,
        **_stream_facts(entry),
        "replaced_bytes": entry.meta["replaced_bytes"],
    }
    return Stream(entry.tokens(), entry, record, origin, fresh=cached is None)


def _text_tokenizer(spec: DataSpec, vocab_size: int, source: dict, progress: bool):
    """The tokenizer ``spec`` names; a BPE is trained once per corpus and vocabulary size."""
    name = spec.tokenizer_name
    if name == "bytes":
        return TextTokenizer("bytes")
    if name != "bpe":
        return load_tokenizer(_expand(name))
    path = cache_root(spec.cache) / "bpe" / key_of(vocab_size, source) / "tokenizer.json"
    if path.is_file():
        return TextTokenizer("bpe", path.read_text())
    documents = _documents(spec, progress, desc="train BPE")
    tokenizer = train_bpe((doc.text for doc in documents), vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    partial.write_text(tokenizer.json)
    os.replace(partial, path)  # atomic: a tokenizer file is complete or absent
    return tokenizer


def _documents(
    spec: DataSpec, progress: bool, desc: str, stats: ReadStats | None = None
) -> Iterator[Document]:
    """The corpus documents, with a progress bar over their UTF-8 bytes."""
    files = text_source_files(spec.corpus_paths(), glob=spec.glob, exclude=spec.exclude)
    total = sum(f.stat().st_size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
        for document in text_documents(
            spec.corpus_paths(),
            field=spec.field,
            glob=spec.glob,
            exclude=spec.exclude,
            errors=spec.errors,
            stats=stats,
        ):
            yield document
            bar.update(len(document.text.encode("utf-8")))


def _tokenize(spec, tokenizer, definition, path, stats, progress) -> Entry:
    """Encode the documents in batches into a new cache entry, EOS after each document."""
    start, text_bytes, read = time.perf_counter(), 0, ReadStats()
    dtype = token_dtype(tokenizer.vocab_size)
    with EntryWriter(path, definition, dtype=dtype, max_tokens=spec.max_tokens) as writer:
        for texts in _batches(_documents(spec, progress, desc="tokenize", stats=read)):
            for ids in tokenizer.encode(texts):
                writer.add(np.append(ids, EOS))
                if writer.full:
                    break
            text_bytes += sum(len(text.encode("utf-8")) for text in texts)
            if writer.full:
                break
        # the entry is named by the stats before: it must hold what they describe
        changed = [new for old, new in zip(stats, _restat(stats), strict=True) if old != new]
        if changed:
            raise DataError(f"{changed[0][0]}: changed while it was tokenized; tokenize again")
        return writer.finish(
            sources=stats,
            text_bytes=text_bytes,
            seconds=time.perf_counter() - start,
            replaced_bytes=read.replaced_bytes,
        )


def _restat(stats: list[list]) -> list[list]:
    return file_stats([Path(path) for path, _, _ in stats])


def _batches(documents: Iterable[Document]) -> Iterator[list[str]]:
    """Texts in batches of about ``ENCODE_BATCH_CHARS`` characters."""
    batch, size = [], 0
    for document in documents:
        batch.append(document.text)
        size += len(document.text)
        if size >= ENCODE_BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _stream_facts(entry: Entry) -> dict:
    meta = entry.meta
    return {
        "n_tokens": meta["n_tokens"],
        "n_documents": meta["n_documents"],
        "stream_fingerprint": meta["fingerprint"][:16],
    }


def token_stream(
    spec: DataSpec, *, vocab_size: int, tokenizer: TextTokenizer | None, progress: bool
) -> Stream:
    """The token stream of token files: one windowed in place, several copied into the cache."""
    files = token_files(spec.corpus_paths(), dtype=spec.dtype)
    if tokenizer is None and spec.tokenizer is not None:
        named = spec.tokenizer
        tokenizer = TextTokenizer("bytes") if named == "bytes" else load_tokenizer(_expand(named))
    if tokenizer is not None:
        _check_tokenizer_fits(tokenizer, files, vocab_size, spec.tokenizer or "stored tokenizer")
    stats = file_stats(_token_sources(files))
    dtype = np.result_type(*(tf.tokens.dtype for tf in files))
    definition = {
        "source": "tokens",
        "tokenizer": tokenizer and hashlib.sha256((tokenizer.json or "bytes").encode()).hexdigest(),
        "max_tokens": spec.max_tokens,
    }
    path = cache_root(spec.cache) / "tokens" / key_of(definition, stats, dtype.name)
    cached = open_entry(path)
    entry = cached or _hash_token_files(files, path, definition, dtype, spec, progress)
    _check_ids(entry, files, vocab_size)
    copied = len(files) > 1
    tokens = entry.tokens() if copied else files[0].tokens[: entry.meta["n_tokens"]]
    record = {
        "source": "tokens",
        "tokenizer_kind": tokenizer and tokenizer.kind,
        "tokenizer": tokenizer and tokenizer.json,
        **CONVENTIONS,
        **_stream_facts(entry),
    }
    origin = files[0].origin if not copied else ", ".join(spec.paths)
    return Stream(tokens, entry, record, origin, fresh=cached is None)


def _check_tokenizer_fits(tokenizer, files: list[TokenFile], vocab_size: int, name: str) -> None:
    if tokenizer.vocab_size > vocab_size:
        raise DataError(
            f"{name}: the tokenizer has {tokenizer.vocab_size} tokens, more than "
            f"model.vocab_size = {vocab_size}"
        )
    for tf in files:
        capacity = int(np.iinfo(tf.tokens.dtype).max) + 1
        if tokenizer.vocab_size > capacity:
            raise DataError(
                f"{tf.origin}: dtype {tf.tokens.dtype} holds ids below {capacity}, but the "
                f"tokenizer has {tokenizer.vocab_size} tokens"
            )


def _hash_token_files(files, path, definition, dtype, spec: DataSpec, progress) -> Entry:
    """Hash and count the tokens of ``files`` in chunks (copying them if there are several)."""
    total = sum(len(tf.tokens) for tf in files)
    copy = len(files) > 1
    with (
        EntryWriter(path, definition, dtype=dtype, copy=copy, max_tokens=spec.max_tokens) as out,
        tqdm(total=total, unit="tok", unit_scale=True, desc="hash", disable=not progress) as bar,
    ):
        for tf in files:
            base = out.n_tokens
            for start, chunk in _chunks(tf):
                if len(chunk) and chunk.min() < 0:
                    where = start + int(np.argmax(chunk < 0))
                    raise DataError(f"{tf.origin}: negative token id at position {where}")
                out.add(chunk, document_end=False)
                bar.update(len(chunk))
                if out.full:
                    break
            out.end_documents(base + np.asarray(tf.doc_offsets[1:], dtype=np.int64))
            if out.full:
                break
        return out.finish(sources=file_stats(_token_sources(files)))


def _token_sources(files: list[TokenFile]) -> list[Path]:
    """The files behind token files: a Megatron dataset is its ``.bin`` and ``.idx``."""
    paths = []
    for tf in files:
        origin = Path(tf.origin)
        stem = origin.with_suffix("") if origin.suffix in (".bin", ".idx") else origin
        megatron = [stem.with_name(stem.name + ext) for ext in (".bin", ".idx")]
        paths.extend(megatron if all(p.is_file() for p in megatron) else [origin])
    return paths


def _chunks(tf: TokenFile) -> Iterator[tuple[int, np.ndarray]]:
    """``(position, tokens)`` of a token file in chunks, read from the file when it is one:
    pages read through a memory map would count in this process's memory until unmapped."""
    tokens = tf.tokens
    if not isinstance(tokens, np.memmap) or tokens.filename is None:
        for start in range(0, len(tokens), TOKEN_CHUNK):
            yield start, np.asarray(tokens[start : start + TOKEN_CHUNK])
        return
    with open(tokens.filename, "rb") as file:
        file.seek(tokens.offset)
        for start in range(0, len(tokens), TOKEN_CHUNK):
            count = min(TOKEN_CHUNK, len(tokens) - start)
            yield start, np.fromfile(file, dtype=tokens.dtype, count=count)


def _check_ids(entry: Entry, files: list[TokenFile], vocab_size: int) -> None:
    """Refuse token ids >= the vocabulary, naming the file, position and document."""
    if len(entry.counts()) <= vocab_size:
        return
    for tf in files:  # only on the error path: find where the first such id is
        for start, chunk in _chunks(tf):
            if (chunk >= vocab_size).any():
                where = start + int(np.argmax(chunk >= vocab_size))
                document = int(np.searchsorted(tf.doc_offsets, where, side="right")) - 1
                raise DataError(
                    f"{tf.origin}: token id {int(tf.tokens[where])} at position {where} "
                    f"(document {document}) is >= model.vocab_size = {vocab_size}"
                )


def tokenize(spec: RunSpec, *, progress: bool = True) -> Stream:
    """Tokenize a run spec's corpus into the token cache (training its BPE first if need be).

    Returns
    -------
    Stream
        The stream and its cache entry (``entry.path``; ``entry.meta`` has ``n_tokens``,
        ``n_documents``, and for text ``text_bytes`` and ``seconds`` of the tokenization).

    Raises
    ------
    SpecError
        If the spec's corpus is synthetic (there is nothing to tokenize).
    DataError
        One line naming the file, if the corpus cannot be read.
    """
    data, vocab_size = spec.data, spec.model.vocab_size
    if data.source == "induction":
        raise SpecError("data.source: 'induction' is generated, there is nothing to tokenize")
    make = text_stream if data.source == "text" else token_stream
    return make(data, vocab_size=vocab_size, tokenizer=None, progress=progress)
