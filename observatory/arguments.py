"""Checks of the Python API's arguments: a wrong type or value is one line naming the argument.

The public functions (``open_run``, ``open_family``, ``model_at``, ``batch_at``, ``replay``,
...) pass user values straight to numpy, zarr and torch, where ``"4"``, ``4.5`` or ``[4]`` for a
step would be a ``TypeError`` deep inside, or, worse, be taken (``True`` as seed 1, ``4.0`` as
step 4).  They check them here first, as the reader checks existence (no such seed, step, ...).
This module sits below every layer that takes user arguments (storage, query, training), so
each of them checks with the same helpers.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any

from observatory.errors import ObservatoryError


class ArgumentError(ObservatoryError):
    """An argument of a Python API function has the wrong type or an impossible value."""


def _shown(value: Any) -> str:
    text = repr(value)
    return (
        f"{text[:40]}... ({type(value).__name__})"
        if len(text) > 40
        else f"{text} ({type(value).__name__})"
    )


def index(value: Any, what: str, *, minimum: int = 0) -> int:
    """``value`` as an ``int`` of at least ``minimum`` (a seed, step, layer, head, count).

    Python and numpy integers are accepted; ``bool``, floats (even ``4.0``), strings and
    sequences are an :class:`ArgumentError`.
    """
    if isinstance(value, bool):
        raise ArgumentError(f"{what}: expected an integer, got {_shown(value)}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ArgumentError(f"{what}: expected an integer, got {_shown(value)}") from None
    if number < minimum:
        raise ArgumentError(f"{what}: must be at least {minimum}, got {number}")
    return number


def indices(values: Any, what: str) -> list[int]:
    """``values`` as a list of non-negative ``int`` (seeds, steps): a list, tuple, range or
    array of integers, never a single number or a string."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ArgumentError(f"{what}: expected a list of integers, got {_shown(values)}")
    return [index(value, what) for value in values]


def name(value: Any, what: str) -> str:
    """``value`` as a non-empty ``str`` (a size, a weight's name)."""
    if not isinstance(value, str) or not value:
        raise ArgumentError(f"{what}: expected a name (a non-empty str), got {_shown(value)}")
    return value


def flag(value: Any, what: str) -> bool:
    """``value`` as a ``bool`` (``"no"`` would otherwise be true)."""
    if not isinstance(value, bool):
        raise ArgumentError(f"{what}: expected True or False, got {_shown(value)}")
    return value


def function(value: Any, what: str) -> Callable | None:
    """``value`` if it is callable or None."""
    if value is not None and not callable(value):
        raise ArgumentError(f"{what}: expected a function or None, got {_shown(value)}")
    return value


def chunks(value: Any) -> dict | None:
    """``chunks`` of ``open_run``/``open_family``: None or a dict (dim -> chunk size)."""
    if value is not None and not isinstance(value, dict):
        raise ArgumentError(
            f"chunks: expected None or a dict of dim -> chunk size, got {_shown(value)}"
        )
    return value
