"""Figures of the losses: training and held-out loss, ICL score, loss by position, loss PCA."""

from __future__ import annotations

import numpy as np
import xarray as xr
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from observatory.report.figures import common
from observatory.report.registry import Section, figure
from observatory.report.summary import tokens_per_step

LOSS_BINS = 60  # log-spaced bins averaging the noisy per-step loss on its log axis
LINESTYLES = ("-", "--", ":", "-.")


@figure(
    "loss_curves.png",
    title="Training and held-out loss",
)
def loss_curves(section: Section) -> Figure:
    """Per-step training loss of each seed on a log step axis (faint: every step; solid: mean over
    log-spaced bins) and the held-out loss at each analysed checkpoint (diamonds: mean over the icl
    analysis' held-out sequences and positions). Shaded: the loss bump found by change-point
    detection (in the loss minus the control's where the size names a control); dashed: the
    emergence midpoint of the seed's best induction head.
    """
    ds, result = section.ds, section.result
    per_step = tokens_per_step(ds)
    figure, axes = common.panels(ds.sizes["seed"])
    any_bump = False
    for i, (ax, seed) in enumerate(zip(axes, ds["seed"].values, strict=True)):
        row = common.seed_row(result, seed)
        loss = ds["loss"].sel(seed=seed).dropna("train_step")
        if not loss.size:
            ax.text(0.5, 0.5, "no training loss recorded", ha="center", transform=ax.transAxes)
            ax.set_title(f"seed {seed}")
            continue
        loss = loss.sel(train_step=loss["train_step"] > 0)  # log axis
        steps, values = loss["train_step"].values, loss.values
        ax.plot(
            steps,
            values,
            color=common.tab_colour(i),
            alpha=0.25,
            lw=0.7,
            label="training, per step",
        )
        ax.plot(
            *_log_binned(steps, values),
            color=common.tab_colour(i),
            lw=1.6,
            label="training, binned",
        )
        held = _held_out_loss(ds, seed)
        if held is not None:
            ax.plot(held["step"], held, "D", color="k", ms=2.5, label="held-out (checkpoints)")
        any_bump |= common.shade_bump(ax, row)
        common.mark_emergence(ax, row)
        ax.set_xscale("log")
        ax.set_title(common.seed_title(row, seed))
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3, which="both", lw=0.5)
        common.tokens_axis(ax, per_step)
    axes[0].set_ylabel("loss (nats)")
    common.legend_below(figure, axes)
    title = "Training loss per step and held-out loss per checkpoint"
    figure.suptitle(title + ("; shaded: detected loss bump" if any_bump else ""))
    return figure


@figure(
    "loss_against_control.png",
    title="Loss against the control size",
)
def loss_against_control(section: Section) -> Figure | None:
    """Per seed, the training loss minus that of the control size trained on the same batches
    (the run spec's ``control``, e.g. a 1-layer model, which cannot form induction heads), on a
    log step axis (faint: every step; solid: mean over log-spaced bins). Both models see the
    same batch at every step, so the batch-to-batch noise cancels and what is left is what the
    extra layers learn. Shaded: the loss bump found in this difference; dashed: the emergence
    midpoint of the seed's best induction head. Drawn only for sizes that name a control.
    """
    ds, result = section.ds, section.result
    if "control_loss" not in ds or not bool(ds["control_loss"].notnull().any()):
        return None
    control = ds["control_loss"].attrs["control"]
    figure, axes = common.panels(ds.sizes["seed"])
    for i, (ax, seed) in enumerate(zip(axes, ds["seed"].values, strict=True)):
        row = common.seed_row(result, seed)
        gap = (ds["loss"] - ds["control_loss"]).sel(seed=seed).dropna("train_step")
        gap = gap.sel(train_step=gap["train_step"] > 0)
        if not gap.size:
            ax.text(0.5, 0.5, f"{control} not trained", ha="center", transform=ax.transAxes)
            ax.set_title(f"seed {seed}")
            continue
        steps, values = gap["train_step"].values, gap.values
        colour = common.tab_colour(i)
        ax.plot(steps, values, color=colour, alpha=0.2, lw=0.6, label="per step")
        ax.plot(*_log_binned(steps, values), color=colour, lw=1.6, label="binned")
        ax.axhline(0.0, color="k", lw=0.6)
        common.shade_bump(ax, row)
        common.mark_emergence(ax, row)
        ax.set_xscale("log")
        ax.set_title(common.seed_title(row, seed))
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3, which="both", lw=0.5)
        common.tokens_axis(ax, tokens_per_step(ds))
    axes[0].set_ylabel(f"loss minus {control}'s (nats)")
    common.legend_below(figure, axes)
    figure.suptitle(f"Training loss minus the control {control}'s, on the same batches")
    return figure


def _held_out_loss(ds: xr.Dataset, seed) -> xr.DataArray | None:
    """Mean held-out loss over positions per analysed checkpoint (from the icl analysis)."""
    if "loss_by_position" not in ds:
        return None
    held = ds["loss_by_position"].sel(seed=seed).mean("loss_position").dropna("step")
    held = held.sel(step=held["step"] > 0)
    return held if held.size else None


def _log_binned(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean step and value in log-spaced step bins: exact early on, smooth later."""
    edges = np.unique(np.geomspace(steps[0], steps[-1] + 1, LOSS_BINS + 1).astype(int))
    index = np.searchsorted(edges, steps, side="right") - 1
    counts = np.bincount(index)
    keep = counts > 0
    mean = [np.bincount(index, weights=w)[keep] / counts[keep] for w in (steps, values)]
    return mean[0], mean[1]


@figure(
    "icl_score.png",
    title="In-context-learning score",
)
def icl_scores(section: Section) -> Figure:
    """Loss late in the context minus loss early in the context (Olsson et al.'s ICL score, scaled
    to the context length); it falls when the model starts using its context.
    """
    ds, result = section.ds, section.result
    figure = Figure(figsize=(9.5, 4.5), layout="constrained")
    ax = figure.subplots()
    any_bump = False
    for i, seed in enumerate(ds["seed"].values):
        icl = ds["icl_score"].sel(seed=seed).dropna("step")
        colour = common.tab_colour(i)
        ax.plot(icl["step"], icl, color=colour, lw=1.4, label=f"seed {seed}")
        row = common.seed_row(result, seed)
        any_bump |= common.shade_bump(
            ax, row, colour=colour, alpha=0.12, label=f"seed {seed}: loss bump"
        )
    ax.axhline(0, color="0.3", lw=0.8)
    early = result.parameters.get("icl_early_position")
    late = result.parameters.get("icl_late_position")
    positions = f"loss at position {late} - at {early}" if early is not None else "late - early"
    ax.set_ylabel(f"ICL score: {positions} (nats)")
    ax.grid(alpha=0.3, lw=0.5)
    common.legend_right(ax)
    common.step_axis(ax, tokens_per_step(ds))
    title = "In-context-learning score (lower: more use of context)"
    ax.set_title(title + ("; shaded: loss bumps" if any_bump else ""))
    return figure


@figure(
    "loss_by_position.png",
    title="Loss by token position",
)
def loss_by_position(section: Section) -> Figure | None:
    """Held-out loss at each token position at seven checkpoints from early (dark) to late (yellow):
    after the phase change late tokens are predicted much better than early ones.
    """
    ds = section.ds
    if "loss_by_position" not in ds or not bool(ds["loss_by_position"].notnull().any()):
        return None
    figure, axes = common.panels(ds.sizes["seed"])
    steps = ds["step"].values
    norm = LogNorm(max(steps.min(), 1), max(steps.max(), 2))
    for ax, seed in zip(axes, ds["seed"].values, strict=True):
        losses = common.analysed_only(ds["loss_by_position"].sel(seed=seed))
        analysed = losses["step"].values
        targets = np.geomspace(max(analysed[0], 1), analysed[-1], 7)
        picks = np.unique([np.abs(analysed - target).argmin() for target in targets])
        position = np.arange(losses.shape[-1]) + 1  # predicting token position + 1
        for pick in picks:
            colour = colormaps["viridis"](norm(max(analysed[pick], 1)))
            ax.plot(position, losses.isel(step=pick), color=colour, lw=1.3)
        ax.set_xscale("log")
        ax.set_title(common.seed_title(common.seed_row(section.result, seed), seed))
        ax.set_xlabel("token position in the context")
        ax.grid(alpha=0.3, which="both", lw=0.5)
    axes[0].set_ylabel("held-out loss (nats)")
    figure.colorbar(ScalarMappable(norm, "viridis"), ax=axes, label="checkpoint step")
    figure.suptitle(
        "Loss by token position at 7 checkpoints (Olsson et al.): late tokens gain once the "
        "induction heads form"
    )
    return figure


@figure(
    "loss_pca.png",
    title="Per-token-loss PCA",
)
def loss_pca_trajectories(section: Section) -> Figure:
    """Per-token losses on fixed held-out positions, projected on the first two principal components
    of one joint fit; the trajectory turns at the phase change.
    """
    pca, result = section.pca, section.result
    figure = Figure(figsize=(9, 6), layout="constrained")
    ax = figure.subplots()
    steps = pca["step"].values
    norm = Normalize(steps.min(), steps.max())
    handles = []
    any_midpoint = False
    for i, seed in enumerate(pca["seed"].values):
        points = pca["projection"].sel(seed=seed, component=[1, 2]).dropna("step")
        xy = points.values  # [step, 2]
        segments = np.stack([xy[:-1], xy[1:]], axis=1)
        style = LINESTYLES[i % len(LINESTYLES)]
        lines = LineCollection(segments, cmap="viridis", norm=norm, lw=2, linestyles=style)
        lines.set_array(points["step"].values[1:])
        ax.add_collection(lines)
        ax.plot(*xy[0], "o", mfc="w", mec="k", ms=8, zorder=3)
        ax.plot(*xy[-1], "s", mfc="k", mec="k", ms=7, zorder=3)
        ax.annotate(f"seed {seed}", xy[-1], xytext=(6, 4), textcoords="offset points")
        midpoint = common.seed_row(result, seed)["emergence_midpoint_step"]
        if np.isfinite(midpoint):
            any_midpoint = True
            nearest = int(np.abs(points["step"].values - midpoint).argmin())
            ax.plot(*xy[nearest], "D", mfc="tab:red", mec="k", ms=7, zorder=3)
        handles.append(Line2D([], [], color="0.3", ls=style, lw=2, label=f"seed {seed}"))
    handles += [
        Line2D([], [], ls="", marker="o", mfc="w", mec="k", ms=8, label="first checkpoint"),
        Line2D([], [], ls="", marker="s", mfc="k", mec="k", ms=7, label="last checkpoint"),
    ]
    if any_midpoint:
        handles.append(
            Line2D(
                [], [], ls="", marker="D", mfc="tab:red", mec="k", ms=7, label="emergence midpoint"
            )
        )
    ax.autoscale_view()
    ratio = pca["explained_variance_ratio"].values
    ax.set_xlabel(f"PC1 ({ratio[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({ratio[1]:.0%} of variance)")
    ax.grid(alpha=0.3, lw=0.5)
    common.legend_right(ax, handles)
    figure.colorbar(lines, ax=ax, label="checkpoint step", location="left")
    ax.set_title("Per-token-loss PCA, one joint fit over every checkpoint of every seed")
    return figure
