"""Analysis jobs: a TOML spec, split into (run, checkpoint block) tasks on dask.distributed.

Workers load only the checkpoints of their block, call the analyses (pure functions of the
protocol in :mod:`observatory.analysis.protocol`) and return numpy arrays; the client writes
them into the store (one writer, no locking), so a job can run while training is still writing
and a re-run computes only what is missing. This module knows no particular analysis: it
resolves names to analyses, validates their option tables, builds the shared data once per job,
and ships user code (its source text) to the workers, local or remote.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import linecache
import sys
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from observatory.analysis.builtins import BUILTINS, DEFAULT_ANALYSES
from observatory.analysis.probes import repeated_tokens
from observatory.analysis.protocol import (
    Analysis,
    SharedData,
    check_result,
    dim_sizes,
    resolve_variables,
)
from observatory.data import build_corpus
from observatory.errors import AnalysisError, SpecError
from observatory.jobs.cluster import dask_client
from observatory.spec import DataSpec, RunId, RunSpec, _type_name, from_table, load_toml


@dataclass(frozen=True)
class ProbeSpec:
    """The repeated-random-token probe (Olsson et al.: 25 tokens x 4 after a BOS, 10 seqs)."""

    seed: int = 1234
    n_sequences: int = 10
    block_length: int = 25
    repeats: int = 4

    def validate(self, where: str) -> None:
        for key in ("n_sequences", "block_length"):
            if getattr(self, key) < 1:
                raise SpecError(f"{where}.{key}: must be positive")
        if self.repeats < 2:
            raise SpecError(f"{where}.repeats: need at least 2 repeats")


@dataclass(frozen=True)
class HeldOutSpec:
    """Held-out sequences for the ICL score, per-token losses and ablations."""

    seed: int = 4321  # synthetic corpora: a fresh corpus from this seed; text: sample seed
    n_sequences: int = 64

    def validate(self, where: str) -> None:
        if self.n_sequences < 2:
            raise SpecError(f"{where}.n_sequences: need at least 2 sequences")


@dataclass(frozen=True)
class ExecutionSpec:
    block_size: int = 16  # checkpoints per task
    workers: int = 0  # local cluster size (0: one per core)

    def validate(self, where: str) -> None:
        if self.block_size < 1:
            raise SpecError(f"{where}.block_size: must be positive")
        if self.workers < 0:
            raise SpecError(f"{where}.workers: must be >= 0")


@dataclass(frozen=True)
class AnalysisSpec:
    """An analysis job over a family store.

    ``analyses`` names built-ins, ``"package.module:name"`` or ``"file.py:name"`` (a relative
    file is relative to the job file when loaded from one, else to the current directory);
    ``options`` maps an analysis name to its option table (the job file's ``[<name>]``).
    """

    store: str
    analyses: tuple[str, ...] = DEFAULT_ANALYSES
    sizes: tuple[str, ...] = ()  # empty: every size in the store
    seeds: tuple[int, ...] = ()  # empty: every seed
    steps: tuple[int, ...] = ()  # empty: every committed checkpoint
    every: int = 1  # take every n-th checkpoint (after `steps`)
    probe: ProbeSpec = field(default_factory=ProbeSpec)
    held_out: HeldOutSpec = field(default_factory=HeldOutSpec)
    execution: ExecutionSpec = field(default_factory=ExecutionSpec)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        if not self.analyses:
            builtin = ", ".join(BUILTINS)
            raise SpecError(f"{where}.analyses: the list is empty (built-in: {builtin})")
        if len(set(self.analyses)) != len(self.analyses):
            raise SpecError(f"{where}.analyses: duplicate entries {list(self.analyses)}")
        if self.every < 1:
            raise SpecError(f"{where}.every: must be positive")
        if any(s < 0 for s in self.steps):
            raise SpecError(f"{where}.steps: steps must be >= 0")


def load_analysis_spec(path: str | Path) -> AnalysisSpec:
    """Load and validate an analysis job spec (``analyses/*.toml``).

    A relative ``store`` is relative to the current directory; a relative analysis file
    (``"file.py:name"``) is relative to the job file. Every analysis is resolved and its
    options validated here, so a bad job fails before any work.

    Raises
    ------
    SpecError
        With a one-line message naming the offending key.
    """
    table = load_toml(path)
    known = {f.name for f in dataclasses.fields(AnalysisSpec)} - {"options"}
    options = {k: v for k, v in table.items() if k not in known and isinstance(v, dict)}
    rest = {k: v for k, v in table.items() if k not in options}
    try:
        spec = from_table(AnalysisSpec, rest, "")
        base = Path(path).parent
        spec = dataclasses.replace(
            spec, analyses=tuple(_absolute(ref, base) for ref in spec.analyses), options=options
        )
        configure(spec)
    except SpecError as err:
        raise SpecError(f"{path}: {str(err).lstrip('.: ')}") from None
    return spec


def _absolute(ref: str, base: Path) -> str:
    module, sep, name = ref.rpartition(":")
    if sep and module.endswith(".py") and not Path(module).is_absolute():
        return f"{(base / module).resolve()}:{name}"
    return ref


# --------------------------------------------------------------------------------------------
# Resolving analyses: built-ins, importable modules, and files shipped as source.


@dataclass(frozen=True, eq=False)
class Configured:
    """An analysis as a job uses it: where it comes from, its options and its parameters."""

    ref: str
    analysis: Analysis
    options: Any
    source: str | None  # the file's source text, for analyses defined in a file

    @property
    def name(self) -> str:
        return self.analysis.name

    def parameters(self, data: SharedData) -> dict[str, Any]:
        """The parameters stored with the results; user analyses add their source hash."""
        parameters = self.analysis.parameters(self.options, data)
        if self.ref in BUILTINS:
            return parameters
        return parameters | {"source_sha256": self.analysis.source_hash()}


def read_source(ref: str) -> str | None:
    """The source text of a ``"file.py:name"`` analysis (None for other references)."""
    module, _, _ = ref.rpartition(":")
    if not module.endswith(".py"):
        return None
    path = Path(module)
    if not path.is_file():
        raise SpecError(f"no such analysis file {module}")
    return path.read_text()


def resolve(ref: str, source: str | None = None) -> Analysis:
    """The analysis a reference names.

    Parameters
    ----------
    ref
        A built-in name, ``"package.module:name"`` or ``"path/file.py:name"``.
    source
        For a file: its source text (shipped to workers, which may not have the file).

    Raises
    ------
    SpecError
        If nothing of that name exists or it is not an analysis.
    """
    module_name, sep, name = ref.rpartition(":")
    if not sep:
        if ref not in BUILTINS:
            raise SpecError(
                f"unknown analysis {ref!r} (built-in: {', '.join(BUILTINS)}; or "
                "'package.module:name' or 'file.py:name')"
            )
        return BUILTINS[ref]
    if module_name.endswith(".py"):
        module = _source_module(module_name, source if source is not None else read_source(ref))
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise SpecError(f"cannot import {module_name!r} for analysis {ref!r}: {err}") from None
    found = getattr(module, name, None)
    if not isinstance(found, Analysis):
        what = "no such name" if found is None else "not decorated with @obs.analysis"
        raise SpecError(f"analysis {ref!r}: {what}")
    return found


def _source_module(filename: str, source: str) -> types.ModuleType:
    """Execute a file's source as a fresh module (named after the file and its source)."""
    import hashlib

    digest = hashlib.sha256(f"{filename}\0{source}".encode()).hexdigest()[:16]
    name = f"observatory_user_{Path(filename).stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    # inspect.getsource reads through linecache: give it this source, not the file on disk
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    module = types.ModuleType(name)
    module.__file__ = filename
    sys.modules[name] = module  # dataclasses and pickle look modules up by name
    try:
        exec(compile(source, filename, "exec"), module.__dict__)
    except Exception as err:
        del sys.modules[name]
        raise SpecError(f"{filename}: {type(err).__name__}: {err}".splitlines()[0]) from None
    return module


def configure(spec: AnalysisSpec) -> list[Configured]:
    """Resolve the job's analyses and validate their option tables.

    Raises
    ------
    SpecError
        Naming ``analyses[i]`` or the ``[<name>]`` table at fault.
    """
    out = []
    for i, ref in enumerate(spec.analyses):
        try:
            source = read_source(ref)
            analysis = resolve(ref, source)
        except SpecError as err:
            raise SpecError(f"analyses[{i}]: {err}") from None
        if analysis.name in {c.name for c in out}:
            raise SpecError(f"analyses[{i}]: a second analysis named {analysis.name!r}")
        options = analysis.parse_options(spec.options.get(analysis.name, {}), analysis.name)
        out.append(Configured(ref=ref, analysis=analysis, options=options, source=source))
    stray = sorted(set(spec.options) - {c.name for c in out})
    if stray:
        raise SpecError(f"[{stray[0]}]: options for an analysis the job does not run")
    return out


# --------------------------------------------------------------------------------------------
# Shared data: the probe and held-out data (same for every checkpoint and seed).


def held_out_tokens(run_spec: RunSpec, spec: HeldOutSpec) -> tuple[np.ndarray, str]:
    """Held-out sequences and a note of where they come from (stored as an attribute)."""
    context, vocab = run_spec.train.context, run_spec.model.vocab_size
    data: DataSpec = run_spec.data
    if data.source == "induction":
        fresh = dataclasses.replace(data, seed=spec.seed, n_sequences=spec.n_sequences)
        corpus = build_corpus(fresh, context=context, vocab_size=vocab)
        return corpus.tokens, f"fresh synthetic corpus, seed {spec.seed}"
    corpus = build_corpus(data, context=context, vocab_size=vocab)
    rng = np.random.default_rng(spec.seed)
    picks = rng.choice(len(corpus), size=min(spec.n_sequences, len(corpus)), replace=False)
    return corpus.tokens[np.sort(picks)], f"sampled from the training text, seed {spec.seed}"


def shared_data(run_spec: RunSpec, probe: ProbeSpec, held_out: HeldOutSpec) -> SharedData:
    """Generate the probe and held-out data from their recorded seeds."""
    tokens, source = held_out_tokens(run_spec, held_out)
    context, vocab = run_spec.train.context, run_spec.model.vocab_size
    counts = None  # synthetic corpora: uniform vocabularies, draw from all of it
    if run_spec.data.source == "text":  # only tokens that occur (Olsson et al.)
        corpus = build_corpus(run_spec.data, context=context, vocab_size=vocab)
        counts = np.bincount(corpus.tokens.ravel(), minlength=vocab)
    return SharedData(
        probe=repeated_tokens(
            vocab_size=vocab,
            n_ctx=context,
            seed=probe.seed,
            n_sequences=probe.n_sequences,
            block_length=probe.block_length,
            repeats=probe.repeats,
            token_counts=counts,
        ),
        held_out_tokens=tokens,
        held_out_seed=held_out.seed,
        held_out_source=source,
        spec=run_spec,
    )


# --------------------------------------------------------------------------------------------
# The task: one run, a block of checkpoints.


@dataclass(frozen=True)
class Task:
    """What a worker needs to call one analysis: a reference, not the function itself."""

    name: str
    ref: str
    source: str | None
    options: dict[str, Any]
    variables: dict[str, tuple[tuple[str, ...], tuple[int, ...]]]


def tasks_for(configured: Sequence[Configured], sizes: dict[str, int]) -> list[Task]:
    """The tasks of the job's analyses for one model size (``sizes``: see ``dim_sizes``)."""
    return [
        Task(
            name=c.name,
            ref=c.ref,
            source=c.source,
            options=dataclasses.asdict(c.options),
            variables=resolve_variables(c.analysis.declared(c.options), sizes, c.name),
        )
        for c in configured
    ]


def run_tasks(
    tasks: Sequence[Task],
    analyses: Sequence[Analysis],
    models: Iterable,
    data: SharedData,
    run: str,
) -> dict[str, dict[str, np.ndarray]]:
    """Call every task's analysis on every ``(step, model)``; ``{analysis: {variable: rows}}``.

    Raises
    ------
    AnalysisError
        One line naming the analysis, the run and the step, if an analysis raises or returns
        something other than it declared.
    """
    rows: dict[str, dict[str, list]] = {t.name: {v: [] for v in t.variables} for t in tasks}
    for step, model in models:
        for task, analysis in zip(tasks, analyses, strict=True):
            where = f"analysis {task.name!r} on {run} at step {step}"
            try:
                result = analysis.function(model, data, **task.options)
            except Exception as err:  # the user's code: report it as one line
                message = f"{type(err).__name__}: {err}".splitlines()[0]
                raise AnalysisError(f"{where} failed: {message}") from None
            for variable, value in check_result(result, task.variables, where).items():
                rows[task.name][variable].append(value)
    return {
        name: {var: np.asarray(values, dtype=np.float32) for var, values in variables.items()}
        for name, variables in rows.items()
    }


def analyse_block(
    store: str, run: RunId, steps: list[int], data: SharedData, tasks: list[Task]
) -> dict[str, dict[str, np.ndarray]]:
    """Run the job's analyses on a block of checkpoints of one run (executes on a worker).

    Returns
    -------
    dict
        ``{analysis: {variable: values[len(steps), ...]}}``.
    """
    import torch

    from observatory.query import models_at

    # One thread per task: the cluster runs one task per core, and oversubscribed torch
    # threads slow everything down.
    torch.set_num_threads(1)
    analyses = [resolve(task.ref, task.source) for task in tasks]
    models = models_at(store, size=run.size, seed=run.seed, steps=steps)
    return run_tasks(tasks, analyses, models, data, run.path)


def select_runs(spec: AnalysisSpec, runs: list[RunId]) -> list[RunId]:
    """The job's runs among those present; a clear error if a named size or seed is absent."""
    sizes = {r.size for r in runs}
    seeds = {r.seed for r in runs}
    for size in spec.sizes:
        if size not in sizes:
            raise SpecError(f"sizes: no size {size!r} in the store (sizes: {sorted(sizes)})")
    for seed in spec.seeds:
        if seed not in seeds:
            raise SpecError(f"seeds: no seed {seed} in the store (seeds: {sorted(seeds)})")
    return [
        r
        for r in runs
        if (not spec.sizes or r.size in spec.sizes) and (not spec.seeds or r.seed in spec.seeds)
    ]


def select_steps(spec: AnalysisSpec, committed: np.ndarray, run: str = "") -> list[int]:
    """The job's checkpoint steps among a run's committed ones.

    Explicit ``steps`` that are not committed checkpoints of the run are a :class:`SpecError`
    (nothing would be analysed for them).
    """
    absent = sorted(set(spec.steps) - {int(s) for s in committed})
    if absent:
        raise SpecError(
            f"steps: {', '.join(map(str, absent[:5]))} {'is' if len(absent) == 1 else 'are'} "
            f"not committed checkpoint steps of {run or 'the run'} "
            f"({len(committed)} committed, last {int(committed[-1]) if len(committed) else '-'})"
        )
    steps = [int(s) for s in committed if not spec.steps or int(s) in spec.steps]
    return steps[:: spec.every]


def size_dims(run_spec: RunSpec, size: str, data: SharedData) -> dict[str, int]:
    """Sizes of the named dims for one size of the family."""
    shape = run_spec.size(size)
    return dim_sizes(
        n_layers=shape.n_layers, n_heads=shape.n_heads, d_model=shape.d_model, data=data
    )


# --------------------------------------------------------------------------------------------
# The job.


@dataclass(frozen=True)
class JobReport:
    """What a job did: checkpoints analysed, skipped as already done, and the runs touched."""

    computed: int
    skipped: int
    runs: tuple[str, ...]


@dataclass
class _RunWork:
    """One run's writers, tasks and pending checkpoint blocks."""

    run: RunId
    writers: dict[str, Any]
    tasks: list[Task]
    blocks: list[list[int]]


def _prepare(family, spec: AnalysisSpec, data: SharedData, recompute: bool):
    """Open a writer per (run, analysis) and split each run's pending checkpoints into blocks."""
    from observatory.store import AnalysisWriter

    configured = configure(spec)
    runs = select_runs(spec, family.runs())
    wanted = {  # checked for every run before anything is written
        run.path: select_steps(spec, family.run(run.size, run.seed).steps(), run.path)
        for run in runs
    }
    work, skipped = [], 0
    for run in runs:
        reader = family.run(run.size, run.seed)
        tasks = tasks_for(configured, size_dims(family.spec, run.size, data))
        writers = {}
        for c, task in zip(configured, tasks, strict=True):
            writers[c.name] = AnalysisWriter(
                reader,
                c.name,
                attrs=c.parameters(data),
                variables=task.variables,
                recompute=recompute,
            )
            constants = c.analysis.constants(c.options, data) if c.analysis.constants else {}
            for name, (dims, values) in constants.items():
                writers[c.name].write_extra(name, np.asarray(values), tuple(dims))
        done = set.intersection(*(w.done_steps() for w in writers.values()))
        pending = [s for s in wanted[run.path] if s not in done]
        skipped += len(wanted[run.path]) - len(pending)
        size = spec.execution.block_size
        blocks = [pending[i : i + size] for i in range(0, len(pending), size)]
        work.append(_RunWork(run=run, writers=writers, tasks=tasks, blocks=blocks))
    return work, skipped


def run_analysis(
    spec: AnalysisSpec,
    *,
    scheduler: str | None = None,
    recompute: bool = False,
    progress: bool = True,
) -> JobReport:
    """Run an analysis job over every selected run and checkpoint, writing into the store.

    Parameters
    ----------
    spec
        The job.
    scheduler
        Address of a running dask scheduler (``tcp://host:8786``); default: a local cluster
        with one single-threaded worker process per core (or ``execution.workers``).
    recompute
        Replace existing results instead of skipping the checkpoints they cover.
    progress
        Show a progress bar over checkpoints.

    Returns
    -------
    JobReport

    Raises
    ------
    AnalysisError
        If an analysis fails (one line naming it, the run and the step); results written
        before stay in the store.
    """
    from observatory.store import FamilyStore

    family = FamilyStore(spec.store, mode="r+")
    data = shared_data(family.spec, spec.probe, spec.held_out)
    work, skipped = _prepare(family, spec, data, recompute)
    computed = 0
    if any(w.blocks for w in work):
        try:
            computed = _compute_on_cluster(spec, str(family.path), work, data, scheduler, progress)
        finally:
            # Even after Ctrl-C or a failed task, keep what was computed: a re-run skips it.
            for w in work:
                for writer in w.writers.values():
                    writer.flush()
    return JobReport(computed=computed, skipped=skipped, runs=tuple(w.run.path for w in work))


def _compute_on_cluster(spec, store: str, work, data, scheduler, progress: bool) -> int:
    from distributed import as_completed
    from tqdm.auto import tqdm

    with dask_client(scheduler=scheduler, workers=spec.execution.workers) as client:
        shared = client.scatter(data, broadcast=True)
        owner = {}
        for w in work:
            for steps in w.blocks:
                future = client.submit(
                    analyse_block, store, w.run, steps, shared, w.tasks, pure=False
                )
                owner[future] = (w, steps)
        computed = 0
        total = sum(len(steps) for _, steps in owner.values())
        with tqdm(total=total, unit="ckpt", desc="analyse", disable=not progress) as bar:
            for future in as_completed(list(owner)):
                w, steps = owner[future]
                _write_block(w.writers, steps, future.result())
                computed += len(steps)
                bar.update(len(steps))
        return computed


def _write_block(writers, steps: list[int], results: dict[str, dict[str, np.ndarray]]) -> None:
    """Append a block's rows to each analysis, skipping steps that analysis already has."""
    for name, writer in writers.items():
        done = writer.done_steps()
        keep = np.array([s not in done for s in steps])
        if keep.any():
            values = {var: rows[keep] for var, rows in results[name].items()}
            writer.append(np.asarray(steps)[keep], values)


# --------------------------------------------------------------------------------------------
# In a notebook: one analysis, in this process, nothing written.


def compute(
    analysis: Analysis | str,
    store: str | Path,
    *,
    size: str,
    seeds: Sequence[int] | None = None,
    steps: Iterable[int] | None = None,
    options: dict[str, Any] | None = None,
    probe: ProbeSpec = ProbeSpec(),
    held_out: HeldOutSpec = HeldOutSpec(),
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

    found = resolve(_absolute(analysis, Path.cwd())) if isinstance(analysis, str) else analysis
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
