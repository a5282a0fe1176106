import socket
from pathlib import Path

import numpy as np
import pytest

from observatory.data import build_corpus, sources
from observatory.data.cache import cache_root
from observatory.spec import DataSpec


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OBSERVATORY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokens"


def build(folder, **options):
    spec = DataSpec(source="text", paths=(str(folder),), **options)
    return build_corpus(spec, context=16, vocab_size=256)


def test_the_cache_folder_is_the_spec_s_then_the_environment_s(tmp_path, monkeypatch):
    monkeypatch.setenv("OBSERVATORY_CACHE", str(tmp_path / "env"))
    assert cache_root(None) == tmp_path / "env" and cache_root("/x") == Path("/x")
    monkeypatch.delenv("OBSERVATORY_CACHE")
    assert cache_root(None) == cache_root("~/.cache/observatory")


def test_a_cached_corpus_reopens_without_tokenizing(corpus_dir, cache, monkeypatch):
    first = build(corpus_dir)
    monkeypatch.setattr(sources, "_tokenize", lambda *args: pytest.fail("tokenized again"))
    again = build(corpus_dir)
    assert again.fingerprint == first.fingerprint and len(list(cache.iterdir())) == 1


def test_a_changed_file_gets_a_new_entry(corpus_dir, cache):
    first = build(corpus_dir)
    path = corpus_dir / "a.py"
    path.write_text(path.read_text() + "# more\n")
    assert build(corpus_dir).fingerprint != first.fingerprint
    assert len(list(cache.iterdir())) == 2


def test_a_folder_without_meta_is_never_used_as_an_entry(corpus_dir, cache):
    first = build(corpus_dir)
    (entry,) = cache.iterdir()
    (entry / "meta.json").unlink()  # no meta.json: not a complete entry
    (entry / "tokens.bin").write_bytes(b"\xff" * 64)
    assert build(corpus_dir).fingerprint == first.fingerprint
    assert (entry / "meta.json").is_file() and np.fromfile(
        entry / "tokens.bin", np.uint16
    ).max() < 256


def test_an_error_while_tokenizing_leaves_no_entry(corpus_dir, cache, monkeypatch):
    from observatory.data.tokenizer import TextTokenizer

    def fail(self, texts):
        raise RuntimeError("killed")

    monkeypatch.setattr(TextTokenizer, "encode", fail)
    with pytest.raises(RuntimeError):
        build(corpus_dir)
    assert list(cache.iterdir()) == []


def test_a_temporary_entry_of_a_dead_process_is_ignored_and_removed(corpus_dir, cache):
    cache.mkdir(parents=True)
    dead = cache / f".tmp-abc-{socket.gethostname()}-999999999"  # no such process
    dead.mkdir()
    (dead / "tokens.bin").write_bytes(b"\x01" * 10)
    corpus = build(corpus_dir)
    assert not dead.exists()
    assert [p.name.startswith(".tmp") for p in cache.iterdir()] == [False]
    assert np.asarray(corpus.stream).max() < 256
