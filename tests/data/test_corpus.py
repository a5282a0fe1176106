import pickle

import numpy as np
import pytest

from observatory.data import build_corpus
from observatory.errors import DataError
from observatory.spec import DataSpec
from tests.data.conftest import TEXTS


def reference_stream(tokenizer, texts):
    """Each document encoded on its own, then EOS (0), documents in path order."""
    ids = [np.append(tokenizer.encode([text])[0], 0) for _, text in sorted(texts.items())]
    return np.concatenate(ids)


def text_spec(folder, **options) -> DataSpec:
    return DataSpec(source="text", paths=(str(folder),), **options)


@pytest.mark.parametrize("bos", [True, False])
def test_bpe_windows_equal_a_reference_tokenization_packed_by_hand(corpus_dir, bos):
    from observatory.data.tokenizer import TextTokenizer

    context = 24
    corpus = build_corpus(
        text_spec(corpus_dir, tokenizer="bpe", bos=bos), context=context, vocab_size=300
    )
    tokenizer = TextTokenizer("bpe", corpus.record["tokenizer"])
    stream = reference_stream(tokenizer, TEXTS)
    body = context - bos
    n = len(stream) // body
    expected = stream[: n * body].reshape(n, body)
    if bos:
        expected = np.concatenate([np.zeros((n, 1), dtype=np.int64), expected], axis=1)
    assert len(corpus) == n
    assert np.array_equal(corpus.windows(np.arange(n)), expected)
    picks = np.array([n - 1, 0, 3])
    assert np.array_equal(corpus.batch(picks).numpy(), expected[picks])
    assert corpus.batch(picks).dtype.is_floating_point is False
    assert np.array_equal(corpus.token_counts(300), np.bincount(stream, minlength=300))
    assert corpus.record["n_documents"] == 3 and corpus.record["n_tokens"] == len(stream)


def test_byte_level_text_keeps_the_bytes_and_adds_eos_between_documents(tmp_path):
    (tmp_path / "a.py").write_bytes(b"print('hello world')\n" * 20)
    (tmp_path / "skip.txt").write_bytes(b"not python")
    corpus = build_corpus(text_spec(tmp_path, glob="*.py"), context=17, vocab_size=256)
    assert len(corpus) == 421 // 16  # 420 bytes and an EOS
    assert bytes(corpus.windows([0])[0, 1:].astype(np.uint8)) == b"print('hello wor"
    assert corpus.record["tokenizer_kind"] == "bytes" and corpus.record["tokenizer"] is None
    (tmp_path / "a.py").write_bytes(b"print('HELLO world')\n" * 20)
    changed = build_corpus(text_spec(tmp_path, glob="*.py"), context=17, vocab_size=256)
    assert changed.fingerprint != corpus.fingerprint


def test_max_tokens_cuts_the_stream_and_changes_the_fingerprint(corpus_dir):
    full = build_corpus(text_spec(corpus_dir), context=16, vocab_size=256)
    cut = build_corpus(text_spec(corpus_dir, max_tokens=100), context=16, vocab_size=256)
    assert cut.record["n_tokens"] == 100 and len(cut) == 100 // 15
    assert np.array_equal(cut.windows(np.arange(len(cut))), full.windows(np.arange(len(cut))))
    assert cut.fingerprint != full.fingerprint


def test_the_stream_is_memory_mapped_and_pickles_as_its_file(corpus_dir):
    corpus = build_corpus(text_spec(corpus_dir), context=16, vocab_size=256)
    assert isinstance(corpus.stream, np.memmap)
    shipped = pickle.dumps(corpus)
    assert len(shipped) < corpus.stream.nbytes  # the file's name, not its tokens
    again = pickle.loads(shipped)
    indices = np.arange(len(corpus))
    assert np.array_equal(again.windows(indices), corpus.windows(indices))
    assert again.fingerprint == corpus.fingerprint


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"a.py": "x"}, "fewer than one window"),
        ({"a.txt": "x"}, "no file in this folder matches"),
    ],
)
def test_a_corpus_without_a_window_is_one_line(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message) as err:
        build_corpus(text_spec(tmp_path, glob="*.py"), context=64, vocab_size=256)
    assert "\n" not in str(err.value)


def test_a_larger_tokenizer_than_the_model_vocabulary_is_refused(corpus_dir, tmp_path):
    from observatory.data.tokenizer import train_bpe

    (tmp_path / "tokenizer.json").write_text(train_bpe(list(TEXTS.values()), 400).json)
    spec = text_spec(corpus_dir, tokenizer=str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="more than model.vocab_size = 300"):
        build_corpus(spec, context=16, vocab_size=300)
