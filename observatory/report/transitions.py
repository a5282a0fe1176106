"""The transitions of a family: found per seed, matched across seeds, with heads and examples.

:mod:`observatory.analysis.transitions` finds each seed's transitions in the stored
``per_token_loss`` results and matches them across seeds; this module reads the results,
names the heads whose scores change in each window (``components``) and those whose ablation
raises the group's loss most at its end (``ablation``), shows example tokens in
context (decoded for text families) and summarises each matched transition across seeds.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from observatory.analysis.stats import t_interval, variance_split
from observatory.analysis.transitions import (
    METHOD,
    Transition,
    TransitionOptions,
    find_transitions,
)
from observatory.analysis.transitions import match_transitions as match
from observatory.errors import StoreError
from observatory.jobs.job_spec import HeldOutSpec
from observatory.report.summary import head_label

SIGNAL = "per_token_loss"
MIN_CHECKPOINTS = 8  # fewer cannot hold two segments of the change-point rule on each side
HEAD_SCORES = ("induction_score", "previous_token_score", "duplicate_token_score")
CONTEXT_TOKENS = 8  # tokens of context shown before an example token
COLUMNS = (
    "transition", "seed", "start_step", "end_step", "loss_drop", "n_tokens", "universal",
    "n_seeds", "learning_step", "components", "ablation", "examples",
)  # fmt: skip
MIN_ABLATION_EFFECT = 0.1  # nats: a head whose ablation raises a group's loss less is not listed
N_ABLATION_HEADS = 3


def transitions(
    store: str | Path,
    *,
    size: str | None = None,
    seeds: list[int] | None = None,
    options: TransitionOptions | None = None,
) -> pd.DataFrame:
    """Every transition of every seed of one size, matched across seeds.

    Parameters
    ----------
    store
        The family store, analysed with ``per_token_loss`` (``analyses/induction.toml`` and
        ``analyses/text.toml`` include it).
    size
        Size name; may be omitted when the store has a single size.
    seeds
        Seeds to use (default: every seed with results).
    options
        Discovery and matching settings (:class:`TransitionOptions`).

    Returns
    -------
    pandas.DataFrame
        One row per (transition, seed), the columns of :data:`COLUMNS` and ``tokens`` (the
        flat held-out token indices of the group, ``sequence * loss positions + position``);
        ``attrs``: ``method``, ``options``, ``seeds`` and ``store``, ``size``.

    Raises
    ------
    StoreError
        If the store has no ``per_token_loss`` results, fewer than 2 seeds with them, or a
        seed with fewer than :data:`MIN_CHECKPOINTS` analysed checkpoints.
    """
    from observatory.report.results import load_results

    ds = load_results(store, size=size, seeds=seeds, require=(SIGNAL,))
    return transition_table(ds, options=options, windows=held_out_windows(ds), ablation=True)


def transition_table(
    ds: xr.Dataset,
    *,
    options: TransitionOptions | None = None,
    windows: tuple[np.ndarray, object] | None = None,
    ablation: bool = False,
) -> pd.DataFrame:
    """:func:`transitions` of loaded results.

    ``windows``: the held-out tokens and a decoder (for ``examples``); ``ablation``: measure
    ``ablation`` with the models of the results' store (needs ``windows``).

    Raises
    ------
    StoreError
        As :func:`transitions`.
    """
    options = options or TransitionOptions()
    curves = _signal(ds)
    per_seed = {
        seed: find_transitions(
            steps,
            losses,
            min_gain=options.min_gain,
            min_drop=options.min_drop,
            min_tokens=options.min_tokens,
            resolution=options.resolution,
        )
        for seed, (steps, losses) in curves.items()
    }
    ids = match(per_seed, min_overlap=options.min_overlap)
    seeds_of: dict[int, set[int]] = {}
    for (seed, _), tid in ids.items():
        seeds_of.setdefault(tid, set()).add(seed)
    rows = []
    for (seed, index), tid in sorted(ids.items(), key=lambda item: (item[1], item[0])):
        found = per_seed[seed][index]
        rows.append(
            {
                "transition": tid,
                "seed": seed,
                "start_step": found.start_step,
                "end_step": found.end_step,
                "loss_drop": found.loss_drop,
                "n_tokens": found.n_tokens,
                "universal": len(seeds_of[tid]) == len(curves),
                "n_seeds": len(seeds_of[tid]),
                "learning_step": found.learning_step,
                "components": _components(ds, seed, found, options.min_score_change),
                "ablation": _ablation(ds, seed, found, windows) if ablation else "",
                "examples": _examples(curves[seed], found, windows, options.n_examples),
                "tokens": found.tokens,
            }
        )
    table = pd.DataFrame(rows, columns=[*COLUMNS, "tokens"])
    table.attrs = {
        "method": METHOD,
        "options": asdict(options),
        "seeds": [int(seed) for seed in curves],
        "store": str(ds.attrs.get("store", "")),
        "size": str(ds.attrs.get("size", "")),
    } | _seed_coords(ds)
    return table


def _seed_coords(ds: xr.Dataset) -> dict[str, dict[str, int]]:
    """``init_seeds`` and ``data_seeds``: ``{seed: init/data seed}`` where recorded."""
    out = {}
    for coord in ("init_seed", "data_seed"):
        if coord in ds.coords:
            values = ds[coord].values
            out[f"{coord}s"] = {
                str(int(seed)): int(value)
                for seed, value in zip(ds["seed"].values, values, strict=True)
                if np.isfinite(value)
            }
    return out


def _signal(ds: xr.Dataset) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``{seed: (steps, losses[step, token])}`` of the seeds with per-token losses."""
    where = f"{ds.attrs.get('store', 'dataset')} (size {ds.attrs.get('size', '?')})"
    if SIGNAL not in ds:
        raise StoreError(
            f"{where}: no {SIGNAL} results; run `observatory analyze` with the {SIGNAL} "
            "analysis (analyses/induction.toml and analyses/text.toml include it)"
        )
    curves = {}
    for seed in ds["seed"].values:
        losses = ds[SIGNAL].sel(seed=seed)
        losses = losses.stack(token=("held_out", "loss_position")).transpose("step", "token")
        done = losses.notnull().all("token").values
        if not done.any():
            continue
        steps, values = losses["step"].values[done], losses.values[done]
        if len(steps) < MIN_CHECKPOINTS:
            raise StoreError(
                f"{where}: seed {int(seed)} has {SIGNAL} at {len(steps)} checkpoints; "
                f"transitions need at least {MIN_CHECKPOINTS} (analyse more checkpoints)"
            )
        curves[int(seed)] = (steps, values)
    if len(curves) < 2:
        raise StoreError(
            f"{where}: {len(curves)} seed(s) with {SIGNAL} results; transitions are matched "
            "across seeds: train and analyse at least 2"
        )
    return curves


def _components(ds: xr.Dataset, seed: int, found: Transition, min_change: float) -> str:
    """The heads whose scores change by at least ``min_change`` across the window."""
    changes = []
    for name in HEAD_SCORES:
        if name not in ds:
            continue
        score = ds[name].sel(seed=seed).dropna("step", how="all")
        if not score.sizes["step"]:
            continue
        start = score.sel(step=found.start_step, method="nearest")
        end = score.sel(step=found.end_step, method="nearest")
        delta = (end - start).values
        for layer, head in zip(*np.nonzero(np.abs(delta) >= min_change), strict=True):
            kind = name.removesuffix("_score").replace("_", "-")
            changes.append(
                (abs(delta[layer, head]), head_label(layer, head), kind, delta[layer, head])
            )
    changes.sort(key=lambda change: -change[0])
    return "; ".join(f"{label} {kind} {value:+.2f}" for _, label, kind, value in changes)


def _ablation(ds: xr.Dataset, seed: int, found: Transition, windows) -> str:
    """The heads whose zero-ablation raises the group's loss most at the window's end.

    Measured on the group's own held-out tokens with the run's model at the analysed
    checkpoint nearest ``end_step`` (so it needs the store: ``windows`` given).
    """
    if windows is None:
        return ""
    from observatory.analysis.ablation import ablated_losses
    from observatory.query import model_at

    tokens, _ = windows
    steps = ds["step"].values
    step = int(steps[np.argmin(np.abs(steps - found.end_step))])
    model = model_at(ds.attrs["store"], size=str(ds.attrs["size"]), seed=seed, step=step)
    sequences = np.unique(found.tokens // (tokens.shape[1] - 1))
    clean, ablated = ablated_losses(model, tokens[sequences])
    rows = np.searchsorted(sequences, found.tokens // (tokens.shape[1] - 1))
    positions = found.tokens % (tokens.shape[1] - 1)
    effect = (ablated[..., rows, positions] - clean[rows, positions]).mean(axis=-1)
    order = np.argsort(-effect, axis=None)[:N_ABLATION_HEADS]
    shown = [np.unravel_index(flat, effect.shape) for flat in order]
    return "; ".join(
        f"{head_label(layer, head)} {effect[layer, head]:+.2f}"
        for layer, head in shown
        if effect[layer, head] >= MIN_ABLATION_EFFECT
    )


def _examples(curve, found: Transition, windows, n: int) -> str:
    """The group's tokens that drop most across the window, each after its context."""
    if windows is None:
        return ""
    tokens, decode = windows
    steps, losses = curve
    start = int(np.argmin(np.abs(steps - found.start_step)))
    end = int(np.argmin(np.abs(steps - found.end_step)))
    drop = losses[start, found.tokens] - losses[end, found.tokens]
    shown = []
    for flat in found.tokens[np.argsort(-drop, kind="stable")[:n]]:
        sequence, position = np.unravel_index(flat, (len(tokens), tokens.shape[1] - 1))
        ids = tokens[sequence]
        context = decode(ids[max(0, position + 1 - CONTEXT_TOKENS) : position + 1])
        shown.append(f"{context!r} → {decode(ids[position + 1 : position + 2])!r}")
    return " | ".join(shown)


def held_out_windows(ds: xr.Dataset) -> tuple[np.ndarray, object] | None:
    """The held-out windows of the stored ``per_token_loss`` results and their decoder.

    Rebuilt from the recorded held-out seed and count; synthetic tokens are shown as ids.
    None when the results were given without a store.
    """
    from observatory.data import recorded_corpus
    from observatory.jobs.analyze import held_out_tokens
    from observatory.query.tokenizer import window_decoder
    from observatory.store import FamilyStore

    if not ds.attrs.get("store"):
        return None
    family = FamilyStore(ds.attrs["store"])
    recorded, default = ds[SIGNAL].attrs, HeldOutSpec()
    spec = HeldOutSpec(
        seed=int(recorded.get("held_out_seed", default.seed)),
        n_sequences=int(recorded.get("held_out_n_sequences", default.n_sequences)),
    )
    tokens, _ = held_out_tokens(family.spec, spec, corpus=recorded_corpus(family))
    try:
        decode = window_decoder(family)
    except StoreError:  # synthetic or undecodable tokens: their ids

        def decode(ids) -> str:
            return " ".join(str(int(token)) for token in ids)

    return tokens, decode


def transition_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Each matched transition across seeds: in how many, and when (t-interval, n seeds).

    Returns
    -------
    pandas.DataFrame
        One row per transition: ``n_seeds``, ``seeds``, ``universal``, the mean and the 95%
        t-interval (:func:`~observatory.analysis.t_interval`) of ``start_step`` and
        ``end_step``, the mean ``loss_drop`` and ``n_tokens``, and the share of the variance
        of ``start_step`` due to the init seed and the data seed where the seeds cross (at
        least 2 x 2; ``variance_design`` says which), else NaN.
    """
    rows = {}
    for tid, group in table.groupby("transition"):
        row = {
            "n_seeds": len(group),
            "seeds": " ".join(str(seed) for seed in group["seed"]),
            "universal": bool(group["universal"].iloc[0]),
        }
        for name in ("start_step", "end_step"):
            low, high = t_interval(group[name])
            row |= {f"{name}_mean": group[name].mean(), f"{name}_low": low, f"{name}_high": high}
        row |= {
            "loss_drop_mean": group["loss_drop"].mean(),
            "n_tokens_mean": group["n_tokens"].mean(),
        }
        rows[int(tid)] = row | _seed_split(table, group)
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("transition")


def _seed_split(table: pd.DataFrame, group: pd.DataFrame) -> dict[str, float | str]:
    init, data = table.attrs.get("init_seeds"), table.attrs.get("data_seeds")
    empty = {"variance_design": "", "init_share": np.nan, "data_share": np.nan}
    if not init or not data:
        return empty
    seeds = [str(seed) for seed in group["seed"]]
    try:
        split = variance_split(
            group["start_step"], [init[s] for s in seeds], [data[s] for s in seeds]
        )
    except (ValueError, KeyError):  # not a complete crossed design
        return empty
    return {
        "variance_design": split["design"],
        "init_share": split["init_share"],
        "data_share": split["data_share"],
    }


def format_transitions(table: pd.DataFrame) -> str:
    """The table as text: one block per matched transition, one line per seed."""
    seeds = table.attrs.get("seeds", sorted(set(table["seed"])))
    if not len(table):
        return f"no transitions found in {len(seeds)} seeds ({table.attrs.get('method', '')})"
    summary = transition_summary(table)
    lines = []
    for tid, row in summary.iterrows():
        where = "every seed" if row["universal"] else f"seeds {row['seeds']}"
        interval = f"{row['start_step_low']:.0f}-{row['start_step_high']:.0f}"
        lines.append(
            f"transition {tid}: {where} ({row['n_seeds']} of {len(seeds)}); starts at step "
            f"{row['start_step_mean']:.0f} on average (95% t-interval {interval}, "
            f"n = {row['n_seeds']})"
        )
        for found in table[table["transition"] == tid].itertuples(index=False):
            lines.append(
                f"  seed {found.seed}: steps {found.start_step:.0f}-{found.end_step:.0f}, "
                f"loss -{found.loss_drop:.2f} nats on {found.n_tokens} tokens; "
                f"heads: {found.components or 'none changed'}"
            )
            if found.ablation:
                lines.append(f"    ablating raises the group's loss: {found.ablation}")
            if found.examples:
                lines.append(f"    e.g. {found.examples}")
    return "\n".join(lines)


def write_transitions(table: pd.DataFrame, out: Path) -> list[Path]:
    """``transitions.csv`` (one row per transition and seed) and ``transitions.json`` (the
    rows, the summary across seeds and the method) in ``out``."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    rows = table.drop(columns="tokens")
    csv, data = out / "transitions.csv", out / "transitions.json"
    rows.to_csv(csv, index=False)
    summary = transition_summary(table) if len(table) else pd.DataFrame()
    record = {
        **{key: table.attrs[key] for key in ("method", "options", "seeds") if key in table.attrs},
        "rows": json.loads(rows.to_json(orient="records")),
        "across_seeds": json.loads(summary.reset_index().to_json(orient="records")),
    }
    data.write_text(json.dumps(record, indent=2) + "\n")
    return [csv, data]
