"""Per-seed and cross-seed summary of circuit formation in one family store.

Per seed: which heads become induction heads, when the best one emerges, the loss bump and
whether it contains that emergence, the ICL score either side of the bump, and the final loss.
Across seeds: mean, std and a bootstrap CI of the emergence and bump steps. Also the joint
per-token-loss PCA trajectory (one fit over every checkpoint of every seed).

Heads are named ``L{layer}H{head}``; head identities are per seed (the same label in two seeds
is not the same circuit): :func:`seed_alignment` matches heads across seeds explicitly and
compares the seeds with linear CKA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from observatory.analysis.icl import loss_pca
from observatory.analysis.phase import FINAL_LOSS, SEGMENTATION, emergence, final_loss, loss_bump
from observatory.analysis.stats import (
    BOOTSTRAP_MIN_N,
    linear_cka,
    match_heads,
    seed_summary,
    variance_split,
)
from observatory.errors import StoreError
from observatory.report import tables
from observatory.report.declared import analysis_of

DEFAULT_THRESHOLD = 0.5
CONFIDENCE = 0.95
INTERVAL_RULE = (
    f"t-interval of the mean over the seeds used (n < {BOOTSTRAP_MIN_N}), BCa bootstrap "
    f"(n >= {BOOTSTRAP_MIN_N})"
)
# What the summary needs (the training loss is optional: ingested checkpoints may lack it).
SUMMARY_REQUIRED = ("induction_score", "icl_score")
CROSS_SEED = (
    "emergence_crossing_step",
    "emergence_midpoint_step",
    "bump_start_step",
    "bump_end_step",
    "final_loss",
)
# Quantities whose variance is split into init-seed, data-seed and residual parts.
VARIANCE_SPLIT = ("emergence_midpoint_step", "final_loss")
EMERGENCE_RULE = (
    "best head: highest peak induction score; crossing: first analysed checkpoint with "
    "score >= threshold; midpoint: interpolated step halfway between the first and last "
    "checkpoint's score (only for seeds whose best head crosses the threshold)"
)


def head_label(layer: int, head: int) -> str:
    """The label of a head, ``L{layer}H{head}`` (not a number, so CSV readers keep it as text)."""
    return f"L{layer}H{head}"


# --------------------------------------------------------------------------------------------
# Checking loaded results (loading them is I/O: observatory.report.results.load_results).


def check_results(ds: xr.Dataset, require: tuple[str, ...]) -> None:
    """Raise a one-line StoreError naming the analyses of which no seed has results.

    A seed without results (not analysed yet, or no checkpoints) is not an error here: the
    summary reports it and leaves it out of the statistics.
    """
    missing = {
        analysis_of(name, ds)
        for name in require
        if name not in ds or not bool(ds[name].notnull().any())
    }
    if missing:
        where = f"{ds.attrs.get('store', 'dataset')} (size {ds.attrs.get('size', '?')})"
        raise StoreError(
            f"{where}: no results of analysis {', '.join(map(repr, sorted(missing)))}; "
            "run `observatory analyze` first"
        )


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
        One row per seed (index ``seed``); see :func:`summarize` for the columns.
    across_seeds
        One row per quantity of :data:`CROSS_SEED`; see :func:`across_seeds`.
    variance
        One row per quantity of :data:`VARIANCE_SPLIT` whose values cross init and data
        seeds (empty otherwise); see :func:`variance_table`.
    parameters
        Conventions and detection parameters (emergence rule, bump method, ICL positions,
        final loss, interval), and under ``"analyses"`` the parameters each analysis recorded.
    branches
        One row per branch of the seeds (index ``branch``, e.g. ``"seed0/no-prev"``); see
        :func:`branch_table`. Empty without branches.
    """

    store: str
    size: str
    threshold: float
    threshold_source: str
    per_seed: pd.DataFrame
    across_seeds: pd.DataFrame
    variance: pd.DataFrame
    parameters: dict[str, Any]
    branches: pd.DataFrame = field(default_factory=pd.DataFrame)

    def tables(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The per-seed and cross-seed tables as formatted text, for display."""
        return tables.seed_table(self.per_seed), tables.across_table(self.across_seeds)

    @property
    def title(self) -> str:
        """One line: the store, the size and the number of seeds."""
        return f"Circuit formation in {self.store}, size {self.size} ({len(self.per_seed)} seeds)"

    @property
    def note(self) -> str:
        """One line: the threshold and how heads are named."""
        return (
            f"induction threshold {self.threshold:g} ({self.threshold_source}); heads are named "
            "like L1H2 (layer 1, head 2), per seed: not aligned across seeds; final loss: "
            f"{FINAL_LOSS}"
        )

    @property
    def across_note(self) -> str:
        """One line: how the cross-seed statistics were computed."""
        kept = "kept" if self.parameters.get("include_incomplete") else "left out"
        return (
            f"across seeds: {CONFIDENCE:.0%} CI of the mean, {INTERVAL_RULE}; n = seeds that "
            f"contributed; incomplete runs {kept}. With 2-5 seeds the t-interval is wide: "
            "that is the honest uncertainty of a mean over so few runs."
        )

    @property
    def variance_note(self) -> str:
        """One line: what the variance split is and how rough it is."""
        return (
            "variance split (two-way ANOVA without interaction, shares of the sum of squares "
            "over init seed, data seed and residual); with a design this small (few residual "
            "degrees of freedom) it is a rough description, not a test"
        )

    def _sections(self) -> list[tuple[str, pd.DataFrame]]:
        per_seed, across = self.tables()
        sections = [("per seed:", per_seed), (self.across_note, across)]
        if len(self.variance):
            sections.append((self.variance_note + ":", tables.variance_text(self.variance)))
        if len(self.branches):
            sections.append((BRANCHES_NOTE + ":", tables.branch_text(self.branches)))
        return sections

    def __str__(self) -> str:
        lines = [self.title, self.note]
        for caption, table in self._sections():
            lines += ["", caption, tables.text_table(table)]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """The summary as Markdown: a caption and pipe tables."""
        lines = [f"**{self.title}**", "", self.note]
        for caption, table in self._sections():
            lines += ["", caption, "", tables.pipe_table(table)]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN and missing values become None)."""
        per_seed = self.per_seed.reset_index().astype(object)
        return tables.json_ready(
            {
                "store": self.store,
                "size": self.size,
                "threshold": self.threshold,
                "threshold_source": self.threshold_source,
                "n_seeds": len(self.per_seed),
                "parameters": self.parameters,
                "per_seed": per_seed.to_dict(orient="records"),
                "across_seeds": self.across_seeds.astype(object).to_dict(orient="index"),
                "variance_split": self.variance.astype(object).to_dict(orient="index"),
                "branches": self.branches.reset_index().astype(object).to_dict(orient="records"),
            }
        )


def summarize(
    ds: xr.Dataset,
    *,
    seeds: list[int] | None = None,
    threshold: float | None = None,
    include_incomplete: bool = False,
    branches: xr.Dataset | None = None,
) -> Summary:
    """Summarise circuit formation per seed and across the seeds of one size of a family.

    Per seed (columns of ``Summary.per_seed``):

    * ``status`` (``"complete"``: every scheduled step trained, else ``"incomplete"``),
      ``trained_steps``, ``n_checkpoints`` (analysed checkpoints) and ``left_out``: why the
      seed is left out of the cross-seed statistics (``"incomplete"``, ``"not analysed"``,
      ``"not trained"``: no committed steps; empty if it is used);
    * ``induction_heads``: heads whose peak induction score reaches ``threshold``, by peak,
      as ``"L1H2, L1H0"`` (``n_induction_heads`` of them); ``best_head``, ``best_head_peak``:
      the head with the highest peak (reported even below the threshold), also as
      ``best_layer`` and ``best_head_in_layer`` (indices for ``.sel(layer=, head=)``);
    * ``emergence_crossing_step``, ``emergence_midpoint_step`` (and ``_tokens``): the best
      head's first threshold crossing and interpolated transition midpoint
      (:func:`~observatory.analysis.emergence`), NaN if it never crosses;
    * ``bump_start_step``, ``bump_end_step``, ``bump_start_tokens``, ``bump_end_tokens``,
      ``bump_loss_drop``: the loss bump of the per-step training loss, or of the loss minus a
      control size's (:func:`bump_signal`; :func:`~observatory.analysis.loss_bump`), NaN if
      there is none;
    * ``jump_in_bump``: whether the bump window contains the emergence midpoint;
    * ``icl_before``, ``icl_after``, ``icl_change``: ICL score at the last analysed checkpoint
      at or before the bump start and the first at or after its end, and their difference
      (negative: the model uses its context more after the bump);
    * ``final_loss``: :func:`~observatory.analysis.phase.final_loss` of the steps trained
      (of an incomplete run: where it stopped, and left out across seeds);
    * ``init_seed``, ``data_seed``;
    * with ``head_ablation`` results, the rank of the best induction head among the heads by
      ablation effect, at the last checkpoint and at the end of the loss bump
      (:func:`ablation_ranks`: ``best_head_ablation_rank``, ``bump_end_best_head_ablation_rank``,
      ``top_ablation_head``, ...).

    Across seeds (``Summary.across_seeds``), for each quantity of :data:`CROSS_SEED`: the
    seeds that contributed and the seeds left out with the reason (``"incomplete"``,
    ``"not analysed"``, ``"not formed"``, ``"no bump"``), and
    :func:`~observatory.analysis.seed_summary` of the values (a t-interval for few seeds).
    When the seeds cross init and data seeds, ``Summary.variance`` splits the variance of
    the emergence midpoint and the final loss (:func:`~observatory.analysis.variance_split`).

    Parameters
    ----------
    ds
        Results as from :func:`~observatory.report.results.load_results`
        (:func:`observatory.summary` loads a store and summarises it).
    seeds
        Seed indices to summarise (default: every seed).
    threshold
        Induction score at which a head counts as formed. Default: the threshold recorded by
        the analysis job (``head_scores`` parameters), else :data:`DEFAULT_THRESHOLD`.
    include_incomplete
        Keep incomplete runs in the cross-seed statistics (they are always in the per-seed
        table, marked).
    branches
        The branches of the seeds, as from :func:`~observatory.report.results.load_branches`:
        summarised beside their parents in ``Summary.branches`` (see :func:`branch_table`).

    Returns
    -------
    Summary

    Raises
    ------
    StoreError
        If no seed has results of the ``head_scores`` or ``icl`` analysis (run
        ``observatory analyze`` first).
    """
    check_results(ds, SUMMARY_REQUIRED)
    if seeds is not None:
        ds = ds.sel(seed=seeds)
    recorded = ds.attrs.get("analysis_parameters", {}).get("head_scores") or {}
    if threshold is not None:
        source = "argument"
    elif "threshold" in recorded:
        threshold, source = float(recorded["threshold"]), "analysis job"
    else:
        threshold, source = DEFAULT_THRESHOLD, "default"
    per_token = tokens_per_step(ds)
    rows = [
        _seed_row(
            ds.sel(seed=seed),
            threshold=threshold,
            tokens_per_step=per_token,
            include_incomplete=include_incomplete,
        )
        for seed in ds["seed"].values
    ]
    per_seed = pd.DataFrame(rows).set_index("seed")
    per_seed["jump_in_bump"] = per_seed["jump_in_bump"].astype("boolean")
    if "repeated_loss_increase" in ds:
        per_seed = per_seed.join(ablation_ranks(ds, per_seed))
    analyses = ds.attrs.get("analysis_parameters", {})
    icl = analyses.get("icl") or {}
    return Summary(
        store=str(ds.attrs.get("store", "dataset")),
        size=str(ds.attrs.get("size", "?")),
        threshold=threshold,
        threshold_source=source,
        per_seed=per_seed,
        across_seeds=across_seeds(per_seed),
        variance=variance_table(per_seed),
        branches=branch_table(
            branches, per_seed, threshold=threshold, attrs=ds.attrs, include_incomplete=True
        ),
        parameters={
            "induction_score_convention": recorded.get("score_convention"),
            "emergence_rule": EMERGENCE_RULE,
            "bump_method": SEGMENTATION + " (loss_bump defaults)",
            "bump_signal": bump_signal_name(ds),
            "icl_early_position": icl.get("icl_early_position"),
            "icl_late_position": icl.get("icl_late_position"),
            "final_loss": FINAL_LOSS,
            "tokens_per_step": per_token,
            "confidence": CONFIDENCE,
            "interval": INTERVAL_RULE,
            "include_incomplete": include_incomplete,
            "analyses": analyses,
        },
    )


# Why a seed's value of a quantity is missing, when the seed itself is used.
MISSING_REASON = {
    "emergence_crossing_step": "not formed",
    "emergence_midpoint_step": "not formed",
    "bump_start_step": "no bump",
    "bump_end_step": "no bump",
    "final_loss": "no training steps",
}


def across_seeds(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Cross-seed statistics of every quantity of :data:`CROSS_SEED` over the seeds used.

    Parameters
    ----------
    per_seed
        ``Summary.per_seed``: seeds with a non-empty ``left_out`` are not used.

    Returns
    -------
    pandas.DataFrame
        One row per quantity: the columns of :func:`~observatory.analysis.seed_summary`
        (``n`` counts the seeds that contributed, ``n_missing`` the others), ``seeds`` (those
        that contributed, e.g. ``"0, 2"``) and ``left_out`` (e.g. ``"1: not formed; 3:
        incomplete"``).
    """
    rows = {}
    for name in CROSS_SEED:
        values = per_seed[name].to_numpy(dtype=float)
        reasons = [
            row["left_out"] or ("" if np.isfinite(value) else MISSING_REASON[name])
            for value, (_, row) in zip(values, per_seed.iterrows(), strict=True)
        ]
        used = np.array([not reason for reason in reasons])
        stats = seed_summary(values[used], confidence=CONFIDENCE)
        stats["n_missing"] = int((~used).sum())
        stats["seeds"] = ", ".join(str(seed) for seed in per_seed.index[used])
        stats["left_out"] = "; ".join(
            f"{seed}: {reason}"
            for seed, reason in zip(per_seed.index, reasons, strict=True)
            if reason
        )
        rows[name] = stats
    table = pd.DataFrame(rows).T
    table[["n", "n_missing"]] = table[["n", "n_missing"]].astype(int)
    for column in ("mean", "std", "ci_low", "ci_high", "confidence"):
        table[column] = table[column].astype(float)
    return table


def variance_table(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Init-seed / data-seed / residual split of :data:`VARIANCE_SPLIT` quantities.

    Only where the seeds used (empty ``left_out``) with a value cross every init seed with
    every data seed, at least 2 x 2 (``pairing = "product"``).

    Returns
    -------
    pandas.DataFrame
        One row per quantity that could be split (possibly none): the columns of
        :func:`~observatory.analysis.variance_split`.
    """
    rows = {}
    used = per_seed[per_seed["left_out"] == ""]
    if used[["init_seed", "data_seed"]].isna().any(axis=None):
        return pd.DataFrame()  # seeds not recorded
    for name in VARIANCE_SPLIT:
        runs = used[np.isfinite(used[name].to_numpy(dtype=float))]
        try:
            rows[name] = variance_split(runs[name], runs["init_seed"], runs["data_seed"])
        except ValueError:  # not a complete crossed design
            continue
    return pd.DataFrame(rows).T


def _seed_status(one: xr.Dataset, *, include_incomplete: bool) -> tuple[str, str]:
    """``(status, left_out)`` of one seed (see :func:`summarize`)."""
    complete = bool(one["complete"]) if "complete" in one.coords else True
    status = "complete" if complete else "incomplete"
    if not bool(one["induction_score"].notnull().any()):
        trained = bool(one["loss"].notnull().any())
        return status, "not analysed" if trained else "not trained"
    if not complete and not include_incomplete:
        return status, "incomplete"
    return status, ""


def _seed_row(
    one: xr.Dataset, *, threshold: float, tokens_per_step: float, include_incomplete: bool
) -> dict[str, Any]:
    """The per-seed columns of :func:`summarize` for one seed's slice of the results."""
    status, left_out = _seed_status(one, include_incomplete=include_incomplete)
    loss = one["loss"].dropna("train_step")
    row: dict[str, Any] = {
        "seed": int(one["seed"]),
        "init_seed": int(one["init_seed"]) if "init_seed" in one.coords else None,
        "data_seed": int(one["data_seed"]) if "data_seed" in one.coords else None,
        "status": status,
        "left_out": left_out,
        "trained_steps": int(loss.sizes["train_step"]),
        "n_checkpoints": 0,
        "induction_heads": "",
        "n_induction_heads": 0,
        "best_head": "",
        "best_layer": -1,
        "best_head_in_layer": -1,
        "best_head_peak": math.nan,
        "emergence_crossing_step": math.nan,
        "emergence_midpoint_step": math.nan,
        "emergence_midpoint_tokens": math.nan,
        "bump_start_step": math.nan,
        "bump_end_step": math.nan,
        "bump_start_tokens": math.nan,
        "bump_end_tokens": math.nan,
        "bump_loss_drop": math.nan,
        "jump_in_bump": None,
        "icl_before": math.nan,
        "icl_after": math.nan,
        "icl_change": math.nan,
        "final_loss": final_loss(loss.values),
    }
    if bool(one["induction_score"].notnull().any()):
        row |= _heads_columns(one["induction_score"], threshold, tokens_per_step)
    signal = bump_signal(one)
    if signal.sizes["train_step"] < 2:
        return row
    bump = loss_bump(
        signal["train_step"].values, signal.values, tokens_per_step=round(tokens_per_step)
    )
    if bump is None:
        return row
    row |= {
        "bump_start_step": bump.start_step,
        "bump_end_step": bump.end_step,
        "bump_start_tokens": bump.start_tokens,
        "bump_end_tokens": bump.end_tokens,
        "bump_loss_drop": bump.loss_drop,
    }
    midpoint = row["emergence_midpoint_step"]
    if np.isfinite(midpoint):
        row["jump_in_bump"] = bump.start_step <= midpoint <= bump.end_step
    return row | _icl_columns(one["icl_score"], bump)


BRANCHES_NOTE = (
    "branches beside their parents (delta: branch minus parent; results before the fork are "
    "the parent's)"
)
BRANCH_DELTAS = ("emergence_crossing_step", "emergence_midpoint_step", "final_loss")


def branch_table(
    branches: xr.Dataset | None,
    per_seed: pd.DataFrame,
    *,
    threshold: float,
    attrs: dict[str, Any],
    include_incomplete: bool = True,
) -> pd.DataFrame:
    """One row per branch, summarised like a seed and set against its parent's row.

    Columns: ``parent`` (``"seed0"``; ``"seed0/a"`` for a branch of the branch ``a``),
    ``fork``, ``intervention`` (its JSON), the columns of a seed's row of :func:`summarize`
    computed on the branch's whole trajectory, ``<q>_delta`` (branch minus parent) for each
    quantity of :data:`BRANCH_DELTAS`, and
    ``parent_head_peak``: the peak induction score in the branch of the parent's best head.

    Parameters
    ----------
    branches
        As from :func:`~observatory.report.results.load_branches` (None: no branches).
    per_seed
        ``Summary.per_seed`` of the parents.
    threshold
        Induction score at which a head counts as formed (the parents').
    attrs
        The results' attributes (``warmup_steps``, ``step`` tokens) the parents were summarised
        with.
    include_incomplete
        As in :func:`summarize` (an incomplete branch is summarised where it stopped).
    """
    if branches is None or not branches.sizes.get("branch"):
        return pd.DataFrame()
    branches = branches.assign_attrs(attrs)
    per_token = tokens_per_step(branches)
    rows: list[dict] = []
    for label in branches["branch"].values:
        one = branches.sel(branch=label)
        seed = int(one["seed"])
        row = _seed_row(
            one,
            threshold=threshold,
            tokens_per_step=per_token,
            include_incomplete=include_incomplete,
        )
        # a branch of a branch ("seed0/a/b") is set against its parent branch's row
        above = str(label).rpartition("/")[0]
        parent = next((r for r in rows if r["branch"] == above), None)
        if parent is None and above == f"seed{seed}" and seed in per_seed.index:
            parent = per_seed.loc[seed]
        row |= {"branch": str(label), "parent": above, "fork": int(one["fork"])}
        row["intervention"] = str(one["intervention"].values)
        for name in BRANCH_DELTAS:
            row[f"{name}_delta"] = row[name] - parent[name] if parent is not None else math.nan
        row["parent_head_peak"] = math.nan
        if parent is not None and parent["best_layer"] >= 0:
            head = one["induction_score"].sel(
                layer=parent["best_layer"], head=parent["best_head_in_layer"]
            )
            row["parent_head_peak"] = float(head.max()) if bool(head.notnull().any()) else math.nan
        rows.append(row)
    first = ["parent", "fork", "intervention"]
    table = pd.DataFrame(rows).drop(columns="seed").set_index("branch")
    return table[first + [c for c in table.columns if c not in first]]


def _icl_columns(icl: xr.DataArray, bump) -> dict[str, float]:
    """The ICL score at the last checkpoint before the bump and the first after it."""
    icl = icl.dropna("step")
    before = icl.where(icl["step"] <= bump.start_step, drop=True)
    after = icl.where(icl["step"] >= bump.end_step, drop=True)
    if not (before.size and after.size):
        return {}
    first, last = float(before[-1]), float(after[0])
    return {"icl_before": first, "icl_after": last, "icl_change": last - first}


def bump_signal(one: xr.Dataset) -> xr.DataArray:
    """The per-step series the loss bump is searched in, for one seed.

    The training loss, or, where the size names a ``control`` size trained on the same batches
    (``control_loss``), the loss minus the control's: both models see the same batch at each
    step, so the batch-to-batch noise and the smooth learning both share cancel, and what is
    left is what the extra layers learn (Olsson et al. set their models against 1-layer ones).
    Steps of the learning-rate warm-up (``attrs["warmup_steps"]``) are left out: there the
    step size itself changes, so the curve's shape is the schedule's.
    """
    loss = one["loss"].dropna("train_step")
    loss = loss.sel(train_step=loss["train_step"] >= one.attrs.get("warmup_steps", 0))
    if "control_loss" not in one or not bool(one["control_loss"].notnull().any()):
        return loss
    control = one["control_loss"].sel(train_step=loss["train_step"])
    return (loss - control).dropna("train_step")


def bump_signal_name(ds: xr.Dataset) -> str:
    """What :func:`bump_signal` uses, in words (recorded with the summary's parameters)."""
    after = f" after the {ds.attrs.get('warmup_steps', 0)} warm-up steps"
    if "control_loss" in ds:
        control = ds["control_loss"].attrs["control"]
        return f"training loss minus that of the control size {control}{after}"
    return "training loss" + after


def _heads_columns(
    induction: xr.DataArray, threshold: float, tokens_per_step: float
) -> dict[str, Any]:
    """Induction heads, best head and its emergence of one seed (see :func:`summarize`)."""
    scores = induction.transpose("step", "layer", "head")
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
    return {
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
    }


def ablation_ranks(ds: xr.Dataset, per_seed: pd.DataFrame) -> pd.DataFrame:
    """Per seed: is the best induction head the head whose ablation hurts most?

    Heads are ranked by the increase in loss on the probe's repeated part when ablated
    (``repeated_loss_increase``) at two checkpoints of each seed: the first with ablation
    results at or after the end of its loss bump (``bump_end_*`` columns: the circuit that
    the phase change formed), and the last one. At each, the best induction head is the head
    with the highest induction score at that checkpoint. Heads that later duplicate the
    circuit each carry part of it, so removing one costs less: the two ranks differ then.

    Returns
    -------
    pandas.DataFrame
        Index ``seed``; for the last checkpoint ``ablation_step``, ``top_ablation_head``
        (largest effect), ``top_ablation_effect``, ``ablation_best_head``,
        ``best_head_ablation_effect``, ``best_head_ablation_rank`` (1: largest) and
        ``best_head_is_top_ablation``; the same with the prefix ``bump_end_`` for the end of
        the loss bump (NaN/None without a bump).
    """
    rows = []
    for seed in ds["seed"].values:
        effect = ds["repeated_loss_increase"].sel(seed=seed)
        effect = effect.isel(step=effect.notnull().all(["layer", "head"]).values)
        scores = ds["induction_score"].sel(seed=seed)
        row = {"seed": int(seed)}
        row |= _ablation_rank(effect.isel(step=slice(-1, None)), scores, prefix="")
        after = effect.sel(step=effect["step"] >= per_seed.loc[int(seed), "bump_end_step"])
        row |= _ablation_rank(after.isel(step=slice(0, 1)), scores, prefix="bump_end_")
        rows.append(row)
    return pd.DataFrame(rows).set_index("seed")


def _ablation_rank(effect: xr.DataArray, scores: xr.DataArray, *, prefix: str) -> dict:
    """The ranks at the one checkpoint of ``effect`` (none: NaN and None)."""
    row = {f"{prefix}ablation_step": math.nan, f"{prefix}top_ablation_head": None}
    if not effect.sizes["step"]:
        return row
    at = effect.isel(step=0).transpose("layer", "head")
    step = int(at["step"])
    score = scores.sel(step=step).transpose("layer", "head").values
    if not np.isfinite(score).all():
        return row
    values, labels = at.values, (at["layer"].values, at["head"].values)
    top = np.unravel_index(np.argmax(values), values.shape)
    best = np.unravel_index(np.argmax(score), score.shape)
    rank = 1 + int((values > values[best]).sum())
    return {
        f"{prefix}ablation_step": step,
        f"{prefix}top_ablation_head": head_label(labels[0][top[0]], labels[1][top[1]]),
        f"{prefix}top_ablation_effect": float(values[top]),
        f"{prefix}ablation_best_head": head_label(labels[0][best[0]], labels[1][best[1]]),
        f"{prefix}best_head_ablation_effect": float(values[best]),
        f"{prefix}best_head_ablation_rank": rank,
        f"{prefix}best_head_is_top_ablation": rank == 1,
    }


# --------------------------------------------------------------------------------------------
# The per-token-loss PCA.


def token_loss_pca(ds: xr.Dataset, *, n_components: int = 2) -> xr.Dataset:
    """Joint PCA of the per-token-loss vectors of every checkpoint of every seed.

    One fit (:func:`~observatory.analysis.loss_pca`) over all (seed, checkpoint) rows that
    have per-token losses, so the seeds' trajectories share one coordinate system.

    Parameters
    ----------
    ds
        Results as from :func:`~observatory.report.results.load_results`.
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
    check_results(ds, ("token_loss",))
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
# Head matching and representation similarity across seeds.

# Head scores that make up a head's profile for CKA (those present are used).
PROFILE_SCORES = (
    "induction_score",
    "previous_token_score",
    "duplicate_token_score",
    "copying_score",
    "tl_induction_score",
    "tl_previous_token_score",
    "tl_duplicate_token_score",
)
CKA_RULE = (
    "linear CKA (unbiased HSIC) between a seed and the reference seed at each checkpoint both "
    "analysed; samples: the heads, paired by the Hungarian matching of induction-score "
    "trajectories; features: each head's scores ({scores}) at that checkpoint"
)


@dataclass(frozen=True, eq=False)
class SeedAlignment:
    """Heads matched across seeds and the similarity of the seeds' head-score profiles.

    Attributes
    ----------
    reference
        The seed every other seed is matched to (the first seed used).
    matches
        One row per (other seed, head of the reference): ``seed``, ``reference_head``,
        ``matched_head`` (labels like ``L1H2``) and ``distance`` (Euclidean distance of the
        induction-score trajectories over the common checkpoints).
    cka
        ``cka[seed, step]`` for the other seeds: linear CKA of the head-score profiles with
        the reference's (see :data:`CKA_RULE`); NaN where either has no analysed checkpoint
        at that step (or a profile is constant).
    rule
        How the CKA was computed (which scores are the features).
    """

    reference: int
    matches: pd.DataFrame
    cka: xr.DataArray
    rule: str


def seed_alignment(ds: xr.Dataset, seeds: list[int] | None = None) -> SeedAlignment | None:
    """Match heads across seeds (Hungarian) and compare the seeds with linear CKA.

    Head identity is not stable across seeds: each seed's heads are matched one-to-one to
    the reference seed's by their induction-score trajectories
    (:func:`~observatory.analysis.match_heads`). At every checkpoint both seeds analysed,
    each seed is represented by the matrix ``[head, score]`` of its heads' scores (the
    variables of :data:`PROFILE_SCORES` that exist), rows in matched order, and compared with
    :func:`~observatory.analysis.linear_cka` using the unbiased HSIC (few samples: one per
    head). Model activations would be a richer representation, but they are not stored.

    Parameters
    ----------
    ds
        Results as from :func:`load_results`.
    seeds
        The seeds to align (default: every seed with induction scores); the first is the
        reference.

    Returns
    -------
    SeedAlignment or None
        None if fewer than two seeds have induction scores or there are fewer than 4 heads.
    """
    if seeds is None:
        analysed = ds["induction_score"].notnull().any(["step", "layer", "head"])
        seeds = [int(seed) for seed in ds["seed"].values[analysed.values]]
    n_heads = ds.sizes["layer"] * ds.sizes["head"]
    if len(seeds) < 2 or n_heads < 4:
        return None
    scores = [name for name in PROFILE_SCORES if name in ds]
    reference = seeds[0]
    labels = [head_label(layer, head) for layer in ds["layer"].values for head in ds["head"].values]
    rows, cka = [], np.full((len(seeds) - 1, ds.sizes["step"]), np.nan)
    ref_profile = _profiles(ds.sel(seed=reference), scores)  # [step, head, score]
    for i, seed in enumerate(seeds[1:]):
        profile = _profiles(ds.sel(seed=seed), scores)
        common = np.isfinite(ref_profile).all(axis=(1, 2)) & np.isfinite(profile).all(axis=(1, 2))
        if not common.any():
            continue
        match = match_heads(ref_profile[common, :, 0].T, profile[common, :, 0].T)
        rows += [
            {
                "seed": seed,
                "reference_head": labels[a],
                "matched_head": labels[b],
                "distance": float(d),
            }
            for a, b, d in zip(match.a, match.b, match.distance, strict=True)
        ]
        for step in np.flatnonzero(common):
            x, y = ref_profile[step][match.a], profile[step][match.b]
            with np.errstate(invalid="ignore", divide="ignore"):  # constant profiles: NaN
                cka[i, step] = linear_cka(x, y, unbiased=True)
    return SeedAlignment(
        reference=reference,
        matches=pd.DataFrame(rows),
        cka=xr.DataArray(
            cka, dims=("seed", "step"), coords={"seed": seeds[1:], "step": ds["step"].values}
        ),
        rule=CKA_RULE.format(scores=", ".join(scores)),
    )


def _profiles(one: xr.Dataset, scores: list[str]) -> np.ndarray:
    """``[step, head, score]``: every head's scores at every checkpoint of one seed."""
    stacked = np.stack(
        [one[name].transpose("step", "layer", "head").values for name in scores], axis=-1
    )
    return stacked.reshape(stacked.shape[0], -1, len(scores))


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)
