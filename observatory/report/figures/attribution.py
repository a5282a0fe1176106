"""Figures of attributions along the trajectory: which updates moved the target."""

from __future__ import annotations

import math

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from observatory.report.attribution import result_label, step_table, target_label
from observatory.report.figures import common
from observatory.report.registry import Section, figure


@figure("attribution.png", title="Attribution: which updates moved the target")
def attribution(section: Section) -> Figure | None:
    """One row per stored attribution (seed, target, span): left, the target measured at each
    step's weights, f(θ_k), against its value at the span's start plus the running sum of the
    per-step terms — the two curves coincide up to the residual, whose size (and share of the
    measured change) each row's title gives; right, each update's term (bars: green raised the
    target, red lowered it) and the change measured across it (black ticks; the gap is the
    update's residual). Shaded: the seed's loss bump, where it overlaps the span. Drawn
    where the runs hold attributions (computed with observatory attribute).
    """
    found = section.attribution
    if found is None or not found.results:
        return None
    figure = Figure(figsize=(10, 3.2 * len(found.results) + 0.5), layout="constrained")
    rows = figure.subfigures(len(found.results), 1, squeeze=False)[:, 0]
    axes = []
    for row_figure, att in zip(rows, found.results, strict=True):
        value_ax, term_ax = row_figure.subplots(1, 2)
        seed = int(att.attrs["seed"])
        row = common.seed_row(section.result, seed) if seed in section.result.per_seed.index else {}
        _values_panel(value_ax, att)
        _terms_panel(term_ax, att)
        for ax in (value_ax, term_ax):
            common.shade_bump_within(ax, row, int(att.attrs["start"]), int(att.attrs["stop"]))
        row_figure.suptitle(_title(att), fontsize="medium")
        axes += [value_ax, term_ax]
    common.legend_below(figure, axes)
    return figure


def _values_panel(ax, att: xr.Dataset) -> None:
    """f(θ_k) measured, and f(θ_start) plus the terms of the updates before k."""
    steps = np.append(att["train_step"].values, int(att.attrs["stop"]))
    measured = np.append(att["target_value"].values, float(att["target_stop"]))
    summed = float(att["target_start"]) + np.concatenate([[0], np.cumsum(att["step_contribution"])])
    marker = "." if len(steps) <= 60 else None
    ax.plot(steps, measured, color="k", marker=marker, lw=1.2, label="measured f(θ_k)")
    ax.plot(
        steps, summed, color=common.tab_colour(0), ls="--", lw=1.2, label="f(θ_start) + Σ terms"
    )
    ax.set_xlabel("training step k")
    ax.set_ylabel(target_label(att))


def _terms_panel(ax, att: xr.Dataset) -> None:
    """Each update's term (a bar between the steps it goes from and to) and its measured change:
    the gap between them is the update's residual."""
    steps = step_table(att)
    middle = steps["train_step"] + 0.5
    colours = [common.tab_colour(2 if term >= 0 else 3) for term in steps["step_contribution"]]
    ax.bar(middle, steps["step_contribution"], width=0.9, color=colours, lw=0)
    ax.plot(
        middle,
        steps["measured_change"],
        ls="",
        marker="_",
        color="k",
        markersize=min(12.0, 300 / len(steps)),
        label="measured f(θ_k+1) − f(θ_k)",
    )
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("update k (θ_k → θ_k+1)")
    ax.set_ylabel("step contribution")


def _title(att: xr.Dataset) -> str:
    from observatory.attribution.results import residual_share

    share = residual_share(att)
    shown = f" ({share:.2g}% of the change)" if math.isfinite(share) else ""
    return f"{result_label(att)}: residual {float(att['residual']):.3g}{shown}"
