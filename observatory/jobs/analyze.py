"""Analysis jobs: a job spec split into (run, checkpoint block) tasks on dask.distributed.

Workers load only the checkpoints of their block, call the analyses (pure functions of the
protocol in :mod:`observatory.analysis.protocol`) and return numpy arrays; the client writes
them into the store (one writer, no locking), so a job can run while training is still writing
and a re-run computes only what is missing. This module knows no particular analysis: it builds
the shared data once per job and ships each analysis as a reference (and a file's source text,
see :mod:`observatory.jobs.resolve`) to the workers, local or remote.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from observatory.analysis.probes import repeated_tokens
from observatory.analysis.protocol import (
    Analysis,
    SharedData,
    check_result,
    dim_sizes,
    resolve_variables,
)
from observatory.data import Corpus, build_corpus, recorded_corpus
from observatory.errors import AnalysisError, SpecError, StoreError
from observatory.jobs.cluster import dask_client
from observatory.jobs.job_spec import AnalysisSpec, HeldOutSpec, ProbeSpec
from observatory.jobs.resolve import Configured, check_names, configure, resolve
from observatory.jobs.selection import with_branches
from observatory.spec import DataSpec, RunId, RunSpec

# --------------------------------------------------------------------------------------------
# Shared data: the probe and held-out data (same for every checkpoint and seed).


def held_out_tokens(
    run_spec: RunSpec, spec: HeldOutSpec, *, corpus: Corpus | None = None
) -> tuple[np.ndarray, str]:
    """Held-out sequences and a note of where they come from (stored as an attribute).

    ``corpus`` is the training corpus (a store's :func:`~observatory.data.recorded_corpus`,
    tokenized as it was trained); by default it is built from the spec.
    """
    context, vocab = run_spec.train.context, run_spec.model.vocab_size
    data: DataSpec = run_spec.data
    if data.source == "induction":
        fresh = dataclasses.replace(data, seed=spec.seed, n_sequences=spec.n_sequences)
        corpus = build_corpus(fresh, context=context, vocab_size=vocab)
        return corpus.windows(np.arange(len(corpus))), f"fresh synthetic corpus, seed {spec.seed}"
    if corpus is None:
        corpus = build_corpus(data, context=context, vocab_size=vocab)
    rng = np.random.default_rng(spec.seed)
    picks = rng.choice(len(corpus), size=min(spec.n_sequences, len(corpus)), replace=False)
    return corpus.windows(np.sort(picks)), f"sampled from the training text, seed {spec.seed}"


def shared_data(
    run_spec: RunSpec, probe: ProbeSpec, held_out: HeldOutSpec, *, corpus: Corpus | None = None
) -> SharedData:
    """Generate the probe and held-out data from their recorded seeds.

    ``corpus``: the training corpus, as in :func:`held_out_tokens`.
    """
    tokens, source = held_out_tokens(run_spec, held_out, corpus=corpus)
    context, vocab = run_spec.train.context, run_spec.model.vocab_size
    counts = None  # synthetic corpora: uniform vocabularies, draw from all of it
    if run_spec.data.source != "induction":  # only tokens that occur (Olsson et al.)
        if corpus is None:
            corpus = build_corpus(run_spec.data, context=context, vocab_size=vocab)
        counts = corpus.token_counts(vocab)
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
    nonfinite: tuple[str, ...] = ()  # variables whose NaN/inf values are results


def tasks_for(configured: Sequence[Configured], sizes: dict[str, int]) -> list[Task]:
    """The tasks of the job's analyses for one model size (``sizes``: see ``dim_sizes``)."""
    return [task_for(c.analysis, c.options, sizes, c.ref, c.source) for c in configured]


def task_for(
    analysis: Analysis,
    options: Any,
    sizes: dict[str, int],
    ref: str = "",
    source: str | None = None,
) -> Task:
    """The task of one analysis with these options, for one model size."""
    declared = analysis.declared(options)
    return Task(
        name=analysis.name,
        ref=ref,
        source=source,
        options=dataclasses.asdict(options),
        variables=resolve_variables(declared, sizes, f"analysis {analysis.name!r}"),
        nonfinite=tuple(v for v in declared if analysis.allows_nonfinite(v)),
    )


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
            checked = check_result(result, task.variables, where, task.nonfinite)
            for variable, value in checked.items():
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
    models = models_at(store, size=run.size, seed=run.seed, steps=steps, branch=run.branch)
    return run_tasks(tasks, analyses, models, data, run.path)


def select_runs(spec: AnalysisSpec, family) -> list[RunId]:
    """The job's runs among the store's, each followed by its branches if the job asks for
    them; a clear error if a named size or seed is absent."""
    runs = family.runs()
    sizes = {r.size for r in runs}
    seeds = {r.seed for r in runs}
    for size in spec.sizes:
        if size not in sizes:
            raise SpecError(f"sizes: no size {size!r} in the store (sizes: {sorted(sizes)})")
    for seed in spec.seeds:
        if seed not in seeds:
            raise SpecError(f"seeds: no seed {seed} in the store (seeds: {sorted(seeds)})")
    selected = [
        family.run(r.size, r.seed)
        for r in runs
        if (not spec.sizes or r.size in spec.sizes) and (not spec.seeds or r.seed in spec.seeds)
    ]
    return [reader.run for reader in (with_branches(selected) if spec.branches else selected)]


def select_steps(spec: AnalysisSpec, reader) -> list[int]:
    """The job's checkpoint steps among a run's own committed ones (a branch's from its fork
    on: the earlier ones are its parent's results).

    Explicit ``steps`` that are not committed checkpoints of the run are a :class:`SpecError`
    listing the committed ones (nothing would be analysed for them).
    """
    committed = [int(s) for s in reader.own_steps()]
    for step in spec.steps:
        try:
            reader.checkpoint_index(step)
        except StoreError as err:
            raise SpecError(f"steps: {err}") from None
    steps = [s for s in committed if not spec.steps or s in spec.steps]
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


def _prepare(family, spec: AnalysisSpec, configured, runs, data: SharedData, recompute: bool):
    """Open a writer per (run, analysis) and split each run's pending checkpoints into blocks.

    Writes nothing: a writer creates its group with its first rows (see ``AnalysisWriter``).
    """
    from observatory.store import AnalysisWriter

    wanted = {  # checked for every run before any work
        run.path: select_steps(spec, family.run(run.size, run.seed, run.branch)) for run in runs
    }
    work, skipped = [], 0
    for run in runs:
        reader = family.run(run.size, run.seed, run.branch)
        tasks = tasks_for(configured, size_dims(family.spec, run.size, data))
        writers = {}
        for c, task in zip(configured, tasks, strict=True):
            constants = c.analysis.constants(c.options, data) if c.analysis.constants else {}
            writers[c.name] = AnalysisWriter(
                reader,
                c.name,
                attrs=c.parameters(data),
                variables=task.variables,
                constants={k: (tuple(dims), np.asarray(v)) for k, (dims, v) in constants.items()},
                nonfinite=task.nonfinite,
                recompute=recompute,
            )
        done = set.intersection(*(w.done_steps() for w in writers.values()))
        pending = [s for s in wanted[run.path] if s not in done]
        skipped += len(wanted[run.path]) - len(pending)
        size = spec.execution.block_size
        blocks = [pending[i : i + size] for i in range(0, len(pending), size)]
        work.append(_RunWork(run=run, writers=writers, tasks=tasks, blocks=blocks))
    return work, skipped


def taken_names(family, runs: Sequence[RunId], job: Collection[str]) -> dict[str, str]:
    """``{name: who has it}``: the variables and dims of ``runs`` and the variables of their
    stored analyses other than the ``job``'s (see :func:`~observatory.jobs.resolve.check_names`).
    """
    from observatory.query.views import views
    from observatory.store import analyses, analysis_arrays, lazy_arrays

    taken: dict[str, str] = {}
    for run in runs:
        reader = family.run(run.size, run.seed, run.branch)
        arrays = lazy_arrays(reader)
        arrays |= views(arrays, architecture=family.spec.model.architecture)
        for name, array in arrays.items():
            taken.update(dict.fromkeys(array.dims, "the run (a dim)"))
            taken[name] = "the run"
        for name in analyses(reader):
            if name not in job:
                stored = analysis_arrays(reader, name)[1]
                taken.update(dict.fromkeys(stored, f"analysis {name!r} stored in {run.path}"))
    return taken


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
    SpecError
        Before any work, on a bad selection or a declared name that the store's runs or their
        other analyses have (see :func:`~observatory.jobs.resolve.check_names`).
    AnalysisError
        If an analysis fails or returns something else than it declared (one line naming it,
        the run and the step). Nothing of its results is written before they are checked:
        the store keeps only complete blocks of rows computed before the failure.
    """
    from observatory.store import FamilyStore

    family = FamilyStore(spec.store, mode="r+")
    configured = configure(spec.analyses, spec.options)
    runs = select_runs(spec, family)
    check_names(configured, taken_names(family, runs, {c.name for c in configured}))
    data = shared_data(family.spec, spec.probe, spec.held_out, corpus=recorded_corpus(family))
    work, skipped = _prepare(family, spec, configured, runs, data, recompute)
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
