import json
from pathlib import Path

import numpy as np
import pytest

from observatory.cli import main
from observatory.data import build_corpus
from observatory.errors import StoreError
from observatory.spec import DataSpec
from observatory.store import FamilyStore
from tests.conftest import TINY_TOML, assert_bit_identical, final_params, write_spec
from tests.data.conftest import TEXTS

INDUCTION = 'source = "induction"\nseed = 3\nn_sequences = 64\nperiod_min = 2\nperiod_max = 6'


def family_toml(data: str, vocab_size: int = 300) -> str:
    text = TINY_TOML.replace(INDUCTION, data).replace(
        "vocab_size = 16", f"vocab_size = {vocab_size}"
    )
    return text.replace("steps = 24", "steps = 8")


def train(tmp_path, name: str, data: str, vocab_size: int = 300):
    spec = write_spec(tmp_path, family_toml(data, vocab_size), name=f"{name}.toml")
    store = tmp_path / f"{name}.zarr"
    code = main(["train", str(spec), "--store", str(store), "--seeds", "0", "--no-progress"])
    return code, store


def test_a_token_file_trains_bit_identically_to_the_same_text(corpus_dir, tmp_path):
    code, bpe_store = train(
        tmp_path, "bpe", f'source = "text"\npaths = ["{corpus_dir}"]\ntokenizer = "bpe"'
    )
    assert code == 0
    record = FamilyStore(bpe_store).attrs["data"]
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(record["tokenizer"])
    stream = build_corpus(
        DataSpec(source="text", paths=(str(corpus_dir),), tokenizer=str(tokenizer)),
        context=16,
        vocab_size=300,
    ).stream
    np.save(tmp_path / "tokens.npy", np.asarray(stream).astype(np.int32))
    text_data = f'source = "text"\npaths = ["{corpus_dir}"]\ntokenizer = "{tokenizer}"'
    tokens_data = (
        f'source = "tokens"\npaths = ["{tmp_path / "tokens.npy"}"]\ntokenizer = "{tokenizer}"'
    )
    assert train(tmp_path, "text", text_data)[0] == 0
    assert train(tmp_path, "tokens", tokens_data)[0] == 0
    _, reference = final_params(bpe_store)
    for name in ("text", "tokens"):
        assert_bit_identical(final_params(tmp_path / f"{name}.zarr")[1], reference)
    stored = FamilyStore(tmp_path / "tokens.zarr").attrs["data"]
    assert stored["source"] == "tokens" and stored["tokenizer"] == record["tokenizer"]
    assert stored["n_sequences"] == record["n_sequences"]


def test_a_token_file_is_windowed_in_place_and_hashed_once(tmp_path, monkeypatch):
    from observatory.data import sources

    tokens = np.arange(1, 1001, dtype=np.uint16) % 250
    tokens.tofile(tmp_path / "train.bin")
    spec = DataSpec(source="tokens", paths=(str(tmp_path / "train.bin"),), dtype="uint16")
    corpus = build_corpus(spec, context=10, vocab_size=256)
    assert isinstance(corpus.stream, np.memmap)
    assert Path(corpus.stream.filename) == (tmp_path / "train.bin").resolve()
    assert len(corpus) == 1000 // 9 and np.array_equal(corpus.windows([1])[0, 1:], tokens[9:18])
    monkeypatch.setattr(sources, "_hash_token_files", lambda *a: pytest.fail("hashed again"))
    assert build_corpus(spec, context=10, vocab_size=256).fingerprint == corpus.fingerprint


def test_several_token_files_are_one_stream(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(1, 50, dtype=np.int64))
    np.save(tmp_path / "b.npy", np.arange(50, 99, dtype=np.int64))
    paths = (str(tmp_path / "a.npy"), str(tmp_path / "b.npy"))
    corpus = build_corpus(
        DataSpec(source="tokens", paths=paths, bos=False), context=7, vocab_size=100
    )
    assert np.array_equal(np.asarray(corpus.stream), np.arange(1, 99))
    assert corpus.record["n_documents"] == 2 and len(corpus) == 98 // 7


def test_replaced_bytes_are_counted(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 " * 50)
    spec = DataSpec(source="text", paths=(str(tmp_path),), errors="replace")
    corpus = build_corpus(spec, context=16, vocab_size=256)
    assert corpus.record["replaced_bytes"] == 50


BAD = {
    "non-UTF-8 text": ("a.txt", b"ok \xff\xfe", "", "not UTF-8"),
    "empty corpus": ("a.txt", b"", "", "empty corpus"),
    "fewer windows than a batch": ("a.txt", b"x" * 40, "", "fewer than a batch (4)"),
    "token id >= vocab": ("t.npy", None, "", "token id 999 at position 3 (document 0)"),
    "tokenizer that does not load": ("a.txt", b"x" * 400, "junk", "not a tokenizer"),
    "dtype that cannot hold the vocabulary": ("t.bin", b"\x01" * 400, "bpe", "dtype uint8"),
    "tokenizer larger than the model": ("a.txt", b"x" * 400, "big", "more than model.vocab_size"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_is_one_line_exit_2_and_no_store(case, tmp_path, capsys):
    from observatory.data.tokenizer import train_bpe

    name, content, tokenizer, message = BAD[case]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    if content is None:
        np.save(data_dir / name, np.array([1, 2, 3, 999] + [1] * 200))
    else:
        (data_dir / name).write_bytes(content)
    source = "tokens" if name.startswith("t.") else "text"
    data = f'source = "{source}"\npaths = ["{data_dir / name}"]'
    if name.endswith(".bin"):
        data += '\ndtype = "uint8"'
    if tokenizer:
        file = tmp_path / "tokenizer.json"
        vocab = 400 if tokenizer == "big" else 300
        file.write_text("{" if tokenizer == "junk" else train_bpe(list(TEXTS.values()), vocab).json)
        data += f'\ntokenizer = "{file}"'
    code, store = train(tmp_path, "bad", data)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not store.exists()


def test_tokenize_prints_the_cache_entry(corpus_dir, tmp_path, capsys):
    spec = write_spec(
        tmp_path, family_toml(f'source = "text"\npaths = ["{corpus_dir}"]\ntokenizer = "bpe"')
    )
    assert main(["tokenize", str(spec), "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "tokens in 3 documents" in out[0] and "MB/s" in out[0]
    entry = out[1].removeprefix("token cache: ")
    assert json.loads(open(f"{entry}/meta.json").read())["n_documents"] == 3
    assert main(["tokenize", str(spec), "--no-progress"]) == 0
    assert "already in the cache" in capsys.readouterr().out
    induction = write_spec(tmp_path, TINY_TOML, name="induction.toml")
    assert main(["tokenize", str(induction)]) == 2


def test_a_text_family_replays_and_refuses_a_changed_corpus(corpus_dir, tmp_path, capsys):
    import observatory as obs

    data = f'source = "text"\npaths = ["{corpus_dir}"]\ntokenizer = "bpe"'
    store = train(tmp_path, "family", data)[1]
    assert main(["verify", str(store), "--no-progress"]) == 0
    batch = obs.batch_at(store, size="l2-d16", seed=0, step=3)
    text = obs.tokenizer(store).decode(batch[0])
    assert text.startswith("<|endoftext|>") and text[13:] in "".join(TEXTS.values())
    (corpus_dir / "a.py").write_text("changed\n" * 100)
    obs.data.corpus._cached_corpus.cache_clear()
    capsys.readouterr()
    assert main(["verify", str(store), "--quick", "--no-progress"]) == 0  # checksums only
    with pytest.raises(StoreError, match="changed corpus files"):
        obs.batch_at(store, size="l2-d16", seed=0, step=3)


def test_a_family_of_token_ids_has_no_tokenizer(trained_tiny):
    import observatory as obs

    with pytest.raises(StoreError, match=r"\(induction\) has no tokenizer"):
        obs.tokenizer(trained_tiny[1])
