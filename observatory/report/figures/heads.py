"""Figures of the heads: score heatmaps, emergence, previous-token heads, OV/QK circuits, seeds."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from observatory.report.declared import heatmaps
from observatory.report.figures import common
from observatory.report.registry import Section, figure
from observatory.report.summary import head_label, tokens_per_step

CI_NAMES = {"t": "t-interval", "bca": "BCa bootstrap CI"}


def head_heatmaps(section: Section, variable: str, suptitle: str) -> Figure | None:
    """``variable[step, layer, head]`` of every head over the checkpoints, a panel per seed.

    Drawn as its analysis declares (:class:`~observatory.analysis.protocol.Heatmap`: title,
    colours, range); None where no seed has results of it.
    """
    ds, result = section.ds, section.result
    if variable not in ds or not bool(ds[variable].notnull().any()):
        return None
    style = heatmaps()[variable]
    n_seeds = ds.sizes["seed"]
    layers, heads = ds["layer"].values, ds["head"].values
    labels = [head_label(layer, head) for layer in layers for head in heads]
    figure = Figure(figsize=(9, 0.8 + n_seeds * (0.9 + 0.22 * len(labels))), layout="constrained")
    axes = figure.subplots(n_seeds, 1, sharex=True, squeeze=False)[:, 0]
    for ax, seed in zip(axes, ds["seed"].values, strict=True):
        scores = common.analysed_only(ds[variable].sel(seed=seed))
        steps = scores["step"].values
        grid = scores.transpose("layer", "head", "step").values.reshape(len(labels), len(steps))
        edges = np.concatenate([[steps[0]], (steps[1:] + steps[:-1]) / 2, [steps[-1]]])
        mesh = ax.pcolormesh(
            edges,
            np.arange(len(labels) + 1),
            grid,
            cmap=style.colours,
            vmin=style.low,
            vmax=style.high,
        )
        for boundary in range(len(heads), len(labels), len(heads)):
            ax.axhline(boundary, color="w", lw=1)  # between layers
        row = common.seed_row(result, seed)
        if np.isfinite(row["emergence_midpoint_step"]):
            ax.axvline(row["emergence_midpoint_step"], color="w", ls="--", lw=1)
        ax.set_yticks(np.arange(len(labels)) + 0.5, labels, fontsize="small")
        ax.invert_yaxis()  # L0H0 on top
        ax.set_ylabel("head")
        ax.set_xscale("symlog", linthresh=1)
        formed = row["induction_heads"] or "none"
        peak = f"peak >= {result.threshold:g}"
        ax.set_title(
            f"{common.seed_title(row, seed)}: induction heads ({peak}): {formed}",
            fontsize="medium",
        )
    midpoints = np.isfinite(result.per_seed["emergence_midpoint_step"]).any()
    axes[-1].set_xlabel(
        "checkpoint step (log)" + (", dashed: induction emergence midpoint" if midpoints else "")
    )
    common.tokens_axis(axes[0], tokens_per_step(ds))
    figure.colorbar(mesh, ax=axes, label=style.title, shrink=0.9)
    figure.suptitle(suptitle)
    return figure


@figure(
    "induction_heatmaps.png",
    title="Induction score of every head",
)
def induction_heatmaps(section: Section) -> Figure | None:
    """Induction score of each head (rows, L<layer>H<head>) at every analysed checkpoint, one panel
    per seed, on the loss curves' log step axis. Head identities differ across seeds.
    """
    return head_heatmaps(section, "induction_score", "Induction score of every head over training")


@figure(
    "induction_heatmaps_tl.png",
    title="Induction score, TransformerLens convention",
)
def induction_heatmaps_tl(section: Section) -> Figure | None:
    """The same heads scored as TransformerLens's detect_head does (sum of attention on the
    induction targets over all attention, every row): lower than the prefix-matching score on the
    same head.
    """
    if not section.transformer_lens:
        return None
    return head_heatmaps(
        section,
        "tl_induction_score",
        "Induction score of every head, TransformerLens convention (detect_head)",
    )


@figure(
    "copying_heatmaps.png",
    title="Copying score of every head",
)
def copying_heatmaps(section: Section) -> Figure | None:
    """Re(sum of eigenvalues) / sum |eigenvalues| of each head's OV circuit W_E W_V W_O W_U (Elhage
    et al. 2021): +1 copies the attended token to the output, -1 suppresses it. Induction heads
    copy.
    """
    return head_heatmaps(
        section,
        "copying_score",
        "Copying score of every head over training (+1: copies what it attends to)",
    )


@figure(
    "induction_emergence.png",
    title="Emergence of the induction head",
)
def induction_emergence(section: Section) -> Figure:
    """Induction score of each seed's best head, the threshold, each seed's emergence midpoint
    (dashed) and the CI of the mean midpoint across the seeds used (t-interval below 10 seeds).
    """
    ds, result = section.ds, section.result
    figure = Figure(figsize=(9.5, 4.8), layout="constrained")
    ax = figure.subplots()
    for i, seed in enumerate(ds["seed"].values):
        row = common.seed_row(result, seed)
        best = {"layer": row["best_layer"], "head": row["best_head_in_layer"]}
        scores = common.analysed_only(ds["induction_score"].sel(seed=seed, **best))
        midpoint = row["emergence_midpoint_step"]
        label = f"seed {seed}: {row['best_head']}"
        if np.isfinite(midpoint):
            label += f", midpoint {midpoint:.0f}"
            ax.axvline(midpoint, color=common.tab_colour(i), ls="--", lw=1)
        else:
            label += f" (never reaches {result.threshold:g})"
        if row["left_out"]:
            label += f" [{row['left_out']}: not in the CI]"
        ax.plot(
            scores["step"],
            scores,
            color=common.tab_colour(i),
            marker=".",
            ms=3,
            lw=1.3,
            label=label,
        )
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
    common.legend_right(ax)
    common.step_axis(ax, tokens_per_step(ds))
    ax.set_title("Induction score of each seed's best head; dashed: emergence midpoints")
    return figure


@figure(
    "previous_token_layer0.png",
    title="Previous-token heads",
)
def previous_token_scores(section: Section) -> Figure:
    """Previous-token score of the first layer's heads: the heads an induction head in the next
    layer reads from.
    """
    ds, result = section.ds, section.result
    per_step = tokens_per_step(ds)
    figure, axes = common.panels(ds.sizes["seed"])
    layer = ds["layer"].values[0]
    for ax, seed in zip(axes, ds["seed"].values, strict=True):
        scores = common.analysed_only(ds["previous_token_score"].sel(seed=seed, layer=layer))
        for j, head in enumerate(scores["head"].values):
            trajectory = scores.sel(head=head)
            ax.plot(
                scores["step"],
                trajectory,
                color=common.tab_colour(j),
                label=head_label(layer, head),
            )
        row = common.seed_row(result, seed)
        common.mark_emergence(ax, row)
        ax.set_title(common.seed_title(row, seed))
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3, lw=0.5)
        common.step_axis(ax, per_step)
    axes[0].set_ylabel("previous-token score")
    common.legend_below(figure, axes)
    figure.suptitle(f"Previous-token score of the layer-{layer} heads")
    return figure


@figure(
    "circuits.png",
    title="OV and QK circuits across the bump",
)
def circuit_trajectories(section: Section) -> Figure | None:
    """Frobenius norm (left) and effective rank (right: exp of the entropy of the circuit's
    normalised singular values, Roy & Vetterli 2007; from 1 to d_head) of the OV circuit W_V W_O
    (solid) and the QK circuit W_Q W_K^T (dashed) of each seed's best induction head and of its
    head with the highest previous-token score, at every analysed checkpoint (biases, LayerNorm
    and rotary embeddings left out). Shaded: the loss bump; dashed: the induction emergence
    midpoint.
    """
    ds, result = section.ds, section.result
    if "ov_norm" not in ds or not bool(ds["ov_norm"].notnull().any()):
        return None
    seeds = ds["seed"].values
    figure = Figure(figsize=(10, 0.8 + 3.2 * len(seeds)), layout="constrained")
    axes = figure.subplots(len(seeds), 2, squeeze=False)
    for panels, seed in zip(axes, seeds, strict=True):
        row = common.seed_row(result, seed)
        heads = {"induction head": (row["best_layer"], row["best_head_in_layer"])}
        if "previous_token_score" in ds:
            heads["previous-token head"] = common.previous_token_head(ds, seed)
        for ax, quantity in zip(panels, ("norm", "effective_rank"), strict=True):
            _circuit_panel(ax, ds.sel(seed=seed), quantity, heads)
            common.shade_bump(ax, row)
            common.mark_emergence(ax, row)
            common.step_axis(ax, tokens_per_step(ds))
        named = ", ".join(f"{kind} {head_label(*at)}" for kind, at in heads.items())
        panels[0].set_title(
            f"{common.seed_title(row, seed)}: {named}", fontsize="medium", loc="left"
        )
        panels[0].set_ylabel("Frobenius norm")
        panels[1].set_ylabel("effective rank")
    common.legend_below(figure, axes.ravel())
    figure.suptitle("OV (solid) and QK (dashed) circuits of the induction and previous-token heads")
    return figure


def _circuit_panel(ax, ds, quantity: str, heads: dict[str, tuple[int, int]]) -> None:
    """One quantity of both circuits of each head, over the checkpoints that have it."""
    for j, (kind, (layer, head)) in enumerate(heads.items()):
        for circuit, style in (("ov", "-"), ("qk", "--")):
            values = common.analysed_only(ds[f"{circuit}_{quantity}"].sel(layer=layer, head=head))
            ax.plot(
                values["step"],
                values,
                color=common.tab_colour(j),
                ls=style,
                lw=1.4,
                label=f"{kind}, {circuit.upper()}",
            )
    ax.grid(alpha=0.3, lw=0.5)


@figure(
    "seed_similarity.png",
    title="Heads matched across seeds",
)
def seed_similarity(section: Section) -> Figure | None:
    """Heads of each seed matched one-to-one to the reference seed's by their induction-score
    trajectories (Hungarian algorithm); linear CKA (unbiased HSIC) of the matched heads' score
    profiles at every checkpoint both seeds analysed. 1: the seeds' heads play the same roles.
    """
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
            color=common.tab_colour(i + 1),
            lw=1.4,
            marker=".",
            ms=3,
            label=f"seed {seed} vs seed {alignment.reference}",
        )
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_ylabel("linear CKA (unbiased)")
    ax.grid(alpha=0.3, lw=0.5)
    common.legend_right(ax)
    common.step_axis(ax, tokens_per_step(section.ds))
    ax.set_title("Similarity of the seeds' heads (matched by Hungarian matching) over training")
    return figure
