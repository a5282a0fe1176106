"""glibc's allocator, set for training: one arena, and free memory handed back after commits.

Both act on glibc only (the allocator of most Linux distributions); elsewhere they do
nothing.  With an arena per thread, memory freed by the writer thread stays with its arena
and the peak RSS of a run grows well past what the writer holds; one arena
(:func:`one_malloc_arena`) and handing free pages back after each commit
(:func:`release_free_memory`) keep it near the writer's buffer.  ``benchmarks/bench_scale.py``
measures it.
"""

from __future__ import annotations

import ctypes
import os
import platform
from functools import cache

_M_ARENA_MAX = -8  # glibc's malloc.h


@cache
def _glibc() -> ctypes.CDLL | None:
    return ctypes.CDLL(None) if platform.libc_ver()[0] == "glibc" else None


def one_malloc_arena() -> None:
    """Let threads started from now on allocate from glibc's main arena (``M_ARENA_MAX=1``).

    The writer thread and zarr's I/O threads would otherwise each get an arena of their own,
    and each arena keeps what it freed for itself.  A training loop in a worker thread (dask)
    also trains slower in an arena of its own, which glibc shrinks and grows around every
    step.  Nothing if ``MALLOC_ARENA_MAX`` is set: the user's setting stands.
    """
    libc = _glibc()
    if libc is not None and "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(_M_ARENA_MAX, 1)


def release_free_memory() -> None:
    """Hand the free pages of glibc's heap back to the system (``malloc_trim(0)``).

    The checkpoints a writer has copied into its buffer and zarr's encoding buffers are freed
    into the heap, which keeps their pages; the writer calls this after each commit.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
