"""``observatory verify``: prove that a store holds the checkpoints it claims.

Three checks per run, each stronger and slower than the one before:

1. **Chunks**: every committed chunk of every array reads back (each carries a CRC32C).
2. **Ledger and metadata**: every checkpoint matches the SHA-256 recorded when it was written
   (a missing chunk reads as fill values and fails here); no two steps hold identical weights
   (Pythia's step 0 == step 1); the stored steps, tokens seen, keyframes, learning rates and
   batch indices are the ones the spec prescribes.
3. **Replay** (not with ``quick``): every stored checkpoint is bit-identical to a replay of the
   segment from the keyframe before it, which catches a checkpoint written under the wrong
   step even when its checksums and hash agree.  Segments are independent, so they run as
   tasks on dask.distributed.

Only committed data is read, so a store can be verified while it is still training; nothing is
written.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from observatory.data import batch_indices
from observatory.errors import StoreError
from observatory.spec import RunId
from observatory.store import FamilyStore, RunReader

MIN_TASK_STEPS = 100  # replay segments are grouped into tasks of at least this many steps


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
        Worker processes of the local cluster (default: one per core).
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
    readers = _select(family, sizes, seeds)
    verdicts = {r.run.path: _check_run(r) for r in readers}
    if not quick:
        tasks = [
            (reader.run, segments)
            for reader in readers
            if verdicts[reader.run.path].failure is None
            for segments in _tasks(reader)
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


def _select(family: FamilyStore, sizes, seeds) -> list[RunReader]:
    runs = family.runs()
    for size in sizes or []:
        family.size_runs(size)  # a clear error listing the sizes
    selected = [r for r in runs if sizes is None or r.size in sizes]
    for seed in seeds or []:
        if not any(r.seed == seed for r in selected):
            there = sorted({r.seed for r in selected})
            raise StoreError(f"{family.path}: no seed {seed} (seeds: {there})")
    return [family.run(r.size, r.seed) for r in selected if seeds is None or r.seed in seeds]


# --------------------------------------------------------------------------------------------
# Checks 1 and 2: chunks, ledger, metadata.


def _check_run(reader: RunReader) -> RunVerdict:
    checked = 0
    try:
        _check_metadata(reader)
        seen: dict[bytes, int] = {}
        for step in map(int, reader.steps()):
            digest = reader.verify_checkpoint(step).tobytes()  # reads every chunk of it
            if digest in seen:
                raise StoreError(
                    f"{reader.run.path}: steps {seen[digest]} and {step} hold identical weights"
                )
            seen[digest] = step
            checked += 1
        reader.read_all_analyses()
    except StoreError as err:
        return RunVerdict(reader.run.path, checked, 0, str(err))
    return RunVerdict(reader.run.path, checked, 0, None)


def _check_metadata(reader: RunReader) -> None:
    """The stored step coordinates and per-step records are the ones the spec prescribes."""
    spec, run, where = reader.family.spec, reader.run, reader.run.path
    total = spec.train.steps
    tokens = spec.train.tokens_per_step
    stored = reader.step_coordinates()
    metrics = reader.metrics()
    steps = np.arange(reader.n_steps)
    schedule, keyframes = spec.checkpoints.steps(total), spec.checkpoints.keyframes(total)
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
            np.array([spec.optimizer.lr_at(int(k), total) for k in steps], dtype=np.float32),
        ),
    }
    for what, (found, wanted) in expected.items():
        if not np.array_equal(np.asarray(found), np.asarray(wanted)):
            raise StoreError(f"{where}: {what} differ from those the spec prescribes")
    recorded = reader.batch_indices_between(0, reader.n_steps)
    size = reader.family.attrs["data"]["n_sequences"]
    for step in steps:
        order = batch_indices(
            data_seed=run.data_seed,
            step=int(step),
            batch_size=spec.train.batch_size,
            dataset_size=size,
        )
        if not np.array_equal(recorded[step], order):
            raise StoreError(f"{where}: the recorded batch of step {step} is not the data order's")


# --------------------------------------------------------------------------------------------
# Check 3: replay, on dask.


def _tasks(reader: RunReader) -> list[list[tuple[int, int]]]:
    """Replay segments ``(keyframe, last checkpoint before the next keyframe or the next
    keyframe itself)``, grouped into tasks of at least :data:`MIN_TASK_STEPS` steps."""
    steps, keyframes = reader.steps(), list(map(int, reader.keyframe_steps()))
    if len(steps) < 2:
        return []
    ends = [*keyframes[1:], int(steps[-1])]
    segments = [(k, end) for k, end in zip(keyframes, ends, strict=True) if end > k]
    tasks: list[list[tuple[int, int]]] = [[]]
    for segment in segments:
        if sum(end - start for start, end in tasks[-1]) >= MIN_TASK_STEPS:
            tasks.append([])
        tasks[-1].append(segment)
    return [task for task in tasks if task]


def replay_segments(
    store: str, size: str, seed: int, segments: list[tuple[int, int]]
) -> tuple[int, str | None]:
    """Replay each ``(keyframe, end)`` segment and compare every checkpoint in it (a task).

    Returns
    -------
    tuple
        Checkpoints compared, and the first mismatch (one line) or None.
    """
    from observatory.models import stack_layers
    from observatory.replayer import ReplaySource
    from observatory.store import weights_digest

    source = ReplaySource.open(store, size=size, seed=seed, strict=True)
    reader = source.reader
    compared = 0
    for keyframe, end in segments:
        targets = {int(s) for s in reader.steps() if keyframe < s <= end}
        for step, model in source.run(keyframe, end, yield_at=targets):
            replayed = weights_digest(stack_layers(dict(model.named_parameters())))
            if not np.array_equal(replayed, reader.verify_checkpoint(step)):
                return compared, (
                    f"{reader.run.path}: the weights stored at step {step} differ from a replay "
                    f"of steps {keyframe}..{step} from the keyframe at step {keyframe}"
                )
            compared += 1
    return compared, None


def _replay_all(
    path: Path, tasks: list[tuple[RunId, list]], scheduler, workers, progress
) -> Iterator[tuple[RunId, int, str | None]]:
    """Run the replay tasks on dask; yield ``(run, checkpoints compared, failure)`` each."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    if not tasks:
        return
    total = sum(end - start for _, segments in tasks for start, end in segments)
    with _client(scheduler, workers) as client:
        futures = {
            client.submit(replay_segments, str(path), run.size, run.seed, segments, pure=False): (
                run,
                segments,
            )
            for run, segments in tasks
        }
        with tqdm(total=total, unit="step", desc="replay", disable=not progress) as bar:
            for future in as_completed(futures):
                run, segments = futures[future]
                try:
                    compared, failure = future.result()
                except StoreError as err:  # e.g. the recipe cannot be honoured on the workers
                    compared, failure = 0, str(err)
                bar.update(sum(end - start for start, end in segments))
                yield run, compared, failure


@contextmanager
def _client(scheduler: str | None, workers: int | None):
    """A dask client on ``scheduler``, or on a local cluster of single-threaded processes."""
    from distributed import Client, LocalCluster

    from observatory.jobs import default_workers

    if scheduler is not None:
        with Client(scheduler) as client:
            yield client
        return
    with (
        LocalCluster(
            n_workers=workers or default_workers(),
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.CRITICAL,  # failures reach the user once, in the table
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


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
