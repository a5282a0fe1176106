"""The dask.distributed client that training and analysis jobs run their tasks on."""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import import_module

from observatory.errors import ObservatoryError


def default_workers() -> int:
    """The cores this process may use: one single-threaded worker process per core."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@contextmanager
def dask_client(*, scheduler: str | None = None, workers: int = 0, threads: int = 1) -> Iterator:
    """A client of an existing scheduler, or of a local cluster started (and stopped) here.

    Parameters
    ----------
    scheduler
        Address of a running dask scheduler (``tcp://host:8786``).  Without it, a
        ``LocalCluster`` of worker processes, each running one task at a time, is started.
    workers
        Local cluster size (0: one worker per ``threads`` cores); ignored with ``scheduler``.
    threads
        Torch threads each task uses (a run's recipe fixes them).  When the local workers
        need more threads than there are cores, their OpenMP threads wait passively instead
        of spinning, so that a spinning thread does not take the core another worker needs.

    Yields
    ------
    distributed.Client

    Raises
    ------
    ObservatoryError
        If no scheduler answers at ``scheduler``.
    """
    import dask
    from distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            client = Client(scheduler, timeout=30)
        except (OSError, ValueError) as err:
            raise ObservatoryError(f"{scheduler}: no dask scheduler answers ({err})") from None
        with client:
            yield client
        return
    workers = workers or max(1, default_workers() // threads)
    environ = _worker_environ(oversubscribed=workers * threads > default_workers())
    local = {
        "distributed.nanny.pre-spawn-environ": environ,
        # The statistical profiler samples every thread and the event loops and monitors wake
        # often, for a dashboard that a local cluster does not serve: they take CPU time from
        # the training threads.
        "distributed.worker.profile.enabled": False,
        "distributed.admin.tick.interval": "2s",
        "distributed.admin.system-monitor.interval": "2s",
        "distributed.worker.memory.monitor-interval": "2s",
        "distributed.worker.preload": [__name__],  # dask_setup below
    }
    with dask.config.set(local):
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            # A failed task reaches the user once, as the command's error; not as worker logs.
            silence_logs=logging.CRITICAL,
        )
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()


def dask_setup(worker) -> None:
    """Preload of the local cluster's workers: import what every task needs at start-up."""
    warm_import("observatory.train")


def warm_import(module: str) -> None:
    """Import ``module`` with the garbage collector paused, then freeze what exists.

    Importing torch, transformers, zarr and xarray creates hundreds of thousands of long-lived
    objects, and each full collection traverses them all: several times during the imports and
    again when the process exits.  Frozen, they are out of the collector's reach; they live as
    long as the process anyway.
    """
    gc.disable()
    try:
        import_module(module)
    finally:
        gc.enable()
    gc.freeze()


def _worker_environ(*, oversubscribed: bool) -> dict:
    """distributed's environment for new worker processes, with glibc's allocator set up for
    training (and ``OMP_WAIT_POLICY=PASSIVE`` if ``oversubscribed``).

    - ``MALLOC_TRIM_THRESHOLD_`` (distributed sets it) is left out: setting it switches off
      glibc's adaptive mmap threshold, so every tensor larger than 128 KiB is mmap'ed and
      unmapped again at every step, which costs a worker much of its speed in system time.
    - ``MALLOC_ARENA_MAX=1``: a task runs in a worker thread, whose allocations go to a
      thread arena that glibc shrinks and grows again around every step's tensors, with page
      faults and system time the main thread's arena does not have; with one arena, a worker
      trains as fast as the main thread.  A value set in the user's environment is kept.
    """
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    environ.setdefault("MALLOC_ARENA_MAX", os.environ.get("MALLOC_ARENA_MAX", "1"))
    if oversubscribed:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"  # only how idle threads wait: same numbers
    return environ
