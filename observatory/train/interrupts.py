"""Ctrl-C or SIGTERM during training stops at a step boundary, so the store is left resumable."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# Ctrl-C, and what batch schedulers (Slurm, Kubernetes) send before they kill a job
SIGNALS = (signal.SIGINT, signal.SIGTERM)

_interrupted = threading.Event()
_received: list[int] = []  # the signal that set _interrupted


class Interrupted(KeyboardInterrupt):
    """Training was stopped by a signal; ``signum`` says which (the exit code is 128 + it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def interrupts_between_steps() -> Iterator[None]:
    """Within the block, Ctrl-C (SIGINT) or SIGTERM stops training at the next step boundary.

    Python raises KeyboardInterrupt at whatever bytecode runs when the signal arrives. That
    can be a weakref callback or a ``__del__``, where Python prints "Exception ignored" with a
    traceback and carries on, or zarr's bookkeeping half-way through a call. So the handler only
    records the signal, and :func:`raise_if_interrupted` raises it as :class:`Interrupted` where
    the loop checks: before each step and each run. A second signal interrupts at once. Outside
    the main thread (a dask worker) this does nothing: signals reach the main thread only.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def record(signum, frame):
        if _interrupted.is_set():
            raise Interrupted(signum)
        _received[:] = [signum]
        _interrupted.set()

    previous = {signum: signal.signal(signum, record) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _interrupted.clear()


def raise_if_interrupted() -> None:
    """Raise the :class:`Interrupted` that :func:`interrupts_between_steps` held back, if any."""
    if _interrupted.is_set():
        raise Interrupted(_received[0])
