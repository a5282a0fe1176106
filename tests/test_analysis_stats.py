"""Cross-seed statistics: bootstrap intervals, head matching and linear CKA."""

import math

import numpy as np
import pytest

from observatory.analysis import bootstrap_ci, linear_cka, match_heads, seed_summary


def test_bootstrap_ci_contains_the_mean_and_narrows_with_more_samples():
    rng = np.random.default_rng(0)
    values = rng.normal(10.0, 2.0, size=200)
    few = values[:5]
    low, high = bootstrap_ci(few, n_resamples=2000)
    assert low <= few.mean() <= high
    wide_low, wide_high = low, high
    low, high = bootstrap_ci(values, n_resamples=2000)
    assert low <= values.mean() <= high
    assert high - low < (wide_high - wide_low) / 2


def test_bootstrap_ci_is_seeded_and_handles_tiny_and_degenerate_samples():
    values = [1.0, 2.0, 4.0]
    assert bootstrap_ci(values, seed=1) == bootstrap_ci(values, seed=1)
    low, high = bootstrap_ci(values)
    assert 1.0 <= low <= high <= 4.0
    assert bootstrap_ci([5.0, 5.0, 5.0]) == (5.0, 5.0)  # BCa would be NaN here
    assert all(math.isnan(v) for v in bootstrap_ci([3.0]))


def test_seed_summary_counts_missing_seeds():
    summary = seed_summary([400.0, None, 420.0, float("nan"), 440.0])
    assert summary["n"] == 3 and summary["n_missing"] == 2
    assert summary["mean"] == pytest.approx(420.0)
    assert summary["std"] == pytest.approx(20.0)  # ddof=1
    assert summary["ci_low"] <= 420.0 <= summary["ci_high"]
    single = seed_summary([7.0])
    assert single["mean"] == 7.0 and math.isnan(single["std"]) and math.isnan(single["ci_low"])


def test_match_heads_recovers_a_permutation():
    rng = np.random.default_rng(0)
    a = rng.random((8, 30))  # [head, step]
    permutation = rng.permutation(8)
    b = a[permutation] + 0.01 * rng.normal(size=(8, 30))
    match = match_heads(a, b)
    np.testing.assert_array_equal(match.a, np.arange(8))
    np.testing.assert_array_equal(permutation[match.b], np.arange(8))  # b[j] is a[perm[j]]
    assert match.distance.max() < 0.2


def test_match_heads_with_unequal_head_counts():
    a = np.array([[0.0, 0.0], [1.0, 1.0], [0.5, 0.5]])
    b = np.array([[1.0, 0.9], [0.1, 0.0]])
    match = match_heads(a, b)
    assert dict(zip(match.a.tolist(), match.b.tolist(), strict=True)) == {0: 1, 1: 0}


@pytest.mark.parametrize("unbiased", [False, True])
def test_linear_cka_invariances(unbiased):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 10))
    rotation = np.linalg.qr(rng.normal(size=(10, 10)))[0]
    assert linear_cka(x, x, unbiased=unbiased) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ rotation, unbiased=unbiased) == pytest.approx(1.0)
    y = rng.normal(size=(50, 6))
    assert linear_cka(x, y, unbiased=unbiased) == pytest.approx(
        linear_cka(x @ rotation * 0.1 + 5.0, y, unbiased=unbiased)
    )
    assert linear_cka(x, y, unbiased=unbiased) < 0.5


def test_unbiased_cka_is_near_zero_for_independent_features_where_biased_is_not():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(20, 50)), rng.normal(size=(20, 50))  # few samples, many features
    assert linear_cka(x, y) > 0.5  # the biased estimator is inflated
    assert abs(linear_cka(x, y, unbiased=True)) < 0.2
    with pytest.raises(ValueError):
        linear_cka(x[:3], y[:3], unbiased=True)
