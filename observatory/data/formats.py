"""Readers of corpus files: text documents and pre-tokenized token documents.

Text (``text_documents``) is streamed one document at a time, in a stable order, from

- plain text files (any suffix not named below): one file is one document;
- folders: the files matching ``glob`` anywhere below, sorted by their relative path (``/``
  separated), each read by its own suffix; hidden files and folders (``.git``) are skipped;
- ``.jsonl``: one JSON object per line with the text in ``field`` (or a bare JSON string);
  blank lines are skipped; a document's origin is ``path:LINE`` (1-based);
- ``.json``: an array of objects with ``field``, or of strings, parsed whole (keep big corpora
  in ``.jsonl`` or Parquet); origin ``path[ROW]`` (0-based);
- ``.parquet``: column ``field`` (string or binary), streamed batch by batch;
- a folder written by ``datasets.Dataset.save_to_disk`` (it holds ``state.json`` and
  ``dataset_info.json``): its Arrow stream files in the order ``state.json`` lists them,
  memory-mapped, column ``field``; origin ``folder[ROW]`` counts rows over all its files.

Empty documents are skipped (they would add nothing but a separator) and counted in
``ReadStats.empty``. Text is decoded as UTF-8 from the file's bytes, so line endings are kept
exactly. Invalid UTF-8 is an error naming the file, line and byte offset (``errors="strict"``) or
is replaced by U+FFFD, one per invalid sequence as ``bytes.decode(errors="replace")`` does, with
the number of replaced bytes counted in ``ReadStats.replaced_bytes`` (``errors="replace"``).

Token files (``token_files``) are memory-mapped, never read whole:

- a flat binary file (nanoGPT's ``train.bin``; any suffix but ``.npy``, and a ``.bin`` only
  without an ``.idx`` beside it): ``dtype`` is required; the whole file is one document;
- ``.npy``: integer, 1-D (one document) or C-ordered 2-D ``[n, L]`` (``n`` documents);
- the Megatron indexed dataset (Megatron-LM, GPT-NeoX, Pythia's Pile), given as its path prefix
  ``P`` or as ``P.bin`` / ``P.idx``. The little-endian ``.idx`` is: magic ``MMIDIDX\\0\\0``,
  version ``uint64`` = 1, dtype code ``uint8`` (``MEGATRON_DTYPES``), sequence count ``S`` and
  document-index count ``D`` (``uint64`` each), then sequence lengths ``int32[S]``, sequence byte
  offsets into ``.bin`` ``int64[S]``, and the document index ``int64[D]``: the sequence at which
  each document starts, from 0 up to a final ``S``. A document is its sequences concatenated
  (GPT-NeoX/Pythia write one sequence per document; Megatron's sentence splitting writes
  several); the sequences must lie back to back in ``.bin``, as every builder writes them. A
  trailing per-sequence mode byte (Megatron's multimodal datasets) is allowed and ignored.

Every problem is a one-line ``DataError`` naming the file, and the line or row where there is
one. pyarrow (the optional extra ``text``) is imported only when a Parquet or Arrow file is
read.
"""

from __future__ import annotations

import codecs
import json
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np

from observatory.errors import DataError

Errors = Literal["strict", "replace"]

# Megatron's dtype codes, as Megatron-LM's ``DType`` enum numbers them (GPT-NeoX's older copy
# agrees on 1-6 and 8; its code 7 is float64). Floats are listed only to be named in errors.
MEGATRON_DTYPES = {
    1: np.dtype("u1"),
    2: np.dtype("i1"),
    3: np.dtype("<i2"),
    4: np.dtype("<i4"),
    5: np.dtype("<i8"),
    6: np.dtype("<f8"),
    7: np.dtype("<f4"),
    8: np.dtype("<u2"),
}
MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
_OLD_MAGIC = b"TNTIDX\x00\x00"  # the pre-mmap fairseq/Megatron index, a different layout
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence and index counts
# Index arrays are checked this many entries at a time, so that checking the index of a corpus
# with a hundred million documents does not allocate gigabytes.
_CHUNK = 1 << 20
_BATCH_ROWS = 1024  # Parquet/Arrow rows converted to Python strings at a time
_REPLACE_HINT = "(invalid bytes can be replaced by U+FFFD instead: data.errors = 'replace')"


@dataclass(frozen=True)
class Document:
    """One text document and where it came from: ``path``, ``path:LINE`` or ``path[ROW]``."""

    text: str
    origin: str


@dataclass
class ReadStats:
    """What a read of ``text_documents`` met, counted while it streams (hence mutable).

    Attributes
    ----------
    documents : int
        Non-empty documents yielded.
    empty : int
        Empty documents skipped.
    replaced_bytes : int
        Invalid UTF-8 bytes replaced by U+FFFD (only with ``errors="replace"``).
    """

    documents: int = 0
    empty: int = 0
    replaced_bytes: int = 0


@dataclass(frozen=True, eq=False)
class TokenFile:
    """The token documents of one token file.

    Attributes
    ----------
    tokens : numpy.ndarray
        1-D, in the file's own dtype, memory-mapped.
    doc_offsets : numpy.ndarray
        int64 ``[n_docs + 1]``: document ``d`` is ``tokens[doc_offsets[d]:doc_offsets[d + 1]]``.
    origin : str
        The file (or Megatron path prefix), for error messages.
    """

    tokens: np.ndarray
    doc_offsets: np.ndarray
    origin: str

    def __len__(self) -> int:
        return len(self.doc_offsets) - 1

    def document(self, d: int) -> np.ndarray:
        """The tokens of document ``d`` (a view into the memory map)."""
        return self.tokens[self.doc_offsets[d] : self.doc_offsets[d + 1]]


# ---------------------------------------------------------------------------------------------
# Text


def text_documents(
    paths: Sequence[Path],
    *,
    field: str = "text",
    glob: str = "*",
    exclude: Sequence[str] = (),
    errors: Errors = "strict",
    stats: ReadStats | None = None,
) -> Iterator[Document]:
    """Stream the non-empty text documents of ``paths``, in a stable order.

    Parameters
    ----------
    paths : sequence of Path
        Files and folders, read in the order given (``~`` is expanded); see the module
        docstring for the formats.
    field : str
        The JSON field or Parquet/Arrow column holding the text.
    glob : str
        The pattern a folder's files must match (searched recursively).
    exclude : sequence of str
        Patterns (``fnmatch``, ``*`` crossing ``/``) of paths relative to a folder to skip,
        e.g. ``"site-packages/*"``.
    errors : {"strict", "replace"}
        Invalid UTF-8: a ``DataError``, or replacement by U+FFFD counted in ``stats``.
    stats : ReadStats, optional
        Counters this read adds to as it goes; read them once the iterator is exhausted.

    Yields
    ------
    Document

    Raises
    ------
    DataError
        A missing path, a folder the glob matches nothing in, a malformed file or row, invalid
        UTF-8 (strict), or no non-empty document at all (raised at the end of the stream).
    """
    if errors not in ("strict", "replace"):
        raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
    stats = ReadStats() if stats is None else stats
    found = empty = 0
    for path in paths:
        for source in _text_sources(Path(path).expanduser(), glob, exclude):
            for document in _read_source(source, field, errors, stats):
                if document.text:
                    found += 1
                    stats.documents += 1
                    yield document
                else:
                    empty += 1
                    stats.empty += 1
    if not found:
        names = ", ".join(str(path) for path in paths) or "no paths"
        why = f"all {empty} documents are empty" if empty else "no documents"
        raise DataError(f"empty corpus: {why} in {names}")


def text_source_files(
    paths: Sequence[Path], *, glob: str = "*", exclude: Sequence[str] = ()
) -> list[Path]:
    """Every file that ``text_documents(paths, glob=glob, exclude=exclude)`` reads, in order.

    A token cache can record their sizes and modification times to notice a changed corpus
    without reading it. A ``save_to_disk`` folder stands for its ``state.json`` and Arrow files.

    Raises
    ------
    DataError
        A missing path, or a folder the glob matches nothing in.
    """
    files = []
    for path in paths:
        for source in _text_sources(Path(path).expanduser(), glob, exclude):
            is_dataset = source.is_dir()
            files += (
                [source / "state.json", *_saved_dataset_files(source)] if is_dataset else [source]
            )
    return files


def _text_sources(path: Path, glob: str, exclude: Sequence[str] = ()) -> list[Path]:
    """The files (and saved-dataset folders) that ``path`` stands for, in reading order."""
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file() or _is_saved_dataset(path):
        return [path]
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(
            f"{path}: a datasets DatasetDict with splits {', '.join(splits)}; "
            f"give one split's folder, e.g. {path / (splits[0] if splits else 'train')}"
        )
    files = [
        file
        for file in path.rglob(glob)
        if file.is_file()
        and not any(p.startswith(".") for p in file.relative_to(path).parts)
        and not any(fnmatch(file.relative_to(path).as_posix(), rule) for rule in exclude)
    ]
    if not files:
        but = f" (excluding {', '.join(exclude)})" if exclude else ""
        raise DataError(f"{path}: no file in this folder matches {glob!r}{but}")
    return sorted(files, key=lambda file: file.relative_to(path).as_posix())


def _is_saved_dataset(path: Path) -> bool:
    return (
        path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _read_source(path: Path, field: str, errors: Errors, stats: ReadStats) -> Iterator[Document]:
    if path.is_dir():
        return _saved_dataset(path, field, errors, stats)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl(path, field, errors, stats)
    if suffix == ".json":
        return _json_array(path, field, errors, stats)
    if suffix == ".parquet":
        return _parquet(path, field, errors, stats)
    return _plain(path, errors, stats)


def _decode(data: bytes, errors: Errors, stats: ReadStats, where: Callable[[int], str]) -> str:
    """``data`` as UTF-8; ``where(offset)`` names the place of an invalid byte in an error.

    With ``errors="replace"`` the result equals ``data.decode("utf-8", "replace")``; the loop
    exists to count the bytes replaced.
    """
    view, parts, start = memoryview(data), [], 0
    while True:
        try:
            parts.append(codecs.utf_8_decode(view[start:], "strict", True)[0])
            return "".join(parts)
        except UnicodeDecodeError as err:
            bad = start + err.start
            if errors == "strict":
                raise DataError(
                    f"{where(bad)}: byte 0x{data[bad]:02x} is not UTF-8 {_REPLACE_HINT}"
                ) from None
            parts.append(codecs.utf_8_decode(view[start:bad], "strict", True)[0] + "\ufffd")
            stats.replaced_bytes += err.end - err.start
            start += err.end


def _plain(path: Path, errors: Errors, stats: ReadStats) -> Iterator[Document]:
    data = path.read_bytes()
    text = _decode(data, errors, stats, partial(_byte_place, path, data))
    yield Document(text, str(path))


def _byte_place(path: Path, data: bytes, offset: int) -> str:
    line = data.count(b"\n", 0, offset) + 1
    return f"{path}:{line}: at byte offset {offset}"


def _offset_place(where: str, base: int, offset: int) -> str:
    return f"{where}: at byte offset {base + offset}"


def _value_place(where: str, field: str, offset: int) -> str:
    return f"{where}: at byte {offset} of field {field!r}"


def _jsonl(path: Path, field: str, errors: Errors, stats: ReadStats) -> Iterator[Document]:
    offset = 0
    with path.open("rb") as file:
        for number, line in enumerate(file, start=1):
            where = f"{path}:{number}"
            text = _decode(line, errors, stats, partial(_offset_place, where, offset))
            offset += len(line)
            if not text.strip():
                continue
            value = _parse_json(text, lambda err, where=where: where)
            yield Document(_text_of(value, field, where), where)


def _parse_json(text: str, where: Callable[[json.JSONDecodeError], str]) -> object:
    """``json.loads``, or a ``DataError`` placed by ``where`` (the file and line)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where(err)}: not valid JSON ({err.msg}, column {err.colno})") from None


def _json_array(path: Path, field: str, errors: Errors, stats: ReadStats) -> Iterator[Document]:
    data = path.read_bytes()
    text = _decode(data, errors, stats, partial(_byte_place, path, data))
    values = _parse_json(text, lambda err: f"{path}:{err.lineno}")
    if not isinstance(values, list):
        raise DataError(
            f"{path}: expected a JSON array of objects or strings, found {_json_type(values)}"
            " (JSON Lines files must end in .jsonl)"
        )
    for row, value in enumerate(values):
        where = f"{path}[{row}]"
        yield Document(_text_of(value, field, where), where)


def _text_of(value: object, field: str, where: str) -> str:
    """The text of one JSON record: the string itself, or the string in ``value[field]``."""
    if isinstance(value, str):
        return value
    if not isinstance(value, dict):
        raise DataError(
            f"{where}: expected an object with field {field!r} or a string, "
            f"found {_json_type(value)}"
        )
    if field not in value:
        keys = [repr(key) for key in value]
        listed = ", ".join(keys[:10]) + (", ..." if len(keys) > 10 else "")
        raise DataError(f"{where}: no field {field!r} (fields: {listed or 'none'})")
    text = value[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} is {_json_type(text)}, not a string")
    return text


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


def _parquet(path: Path, field: str, errors: Errors, stats: ReadStats) -> Iterator[Document]:
    pa = _pyarrow(path)
    try:
        file = pa.parquet.ParquetFile(path)
        _check_text_column(file.schema_arrow, field, str(path), "column")
        yield from _arrow_rows(
            file.iter_batches(batch_size=_BATCH_ROWS, columns=[field]),
            str(path),
            field,
            errors,
            stats,
            first_row=0,
        )
    except pa.ArrowException as err:
        raise DataError(f"{path}: cannot read as Parquet ({_one_line(err)})") from None


def _saved_dataset(
    folder: Path, field: str, errors: Errors, stats: ReadStats
) -> Iterator[Document]:
    pa = _pyarrow(folder)
    row = 0
    for path in _saved_dataset_files(folder):
        try:
            with pa.memory_map(str(path)) as source:
                reader = pa.ipc.open_stream(source)
                _check_text_column(reader.schema, field, str(path), "column")
                row = yield from _arrow_rows(reader, str(folder), field, errors, stats, row)
        except pa.ArrowException as err:
            raise DataError(f"{path}: cannot read as an Arrow stream ({_one_line(err)})") from None


def _saved_dataset_files(folder: Path) -> list[Path]:
    """The Arrow files of a ``save_to_disk`` folder, in the order its ``state.json`` lists."""
    state = folder / "state.json"
    try:
        names = [entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{state}: not a datasets state file ({_one_line(err)})") from None
    for name in names:
        if not (folder / name).is_file():
            raise DataError(f"{folder / name}: listed in {state} but missing")
    return [folder / name for name in names]


def _pyarrow(path: Path):
    """The pyarrow module, with its Parquet and IPC readers, or a ``DataError`` naming ``path``."""
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet  # noqa: F401  (binds pyarrow.parquet)
    except ImportError:
        raise DataError(
            f"{path}: reading Parquet and datasets folders needs pyarrow "
            "(pip install 'observatory[text]')"
        ) from None
    return pyarrow


def _check_text_column(schema, field: str, where: str, what: str) -> None:
    import pyarrow as pa

    if field not in schema.names:
        raise DataError(f"{where}: no {what} {field!r} (columns: {', '.join(schema.names)})")
    kind = schema.field(field).type
    if not any(
        test(kind)
        for test in (
            pa.types.is_string,
            pa.types.is_large_string,
            pa.types.is_binary,
            pa.types.is_large_binary,
        )
    ):
        raise DataError(f"{where}: {what} {field!r} holds {kind}, not text")


def _arrow_rows(
    batches: Iterable, name: str, field: str, errors: Errors, stats: ReadStats, first_row: int
) -> Iterator[Document]:
    """The documents of the text column ``field`` of record batches; returns the next row.

    Arrow does not validate the UTF-8 of string columns it reads, so every value is taken as
    bytes and decoded like a file's.
    """
    import pyarrow as pa

    row = first_row
    for batch in batches:
        column = batch.column(field)
        if not pa.types.is_binary(column.type) and not pa.types.is_large_binary(column.type):
            column = column.view(
                pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()
            )
        for value in column.to_pylist():
            where = f"{name}[{row}]"
            if value is None:
                raise DataError(f"{where}: field {field!r} is null, not a string")
            yield Document(
                _decode(value, errors, stats, partial(_value_place, where, field)), where
            )
            row += 1
    return row


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


# ---------------------------------------------------------------------------------------------
# Tokens


def token_files(paths: Sequence[Path], *, dtype: str | None = None) -> list[TokenFile]:
    """Open pre-tokenized files, memory-mapped.

    Parameters
    ----------
    paths : sequence of Path
        Flat binary files, ``.npy`` files, Megatron prefixes or their ``.bin``/``.idx`` files
        (``~`` is expanded); see the module docstring.
    dtype : str, optional
        The token dtype (``"uint16"``, ...): required for flat binary files; for ``.npy`` and
        Megatron files, which record their own, it must match theirs if given.

    Returns
    -------
    list of TokenFile

    Raises
    ------
    DataError
        A missing file, a malformed header or index, sizes that do not match, a dtype that is
        missing, not an integer type, or does not divide the file, an empty file.
    """
    wanted = None if dtype is None else token_dtype(dtype)
    if not paths:
        raise DataError("no token files given")
    return [_token_file(Path(path).expanduser(), wanted) for path in paths]


def token_source_files(paths: Sequence[Path]) -> list[Path]:
    """Every file that ``token_files(paths)`` reads (a Megatron dataset: ``.idx``, ``.bin``)."""
    files = []
    for path in map(Path, paths):
        prefix = _megatron_prefix(path.expanduser())
        files += (
            [path.expanduser()]
            if prefix is None
            else [Path(f"{prefix}.idx"), Path(f"{prefix}.bin")]
        )
    return files


def token_dtype(name: str) -> np.dtype:
    """The numpy integer dtype called ``name``; a ``DataError`` if unknown or not integer."""
    try:
        dtype = np.dtype(name)
    except TypeError:
        raise DataError(f"unknown dtype {name!r} (e.g. 'uint16', 'int32')") from None
    if dtype.kind not in "iu":
        raise DataError(f"dtype {name!r} cannot hold token ids: use an integer type like 'uint16'")
    return dtype


def _token_file(path: Path, dtype: np.dtype | None) -> TokenFile:
    prefix = _megatron_prefix(path)
    if prefix is not None:
        return _megatron(prefix, dtype)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: a folder, not a token file (.bin/.idx, .npy or flat binary)")
    if path.suffix.lower() == ".npy":
        return _npy(path, dtype)
    return _flat(path, dtype)


def _megatron_prefix(path: Path) -> Path | None:
    """The Megatron path prefix that ``path`` names, or None if it is no Megatron file."""
    text = str(path)
    if path.suffix == ".idx":
        return Path(text[:-4])
    if path.suffix == ".bin" and Path(text[:-4] + ".idx").exists():
        return Path(text[:-4])
    if not path.exists() and (Path(text + ".idx").exists() or Path(text + ".bin").exists()):
        return path
    return None


def _megatron(prefix: Path, dtype: np.dtype | None) -> TokenFile:
    idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for path, other, role in ((idx_path, bin_path, "index"), (bin_path, idx_path, "data file")):
        if not path.is_file():
            raise DataError(f"{path}: missing (the Megatron {role} that goes with {other})")
    stored, n_sequences, n_index = _megatron_header(idx_path)
    if dtype is not None and dtype != stored:
        raise DataError(f"{idx_path}: holds {stored} tokens, but dtype {dtype} was given")
    index = np.memmap(idx_path, dtype=np.uint8, mode="r")
    needed = _HEADER.size + 12 * n_sequences + 8 * n_index
    if index.size not in (needed, needed + n_sequences):
        raise DataError(
            f"{idx_path}: {index.size} bytes, but its header ({n_sequences} sequences, "
            f"{n_index} document-index entries) needs {needed} (truncated?)"
        )
    at = _HEADER.size
    sizes = index[at : at + 4 * n_sequences].view("<i4")
    at += 4 * n_sequences
    pointers = index[at : at + 8 * n_sequences].view("<i8")
    at += 8 * n_sequences
    doc_index = index[at : at + 8 * n_index].view("<i8")
    n_tokens = _check_sequences(idx_path, bin_path, sizes, pointers, stored.itemsize)
    doc_offsets = _document_offsets(idx_path, doc_index, pointers, stored.itemsize, n_tokens)
    tokens = np.memmap(bin_path, dtype=stored, mode="r")
    return TokenFile(tokens, doc_offsets, str(prefix))


def _megatron_header(idx_path: Path) -> tuple[np.dtype, int, int]:
    """The token dtype, sequence count and document-index count of a Megatron ``.idx``."""
    with idx_path.open("rb") as file:
        head = file.read(_HEADER.size)
    if head.startswith(_OLD_MAGIC):
        raise DataError(
            f"{idx_path}: the older non-memory-mapped indexed dataset (TNTIDX); "
            "re-preprocess it with --dataset-impl mmap"
        )
    if not head.startswith(MEGATRON_MAGIC):
        raise DataError(
            f"{idx_path}: not a Megatron index (expected it to start with {MEGATRON_MAGIC!r}, "
            f"found {head[:9]!r})"
        )
    if len(head) < _HEADER.size:
        raise DataError(f"{idx_path}: {len(head)} bytes, too short for a Megatron index header")
    _, version, code, n_sequences, n_index = _HEADER.unpack(head)
    if version != 1:
        raise DataError(f"{idx_path}: index version {version}; only version 1 is supported")
    if code not in MEGATRON_DTYPES:
        known = ", ".join(f"{c} {t.name}" for c, t in MEGATRON_DTYPES.items())
        raise DataError(f"{idx_path}: unknown dtype code {code} (known: {known})")
    stored = MEGATRON_DTYPES[code]
    if stored.kind not in "iu":
        raise DataError(f"{idx_path}: dtype code {code} is {stored.name}, not token ids")
    return stored, n_sequences, n_index


def _check_sequences(
    idx_path: Path, bin_path: Path, sizes: np.ndarray, pointers: np.ndarray, itemsize: int
) -> int:
    """Check that the sequences lie back to back and fill ``.bin``; return its token count."""
    position = 0  # byte offset where the next sequence must start
    for start in range(0, len(sizes), _CHUNK):
        lengths = sizes[start : start + _CHUNK].astype(np.int64)
        if (lengths < 0).any():
            bad = start + int(np.argmax(lengths < 0))
            raise DataError(f"{idx_path}: sequence {bad} has negative length {int(sizes[bad])}")
        ends = position + np.cumsum(lengths * itemsize)
        starts = np.concatenate(([position], ends[:-1]))
        mismatch = pointers[start : start + _CHUNK] != starts
        if mismatch.any():
            bad = start + int(np.argmax(mismatch))
            raise DataError(
                f"{idx_path}: sequence {bad} starts at byte {int(pointers[bad])} of "
                f"{bin_path.name}, expected {int(starts[bad - start])} (sequences must lie "
                "back to back)"
            )
        position = int(ends[-1])
    size = bin_path.stat().st_size
    if size != position:
        raise DataError(
            f"{bin_path}: {size} bytes, but {idx_path.name} describes {position} "
            f"({'truncated' if size < position else 'extra bytes'}?)"
        )
    if position == 0:
        raise DataError(f"{bin_path}: no tokens")
    return position // itemsize


def _document_offsets(
    idx_path: Path, doc_index: np.ndarray, pointers: np.ndarray, itemsize: int, n_tokens: int
) -> np.ndarray:
    """Token offsets ``[n_docs + 1]`` of the documents whose first sequences ``doc_index`` lists."""
    n_sequences = len(pointers)
    if len(doc_index) < 2 or doc_index[0] != 0 or doc_index[-1] != n_sequences:
        raise DataError(
            f"{idx_path}: the document index must run from sequence 0 to {n_sequences}, "
            f"found {len(doc_index)} entries {_ends(doc_index)}"
        )
    offsets = np.empty(len(doc_index), dtype=np.int64)
    previous = 0
    for start in range(0, len(doc_index), _CHUNK):
        first = np.asarray(doc_index[start : start + _CHUNK])
        steps = np.diff(first, prepend=previous)
        if (steps < 0).any() or first.max() > n_sequences:
            bad = start + int(np.argmax((steps < 0) | (first > n_sequences)))
            raise DataError(
                f"{idx_path}: document index entry {bad} ({int(doc_index[bad])}) is out of "
                f"order or beyond the {n_sequences} sequences"
            )
        inside = first < n_sequences
        offsets[start : start + len(first)] = n_tokens
        offsets[start : start + len(first)][inside] = pointers[first[inside]] // itemsize
        previous = int(first[-1])
    return offsets


def _ends(values: np.ndarray) -> str:
    if len(values) == 0:
        return "[]"
    return f"[{int(values[0])} ... {int(values[-1])}]"


def _npy(path: Path, dtype: np.dtype | None) -> TokenFile:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{path}: not a .npy array ({_one_line(err)})") from None
    if not isinstance(array, np.ndarray):
        raise DataError(f"{path}: not a .npy array")
    if array.dtype.kind not in "iu":
        raise DataError(f"{path}: holds {array.dtype}, not integer token ids")
    if dtype is not None and dtype != array.dtype:
        raise DataError(f"{path}: holds {array.dtype} tokens, but dtype {dtype} was given")
    if array.ndim not in (1, 2):
        raise DataError(f"{path}: {array.ndim}-D; expected 1-D tokens or 2-D [documents, length]")
    if not array.flags.c_contiguous:
        raise DataError(f"{path}: Fortran-ordered; save it C-ordered (np.ascontiguousarray)")
    if array.size == 0:
        raise DataError(f"{path}: no tokens")
    n_docs, length = (1, array.size) if array.ndim == 1 else array.shape
    offsets = np.arange(n_docs + 1, dtype=np.int64) * length
    return TokenFile(array.reshape(-1), offsets, str(path))


def _flat(path: Path, dtype: np.dtype | None) -> TokenFile:
    if dtype is None:
        raise DataError(
            f"{path}: a flat token file needs a dtype (e.g. 'uint16' for nanoGPT's train.bin)"
            + (f"; no {path.with_suffix('.idx').name} beside it" if path.suffix == ".bin" else "")
        )
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path}: no tokens")
    if size % dtype.itemsize:
        raise DataError(
            f"{path}: {size} bytes is not a whole number of {dtype} tokens "
            f"({dtype.itemsize} bytes each): wrong dtype or a truncated file"
        )
    tokens = np.memmap(path, dtype=dtype, mode="r")
    return TokenFile(tokens, np.array([0, tokens.size], dtype=np.int64), str(path))


def max_token(tf: TokenFile, chunk: int = 1 << 24) -> int:
    """The largest token id of ``tf``, read in chunks of ``chunk`` tokens.

    Raises
    ------
    DataError
        A negative token id (possible in a signed dtype), naming its position.
    """
    top = -1
    for start in range(0, tf.tokens.size, chunk):
        part = np.asarray(tf.tokens[start : start + chunk])
        if tf.tokens.dtype.kind == "i" and part.min() < 0:
            at = start + int(np.argmax(part < 0))
            raise DataError(f"{tf.origin}: negative token id {int(tf.tokens[at])} at token {at}")
        top = max(top, int(part.max()))
    return top


def write_megatron(prefix: Path, documents: Iterable[np.ndarray], *, dtype: str) -> None:
    """Write ``documents`` as a Megatron indexed dataset ``prefix.bin`` + ``prefix.idx``.

    One sequence per document, as GPT-NeoX writes Pythia's data; the layout is the one
    ``token_files`` reads (module docstring).

    Parameters
    ----------
    prefix : Path
        The path prefix; ``.bin`` and ``.idx`` are appended.
    documents : iterable of numpy.ndarray
        1-D token arrays; every value must fit ``dtype``.
    dtype : str
        One of the integer dtypes of ``MEGATRON_DTYPES``.
    """
    wanted = np.dtype(dtype).newbyteorder("<")
    codes = {stored: code for code, stored in MEGATRON_DTYPES.items() if stored.kind in "iu"}
    if wanted not in codes:
        raise ValueError(f"dtype {dtype!r} has no Megatron code (one of {sorted(map(str, codes))})")
    sizes = []
    with open(f"{prefix}.bin", "wb") as out:
        for number, document in enumerate(documents):
            array = np.asarray(document)
            tokens = array.astype(wanted)
            if array.ndim != 1 or not np.array_equal(tokens, array):
                raise ValueError(f"document {number} is not 1-D or does not fit {wanted}")
            out.write(tokens.tobytes())
            sizes.append(tokens.size)
    lengths = np.asarray(sizes, dtype="<i4")
    pointers = (np.cumsum(lengths, dtype=np.int64) - lengths) * wanted.itemsize
    doc_index = np.arange(len(sizes) + 1, dtype="<i8")
    with open(f"{prefix}.idx", "wb") as out:
        out.write(_HEADER.pack(MEGATRON_MAGIC, 1, codes[wanted], len(sizes), len(doc_index)))
        out.write(lengths.tobytes() + pointers.astype("<i8").tobytes() + doc_index.tobytes())
