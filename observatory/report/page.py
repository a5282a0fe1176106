"""The report's static HTML page: the summary tables and every figure, images embedded.

One self-contained file (PNG images as base64, no network access): the summary of each size,
the heads matched across seeds, the parameters recorded by the analysis job and every figure
with its title and caption; for a text family, its held-out text and the tokens that gain most
across the loss bump (:mod:`observatory.report.text`), under the attention patterns; where
the results hold per-token losses, the transitions matched across seeds
(:mod:`observatory.report.transitions`); for a store, the attribution section
(:mod:`observatory.report.attribution`) around its figure.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import pandas as pd

from observatory.report import tables
from observatory.report.attribution import attribution_html
from observatory.report.dynamics import dynamics_html
from observatory.report.registry import ReportFigure, Section
from observatory.report.summary import BRANCHES_NOTE
from observatory.report.text import text_html
from observatory.report.transitions import transition_summary

ATTENTION_FIGURE = "attention_patterns"  # a text family's text goes under it
ATTRIBUTION_FIGURE = "attribution"  # the attribution section goes around it
DYNAMICS_FIGURE = "dynamics"  # the dynamics section goes above it
# (a written figure's file, its declaration)
Drawn = tuple[Path, ReportFigure]

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.8em; text-align: right; }
th { background: #f3f3f3; }
img { max-width: 100%; }
figure { margin: 1.5em 0; }
figcaption, .note { color: #555; font-size: 0.9em; }
pre.text { background: #f6f6f6; padding: 0.5em; white-space: pre-wrap; }
"""


def html_page(rendered: list[tuple[Section, list[Drawn]]]) -> str:
    """The page of one or more sizes: ``(section, figures drawn)`` per size."""
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
        comparison = tables.size_comparison([section.result for section, _ in rendered])
        parts += [
            "<h2>Sizes compared</h2>",
            comparison.to_html(index=False, border=0),
        ]
    for section, figures in rendered:
        parts += _size_html(section, figures, heading="h2" if several else None)
    parts.append("</body></html>")
    return "\n".join(parts)


def _size_html(section: Section, figures: list[Drawn], heading: str | None) -> list[str]:
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
            tables.variance_text(result.variance).to_html(index=False, border=0),
        ]
    if len(result.branches):
        parts += [
            f"<{sub}>Branches</{sub}><p class='note'>{html.escape(BRANCHES_NOTE)}.</p>",
            tables.branch_text(result.branches).to_html(index=False, border=0),
        ]
    if section.alignment is not None:
        parts += _alignment_html(section, sub)
    if section.transitions is not None:
        parts += _transitions_html(section.transitions, sub)
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
    return parts + _figures_html(section, figures, sub)


def _figures_html(section: Section, figures: list[Drawn], sub: str) -> list[str]:
    """Every figure with its title and caption, and the text that goes around some (what goes
    above and below them, at the end where the figure is not drawn): a text family's text under
    the attention patterns, the attribution and dynamics sections around their figures."""
    around = {
        ATTENTION_FIGURE: ([], text_html(section.text, sub) if section.text is not None else [])
    }
    if section.attribution is not None:
        around[ATTRIBUTION_FIGURE] = attribution_html(section.attribution, sub)
    if section.dynamics is not None:
        around[DYNAMICS_FIGURE] = (dynamics_html(section.dynamics, sub), [])
    parts = []
    for target, drawn in figures:
        above, below = around.pop(target.stem, ([], []))
        data = base64.b64encode(target.read_bytes()).decode("ascii")
        title = html.escape(drawn.title)
        parts += above + [
            f'<figure id="{html.escape(target.stem)}"><{sub}>{title}</{sub}>',
            f'<img src="data:image/png;base64,{data}" alt="{title}">',
            f"<figcaption>{html.escape(drawn.caption)}</figcaption></figure>",
            *below,
        ]
    return parts + [part for above, below in around.values() for part in above + below]


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


def _transitions_html(table: pd.DataFrame, sub: str) -> list[str]:
    """The transitions matched across seeds (one row each), or a note that none were found."""
    seeds = table.attrs.get("seeds", sorted(set(table["seed"])))
    parts = [
        f"<{sub}>Transitions</{sub}>",
        "<p class='note'>Groups of held-out tokens learned together whose mean loss drops "
        f"abruptly ({html.escape(table.attrs.get('method', ''))}), matched across seeds by "
        "the overlap of their tokens; every seed's windows, heads and examples are in "
        "transitions.csv.</p>",
    ]
    if not len(table):
        return parts + [f"<p class='note'>No transitions found in {len(seeds)} seeds.</p>"]
    shown = tables.transition_text(transition_summary(table), len(seeds))
    return parts + [shown.to_html(index=False, border=0)]
