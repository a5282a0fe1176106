import hashlib
import os
import subprocess
import sys

import pytest

from observatory.data import build_corpus
from observatory.data.tokenizer import (
    END_OF_TEXT,
    TextTokenizer,
    load_tokenizer,
    train_bpe,
    transformers_tokenizer,
)
from observatory.errors import DataError
from observatory.spec import DataSpec
from tests.data.conftest import TEXTS, write_corpus

TRAIN = """
import hashlib, sys
from observatory.data.tokenizer import train_bpe
from tests.data.conftest import TEXTS
print(hashlib.sha256(train_bpe(list(TEXTS.values()), 300).json.encode()).hexdigest())
"""


def test_bpe_trained_twice_is_byte_identical_across_processes():
    digests = set()
    for hash_seed in ("1", "2"):
        env = os.environ | {"PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, "-c", TRAIN], env=env, capture_output=True, text=True, check=True
        )
        digests.add(out.stdout.strip())
    here = hashlib.sha256(train_bpe(list(TEXTS.values()), 300).json.encode()).hexdigest()
    assert digests == {here}


def test_bpe_conventions_and_round_trip():
    tokenizer = train_bpe(list(TEXTS.values()), 300)
    assert tokenizer.vocab_size == 300 and tokenizer.hf.id_to_token(0) == END_OF_TEXT
    text = TEXTS["sub/c.py"]
    (ids,) = tokenizer.encode([text])
    assert tokenizer.decode(ids) == text and 0 not in ids
    hf = transformers_tokenizer(tokenizer.json)
    assert hf.bos_token_id == hf.eos_token_id == hf.pad_token_id == 0
    assert hf.decode(ids) == text and hf(text)["input_ids"] == ids.tolist()


def test_another_vocab_size_or_corpus_changes_the_fingerprint(tmp_path):
    def fingerprint(folder, vocab_size):
        spec = DataSpec(source="text", paths=(str(folder),), tokenizer="bpe")
        return build_corpus(spec, context=16, vocab_size=vocab_size).fingerprint

    first = write_corpus(tmp_path / "one")
    second = write_corpus(tmp_path / "two", TEXTS | {"a.py": "def sub(a, b):\n" * 40})
    assert fingerprint(first, 300) == fingerprint(first, 300)
    assert len({fingerprint(first, 300), fingerprint(first, 320), fingerprint(second, 300)}) == 3


def test_a_tokenizer_loads_from_its_file_or_folder(tmp_path):
    trained = train_bpe(list(TEXTS.values()), 300)
    (tmp_path / "tokenizer.json").write_text(trained.json)
    assert load_tokenizer(tmp_path).json == load_tokenizer(tmp_path / "tokenizer.json").json
    assert load_tokenizer(tmp_path) == TextTokenizer("file", trained.json)


def test_a_tokenizer_that_does_not_load_or_lacks_a_special_id_0_is_one_line(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=f"^{bad}: not a tokenizer") as err:
        load_tokenizer(tmp_path)
    assert "\n" not in str(err.value)
    from tokenizers import Tokenizer, models

    plain = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    plain.save(str(bad))
    with pytest.raises(DataError, match="id 0 must be a special token"):
        load_tokenizer(bad)


def test_a_bpe_smaller_than_the_bytes_is_refused():
    with pytest.raises(DataError, match="at least 257"):
        train_bpe(["abc"], 100)
