"""The summary's tables as text: display cells, plain-text and Markdown tables, JSON values.

Computing the summary is :mod:`observatory.report.summary`; this module only formats what it
computed (``Summary.per_seed``, ``across_seeds``, ``variance``) for people and for JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd


def seed_table(per_seed: pd.DataFrame) -> pd.DataFrame:
    """``Summary.per_seed`` as formatted text, one row per seed."""
    return pd.DataFrame([_seed_cells(seed, row) for seed, row in per_seed.iterrows()])


def across_table(across_seeds: pd.DataFrame) -> pd.DataFrame:
    """``Summary.across_seeds`` as formatted text, one row per quantity."""
    return pd.DataFrame(
        [
            {
                "quantity": name.replace("_", " "),
                "n": f"{int(row['n'])} of {int(row['n']) + int(row['n_missing'])}",
                "mean": _fmt(row["mean"], digits),
                "std": _fmt(row["std"], digits),
                f"{row['confidence']:.0%} CI": _window(
                    row["ci_low"], row["ci_high"], digits, ", ", "[]"
                ),
                "interval": {"t": "t", "bca": "BCa bootstrap"}.get(row["ci_method"], "-"),
                "seeds used": row["seeds"] or "none",
                "left out (why)": row["left_out"] or "none",
            }
            for name, row in across_seeds.iterrows()
            for digits in [3 if name == "final_loss" else 1]
        ]
    )


def variance_text(variance: pd.DataFrame) -> pd.DataFrame:
    """``Summary.variance`` (the init/data-seed split) as formatted text."""
    return pd.DataFrame(
        [
            {
                "quantity": name.replace("_", " "),
                "design": row["design"],
                "init seed": f"{row['init_share']:.0%}",
                "data seed": f"{row['data_share']:.0%}",
                "residual": f"{row['residual_share']:.0%}",
                "residual df": str(int(row["df_residual"])),
            }
            for name, row in variance.iterrows()
        ]
    )


def size_comparison(results: Sequence[Any]) -> pd.DataFrame:
    """One row per size: does it form induction heads, when, and its final loss.

    Parameters
    ----------
    results
        The :class:`~observatory.report.summary.Summary` of each size (this module formats
        summaries and is imported by theirs, so it names the class only here).

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


def branch_text(branches: pd.DataFrame) -> pd.DataFrame:
    """``Summary.branches`` as formatted text, one row per branch."""
    return pd.DataFrame(
        [
            {
                "branch": label,
                "fork": str(row["fork"]),
                "intervention": intervention_text(row["intervention"]),
                "best head (peak)": (
                    f"{row['best_head']} ({row['best_head_peak']:.2f})" if row["best_head"] else "-"
                ),
                "parent's head peak": _fmt(row["parent_head_peak"], 2),
                "midpoint step (delta)": f"{_fmt(row['emergence_midpoint_step'], 1)} "
                f"({_fmt(row['emergence_midpoint_step_delta'], 1)})",
                "final loss (delta)": f"{_fmt(row['final_loss'], 3)} "
                f"({_fmt(row['final_loss_delta'], 3)})",
            }
            for label, row in branches.iterrows()
        ]
    )


def transition_text(summary: pd.DataFrame, n_seeds: int) -> pd.DataFrame:
    """The transitions across seeds as formatted text, one row per matched transition.

    Parameters
    ----------
    summary
        :func:`~observatory.report.transitions.transition_summary` of a transition table.
    n_seeds
        The seeds searched for transitions.
    """
    rows = []
    for tid, row in summary.iterrows():
        start = _fmt(row["start_step_mean"], 0)
        if np.isfinite(row["start_step_low"]):  # one seed: no interval
            start += " " + _window(row["start_step_low"], row["start_step_high"], 0, ", ", "[]")
        rows.append(
            {
                "transition": f"T{tid}",
                "seeds": f"{row['seeds']} ({int(row['n_seeds'])} of {n_seeds})",
                "mean start step (95% t-interval)": f"{start} (n = {int(row['n_seeds'])})",
                "mean loss drop (nats)": _fmt(row["loss_drop_mean"], 2),
                "tokens (mean)": _fmt(row["n_tokens_mean"], 0),
                "universal": "yes" if row["universal"] else "no",
            }
        )
    return pd.DataFrame(rows)


def intervention_text(record: str) -> str:
    """A stored intervention (JSON) in a few words: what it changes, ``"none"`` if nothing."""
    changed = {key: value for key, value in json.loads(record).items() if value not in (None, [])}
    if not changed.get("ablate_heads"):
        changed.pop("ablation", None)
    changed.pop("drop_predicate_sha256", None)
    if "drop_windows" in changed:
        changed["drop_windows"] = f"{len(changed['drop_windows'])} windows"
    heads = ("ablate_heads", "freeze_heads")
    for key in heads:
        if key in changed:
            changed[key] = ",".join(f"L{layer}H{head}" for layer, head in changed[key])
    return "; ".join(f"{key} {value}" for key, value in sorted(changed.items())) or "none"


def _seed_cells(seed: int, row: pd.Series) -> dict[str, str]:
    """One row of the per-seed display table."""
    status = row["status"] + (f" ({row['left_out']})" if row["left_out"] else "")
    best = f"{row['best_head']} ({row['best_head_peak']:.2f})" if row["best_head"] else "-"
    return {
        "seed": str(seed),
        "status": status,
        "induction heads": row["induction_heads"] or "none",
        "best head (peak)": best,
        "crossing step": _fmt(row["emergence_crossing_step"], 0),
        "midpoint step": _fmt(row["emergence_midpoint_step"], 1),
        "bump (steps)": _window(row["bump_start_step"], row["bump_end_step"], 0),
        "bump (M tokens)": _window(row["bump_start_tokens"] / 1e6, row["bump_end_tokens"] / 1e6, 2),
        "jump in bump": {True: "yes", False: "no"}.get(row["jump_in_bump"], "-"),
        "ICL before -> after": _window(row["icl_before"], row["icl_after"], 2, " -> "),
        "final loss": _fmt(row["final_loss"], 3)
        + ("" if row["status"] == "complete" else f" (step {row['trained_steps']})"),
    } | _ablation_cell(row)


def _ablation_cell(row: pd.Series) -> dict[str, str]:
    """The per-seed table's ablation columns, when the store has ablation results."""
    if "best_head_ablation_rank" not in row:
        return {}
    cells = {}
    for prefix, where in (("bump_end_", "after bump"), ("", "last")):
        rank = row.get(f"{prefix}best_head_ablation_rank", math.nan)
        cells[f"ablation {where}: top, best (rank)"] = (
            "-"
            if pd.isna(rank)
            else f"{row[f'{prefix}top_ablation_head']}, {row[f'{prefix}ablation_best_head']} "
            f"({int(rank)}) @{int(row[f'{prefix}ablation_step'])}"
        )
    return cells


def _fmt(value: float, digits: int) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:,.{digits}f}"


def _window(low: float, high: float, digits: int, sep: str = "-", brackets: str = "") -> str:
    if not (np.isfinite(low) and np.isfinite(high)):
        return "-"
    opening, closing = brackets or ("", "")
    return f"{opening}{_fmt(low, digits)}{sep}{_fmt(high, digits)}{closing}"


def text_table(table: pd.DataFrame) -> str:
    """A table as aligned plain text, its header underlined."""
    rows = [list(table.columns), *(list(map(str, row)) for row in table.itertuples(index=False))]
    widths = [max(len(row[i]) for row in rows) for i in range(len(table.columns))]
    rows.insert(1, ["-" * width for width in widths])
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def pipe_table(table: pd.DataFrame) -> str:
    """A table as a Markdown pipe table."""
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def json_ready(value: Any) -> Any:
    """Plain Python values for ``json.dumps``: NaN and pandas NA become None."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if value is None or value is pd.NA:
        return None
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    return value
