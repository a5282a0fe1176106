"""Ctrl-C during training stops at a step boundary, so the store is left resumable."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_interrupted = threading.Event()


@contextmanager
def interrupts_between_steps() -> Iterator[None]:
    """Within the block, Ctrl-C (SIGINT) stops training at the next step boundary.

    Python raises KeyboardInterrupt at whatever bytecode runs when the signal arrives. That
    can be a weakref callback or a ``__del__``, where Python prints "Exception ignored" with a
    traceback and carries on, or zarr's bookkeeping half-way through a call. So the handler only
    records the signal, and :func:`raise_if_interrupted` raises it where the loop checks: before
    each step and each run. A second Ctrl-C interrupts at once. Outside the main thread (a dask
    worker) this does nothing: signals reach the main thread only.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def record(signum, frame):
        if _interrupted.is_set():
            raise KeyboardInterrupt
        _interrupted.set()

    previous = signal.signal(signal.SIGINT, record)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _interrupted.clear()


def raise_if_interrupted() -> None:
    """Raise the KeyboardInterrupt that :func:`interrupts_between_steps` held back, if any."""
    if _interrupted.is_set():
        raise KeyboardInterrupt
