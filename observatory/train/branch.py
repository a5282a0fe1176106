"""Counterfactual branches: a run continued from one of its steps with an intervention.

:func:`train_branch` takes the parent's exact training state at the fork (its keyframe there,
or a replay from the keyframe before) and trains on with the run's own loop
(:func:`~observatory.train.loop.train_run`), the intervention deciding the batches, learning
rates and hooks of every step from the fork on (a :class:`~observatory.train.interventions.
Course`).  The branch is a run of the same store, under its parent's group: its checkpoints and
step records before the fork are the parent's, read through the parent.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

from observatory.data import stored_corpus
from observatory.errors import StoreError
from observatory.spec import RunSpec
from observatory.store import Checkpoint, FamilyStore, RunReader, location
from observatory.train.interrupts import interrupts_between_steps
from observatory.train.interventions import Course, Intervention, branch_record
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
) -> RunSummary:
    """Continue run ``size``/``seed`` from step ``at`` with ``intervention``, as branch ``name``.

    Parameters
    ----------
    spec
        The family's run spec (the one the store was created with).
    size, seed
        The parent run.
    at
        The fork: a step the parent has committed (a keyframe, or any step through replay).
    name
        The branch's name (letters, digits, ``.``, ``_``, ``-``), new unless ``resume``.
    intervention
        What the branch changes from the fork on (default: nothing).
    store
        Store path or URL; defaults to ``spec.default_store``.
    resume
        Continue the branch ``name`` from its last committed keyframe (created if absent).
    progress, stop_after, on_batch
        As in :func:`~observatory.train.loop.train_run`.

    Returns
    -------
    RunSummary
        What this call trained.

    Raises
    ------
    StoreError, SpecError
        One line, before the store is touched: an unknown parent, a fork step beyond its
        committed steps, a branch name that exists (without ``resume``), another intervention
        than a resumed branch's, a predicate that raises, a head or window the run lacks.
    """
    path = location(store or spec.default_store)
    family = FamilyStore(path)
    if family.spec != spec:
        raise StoreError(f"{path}: this store was created by a different spec; use its own")
    parent = family.run(size, seed)
    parent.refuse_if_ingested(BRANCH_NEEDS)
    if not isinstance(name, str) or not BRANCH_NAME.fullmatch(name):
        raise StoreError(f"branch name {name!r}: use letters, digits, '.', '_' and '-'")
    corpus = stored_corpus(family)
    intervention = (intervention or Intervention()).resolved(corpus)
    intervention.check(spec, size, len(corpus))
    source = _fork_source(parent, at)
    record = branch_record(parent.run, at, intervention)
    _check_existing(family, parent, name, record, resume=resume)
    course = Course(spec, parent.run.data_seed, len(corpus), at, intervention)
    fork = Fork(at, functools.partial(_fork_state, source, at), record)
    spec.train.require_device()
    with interrupts_between_steps():
        root = FamilyStore(path, mode="r+").root
        run = dataclasses.replace(parent.run, branch=name)
        return train_run(
            spec,
            run,
            root,
            corpus,
            resume=resume,
            progress=progress,
            stop_after=stop_after,
            on_batch=on_batch,
            course=course,
            fork=fork,
        )


def _fork_source(parent: RunReader, at: int) -> ReplaySource:
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
    check_recipe(parent, strict=True)
    source = ReplaySource.of(parent)
    source.keyframe_before(at)  # a clear error if there is none
    return source


def _fork_state(source: ReplaySource, at: int) -> Checkpoint:
    """The parent's whole training state after ``at`` updates: its keyframe, or a replay."""
    keyframe = source.keyframe_before(at)
    states = source.run_states(keyframe, at, yield_at={at})
    *_, (_, model, optimizer, rng) = states
    return snapshot(model, optimizer, at, source.spec.train.tokens_per_step, True, rng=rng)


def _check_existing(
    family: FamilyStore, parent: RunReader, name: str, record: dict, *, resume: bool
) -> None:
    """Refuse a name that exists (without ``resume``) or a resume with another fork or
    intervention than the branch's own."""
    if name not in family.branches(parent.run.size, parent.run.seed):
        return
    stored = family.run(parent.run.size, parent.run.seed, name).branch
    if not resume:
        raise StoreError(
            f"{parent.run.path}: a branch {name!r} exists (forked at step {stored['fork']}); "
            "choose another --name, or pass --resume to continue it"
        )
    for key in ("fork", "intervention_sha256"):
        if stored[key] != record[key]:
            raise StoreError(
                f"{parent.run.path}: branch {name!r} was started with another "
                f"{key.replace('_sha256', '')} ({stored[key]} vs {record[key]})"
            )
