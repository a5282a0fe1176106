"""The analysis job spec: which analyses, on which runs and checkpoints, with which data.

A job file (``analyses/*.toml``) is loaded into an :class:`AnalysisSpec` and validated whole,
every analysis resolved and its option table checked, so a bad job fails before any work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from observatory.analysis.builtins import BUILTINS, DEFAULT_ANALYSES
from observatory.errors import SpecError
from observatory.jobs.resolve import configure
from observatory.spec import from_table, load_toml


@dataclass(frozen=True)
class ProbeSpec:
    """The repeated-random-token probe (Olsson et al.: 25 tokens x 4 after a BOS, 10 seqs)."""

    seed: int = 1234
    n_sequences: int = 10
    block_length: int = 25
    repeats: int = 4

    def validate(self, where: str) -> None:
        for key in ("n_sequences", "block_length"):
            if getattr(self, key) < 1:
                raise SpecError(f"{where}.{key}: must be positive")
        if self.repeats < 2:
            raise SpecError(f"{where}.repeats: need at least 2 repeats")


@dataclass(frozen=True)
class HeldOutSpec:
    """Held-out sequences for the ICL score, per-token losses and ablations."""

    seed: int = 4321  # synthetic corpora: a fresh corpus from this seed; text: sample seed
    n_sequences: int = 64

    def validate(self, where: str) -> None:
        if self.n_sequences < 2:
            raise SpecError(f"{where}.n_sequences: need at least 2 sequences")


@dataclass(frozen=True)
class ExecutionSpec:
    block_size: int = 16  # checkpoints per task
    workers: int = 0  # local cluster size (0: one per core)

    def validate(self, where: str) -> None:
        if self.block_size < 1:
            raise SpecError(f"{where}.block_size: must be positive")
        if self.workers < 0:
            raise SpecError(f"{where}.workers: must be >= 0")


@dataclass(frozen=True)
class AnalysisSpec:
    """An analysis job over a family store.

    ``analyses`` names built-ins, ``"package.module:name"`` or ``"file.py:name"`` (a relative
    file is relative to the job file when loaded from one, else to the current directory);
    ``options`` maps an analysis name to its option table (the job file's ``[<name>]``).
    ``branches``: also analyse the branches of the selected runs, their own checkpoints only
    (those before a fork are the parent's, analysed with the parent).
    """

    store: str
    analyses: tuple[str, ...] = DEFAULT_ANALYSES
    sizes: tuple[str, ...] = ()  # empty: every size in the store
    seeds: tuple[int, ...] = ()  # empty: every seed
    steps: tuple[int, ...] = ()  # empty: every committed checkpoint
    every: int = 1  # take every n-th checkpoint (after `steps`)
    branches: bool = True  # also each selected run's branches, from their forks on
    probe: ProbeSpec = field(default_factory=ProbeSpec)
    held_out: HeldOutSpec = field(default_factory=HeldOutSpec)
    execution: ExecutionSpec = field(default_factory=ExecutionSpec)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        if not self.analyses:
            builtin = ", ".join(BUILTINS)
            raise SpecError(f"{where}.analyses: the list is empty (built-in: {builtin})")
        if len(set(self.analyses)) != len(self.analyses):
            raise SpecError(f"{where}.analyses: duplicate entries {list(self.analyses)}")
        if self.every < 1:
            raise SpecError(f"{where}.every: must be positive")
        if any(s < 0 for s in self.steps):
            raise SpecError(f"{where}.steps: steps must be >= 0")


def load_analysis_spec(path: str | Path) -> AnalysisSpec:
    """Load and validate an analysis job spec (``analyses/*.toml``).

    A relative ``store`` is relative to the current directory; a relative analysis file
    (``"file.py:name"``) is relative to the job file. Every analysis is resolved and its
    options validated here, so a bad job fails before any work.

    Raises
    ------
    SpecError
        With a one-line message naming the offending key.
    """
    table = load_toml(path)
    known = {f.name for f in dataclasses.fields(AnalysisSpec)} - {"options"}
    options = {k: v for k, v in table.items() if k not in known and isinstance(v, dict)}
    rest = {k: v for k, v in table.items() if k not in options}
    try:
        spec = from_table(AnalysisSpec, rest, "")
        base = Path(path).parent
        spec = dataclasses.replace(
            spec, analyses=tuple(absolute_ref(ref, base) for ref in spec.analyses), options=options
        )
        configure(spec.analyses, spec.options)
    except SpecError as err:
        raise SpecError(f"{path}: {str(err).lstrip('.: ')}") from None
    return spec


def absolute_ref(ref: str, base: Path) -> str:
    """``ref`` with a relative analysis file (``"file.py:name"``) made absolute against ``base``."""
    module, sep, name = ref.rpartition(":")
    if sep and module.endswith(".py") and not Path(module).is_absolute():
        return f"{(base / module).resolve()}:{name}"
    return ref
