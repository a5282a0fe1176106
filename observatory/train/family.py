"""Training a whole family: :func:`train_family` selects its runs and trains each one.

Runs train one after another in this process, or as one dask.distributed task per run (local
workers, a running cluster, or the caller's client).  Either way this process checks the
budget, creates the store's family metadata, and each run is written by the one process that
trains it (see :func:`~observatory.train.loop.train_run`).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from tqdm.auto import tqdm

from observatory.data import Corpus, build_corpus, data_record
from observatory.errors import DataError, ObservatoryError, StoreError
from observatory.memory import one_malloc_arena
from observatory.models import build_config
from observatory.spec import RunId, RunSpec
from observatory.store import FamilyStore, create_family, location, write_size_attrs
from observatory.train.budget import check_budget
from observatory.train.interrupts import interrupts_between_steps, raise_if_interrupted
from observatory.train.loop import RunSummary, train_run

# Errors of a disk (or quota) that is full: the run stops, what it committed is kept.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def train_family(
    spec: RunSpec,
    *,
    store: str | Path | None = None,
    seeds: list[int] | None = None,
    sizes: list[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    on_run_end: Callable[[RunSummary], None] | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    client=None,
) -> str | Path:
    """Train every run of the family (or the selected seeds/sizes) into one store.

    Runs train one after another in this process, or, with ``workers``, ``scheduler`` or
    ``client``, as one dask.distributed task per run: this process creates the family's
    metadata, and each run is written by the one worker process that trains it.

    Parameters
    ----------
    spec
        The family's run spec.
    store
        Store path or URL (``s3://bucket/family.zarr``); defaults to ``spec.default_store``.
    seeds
        Seed indices to train (default: all).
    sizes
        Size names to train (default: all).
    resume
        Continue unfinished runs from their last committed checkpoint and skip finished ones.
        Without it, a run that already has data in the store is an error.
    progress
        Show a progress bar per run (on a cluster: one bar over the runs).
    stop_after
        Stop every run after this many steps in this call, leaving it unfinished (for tests and
        for splitting long trainings; the run resumes later with ``resume=True``).
    on_run_end
        Called with each run's :class:`RunSummary` when the run stops.
    workers
        Train on a local dask cluster of this many single-threaded worker processes.
    scheduler
        Train on the running dask cluster at this address (``tcp://host:8786``).
    client
        Train on the cluster of this ``distributed.Client`` (one the caller has already).

    Returns
    -------
    pathlib.Path or str
        The store path, or its URL.
    """
    path = location(store or spec.default_store)
    one_malloc_arena()  # before zarr starts its threads
    # Everything that can be checked is checked before the store is touched.
    runs = spec.runs(seeds=seeds, sizes=sizes)
    check_budget(spec, runs, path)
    sequential = workers is None and scheduler is None and client is None
    if sequential:
        spec.train.require_device()  # on a cluster, each worker checks its own
    on_run_end = on_run_end or (lambda summary: None)
    options = {"resume": resume, "stop_after": stop_after}
    # In this process, Ctrl-C stops at a step boundary (see interrupts_between_steps).
    with resumable_when_full(path), interrupts_between_steps() if sequential else nullcontext():
        corpus = build_corpus(
            spec.data,
            context=spec.train.context,
            vocab_size=spec.model.vocab_size,
            progress=progress,
        )
        if spec.data.source != "induction" and len(corpus) < spec.train.batch_size:
            raise DataError(
                f"{', '.join(spec.data.paths) or 'data'}: the corpus has {len(corpus)} windows "
                f"of {spec.train.context} tokens, fewer than a batch ({spec.train.batch_size})"
            )
        root = _create_store(spec, path, runs, corpus)
        if sequential:
            for run in runs:
                raise_if_interrupted()
                on_run_end(train_run(spec, run, root, corpus, progress=progress, **options))
            return path
    jobs = {run.path: (spec, str(path), run) for run in runs}
    cluster = {"client": client, "workers": workers, "scheduler": scheduler}
    with cluster_client(**cluster, threads=spec.train.threads) as client:
        train_on_cluster(client, _train_task, jobs, corpus, progress, on_run_end, options)
    return path


def _create_store(spec: RunSpec, path, runs: list[RunId], corpus: Corpus):
    """Create the family's store (or open it) with its data record and each size's attributes."""
    root = create_family(path, spec, data=data_record(corpus, spec.train.context))
    for name in dict.fromkeys(run.size for run in runs):
        size = spec.size(name)
        write_size_attrs(root, size, hf_config=build_config(spec.model, size).to_dict())
    return root


@contextmanager
def cluster_client(*, client, workers: int | None, scheduler: str | None, threads: int):
    """``client``, or one of a local cluster of ``workers`` or of the one at ``scheduler``
    (see :func:`~observatory.jobs.cluster.dask_client`), for as long as the block runs."""
    if client is not None:
        yield client
        return
    from observatory.jobs.cluster import dask_client

    with dask_client(scheduler=scheduler, workers=workers or 0, threads=threads) as client:
        yield client


def train_on_cluster(client, task, jobs: dict, corpus, progress, on_run_end, options) -> None:
    """One dask task ``task(*jobs[path], corpus, **options)`` per run or branch ``path``;
    report each run as it ends, and every failed one at the end."""
    from distributed import as_completed

    shared_corpus = client.scatter(corpus, broadcast=True)  # workers need not have the files
    futures = {
        client.submit(task, *args, shared_corpus, **options, key=f"train-{path}", pure=False): path
        for path, args in jobs.items()
    }
    failed = []
    with tqdm(total=len(jobs), unit="run", desc="train", disable=not progress) as bar:
        for future in as_completed(futures):
            try:
                summary = future.result()
            except ObservatoryError as err:
                failed.append(str(err))
            except Exception as err:  # a worker died, the scheduler lost the task, ...
                reason = " ".join(str(err).split())  # dask's messages span lines
                failed.append(
                    f"{futures[future]}: {type(err).__name__}: {reason} (its committed "
                    "checkpoints are kept: continue with --resume)"
                )
            else:
                with tqdm.external_write_mode():
                    on_run_end(summary)
            bar.update(1)
    if failed:
        raise StoreError(f"{len(failed)} of {len(jobs)} runs failed: {'; '.join(failed)}")


def _train_task(spec, store, run, corpus, *, resume, stop_after) -> RunSummary:
    """Train one run on a dask worker, into the store the client created."""
    with resumable_when_full(store):
        root = FamilyStore(store, mode="r+").root
        return train_run(
            spec, run, root, corpus, resume=resume, progress=False, stop_after=stop_after
        )


@contextmanager
def resumable_when_full(store: str | Path) -> Iterator[None]:
    """Turn a full disk, wherever training meets it (the writer's thread, a run's metadata, a
    lock file), into one line naming the store and how to continue.

    Commits write their rows first and the markers last, so a write that fails leaves every
    committed checkpoint intact: ``--resume`` continues from the last committed keyframe.

    Raises
    ------
    StoreError
        If an ``OSError`` with ``ENOSPC`` or ``EDQUOT`` is raised or caused the error.
    """
    try:
        yield
    except Exception as err:
        full = _disk_full(err)
        if full is None:
            raise
        raise StoreError(
            f"{store}: the disk is full ({os.strerror(full.errno)}); the checkpoints committed "
            "so far are kept: free space, then continue with --resume"
        ) from err


def _disk_full(err: BaseException | None) -> OSError | None:
    """The full-disk error that ``err`` is or was caused by, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
