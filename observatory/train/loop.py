"""The training loop of one run: :func:`train_run`.

Reads top to bottom like nanoGPT's loop: build the model and optimizer, open the run's writer,
resume from the last committed keyframe, then per step: checkpoint if one is due, fetch the
step's batch, take one :func:`~observatory.train.step.train_step`, record it.  Everything a run
does is a function of the spec and its two seeds, so the same spec gives bit-identical weights
on one device type, and a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from observatory.analysis.phase import FINAL_LOSS_STEPS, final_loss
from observatory.data import Corpus
from observatory.errors import StoreError
from observatory.memory import one_malloc_arena
from observatory.models import build_model, stack_layers
from observatory.spec import RunId, RunSpec
from observatory.store import Checkpoint, RunLock, RunWriter, StepRecord
from observatory.train.interrupts import raise_if_interrupted
from observatory.train.interventions import Course, Hooks
from observatory.train.step import (
    recipe,
    recipe_record,
    restore,
    setup_device,
    snapshot,
    train_step,
)


@dataclass(frozen=True)
class RunSummary:
    """What one call of :func:`train_run` did."""

    run: str  # the run's path in the store, e.g. "l2-d64/seed0"
    steps: int  # training steps taken in this call (0 if the run was already complete)
    checkpoints: int  # checkpoints committed in this call
    seconds: float  # wall time from the first step to the last commit
    writer_seconds: float  # time the writer thread spent storing (overlaps training)
    final_loss: float | None  # analysis.phase.final_loss of the steps taken, if any
    complete: bool  # every scheduled step is trained


def train_run(
    spec: RunSpec,
    run: RunId,
    root,
    corpus: Corpus,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    on_batch: Callable[[int, torch.Tensor], None] | None = None,
    course: Course | None = None,
    fork: Fork | None = None,
) -> RunSummary:
    """Train one run, writing checkpoints and per-step records through a :class:`RunWriter`.

    Parameters
    ----------
    spec
        The family's run spec.
    run
        The run (size and seed) to train.
    root
        The family store's root group, as ``create_family`` or ``FamilyStore`` opened it.
    corpus
        The family's training corpus.
    resume
        Continue from the last committed keyframe (a complete run is skipped); without it, a
        run that already has checkpoints is an error.
    progress
        Show a progress bar.
    stop_after
        Stop after this many steps in this call, leaving the run unfinished.
    on_batch
        Called as ``on_batch(step, tokens)`` with every batch the model consumes, before the
        model sees it (tests use it to compare against the recorded data order).
    course
        What decides each step besides the weights (default: the run's spec and data seed).
    fork
        Train the branch ``run`` from its parent's state at ``fork.step`` (``course`` holds its
        intervention): its checkpoints before the fork are its parent's.

    Returns
    -------
    RunSummary
        Steps, checkpoints and time of this call.
    """
    spec.train.require_device()
    device = setup_device(spec.train.device)
    one_malloc_arena()
    total_steps = spec.train.steps
    schedule = spec.checkpoints.steps(total_steps)
    keyframes = spec.checkpoints.keyframes(total_steps)
    course = course or Course(spec, run.data_seed, len(corpus))
    if fork is not None:  # every fork's state is a keyframe: rows align with the parent's
        forks = [step for step, _ in course.chain]
        schedule, keyframes = (tuple(sorted({*steps, *forks})) for steps in (schedule, keyframes))
    # One writer per run: a second one gets a one-line error.
    with recipe(spec.train.threads), RunLock(root, run):
        # Initialised on the CPU, so the initial weights are the same on every device.
        model = build_model(spec.model, spec.size(run.size), init_seed=run.init_seed)
        model = model.to(spec.train.device).train()
        optimizer = spec.optimizer.build(model)
        writer = _open_writer(spec, run, root, model, schedule, keyframes, course, fork)
        writer.record_device(device)
        start = _resume(writer, model, optimizer, run, schedule, resume=resume, fork=fork)
        if start is None:  # already complete: nothing to do
            return RunSummary(
                run=run.path,
                steps=0,
                checkpoints=0,
                seconds=0.0,
                writer_seconds=0.0,
                final_loss=None,
                complete=True,
            )
        segment = _Segment(
            start=start,
            end=total_steps if stop_after is None else min(total_steps, start + stop_after),
            checkpoints=frozenset(schedule[writer.committed[0] :]),  # those not committed yet
            keyframes=frozenset(keyframes),
        )
        steps = _Steps(corpus, course, course.hooks(model), on_batch)
        return _train(spec, run, model, optimizer, writer, segment, progress, steps)


@dataclass(frozen=True)
class Fork:
    """Where a branch leaves its parent: the step, the parent's exact training state there
    (computed when the branch starts, not when it resumes) and the branch's provenance."""

    step: int
    state: Callable[[], Checkpoint]
    record: dict


@dataclass(frozen=True)
class _Steps:
    """What each step reads and runs with: the corpus, the course, its hooks, ``on_batch``."""

    corpus: Corpus
    course: Course
    hooks: Callable[[int], Hooks | None]  # each step's
    on_batch: Callable[[int, torch.Tensor], None] | None


@dataclass(frozen=True)
class _Segment:
    """The steps one call of :func:`train_run` covers, and the checkpoints it writes."""

    start: int  # the step training continues from (0, or the keyframe resumed from)
    end: int  # the last step: the run's last, or where ``stop_after`` stops it
    checkpoints: frozenset[int]  # scheduled checkpoint steps still to write
    keyframes: frozenset[int]  # checkpoint steps that also store optimizer and RNG state


def _open_writer(
    spec: RunSpec, run: RunId, root, model, schedule, keyframes, course: Course, fork: Fork | None
) -> RunWriter:
    """The run's writer, with arrays for every scheduled checkpoint and what the run records."""
    params = stack_layers(dict(model.named_parameters()))
    return RunWriter(
        root,
        run,
        spec,
        param_shapes={name: p.shape for name, p in params.items()},
        d_head=spec.size(run.size).d_head,
        schedule=schedule,
        keyframes=keyframes,
        rng_bytes=torch.get_rng_state().numel(),
        recipe=recipe_record(spec),
        data_order_fingerprint=course.fingerprint(),
        branch=None if fork is None else fork.record,
    )


def _resume(
    writer: RunWriter, model, optimizer, run: RunId, schedule, *, resume: bool, fork: Fork | None
) -> int | None:
    """Restore the run's last committed keyframe, if any; the step to continue from.

    None when the run is already complete.  Weights, AdamW moments and RNG state are restored
    bit for bit, so the continuation equals an uninterrupted run.  What a crash left past the
    keyframe is dropped from the commit markers and trained again.  A branch without a
    checkpoint of its own starts from its fork's state.
    """
    n_checkpoints, _ = writer.committed
    inherited = 0 if fork is None else schedule.index(fork.step)  # its parent's checkpoints
    if writer.complete:
        if not resume:
            raise StoreError(f"{run.path} is already trained; use another --store to retrain")
        return None
    if n_checkpoints > inherited and not resume:
        raise StoreError(
            f"{run.path} already has {n_checkpoints} checkpoints in the store; "
            "pass --resume to continue it"
        )
    start = 0
    if n_checkpoints > inherited:
        last = writer.last_keyframe()
        start = last.step
        restore(model, optimizer, last)
        n_checkpoints = schedule.index(start) + 1
    elif fork is not None:
        start, n_checkpoints = fork.step, inherited
        restore(model, optimizer, fork.state())
    writer.truncate(n_checkpoints, start)
    return start


def _train(
    spec: RunSpec, run: RunId, model, optimizer, writer, segment, progress, steps: _Steps
) -> RunSummary:
    """Train the segment's steps; the writer commits in the background as training goes."""
    total_steps, tokens_per_step = spec.train.steps, spec.train.tokens_per_step
    bar = tqdm(
        total=total_steps, initial=segment.start, desc=run.path, unit="step", disable=not progress
    )
    recent = collections.deque(maxlen=FINAL_LOSS_STEPS)  # for the final loss
    finished, loss_value, steps_taken = False, None, 0
    writer.start()
    started = time.perf_counter()
    try:
        for step in range(segment.start, segment.end + 1):
            raise_if_interrupted()
            # The checkpoint at a step holds the weights after that many updates; the optimizer
            # and RNG state only at keyframes, where a resume or a replay can start.
            if step in segment.checkpoints:
                state = step in segment.keyframes
                writer.put_checkpoint(snapshot(model, optimizer, step, tokens_per_step, state))
            if step == segment.end:
                finished = step == total_steps
                break
            indices = steps.course.batch_indices(step)
            tokens = steps.corpus.batch(indices)
            if steps.on_batch is not None:
                steps.on_batch(step, tokens)
            lr = steps.course.lr(step)
            loss, grad_norm = train_step(
                model,
                optimizer,
                tokens.to(spec.train.device),
                lr=lr,
                grad_clip=spec.optimizer.grad_clip,
                hooks=steps.hooks(step),
            )
            loss_value = loss.item()
            recent.append(loss_value)
            writer.put_step(
                StepRecord(
                    step=step,
                    loss=loss_value,
                    lr=lr,
                    grad_norm=grad_norm.item(),
                    tokens_seen=(step + 1) * tokens_per_step,
                    batch_indices=indices,
                )
            )
            steps_taken += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
    finally:
        _close(writer, bar, loss_value, finished)
    return RunSummary(
        run=run.path,
        steps=steps_taken,
        checkpoints=writer.checkpoints_written,
        seconds=time.perf_counter() - started,
        writer_seconds=writer.busy_seconds,
        final_loss=final_loss(np.array(recent)) if recent else None,
        complete=finished,
    )


def _close(writer: RunWriter, bar, loss_value: float | None, finished: bool) -> None:
    """Commit what the writer buffered (also on Ctrl-C or an error: --resume continues from
    there), then close the progress bar with what was written."""
    try:
        writer.close(complete=finished)
    finally:
        bar.set_postfix(
            loss=f"{loss_value:.3f}" if loss_value is not None else "-",
            checkpoints=writer.checkpoints_written,
            writer=f"{writer.busy_seconds:.1f}s",
        )
        bar.close()
