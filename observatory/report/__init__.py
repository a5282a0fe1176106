"""A circuit-formation report of one family store: PNG figures, one HTML page, summary tables.

An interactive twin of the page (plotly, :mod:`observatory.report.interactive`) is written
next to it.

Figures are drawn on bare :class:`matplotlib.figure.Figure` objects (Agg canvas), so writing a
report never touches pyplot's global state or the user's interactive backend.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from observatory.report import interactive
from observatory.report.results import load_results
from observatory.report.summary import (
    SeedAlignment,
    Summary,
    check_results,
    head_label,
    seed_alignment,
    summary,
    token_loss_pca,
    tokens_per_step,
)

DPI = 120
# Analyses the report draws on (all of them: figures for each). The training loss is drawn
# where recorded (ingested checkpoints may come without it).
REQUIRED = ("induction_score", "previous_token_score", "icl_score", "token_loss")
LOSS_BINS = 60  # log-spaced bins averaging the noisy per-step loss on its log axis
LINESTYLES = ("-", "--", ":", "-.")
CI_NAMES = {"t": "t-interval", "bca": "BCa bootstrap CI"}
NOT_DRAWN = ("not analysed", "not trained")  # seeds without results: in the tables only


@dataclass(frozen=True, eq=False)
class Section:
    """What the figures of one size draw on."""

    ds: xr.Dataset  # results of the seeds drawn (those with results)
    result: Summary  # the summary of every seed asked for
    pca: xr.Dataset  # token_loss_pca of the seeds drawn
    alignment: SeedAlignment | None  # heads matched across seeds, CKA
    transformer_lens: bool  # also draw the TransformerLens-convention scores


def write_report(
    path: str | Path | xr.Dataset,
    out_dir: str | Path,
    *,
    sizes: list[str] | None = None,
    seeds: list[int] | None = None,
    include_incomplete: bool = False,
    transformer_lens: bool = False,
) -> list[Path]:
    """Write the figures, the summary tables, one self-contained HTML page and its interactive twin.

    Parameters
    ----------
    path
        The family store (analysed with ``observatory analyze``), or a dataset from
        :func:`~observatory.report.results.load_results`.
    out_dir
        Directory to write into (created if needed; existing report files are replaced).
    sizes
        Sizes to report (default: every size of the store). With several, the page has a
        section per size and a comparison of the sizes, and each size's PNGs and tables go
        into ``<out_dir>/<size>/``.
    seeds
        Seed indices to report (default: every seed).
    include_incomplete
        Keep incomplete runs in the cross-seed statistics (see
        :func:`~observatory.report.summary.summary`); they are drawn and marked either way.
        Seeds without results (not trained or not analysed) are listed, not drawn.
    transformer_lens
        Also draw the induction scores in the TransformerLens convention (``tl_*``).

    Returns
    -------
    list of pathlib.Path
        Every file written: the HTML page (``report.html``, images embedded as base64) first,
        then ``report_interactive.html`` (plotly, plotly.js embedded: works offline), then per
        size the PNG figures (see :data:`FIGURES`; those without data are skipped),
        ``summary.csv`` (per seed), ``summary_across_seeds.csv``, ``summary.json`` and, with
        several sizes, ``sizes.csv``.

    Raises
    ------
    StoreError
        If the store, a size or a seed does not exist or no seed of a size has results.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = [
        _section(ds, include_incomplete=include_incomplete, transformer_lens=transformer_lens)
        for ds in _datasets(path, sizes, seeds)
    ]
    several = len(sections) > 1
    written: list[Path] = []
    rendered: list[tuple[Section, list[tuple[Path, str, str]]]] = []
    for section in sections:
        where = out / section.result.size if several else out
        where.mkdir(exist_ok=True)
        figures = _write_figures(section, where)
        written += [target for target, _, _ in figures] + _write_tables(section.result, where)
        rendered.append((section, figures))
    if several:
        written.append(out / "sizes.csv")
        size_comparison([section.result for section in sections]).to_csv(written[-1], index=False)
    page, interactive_page = out / "report.html", out / "report_interactive.html"
    page.write_text(_html(rendered), encoding="utf-8")
    interactive_page.write_text(
        interactive.page(
            [(section.result, section.ds) for section in sections],
            transformer_lens=transformer_lens,
        ),
        encoding="utf-8",
    )
    return [page, interactive_page, *written]


def _datasets(
    path: str | Path | xr.Dataset, sizes: list[str] | None, seeds: list[int] | None
) -> list[xr.Dataset]:
    if isinstance(path, xr.Dataset):
        return [path if seeds is None else path.sel(seed=seeds)]
    from observatory.store import FamilyStore

    return [
        load_results(path, size=size, seeds=seeds) for size in sizes or FamilyStore(path).sizes()
    ]


def _section(ds: xr.Dataset, *, include_incomplete: bool, transformer_lens: bool) -> Section:
    check_results(ds, REQUIRED)
    result = summary(ds, include_incomplete=include_incomplete)
    drawn = result.per_seed.index[~result.per_seed["left_out"].isin(NOT_DRAWN)]
    ds = ds.sel(seed=list(drawn))
    used = [int(seed) for seed in result.per_seed.index[result.per_seed["left_out"] == ""]]
    return Section(
        ds=ds,
        result=result,
        pca=token_loss_pca(ds),
        alignment=seed_alignment(ds, used) if len(used) > 1 else None,
        transformer_lens=transformer_lens,
    )


def _write_figures(section: Section, out: Path) -> list[tuple[Path, str, str]]:
    figures = []
    for name, (title, caption, draw) in FIGURES.items():
        figure = draw(section)
        if figure is None:  # nothing to draw (e.g. no copying scores)
            continue
        target = out / name
        figure.savefig(target, dpi=DPI)
        figures.append((target, title, caption))
    return figures


def _write_tables(result: Summary, out: Path) -> list[Path]:
    tables = [out / "summary.csv", out / "summary_across_seeds.csv", out / "summary.json"]
    result.per_seed.to_csv(tables[0])
    result.across_seeds.to_csv(tables[1], index_label="quantity")
    tables[2].write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
    return tables


def size_comparison(results: list[Summary]) -> pd.DataFrame:
    """One row per size: does it form induction heads, when, and its final loss.

    Parameters
    ----------
    results
        The summary of each size.

    Returns
    -------
    pandas.DataFrame
        ``size``, ``seeds used``, ``seeds with an induction head`` (``"2 of 3"``), ``best
        peak (mean)``, ``emergence midpoint`` and ``final loss`` (mean and CI across seeds).
    """
    rows = []
    for result in results:
        used = result.per_seed[result.per_seed["left_out"] == ""]
        cells = {}
        for name in ("emergence_midpoint_step", "final_loss"):
            row = result.across_seeds.loc[name]
            digits = 3 if name == "final_loss" else 0
            cells[name.replace("_", " ")] = _mean_ci(row, digits)
        rows.append(
            {
                "size": result.size,
                "seeds used": len(used),
                "seeds with an induction head": f"{int((used['n_induction_heads'] > 0).sum())} "
                f"of {len(used)}",
                "best peak (mean)": f"{used['best_head_peak'].mean():.2f}" if len(used) else "-",
                **cells,
            }
        )
    return pd.DataFrame(rows)


def _mean_ci(row: pd.Series, digits: int) -> str:
    if not np.isfinite(row["mean"]):
        return "-"
    text = f"{row['mean']:.{digits}f}"
    if np.isfinite(row["ci_low"]):
        text += f" [{row['ci_low']:.{digits}f}, {row['ci_high']:.{digits}f}]"
    return f"{text} (n = {int(row['n'])})"


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
    scale = ax.get_xscale()  # the top axis has the bottom axis' scale
    top.set_xscale(scale, **({"linthresh": per_step / 1e6} if scale == "symlog" else {}))
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


def _step_axis(ax, per_step: float, *, label: str = "checkpoint step") -> None:
    """The step axis every figure shares: symmetric log (step 0 included), tokens on top."""
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(left=0)
    ax.set_xlabel(label)
    _tokens_axis(ax, per_step)


def _legend_right(ax, handles=None) -> None:
    """A legend outside the data, to the right of the axes."""
    kwargs = {"handles": handles} if handles is not None else {}
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1), **kwargs)


def _legend_below(figure: Figure, axes) -> None:
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


def loss_curves(section: Section) -> Figure:
    """Training loss per step and held-out loss per checkpoint per seed (log steps)."""
    ds, result = section.ds, section.result
    per_step = tokens_per_step(ds)
    figure, axes = _panels(ds.sizes["seed"])
    any_bump = False
    for i, (ax, seed) in enumerate(zip(axes, ds["seed"].values, strict=True)):
        row = _row(result, seed)
        loss = ds["loss"].sel(seed=seed).dropna("train_step")
        if not loss.size:
            ax.text(0.5, 0.5, "no training loss recorded", ha="center", transform=ax.transAxes)
            ax.set_title(f"seed {seed}")
            continue
        loss = loss.sel(train_step=loss["train_step"] > 0)  # log axis
        steps, values = loss["train_step"].values, loss.values
        ax.plot(steps, values, color=_colour(i), alpha=0.25, lw=0.7, label="training, per step")
        ax.plot(*_log_binned(steps, values), color=_colour(i), lw=1.6, label="training, binned")
        held = _held_out_loss(ds, seed)
        if held is not None:
            ax.plot(held["step"], held, "D", color="k", ms=2.5, label="held-out (checkpoints)")
        if np.isfinite(row["bump_start_step"]):
            any_bump = True
            ax.axvspan(
                row["bump_start_step"],
                row["bump_end_step"],
                color="0.5",
                alpha=0.2,
                label="loss bump",
            )
        _mark_emergence(ax, row)
        ax.set_xscale("log")
        ax.set_title(_seed_title(row, seed))
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3, which="both", lw=0.5)
        _tokens_axis(ax, per_step)
    axes[0].set_ylabel("loss (nats)")
    _legend_below(figure, axes)
    title = "Training loss per step and held-out loss per checkpoint"
    figure.suptitle(title + ("; shaded: detected loss bump" if any_bump else ""))
    return figure


def _held_out_loss(ds: xr.Dataset, seed) -> xr.DataArray | None:
    """Mean held-out loss over positions per analysed checkpoint (from the icl analysis)."""
    if "loss_by_position" not in ds:
        return None
    held = ds["loss_by_position"].sel(seed=seed).mean("loss_position").dropna("step")
    held = held.sel(step=held["step"] > 0)
    return held if held.size else None


def _mark_emergence(ax, row: dict) -> None:
    """A dashed line at the seed's induction-head emergence midpoint, if it has one."""
    if np.isfinite(row["emergence_midpoint_step"]):
        ax.axvline(
            row["emergence_midpoint_step"], color="k", ls="--", lw=1, label="induction emergence"
        )


def _seed_title(row: dict, seed) -> str:
    notes = [] if row["status"] == "complete" else [f"incomplete, step {row['trained_steps']}"]
    if not np.isfinite(row["bump_start_step"]):
        notes.append("no bump")
    return f"seed {seed}" + (f" ({'; '.join(notes)})" if notes else "")


def _head_heatmaps(section: Section, variable: str, *, label: str, cmap: str, vmin: float):
    """``variable[step, layer, head]`` of every head over the checkpoints, a panel per seed."""
    ds, result = section.ds, section.result
    n_seeds = ds.sizes["seed"]
    layers, heads = ds["layer"].values, ds["head"].values
    labels = [head_label(layer, head) for layer in layers for head in heads]
    figure = Figure(figsize=(9, 0.8 + n_seeds * (0.9 + 0.22 * len(labels))), layout="constrained")
    axes = figure.subplots(n_seeds, 1, sharex=True, squeeze=False)[:, 0]
    for ax, seed in zip(axes, ds["seed"].values, strict=True):
        scores = _analysed(ds[variable].sel(seed=seed))
        steps = scores["step"].values
        grid = scores.transpose("layer", "head", "step").values.reshape(len(labels), len(steps))
        edges = np.concatenate([[steps[0]], (steps[1:] + steps[:-1]) / 2, [steps[-1]]])
        mesh = ax.pcolormesh(edges, np.arange(len(labels) + 1), grid, cmap=cmap, vmin=vmin, vmax=1)
        for boundary in range(len(heads), len(labels), len(heads)):
            ax.axhline(boundary, color="w", lw=1)  # between layers
        row = _row(result, seed)
        if np.isfinite(row["emergence_midpoint_step"]):
            ax.axvline(row["emergence_midpoint_step"], color="w", ls="--", lw=1)
        ax.set_yticks(np.arange(len(labels)) + 0.5, labels, fontsize="small")
        ax.invert_yaxis()  # L0H0 on top
        ax.set_ylabel("head")
        ax.set_xscale("symlog", linthresh=1)
        formed = row["induction_heads"] or "none"
        ax.set_title(
            f"{_seed_title(row, seed)}: induction heads (peak >= {result.threshold:g}): {formed}",
            fontsize="medium",
        )
    midpoints = np.isfinite(result.per_seed["emergence_midpoint_step"]).any()
    axes[-1].set_xlabel(
        "checkpoint step (log)" + (", dashed: induction emergence midpoint" if midpoints else "")
    )
    _tokens_axis(axes[0], tokens_per_step(ds))
    figure.colorbar(mesh, ax=axes, label=label, shrink=0.9)
    return figure


def induction_heatmaps(section: Section) -> Figure:
    """Induction score of every head over the checkpoints, one panel per seed."""
    figure = _head_heatmaps(
        section, "induction_score", label="induction score", cmap="viridis", vmin=0
    )
    figure.suptitle("Induction score of every head over training")
    return figure


def induction_heatmaps_tl(section: Section) -> Figure | None:
    """Induction score in the TransformerLens convention (``report --transformer-lens``)."""
    if not section.transformer_lens or "tl_induction_score" not in section.ds:
        return None
    figure = _head_heatmaps(
        section,
        "tl_induction_score",
        label="TransformerLens induction score",
        cmap="viridis",
        vmin=0,
    )
    figure.suptitle("Induction score of every head, TransformerLens convention (detect_head)")
    return figure


def copying_heatmaps(section: Section) -> Figure | None:
    """Copying score of every head over the checkpoints, one panel per seed."""
    ds = section.ds
    if "copying_score" not in ds or not bool(ds["copying_score"].notnull().any()):
        return None
    figure = _head_heatmaps(section, "copying_score", label="copying score", cmap="RdBu", vmin=-1)
    figure.suptitle("Copying score of every head over training (+1: copies what it attends to)")
    return figure


def induction_emergence(section: Section) -> Figure:
    """The best head's induction score per seed, with the emergence steps across seeds."""
    ds, result = section.ds, section.result
    figure = Figure(figsize=(9.5, 4.8), layout="constrained")
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
        if row["left_out"]:
            label += f" [{row['left_out']}: not in the CI]"
        ax.plot(scores["step"], scores, color=_colour(i), marker=".", ms=3, lw=1.3, label=label)
    ax.axhline(result.threshold, color="0.3", ls=":", lw=1, label=f"threshold {result.threshold:g}")
    stats = result.across_seeds.loc["emergence_midpoint_step"]
    if np.isfinite(stats["ci_low"]):
        ax.axvspan(
            stats["ci_low"],
            stats["ci_high"],
            color="0.6",
            alpha=0.25,
            label=f"{stats['confidence']:.0%} {CI_NAMES[stats['ci_method']]} of the mean "
            f"midpoint\n({stats['mean']:.0f}; n = {int(stats['n'])} seeds)",
        )
    convention = result.parameters.get("induction_score_convention")
    ax.set_ylabel("induction score" + (f" ({convention.replace('_', ' ')})" if convention else ""))
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3, lw=0.5)
    _legend_right(ax)
    _step_axis(ax, tokens_per_step(ds))
    ax.set_title("Induction score of each seed's best head; dashed: emergence midpoints")
    return figure


def icl_scores(section: Section) -> Figure:
    """ICL score over training per seed, each seed's loss bump shaded."""
    ds, result = section.ds, section.result
    figure = Figure(figsize=(9.5, 4.5), layout="constrained")
    ax = figure.subplots()
    any_bump = False
    for i, seed in enumerate(ds["seed"].values):
        icl = ds["icl_score"].sel(seed=seed).dropna("step")
        ax.plot(icl["step"], icl, color=_colour(i), lw=1.4, label=f"seed {seed}")
        row = _row(result, seed)
        if np.isfinite(row["bump_start_step"]):
            any_bump = True
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
    ax.grid(alpha=0.3, lw=0.5)
    _legend_right(ax)
    _step_axis(ax, tokens_per_step(ds))
    title = "In-context-learning score (lower: more use of context)"
    ax.set_title(title + ("; shaded: loss bumps" if any_bump else ""))
    return figure


def loss_by_position(section: Section) -> Figure | None:
    """Held-out loss against token position at a few checkpoints, one panel per seed."""
    ds = section.ds
    if "loss_by_position" not in ds or not bool(ds["loss_by_position"].notnull().any()):
        return None
    figure, axes = _panels(ds.sizes["seed"])
    steps = ds["step"].values
    norm = LogNorm(max(steps.min(), 1), max(steps.max(), 2))
    for ax, seed in zip(axes, ds["seed"].values, strict=True):
        losses = _analysed(ds["loss_by_position"].sel(seed=seed))
        analysed = losses["step"].values
        targets = np.geomspace(max(analysed[0], 1), analysed[-1], 7)
        picks = np.unique([np.abs(analysed - target).argmin() for target in targets])
        position = np.arange(losses.shape[-1]) + 1  # predicting token position + 1
        for pick in picks:
            colour = colormaps["viridis"](norm(max(analysed[pick], 1)))
            ax.plot(position, losses.isel(step=pick), color=colour, lw=1.3)
        ax.set_xscale("log")
        ax.set_title(_seed_title(_row(section.result, seed), seed))
        ax.set_xlabel("token position in the context")
        ax.grid(alpha=0.3, which="both", lw=0.5)
    axes[0].set_ylabel("held-out loss (nats)")
    figure.colorbar(ScalarMappable(norm, "viridis"), ax=axes, label="checkpoint step")
    figure.suptitle(
        "Loss by token position at 7 checkpoints (Olsson et al.): late tokens gain once the "
        "induction heads form"
    )
    return figure


def loss_pca_trajectories(section: Section) -> Figure:
    """The per-token-loss PCA trajectory (PC1 vs PC2) of every seed, coloured by step."""
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
        midpoint = _row(result, seed)["emergence_midpoint_step"]
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
    _legend_right(ax, handles)
    figure.colorbar(lines, ax=ax, label="checkpoint step", location="left")
    ax.set_title("Per-token-loss PCA, one joint fit over every checkpoint of every seed")
    return figure


def previous_token_scores(section: Section) -> Figure:
    """Previous-token score of the layer-0 heads, one panel per seed."""
    ds, result = section.ds, section.result
    per_step = tokens_per_step(ds)
    figure, axes = _panels(ds.sizes["seed"])
    layer = ds["layer"].values[0]
    for ax, seed in zip(axes, ds["seed"].values, strict=True):
        scores = _analysed(ds["previous_token_score"].sel(seed=seed, layer=layer))
        for j, head in enumerate(scores["head"].values):
            trajectory = scores.sel(head=head)
            ax.plot(scores["step"], trajectory, color=_colour(j), label=head_label(layer, head))
        row = _row(result, seed)
        _mark_emergence(ax, row)
        ax.set_title(_seed_title(row, seed))
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3, lw=0.5)
        _step_axis(ax, per_step)
    axes[0].set_ylabel("previous-token score")
    _legend_below(figure, axes)
    figure.suptitle(f"Previous-token score of the layer-{layer} heads")
    return figure


def seed_similarity(section: Section) -> Figure | None:
    """Linear CKA of each seed's head-score profile with the reference seed's, over training."""
    alignment = section.alignment
    if alignment is None or not np.isfinite(alignment.cka.values).any():
        return None
    figure = Figure(figsize=(9.5, 4.2), layout="constrained")
    ax = figure.subplots()
    for i, seed in enumerate(alignment.cka["seed"].values):
        cka = alignment.cka.sel(seed=seed).dropna("step")
        ax.plot(
            cka["step"],
            cka,
            color=_colour(i + 1),
            lw=1.4,
            marker=".",
            ms=3,
            label=f"seed {seed} vs seed {alignment.reference}",
        )
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_ylabel("linear CKA (unbiased)")
    ax.grid(alpha=0.3, lw=0.5)
    _legend_right(ax)
    _step_axis(ax, tokens_per_step(section.ds))
    ax.set_title("Similarity of the seeds' heads (matched by Hungarian matching) over training")
    return figure


# file name -> (title, caption, drawing function; None: nothing to draw)
FIGURES: dict[str, tuple[str, str, Callable[[Section], Figure | None]]] = {
    "loss_curves.png": (
        "Training and held-out loss",
        "Per-step training loss of each seed on a log step axis (faint: every step; solid: "
        "mean over log-spaced bins) and the held-out loss at each analysed checkpoint "
        "(diamonds: mean over the icl analysis' held-out sequences and positions). Shaded: the "
        "loss bump found by change-point detection; dashed: the emergence midpoint of the "
        "seed's best induction head.",
        loss_curves,
    ),
    "induction_heatmaps.png": (
        "Induction score of every head",
        "Induction score of each head (rows, L<layer>H<head>) at every analysed checkpoint, one "
        "panel per seed, on the loss curves' log step axis. Head identities differ across "
        "seeds.",
        induction_heatmaps,
    ),
    "induction_heatmaps_tl.png": (
        "Induction score, TransformerLens convention",
        "The same heads scored as TransformerLens's detect_head does (sum of attention on the "
        "induction targets over all attention, every row): lower than the prefix-matching "
        "score on the same head.",
        induction_heatmaps_tl,
    ),
    "copying_heatmaps.png": (
        "Copying score of every head",
        "Re(sum of eigenvalues) / sum |eigenvalues| of each head's OV circuit W_E W_V W_O W_U "
        "(Elhage et al. 2021): +1 copies the attended token to the output, -1 suppresses it. "
        "Induction heads copy.",
        copying_heatmaps,
    ),
    "induction_emergence.png": (
        "Emergence of the induction head",
        "Induction score of each seed's best head, the threshold, each seed's emergence "
        "midpoint (dashed) and the CI of the mean midpoint across the seeds used (t-interval "
        "below 10 seeds).",
        induction_emergence,
    ),
    "icl_score.png": (
        "In-context-learning score",
        "Loss late in the context minus loss early in the context (Olsson et al.'s ICL score, "
        "scaled to the context length); it falls when the model starts using its context.",
        icl_scores,
    ),
    "loss_by_position.png": (
        "Loss by token position",
        "Held-out loss at each token position at seven checkpoints from early (dark) to late "
        "(yellow): after the phase change late tokens are predicted much better than early "
        "ones.",
        loss_by_position,
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
    "seed_similarity.png": (
        "Heads matched across seeds",
        "Heads of each seed matched one-to-one to the reference seed's by their induction-score "
        "trajectories (Hungarian algorithm); linear CKA (unbiased HSIC) of the matched heads' "
        "score profiles at every checkpoint both seeds analysed. 1: the seeds' heads play the "
        "same roles.",
        seed_similarity,
    ),
}


def ablation_effects(section: Section) -> Figure | None:
    """Increase in repeated-token loss when each head is ablated, one panel per seed."""
    ds, result = section.ds, section.result
    if "repeated_loss_increase" not in ds:
        return None
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
        _layer_ablations(ax, ds, seed)
        if np.isfinite(row["emergence_midpoint_step"]):
            ax.axvline(row["emergence_midpoint_step"], color="k", ls="--", lw=1)
        ax.set_title(f"seed {seed}")
        ax.set_xlabel("checkpoint step")
        ax.grid(alpha=0.3, lw=0.5)
        ax.legend(fontsize="x-small", ncols=2)
        _tokens_axis(ax, per_step)
    axes[0].set_ylabel("loss increase on repeated tokens (nats)")
    figure.suptitle("Head ablation: loss increase when a head's (dotted: a layer's) output is gone")
    return figure


def _layer_ablations(ax, ds: xr.Dataset, seed) -> None:
    """Dotted: every head of a layer ablated at once (stores analysed before it lack it)."""
    if "repeated_layer_loss_increase" not in ds:
        return
    effect = _analysed(ds["repeated_layer_loss_increase"].sel(seed=seed))
    for layer in effect["layer"].values:
        ax.plot(
            effect["step"],
            effect.sel(layer=layer),
            color="0.2" if layer % 2 else "0.55",
            ls=":",
            lw=1.5,
            label=f"all of layer {layer}",
        )


def _pattern_steps(steps: np.ndarray, midpoint: float) -> list[int]:
    """Four checkpoints across the phase change: first, halfway to it, at it, last."""
    if not np.isfinite(midpoint):
        midpoint = float(np.median(steps))
    targets = [steps[0], midpoint / 2, midpoint, steps[-1]]
    return sorted({int(steps[np.abs(steps - t).argmin()]) for t in targets})


def attention_stripes(section: Section) -> Figure | None:
    """Each seed's best induction and previous-token heads' patterns across the phase change."""
    ds, result = section.ds, section.result
    if "attention_pattern" not in ds:
        return None
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


TRACE_WINDOW = 8  # SGLD steps averaged in the convergence panel: minibatch losses differ


def llc_curves(section: Section) -> Figure | None:
    """The LLC of every seed over training (band: +-1 sd over chains) and SGLD loss traces."""
    ds, result = section.ds, section.result
    if "llc" not in ds:
        return None
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    curves, traces = figure.subplots(1, 2, width_ratios=(2, 1))
    for i, seed in enumerate(ds["seed"].values):
        llc = ds["llc"].sel(seed=seed).dropna("step")
        std = ds["llc_std"].sel(seed=seed, step=llc["step"])
        curves.plot(llc["step"], llc, color=_colour(i), marker=".", lw=1.4, label=f"seed {seed}")
        curves.fill_between(llc["step"], llc - std, llc + std, color=_colour(i), alpha=0.15)
        midpoint = _row(result, seed)["emergence_midpoint_step"]
        if np.isfinite(midpoint):
            curves.axvline(midpoint, color=_colour(i), ls="--", lw=1)
    curves.set_ylabel("estimated LLC")
    curves.grid(alpha=0.3, lw=0.5)
    _legend_right(curves)
    _step_axis(curves, tokens_per_step(ds))
    curves.set_title("Local learning coefficient; dashed: emergence midpoints")
    first = ds["seed"].values[0]
    trace = _analysed(ds["llc_loss_trace"].sel(seed=first))
    chosen = _pattern_steps(trace["step"].values, math.nan)
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


# Drawn when the store has head_ablation / attention_patterns / llc results.
FIGURES |= {
    "head_ablation.png": (
        "Head ablation",
        "Increase in loss on the repeated part of the probe when one head's output (its z "
        "before W_O) is ablated, per head and checkpoint (thick: the seed's best induction "
        "head; dashed: its emergence midpoint; dotted: every head of a layer ablated at "
        "once). An induction head that computes, rather than only attends, hurts once the "
        "circuit has formed; where several heads of a layer all become induction heads (all "
        "four layer-1 heads of the demo family do after the phase change), removing one costs "
        "little, since the others copy too, while removing the layer destroys the copying; "
        "the previous-token head they all read from is then the one head whose removal hurts "
        "most.",
        ablation_effects,
    ),
    "attention_patterns.png": (
        "Attention patterns across the phase change",
        "Attention of each seed's best induction head and best previous-token head on one "
        "probe sequence (a random block repeated), at the first checkpoint, halfway to the "
        "emergence midpoint, at it and at the last checkpoint (query down, key across). The "
        "previous-token head is a stripe just below the diagonal; the induction head's stripe "
        "one block back (offset block length - 1) appears across the phase change.",
        attention_stripes,
    ),
    "llc.png": (
        "Local learning coefficient",
        "LLC of each checkpoint estimated by SGLD (devinterp; step size, localisation, n*beta, "
        "chains and draws as in the llc analysis' attributes, the same for every checkpoint), "
        "on the held-out sequences; band: +-1 sd over chains. Hoogland et al. 2024 read "
        "developmental stages off its plateaus. Right: the chains' mean SGLD loss at four "
        "checkpoints of the first seed (running mean over 8 SGLD steps, which see different "
        "minibatches); a trace still drifting at the end means the estimate has not "
        "converged.",
        llc_curves,
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


def _html(rendered: list[tuple[Section, list[tuple[Path, str, str]]]]) -> str:
    several = len(rendered) > 1
    title = rendered[0][0].result.title if not several else "Circuit formation across sizes"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p class='note'>Interactive version (hover for head, step and value): "
        "<a href='report_interactive.html'>report_interactive.html</a>.</p>",
    ]
    if several:
        comparison = size_comparison([section.result for section, _ in rendered])
        parts += [
            "<h2>Sizes compared</h2>",
            comparison.to_html(index=False, border=0),
        ]
    for section, figures in rendered:
        parts += _size_html(section, figures, heading="h2" if several else None)
    parts.append("</body></html>")
    return "\n".join(parts)


def _size_html(section: Section, figures: list[tuple[Path, str, str]], heading: str | None):
    result = section.result
    per_seed, across = result.tables()
    sub = "h3" if heading else "h2"
    parts = [f"<{heading}>{html.escape(result.title)}</{heading}>"] if heading else []
    parts += [
        f"<p class='note'>{html.escape(result.note)}.</p>",
        f"<{sub}>Per seed</{sub}>",
        per_seed.to_html(index=False, border=0),
        f"<{sub}>Across seeds</{sub}><p class='note'>{html.escape(result.across_note)}</p>",
        across.to_html(index=False, border=0),
    ]
    if len(result.variance):
        parts += [
            f"<p class='note'>{html.escape(result.variance_note)}.</p>",
            result.variance_text().to_html(index=False, border=0),
        ]
    if section.alignment is not None:
        parts += _alignment_html(section, sub)
    parts += [
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
            f"<figure><{sub}>{html.escape(title)}</{sub}>",
            f'<img src="data:image/png;base64,{data}" alt="{html.escape(title)}">',
            f"<figcaption>{html.escape(text)}</figcaption></figure>",
        ]
    return parts


def _alignment_html(section: Section, sub: str) -> list[str]:
    """The heads of the reference seed's induction heads, matched in every other seed."""
    alignment, result = section.alignment, section.result
    formed = result.per_seed.loc[alignment.reference, "induction_heads"]
    heads = [head for head in formed.split(", ") if head] or [
        result.per_seed.loc[alignment.reference, "best_head"]
    ]
    table = alignment.matches[alignment.matches["reference_head"].isin(heads)].copy()
    table["distance"] = table["distance"].map(lambda d: f"{d:.2f}")
    return [
        f"<{sub}>Heads matched across seeds</{sub}>",
        f"<p class='note'>The induction heads of seed {alignment.reference} and their "
        "matches in the other seeds (Hungarian matching of induction-score trajectories; "
        "distance: Euclidean, over the common checkpoints). CKA: "
        f"{html.escape(alignment.rule)}.</p>",
        table.to_html(index=False, border=0),
    ]
