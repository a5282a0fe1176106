"""The interactive report page: plotly figures in one self-contained HTML file.

plotly.js is embedded in the page (``include_plotlyjs=True``), so it opens offline; hovering
over a heatmap cell shows the seed, head, step and value.  For a text family, one head's attention
on held-out text is drawn too, with the query and key tokens' text under the cursor; where
the results hold per-token losses, a timeline of every seed's transitions
(:mod:`observatory.report.transitions`) with each one's window, heads and examples under the
cursor. The static PNG report (:mod:`observatory.report`) stays the reference; this page
shows the same results.
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import xarray as xr
from plotly.subplots import make_subplots

from observatory.report.declared import heatmaps as declared_heatmaps
from observatory.report.summary import Summary, head_label
from observatory.report.text import TextExamples

# matplotlib's tab10, the static figures' colours
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip
SEGMENT_POINTS = 24  # points along a transition's segment: hovering anywhere on it answers
LANES = 0.8  # the share of a seed's row that its transitions' lanes fill
SHOWN_HEADS = 5  # heads named in a transition's hover text


def page(
    sections: list[
        tuple[Summary, xr.Dataset]
        | tuple[Summary, xr.Dataset, TextExamples | None]
        | tuple[Summary, xr.Dataset, TextExamples | None, pd.DataFrame | None]
    ],
    *,
    transformer_lens: bool = False,
) -> str:
    """The interactive page of one or more sizes of a family.

    Parameters
    ----------
    sections
        ``(summary, results)``, ``(summary, results, text)`` or ``(summary, results, text,
        transitions)`` per size; ``results`` as from
        :func:`~observatory.report.results.load_results`, restricted to the seeds to draw;
        ``text``: a text family's examples, whose attention pattern is drawn with each
        token's text under the cursor; ``transitions``: the size's transition table
        (:func:`~observatory.report.transitions.transition_table`), drawn as a timeline.
        ``None`` for either: not drawn.
    transformer_lens
        Also show the TransformerLens-convention induction scores (``tl_induction_score``).

    Returns
    -------
    str
        A complete HTML document with plotly.js embedded (no network access needed).
    """
    parts = []
    first = True
    for result, ds, *extra in sections:
        text, found = (*extra, None, None)[:2]
        if len(sections) > 1:
            parts.append(f"<h2>{html.escape(result.title)}</h2>")
        drawn = figures(ds, result, transformer_lens=transformer_lens)
        if found is not None:
            drawn.append(transition_timeline(found))
        if text is not None:
            drawn.append(token_attention(text))
        for figure in drawn:
            parts.append(
                figure.to_html(full_html=False, include_plotlyjs=first, config={"responsive": True})
            )
            first = False
    title = html.escape(sections[0][0].title if len(sections) == 1 else "Circuit formation")
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{title} (interactive)</title>",
            "<style>body { font-family: system-ui, sans-serif; margin: 1em 2em; }</style>",
            "</head><body>",
            f"<h1>{title}</h1>",
            "<p>Hover for values; drag to zoom, double-click to reset. Step axes are "
            "logarithmic (step 0 is not shown).</p>",
            *parts,
            "</body></html>",
        ]
    )


def figures(ds: xr.Dataset, result: Summary, *, transformer_lens: bool = False) -> list[go.Figure]:
    """The interactive figures of one size: losses, head-score heatmaps, emergence, ICL.

    A heatmap for every per-head variable whose analysis declares one
    (``@analysis(heatmaps=...)``); the ``tl_*`` ones only with ``transformer_lens``.
    """
    out = [losses(ds)]
    for variable in declared_heatmaps():
        wanted = transformer_lens or not variable.startswith("tl_")
        if wanted and variable in ds and bool(ds[variable].notnull().any()):
            out.append(heatmaps(ds, variable))
    out.append(emergence_lines(ds, result))
    if "icl_score" in ds:
        out.append(_lines(ds["icl_score"], "ICL score (late minus early token loss, nats)"))
    return out


def token_attention(text: TextExamples) -> go.Figure:
    """One head's attention on a held-out window; hover: query and key tokens, as text."""
    tokens = [html.escape(repr(token)) for token in text.tokens]  # plotly renders some HTML
    hover = [
        [f"query {q}: {tokens[q]}<br>key {k}: {tokens[k]}" for k in range(len(tokens))]
        for q in range(len(tokens))
    ]
    positions = list(range(len(tokens)))
    figure = go.Figure(
        go.Heatmap(
            z=text.pattern,
            x=positions,
            y=positions,
            text=hover,
            colorscale="Viridis",
            zmin=0,
            zmax=1,
            colorbar={"title": "attention"},
            hovertemplate="%{text}<br>attention %{z:.3f}<extra></extra>",
        )
    )
    axis = {"tickvals": positions, "ticktext": tokens, "tickfont": {"size": 9}}
    figure.update_xaxes(title="key token", **axis)
    figure.update_yaxes(title="query token", autorange="reversed", **axis)
    figure.update_layout(
        title=f"Attention of {text.head} (seed {text.seed}, step {text.after}) on held-out text",
        height=300 + 14 * len(tokens),
        width=300 + 14 * len(tokens),
    )
    return figure


def transition_timeline(table: pd.DataFrame) -> go.Figure:
    """Every seed's transitions (rows) as segments over their windows, a lane per matched
    transition; hover: its id, seed, window, loss drop, tokens, heads and examples.

    Universal transitions (in every seed) are drawn solid, the others dashed and lighter.
    """
    seeds = [int(seed) for seed in table.attrs.get("seeds", sorted(set(table["seed"])))]
    ids = sorted(set(table["transition"]))
    figure = go.Figure()
    named: set[int] = set()  # transitions already in the legend
    for found in table.itertuples(index=False):
        lane = LANES * ((ids.index(found.transition) + 0.5) / len(ids) - 0.5)
        steps = np.geomspace(max(found.start_step, 1.0), max(found.end_step, 1.0), SEGMENT_POINTS)
        hover = _transition_hover(found)
        figure.add_scatter(
            x=steps,
            y=np.full(SEGMENT_POINTS, seeds.index(int(found.seed)) + lane),
            mode="lines",
            line={
                "color": PALETTE[found.transition % len(PALETTE)],
                "width": 10,
                "dash": "solid" if found.universal else "dash",
            },
            opacity=0.9 if found.universal else 0.5,
            name=f"T{found.transition}" + (" (every seed)" if found.universal else ""),
            legendgroup=str(found.transition),
            showlegend=found.transition not in named,
            text=[hover] * SEGMENT_POINTS,
            hovertemplate="%{text}<extra></extra>",
        )
        named.add(found.transition)
    if not len(table):
        figure.add_annotation(
            text=f"no transitions found in {len(seeds)} seeds",
            x=0.5,
            y=0.5,
            xref="paper",
            yref="paper",
            showarrow=False,
        )
    figure.update_yaxes(
        tickvals=list(range(len(seeds))),
        ticktext=[f"seed {seed}" for seed in seeds],
        range=[len(seeds) - 0.5, -0.5],
        title="seed",
    )
    figure.update_layout(
        title="Transitions of each seed: windows of abrupt drop of a token group's loss",
        xaxis={"type": "log", "title": "checkpoint step"},
        hovermode="closest",
        height=200 + len(seeds) * (30 + 16 * len(ids)),
    )
    return figure


def _transition_hover(found) -> str:
    """A row of the transition table as hover text (escaped: plotly renders some HTML)."""
    heads = [head for head in found.components.split("; ") if head]
    named = "; ".join(heads[:SHOWN_HEADS]) + (" ..." if len(heads) > SHOWN_HEADS else "")
    where = "universal (every seed)" if found.universal else f"in {found.n_seeds} seeds"
    lines = [
        f"transition T{found.transition}, seed {found.seed}: {where}",
        f"window: steps {found.start_step:.0f}-{found.end_step:.0f}",
        f"loss drop {found.loss_drop:.2f} nats on {found.n_tokens} tokens",
        f"heads: {named or 'none changed'}",
        *(f"e.g. {example}" for example in found.examples.split(" | ") if example),
    ]
    return "<br>".join(html.escape(line) for line in lines)


def _later(values: xr.DataArray, dim: str = "step") -> xr.DataArray:
    return values.sel({dim: values[dim] > 0})


def losses(ds: xr.Dataset) -> go.Figure:
    """Training loss per step and held-out loss per checkpoint, per seed (log steps)."""
    figure = go.Figure()
    for i, seed in enumerate(ds["seed"].values):
        colour = PALETTE[i % len(PALETTE)]
        loss = _later(ds["loss"].sel(seed=seed).dropna("train_step"), "train_step")
        figure.add_scatter(
            x=loss["train_step"].values,
            y=loss.values,
            name=f"seed {seed}: training",
            line={"color": colour, "width": 1},
            opacity=0.6,
            hovertemplate=f"seed {seed}<br>step %{{x}}<br>training loss %{{y:.4f}}<extra></extra>",
        )
        if "loss_by_position" in ds:
            held = _later(
                ds["loss_by_position"].sel(seed=seed).mean("loss_position").dropna("step")
            )
            figure.add_scatter(
                x=held["step"].values,
                y=held.values,
                mode="markers",
                name=f"seed {seed}: held-out",
                marker={"color": colour, "size": 6, "symbol": "diamond"},
                hovertemplate=f"seed {seed}<br>step %{{x}}<br>held-out loss %{{y:.4f}}"
                "<extra></extra>",
            )
    figure.update_layout(
        title="Training loss (lines) and held-out loss (diamonds)",
        xaxis={"type": "log", "title": "training step"},
        yaxis={"title": "loss (nats)"},
        height=420,
    )
    return figure


def heatmaps(ds: xr.Dataset, variable: str) -> go.Figure:
    """One heatmap of ``variable[step, layer, head]`` per seed; hover: head, step, value."""
    style = declared_heatmaps()[variable]
    seeds = ds["seed"].values
    layers, heads = ds["layer"].values, ds["head"].values
    labels = [head_label(layer, head) for layer in layers for head in heads]
    figure = make_subplots(
        rows=len(seeds),
        cols=1,
        shared_xaxes=True,
        subplot_titles=[f"seed {seed}" for seed in seeds],
        vertical_spacing=0.3 / max(len(seeds), 1),
    )
    for row, seed in enumerate(seeds, start=1):
        values = ds[variable].sel(seed=seed).transpose("step", "layer", "head")
        values = _later(values.isel(step=values.notnull().all(["layer", "head"]).values))
        grid = values.values.reshape(len(values["step"]), len(labels)).T  # [head, step]
        figure.add_heatmap(
            x=values["step"].values,
            y=labels,
            z=grid,
            zmin=style.low,
            zmax=style.high,
            colorscale=style.colours,
            showscale=row == 1,
            colorbar={"title": style.title.split(",")[0]},
            hovertemplate=f"seed {seed}<br>head %{{y}}<br>step %{{x}}<br>{variable} "
            "%{z:.3f}<extra></extra>",
            row=row,
            col=1,
        )
        figure.update_yaxes(autorange="reversed", row=row, col=1)
        figure.update_xaxes(type="log", row=row, col=1)
    figure.update_xaxes(title="checkpoint step", row=len(seeds), col=1)
    figure.update_layout(
        title=f"{style.title} of every head over training",
        height=160 + len(seeds) * (40 + 22 * len(labels)),
    )
    return figure


def emergence_lines(ds: xr.Dataset, result: Summary) -> go.Figure:
    """Each seed's best head's induction score over training, with the threshold."""
    figure = go.Figure()
    for i, seed in enumerate(ds["seed"].values):
        row = result.per_seed.loc[int(seed)]
        if not row["best_head"]:
            continue
        scores = ds["induction_score"].sel(
            seed=seed, layer=row["best_layer"], head=row["best_head_in_layer"]
        )
        scores = _later(scores.dropna("step"))
        figure.add_scatter(
            x=scores["step"].values,
            y=scores.values,
            mode="lines+markers",
            name=f"seed {seed}: {row['best_head']}",
            line={"color": PALETTE[i % len(PALETTE)]},
            hovertemplate=f"seed {seed}, head {row['best_head']}<br>step %{{x}}<br>"
            "induction score %{y:.3f}<extra></extra>",
        )
    figure.add_hline(
        y=result.threshold,
        line_dash="dot",
        annotation_text=f"threshold {result.threshold:g}",
    )
    figure.update_layout(
        title="Induction score of each seed's best head",
        xaxis={"type": "log", "title": "checkpoint step"},
        yaxis={"title": "induction score", "range": [0, 1.02]},
        height=420,
    )
    return figure


def _lines(values: xr.DataArray, label: str) -> go.Figure:
    figure = go.Figure()
    for i, seed in enumerate(values["seed"].values):
        one = _later(values.sel(seed=seed).dropna("step"))
        if not one.size:
            continue
        figure.add_scatter(
            x=one["step"].values,
            y=np.asarray(one.values),
            name=f"seed {seed}",
            line={"color": PALETTE[i % len(PALETTE)]},
            hovertemplate=f"seed {seed}<br>step %{{x}}<br>%{{y:.3f}}<extra></extra>",
        )
    figure.update_layout(
        title=label,
        xaxis={"type": "log", "title": "checkpoint step"},
        yaxis={"title": label.split(" (")[0]},
        height=400,
    )
    return figure
