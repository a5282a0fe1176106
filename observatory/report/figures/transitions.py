"""Figures of the developmental transitions (:mod:`observatory.report.transitions`): when each
seed's transitions happen, and the loss and head scores of those every seed goes through."""

from __future__ import annotations

import re
import textwrap

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from observatory.report.figures import common
from observatory.report.registry import Section, figure
from observatory.report.summary import tokens_per_step
from observatory.report.transitions import SIGNAL

MAX_HEADS = 3  # heads drawn per seed and transition: the components that change most
HEAD_STYLES = ("-", "--", ":")
COMPONENT = re.compile(r"L(\d+)H(\d+) ([a-z-]+)")  # "L1H0 induction +0.80"
EXAMPLE_WIDTH = 60  # characters per line of an example under a panel's title
LANES = 0.8  # the share of a seed's row that its transitions' lanes fill


@figure("transitions.png", title="Transitions (atlas)")
def transition_atlas(section: Section) -> Figure | None:
    """Every transition of every seed (rows): a bar from its window's start step to its end step
    (the steepening of the group's mean per-token loss found by the change-point rule) on the
    loss curves' log step axis, coloured and labelled by its matched transition id (the same
    colour and lane in every seed) and the number of held-out tokens in its group. Solid:
    universal (found in every seed); hatched and lighter: found in some seeds only. Black tick:
    the median learning time of the group's tokens (halfway from each token's first to its
    final loss).
    """
    table = section.transitions
    if table is None:
        return None
    if not len(table):
        return _no_transitions(table)
    ds = section.ds
    seeds = [int(seed) for seed in table.attrs.get("seeds", sorted(set(table["seed"])))]
    ids = sorted(set(table["transition"]))
    height = LANES / len(ids)
    row = 0.3 + 0.22 * len(ids)  # inches per seed
    figure = Figure(figsize=(10, 1.4 + len(seeds) * row), layout="constrained")
    ax = figure.subplots()
    for found in table.itertuples(index=False):
        y = seeds.index(int(found.seed)) + height * (ids.index(found.transition) + 0.5) - LANES / 2
        colour = common.tab_colour(found.transition)
        ax.barh(
            y,
            found.end_step - found.start_step,
            left=found.start_step,
            height=0.9 * height,
            color=colour,
            alpha=0.9 if found.universal else 0.4,
            hatch=None if found.universal else "//",
            edgecolor=colour,
        )
        middle = np.sqrt((found.start_step + 1) * (found.end_step + 1)) - 1  # on the log axis
        label = f"T{found.transition}: {found.n_tokens}"
        ax.text(middle, y, label, ha="center", va="center", fontsize="x-small")
        ax.plot(found.learning_step, y, "|", color="k", ms=72 * row * height)
    ax.set_yticks(range(len(seeds)), [f"seed {seed}" for seed in seeds])
    ax.set_ylim(len(seeds) - 0.5, -0.5)  # the first seed on top
    common.step_axis(ax, tokens_per_step(ds))
    ax.set_xlim(right=float(ds["step"].max()) * 1.05)
    ax.grid(alpha=0.3, which="both", axis="x", lw=0.5)
    common.legend_right(ax, _legend(table, len(seeds)))
    figure.suptitle(
        "Transitions of each seed: windows of abrupt drop of a token group's loss "
        "(label: id: tokens)"
    )
    return figure


def _legend(table: pd.DataFrame, n_seeds: int) -> list[Patch]:
    """One entry per matched transition: its colour, and in which seeds it occurs."""
    handles = []
    for tid, rows in table.groupby("transition"):
        universal = bool(rows["universal"].iloc[0])
        where = "every seed" if universal else "seeds " + ", ".join(map(str, rows["seed"]))
        colour = common.tab_colour(int(tid))
        handles.append(
            Patch(
                facecolor=colour,
                edgecolor=colour,
                alpha=0.9 if universal else 0.4,
                hatch=None if universal else "//",
                label=f"T{tid}: {where} ({len(rows)} of {n_seeds})",
            )
        )
    return handles


def _no_transitions(table: pd.DataFrame) -> Figure:
    """A note in place of the atlas: discovery ran and found nothing."""
    figure = Figure(figsize=(8, 1.6), layout="constrained")
    ax = figure.subplots()
    n_seeds = len(table.attrs.get("seeds", []))
    ax.text(
        0.5,
        0.5,
        f"no transitions found in {n_seeds} seeds\n(no group of tokens learned together whose "
        "mean loss drops abruptly)",
        ha="center",
        va="center",
        transform=ax.transAxes,
    )
    ax.set_axis_off()
    return figure


@figure("universal_transitions.png", title="Universal transitions")
def universal_transitions(section: Section) -> Figure | None:
    """A column per universal transition (found in every seed). Top: the mean per-token loss of
    the seed's group of held-out tokens at every analysed checkpoint, a line per seed, with the
    seed's window shaded in its colour. Bottom: the scores of the heads listed first among the
    seed's components of the transition (the heads whose induction, previous-token or
    duplicate-token score changes most across the window; at most three per seed, line style
    by rank). Under each title: the group's token that drops most in the first seed, after its
    context (held-out text of a store; none for results given without one).
    """
    table = section.transitions
    if table is None or not table["universal"].any():
        return None
    ds = section.ds
    ids = sorted(set(table.loc[table["universal"], "transition"]))
    ncols = min(len(ids), 3)
    blocks = -(-len(ids) // ncols)
    figure = Figure(figsize=(4.8 * ncols, 6.2 * blocks + 0.6), layout="constrained")
    axes = figure.subplots(2 * blocks, ncols, sharex=True, squeeze=False)
    for extra in range(len(ids), blocks * ncols):
        for row in (0, 1):
            axes[2 * (extra // ncols) + row, extra % ncols].set_visible(False)
    seeds = [int(seed) for seed in ds["seed"].values]
    for k, tid in enumerate(ids):
        top, bottom = axes[2 * (k // ncols), k % ncols], axes[2 * (k // ncols) + 1, k % ncols]
        rows = table[table["transition"] == tid]
        _draw_universal(ds, rows, seeds, top, bottom, table.attrs.get("options", {}))
        if k % ncols == 0:
            top.set_ylabel("mean loss of the group (nats)")
            bottom.set_ylabel("head score")
    for ax in axes[-1]:
        ax.set_xlabel("checkpoint step (log)")
    common.legend_below(figure, [ax for ax in axes.ravel() if ax.get_visible()])
    figure.suptitle("Transitions found in every seed: the group's loss and the heads that change")
    return figure


def _draw_universal(ds: xr.Dataset, rows: pd.DataFrame, seeds: list[int], top, bottom, options):
    """One universal transition: its group's loss (``top``) and its heads' scores (``bottom``)."""
    drawn_heads = 0
    for found in rows.itertuples(index=False):
        colour = common.tab_colour(seeds.index(int(found.seed)))
        steps, curve = _group_loss(ds, int(found.seed), found.tokens)
        top.plot(steps, curve, color=colour, lw=1.4, label=f"seed {found.seed}")
        for ax in (top, bottom):
            ax.axvspan(found.start_step, found.end_step, color=colour, alpha=0.12)
        for rank, (layer, head, kind) in enumerate(_heads(found.components, ds)):
            variable = kind.replace("-", "_") + "_score"
            score = common.analysed_only(ds[variable].sel(seed=found.seed, layer=layer, head=head))
            bottom.plot(
                score["step"],
                score,
                color=colour,
                ls=HEAD_STYLES[rank],
                label=f"seed {found.seed}: L{layer}H{head} {kind}",
            )
            drawn_heads += 1
    if not drawn_heads:
        change = options.get("min_score_change", "")
        note = f"no head score changed by {change} or more"
        bottom.text(0.5, 0.5, note, ha="center", va="center", transform=bottom.transAxes)
    first = rows.iloc[0]
    title = (
        f"T{first['transition']}: {rows['n_tokens'].mean():.0f} tokens, steps "
        f"{rows['start_step'].mean():.0f}-{rows['end_step'].mean():.0f} (mean)"
    )
    examples = [text for text in rows["examples"] if text]
    if examples:
        example = "e.g. " + examples[0].split(" | ")[0].replace("$", r"\$")  # no mathtext
        title += "\n" + "\n".join(textwrap.wrap(example, EXAMPLE_WIDTH)[:3])
    top.set_title(title, fontsize="small")
    for ax in (top, bottom):
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3, which="both", lw=0.5)


def _group_loss(ds: xr.Dataset, seed: int, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean per-token loss of ``tokens`` (flat held-out indices) at each analysed step."""
    losses = ds[SIGNAL].sel(seed=seed).transpose("step", "held_out", "loss_position")
    values = losses.values.reshape(losses.sizes["step"], -1)[:, tokens]
    done = np.isfinite(values).all(axis=1)
    return losses["step"].values[done], values[done].mean(axis=1)


def _heads(components: str, ds: xr.Dataset) -> list[tuple[int, int, str]]:
    """The first :data:`MAX_HEADS` heads of a row's ``components`` whose scores ``ds`` has."""
    heads = []
    for match in COMPONENT.finditer(components or ""):
        layer, head, kind = int(match[1]), int(match[2]), match[3]
        if kind.replace("-", "_") + "_score" in ds:
            heads.append((layer, head, kind))
    return heads[:MAX_HEADS]
