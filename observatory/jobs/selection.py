"""Which runs of a store a command works on: the one selection by sizes and seeds."""

from __future__ import annotations

from collections.abc import Collection

from observatory.errors import StoreError
from observatory.store import FamilyStore, RunReader


def select_readers(
    family: FamilyStore,
    *,
    sizes: Collection[str] | None = None,
    seeds: Collection[int] | None = None,
    branches: bool = False,
) -> list[RunReader]:
    """Readers of the store's runs of the given sizes and seed indices, in store order.

    Parameters
    ----------
    family
        The store.
    sizes, seeds
        Size names and seed indices (default: all in the store).
    branches
        Also the branches of each selected run, after it (see :func:`with_branches`).

    Raises
    ------
    StoreError
        Naming a size the store lacks (with the sizes it has), or a seed that no selected size
        has (with the seeds they have).
    """
    for size in sizes or []:
        family.size_runs(size)  # a clear error listing the sizes
    selected = [run for run in family.runs() if sizes is None or run.size in sizes]
    for seed in seeds or []:
        if not any(run.seed == seed for run in selected):
            there = sorted({run.seed for run in selected})
            raise StoreError(f"{family.path}: no seed {seed} (seeds: {there})")
    readers = [family.run(r.size, r.seed) for r in selected if seeds is None or r.seed in seeds]
    return with_branches(readers) if branches else readers


def with_branches(readers: Collection[RunReader]) -> list[RunReader]:
    """Each run's reader followed by the readers of its branches, at every depth (in name
    order, a branch's branches after it)."""
    return [
        found
        for reader in readers
        for found in [
            reader,
            *(
                reader.family.run(reader.run.size, reader.run.seed, name)
                for name in reader.family.branches(reader.run.size, reader.run.seed)
            ),
        ]
    ]
