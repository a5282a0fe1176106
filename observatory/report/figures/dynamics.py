"""Figures of training dynamics along the trajectory: which heads each update moved."""

from __future__ import annotations

import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from observatory.report.dynamics import result_label
from observatory.report.figures import common
from observatory.report.registry import Section, figure
from observatory.report.summary import head_label

MAX_HEAD_TICKS = 32  # head labels on a heatmap's y axis; more heads: every n-th


@figure("dynamics.png", title="Training dynamics: what each update moved")
def dynamics(section: Section) -> Figure | None:
    """One row per stored training-dynamics result (seed, span): left, each head's update
    ratio |w(k+1) - w(k)| / |w(k)| over its attention weights (rows L0H0, L0H1, ...) at each
    update k; right, the whole model's update ratio and, on the right axis, the cosine between
    consecutive updates (1: the update keeps the last one's direction, -1: it reverses it).
    Shaded: the seed's loss bump, where it overlaps the span. Drawn where the runs hold
    training dynamics (measured with observatory dynamics).
    """
    found = section.dynamics
    if found is None or not found.results:
        return None
    figure = Figure(figsize=(11, 3.4 * len(found.results) + 0.5), layout="constrained")
    rows = figure.subfigures(len(found.results), 1, squeeze=False)[:, 0]
    axes = []
    for row_figure, dyn in zip(rows, found.results, strict=True):
        heads_ax, model_ax = row_figure.subplots(1, 2)
        seed = int(dyn.attrs["seed"])
        row = common.seed_row(section.result, seed) if seed in section.result.per_seed.index else {}
        _heads_panel(heads_ax, dyn)
        cosine_ax = _model_panel(model_ax, dyn)
        start, stop = int(dyn.attrs["start"]), int(dyn.attrs["stop"])
        common.shade_bump_within(model_ax, row, start, stop)
        row_figure.suptitle(result_label(dyn), fontsize="medium")
        axes += [model_ax, cosine_ax]
    common.legend_below(figure, axes)
    return figure


def head_rows(dyn: xr.Dataset) -> tuple[np.ndarray, list[str]]:
    """``head_update_ratio`` as ``[layer * head, train_step]`` (non-finite masked) and the rows'
    labels, ``L0H0``, ``L0H1``, ..."""
    ratios = dyn["head_update_ratio"].transpose("layer", "head", "train_step")
    values = ratios.values.reshape(-1, dyn.sizes["train_step"])
    labels = [
        head_label(layer, head)
        for layer in ratios["layer"].values
        for head in ratios["head"].values
    ]
    return np.ma.masked_invalid(values), labels


def _heads_panel(ax, dyn: xr.Dataset) -> None:
    """Each head's update ratio, a cell per (head, update k) spanning [k, k + 1]."""
    values, labels = head_rows(dyn)
    steps = dyn["train_step"].values
    edges = np.append(steps, steps[-1] + 1)
    mesh = ax.pcolormesh(edges, np.arange(len(labels) + 1), values, cmap="viridis")
    every = -(-len(labels) // MAX_HEAD_TICKS)
    ax.set_yticks(np.arange(len(labels))[::every] + 0.5, labels[::every], fontsize="x-small")
    ax.invert_yaxis()
    ax.set_xlabel("update k (θ_k → θ_k+1)")
    ax.figure.colorbar(mesh, ax=ax, label="head update ratio")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _model_panel(ax, dyn: xr.Dataset):
    """The whole model's update ratio (left axis) and the cosine of consecutive updates (right
    axis) at the middle of each update; the cosine's axis is returned."""
    middle = dyn["train_step"].values + 0.5
    marker = "." if len(middle) <= 60 else None
    ax.plot(middle, dyn["update_ratio"].values, color="k", marker=marker, label="update ratio")
    ax.set_xlabel("update k (θ_k → θ_k+1)")
    ax.set_ylabel("update ratio |Δw| / |w|")
    twin = ax.twinx()
    twin.plot(
        middle,
        dyn["update_cosine"].values,
        color=common.tab_colour(0),
        marker=marker,
        ls="--",
        label="cosine of consecutive updates",
    )
    twin.set_ylim(-1.05, 1.05)
    twin.set_ylabel("cosine", color=common.tab_colour(0))
    return twin
