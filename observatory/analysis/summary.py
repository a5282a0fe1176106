"""Per-seed and cross-seed summary of circuit formation in one family store.

Per seed: which heads become induction heads, when the best one emerges, the loss bump and
whether it contains that emergence, the ICL score either side of the bump, and the final loss.
Across seeds: mean, std and a bootstrap CI of the emergence and bump steps. Also the joint
per-token-loss PCA trajectory (one fit over every checkpoint of every seed).

Heads are named ``L{layer}H{head}``; head identities are per seed (the same label in two seeds
is not the same circuit, see ``match_heads`` for explicit matching).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from observatory.analysis.icl import loss_pca
from observatory.analysis.phase import SEGMENTATION, emergence, loss_bump
from observatory.analysis.stats import seed_summary
from observatory.errors import StoreError

DEFAULT_THRESHOLD = 0.5
CONFIDENCE = 0.95
# One step's loss is one batch's loss: the final loss averages the last few steps.
FINAL_LOSS_STEPS = 10
# Variables of the results dataset, and the analysis that writes each (None: training).
RESULTS = {
    "loss": None,
    "induction_score": "head_scores",
    "previous_token_score": "head_scores",
    "icl_score": "icl",
    "token_loss": "token_loss",
    "repeated_loss_increase": "head_ablation",
    "attention_pattern": "attention_patterns",
}
CROSS_SEED = (
    "emergence_crossing_step",
    "emergence_midpoint_step",
    "bump_start_step",
    "bump_end_step",
    "final_loss",
)
EMERGENCE_RULE = (
    "best head: highest peak induction score; crossing: first analysed checkpoint with "
    "score >= threshold; midpoint: interpolated step halfway between the first and last "
    "checkpoint's score (only for seeds whose best head crosses the threshold)"
)


def head_label(layer: int, head: int) -> str:
    """The label of a head, ``L{layer}H{head}`` (not a number, so CSV readers keep it as text)."""
    return f"L{layer}H{head}"


# --------------------------------------------------------------------------------------------
# Checking loaded results (loading them is I/O: observatory.results.load_results).


def check_results(ds: xr.Dataset, require: tuple[str, ...]) -> None:
    """Raise a one-line StoreError naming the analyses (and seeds) without required results."""
    missing: dict[str, list[int]] = {}  # analysis -> seeds without any result
    for name in require:
        analysis = RESULTS.get(name) or name
        if name not in ds:
            missing[analysis] = []
            continue
        other = [dim for dim in ds[name].dims if dim != "seed"]
        has = ds[name].notnull().any(other)
        if not has.all():
            missing[analysis] = [int(seed) for seed in has["seed"].values[~has.values]]
    if missing:
        seeds = sorted({seed for group in missing.values() for seed in group})
        where = f"{ds.attrs.get('store', 'dataset')} (size {ds.attrs.get('size', '?')})"
        if 0 < len(seeds) < ds.sizes["seed"]:
            where += f", seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}"
        raise StoreError(
            f"{where}: no results of analysis {', '.join(map(repr, sorted(missing)))}; "
            "run `observatory analyze` first"
        )


def _results(source: str | Path | xr.Dataset, size: str | None, require: tuple[str, ...]):
    if isinstance(source, xr.Dataset):
        check_results(source, require)
        return source
    from observatory.results import load_results

    return load_results(source, size=size, require=require)


def tokens_per_step(ds: xr.Dataset) -> float:
    """Training tokens per step, from the checkpoints' ``tokens_seen`` (``step * tokens``)."""
    steps, tokens = ds["step"].values, ds["tokens_seen"].values
    later = steps > 0
    if not later.any():
        raise StoreError("no checkpoint after step 0: cannot convert steps to tokens")
    return float(tokens[later][-1] / steps[later][-1])


# --------------------------------------------------------------------------------------------
# The summary.


@dataclass(frozen=True, eq=False)
class Summary:
    """Circuit formation in one size of a family: per-seed results and cross-seed statistics.

    Attributes
    ----------
    store, size
        Where the results come from.
    threshold
        Induction score at which a head counts as an induction head.
    threshold_source
        ``"argument"``, ``"analysis job"`` (recorded in the store) or ``"default"``.
    per_seed
        One row per seed (index ``seed``); see :func:`summary` for the columns.
    across_seeds
        One row per quantity of :data:`CROSS_SEED`; columns of
        :func:`~observatory.analysis.seed_summary` (``n``, ``n_missing``, ``mean``, ``std``,
        ``ci_low``, ``ci_high``, ``confidence``).
    parameters
        Conventions and detection parameters (emergence rule, bump method, ICL positions),
        and under ``"analyses"`` the parameters each analysis recorded in the store.
    """

    store: str
    size: str
    threshold: float
    threshold_source: str
    per_seed: pd.DataFrame
    across_seeds: pd.DataFrame
    parameters: dict[str, Any]

    def tables(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The per-seed and cross-seed tables as formatted text, for display."""
        rows = []
        for seed, row in self.per_seed.iterrows():
            rows.append(
                {
                    "seed": str(seed),
                    "induction heads": row["induction_heads"] or "none",
                    "best head (peak)": f"{row['best_head']} ({row['best_head_peak']:.2f})",
                    "crossing step": _fmt(row["emergence_crossing_step"], 0),
                    "midpoint step": _fmt(row["emergence_midpoint_step"], 1),
                    "bump (steps)": _window(row["bump_start_step"], row["bump_end_step"], 0),
                    "bump (M tokens)": _window(
                        row["bump_start_tokens"] / 1e6, row["bump_end_tokens"] / 1e6, 2
                    ),
                    "jump in bump": {True: "yes", False: "no"}.get(row["jump_in_bump"], "-"),
                    "ICL before -> after": _window(row["icl_before"], row["icl_after"], 2, " -> "),
                    "final loss": _fmt(row["final_loss"], 3),
                }
                | _ablation_cell(row)
            )
        per_seed = pd.DataFrame(rows)
        across = pd.DataFrame(
            [
                {
                    "quantity": name.replace("_", " "),
                    "n": str(int(row["n"])),
                    "mean": _fmt(row["mean"], digits),
                    "std": _fmt(row["std"], digits),
                    f"{row['confidence']:.0%} CI": _window(
                        row["ci_low"], row["ci_high"], digits, ", ", "[]"
                    ),
                }
                for name, row in self.across_seeds.iterrows()
                for digits in [3 if name == "final_loss" else 1]
            ]
        )
        return per_seed, across

    @property
    def title(self) -> str:
        """One line: the store, the size and the number of seeds."""
        return f"Circuit formation in {self.store}, size {self.size} ({len(self.per_seed)} seeds)"

    @property
    def note(self) -> str:
        """One line: the threshold and how heads are named."""
        return (
            f"induction threshold {self.threshold:g} ({self.threshold_source}); heads are named "
            "like L1H2 (layer 1, head 2), per seed: not aligned across seeds"
        )

    @property
    def across_note(self) -> str:
        """One line: how the cross-seed statistics were computed."""
        return (
            f"across seeds ({len(self.per_seed)} seeds; {CONFIDENCE:.0%} percentile-bootstrap "
            "CI of the mean, n = seeds with a value):"
        )

    def __str__(self) -> str:
        per_seed, across = self.tables()
        return "\n".join(
            [
                self.title,
                self.note,
                "",
                "per seed:",
                _text_table(per_seed),
                "",
                self.across_note,
                _text_table(across),
            ]
        )

    def to_markdown(self) -> str:
        """The summary as Markdown: a caption and two pipe tables."""
        per_seed, across = self.tables()
        return "\n".join(
            [
                f"**{self.title}**",
                "",
                self.note,
                "",
                _pipe_table(per_seed),
                "",
                self.across_note,
                "",
                _pipe_table(across),
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN and missing values become None)."""
        per_seed = self.per_seed.reset_index().astype(object)
        return _json_ready(
            {
                "store": self.store,
                "size": self.size,
                "threshold": self.threshold,
                "threshold_source": self.threshold_source,
                "n_seeds": len(self.per_seed),
                "parameters": self.parameters,
                "per_seed": per_seed.to_dict(orient="records"),
                "across_seeds": self.across_seeds.astype(object).to_dict(orient="index"),
            }
        )


def summary(
    path: str | Path | xr.Dataset, *, size: str | None = None, threshold: float | None = None
) -> Summary:
    """Summarise circuit formation per seed and across the seeds of one size of a family.

    Per seed (columns of ``Summary.per_seed``):

    * ``induction_heads``: heads whose peak induction score reaches ``threshold``, by peak,
      as ``"L1H2, L1H0"`` (``n_induction_heads`` of them); ``best_head``, ``best_head_peak``:
      the head with the highest peak (reported even below the threshold), also as
      ``best_layer`` and ``best_head_in_layer`` (indices for ``.sel(layer=, head=)``);
    * ``emergence_crossing_step``, ``emergence_midpoint_step`` (and ``_tokens``): the best
      head's first threshold crossing and interpolated transition midpoint
      (:func:`~observatory.analysis.emergence`), NaN if it never crosses;
    * ``bump_start_step``, ``bump_end_step``, ``bump_start_tokens``, ``bump_end_tokens``,
      ``bump_loss_drop``: the loss bump of the per-step training loss
      (:func:`~observatory.analysis.loss_bump`), NaN if there is none;
    * ``jump_in_bump``: whether the bump window contains the emergence midpoint;
    * ``icl_before``, ``icl_after``, ``icl_change``: ICL score at the last analysed checkpoint
      at or before the bump start and the first at or after its end, and their difference
      (negative: the model uses its context more after the bump);
    * ``final_loss``: mean training loss of the last :data:`FINAL_LOSS_STEPS` steps;
    * ``init_seed``, ``data_seed``, ``n_checkpoints`` (analysed checkpoints).
    * with ``head_ablation`` results, whether the best head is the head whose ablation hurts
      most (:func:`ablation_ranks`: ``top_ablation_head``, ``best_head_ablation_rank``, ...).

    Parameters
    ----------
    path
        The family store, or a dataset from :func:`~observatory.results.load_results`.
    size
        Size name; may be omitted when the store has a single size.
    threshold
        Induction score at which a head counts as formed. Default: the threshold recorded by
        the analysis job (``head_scores`` parameters), else :data:`DEFAULT_THRESHOLD`.

    Returns
    -------
    Summary

    Raises
    ------
    StoreError
        If the store or size does not exist, or the ``head_scores`` or ``icl`` analysis has
        no results (run ``observatory analyze`` first).
    """
    # (the training loss is optional: ingested checkpoints may come without it)
    ds = _results(path, size, ("induction_score", "icl_score"))
    recorded = ds.attrs.get("analysis_parameters", {}).get("head_scores") or {}
    if threshold is not None:
        source = "argument"
    elif "threshold" in recorded:
        threshold, source = float(recorded["threshold"]), "analysis job"
    else:
        threshold, source = DEFAULT_THRESHOLD, "default"
    per_token = tokens_per_step(ds)
    rows = [
        _seed_row(ds.sel(seed=seed), threshold=threshold, tokens_per_step=per_token)
        for seed in ds["seed"].values
    ]
    per_seed = pd.DataFrame(rows).set_index("seed")
    per_seed["jump_in_bump"] = per_seed["jump_in_bump"].astype("boolean")
    if "repeated_loss_increase" in ds:
        per_seed = per_seed.join(ablation_ranks(ds, per_seed))
    across = pd.DataFrame(
        {
            name: seed_summary(per_seed[name].to_numpy(dtype=float), confidence=CONFIDENCE)
            for name in CROSS_SEED
        }
    ).T
    across[["n", "n_missing"]] = across[["n", "n_missing"]].astype(int)
    analyses = ds.attrs.get("analysis_parameters", {})
    icl = analyses.get("icl") or {}
    return Summary(
        store=str(ds.attrs.get("store", "dataset")),
        size=str(ds.attrs.get("size", "?")),
        threshold=threshold,
        threshold_source=source,
        per_seed=per_seed,
        across_seeds=across,
        parameters={
            "induction_score_convention": recorded.get("score_convention"),
            "emergence_rule": EMERGENCE_RULE,
            "bump_method": SEGMENTATION + " (loss_bump defaults)",
            "icl_early_position": icl.get("icl_early_position"),
            "icl_late_position": icl.get("icl_late_position"),
            "final_loss_steps": FINAL_LOSS_STEPS,
            "tokens_per_step": per_token,
            "confidence": CONFIDENCE,
            "analyses": analyses,
        },
    )


def _seed_row(one: xr.Dataset, *, threshold: float, tokens_per_step: float) -> dict[str, Any]:
    """The per-seed columns of :func:`summary` for one seed's slice of the results."""
    scores = one["induction_score"].transpose("step", "layer", "head")
    scores = scores.isel(step=scores.notnull().all(["layer", "head"]).values)
    steps = scores["step"].values
    peak = scores.max("step").values  # [layer, head]
    layers, heads = scores["layer"].values, scores["head"].values
    by_peak = np.argsort(-peak, axis=None, kind="stable")
    ranked = [np.unravel_index(i, peak.shape) for i in by_peak]
    formed = [head_label(layers[i], heads[j]) for i, j in ranked if peak[i, j] >= threshold]
    best = ranked[0]
    found = emergence(steps, scores.values[:, best[0], best[1]], threshold=threshold)
    crossing = found.crossing_step
    midpoint = found.midpoint_step if crossing is not None else None

    loss = one["loss"].dropna("train_step")
    bump = None
    if loss.size:
        steps_, values = loss["train_step"].values, loss.values
        bump = loss_bump(steps_, values, tokens_per_step=round(tokens_per_step))
    row: dict[str, Any] = {
        "seed": int(one["seed"]),
        "init_seed": int(one["init_seed"]) if "init_seed" in one.coords else None,
        "data_seed": int(one["data_seed"]) if "data_seed" in one.coords else None,
        "n_checkpoints": len(steps),
        "induction_heads": ", ".join(formed),
        "n_induction_heads": len(formed),
        "best_head": head_label(layers[best[0]], heads[best[1]]),
        "best_layer": int(layers[best[0]]),
        "best_head_in_layer": int(heads[best[1]]),
        "best_head_peak": float(peak[best]),
        "emergence_crossing_step": _nan(crossing),
        "emergence_midpoint_step": _nan(midpoint),
        "emergence_midpoint_tokens": _nan(midpoint) * tokens_per_step,
        "bump_start_step": math.nan,
        "bump_end_step": math.nan,
        "bump_start_tokens": math.nan,
        "bump_end_tokens": math.nan,
        "bump_loss_drop": math.nan,
        "jump_in_bump": None,
        "icl_before": math.nan,
        "icl_after": math.nan,
        "icl_change": math.nan,
        "final_loss": float(loss.values[-FINAL_LOSS_STEPS:].mean()) if loss.size else math.nan,
    }
    if bump is None:
        return row
    row |= {
        "bump_start_step": bump.start_step,
        "bump_end_step": bump.end_step,
        "bump_start_tokens": bump.start_tokens,
        "bump_end_tokens": bump.end_tokens,
        "bump_loss_drop": bump.loss_drop,
    }
    if midpoint is not None:
        row["jump_in_bump"] = bump.start_step <= midpoint <= bump.end_step
    icl = one["icl_score"].dropna("step")
    before = icl.where(icl["step"] <= bump.start_step, drop=True)
    after = icl.where(icl["step"] >= bump.end_step, drop=True)
    if before.size and after.size:
        row["icl_before"] = float(before[-1])
        row["icl_after"] = float(after[0])
        row["icl_change"] = row["icl_after"] - row["icl_before"]
    return row


def ablation_ranks(ds: xr.Dataset, per_seed: pd.DataFrame) -> pd.DataFrame:
    """Per seed: is the best induction head the head whose ablation hurts most?

    At each seed's last checkpoint with ``head_ablation`` results, heads are ranked by the
    increase in loss on the probe's repeated part when ablated (``repeated_loss_increase``).

    Returns
    -------
    pandas.DataFrame
        Index ``seed``; ``ablation_step``, ``top_ablation_head`` (largest effect),
        ``top_ablation_effect``, ``best_head_ablation_effect``, ``best_head_ablation_rank``
        (1: largest) and ``best_head_is_top_ablation``.
    """
    rows = []
    for seed in ds["seed"].values:
        effect = ds["repeated_loss_increase"].sel(seed=seed)
        effect = effect.isel(step=effect.notnull().all(["layer", "head"]).values)
        row = {"seed": int(seed), "ablation_step": math.nan, "top_ablation_head": None}
        if effect.sizes["step"]:
            last = effect.isel(step=-1).transpose("layer", "head")
            values, best = last.values, per_seed.loc[int(seed)]
            layer = list(last["layer"].values).index(best["best_layer"])
            head = list(last["head"].values).index(best["best_head_in_layer"])
            top = np.unravel_index(np.argmax(values), values.shape)
            rank = 1 + int((values > values[layer, head]).sum())
            row |= {
                "ablation_step": int(last["step"]),
                "top_ablation_head": head_label(
                    last["layer"].values[top[0]], last["head"].values[top[1]]
                ),
                "top_ablation_effect": float(values[top]),
                "best_head_ablation_effect": float(values[layer, head]),
                "best_head_ablation_rank": rank,
                "best_head_is_top_ablation": rank == 1,
            }
        rows.append(row)
    return pd.DataFrame(rows).set_index("seed")


# --------------------------------------------------------------------------------------------
# The per-token-loss PCA.


def token_loss_pca(
    path: str | Path | xr.Dataset, *, size: str | None = None, n_components: int = 2
) -> xr.Dataset:
    """Joint PCA of the per-token-loss vectors of every checkpoint of every seed.

    One fit (:func:`~observatory.analysis.loss_pca`) over all (seed, checkpoint) rows that
    have per-token losses, so the seeds' trajectories share one coordinate system.

    Parameters
    ----------
    path
        The family store, or a dataset from :func:`~observatory.results.load_results`.
    size
        Size name; may be omitted when the store has a single size.
    n_components
        Number of principal components.

    Returns
    -------
    xarray.Dataset
        ``projection[seed, step, component]`` (NaN at checkpoints without per-token losses),
        ``explained_variance_ratio[component]`` and ``loading[component, held_out]``;
        coordinates ``seed``, ``step``, ``tokens_seen`` and ``component`` (1, 2, ...).

    Raises
    ------
    StoreError
        If the ``token_loss`` analysis has no results.
    """
    ds = _results(path, size, ("token_loss",))
    losses = ds["token_loss"].transpose("seed", "step", "held_out")
    n_seeds, n_steps, n_held_out = losses.shape
    rows = losses.values.reshape(-1, n_held_out)
    finite = np.isfinite(rows).all(axis=1)
    fit = loss_pca(rows[finite], n_components=n_components)
    projection = np.full((len(rows), n_components), np.nan)
    projection[finite] = fit.projections
    component = np.arange(1, n_components + 1)
    return xr.Dataset(
        {
            "projection": (
                ("seed", "step", "component"),
                projection.reshape(n_seeds, n_steps, n_components),
            ),
            "explained_variance_ratio": ("component", fit.explained_variance_ratio),
            "loading": (("component", "held_out"), fit.components),
        },
        coords={
            "seed": losses["seed"].values,
            "step": losses["step"].values,
            "tokens_seen": ("step", ds["tokens_seen"].values),
            "component": component,
        },
        attrs={"method": "joint PCA over every (seed, checkpoint) with per-token losses"},
    )


# --------------------------------------------------------------------------------------------
# Formatting.


def _ablation_cell(row: pd.Series) -> dict[str, str]:
    """The per-seed table's ablation column, when the store has ablation results."""
    if "best_head_ablation_rank" not in row:
        return {}
    rank = row["best_head_ablation_rank"]
    cell = "-" if pd.isna(rank) else f"{row['top_ablation_head']} ({int(rank)})"
    return {"ablation: top head (best's rank)": cell}


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _fmt(value: float, digits: int) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:,.{digits}f}"


def _window(low: float, high: float, digits: int, sep: str = "-", brackets: str = "") -> str:
    if not (np.isfinite(low) and np.isfinite(high)):
        return "-"
    opening, closing = brackets or ("", "")
    return f"{opening}{_fmt(low, digits)}{sep}{_fmt(high, digits)}{closing}"


def _text_table(table: pd.DataFrame) -> str:
    rows = [list(table.columns), *(list(map(str, row)) for row in table.itertuples(index=False))]
    widths = [max(len(row[i]) for row in rows) for i in range(len(table.columns))]
    rows.insert(1, ["-" * width for width in widths])
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _pipe_table(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def _json_ready(value: Any) -> Any:
    """Plain Python values for ``json.dumps``: NaN and pandas NA become None."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if value is None or value is pd.NA:
        return None
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    return value
