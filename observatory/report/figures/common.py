"""Drawing helpers the report's figures share: panels per seed, step axes, legends, colours."""

from __future__ import annotations

import math

import numpy as np
import xarray as xr
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from observatory.report.summary import Summary

SPAN_BUMP_COLOUR = "0.88"  # opaque, under the data: a span's figures draw bars over it


def tab_colour(index: int) -> tuple[float, ...]:
    """The ``index``-th colour of matplotlib's tab10 cycle."""
    return colormaps["tab10"](index % 10)


def panels(n: int, *, width: float = 4.6, height: float = 3.4):
    """A figure with one panel per seed, at most three per row."""
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    figure = Figure(figsize=(width * ncols, height * nrows + 0.4), layout="constrained")
    axes = figure.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    for extra in axes[n:]:
        extra.set_visible(False)
    return figure, axes[:n]


def tokens_axis(ax, per_step: float) -> None:
    """Tokens seen (millions) on a secondary x axis at the top."""
    top = ax.secondary_xaxis(
        "top", functions=(lambda s: s * per_step / 1e6, lambda t: t * 1e6 / per_step)
    )
    scale = ax.get_xscale()  # the top axis has the bottom axis' scale
    top.set_xscale(scale, **({"linthresh": per_step / 1e6} if scale == "symlog" else {}))
    top.set_xlabel("tokens seen (millions)", fontsize="small")
    top.tick_params(labelsize="small")


def seed_row(result: Summary, seed) -> dict:
    """The summary's per-seed row of ``seed``."""
    return result.per_seed.loc[int(seed)].to_dict()


def analysed_only(values: xr.DataArray) -> xr.DataArray:
    """The checkpoints of one seed's score that were analysed (no NaN)."""
    analysed = values.notnull()
    other = [dim for dim in values.dims if dim != "step"]
    if other:
        analysed = analysed.all(other)
    return values.isel(step=analysed.values)


def step_axis(ax, per_step: float, *, label: str = "checkpoint step") -> None:
    """The step axis every figure shares: symmetric log (step 0 included), tokens on top."""
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(left=0)
    ax.set_xlabel(label)
    tokens_axis(ax, per_step)


def legend_right(ax, handles=None) -> None:
    """A legend outside the data, to the right of the axes."""
    kwargs = {"handles": handles} if handles is not None else {}
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1), **kwargs)


def legend_below(figure: Figure, axes) -> None:
    """One legend for a figure of panels, below them (each label once, from any panel)."""
    unique = {}
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        unique |= {
            label: handle
            for label, handle in zip(labels, handles, strict=True)
            if label not in unique
        }
    figure.legend(
        unique.values(), unique.keys(), loc="outside lower center", ncols=4, fontsize="small"
    )


def mark_emergence(ax, row: dict) -> None:
    """A dashed line at the seed's induction-head emergence midpoint, if it has one."""
    if np.isfinite(row["emergence_midpoint_step"]):
        ax.axvline(
            row["emergence_midpoint_step"], color="k", ls="--", lw=1, label="induction emergence"
        )


def shade_bump(
    ax, row: dict, *, colour: str | tuple = "0.5", alpha: float = 0.2, label: str = "loss bump"
) -> bool:
    """Shade the seed's detected loss bump, if it has one; whether it had one."""
    if not np.isfinite(row["bump_start_step"]):
        return False
    ax.axvspan(row["bump_start_step"], row["bump_end_step"], color=colour, alpha=alpha, label=label)
    return True


def shade_bump_within(ax, row: dict, start: int, stop: int) -> None:
    """The seed's loss bump, shaded where it overlaps the training steps ``[start, stop]``,
    which become the x axis (integer ticks): for figures of a span of updates."""
    low, high = row.get("bump_start_step", math.nan), row.get("bump_end_step", math.nan)
    if math.isfinite(low) and math.isfinite(high) and low < stop and high > start:
        ax.axvspan(
            max(low, start), min(high, stop), color=SPAN_BUMP_COLOUR, zorder=0, label="loss bump"
        )
    ax.set_xlim(start, stop)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def previous_token_head(ds: xr.Dataset, seed) -> tuple[int, int]:
    """``(layer, head)`` of the seed's head with the highest previous-token score at any
    analysed checkpoint."""
    best = ds["previous_token_score"].sel(seed=seed).max("step").transpose("layer", "head")
    layer, head = np.unravel_index(int(np.argmax(best.values)), best.shape)
    return int(best["layer"].values[layer]), int(best["head"].values[head])


def seed_title(row: dict, seed) -> str:
    notes = [] if row["status"] == "complete" else [f"incomplete, step {row['trained_steps']}"]
    if not np.isfinite(row["bump_start_step"]):
        notes.append("no bump")
    return f"seed {seed}" + (f" ({'; '.join(notes)})" if notes else "")


def pattern_steps(steps: np.ndarray, midpoint: float) -> list[int]:
    """Four checkpoints across the phase change: first, halfway to it, at it, last."""
    if not np.isfinite(midpoint):
        midpoint = float(np.median(steps))
    targets = [steps[0], midpoint / 2, midpoint, steps[-1]]
    return sorted({int(steps[np.abs(steps - t).argmin()]) for t in targets})
