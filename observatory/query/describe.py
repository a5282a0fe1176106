"""A human-readable summary of a store, as ``observatory inspect`` prints it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from observatory.store import (
    ANALYSIS,
    ATTRIBUTION,
    DYNAMICS,
    FamilyStore,
    RunReader,
    analyses,
    ingested_note,
)

# What a run's line lists of its stored results, by kind.
RESULT_KINDS = (("analyses", ANALYSIS), ("attributions", ATTRIBUTION), ("dynamics", DYNAMICS))


def describe(path: str | Path) -> str:
    """A human-readable summary of a store: runs, seeds, checkpoints, tokens seen, disk use.

    Parameters
    ----------
    path
        The family store.

    Returns
    -------
    str
        Several lines: the family and its corpus, then one line per run with its seeds,
        status, committed checkpoints and their steps, tokens seen at the last checkpoint,
        bytes on disk and stored results (analyses, attributions, dynamics).  This is what
        ``observatory inspect`` prints.

    Raises
    ------
    StoreError
        If the store is missing or is not an observatory store.
    """
    family = FamilyStore(path)
    spec, data = family.spec, family.attrs["data"]
    runs = family.runs()
    corpus = (
        f"corpus: {spec.data.source}, {data.get('n_sequences', '?')} sequences of "
        f"{spec.train.context} tokens, fingerprint {data['fingerprint']}; "
        f"{spec.train.steps} steps of {spec.train.batch_size} sequences per run"
    )
    if data.get("ingested"):
        corpus = (
            "ingested checkpoints: no training corpus or data order recorded; analyses use "
            f"fresh synthetic sequences of {spec.train.context} tokens"
        )
    lines = [
        f"{family.path}: family {spec.name!r} ({spec.model.architecture}, vocab "
        f"{spec.model.vocab_size}), {len(runs)} run{'s' * (len(runs) != 1)}, "
        f"{_human_bytes(family.disk_bytes())} on disk",
        corpus,
    ]
    header = ("run", "init", "data", "status", "checkpoints", "steps", "tokens seen", "disk", "")
    origins = []
    for size_name in family.sizes():
        size = spec.size(size_name)
        lines.append(
            f"{size_name}: {size.n_layers} layers, d_model {size.d_model}, {size.n_heads} heads"
        )
        rows = [header]
        for reader in (RunReader(family, run) for run in runs if run.size == size_name):
            rows.append(_row(family, reader, reader.run.path.rpartition("/")[2]))
            for name in family.branches(reader.run.size, reader.run.seed):
                branch = family.run(reader.run.size, reader.run.seed, name)
                rows.append(_row(family, branch, f"{rows[-1][0].partition('/')[0]}/{name}"))
            if reader.origin is not None:
                origins.append(f"{reader.run.path}: {ingested_note(reader.attrs)}")
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines.extend(
            "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in rows
        )
    return "\n".join(lines + origins)


def _row(family: FamilyStore, reader: RunReader, label: str) -> tuple[str, ...]:
    """The line of a run (or branch: its fork and intervention last) in the table."""
    steps, tokens = reader.steps(), reader.tokens_seen()
    notes = [
        f"{title}: {', '.join(names)}"
        for title, kind in RESULT_KINDS
        if (names := analyses(reader, kind=kind))
    ]
    if reader.branch is not None:
        changed = {
            key: value
            for key, value in reader.branch["intervention"].items()
            if value not in (None, [], "zero") and not key.endswith("sha256")
        }
        changes = "; ".join(
            f"{key} {len(value)} windows" if key == "drop_windows" else f"{key} {value}"
            for key, value in changed.items()
        )
        notes.insert(0, f"branch at step {reader.branch['fork']}: {changes or 'no intervention'}")
    return (
        label,
        str(reader.run.init_seed),
        str(reader.run.data_seed),
        _status(reader),
        f"{reader.n_checkpoints}/{len(reader.attrs['schedule'])}",
        _summarize(steps),
        f"{int(tokens[-1]):,}" if len(tokens) else "0",
        _human_bytes(family.disk_bytes(reader.run.path)),
        "; ".join(notes),
    )


def _status(reader: RunReader) -> str:
    if reader.origin is not None:
        return "ingested"
    return "complete" if reader.complete else "incomplete"


def _summarize(steps: np.ndarray, head: int = 5) -> str:
    shown = [str(int(s)) for s in steps[:head]]
    if len(steps) > head + 1:
        shown.append("...")
    if len(steps) > head:
        shown.append(str(int(steps[-1])))
    return ", ".join(shown) or "none"


def _human_bytes(n: float) -> str:
    units = ["B", "kB", "MB", "GB", "TB"]
    while n >= 1000 and len(units) > 1:
        n /= 1000
        units.pop(0)
    return f"{n:.1f} {units[0]}"
