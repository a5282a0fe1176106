"""Cross-seed statistics: intervals valid for few seeds, the init/data-seed variance split,
head matching across seeds and linear CKA."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import linear_sum_assignment
from scipy.stats import bootstrap, t

# Below this many seeds a bootstrap of the mean collapses towards [min, max] and under-covers.
BOOTSTRAP_MIN_N = 10


def t_interval(values: ArrayLike, *, confidence: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval of the mean: ``mean +- t_{(1+c)/2, n-1} * s / sqrt(n)``.

    Valid for few values (n = 2-5 seeds) if they are roughly normal; wide at n = 2-3, as it
    should be.

    Parameters
    ----------
    values
        ``values[n]``: one value per seed (finite).
    confidence
        Confidence level of the two-sided interval.

    Returns
    -------
    tuple of float
        ``(low, high)``; ``(nan, nan)`` for fewer than 2 values.
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    if n < 2:
        return float("nan"), float("nan")
    mean = values.mean()
    half = t.ppf((1 + confidence) / 2, n - 1) * values.std(ddof=1) / np.sqrt(n)
    return float(mean - half), float(mean + half)


def bootstrap_ci(
    values: ArrayLike,
    *,
    confidence: float = 0.95,
    n_resamples: int = 10000,
    seed: int = 0,
) -> tuple[float, float]:
    """BCa bootstrap confidence interval of the mean (``scipy.stats.bootstrap``).

    Meant for many values (``n >= BOOTSTRAP_MIN_N``); :func:`seed_summary` uses
    :func:`t_interval` below that. When all values are equal the interval is that value.

    Parameters
    ----------
    values
        ``values[n]`` (finite).
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
    if np.all(values == values[0]):  # BCa is undefined (zero variance)
        return float(values[0]), float(values[0])
    result = bootstrap(
        (values,),
        np.mean,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method="BCa",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def seed_summary(
    values: Iterable[float | None], *, confidence: float = 0.95, seed: int = 0
) -> dict[str, float | int | str]:
    """Summary of one quantity across seeds; missing values (None/NaN) are counted and dropped.

    The interval is the t-interval of the mean (:func:`t_interval`) for fewer than
    :data:`BOOTSTRAP_MIN_N` values, else the BCa bootstrap (:func:`bootstrap_ci`).

    Parameters
    ----------
    values
        ``values[n_seeds]``; None or NaN where the quantity does not exist for a seed (e.g. an
        emergence step of a seed whose score never crossed the threshold).
    confidence
        Confidence level of the interval.
    seed
        Seed of the bootstrap resampling.

    Returns
    -------
    dict
        ``n`` (finite values used), ``n_missing``, ``mean``, ``std`` (``ddof=1``; NaN for
        ``n < 2``), ``ci_low``, ``ci_high``, ``ci_method`` (``"t"`` or ``"bca"``; ``"none"``
        for ``n < 2``) and ``confidence``.
    """
    all_values = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    finite = all_values[np.isfinite(all_values)]
    n = int(finite.size)
    if n >= BOOTSTRAP_MIN_N:
        (low, high), method = bootstrap_ci(finite, confidence=confidence, seed=seed), "bca"
    else:
        (low, high), method = t_interval(finite, confidence=confidence), "t" if n > 1 else "none"
    return {
        "n": n,
        "n_missing": int(all_values.size - n),
        "mean": float(finite.mean()) if n else float("nan"),
        "std": float(finite.std(ddof=1)) if n > 1 else float("nan"),
        "ci_low": low,
        "ci_high": high,
        "ci_method": method,
        "confidence": confidence,
    }


def variance_split(
    values: ArrayLike, init_seeds: ArrayLike, data_seeds: ArrayLike
) -> dict[str, float | int | str]:
    """Split the variance of a per-run quantity into init-seed, data-seed and residual parts.

    Two-way ANOVA without interaction on a complete crossed design (every init seed with
    every data seed, one run each): sums of squares of the init-seed means, the data-seed
    means and the residual, which add up to the total. With a 2 x 2 design the residual has
    one degree of freedom: the split is a rough description, not a test.

    Parameters
    ----------
    values
        ``values[n_runs]``: the quantity per run (finite).
    init_seeds, data_seeds
        ``[n_runs]``: each run's init and data seed.

    Returns
    -------
    dict
        ``design`` (``"<a> init x <b> data seeds"``), ``n_runs``, ``ss_init``, ``ss_data``,
        ``ss_residual``, ``ss_total``, their shares ``init_share``, ``data_share``,
        ``residual_share`` (fractions of ``ss_total``; NaN if it is 0), and ``df_residual``.

    Raises
    ------
    ValueError
        If the design is not completely crossed with one finite value per cell, or has fewer
        than 2 levels of either seed.
    """
    values = np.asarray(values, dtype=np.float64)
    init_levels, init_index = np.unique(np.asarray(init_seeds), return_inverse=True)
    data_levels, data_index = np.unique(np.asarray(data_seeds), return_inverse=True)
    a, b = len(init_levels), len(data_levels)
    cells = np.full((a, b), np.nan)
    cells[init_index, data_index] = values
    if values.size != a * b or not np.isfinite(cells).all() or min(a, b) < 2:
        raise ValueError(
            f"need one finite value for every (init, data) pair of at least 2 x 2 seeds; "
            f"got {values.size} values for {a} init x {b} data seeds"
        )
    grand = cells.mean()
    ss_init = b * float(((cells.mean(axis=1) - grand) ** 2).sum())
    ss_data = a * float(((cells.mean(axis=0) - grand) ** 2).sum())
    ss_total = float(((cells - grand) ** 2).sum())
    ss_residual = max(ss_total - ss_init - ss_data, 0.0)
    share = (lambda ss: ss / ss_total) if ss_total > 0 else (lambda ss: float("nan"))
    return {
        "design": f"{a} init x {b} data seeds",
        "n_runs": a * b,
        "ss_init": ss_init,
        "ss_data": ss_data,
        "ss_residual": ss_residual,
        "ss_total": ss_total,
        "init_share": share(ss_init),
        "data_share": share(ss_data),
        "residual_share": share(ss_residual),
        "df_residual": (a - 1) * (b - 1),
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
