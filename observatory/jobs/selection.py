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
) -> list[RunReader]:
    """Readers of the store's runs of the given sizes and seed indices, in store order.

    Parameters
    ----------
    family
        The store.
    sizes, seeds
        Size names and seed indices (default: all in the store).

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
    return [family.run(r.size, r.seed) for r in selected if seeds is None or r.seed in seeds]
