"""Users' code named as ``"file.py:name"``: read once, executed from its source text.

Analyses (:mod:`observatory.jobs.resolve`) and the window predicates of branch interventions
(:mod:`observatory.train.interventions`) load a file this way: the source text is what travels
to workers and what is hashed into provenance, so a changed file is a different analysis or
predicate.
"""

from __future__ import annotations

import hashlib
import linecache
import sys
import types
from pathlib import Path

from observatory.errors import SpecError


def file_source(filename: str, what: str) -> str:
    """The source text of ``filename`` (a one-line :class:`SpecError` naming ``what`` if none)."""
    path = Path(filename)
    if not path.is_file():
        raise SpecError(f"no such {what} file {filename}")
    return path.read_text()


def source_sha256(source: str) -> str:
    """The SHA-256 (hex) of a file's source text, as provenance records it."""
    return hashlib.sha256(source.encode()).hexdigest()


def source_module(filename: str, source: str) -> types.ModuleType:
    """Execute a file's source as a fresh module (named after the file and its source).

    Raises
    ------
    SpecError
        One line naming the file and the exception its execution raised.
    """
    digest = hashlib.sha256(f"{filename}\0{source}".encode()).hexdigest()[:16]
    name = f"observatory_user_{Path(filename).stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    # inspect.getsource reads through linecache: give it this source, not the file on disk
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    module = types.ModuleType(name)
    module.__file__ = filename
    sys.modules[name] = module  # dataclasses and pickle look modules up by name
    try:
        exec(compile(source, filename, "exec"), module.__dict__)
    except Exception as err:
        del sys.modules[name]
        raise SpecError(f"{filename}: {type(err).__name__}: {err}".splitlines()[0]) from None
    return module
