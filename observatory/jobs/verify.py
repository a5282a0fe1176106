"""``observatory verify``: prove that a store holds the checkpoints it claims.

Three checks per run, each stronger and slower than the one before:

1. **Chunks**: every committed chunk of every array reads back (each carries a CRC32C).
2. **Ledger and metadata**: every checkpoint matches the SHA-256 recorded when it was written
   (a missing chunk reads as fill values and fails here); no two steps hold identical weights
   (Pythia's step 0 == step 1); the stored steps, tokens seen, keyframes, learning rates and
   batch indices are the ones the spec prescribes.
3. **Replay** (not with ``quick``): every stored checkpoint is bit-identical to a replay of the
   segment from the keyframe before it, which catches a checkpoint written under the wrong
   step even when its checksums and hash agree.  A run is replayed in a few long spans, each
   straight through from a keyframe, checking the optimizer and RNG state at every keyframe on
   the way (so each segment is proven at training speed, without reloading its keyframe).
   Spans are independent, so they run as tasks on dask.distributed.

Only committed data is read, so a store can be verified while it is still training; nothing is
written.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from observatory.errors import StoreError
from observatory.jobs.cluster import dask_client
from observatory.jobs.selection import select_readers
from observatory.spec import RunId
from observatory.store import (
    FamilyStore,
    RunReader,
    read_all_analyses,
    recorded_digests,
    step_coordinates,
    verify_checkpoints,
)

TASK_STEPS = 250  # a replay task covers at least this many steps: its start-up is a small part


@dataclass(frozen=True)
class RunVerdict:
    """The outcome of verifying one run."""

    run: str
    checkpoints: int  # checkpoints checked against the ledger
    replayed: int  # checkpoints checked against a replay (0 with quick)
    failure: str | None  # the first failure, one line naming the run and step; None if all ok


def verify_store(
    path: str | Path,
    *,
    quick: bool = False,
    sizes: list[str] | None = None,
    seeds: list[int] | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> list[RunVerdict]:
    """Verify every selected run of a store (see the module docstring for the checks).

    Parameters
    ----------
    path
        The family store.
    quick
        Check chunks, ledger and metadata only, without replay.
    sizes, seeds
        Runs to verify (default: all in the store).
    scheduler
        Address of a running dask scheduler for the replays; default: a local cluster.
    workers
        Worker processes of the local cluster (default: one per the spec's ``threads``
        cores, since replay runs with the threads the run was trained with).
    progress
        Show a progress bar over replayed steps.

    Returns
    -------
    list of RunVerdict
        One per run, in store order.

    Raises
    ------
    StoreError
        If the store, a size or a seed does not exist.
    """
    family = FamilyStore(path)
    readers = select_readers(family, sizes=sizes, seeds=seeds, branches=True)
    if not quick:
        from observatory.train.replay import REPLAY_NEEDS

        for reader in readers:
            reader.refuse_if_ingested(f"{REPLAY_NEEDS}; verify --quick checks its checksums")
    verdicts = {r.run.path: _check_run(r) for r in readers}
    if not quick:
        tasks = [
            (reader.run, span)
            for reader in readers
            if verdicts[reader.run.path].failure is None
            for span in _tasks(reader)
        ]
        for run, replayed, failure in _replay_all(family.path, tasks, scheduler, workers, progress):
            old = verdicts[run.path]
            verdicts[run.path] = RunVerdict(
                run=old.run,
                checkpoints=old.checkpoints,
                replayed=old.replayed + replayed,
                failure=old.failure or failure,
            )
    return list(verdicts.values())


# --------------------------------------------------------------------------------------------
# Checks 1 and 2: chunks, ledger, metadata.


def _check_run(reader: RunReader) -> RunVerdict:
    checked = 0
    try:
        if reader.origin is None:  # an ingested run follows no spec's schedule or data order
            _check_metadata(reader)
        seen: dict[bytes, int] = {}
        for block in _blocks(reader):
            for step, digest in zip(block, verify_checkpoints(reader, block), strict=True):
                if digest.tobytes() in seen:
                    raise StoreError(
                        f"{reader.run.path}: steps {seen[digest.tobytes()]} and {step} hold "
                        "identical weights"
                    )
                seen[digest.tobytes()] = step
                checked += 1
        read_all_analyses(reader)
    except StoreError as err:
        return RunVerdict(reader.run.path, checked, 0, str(err))
    return RunVerdict(reader.run.path, checked, 0, None)


def _blocks(reader: RunReader) -> list[list[int]]:
    """The committed checkpoint steps in blocks of one chunk each (every chunk is read once)."""
    per_chunk = reader.array(reader.parameter_names[0]).chunks[0]
    steps = list(map(int, reader.steps()))
    return [steps[i : i + per_chunk] for i in range(0, len(steps), per_chunk)]


def _check_metadata(reader: RunReader) -> None:
    """The stored step coordinates and per-step records are the ones the spec (and a branch's
    intervention) prescribe."""
    from observatory.train.interventions import course_of

    spec, where = reader.family.spec, reader.run.path
    total = spec.train.steps
    tokens = spec.train.tokens_per_step
    stored = step_coordinates(reader)
    metrics = reader.metrics()
    steps = np.arange(reader.n_steps)
    schedule, keyframes = spec.checkpoints.steps(total), spec.checkpoints.keyframes(total)
    course = course_of(reader, reader.family.attrs["data"]["n_sequences"])
    if reader.branch is not None:  # each fork is a keyframe of the branch
        forks = [step for step, _ in course.chain]
        schedule, keyframes = (sorted({*points, *forks}) for points in (schedule, keyframes))
    expected = {
        "the checkpoint schedule": (reader.attrs["schedule"], list(schedule)),
        "the keyframe schedule": (reader.attrs["keyframes"], list(keyframes)),
        "the checkpoint steps": (stored["step"], reader.steps()),
        "the keyframe steps": (stored["keyframe"], reader.keyframe_steps()),
        "tokens seen": (stored["tokens_seen"], reader.steps() * tokens),
        "train_step": (metrics["train_step"], steps),
        "train_tokens": (metrics["train_tokens"], (steps + 1) * tokens),
        "the learning rates": (
            metrics["lr"],
            np.array([course.lr(int(k)) for k in steps], dtype=np.float32),
        ),
    }
    for what, (found, wanted) in expected.items():
        if not np.array_equal(np.asarray(found), np.asarray(wanted)):
            raise StoreError(f"{where}: {what} differ from those the spec prescribes")
    recorded = reader.batch_indices_between(0, reader.n_steps)
    for step in steps:
        if not np.array_equal(recorded[step], course.batch_indices(int(step))):
            raise StoreError(f"{where}: the recorded batch of step {step} is not the data order's")


# --------------------------------------------------------------------------------------------
# Check 3: replay, on dask.


def _tasks(reader: RunReader) -> list[tuple[int, int]]:
    """Spans ``(keyframe, end)`` of at least :data:`TASK_STEPS` steps (the last may be
    shorter), each ending at a keyframe or the last checkpoint: a task replays one straight
    through."""
    steps, keyframes = reader.steps(), list(map(int, reader.keyframe_steps()))
    if reader.branch is not None:  # the steps before the fork are its parent's, verified there
        fork = reader.branch["fork"]
        steps, keyframes = steps[steps >= fork], [k for k in keyframes if k >= fork]
    if len(steps) < 2:
        return []
    last = int(steps[-1])
    spans, start = [], keyframes[0]
    for keyframe in keyframes[1:]:
        if keyframe - start >= TASK_STEPS and keyframe < last:
            spans.append((start, keyframe))
            start = keyframe
    return [*spans, (start, last)] if last > start else spans


def replay_span(
    store: str, size: str, seed: int, start: int, end: int, branch: str = ""
) -> tuple[int, str | None]:
    """Replay steps ``start..end`` straight through from the keyframe at ``start`` (a task).

    Every checkpoint on the way must match the ledger's hash of its weights and every keyframe
    the hash of its optimizer and RNG state.  A matching keyframe state means the replay from
    there on is the replay of its own segment, so one pass proves every segment.

    Returns
    -------
    tuple
        Checkpoints compared, and the first mismatch (one line) or None.
    """
    from observatory.store import state_digest, weights_digest
    from observatory.train.replay import ReplaySource
    from observatory.train.step import snapshot

    source = ReplaySource.open(store, size=size, seed=seed, strict=True, branch=branch)
    reader, tokens = source.reader, source.spec.train.tokens_per_step
    targets = {int(s) for s in reader.steps() if start < s <= end}
    compared, keyframe = 0, start
    for step, model, optimizer, rng in source.run_states(start, end, yield_at=targets):
        weights, state = recorded_digests(reader, step)
        replayed = snapshot(model, optimizer, step, tokens, state is not None, rng=rng)
        if not np.array_equal(weights_digest(replayed.params), weights):
            return compared, (
                f"{reader.run.path}: the weights stored at step {step} differ from a replay "
                f"of steps {keyframe}..{step} from the keyframe at step {keyframe}"
            )
        if state is not None:
            if not np.array_equal(state_digest(replayed.moments, replayed.rng_state), state):
                return compared, (
                    f"{reader.run.path}: the optimizer and RNG state stored at step {step} "
                    f"differ from a replay of steps {keyframe}..{step} from the keyframe at "
                    f"step {keyframe}"
                )
            keyframe = step
        compared += 1
    return compared, None


def _replay_all(
    path: Path, tasks: list[tuple[RunId, tuple[int, int]]], scheduler, workers, progress
) -> Iterator[tuple[RunId, int, str | None]]:
    """Run the replay tasks on dask; yield ``(run, checkpoints compared, failure)`` each."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    if not tasks:
        return
    total = sum(end - start for _, (start, end) in tasks)
    threads = FamilyStore(path).spec.train.threads  # replay runs under the run's recipe
    with dask_client(scheduler=scheduler, workers=workers or 0, threads=threads) as client:
        futures = {
            client.submit(
                replay_span, str(path), run.size, run.seed, *span, run.branch, pure=False
            ): (
                run,
                span,
            )
            for run, span in tasks
        }
        with tqdm(total=total, unit="step", desc="replay", disable=not progress) as bar:
            for future in as_completed(futures):
                run, (start, end) = futures[future]
                try:
                    compared, failure = future.result()
                except StoreError as err:  # e.g. the recipe cannot be honoured on the workers
                    compared, failure = 0, str(err)
                bar.update(end - start)
                yield run, compared, failure


def format_verdicts(verdicts: list[RunVerdict]) -> str:
    """The table ``observatory verify`` prints: run, checkpoints checked, result."""
    rows = [("run", "checkpoints", "replayed", "result")]
    for v in verdicts:
        rows.append((v.run, str(v.checkpoints), str(v.replayed), v.failure or "ok"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True))
        + "  "
        + row[3]
        for row in rows
    )
