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
