"""The figure of the local learning coefficient: LLC over training and SGLD loss traces."""

from __future__ import annotations

import math

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from observatory.report.figures import common
from observatory.report.registry import Section, figure
from observatory.report.summary import tokens_per_step

TRACE_WINDOW = 8  # SGLD steps averaged in the convergence panel: minibatch losses differ


@figure(
    "llc.png",
    title="Local learning coefficient",
)
def llc_curves(section: Section) -> Figure | None:
    """LLC of each checkpoint estimated by SGLD (devinterp; step size, localisation, n*beta, chains
    and draws as in the llc analysis' attributes, the same for every checkpoint), on the held-out
    sequences; band: +-1 sd over chains. Hoogland et al. 2024 read developmental stages off its
    plateaus. Right: the chains' mean SGLD loss at four checkpoints of the first seed (running mean
    over 8 SGLD steps, which see different minibatches); a trace still drifting at the end means the
    estimate has not converged.
    """
    ds, result = section.ds, section.result
    if "llc" not in ds:
        return None
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    curves, traces = figure.subplots(1, 2, width_ratios=(2, 1))
    for i, seed in enumerate(ds["seed"].values):
        llc = ds["llc"].sel(seed=seed).dropna("step")
        std = ds["llc_std"].sel(seed=seed, step=llc["step"])
        curves.plot(
            llc["step"], llc, color=common.tab_colour(i), marker=".", lw=1.4, label=f"seed {seed}"
        )
        curves.fill_between(
            llc["step"], llc - std, llc + std, color=common.tab_colour(i), alpha=0.15
        )
        midpoint = common.seed_row(result, seed)["emergence_midpoint_step"]
        if np.isfinite(midpoint):
            curves.axvline(midpoint, color=common.tab_colour(i), ls="--", lw=1)
    curves.set_ylabel("estimated LLC")
    curves.grid(alpha=0.3, lw=0.5)
    common.legend_right(curves)
    common.step_axis(curves, tokens_per_step(ds))
    curves.set_title("Local learning coefficient; dashed: emergence midpoints")
    first = ds["seed"].values[0]
    trace = common.analysed_only(ds["llc_loss_trace"].sel(seed=first))
    chosen = common.pattern_steps(trace["step"].values, math.nan)
    for j, step in enumerate(chosen):
        values = trace.sel(step=step)
        smooth = values.rolling(sgld_step=TRACE_WINDOW, min_periods=1).mean()  # over minibatches
        traces.plot(
            smooth - values[0],
            color=colormaps["viridis"](j / len(chosen)),
            lw=1.2,
            label=f"step {step}",
        )
    traces.set_xlabel("SGLD step")
    traces.set_ylabel(f"SGLD loss - initial loss (nats, mean of {TRACE_WINDOW} steps)")
    traces.grid(alpha=0.3, lw=0.5)
    traces.legend(fontsize="small")
    traces.set_title(f"Seed {first}: SGLD loss (flat: converged)")
    return figure
