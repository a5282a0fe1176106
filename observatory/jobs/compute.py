"""In a notebook: one analysis on a family's checkpoints, in this process, nothing written.

:func:`compute` uses the same shared data and checks as a job, so its values equal what
``observatory analyze`` stores.  :func:`describe_analyses` is what ``observatory analyses``
prints.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from observatory.analysis.builtins import BUILTINS
from observatory.analysis.protocol import Analysis, resolve_variables
from observatory.errors import SpecError
from observatory.jobs.analyze import Task, run_tasks, shared_data, size_dims
from observatory.jobs.job_spec import HeldOutSpec, ProbeSpec, absolute_ref
from observatory.jobs.resolve import resolve
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
        Checkpoint steps (default: every committed one); steps a run lacks are skipped.
    options
        The analysis's options (as in the job's ``[<name>]`` table).
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
        On a bad reference or option, a missing store/size/seed, or a failing analysis.
    """
    import xarray as xr

    from observatory.jobs.selection import select_readers
    from observatory.query import models_at
    from observatory.store import FamilyStore

    found = resolve(absolute_ref(analysis, Path.cwd())) if isinstance(analysis, str) else analysis
    if not isinstance(found, Analysis):
        raise SpecError(f"{found!r} is not an analysis (decorate it with @obs.analysis)")
    chosen = found.parse_options(options or {}, found.name)
    family = FamilyStore(store)
    data = shared_data(family.spec, probe, held_out)
    task = Task(
        name=found.name,
        ref="",  # called directly, never shipped
        source=None,
        options=dataclasses.asdict(chosen),
        variables=resolve_variables(
            found.declared(chosen), size_dims(family.spec, size, data), found.name
        ),
    )
    runs = select_readers(family, sizes=[size], seeds=seeds)
    wanted = None if steps is None else {int(s) for s in steps}
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
