import numpy as np
import pytest

from observatory.data import batch_indices, build_corpus, data_order_fingerprint
from observatory.errors import SpecError
from observatory.spec import DataSpec


def test_induction_corpus_repeats_a_block_of_varying_period():
    spec = DataSpec(source="induction", seed=1, n_sequences=200, period_min=3, period_max=9)
    corpus = build_corpus(spec, context=40, vocab_size=20)
    tokens = corpus.tokens
    assert tokens.shape == (200, 40)
    assert np.all(tokens[:, 0] == 0) and tokens[:, 1:].min() >= 1 and tokens.max() < 20
    periods = []
    for seq in tokens[:, 1:]:
        period = next(p for p in range(1, 40) if np.array_equal(seq[p:], seq[:-p]))
        periods.append(period)
    assert min(periods) >= 1 and max(periods) <= 9
    assert len(set(periods)) >= 5  # the period varies, so position alone cannot predict


def test_bigram_background_mixes_in_non_repeating_sequences():
    spec = DataSpec(source="induction", seed=1, n_sequences=100, bigram_fraction=0.5)
    tokens = build_corpus(spec, context=64, vocab_size=32).tokens[:, 1:]
    periodic = [any(np.array_equal(s[p:], s[:-p]) for p in range(8, 33)) for s in tokens]
    assert 20 < sum(periodic) < 80


def test_fingerprint_is_stable_and_changes_with_the_definition():
    spec = DataSpec(source="induction", seed=1, n_sequences=50)
    a = build_corpus(spec, context=64, vocab_size=32)
    b = build_corpus(spec, context=64, vocab_size=32)
    c = build_corpus(
        DataSpec(source="induction", seed=2, n_sequences=50), context=64, vocab_size=32
    )
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_text_corpus_reads_bytes_from_a_directory(tmp_path):
    (tmp_path / "a.py").write_bytes(b"print('hello world')\n" * 20)
    (tmp_path / "skip.txt").write_bytes(b"not python")
    spec = DataSpec(source="text", paths=(str(tmp_path),))
    corpus = build_corpus(spec, context=17, vocab_size=256)
    assert corpus.tokens.shape == (420 // 16, 17)
    assert bytes(corpus.tokens[0, 1:].astype(np.uint8)) == b"print('hello wor"
    (tmp_path / "a.py").write_bytes(b"print('HELLO world')\n" * 20)
    assert build_corpus(spec, context=17, vocab_size=256).fingerprint != corpus.fingerprint


def test_text_corpus_shorter_than_a_context_is_an_error(tmp_path):
    (tmp_path / "a.py").write_bytes(b"x")
    with pytest.raises(SpecError, match="fewer than a context"):
        build_corpus(DataSpec(source="text", paths=(str(tmp_path),)), context=64, vocab_size=256)


def test_data_order_is_a_pure_function_visiting_each_sequence_once_per_epoch():
    n, batch = 50, 8
    steps = range(0, 2 * n // batch + 3)
    order = np.concatenate(
        [batch_indices(data_seed=3, step=s, batch_size=batch, dataset_size=n) for s in steps]
    )
    assert sorted(order[:n]) == list(range(n))  # epoch 0
    assert sorted(order[n : 2 * n]) == list(range(n))  # epoch 1, a different permutation
    assert not np.array_equal(order[:n], order[n : 2 * n])
    again = batch_indices(data_seed=3, step=7, batch_size=batch, dataset_size=n)
    assert np.array_equal(again, order[7 * batch : 8 * batch])
    wide = batch_indices(data_seed=3, step=0, batch_size=3 * n, dataset_size=n)  # 3 epochs
    assert np.array_equal(wide[: len(order)], order)  # the same order, however it is batched
    assert sorted(wide[2 * n :]) == list(range(n))
    other = batch_indices(data_seed=4, step=0, batch_size=batch, dataset_size=n)
    assert not np.array_equal(other, order[:batch])
    assert data_order_fingerprint(data_seed=3, dataset_size=n) != data_order_fingerprint(
        data_seed=4, dataset_size=n
    )
