"""Counterfactual branches: a run continued from one of its steps with an intervention.

:func:`train_branch` takes the parent's exact training state at the fork (its keyframe there,
or a replay from the keyframe before) and trains on with the run's own loop
(:func:`~observatory.train.loop.train_run`), the intervention deciding the batches, learning
rates and hooks of every step from the fork on (a :class:`~observatory.train.interventions.
Course`).  The branch is a run of the same store, under its parent's group: its checkpoints and
step records before the fork are the parent's, read through the parent.  A branch can be
branched in turn (at or after its own fork): the new branch keeps its parent's interventions,
and reads its steps before the fork through its parent, and so on up to the run.
:func:`train_branches` checks several branches first, then trains them in this process or as
one dask task each, like :func:`~observatory.train.family.train_family` trains runs.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from observatory.data import Corpus, stored_corpus
from observatory.errors import StoreError
from observatory.spec import RunId, RunSpec, parse_run_path
from observatory.store import Checkpoint, FamilyStore, RunReader, location
from observatory.train.family import cluster_client, train_on_cluster
from observatory.train.interrupts import interrupts_between_steps, raise_if_interrupted
from observatory.train.interventions import Course, Intervention, branch_record, course_of
from observatory.train.loop import Fork, RunSummary, train_run
from observatory.train.replay import ReplaySource, check_recipe
from observatory.train.step import snapshot

BRANCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
BRANCH_NEEDS = "it cannot be branched, which needs its optimizer state and data order"


def train_branch(
    spec: RunSpec,
    *,
    size: str,
    seed: int,
    at: int,
    name: str,
    intervention: Intervention | None = None,
    store: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    on_batch=None,
    branch: str = "",
) -> RunSummary:
    """Continue run ``size``/``seed`` (or its branch ``branch``) from step ``at`` with
    ``intervention``, as branch ``name``, in this process.

    Parameters
    ----------
    spec
        The family's run spec (the one the store was created with).
    size, seed
        The parent run.
    at
        The fork: a step the parent has committed (a keyframe, or any step through replay);
        for a branch of a branch, at or after that branch's own fork.
    name
        The branch's name (letters, digits, ``.``, ``_``, ``-``), new unless ``resume``.
    intervention
        What the branch changes from the fork on (default: nothing); a branch of a branch
        keeps its parent's interventions too.
    store
        Store path or URL; defaults to ``spec.default_store``.
    resume
        Continue the branch ``name`` from its last committed keyframe (created if absent).
    progress, stop_after, on_batch
        As in :func:`~observatory.train.loop.train_run`.
    branch
        Fork from this branch of the run (``"a"``, or ``"a/b"`` for a branch ``b`` of ``a``)
        instead of the run itself: the new branch is ``"<branch>/<name>"``.

    Returns
    -------
    RunSummary
        What this call trained.

    Raises
    ------
    StoreError, SpecError
        One line, before the store is touched: an unknown parent, a fork step beyond its
        committed steps (or before a parent branch's fork), a branch name that exists
        (without ``resume``), another intervention than a resumed branch's, a predicate that
        raises, a head or window the run lacks.
    """
    family, corpus = _family(spec, store)
    intervention = (intervention or Intervention()).resolved(corpus)
    plan = _plan(family, corpus, (size, seed, branch), at, name, intervention, resume=resume)
    spec.train.require_device()
    with interrupts_between_steps():
        options = {"resume": resume, "stop_after": stop_after}
        return _train_planned(plan, corpus, **options, progress=progress, on_batch=on_batch)


def train_branches(
    spec: RunSpec,
    *,
    runs: Sequence[str],
    at: int,
    name: str,
    intervention: Intervention | None = None,
    store: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    on_run_end: Callable[[RunSummary], None] | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    client=None,
) -> list[RunSummary]:
    """Branch several runs (or branches) at step ``at`` with one intervention, each as
    branch ``name``: one after another in this process, or as one dask task per branch.

    Every branch is checked before any is trained; each is then trained as
    :func:`train_branch` trains it, bit for bit, wherever it runs.

    Parameters
    ----------
    spec, at, name, intervention, store, resume, stop_after
        As in :func:`train_branch`.
    runs
        The parents, by their paths in the store: ``"l2-d64/seed0"``, or a branch
        ``"l2-d64/seed0/branches/a"`` (see :func:`~observatory.spec.parse_run_path`).
    progress
        Show a progress bar per branch (on a cluster: one bar over the branches).
    on_run_end
        Called with each branch's :class:`RunSummary` when it stops.
    workers, scheduler, client
        As in :func:`~observatory.train.family.train_family`: train on a dask cluster.

    Returns
    -------
    list of RunSummary
        One per branch, in the order they stopped.

    Raises
    ------
    StoreError, SpecError
        As :func:`train_branch`, for any of the branches, before the store is touched; a
        parent given twice.  On a cluster, the branches that failed, once the others stopped.
    """
    family, corpus = _family(spec, store)
    parents = [parse_run_path(run) for run in runs]
    if len(set(parents)) != len(parents) or not parents:
        raise StoreError(f"--run: give each parent once ({', '.join(runs) or 'none given'})")
    intervention = (intervention or Intervention()).resolved(corpus)
    plans = [_plan(family, corpus, p, at, name, intervention, resume=resume) for p in parents]
    summaries: list[RunSummary] = []

    def ended(summary: RunSummary) -> None:
        summaries.append(summary)
        if on_run_end is not None:
            on_run_end(summary)

    options = {"resume": resume, "stop_after": stop_after}
    if workers is None and scheduler is None and client is None:
        spec.train.require_device()  # on a cluster, each worker checks its own
        with interrupts_between_steps():
            for plan in plans:
                raise_if_interrupted()
                ended(_train_planned(plan, corpus, **options, progress=progress))
        return summaries
    jobs = {plan.run.path: (plan,) for plan in plans}
    cluster = {"client": client, "workers": workers, "scheduler": scheduler}
    with cluster_client(**cluster, threads=spec.train.threads) as client:
        train_on_cluster(client, _train_planned, jobs, corpus, progress, ended, options)
    return summaries


@dataclass(frozen=True)
class BranchPlan:
    """One branch, checked and ready to train here or on a dask worker: its store, the run
    or branch it forks from, the fork step, its course and the provenance it records."""

    spec: RunSpec
    store: str | Path
    parent: RunId
    run: RunId
    at: int
    course: Course
    record: dict


def _family(spec: RunSpec, store: str | Path | None) -> tuple[FamilyStore, Corpus]:
    """The family store the spec created, and its corpus."""
    path = location(store or spec.default_store)
    family = FamilyStore(path)
    if family.spec != spec:
        raise StoreError(f"{path}: this store was created by a different spec; use its own")
    return family, stored_corpus(family)


def _plan(family, corpus, parent_id, at, name, intervention, *, resume: bool) -> BranchPlan:
    """Check one branch against the store (nothing is written) and plan it."""
    size, seed, branch = parent_id
    parent = family.run(size, seed, branch)
    parent.refuse_if_ingested(BRANCH_NEEDS)
    if not isinstance(name, str) or not BRANCH_NAME.fullmatch(name):
        raise StoreError(f"branch name {name!r}: use letters, digits, '.', '_' and '-'")
    intervention.check(family.spec, size, len(corpus))
    source = _fork_source(parent, at, corpus)
    record = branch_record(parent.run, at, intervention)
    run = dataclasses.replace(parent.run, branch=f"{branch}/{name}" if branch else name)
    _check_existing(family, run, record, resume=resume)
    above = source.course if parent.branch is not None else None
    course = Course(family.spec, parent.run.data_seed, len(corpus), at, intervention, above)
    return BranchPlan(family.spec, family.path, parent.run, run, at, course, record)


def _train_planned(
    plan: BranchPlan, corpus: Corpus, *, resume, stop_after, progress=False, on_batch=None
) -> RunSummary:
    """Train a planned branch into its store (in this process, or as a dask task)."""
    parent = FamilyStore(plan.store).run(plan.parent.size, plan.parent.seed, plan.parent.branch)
    source = ReplaySource(parent, plan.spec, corpus, course_of(parent, len(corpus)))
    fork = Fork(plan.at, functools.partial(_fork_state, source, plan.at), plan.record)
    root = FamilyStore(plan.store, mode="r+").root
    return train_run(
        plan.spec,
        plan.run,
        root,
        corpus,
        resume=resume,
        progress=progress,
        stop_after=stop_after,
        on_batch=on_batch,
        course=plan.course,
        fork=fork,
    )


def _fork_source(parent: RunReader, at: int, corpus: Corpus) -> ReplaySource:
    """The parent's replay source, once the fork step is checked against what it committed."""
    if not isinstance(at, int) or at < 0:
        raise StoreError(f"--at {at!r}: a step is an integer >= 0")
    total = parent.family.spec.train.steps
    if at > parent.n_steps:
        raise StoreError(
            f"{parent.run.path}: cannot fork at step {at}: steps 0..{parent.n_steps} are committed"
        )
    if at >= total:
        raise StoreError(
            f"{parent.run.path}: a fork at step {at} leaves nothing to train ({total} steps)"
        )
    if parent.branch is not None and at < parent.branch["fork"]:
        root = dataclasses.replace(parent.run, branch="").path
        raise StoreError(
            f"{parent.run.path}: cannot fork at step {at}, before this branch's own fork at step "
            f"{parent.branch['fork']} (its steps before are {root}'s: branch that run instead)"
        )
    check_recipe(parent, strict=True)
    source = ReplaySource(parent, parent.family.spec, corpus, course_of(parent, len(corpus)))
    source.keyframe_before(at)  # a clear error if there is none
    return source


def _fork_state(source: ReplaySource, at: int) -> Checkpoint:
    """The parent's whole training state after ``at`` updates: its keyframe, or a replay."""
    check_recipe(source.reader, strict=True)  # where it runs: a dask worker, maybe
    keyframe = source.keyframe_before(at)
    states = source.run_states(keyframe, at, yield_at={at})
    *_, (_, model, optimizer, rng) = states
    return snapshot(model, optimizer, at, source.spec.train.tokens_per_step, True, rng=rng)


def _check_existing(family: FamilyStore, run: RunId, record: dict, *, resume: bool) -> None:
    """Refuse a branch that exists (without ``resume``) or a resume with another fork or
    intervention than the branch's own."""
    if run.branch not in family.branches(run.size, run.seed):
        return
    stored = family.run(run.size, run.seed, run.branch).branch
    if not resume:
        raise StoreError(
            f"{run.path} exists (forked at step {stored['fork']}); "
            "choose another --name, or pass --resume to continue it"
        )
    for key in ("fork", "intervention_sha256"):
        if stored[key] != record[key]:
            raise StoreError(
                f"{run.path} was started with another "
                f"{key.replace('_sha256', '')} ({stored[key]} vs {record[key]})"
            )
