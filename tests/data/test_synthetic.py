import numpy as np

from observatory.data import build_corpus
from observatory.spec import DataSpec


def all_windows(corpus):
    return corpus.windows(np.arange(len(corpus)))


def test_induction_corpus_repeats_a_block_of_varying_period():
    spec = DataSpec(source="induction", seed=1, n_sequences=200, period_min=3, period_max=9)
    corpus = build_corpus(spec, context=40, vocab_size=20)
    tokens = all_windows(corpus)
    assert len(corpus) == 200 and tokens.shape == (200, 40)
    assert np.all(tokens[:, 0] == 0) and tokens[:, 1:].min() >= 1 and tokens.max() < 20
    periods = []
    for seq in tokens[:, 1:]:
        period = next(p for p in range(1, 40) if np.array_equal(seq[p:], seq[:-p]))
        periods.append(period)
    assert min(periods) >= 1 and max(periods) <= 9
    assert len(set(periods)) >= 5  # the period varies, so position alone cannot predict
    assert np.array_equal(corpus.batch(np.array([3, 1])).numpy(), tokens[[3, 1]])
    assert np.array_equal(corpus.token_counts(20), np.bincount(tokens.ravel(), minlength=20))


def test_bigram_background_mixes_in_non_repeating_sequences():
    spec = DataSpec(source="induction", seed=1, n_sequences=100, bigram_fraction=0.5)
    tokens = all_windows(build_corpus(spec, context=64, vocab_size=32))[:, 1:]
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
