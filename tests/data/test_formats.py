"""Corpus readers: every text and token format gives back its documents; bad input is one line."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from observatory.data.formats import (
    Document,
    ReadStats,
    max_token,
    text_documents,
    text_source_files,
    token_files,
    token_source_files,
    write_megatron,
)
from observatory.errors import DataError

REFERENCE = [
    "Once upon a time there was a fox.",
    "def main():\n    return 0\n",
    "Ünïcödé – “quotes” and emoji 🦊",
    "windows\r\nline endings\r\n",
    "last one",
]


def texts(paths, **options) -> list[str]:
    return [document.text for document in text_documents(paths, **options)]


def origins(paths, **options) -> list[str]:
    return [document.origin for document in text_documents(paths, **options)]


# ---------------------------------------------------------------------------------------------
# Writers of each text format


def write_folder(root: Path) -> Path:
    folder = root / "corpus"
    (folder / "b").mkdir(parents=True)
    (folder / ".git").mkdir()
    names = ["a1.txt", "a2.txt", "b/c.txt", "b/d.txt", "z.txt"]  # sorted by relative path
    for name, text in zip(names, REFERENCE, strict=True):
        (folder / name).write_bytes(text.encode())
    (folder / "notes.md").write_text("not matched by the glob")
    (folder / ".git" / "HEAD.txt").write_text("hidden: skipped")
    return folder


def write_jsonl(root: Path) -> Path:
    path = root / "corpus.jsonl"
    lines = [json.dumps({"id": i, "text": text}) for i, text in enumerate(REFERENCE)]
    path.write_text("\n".join(lines) + "\n\n")  # a trailing blank line is skipped
    return path


def write_json_objects(root: Path) -> Path:
    path = root / "corpus.json"
    path.write_text(json.dumps([{"text": text, "n": 1} for text in REFERENCE], indent=1))
    return path


def write_json_strings(root: Path) -> Path:
    path = root / "strings.json"
    path.write_text(json.dumps(REFERENCE))
    return path


def write_parquet(root: Path) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = root / "corpus.parquet"
    table = pa.table({"id": list(range(len(REFERENCE))), "text": REFERENCE})
    pq.write_table(table, path, row_group_size=2)  # several row groups, streamed in order
    return path


def write_saved_dataset(root: Path) -> Path:
    datasets = pytest.importorskip("datasets")
    path = root / "saved"
    # Rows selected out of order and written in two shards: the folder's order is the rows'.
    order = [2, 0, 4, 1, 3]
    shuffled = [REFERENCE[i] for i in order]
    dataset = datasets.Dataset.from_dict({"text": shuffled, "n": order})
    dataset.select(np.argsort(order)).save_to_disk(str(path), num_shards=2)
    return path


def write_saved_dataset_by_hand(root: Path) -> Path:
    """The layout of ``save_to_disk`` without the datasets package: Arrow stream files listed
    in ``state.json``."""
    pa = pytest.importorskip("pyarrow")
    path = root / "by_hand"
    path.mkdir()
    names = ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    for name, rows in zip(names, [REFERENCE[:3], REFERENCE[3:]], strict=True):
        table = pa.table({"text": rows})
        with pa.OSFile(str(path / name), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                for row in rows:  # one batch per row: several batches per file
                    writer.write_table(pa.table({"text": [row]}))
    state = {"_data_files": [{"filename": name} for name in names], "_split": None}
    (path / "state.json").write_text(json.dumps(state))
    (path / "dataset_info.json").write_text("{}")
    return path


TEXT_WRITERS = {
    "folder": write_folder,
    "jsonl": write_jsonl,
    "json-objects": write_json_objects,
    "json-strings": write_json_strings,
    "parquet": write_parquet,
    "save_to_disk": write_saved_dataset,
    "save_to_disk-by-hand": write_saved_dataset_by_hand,
}


@pytest.mark.parametrize("kind", TEXT_WRITERS)
def test_every_text_format_gives_the_reference_documents_in_order(tmp_path, kind):
    path = TEXT_WRITERS[kind](tmp_path)
    glob = "*.txt" if kind == "folder" else "*"
    stats = ReadStats()
    assert texts([path], glob=glob, stats=stats) == REFERENCE
    assert stats == ReadStats(documents=len(REFERENCE), empty=0, replaced_bytes=0)


def test_a_text_file_is_one_document_read_byte_exactly(tmp_path):
    path = tmp_path / "module.py"
    path.write_bytes("\n\n".join(REFERENCE).encode())
    assert list(text_documents([path])) == [Document("\n\n".join(REFERENCE), str(path))]


def test_documents_name_their_origin(tmp_path):
    jsonl, json_file = write_jsonl(tmp_path), write_json_objects(tmp_path)
    folder = write_folder(tmp_path)
    assert origins([jsonl]) == [f"{jsonl}:{line}" for line in range(1, 6)]
    assert origins([json_file]) == [f"{json_file}[{row}]" for row in range(5)]
    assert origins([folder], glob="*.txt")[2] == str(folder / "b" / "c.txt")
    if (parquet := write_parquet(tmp_path)) is not None:
        assert origins([parquet])[-1] == f"{parquet}[4]"
    saved = write_saved_dataset(tmp_path)
    assert origins([saved]) == [f"{saved}[{row}]" for row in range(5)]


def test_the_source_files_are_the_files_read(tmp_path):
    folder, saved = write_folder(tmp_path), write_saved_dataset_by_hand(tmp_path)
    names = ["a1.txt", "a2.txt", "b/c.txt", "b/d.txt", "z.txt"]
    arrows = [saved / f"data-0000{i}-of-00002.arrow" for i in range(2)]
    assert text_source_files([folder, saved], glob="*.txt") == [
        *(folder / name for name in names),
        saved / "state.json",
        *arrows,
    ]
    write_megatron(tmp_path / "m", DOCS, dtype="uint16")
    flat = tmp_path / "flat.bin"
    assert token_source_files([tmp_path / "m.bin", flat]) == [
        tmp_path / "m.idx",
        tmp_path / "m.bin",
        flat,
    ]


def test_paths_are_read_in_the_order_given(tmp_path):
    jsonl, strings = write_jsonl(tmp_path), write_json_strings(tmp_path)
    assert texts([strings, jsonl]) == REFERENCE + REFERENCE


def test_reading_is_streamed(tmp_path):
    """The first document comes before a later path is even looked at."""
    stream = text_documents([write_jsonl(tmp_path), tmp_path / "missing.txt"])
    assert next(stream).text == REFERENCE[0]
    with pytest.raises(DataError, match="missing.txt: no such file"):
        list(stream)


def test_empty_documents_are_skipped_and_counted(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": ""}\n{"text": "x"}\n"" \n')
    stats = ReadStats()
    assert texts([path], stats=stats) == ["x"]
    assert (stats.documents, stats.empty) == (1, 2)


def test_without_pyarrow_a_parquet_file_asks_for_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "c.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    with pytest.raises(DataError, match=rf"^{path}: reading Parquet .*observatory\[text\]"):
        list(text_documents([path]))


def test_importing_the_readers_leaves_pyarrow_unimported():
    code = "import sys, observatory.data.formats; print('pyarrow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# UTF-8

BAD_UTF8 = b"caf\xc3\xa9 \xff ok \xe2\x82 end"  # a stray byte and a truncated 3-byte sequence


def test_invalid_utf8_is_an_error_naming_file_line_and_byte_offset(tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_bytes(b"line one\n" + BAD_UTF8)
    with pytest.raises(DataError, match=rf"^{plain}:2: at byte offset 15: byte 0xff is not UTF-8"):
        list(text_documents([plain]))
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_bytes(b'{"text": "fine"}\n{"text": "' + BAD_UTF8 + b'"}\n')
    with pytest.raises(DataError, match=rf"^{jsonl}:2: at byte offset 33: byte 0xff"):
        list(text_documents([jsonl]))


def test_replace_substitutes_u_fffd_and_counts_the_replaced_bytes(tmp_path):
    plain, jsonl = tmp_path / "a.txt", tmp_path / "a.jsonl"
    plain.write_bytes(BAD_UTF8)
    jsonl.write_bytes(b'{"text": "' + BAD_UTF8 + b'"}\n')
    stats = ReadStats()
    expected = BAD_UTF8.decode("utf-8", "replace")
    assert texts([plain, jsonl], errors="replace", stats=stats) == [expected, expected]
    assert stats.replaced_bytes == 2 * 3


def test_binary_arrow_columns_are_decoded_like_files(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "bytes.parquet"
    pq.write_table(pa.table({"text": pa.array([b"fine", BAD_UTF8], pa.binary())}), path)
    string_path = tmp_path / "unchecked.parquet"  # Arrow writes invalid UTF-8 strings unchecked
    bad_strings = pa.array([b"fine", BAD_UTF8], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": bad_strings}), string_path)
    with pytest.raises(DataError, match=rf"^{string_path}\[1\]: at byte 6 of field 'text'"):
        list(text_documents([string_path]))
    with pytest.raises(DataError, match=rf"^{path}\[1\]: at byte 6 of field 'text'"):
        list(text_documents([path]))
    stats = ReadStats()
    assert texts([path], errors="replace", stats=stats)[1] == BAD_UTF8.decode("utf-8", "replace")
    assert stats.replaced_bytes == 3


# ---------------------------------------------------------------------------------------------
# Bad text input


def bad_jsonl(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + body + "\n")
    return path


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"body": "x", "id": 3}', r":2: no field 'text' \(fields: 'body', 'id'\)"),
        ('{"text": "x"', r":2: not valid JSON \(Expecting ',' delimiter"),
        ('{"text": 7}', r":2: field 'text' is a number, not a string"),
        ('{"text": null}', r":2: field 'text' is null, not a string"),
        ("[1, 2]", r":2: expected an object with field 'text' or a string, found an array"),
    ],
)
def test_bad_json_lines_name_file_and_line(tmp_path, body, message):
    path = bad_jsonl(tmp_path, body)
    with pytest.raises(DataError, match=f"^{path}{message}"):
        list(text_documents([path]))


def test_bad_json_arrays_name_file_and_row(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"text": "a"}, {"txt": "b"}]))
    with pytest.raises(DataError, match=rf"^{path}\[1\]: no field 'text' \(fields: 'txt'\)"):
        list(text_documents([path]))
    path.write_text(json.dumps({"text": "a"}))
    with pytest.raises(DataError, match=rf"^{path}: expected a JSON array .* found an object"):
        list(text_documents([path]))
    path.write_text('[\n{"text": "a"},\n{"text": }]')
    with pytest.raises(DataError, match=rf"^{path}:3: not valid JSON"):
        list(text_documents([path]))


def test_missing_paths_unmatched_globs_and_empty_corpora_are_errors(tmp_path):
    with pytest.raises(DataError, match=rf"^{tmp_path / 'nope'}: no such file or folder$"):
        list(text_documents([tmp_path / "nope"]))
    folder = write_folder(tmp_path)
    with pytest.raises(DataError, match=rf"^{folder}: no file in this folder matches '\*.rst'$"):
        list(text_documents([folder], glob="*.rst"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=rf"^empty corpus: no documents in {empty}$"):
        list(text_documents([empty]))
    empty.write_text('{"text": ""}\n')
    with pytest.raises(DataError, match="empty corpus: all 1 documents are empty"):
        list(text_documents([empty]))


def test_bad_parquet_columns_are_errors(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), path)
    with pytest.raises(DataError, match=rf"^{path}: no column 'text' \(columns: body, id\)$"):
        list(text_documents([path]))
    with pytest.raises(DataError, match=rf"^{path}: column 'id' holds int64, not text$"):
        list(text_documents([path], field="id"))
    pq.write_table(pa.table({"text": ["x", None]}), path)
    with pytest.raises(DataError, match=rf"^{path}\[1\]: field 'text' is null"):
        list(text_documents([path]))
    path.write_text("not parquet")
    with pytest.raises(DataError, match=rf"^{path}: cannot read as Parquet"):
        list(text_documents([path]))


def test_a_dataset_dict_asks_for_one_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    splits = {"train": ["a"], "test": ["b"]}
    dataset = datasets.DatasetDict(
        {k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}
    )
    dataset.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="dd: a datasets DatasetDict with splits train, test"):
        list(text_documents([tmp_path / "dd"]))
    assert texts([tmp_path / "dd" / "test"]) == ["b"]


def test_a_saved_dataset_without_the_field_lists_its_columns(tmp_path):
    saved = write_saved_dataset(tmp_path)
    with pytest.raises(
        DataError, match=r"data-00000-of-00002.arrow: no column 'body' \(columns: text, n\)"
    ):
        list(text_documents([saved], field="body"))


# ---------------------------------------------------------------------------------------------
# Token files

DOCS = [np.array([5, 1, 7]), np.array([], dtype=np.int64), np.array([65535, 0]), np.array([9])]


def documents(tf) -> list[list[int]]:
    return [tf.tokens[tf.doc_offsets[d] : tf.doc_offsets[d + 1]].tolist() for d in range(len(tf))]


def test_a_flat_binary_file_is_one_memory_mapped_document(tmp_path):
    path = tmp_path / "train.bin"
    np.concatenate(DOCS).astype(np.uint16).tofile(path)
    (tf,) = token_files([path], dtype="uint16")
    assert isinstance(tf.tokens, np.memmap) and tf.tokens.dtype == np.uint16
    assert documents(tf) == [np.concatenate(DOCS).tolist()]
    assert tf.doc_offsets.dtype == np.int64 and tf.origin == str(path)


def test_npy_files_give_one_or_n_documents(tmp_path):
    flat, grid = tmp_path / "flat.npy", tmp_path / "grid.npy"
    np.save(flat, np.arange(10, dtype=np.int32))
    np.save(grid, np.arange(12, dtype=np.uint16).reshape(3, 4))
    one, three = token_files([flat, grid])
    assert documents(one) == [list(range(10))]
    assert documents(three) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert isinstance(three.tokens, np.memmap) and three.tokens.dtype == np.uint16


@pytest.mark.parametrize("given", ["", ".bin", ".idx"])
def test_write_megatron_reads_back_document_by_document(tmp_path, given):
    prefix = tmp_path / "pile_text_document"
    write_megatron(prefix, DOCS, dtype="uint16")
    (tf,) = token_files([Path(f"{prefix}{given}")])
    assert documents(tf) == [doc.tolist() for doc in DOCS]
    assert isinstance(tf.tokens, np.memmap) and tf.tokens.dtype == np.uint16
    assert tf.origin == str(prefix)
    assert token_files([prefix], dtype="uint16")[0].doc_offsets.tolist() == [0, 3, 3, 5, 6]


def megatron_by_hand(
    prefix: Path,
    *,
    magic=b"MMIDIDX\x00\x00",
    version=1,
    code=4,
    pointers=None,
    doc_index=(0, 2, 2, 3, 4),
    bin_bytes=None,
) -> None:
    """An int32 Megatron dataset written from the documented layout, independently of the
    reader: four sequences, document 0 made of sequences 0 and 1, document 1 empty."""
    sequences = [[1, 2], [3], [40000, 5, 6], [7]]
    sizes = [len(s) for s in sequences]
    pointers = pointers if pointers is not None else [0, 8, 12, 24]
    head = struct.pack("<9sQBQQ", magic, version, code, len(sizes), len(doc_index))
    body = struct.pack(f"<{len(sizes)}i", *sizes) + struct.pack(f"<{len(sizes)}q", *pointers)
    Path(f"{prefix}.idx").write_bytes(head + body + struct.pack(f"<{len(doc_index)}q", *doc_index))
    tokens = b"".join(struct.pack(f"<{len(s)}i", *s) for s in sequences)
    Path(f"{prefix}.bin").write_bytes(tokens if bin_bytes is None else bin_bytes)


def test_a_hand_written_megatron_dataset_joins_sequences_into_documents(tmp_path):
    megatron_by_hand(tmp_path / "d")
    (tf,) = token_files([tmp_path / "d"], dtype="int32")
    assert documents(tf) == [[1, 2, 3], [], [40000, 5, 6], [7]]
    assert tf.tokens.dtype == np.int32 and max_token(tf) == 40000


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"magic": b"NOTANIDX\x00"}, r"d.idx: not a Megatron index \(expected it to start with"),
        ({"magic": b"TNTIDX\x00\x00\x00"}, r"d.idx: the older non-memory-mapped indexed dataset"),
        ({"version": 2}, r"d.idx: index version 2; only version 1 is supported"),
        ({"code": 9}, r"d.idx: unknown dtype code 9 \(known: 1 uint8"),
        ({"code": 7}, r"d.idx: dtype code 7 is float32, not token ids"),
        ({"bin_bytes": b"\x00" * 20}, r"d.bin: 20 bytes, but d.idx describes 28 \(truncated\?\)"),
        (
            {"pointers": [0, 8, 16, 28]},
            r"d.idx: sequence 2 starts at byte 16 of d.bin, expected 12",
        ),
        ({"doc_index": (0, 2, 3)}, r"d.idx: the document index must run from sequence 0 to 4"),
        ({"doc_index": (0, 3, 2, 4)}, r"d.idx: document index entry 2 \(2\) is out of order"),
    ],
)
def test_bad_megatron_files_are_one_line_errors(tmp_path, options, message):
    megatron_by_hand(tmp_path / "d", **options)
    with pytest.raises(DataError, match=f"^{tmp_path}/{message}"):
        token_files([tmp_path / "d"])


def test_megatron_index_size_missing_halves_and_dtype_mismatch(tmp_path):
    prefix = tmp_path / "d"
    megatron_by_hand(prefix)
    with pytest.raises(DataError, match=r"d.idx: holds int32 tokens, but dtype uint16 was given"):
        token_files([prefix], dtype="uint16")
    idx = Path(f"{prefix}.idx")
    idx.write_bytes(idx.read_bytes()[:-8])
    with pytest.raises(DataError, match=r"d.idx: 114 bytes, but its header .* needs 122"):
        token_files([prefix])
    Path(f"{prefix}.bin").unlink()
    with pytest.raises(DataError, match=rf"^{prefix}.bin: missing \(the Megatron data file"):
        token_files([prefix])
    write_megatron(tmp_path / "e", DOCS, dtype="uint16")
    Path(f"{tmp_path / 'e'}.idx").unlink()
    with pytest.raises(DataError, match=rf"^{tmp_path / 'e'}.idx: missing \(the Megatron index"):
        token_files([tmp_path / "e"])


def test_bad_flat_and_npy_token_files_are_one_line_errors(tmp_path):
    flat = tmp_path / "train.bin"
    np.arange(5, dtype=np.uint16).tofile(flat)
    cases = [
        ([flat], {}, rf"^{flat}: a flat token file needs a dtype .*; no train.idx beside it$"),
        ([flat], {"dtype": "int32"}, rf"^{flat}: 10 bytes is not a whole number of int32 tokens"),
        ([flat], {"dtype": "float32"}, r"^dtype 'float32' cannot hold token ids"),
        ([flat], {"dtype": "uint17"}, r"^unknown dtype 'uint17'"),
        ([tmp_path / "none.bin"], {"dtype": "uint16"}, r"none.bin: no such file$"),
        ([tmp_path], {"dtype": "uint16"}, rf"^{tmp_path}: a folder, not a token file"),
    ]
    for paths, options, message in cases:
        with pytest.raises(DataError, match=message):
            token_files(paths, **options)
    for name, array, message in [
        ("f.npy", np.zeros(3, np.float32), "holds float32, not integer token ids"),
        ("c.npy", np.zeros((2, 2, 2), np.int32), "3-D; expected 1-D tokens or 2-D"),
        ("o.npy", np.asfortranarray(np.zeros((2, 3), np.int32)), "Fortran-ordered"),
        ("e.npy", np.zeros(0, np.int32), "no tokens"),
    ]:
        np.save(tmp_path / name, array)
        with pytest.raises(DataError, match=f"^{tmp_path / name}: {message}"):
            token_files([tmp_path / name])
    with pytest.raises(DataError, match=r"i.npy: holds int32 tokens, but dtype uint16 was given"):
        np.save(tmp_path / "i.npy", np.zeros(3, np.int32))
        token_files([tmp_path / "i.npy"], dtype="uint16")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(DataError, match="empty.bin: no tokens"):
        token_files([tmp_path / "empty.bin"], dtype="uint16")


def test_max_token_streams_in_chunks_and_rejects_negative_ids(tmp_path):
    write_megatron(tmp_path / "m", DOCS, dtype="uint16")
    (tf,) = token_files([tmp_path / "m"])
    assert max_token(tf, chunk=2) == max_token(tf) == 65535
    path = tmp_path / "signed.npy"
    np.save(path, np.array([3, 4, -2, 1], dtype=np.int16))
    with pytest.raises(DataError, match=rf"^{path}: negative token id -2 at token 2$"):
        max_token(token_files([path])[0], chunk=3)


def test_write_megatron_rejects_tokens_that_do_not_fit(tmp_path):
    with pytest.raises(ValueError, match="document 1 is not 1-D or does not fit"):
        write_megatron(tmp_path / "m", [np.array([1]), np.array([70000])], dtype="uint16")
    with pytest.raises(ValueError, match="has no Megatron code"):
        write_megatron(tmp_path / "m", [np.array([1])], dtype="uint32")
