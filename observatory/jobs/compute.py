"""In a notebook: one analysis on a family's checkpoints, in this process, nothing written.

:func:`compute` uses the same shared data and checks as a job, so its values equal what
``observatory analyze`` stores.  :func:`describe_analyses` is what ``observatory analyses``
prints.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from observatory.analysis.builtins import BUILTINS
from observatory.analysis.protocol import Analysis
from observatory.errors import SpecError
from observatory.jobs.analyze import run_tasks, shared_data, size_dims, task_for
from observatory.jobs.job_spec import HeldOutSpec, ProbeSpec, absolute_ref
from observatory.jobs.resolve import Configured, check_names, resolve
from observatory.spec import _type_name

_PROBE, _HELD_OUT = ProbeSpec(), HeldOutSpec()  # frozen, so safe as shared defaults


def compute(
    analysis: Analysis | str,
    store: str | Path,
    *,
    size: str,
    seeds: Sequence[int] | None = None,
    steps: Iterable[int] | None = None,
    options: dict[str, Any] | None = None,
    probe: ProbeSpec = _PROBE,
    held_out: HeldOutSpec = _HELD_OUT,
):
    """Run one analysis on checkpoints of a family, in this process, and return the results.

    Uses the same shared data as a job with the same ``[probe]`` and ``[held_out]`` tables,
    so the values equal what ``observatory analyze`` stores; nothing is written.

    Parameters
    ----------
    analysis
        An :func:`~observatory.analysis` function, or a reference as in a job file
        (built-in name, ``"package.module:name"``, ``"file.py:name"``).
    store
        The family store.
    size
        Size name.
    seeds
        Seed indices (default: every seed of that size).
    steps
        Checkpoint steps (default: every committed one); a step that some seed lacks is NaN
        for that seed, one that no seed has is an error listing the checkpoints.
    options
        The analysis's options (a mapping, as the job's ``[<name>]`` table).
    probe, held_out
        The shared data's parameters.

    Returns
    -------
    xarray.Dataset
        One variable per declared output, dims ``(seed, step, *dims)``; NaN where a seed
        lacks a step.

    Raises
    ------
    SpecError, StoreError, AnalysisError
        One line, on a bad reference, option, size, seed or step (not a list of ints, not a
        checkpoint), a missing store, or a failing analysis.
    """
    import xarray as xr

    from observatory.data import recorded_corpus
    from observatory.jobs.selection import select_readers
    from observatory.query import models_at
    from observatory.store import FamilyStore

    found = resolve(absolute_ref(analysis, Path.cwd())) if isinstance(analysis, str) else analysis
    if not isinstance(found, Analysis):
        raise SpecError(
            f"analysis: {_shown(found)} is not an analysis (decorate a function with "
            "@obs.analysis, or name a built-in, 'package.module:name' or 'file.py:name')"
        )
    chosen = found.parse_options({} if options is None else options, found.name)
    check_names([Configured(ref="", analysis=found, options=chosen, source=None)])
    for value, kind in ((probe, ProbeSpec), (held_out, HeldOutSpec)):
        if not isinstance(value, kind):
            raise SpecError(
                f"{kind.__name__}: expected an obs.{kind.__name__}, got {_shown(value)}"
            )
        value.validate(kind.__name__)
    if not isinstance(size, str):
        raise SpecError(f"size: expected a size name (str), got {_shown(size)}")
    family = FamilyStore(store)
    runs = select_readers(family, sizes=[size], seeds=_ints("seeds", seeds))
    wanted = _ints("steps", steps)
    for step in wanted or []:
        if not any(step in reader.steps() for reader in runs):
            runs[0].checkpoint_index(step)  # the error lists the committed checkpoints
    data = shared_data(family.spec, probe, held_out, corpus=recorded_corpus(family))
    task = task_for(found, chosen, size_dims(family.spec, size, data))
    per_seed = []
    for reader in runs:
        chosen_steps = [int(s) for s in reader.steps() if wanted is None or int(s) in wanted]
        models = models_at(family.path, size=size, seed=reader.run.seed, steps=chosen_steps)
        rows = run_tasks([task], [found], models, data, reader.run.path)[found.name]
        per_seed.append(
            xr.Dataset(
                {v: (("step", *task.variables[v][0]), rows[v]) for v in task.variables},
                coords={"step": chosen_steps},
            ).expand_dims(seed=[reader.run.seed])
        )
    return xr.concat(per_seed, dim="seed") if per_seed else xr.Dataset()


def _ints(what: str, values: Any) -> list[int] | None:
    """``values`` as a non-empty list of ints >= 0 (None stays None), or a one-line error."""
    if values is None:
        return None
    listed = (
        list(values)
        if isinstance(values, Iterable) and not isinstance(values, str | bytes | Mapping)
        else []
    )
    valid = all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in listed)
    chosen = [int(v) for v in listed] if valid else []
    if not chosen or min(chosen) < 0:
        raise SpecError(
            f"{what}: expected a non-empty list of ints >= 0, got {_shown(listed or values)}"
        )
    return chosen


def _shown(value: Any) -> str:
    """``value`` for a one-line message: its repr, cut short."""
    text = repr(value).splitlines()[0] if repr(value) else type(value).__name__
    return text if len(text) <= 60 else f"{text[:57]}..."


def describe_analyses(analyses: Iterable[Analysis] | None = None) -> str:
    """The built-in analyses (or ``analyses``) as text: doc line, variables, options."""
    lines = []
    for found in BUILTINS.values() if analyses is None else analyses:
        defaults = found.options()
        lines += [f"{found.name}: {found.doc}", "  variables:"]
        for variable, dims in found.declared(defaults).items():
            names = [d if isinstance(d, str) else f"{d[0]}={d[1]}" for d in dims]
            lines.append(f"    {variable} [{', '.join(['step', *names])}]")
        fields = dataclasses.fields(defaults)
        lines.append("  options:" + ("" if fields else " none"))
        for f in fields:
            value = json.dumps(getattr(defaults, f.name))  # TOML-like: true, "text", [1, 2]
            lines.append(f"    {f.name} = {value}  ({_type_name(f.type)})")
    return "\n".join(lines)
