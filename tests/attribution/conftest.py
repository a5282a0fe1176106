"""A private copy of the trained tiny family: attribution writes into its store."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture
def tiny_store(trained_tiny, tmp_path):
    """The trained tiny family's store, copied (the session's one is shared read-only)."""
    _, store = trained_tiny
    copy = tmp_path / "tiny.zarr"
    shutil.copytree(store, copy)
    return copy


@pytest.fixture
def branch_store(analysed_branches, tmp_path):
    """The store of the tiny family's seed 0 with its branches (``same``: no intervention,
    ``no-prev``: head L0H1 ablated, both forked at step 7; ``no-prev/same``), copied."""
    store, _ = analysed_branches
    copy = tmp_path / "branches.zarr"
    shutil.copytree(store, copy)
    return copy
