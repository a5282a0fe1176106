"""Figures of the causal checks: head ablations and attention patterns across the phase change."""

from __future__ import annotations

import math

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from observatory.report.figures import common
from observatory.report.registry import Section, figure
from observatory.report.summary import head_label, tokens_per_step


@figure(
    "head_ablation.png",
    title="Head ablation",
)
def ablation_effects(section: Section) -> Figure | None:
    """Increase in loss on the repeated part of the probe when one head's output (its z before W_O)
    is ablated, per head and checkpoint (thick: the seed's best induction head; dashed: its
    emergence midpoint; dotted: every head of a layer ablated at once). An induction head that
    computes, rather than only attends, hurts once the circuit has formed; where several heads of a
    layer all become induction heads, removing one costs little, since the others copy too, while
    removing the layer destroys the copying; the previous-token head they all read from is then the
    one head whose removal hurts most.
    """
    ds, result = section.ds, section.result
    if "repeated_loss_increase" not in ds:
        return None
    per_step = tokens_per_step(ds)
    figure, axes = common.panels(ds.sizes["seed"])
    for ax, seed in zip(axes, ds["seed"].values, strict=True):
        effect = common.analysed_only(ds["repeated_loss_increase"].sel(seed=seed))
        row = common.seed_row(result, seed)
        for j, (layer, head) in enumerate(
            (layer, head) for layer in effect["layer"].values for head in effect["head"].values
        ):
            best = (layer, head) == (row["best_layer"], row["best_head_in_layer"])
            ax.plot(
                effect["step"],
                effect.sel(layer=layer, head=head),
                color=common.tab_colour(j),
                lw=2.5 if best else 1,
                label=head_label(layer, head) + (" (best induction)" if best else ""),
            )
        _layer_ablations(ax, ds, seed)
        if np.isfinite(row["emergence_midpoint_step"]):
            ax.axvline(row["emergence_midpoint_step"], color="k", ls="--", lw=1)
        ax.set_title(f"seed {seed}")
        ax.set_xlabel("checkpoint step")
        ax.grid(alpha=0.3, lw=0.5)
        ax.legend(fontsize="x-small", ncols=2)
        common.tokens_axis(ax, per_step)
    axes[0].set_ylabel("loss increase on repeated tokens (nats)")
    figure.suptitle("Head ablation: loss increase when a head's (dotted: a layer's) output is gone")
    return figure


def _layer_ablations(ax, ds: xr.Dataset, seed) -> None:
    """Dotted: every head of a layer ablated at once."""
    effect = common.analysed_only(ds["repeated_layer_loss_increase"].sel(seed=seed))
    for layer in effect["layer"].values:
        ax.plot(
            effect["step"],
            effect.sel(layer=layer),
            color="0.2" if layer % 2 else "0.55",
            ls=":",
            lw=1.5,
            label=f"all of layer {layer}",
        )


@figure(
    "attention_patterns.png",
    title="Attention patterns across the phase change",
)
def attention_stripes(section: Section) -> Figure | None:
    """Attention of each seed's best induction head and best previous-token head on one probe
    sequence (a random block repeated), at the first checkpoint, halfway to the emergence midpoint,
    at it and at the last checkpoint (query down, key across). The previous-token head is a stripe
    just below the diagonal; the induction head's stripe one block back (offset block length - 1)
    appears across the phase change.
    """
    ds, result = section.ds, section.result
    if "attention_pattern" not in ds:
        return None
    rows = []
    for seed in ds["seed"].values:
        row = common.seed_row(result, seed)
        layer, head = common.previous_token_head(ds, seed)
        rows.append((seed, "induction", row["best_layer"], row["best_head_in_layer"], row))
        rows.append((seed, "previous-token", layer, head, row))
    patterns = ds["attention_pattern"]
    steps = common.analysed_only(patterns.sel(seed=ds["seed"].values[0]))["step"].values
    n_cols = len(common.pattern_steps(steps, math.nan))
    figure = Figure(figsize=(2.4 * n_cols + 1, 2.4 * len(rows) + 0.6), layout="constrained")
    axes = figure.subplots(len(rows), n_cols, squeeze=False)
    for axes_row, (seed, kind, layer, head, row) in zip(axes, rows, strict=True):
        seed_patterns = common.analysed_only(patterns.sel(seed=seed))
        chosen = common.pattern_steps(seed_patterns["step"].values, row["emergence_midpoint_step"])
        for ax, step in zip(axes_row, chosen, strict=False):
            ax.imshow(
                seed_patterns.sel(step=step, layer=layer, head=head).values,
                cmap="Blues",
                vmin=0,
                vmax=1,
            )
            ax.set_title(f"seed {seed} {head_label(layer, head)} step {step}", fontsize="small")
            ax.set_xticks([])
            ax.set_yticks([])
        axes_row[0].set_ylabel(f"{kind}\nquery", fontsize="small")
    figure.suptitle("Attention patterns on one repeated-token probe sequence (key across)")
    return figure
