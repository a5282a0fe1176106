"""A circuit-formation report of one family store: PNG figures, one HTML page, summary tables.

Figures are drawn on bare :class:`matplotlib.figure.Figure` objects (Agg canvas), so writing a
report never touches pyplot's global state or the user's interactive backend.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib import colormaps
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from observatory.analysis.summary import (
    Summary,
    check_results,
    head_label,
    summary,
    token_loss_pca,
    tokens_per_step,
)
from observatory.results import load_results

DPI = 120
# Analyses the report draws on (all of them: figures for each). The training loss is drawn
# where recorded (ingested checkpoints may come without it).
REQUIRED = ("induction_score", "previous_token_score", "icl_score", "token_loss")
LOSS_BINS = 60  # log-spaced bins averaging the noisy per-step loss on its log axis
LINESTYLES = ("-", "--", ":", "-.")


def write_report(
    path: str | Path | xr.Dataset, out_dir: str | Path, *, size: str | None = None
) -> list[Path]:
    """Write the figures, the summary tables and one self-contained HTML page.

    Parameters
    ----------
    path
        The family store (analysed with ``observatory analyze``), or a dataset from
        :func:`~observatory.results.load_results`.
    out_dir
        Directory to write into (created if needed; existing report files are replaced).
    size
        Size name; may be omitted when the store has a single size.

    Returns
    -------
    list of pathlib.Path
        Every file written, the HTML page (``report.html``, images embedded as base64) first,
        then the PNG figures (see :data:`FIGURES`, and :data:`OPTIONAL_FIGURES` when the store
        has their analysis), ``summary.csv`` (per seed),
        ``summary_across_seeds.csv`` and ``summary.json``.

    Raises
    ------
    StoreError
        If the store or size does not exist or an analysis has no results.
    """
    ds = path if isinstance(path, xr.Dataset) else load_results(path, size=size)
    check_results(ds, REQUIRED)
    result = summary(ds)
    pca = token_loss_pca(ds)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[Path, str, str]] = []
    optional = {
        name: (title, caption, draw)
        for name, (title, caption, draw, needs) in OPTIONAL_FIGURES.items()
        if needs in ds
    }
    for name, (title, caption, draw) in (FIGURES | optional).items():
        figure = draw(ds, result, pca)
        target = out / name
        figure.savefig(target, dpi=DPI)
        figures.append((target, title, caption))
    tables = [out / "summary.csv", out / "summary_across_seeds.csv", out / "summary.json"]
    result.per_seed.to_csv(tables[0])
    result.across_seeds.to_csv(tables[1], index_label="quantity")
    tables[2].write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
    page = out / "report.html"
    page.write_text(_html(result, figures), encoding="utf-8")
    return [page, *(target for target, _, _ in figures), *tables]


# --------------------------------------------------------------------------------------------
# Figures. Each takes (results, summary, pca) and returns a Figure.


def _colour(index: int) -> tuple[float, ...]:
    return colormaps["tab10"](index % 10)


def _panels(n: int, *, width: float = 4.6, height: float = 3.4):
    """A figure with one panel per seed, at most three per row."""
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    figure = Figure(figsize=(width * ncols, height * nrows + 0.4), layout="constrained")
    axes = figure.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    for extra in axes[n:]:
        extra.set_visible(False)
    return figure, axes[:n]


def _tokens_axis(ax, per_step: float) -> None:
    """Tokens seen (millions) on a secondary x axis at the top."""
    top = ax.secondary_xaxis(
        "top", functions=(lambda s: s * per_step / 1e6, lambda t: t * 1e6 / per_step)
    )
    top.set_xlabel("tokens seen (millions)", fontsize="small")
    top.tick_params(labelsize="small")


def _row(result: Summary, seed) -> dict:
    return result.per_seed.loc[int(seed)].to_dict()


def _analysed(values: xr.DataArray) -> xr.DataArray:
    """The checkpoints of one seed's score that were analysed (no NaN)."""
    analysed = values.notnull()
    other = [dim for dim in values.dims if dim != "step"]
    if other:
        analysed = analysed.all(other)
    return values.isel(step=analysed.values)


def _log_binned(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean step and value in log-spaced step bins: exact early on, smooth later."""
    edges = np.unique(np.geomspace(steps[0], steps[-1] + 1, LOSS_BINS + 1).astype(int))
    index = np.searchsorted(edges, steps, side="right") - 1
    counts = np.bincount(index)
    keep = counts > 0
    mean = [np.bincount(index, weights=w)[keep] / counts[keep] for w in (steps, values)]
    return mean[0], mean[1]


def loss_curves(ds: xr.Dataset, result: Summary, pca: xr.Dataset) -> Figure:
    """Per-step training loss per seed (log step axis), the loss bump shaded."""
    per_step = tokens_per_step(ds)
    figure, axes = _panels(ds.sizes["seed"])
    for i, (ax, seed) in enumerate(zip(axes, ds["seed"].values, strict=True)):
        row = _row(result, seed)
        loss = ds["loss"].sel(seed=seed).dropna("train_step")
        if not loss.size:
            ax.text(0.5, 0.5, "no training loss recorded", ha="center", transform=ax.transAxes)
            ax.set_title(f"seed {seed}")
            continue
        loss = loss.sel(train_step=loss["train_step"] > 0)  # log axis
        steps, values = loss["train_step"].values, loss.values
        ax.plot(steps, values, color=_colour(i), alpha=0.25, lw=0.7, label="per step")
        ax.plot(*_log_binned(steps, values), color=_colour(i), lw=1.6, label="log-binned mean")
        if np.isfinite(row["bump_start_step"]):
            ax.axvspan(
                row["bump_start_step"],
                row["bump_end_step"],
                color="0.5",
                alpha=0.2,
                label=f"loss bump {row['bump_start_step']:.0f}-{row['bump_end_step']:.0f}",
            )
        if np.isfinite(row["emergence_midpoint_step"]):
            ax.axvline(
                row["emergence_midpoint_step"],
                color="k",
                ls="--",
                lw=1,
                label=f"{row['best_head']} emerges ({row['emergence_midpoint_step']:.0f})",
            )
        ax.set_xscale("log")
        ax.set_title(
            f"seed {seed}" if np.isfinite(row["bump_start_step"]) else f"seed {seed} (no bump)"
        )
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3, which="both", lw=0.5)
        ax.legend(fontsize="small", loc="lower left")
        _tokens_axis(ax, per_step)
    axes[0].set_ylabel("training loss (nats)")
    figure.suptitle("Training loss per step; shaded: detected loss bump")
    return figure


def induction_heatmaps(ds: xr.Dataset, result: Summary, pca: xr.Dataset) -> Figure:
    """Induction score of every head over the checkpoints, one panel per seed."""
    n_seeds = ds.sizes["seed"]
    layers, heads = ds["layer"].values, ds["head"].values
    labels = [head_label(layer, head) for layer in layers for head in heads]
    figure = Figure(figsize=(9, 0.6 + n_seeds * (0.9 + 0.22 * len(labels))), layout="constrained")
    axes = figure.subplots(n_seeds, 1, sharex=True, squeeze=False)[:, 0]
    for ax, seed in zip(axes, ds["seed"].values, strict=True):
        scores = _analysed(ds["induction_score"].sel(seed=seed))
        steps = scores["step"].values
        grid = scores.transpose("layer", "head", "step").values.reshape(len(labels), len(steps))
        edges = np.concatenate([[steps[0]], (steps[1:] + steps[:-1]) / 2, [steps[-1]]])
        mesh = ax.pcolormesh(
            edges, np.arange(len(labels) + 1), grid, cmap="viridis", vmin=0, vmax=1
        )
        for boundary in range(len(heads), len(labels), len(heads)):
            ax.axhline(boundary, color="w", lw=1)  # between layers
        row = _row(result, seed)
        if np.isfinite(row["emergence_midpoint_step"]):
            ax.axvline(row["emergence_midpoint_step"], color="w", ls="--", lw=1)
        ax.set_yticks(np.arange(len(labels)) + 0.5, labels, fontsize="small")
        ax.invert_yaxis()  # L0H0 on top
        ax.set_ylabel("head")
        formed = row["induction_heads"] or "none"
        ax.set_title(f"seed {seed}: induction heads (peak >= {result.threshold:g}): {formed}")
    axes[-1].set_xlabel("checkpoint step (dashed: emergence midpoint of the best head)")
    _tokens_axis(axes[0], tokens_per_step(ds))
    figure.colorbar(mesh, ax=axes, label="induction score", shrink=0.9)
    figure.suptitle("Induction score of every head over training")
    return figure


def induction_emergence(ds: xr.Dataset, result: Summary, pca: xr.Dataset) -> Figure:
    """The best head's induction score per seed, with the emergence steps across seeds."""
    figure = Figure(figsize=(8, 4.8), layout="constrained")
    ax = figure.subplots()
    for i, seed in enumerate(ds["seed"].values):
        row = _row(result, seed)
        best = {"layer": row["best_layer"], "head": row["best_head_in_layer"]}
        scores = _analysed(ds["induction_score"].sel(seed=seed, **best))
        midpoint = row["emergence_midpoint_step"]
        label = f"seed {seed}: {row['best_head']}"
        if np.isfinite(midpoint):
            label += f", midpoint {midpoint:.0f}"
            ax.axvline(midpoint, color=_colour(i), ls="--", lw=1)
        else:
            label += f" (never reaches {result.threshold:g})"
        ax.plot(scores["step"], scores, color=_colour(i), marker=".", ms=3, lw=1.3, label=label)
    ax.axhline(result.threshold, color="0.3", ls=":", lw=1, label=f"threshold {result.threshold:g}")
    stats = result.across_seeds.loc["emergence_midpoint_step"]
    if np.isfinite(stats["ci_low"]):
        ax.axvspan(
            stats["ci_low"],
            stats["ci_high"],
            color="0.6",
            alpha=0.25,
            label=f"{stats['confidence']:.0%} bootstrap CI of the mean midpoint "
            f"({stats['mean']:.0f}; n = {int(stats['n'])} seeds)",
        )
    ax.set_xlabel("checkpoint step")
    convention = result.parameters.get("induction_score_convention")
    ax.set_ylabel("induction score" + (f" ({convention.replace('_', ' ')})" if convention else ""))
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3, lw=0.5)
    ax.legend(fontsize="small", loc="upper left")
    _tokens_axis(ax, tokens_per_step(ds))
    ax.set_title("Induction score of each seed's best head; dashed: emergence midpoints")
    return figure


def icl_scores(ds: xr.Dataset, result: Summary, pca: xr.Dataset) -> Figure:
    """ICL score over training per seed, each seed's loss bump shaded."""
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    ax = figure.subplots()
    for i, seed in enumerate(ds["seed"].values):
        icl = ds["icl_score"].sel(seed=seed).dropna("step")
        ax.plot(icl["step"], icl, color=_colour(i), lw=1.4, label=f"seed {seed}")
        row = _row(result, seed)
        if np.isfinite(row["bump_start_step"]):
            ax.axvspan(
                row["bump_start_step"],
                row["bump_end_step"],
                color=_colour(i),
                alpha=0.12,
                label=f"seed {seed}: loss bump",
            )
    ax.axhline(0, color="0.3", lw=0.8)
    early = result.parameters.get("icl_early_position")
    late = result.parameters.get("icl_late_position")
    positions = f"loss at position {late} - at {early}" if early is not None else "late - early"
    ax.set_ylabel(f"ICL score: {positions} (nats)")
    ax.set_xlabel("checkpoint step")
    ax.grid(alpha=0.3, lw=0.5)
    ax.legend(fontsize="small")
    _tokens_axis(ax, tokens_per_step(ds))
    ax.set_title("In-context-learning score (lower: more use of context); shaded: loss bumps")
    return figure


def loss_pca_trajectories(ds: xr.Dataset, result: Summary, pca: xr.Dataset) -> Figure:
    """The per-token-loss PCA trajectory (PC1 vs PC2) of every seed, coloured by step."""
    figure = Figure(figsize=(7.5, 6), layout="constrained")
    ax = figure.subplots()
    steps = pca["step"].values
    norm = Normalize(steps.min(), steps.max())
    handles = []
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
        midpoint = _row(result, seed)["emergence_midpoint_step"]
        if np.isfinite(midpoint):
            nearest = int(np.abs(points["step"].values - midpoint).argmin())
            ax.plot(*xy[nearest], "D", mfc="tab:red", mec="k", ms=7, zorder=3)
        handles.append(Line2D([], [], color="0.3", ls=style, lw=2, label=f"seed {seed}"))
    handles += [
        Line2D([], [], ls="", marker="o", mfc="w", mec="k", ms=8, label="first checkpoint"),
        Line2D([], [], ls="", marker="s", mfc="k", mec="k", ms=7, label="last checkpoint"),
        Line2D([], [], ls="", marker="D", mfc="tab:red", mec="k", ms=7, label="emergence midpoint"),
    ]
    ax.autoscale_view()
    ratio = pca["explained_variance_ratio"].values
    ax.set_xlabel(f"PC1 ({ratio[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({ratio[1]:.0%} of variance)")
    ax.grid(alpha=0.3, lw=0.5)
    ax.legend(handles=handles, fontsize="small")
    figure.colorbar(lines, ax=ax, label="checkpoint step")
    ax.set_title("Per-token-loss PCA, one joint fit over every checkpoint of every seed")
    return figure


def previous_token_scores(ds: xr.Dataset, result: Summary, pca: xr.Dataset) -> Figure:
    """Previous-token score of the layer-0 heads, one panel per seed."""
    per_step = tokens_per_step(ds)
    figure, axes = _panels(ds.sizes["seed"])
    layer = ds["layer"].values[0]
    for ax, seed in zip(axes, ds["seed"].values, strict=True):
        scores = _analysed(ds["previous_token_score"].sel(seed=seed, layer=layer))
        for j, head in enumerate(scores["head"].values):
            trajectory = scores.sel(head=head)
            ax.plot(scores["step"], trajectory, color=_colour(j), label=head_label(layer, head))
        midpoint = _row(result, seed)["emergence_midpoint_step"]
        if np.isfinite(midpoint):
            ax.axvline(midpoint, color="k", ls="--", lw=1, label="induction emergence")
        ax.set_title(f"seed {seed}")
        ax.set_xlabel("checkpoint step")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3, lw=0.5)
        ax.legend(fontsize="small")
        _tokens_axis(ax, per_step)
    axes[0].set_ylabel("previous-token score")
    figure.suptitle(f"Previous-token score of the layer-{layer} heads")
    return figure


# file name -> (title, caption, drawing function)
FIGURES: dict[str, tuple[str, str, Callable[[xr.Dataset, Summary, xr.Dataset], Figure]]] = {
    "loss_curves.png": (
        "Training loss",
        "Per-step training loss of each seed on a log step axis (faint: every step; solid: "
        "mean over log-spaced bins). Shaded: the loss bump found by change-point detection; "
        "dashed: the emergence midpoint of the seed's best induction head.",
        loss_curves,
    ),
    "induction_heatmaps.png": (
        "Induction score of every head",
        "Induction score of each head (rows, L<layer>H<head>) at every "
        "analysed checkpoint, one panel per seed. Head identities differ across seeds.",
        induction_heatmaps,
    ),
    "induction_emergence.png": (
        "Emergence of the induction head",
        "Induction score of each seed's best head, the threshold, each seed's emergence "
        "midpoint (dashed) and the bootstrap CI of the mean midpoint across seeds.",
        induction_emergence,
    ),
    "icl_score.png": (
        "In-context-learning score",
        "Loss late in the context minus loss early in the context (Olsson et al.'s ICL score, "
        "scaled to the context length); it falls when the model starts using its context.",
        icl_scores,
    ),
    "loss_pca.png": (
        "Per-token-loss PCA",
        "Per-token losses on fixed held-out positions, projected on the first two principal "
        "components of one joint fit; the trajectory turns at the phase change.",
        loss_pca_trajectories,
    ),
    "previous_token_layer0.png": (
        "Previous-token heads",
        "Previous-token score of the first layer's heads: the heads an induction head in the "
        "next layer reads from.",
        previous_token_scores,
    ),
}


def ablation_effects(ds: xr.Dataset, result: Summary, pca: xr.Dataset) -> Figure:
    """Increase in repeated-token loss when each head is ablated, one panel per seed."""
    per_step = tokens_per_step(ds)
    figure, axes = _panels(ds.sizes["seed"])
    for ax, seed in zip(axes, ds["seed"].values, strict=True):
        effect = _analysed(ds["repeated_loss_increase"].sel(seed=seed))
        row = _row(result, seed)
        for j, (layer, head) in enumerate(
            (layer, head) for layer in effect["layer"].values for head in effect["head"].values
        ):
            best = (layer, head) == (row["best_layer"], row["best_head_in_layer"])
            ax.plot(
                effect["step"],
                effect.sel(layer=layer, head=head),
                color=_colour(j),
                lw=2.5 if best else 1,
                label=head_label(layer, head) + (" (best induction)" if best else ""),
            )
        if np.isfinite(row["emergence_midpoint_step"]):
            ax.axvline(row["emergence_midpoint_step"], color="k", ls="--", lw=1)
        ax.set_title(f"seed {seed}")
        ax.set_xlabel("checkpoint step")
        ax.grid(alpha=0.3, lw=0.5)
        ax.legend(fontsize="x-small", ncols=2)
        _tokens_axis(ax, per_step)
    axes[0].set_ylabel("loss increase on repeated tokens (nats)")
    figure.suptitle("Head ablation: loss increase when one head's output is removed")
    return figure


def _pattern_steps(steps: np.ndarray, midpoint: float) -> list[int]:
    """Four checkpoints across the phase change: first, halfway to it, at it, last."""
    if not np.isfinite(midpoint):
        midpoint = float(np.median(steps))
    targets = [steps[0], midpoint / 2, midpoint, steps[-1]]
    return sorted({int(steps[np.abs(steps - t).argmin()]) for t in targets})


def attention_stripes(ds: xr.Dataset, result: Summary, pca: xr.Dataset) -> Figure:
    """Each seed's best induction and previous-token heads' patterns across the phase change."""
    rows = []
    for seed in ds["seed"].values:
        row = _row(result, seed)
        prev = ds["previous_token_score"].sel(seed=seed).max("step")
        layer, head = np.unravel_index(int(np.argmax(prev.values)), prev.shape)
        rows.append((seed, "induction", row["best_layer"], row["best_head_in_layer"], row))
        rows.append((seed, "previous-token", int(layer), int(head), row))
    patterns = ds["attention_pattern"]
    steps = _analysed(patterns.sel(seed=ds["seed"].values[0]))["step"].values
    n_cols = len(_pattern_steps(steps, math.nan))
    figure = Figure(figsize=(2.4 * n_cols + 1, 2.4 * len(rows) + 0.6), layout="constrained")
    axes = figure.subplots(len(rows), n_cols, squeeze=False)
    for axes_row, (seed, kind, layer, head, row) in zip(axes, rows, strict=True):
        seed_patterns = _analysed(patterns.sel(seed=seed))
        chosen = _pattern_steps(seed_patterns["step"].values, row["emergence_midpoint_step"])
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


# file name -> (title, caption, drawing function, the variable it needs): drawn when the
# store has that analysis
OPTIONAL_FIGURES: dict[
    str, tuple[str, str, Callable[[xr.Dataset, Summary, xr.Dataset], Figure], str]
] = {
    "head_ablation.png": (
        "Head ablation",
        "Increase in loss on the repeated part of the probe when one head's output (its z "
        "before W_O) is ablated, per head and checkpoint (thick: the seed's best induction "
        "head; dashed: its emergence midpoint). An induction head that computes, rather than "
        "only attends, should hurt most once the circuit has formed.",
        ablation_effects,
        "repeated_loss_increase",
    ),
    "attention_patterns.png": (
        "Attention patterns across the phase change",
        "Attention of each seed's best induction head and best previous-token head on one "
        "probe sequence (a random block repeated), at the first checkpoint, halfway to the "
        "emergence midpoint, at it and at the last checkpoint (query down, key across). The "
        "previous-token head is a stripe just below the diagonal; the induction head's stripe "
        "one block back (offset block length - 1) appears across the phase change.",
        attention_stripes,
        "attention_pattern",
    ),
}


# --------------------------------------------------------------------------------------------
# The HTML page.

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.8em; text-align: right; }
th { background: #f3f3f3; }
img { max-width: 100%; }
figure { margin: 1.5em 0; }
figcaption, .note { color: #555; font-size: 0.9em; }
"""


def _html(result: Summary, figures: list[tuple[Path, str, str]]) -> str:
    per_seed, across = result.tables()
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(result.title)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(result.title)}</h1>",
        f"<p class='note'>{html.escape(result.note)}.</p>",
        "<h2>Per seed</h2>",
        per_seed.to_html(index=False, border=0),
        f"<h2>Across seeds</h2><p class='note'>{html.escape(result.across_note)}</p>",
        across.to_html(index=False, border=0),
        "<p class='note'>",
        "<br>".join(
            html.escape(f"{key}: {value}")
            for key, value in result.parameters.items()
            if value is not None and key != "analyses"
        ),
        "</p><details><summary>Parameters recorded by the analysis job</summary><pre>",
        html.escape(json.dumps(result.parameters["analyses"], indent=2, default=str)),
        "</pre></details>",
    ]
    for target, title, text in figures:
        data = base64.b64encode(target.read_bytes()).decode("ascii")
        parts += [
            f"<figure><h2>{html.escape(title)}</h2>",
            f'<img src="data:image/png;base64,{data}" alt="{html.escape(title)}">',
            f"<figcaption>{html.escape(text)}</figcaption></figure>",
        ]
    parts.append("</body></html>")
    return "\n".join(parts)
