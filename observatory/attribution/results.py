"""The attribution API: compute (in this process or on dask), store, read back, rank examples.

:func:`attribute` replays ``[start, stop)`` of one run and writes its attribution into the
store's ``<run>/attribution/<name>`` group (rows by ``train_step``, written through the
analyses' :class:`~observatory.store.AnalysisWriter`); :func:`attribution` reads it back as the
same dataset; :func:`top_examples` ranks the training windows by their contribution.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from observatory import arguments
from observatory.arguments import ArgumentError
from observatory.attribution.spans import map_spans, open_span, read_rows, result_name, write_rows
from observatory.attribution.steps import SpanResult, attribute_span, combine
from observatory.attribution.targets import Target, choose
from observatory.jobs.analyze import shared_data
from observatory.jobs.job_spec import HeldOutSpec, ProbeSpec
from observatory.store import ATTRIBUTION, FamilyStore

RULE = "trapezoid"
STEP_VARIABLES = ("step_contribution", "target_value")
EXAMPLE_VARIABLES = ("example_contribution", "example_index", "carried")
SCALARS = ("residual", "target_start", "target_stop")


def attribute(
    store: str | Path,
    *,
    size: str,
    seed: int,
    start: int,
    stop: int,
    target: str | Target,
    per_example: bool = False,
    options: Mapping[str, Any] | None = None,
    workers: int = 0,
    scheduler: str | None = None,
    name: str | None = None,
    branch: str = "",
) -> xr.Dataset:
    """Attribute the change of a target over training steps ``[start, stop)`` to each update.

    Parameters
    ----------
    store, size, seed
        The run.
    start, stop
        The updates ``start .. stop - 1`` (``0 <= start < stop <=`` the recorded steps).
    target
        A built-in target (``induction_score``, ``previous_token_score``,
        ``probe_repeated_loss``, ``held_out_loss``), ``"file.py:name"``,
        ``"package.module:name"`` or an ``@obs.target`` function.
    per_example
        Also split each step's term over its batch's windows (see
        :mod:`observatory.attribution.examples`).
    options
        The target's options, e.g. ``{"layer": 1, "head": 2}``.
    workers, scheduler
        0 and None: compute in this process; else the span's keyframe segments are dask tasks
        on a local cluster of ``workers`` processes or on the scheduler at ``scheduler``.
    name
        The stored group's name (default: the target's name); existing results of that name
        are replaced.
    branch
        Attribute along this branch of the run (``"a/b"`` for a branch of a branch): its
        intervention acts in the replayed steps from its fork on (steps before it are replayed
        through its parent), the target is evaluated on the weights without ablation hooks
        (see :mod:`observatory.attribution.steps`), and the result is stored in the branch's
        group.

    Returns
    -------
    xarray.Dataset
        ``step_contribution[train_step]`` and ``target_value[train_step]`` (the target before
        each update); with ``per_example``, ``example_contribution[train_step, batch]``,
        ``example_index[train_step, batch]`` (corpus windows) and ``carried[train_step]``;
        scalars ``residual``, ``target_start``, ``target_stop``; the parameters as attributes
        (plus ``store``, ``size``, ``seed``, ``branch``, ``run`` (its path in the store), ``name``).

    Raises
    ------
    ObservatoryError
        One line, before anything is written: unknown run or branch, steps out of range,
        unknown target,
        bad option, or a target that is not a differentiable scalar.
    """
    workers = arguments.index(workers, "workers")
    chosen = choose(target, options)
    name = result_name(chosen.name if name is None else name)
    span = open_span(store, size=size, seed=seed, start=start, stop=stop, branch=branch)
    data = shared_data(span.family.spec, ProbeSpec(), HeldOutSpec())
    results = map_spans(
        attribute_span,
        span,
        chosen.portable(),
        data,
        per_example,
        workers=workers,
        scheduler=scheduler,
    )
    result = combine(results)
    parameters = chosen.parameters() | data.probe.attrs | data.held_out_attrs
    parameters |= {"rule": RULE, "start": span.start, "stop": span.stop}
    parameters |= {"per_example": per_example, "checked_checkpoints": list(result.checked)}
    dataset = _dataset(result, json.loads(json.dumps(parameters)))
    write_rows(span, name, dataset, ATTRIBUTION)
    return dataset.assign_attrs(span.where, name=name)


def _dataset(result: SpanResult, parameters: dict[str, Any]) -> xr.Dataset:
    steps = np.arange(result.start, result.stop, dtype=np.int64)
    change = result.values[-1] - result.values[0]
    variables = {
        "step_contribution": ("train_step", result.terms),
        "target_value": ("train_step", result.values[:-1]),
        "residual": ((), np.float64(change - result.terms.sum())),
        "target_start": ((), np.float64(result.values[0])),
        "target_stop": ((), np.float64(result.values[-1])),
    }
    if result.examples is not None:
        variables |= {
            "example_contribution": (("train_step", "batch"), result.examples),
            "example_index": (("train_step", "batch"), result.indices),
            "carried": ("train_step", result.terms - result.examples.sum(axis=1)),
        }
    return xr.Dataset(variables, coords={"train_step": steps}, attrs=parameters)


def attribution(
    store: str | Path, *, size: str, seed: int, name: str, branch: str = ""
) -> xr.Dataset:
    """An attribution stored by :func:`attribute`, read back (the same values and attributes);
    ``branch``: one stored in that branch of the run.

    Raises
    ------
    StoreError
        If the run or branch does not exist, or has no attribution of that name (the message
        lists the stored ones).
    """
    order = (*STEP_VARIABLES, *SCALARS, *EXAMPLE_VARIABLES)
    where = {"size": size, "seed": seed, "name": name, "branch": branch}
    return read_rows(store, **where, kind=ATTRIBUTION, order=order)


def top_examples(att: xr.Dataset, k: int = 10, *, sign: str = "positive") -> pd.DataFrame:
    """The training windows that moved the target most, one row each.

    Parameters
    ----------
    att
        A per-example attribution (``per_example=True``) from :func:`attribute` or
        :func:`attribution`.
    k
        How many rows.
    sign
        ``"positive"``: the largest contributions (raised the target most); ``"negative"``:
        the most negative ones.

    Returns
    -------
    pandas.DataFrame
        Columns ``train_step``, ``batch`` (position in the step's batch), ``window`` (corpus
        index), ``contribution``, ``tokens`` (the window's ids) and, for a text family,
        ``text`` (the window decoded with the stored tokenizer).

    Raises
    ------
    ArgumentError
        If ``att`` has no per-example terms, or ``k`` or ``sign`` is not valid.
    """
    from observatory.data import stored_corpus
    from observatory.errors import StoreError
    from observatory.query.tokenizer import window_decoder

    k = arguments.index(k, "k", minimum=1)
    if sign not in ("positive", "negative"):
        raise ArgumentError(f"sign: expected 'positive' or 'negative', got {sign!r}")
    if "example_contribution" not in att:
        raise ArgumentError("att: has no example_contribution (attribute with per_example=True)")
    values = att["example_contribution"].values
    order = np.argsort(-values if sign == "positive" else values, axis=None, kind="stable")[:k]
    rows, batch = np.unravel_index(order, values.shape)
    windows = att["example_index"].values[rows, batch]
    family = FamilyStore(att.attrs["store"])
    tokens = stored_corpus(family).windows(windows)
    table = pd.DataFrame(
        {
            "train_step": att["train_step"].values[rows],
            "batch": batch,
            "window": windows,
            "contribution": values[rows, batch],
            "tokens": [list(map(int, window)) for window in tokens],
        }
    )
    try:
        decode = window_decoder(family)
    except StoreError:  # synthetic tokens or token files without a tokenizer: ids only
        return table
    return table.assign(text=[decode(window) for window in tokens.tolist()])


def format_attribution(att: xr.Dataset, rows: int = 10) -> str:
    """What ``observatory attribute`` prints: the largest step contributions, their sum, the
    measured change and the residual (also as a percentage of the change)."""
    terms = att["step_contribution"]
    order = np.argsort(-np.abs(terms.values), kind="stable")[:rows]
    lines = [f"{'train_step':>10}  {'contribution':>14}  {'target before':>14}"]
    for i in sorted(order):
        step, term = int(att["train_step"][i]), float(terms[i])
        lines.append(f"{step:>10}  {term:>14.6g}  {float(att['target_value'][i]):>14.6g}")
    change = float(att["target_stop"] - att["target_start"])
    residual = float(att["residual"])
    share = f" ({residual_share(att):.3g}% of the change)" if change else ""
    target = att.attrs.get("target")
    lines += [
        f"target {target} {att.attrs.get('target_options')}: "
        f"{float(att['target_start']):.6g} at step {att.attrs['start']} -> "
        f"{float(att['target_stop']):.6g} at step {att.attrs['stop']}",
        f"sum of {terms.size} step contributions: {float(terms.sum()):.6g}",
        f"measured change: {change:.6g}",
        f"residual: {residual:.3g}{share}",
    ]
    return "\n".join(lines)


def residual_share(att: xr.Dataset) -> float:
    """The residual as a percentage of the measured change of the target (NaN: no change)."""
    change = float(att["target_stop"] - att["target_start"])
    return 100 * float(att["residual"]) / change if change else float("nan")
