"""Locating the phase change: the loss bump and the emergence step of a score.

Loss bump (Olsson et al. 2022: the only non-convex stretch of the loss curve). The per-step
loss is averaged into at most ``n_bins`` equal-width step bins (noise reduction, and speed),
then fitted with a piecewise-linear curve by ``ruptures.Pelt(model="linear")`` (least squares
per segment, penalty ``penalty``). A convex curve (e.g. an exponential or power-law decay) has
segment slopes that only flatten; the bump is where the curve *steepens*:

* slopes are made dimensionless: ``slope * (step span) / (loss range)`` (the whole curve
  falling at a constant rate has slope -1);
* a bump starts at a change point where the slope drops by at least ``min_steepening`` and
  continues over the following segments while their slope stays at least ``min_steepening``
  below the slope before the bump (the baseline segment);
* the steepest segment of the bump must be at least ``min_z`` standard errors (of the
  difference of the two fitted slopes, from a robust noise estimate) steeper than the
  baseline, so short noisy segments do not count;
* of several candidates the one with the largest fitted loss drop is returned; none -> None.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SEGMENTATION = "ruptures.Pelt(model='linear') on step-binned loss"
# One step's loss is one batch's loss: the final loss averages the last few steps.
FINAL_LOSS_STEPS = 10
FINAL_LOSS = f"mean training loss of the last {FINAL_LOSS_STEPS} steps trained"


def final_loss(loss: np.ndarray) -> float:
    """The final loss of a run: the mean training loss of its last :data:`FINAL_LOSS_STEPS` steps.

    The one definition used by ``observatory train``, the summary and the report.

    Parameters
    ----------
    loss
        ``loss[train_step]``, in step order (at least the last :data:`FINAL_LOSS_STEPS`).

    Returns
    -------
    float
        The mean of the last ``FINAL_LOSS_STEPS`` values (of all of them if fewer); NaN if
        there are none.
    """
    tail = np.asarray(loss, dtype=np.float64)[-FINAL_LOSS_STEPS:]
    return float(tail.mean()) if tail.size else float("nan")


@dataclass(frozen=True)
class Bump:
    """The loss bump: the window of steps (and tokens) over which the loss curve steepens.

    ``start_step`` / ``end_step`` are the mean steps of the first / last bin of the bump.
    """

    start_step: float
    end_step: float
    loss_drop: float  # fitted loss at start_step minus at end_step
    steepening: float  # dimensionless slope before the bump minus the steepest slope in it
    start_tokens: float | None
    end_tokens: float | None
    change_points: tuple[float, ...]  # every change point found, in steps
    n_bins: int
    penalty: float
    min_steepening: float
    min_z: float

    @property
    def attrs(self) -> dict[str, float | str]:
        """The window and the detection parameters, to store as attributes."""
        attrs: dict[str, float | str] = {
            "bump_start_step": self.start_step,
            "bump_end_step": self.end_step,
            "bump_loss_drop": self.loss_drop,
            "bump_steepening": self.steepening,
            "bump_method": SEGMENTATION,
            "bump_n_bins": self.n_bins,
            "bump_penalty": self.penalty,
            "bump_min_steepening": self.min_steepening,
            "bump_min_z": self.min_z,
        }
        if self.start_tokens is not None and self.end_tokens is not None:
            attrs["bump_start_tokens"] = self.start_tokens
            attrs["bump_end_tokens"] = self.end_tokens
        return attrs


def _bin(steps: np.ndarray, loss: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean step and mean loss of ``n_bins`` equal-width step bins (empty bins dropped)."""
    if len(steps) <= n_bins:
        return steps, loss
    edges = np.linspace(steps[0], steps[-1], n_bins + 1)
    index = np.clip(np.searchsorted(edges, steps, side="right") - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    keep = counts > 0
    mean_step = np.bincount(index, weights=steps, minlength=n_bins)[keep] / counts[keep]
    mean_loss = np.bincount(index, weights=loss, minlength=n_bins)[keep] / counts[keep]
    return mean_step, mean_loss


def _noise_variance(y: np.ndarray, loss_range: float) -> float:
    """Robust variance of white noise on a piecewise-smooth series, from second differences."""
    second = np.diff(y, n=2)  # noise variance 6 sigma^2, trends cancel
    sigma = np.median(np.abs(second - np.median(second))) / 0.6745 / np.sqrt(6.0)
    return max(sigma, 1e-3 * loss_range) ** 2


def loss_bump(
    steps: np.ndarray,
    loss: np.ndarray,
    *,
    tokens_per_step: int | None = None,
    n_bins: int = 200,
    penalty: float | None = None,
    min_size: int = 4,
    min_steepening: float = 1.0,
    min_z: float = 5.0,
) -> Bump | None:
    """Find the window where the training loss drops abruptly (its non-convex bump).

    See the module docstring for the criterion.

    Parameters
    ----------
    steps
        ``steps[n]``, increasing (the per-step training loss: every step or a regular subset).
    loss
        ``loss[n]``, the training loss at those steps.
    tokens_per_step
        If given, the window is also reported in tokens (``step * tokens_per_step``).
    n_bins
        The loss is averaged into at most this many equal-width step bins before fitting
        (``Bump.n_bins`` records the number of non-empty bins used).
    penalty
        Pelt penalty on each extra segment, in squared loss units of the binned series.
        Default: ``4 * log(n) * sigma^2`` with ``sigma`` the noise of the binned loss,
        estimated robustly from its second differences (a BIC-like choice).
    min_size
        Shortest segment, in bins.
    min_steepening
        Minimal drop of the dimensionless slope that counts as steepening.
    min_z
        The drop must also be at least ``min_z`` standard errors of the difference of the two
        fitted slopes (from the noise level above), so short noisy segments do not count.

    Returns
    -------
    Bump or None
        The window (steps, tokens), its loss drop and the parameters used; None if the fitted
        curve never steepens (a convex, e.g. smoothly decaying, loss curve) or the series has
        fewer than ``2 * min_size`` points.
    """
    steps = np.asarray(steps, dtype=np.float64)
    loss = np.asarray(loss, dtype=np.float64)
    x, y = _bin(steps, loss, n_bins)
    if len(x) < 2 * min_size:
        return None  # too short for two segments
    span = x[-1] - x[0]
    loss_range = float(np.percentile(y, 99) - np.percentile(y, 1)) or 1.0
    variance = _noise_variance(y, loss_range)
    if penalty is None:
        penalty = 4.0 * np.log(len(y)) * variance
    t = (x - x[0]) / span  # [0, 1]
    starts, ends, fits, slopes, slope_se = _linear_segments(t, y, penalty, min_size, variance)
    slopes, slope_se = slopes / loss_range, slope_se / loss_range  # loss range per step span
    best = _largest_steepening(
        t, starts, ends, fits, slopes, slope_se, min_steepening=min_steepening, min_z=min_z
    )
    if best is None:
        return None
    drop, steepening, first, last = best
    start_step = float(x[starts[first]])
    end_step = float(x[ends[last] - 1])
    return Bump(
        start_step=start_step,
        end_step=end_step,
        loss_drop=float(drop),
        steepening=float(steepening),
        start_tokens=None if tokens_per_step is None else start_step * tokens_per_step,
        end_tokens=None if tokens_per_step is None else end_step * tokens_per_step,
        change_points=tuple(float(x[e]) for e in ends[:-1]),
        n_bins=len(x),
        penalty=float(penalty),
        min_steepening=min_steepening,
        min_z=min_z,
    )


def _linear_segments(t: np.ndarray, y: np.ndarray, penalty: float, min_size: int, variance: float):
    """Pelt segmentation of ``y(t)`` into lines: starts, ends, fits, slopes and their errors."""
    signal = np.column_stack([y, t, np.ones_like(t)])  # y ~ slope * t + intercept
    import ruptures  # imported here: the trainer imports this module, for final_loss

    ends = ruptures.Pelt(model="linear", min_size=min_size, jump=1).fit(signal).predict(pen=penalty)
    starts = [0, *ends[:-1]]
    fits = [np.polyfit(t[a:b], y[a:b], 1) for a, b in zip(starts, ends, strict=True)]
    slopes = np.array([fit[0] for fit in fits])
    # standard error of each slope: sigma / sqrt(sum (t - mean t)^2)
    spread = np.array(
        [np.sum((t[a:b] - t[a:b].mean()) ** 2) for a, b in zip(starts, ends, strict=True)]
    )
    return starts, ends, fits, slopes, np.sqrt(variance / spread)


def _largest_steepening(
    t, starts, ends, fits, slopes, slope_se, *, min_steepening: float, min_z: float
) -> tuple[float, float, int, int] | None:
    """``(drop, steepening, first, last segment)`` of the steepening run that drops most."""

    def fitted(segment: int, index: int) -> float:
        return float(np.polyval(fits[segment], t[index]))

    best = None
    for first in range(1, len(slopes)):
        before = slopes[first - 1]
        last = first - 1
        while last + 1 < len(slopes) and slopes[last + 1] <= before - min_steepening:
            last += 1
        if last < first:
            continue
        steepest = first + int(np.argmin(slopes[first : last + 1]))
        steepening = before - slopes[steepest]
        if steepening / np.hypot(slope_se[first - 1], slope_se[steepest]) < min_z:
            continue
        drop = fitted(first, starts[first]) - fitted(last, ends[last] - 1)
        if best is None or drop > best[0]:
            best = (drop, steepening, first, last)
    return best


@dataclass(frozen=True)
class Emergence:
    """When a score trajectory emerges: threshold crossing and transition midpoint."""

    crossing_step: float | None  # first step with score >= threshold
    midpoint_step: float | None  # interpolated step halfway between initial and final level
    threshold: float
    initial_level: float
    final_level: float

    @property
    def attrs(self) -> dict[str, float | str]:
        """The rule and levels, to store as attributes next to the steps."""
        return {
            "emergence_threshold": self.threshold,
            "emergence_initial_level": self.initial_level,
            "emergence_final_level": self.final_level,
            "emergence_rule": "crossing: first checkpoint with score >= threshold; midpoint: "
            "linear interpolation where the score first reaches (initial + final) / 2",
        }


def emergence(steps: np.ndarray, score: np.ndarray, *, threshold: float = 0.5) -> Emergence:
    """Emergence step of a score trajectory (e.g. a head's induction score over checkpoints).

    Parameters
    ----------
    steps
        ``steps[n_checkpoints]``, increasing.
    score
        ``score[n_checkpoints]``.
    threshold
        Level whose first crossing (``score >= threshold``) is reported.

    Returns
    -------
    Emergence
        ``crossing_step``: the first checkpoint step with ``score >= threshold`` (None if
        never); ``midpoint_step``: the step where the score first reaches halfway between its
        initial (first checkpoint) and final (last checkpoint) level, linearly interpolated
        between the two checkpoints around it (None if the levels are equal).
    """
    steps = np.asarray(steps, dtype=np.float64)
    score = np.asarray(score, dtype=np.float64)
    above = np.flatnonzero(score >= threshold)
    crossing = float(steps[above[0]]) if above.size else None
    initial, final = float(score[0]), float(score[-1])
    midpoint = None
    if final != initial:
        half = (initial + final) / 2
        # first checkpoint at or past the half level, in the direction of the change
        i = int(np.flatnonzero(np.sign(final - initial) * (score - half) >= 0)[0])
        fraction = (half - score[i - 1]) / (score[i] - score[i - 1])
        midpoint = float(steps[i - 1] + fraction * (steps[i] - steps[i - 1]))
    return Emergence(
        crossing_step=crossing,
        midpoint_step=midpoint,
        threshold=threshold,
        initial_level=initial,
        final_level=final,
    )
