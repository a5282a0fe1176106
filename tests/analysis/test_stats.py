"""Cross-seed statistics: bootstrap intervals, head matching and linear CKA."""

import math

import numpy as np
import pytest
import scipy.stats

from observatory.analysis import (
    bootstrap_ci,
    linear_cka,
    match_heads,
    seed_summary,
    t_interval,
    variance_split,
)
from observatory.analysis.stats import BOOTSTRAP_MIN_N


def test_bootstrap_ci_contains_the_mean_and_narrows_with_more_samples():
    rng = np.random.default_rng(0)
    values = rng.normal(10.0, 2.0, size=200)
    few = values[:12]
    low, high = bootstrap_ci(few, n_resamples=2000)
    assert low <= few.mean() <= high
    wide_low, wide_high = low, high
    low, high = bootstrap_ci(values, n_resamples=2000)
    assert low <= values.mean() <= high
    assert high - low < (wide_high - wide_low) / 2


def test_bootstrap_ci_is_seeded_and_handles_tiny_and_degenerate_samples():
    values = [1.0, 2.0, 4.0, 3.0, 7.0]
    assert bootstrap_ci(values, seed=1) == bootstrap_ci(values, seed=1)
    low, high = bootstrap_ci(values)
    assert 1.0 <= low <= high <= 7.0
    assert bootstrap_ci([5.0, 5.0, 5.0]) == (5.0, 5.0)  # BCa would be NaN here
    assert all(math.isnan(v) for v in bootstrap_ci([3.0]))


def test_three_seeds_get_the_t_interval():
    values = [290.0, 300.0, 330.0]
    mean, s = np.mean(values), np.std(values, ddof=1)
    half = scipy.stats.t.ppf(0.975, 2) * s / math.sqrt(3)  # t_{0.975, 2} = 4.303
    summary = seed_summary(values)
    assert summary["ci_method"] == "t"
    assert (summary["ci_low"], summary["ci_high"]) == pytest.approx((mean - half, mean + half))
    assert t_interval(values) == pytest.approx((mean - half, mean + half))
    # much wider than the [min, max] a percentile bootstrap of 3 values collapses to
    assert summary["ci_low"] < 290.0 - 30 and summary["ci_high"] > 330.0 + 25  # 306.7 +- 51.7


def test_seed_summary_counts_missing_seeds_and_bootstraps_many():
    summary = seed_summary([400.0, None, 420.0, float("nan"), 440.0])
    assert summary["n"] == 3 and summary["n_missing"] == 2
    assert summary["mean"] == pytest.approx(420.0)
    assert summary["std"] == pytest.approx(20.0)  # ddof=1
    assert summary["ci_low"] <= 420.0 <= summary["ci_high"]
    single = seed_summary([7.0])
    assert single["mean"] == 7.0 and math.isnan(single["std"]) and math.isnan(single["ci_low"])
    assert single["ci_method"] == "none"
    many = np.random.default_rng(0).normal(0, 1, BOOTSTRAP_MIN_N)
    bca = seed_summary(many)
    assert bca["ci_method"] == "bca"
    assert (bca["ci_low"], bca["ci_high"]) == bootstrap_ci(many)


def test_variance_split_attributes_an_init_effect_to_the_init_seed():
    # 2 x 2 crossed design: the init seed moves the value by 100, the data seed not at all
    init = [0, 0, 1, 1]
    data = [5, 6, 5, 6]
    values = [400.0, 400.0, 500.0, 500.0]
    split = variance_split(values, init, data)
    assert split["design"] == "2 init x 2 data seeds" and split["df_residual"] == 1
    assert split["init_share"] == pytest.approx(1.0)
    assert split["data_share"] == pytest.approx(0.0) and split["residual_share"] == pytest.approx(0)
    assert split["ss_total"] == pytest.approx(4 * 50.0**2)
    # the reverse, plus noise: the data seed dominates
    noisy = variance_split([400.0, 500.0, 402.0, 497.0], init, data)
    assert noisy["data_share"] > 0.99 > noisy["init_share"] + noisy["residual_share"]
    parts = noisy["ss_init"] + noisy["ss_data"] + noisy["ss_residual"]
    assert parts == pytest.approx(noisy["ss_total"])
    with pytest.raises(ValueError, match="every .init, data. pair"):
        variance_split([1.0, 2.0, 3.0], [0, 0, 1], [5, 6, 5])


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
