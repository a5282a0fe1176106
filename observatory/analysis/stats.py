"""Cross-seed statistics: bootstrap intervals, head matching across seeds and linear CKA."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import linear_sum_assignment
from scipy.stats import bootstrap


def bootstrap_ci(
    values: ArrayLike,
    *,
    confidence: float = 0.95,
    n_resamples: int = 10000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean (``scipy.stats.bootstrap``).

    The percentile method is used because BCa is undefined when all values are equal (common
    for emergence steps on a checkpoint grid) and unstable for the 2-5 seeds we have. With so
    few seeds the interval is at most the range of the values: report ``n`` with it.

    Parameters
    ----------
    values
        ``values[n]``: one value per seed (finite).
    confidence
        Confidence level of the two-sided interval.
    n_resamples
        Number of bootstrap resamples.
    seed
        Seed of the resampling.

    Returns
    -------
    tuple of float
        ``(low, high)``; ``(nan, nan)`` for fewer than 2 values.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return float("nan"), float("nan")
    result = bootstrap(
        (values,),
        np.mean,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def seed_summary(
    values: Iterable[float | None], *, confidence: float = 0.95, seed: int = 0
) -> dict[str, float | int]:
    """Summary of one quantity across seeds; missing values (None/NaN) are counted and dropped.

    Parameters
    ----------
    values
        ``values[n_seeds]``; None or NaN where the quantity does not exist for a seed (e.g. an
        emergence step of a seed whose score never crossed the threshold).
    confidence
        Confidence level of the bootstrap interval.
    seed
        Seed of the bootstrap resampling.

    Returns
    -------
    dict
        ``n`` (finite values used), ``n_missing``, ``mean``, ``std`` (``ddof=1``; NaN for
        ``n < 2``), ``ci_low``, ``ci_high`` (see :func:`bootstrap_ci`) and ``confidence``.
    """
    all_values = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    finite = all_values[np.isfinite(all_values)]
    n = int(finite.size)
    low, high = bootstrap_ci(finite, confidence=confidence, seed=seed)
    return {
        "n": n,
        "n_missing": int(all_values.size - n),
        "mean": float(finite.mean()) if n else float("nan"),
        "std": float(finite.std(ddof=1)) if n > 1 else float("nan"),
        "ci_low": low,
        "ci_high": high,
        "confidence": confidence,
    }


class HeadMatch(NamedTuple):
    """Result of :func:`match_heads`: head ``a[i]`` of seed A is matched to ``b[i]`` of seed B."""

    a: np.ndarray  # [n_matched] flat head indices into trajectories_a
    b: np.ndarray  # [n_matched] flat head indices into trajectories_b
    distance: np.ndarray  # [n_matched] Euclidean distance between the matched trajectories


def match_heads(trajectories_a: np.ndarray, trajectories_b: np.ndarray) -> HeadMatch:
    """Match heads of two seeds by their score trajectories (Hungarian algorithm).

    Head identity is not stable across seeds, so heads are matched explicitly: the one-to-one
    assignment that minimises the summed Euclidean distance between trajectories
    (``scipy.optimize.linear_sum_assignment``).

    Parameters
    ----------
    trajectories_a, trajectories_b
        ``score[head, step]`` of each seed on the same steps; flatten ``[layer, head, step]``
        with ``reshape(-1, n_steps)`` (flat index ``layer * n_heads + head``). The head counts
        may differ; then only ``min(n_a, n_b)`` heads are matched.

    Returns
    -------
    HeadMatch
        Matched flat indices ``a`` (sorted) and ``b``, and their distances.
    """
    a = np.asarray(trajectories_a, dtype=np.float64)  # [head_a, step]
    b = np.asarray(trajectories_b, dtype=np.float64)  # [head_b, step]
    cost = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)  # [head_a, head_b]
    rows, cols = linear_sum_assignment(cost)
    return HeadMatch(a=rows, b=cols, distance=cost[rows, cols])


def _unbiased_hsic(gram_x: np.ndarray, gram_y: np.ndarray) -> float:
    """Unbiased HSIC estimator (Song et al. 2012) of two Gram matrices ``[n, n]``."""
    n = gram_x.shape[0]
    kx = gram_x - np.diag(np.diag(gram_x))
    ky = gram_y - np.diag(np.diag(gram_y))
    trace = np.sum(kx * ky)
    sums = kx.sum() * ky.sum() / ((n - 1) * (n - 2))
    cross = 2.0 / (n - 2) * (kx.sum(axis=0) @ ky.sum(axis=0))
    return float((trace + sums - cross) / (n * (n - 3)))


def linear_cka(x: np.ndarray, y: np.ndarray, *, unbiased: bool = False) -> float:
    """Linear centred kernel alignment of two representations (Kornblith et al. 2019).

    Invariant to orthogonal transforms and isotropic scaling of either representation.

    Parameters
    ----------
    x, y
        ``x[n_samples, n_features_x]`` and ``y[n_samples, n_features_y]``: the same samples
        (rows) in two representations.
    unbiased
        Use the unbiased HSIC estimator (Song et al. 2012), better when samples are few
        (needs ``n_samples >= 4``); otherwise the biased ``||Y^T X||_F^2`` form.

    Returns
    -------
    float
        CKA similarity (1 for identical representations up to rotation and scale).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    if unbiased:
        if x.shape[0] < 4:
            raise ValueError("the unbiased HSIC estimator needs at least 4 samples")
        gram_x, gram_y = x @ x.T, y @ y.T  # [n_samples, n_samples]
        self_x, self_y = _unbiased_hsic(gram_x, gram_x), _unbiased_hsic(gram_y, gram_y)
        return float(_unbiased_hsic(gram_x, gram_y) / np.sqrt(self_x * self_y))
    cross = np.linalg.norm(y.T @ x) ** 2
    return float(cross / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))
