"""The report's attribution section: which updates and training windows moved a target.

Attributions are computed on demand (``observatory attribute``, :func:`~observatory.
attribution.attribute`), never by the report: it shows every attribution stored in the runs of
the seeds it draws (``<run>/attribution/<name>``), ordered by seed and then name, each labelled
by its target, options and span: the measured change of the target, the sum of the per-step
terms and their residual, the steps with the largest terms and, for a per-example
attribution, the training windows that raised and lowered the target most (as
:func:`~observatory.attribution.top_examples` gives them, decoded for a text family).  Where
the seeds drawn hold no attribution, the section is one line: the command that attributes the
best induction head's score across its seed's loss bump.
"""

from __future__ import annotations

import html
import math
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from observatory.report.results import stored_results
from observatory.report.summary import Summary, head_label

N_WINDOWS = 5  # rows per sign in the top-windows table
N_STEPS = 3  # steps named as the largest terms


@dataclass(frozen=True, eq=False)
class Attributions:
    """The attributions the report shows for one size.

    Attributes
    ----------
    results
        Each stored attribution of the seeds drawn, as read by
        :func:`~observatory.attribution.attribution` (``attrs``: ``seed``, ``name``, target,
        options, span), ordered by seed and name.
    windows
        Per result, its top training windows: the rows of
        :func:`~observatory.attribution.top_examples` for the :data:`N_WINDOWS` most positive
        then most negative contributions (those of that sign), with a ``sign`` column first
        (``+``/``-``); None for a result without per-example terms.
    command, purpose
        The ``observatory attribute`` command line for the best induction head across the
        loss bump, and what it attributes in words (what the page shows without results).
    """

    results: list[xr.Dataset]
    windows: list[pd.DataFrame | None]
    command: str
    purpose: str


def load_attributions(ds: xr.Dataset, result: Summary) -> Attributions:
    """The stored attributions of the seeds of ``ds``, and the command that computes one.

    Parameters
    ----------
    ds
        Results of one size of a store (``attrs``: ``store``, ``size``), as from
        :func:`~observatory.report.results.load_results`, restricted to the seeds drawn.
    result
        Their summary (best heads, loss bumps) for the command.

    Returns
    -------
    Attributions
        Listing the runs' attribution groups is all a store without attributions costs.
    """
    from observatory.store import ATTRIBUTION

    stored = stored_results(ds, ATTRIBUTION)
    results, windows = [], []
    if stored:  # the attribution package (torch, the replay) only where there is something
        from observatory.attribution.results import attribution

        for seed, name in stored:
            att = attribution(ds.attrs["store"], size=str(ds.attrs["size"]), seed=seed, name=name)
            results.append(att)
            windows.append(_top_windows(att) if "example_contribution" in att else None)
    return Attributions(results, windows, *attribute_command(ds, result))


def _top_windows(att: xr.Dataset) -> pd.DataFrame:
    """The windows that raised the target most (sign ``+``), then those that lowered it most
    (``-``): :func:`~observatory.attribution.top_examples` rows of that sign, at most
    :data:`N_WINDOWS` each."""
    from observatory.attribution.results import top_examples

    tables = []
    for sign, mark in (("positive", "+"), ("negative", "-")):
        table = top_examples(att, N_WINDOWS, sign=sign)
        table = table[table["contribution"] > 0 if mark == "+" else table["contribution"] < 0]
        tables.append(table.assign(sign=mark))
    joined = pd.concat(tables, ignore_index=True)
    return joined[["sign", *joined.columns[:-1]]]


def attribute_command(ds: xr.Dataset, result: Summary) -> tuple[str, str]:
    """The command that attributes the best induction head's score across the loss bump.

    Parameters
    ----------
    ds, result
        As for :func:`load_attributions`.

    Returns
    -------
    command : str
        ``observatory attribute STORE --size S --seed K --start A --stop B --target
        induction_score --option layer=L --option head=H --per-example`` for the first seed
        drawn with a best head and a loss bump (seeds used in the statistics first), ``A`` and
        ``B`` the bump's first and last step; without a head or a bump, those arguments are
        placeholders.
    purpose : str
        What it attributes, in words.
    """
    seed, row = bump_seed(ds, result)
    layer, head, what = "L", "H", f"an induction head's score in seed {seed}"
    if row["best_layer"] >= 0:
        layer, head = str(int(row["best_layer"])), str(int(row["best_head_in_layer"]))
        what = f"the score of seed {seed}'s best induction head ({row['best_head']})"
    start, stop, where = bump_span(row)
    words = ["observatory", "attribute", str(ds.attrs["store"]), "--size", str(ds.attrs["size"])]
    words += ["--seed", str(seed), "--start", start, "--stop", stop]
    words += ["--target", "induction_score", "--option", f"layer={layer}"]
    words += ["--option", f"head={head}", "--per-example"]
    return shlex.join(words), f"{what} {where}"


def bump_seed(ds: xr.Dataset, result: Summary) -> tuple[int, pd.Series]:
    """The first seed of ``ds`` with a best head and a loss bump (seeds used in the statistics
    first; else the first with most of these), and its row of ``result.per_seed``."""
    rows = result.per_seed.loc[[int(seed) for seed in ds["seed"].values]]
    seed, row = min(
        rows.iterrows(),
        key=lambda item: (
            item[1]["best_layer"] < 0,
            not math.isfinite(item[1]["bump_start_step"]),
            item[1]["left_out"] != "",
        ),
    )
    return int(seed), row


def bump_span(row: pd.Series) -> tuple[str, str, str]:
    """A seed's loss bump as command arguments: its first step, its last (at least one more)
    and where that is in words; ``START``, ``STOP`` placeholders without a bump."""
    if not math.isfinite(row["bump_start_step"]):
        return "START", "STOP", "over the steps you choose (no loss bump found)"
    first = int(math.floor(row["bump_start_step"]))
    start, stop = str(first), str(max(int(math.ceil(row["bump_end_step"])), first + 1))
    return start, stop, f"across its loss bump (steps {start}-{stop})"


def target_label(att: xr.Dataset) -> str:
    """The target and its options in a few words: ``induction_score L1H2``."""
    options = dict(att.attrs.get("target_options") or {})
    if set(options) == {"layer", "head"}:
        return f"{att.attrs['target']} {head_label(options['layer'], options['head'])}"
    shown = ", ".join(f"{key}={value}" for key, value in sorted(options.items()))
    return f"{att.attrs['target']}" + (f" ({shown})" if shown else "")


def result_label(att: xr.Dataset) -> str:
    """A result in a few words: seed, stored name (where not the target's), target, span."""
    name = str(att.attrs["name"])
    stored = f" ({name})" if name != att.attrs["target"] else ""
    return (
        f"seed {int(att.attrs['seed'])}{stored}, {target_label(att)}, "
        f"steps {int(att.attrs['start'])}-{int(att.attrs['stop'])}"
    )


def step_table(att: xr.Dataset) -> pd.DataFrame:
    """One row per update of a result: the target before it, the measured change, the term
    and the per-step residual (the change minus the term; they sum to the result's residual)
    and, with per-example terms, what its windows' terms leave out (``carried``)."""
    values = np.append(att["target_value"].values, float(att["target_stop"]))
    table = pd.DataFrame(
        {
            "train_step": att["train_step"].values,
            "target_value": values[:-1],
            "measured_change": np.diff(values),
            "step_contribution": att["step_contribution"].values,
        }
    )
    table["residual"] = table["measured_change"] - table["step_contribution"]
    if "carried" in att:
        table["carried"] = att["carried"].values
    return table


def attribution_table(found: Attributions) -> pd.DataFrame:
    """One row per result: what it attributes and how well its terms add up (numbers)."""
    from observatory.attribution.results import residual_share

    rows = []
    for att in found.results:
        steps = step_table(att)
        largest = steps.iloc[np.argsort(-steps["step_contribution"].abs(), kind="stable")]
        rows.append(
            {
                "seed": int(att.attrs["seed"]),
                "name": str(att.attrs["name"]),
                "target": target_label(att),
                "start": int(att.attrs["start"]),
                "stop": int(att.attrs["stop"]),
                "target_start": float(att["target_start"]),
                "target_stop": float(att["target_stop"]),
                "change": float(att["target_stop"] - att["target_start"]),
                "sum_of_terms": float(steps["step_contribution"].sum()),
                "residual": float(att["residual"]),
                "residual_percent": residual_share(att),
                "largest_step_residual": float(steps["residual"].abs().max()),
                "carried": float(steps["carried"].sum()) if "carried" in steps else math.nan,
                "largest_steps": " ".join(
                    f"{step}:{term:+.3g}"
                    for step, term in zip(
                        largest["train_step"][:N_STEPS],
                        largest["step_contribution"][:N_STEPS],
                        strict=True,
                    )
                ),
            }
        )
    return pd.DataFrame(rows)


def windows_table(found: Attributions) -> pd.DataFrame:
    """Every result's top windows, one row each, with its ``seed`` and ``name`` first."""
    return _joined((att, table) for att, table in zip(found.results, found.windows, strict=True))


def steps_table(found: Attributions) -> pd.DataFrame:
    """Every result's :func:`step_table`, with its ``seed`` and ``name`` first."""
    return _joined((att, step_table(att)) for att in found.results)


def _joined(tables) -> pd.DataFrame:
    """``(result, table)`` pairs as one table, ``seed`` and ``name`` first (None: left out)."""
    labelled = [
        table.assign(seed=int(att.attrs["seed"]), name=str(att.attrs["name"]))
        for att, table in tables
        if table is not None
    ]
    if not labelled:
        return pd.DataFrame()
    joined = pd.concat(labelled, ignore_index=True)
    first = ["seed", "name"]
    return joined[first + [column for column in joined.columns if column not in first]]


def write_attribution(found: Attributions, out: Path) -> list[Path]:
    """``attribution.csv`` (per result), ``attribution_steps.csv`` (per update) and
    ``attribution_windows.csv`` (the top windows of the per-example results)."""
    if not found.results:
        return []
    written = [out / "attribution.csv", out / "attribution_steps.csv"]
    attribution_table(found).to_csv(written[0], index=False)
    steps_table(found).to_csv(written[1], index=False)
    windows = windows_table(found)
    if len(windows):
        written.append(out / "attribution_windows.csv")
        windows.to_csv(written[-1], index=False)
    return written


def attribution_html(found: Attributions, sub: str) -> tuple[list[str], list[str]]:
    """The section as HTML, every text escaped: what goes above its figure and below it."""
    heading = f"<{sub} id='attribution'>Attribution</{sub}>"
    if not found.results:
        return [
            heading,
            f"<p class='note'>No attribution stored for these seeds; to attribute "
            f"{html.escape(found.purpose)} to the updates and training windows that moved it, "
            f"run <code>{html.escape(found.command)}</code></p>",
        ], []
    above = [
        heading,
        "<p class='note'>Every attribution stored in the runs shown (computed with "
        "<code>observatory attribute</code>), by seed and name: the measured change of the "
        "target over the updates [start, stop), the sum of their terms (one per update), the "
        "residual (the change minus that sum, and its share of the change), the largest "
        "per-step residual (an update's measured change minus its term) and the updates with "
        "the largest terms; carried: what the training windows' own terms leave out of the "
        "steps' (momentum from earlier batches, weight decay). Every update's numbers are in "
        "attribution_steps.csv, the windows in attribution_windows.csv.</p>",
        _summary_text(attribution_table(found)).to_html(index=False, border=0),
    ]
    below = []
    for att, table in zip(found.results, found.windows, strict=True):
        if table is not None:
            below += _windows_html(att, table, sub)
    return above, below


def _summary_text(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`attribution_table` as display text."""
    return pd.DataFrame(
        {
            "seed": table["seed"].astype(str),
            "name": table["name"],
            "target": table["target"],
            "updates": [f"{a}-{b}" for a, b in zip(table["start"], table["stop"], strict=True)],
            "target: start -> stop": [
                f"{a:.4g} -> {b:.4g}"
                for a, b in zip(table["target_start"], table["target_stop"], strict=True)
            ],
            "change": table["change"].map("{:.4g}".format),
            "sum of terms": table["sum_of_terms"].map("{:.4g}".format),
            "residual (% of change)": [
                f"{r:.3g}" + ("" if math.isnan(p) else f" ({p:.2g}%)")
                for r, p in zip(table["residual"], table["residual_percent"], strict=True)
            ],
            "largest per-step residual": table["largest_step_residual"].map("{:.3g}".format),
            "carried": table["carried"].map(lambda c: "-" if math.isnan(c) else f"{c:.4g}"),
            "largest terms (update: term)": table["largest_steps"],
        }
    )


def _windows_html(att: xr.Dataset, table: pd.DataFrame, sub: str) -> list[str]:
    """The top windows of one result: step, position in its batch, corpus window, term, text."""
    text = "text" if "text" in table else "tokens"
    parts = [
        f"<{sub}>Training windows: {html.escape(result_label(att))}</{sub}>",
        f"<p class='note'>The {N_WINDOWS} windows whose updates raised the target most (+) "
        f"and lowered it most (-): each window's share of its step's term.</p>",
        "<table><tr><th>sign</th><th>train step</th><th>batch</th><th>window</th>"
        f"<th>contribution</th><th>{text}</th></tr>",
    ]
    for row in table.itertuples(index=False):
        shown = repr(row.text) if text == "text" else " ".join(map(str, row.tokens))
        parts.append(
            f"<tr><td>{row.sign}</td><td>{row.train_step}</td><td>{row.batch}</td>"
            f"<td>{row.window}</td><td>{row.contribution:.6g}</td>"
            f"<td style='text-align: left'><code>{html.escape(shown)}</code></td></tr>"
        )
    parts.append("</table>")
    return parts
