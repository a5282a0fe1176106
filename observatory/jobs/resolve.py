"""Resolving the analyses a job names: built-ins, importable modules, and files shipped as source.

A file's analysis travels to the workers as its source text, so a remote worker needs neither
the file nor the user's package; its source hash is stored with the results, so a changed
analysis is computed again.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from observatory.analysis.builtins import BUILTINS
from observatory.analysis.protocol import NAMED_DIMS, Analysis, Plugin, SharedData
from observatory.errors import SpecError
from observatory.usercode import file_source, source_module

# Names every run's dataset has, whatever the store: its coordinates and the named dims.
RESERVED_NAMES = (
    "step",
    "train_step",
    "tokens_seen",
    "seed",
    "init_seed",
    "data_seed",
    "complete",
    "size",
    "branch",
    "fork",
    "run",
    *NAMED_DIMS,
)


@dataclass(frozen=True, eq=False)
class Configured:
    """An analysis as a job uses it: where it comes from, its options and its parameters."""

    ref: str
    analysis: Analysis
    options: Any
    source: str | None  # the file's source text, for analyses defined in a file

    @property
    def name(self) -> str:
        return self.analysis.name

    def parameters(self, data: SharedData) -> dict[str, Any]:
        """The parameters stored with the results; user analyses add their source hash."""
        parameters = self.analysis.parameters(self.options, data)
        if self.ref in BUILTINS:
            return parameters
        return parameters | {"source_sha256": self.analysis.source_hash()}


def read_source(ref: str, noun: str = "analysis") -> str | None:
    """The source text of a ``"file.py:name"`` analysis or target (None for other references)."""
    module, _, _ = ref.rpartition(":")
    if not module.endswith(".py"):
        return None
    return file_source(module, noun)


def resolve(
    ref: str,
    source: str | None = None,
    *,
    builtins: Mapping[str, Plugin] = BUILTINS,
    kind: type[Plugin] = Analysis,
) -> Any:
    """The analysis (or other plug-in of ``kind``, e.g. a target) a reference names.

    Parameters
    ----------
    ref
        A built-in name, ``"package.module:name"`` or ``"path/file.py:name"``.
    source
        For a file: its source text (shipped to workers, which may not have the file).
    builtins, kind
        The built-ins by name and the class a found object must be (default: analyses).

    Raises
    ------
    SpecError
        If nothing of that name exists or it is not of ``kind``.
    """
    noun = kind.NOUN
    module_name, sep, name = ref.rpartition(":")
    if not sep:
        if ref not in builtins:
            raise SpecError(
                f"unknown {noun} {ref!r} (built-in: {', '.join(builtins)}; or "
                "'package.module:name' or 'file.py:name')"
            )
        return builtins[ref]
    if module_name.endswith(".py"):
        module = source_module(module_name, source if source is not None else read_source(ref))
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise SpecError(f"cannot import {module_name!r} for {noun} {ref!r}: {err}") from None
    found = getattr(module, name, None)
    if not isinstance(found, kind):
        what = "no such name" if found is None else f"not decorated with @obs.{noun}"
        raise SpecError(f"{noun} {ref!r}: {what}")
    return found


def configure(analyses: Sequence[str], options: dict[str, dict[str, Any]]) -> list[Configured]:
    """Resolve a job's analyses and validate their option tables (``options[name]``).

    Raises
    ------
    SpecError
        Naming ``analyses[i]`` or the ``[<name>]`` table at fault.
    """
    out = []
    for i, ref in enumerate(analyses):
        try:
            source = read_source(ref)
            analysis = resolve(ref, source)
        except SpecError as err:
            raise SpecError(f"analyses[{i}]: {err}") from None
        if analysis.name in {c.name for c in out}:
            raise SpecError(f"analyses[{i}]: a second analysis named {analysis.name!r}")
        chosen = analysis.parse_options(options.get(analysis.name, {}), analysis.name)
        out.append(Configured(ref=ref, analysis=analysis, options=chosen, source=source))
    stray = sorted(set(options) - {c.name for c in out})
    if stray:
        raise SpecError(f"[{stray[0]}]: options for an analysis the job does not run")
    check_names(out)
    return out


def check_names(configured: Sequence[Configured], taken: Mapping[str, str] | None = None) -> None:
    """Refuse declared variables (and custom dims) whose names something else has.

    A run's dataset holds its own variables, coordinates and dims and every stored analysis's
    variables side by side, so a name two of them share would make every reader of the run
    fail (or, worse, pick one).

    Parameters
    ----------
    configured
        The job's analyses with their options.
    taken
        ``{name: who has it}`` for the names of the store (e.g. ``{"loss": "the run"}``);
        :data:`RESERVED_NAMES` are always taken.

    Raises
    ------
    SpecError
        One line naming the analysis, the name and who else has it.
    """
    owners = dict.fromkeys(RESERVED_NAMES, "every run (a coordinate or dim)") | dict(taken or {})
    dims: dict[str, str] = {}
    for c in configured:
        declared = c.analysis.declared(c.options)
        custom = {
            dim[0] for shape in declared.values() for dim in shape if not isinstance(dim, str)
        }
        for variable in declared:
            other = owners.get(variable) or dims.get(variable)
            if other is None and variable in custom:
                other = f"analysis {c.name!r} (a dim)"
            if other is not None:
                raise SpecError(
                    f"analysis {c.name!r}: variable {variable!r} is a name {other} has; rename it"
                )
        for dim in sorted(custom):
            if dim in owners:
                raise SpecError(
                    f"analysis {c.name!r}: dim {dim!r} is a name {owners[dim]} has; rename it"
                )
            dims.setdefault(dim, f"analysis {c.name!r} (a dim)")
        owners |= dict.fromkeys(declared, f"analysis {c.name!r}")
