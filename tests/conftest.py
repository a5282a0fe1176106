"""Shared fixtures: a tiny model family that trains in seconds on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

import pytest

from observatory.spec import RunSpec, load_run_spec

TINY_TOML = """\
name = "tiny"

[model]
architecture = "gpt_neox"
vocab_size = 16

[[model.sizes]]
name = "l2-d16"
n_layers = 2
d_model = 16
n_heads = 2
n_positions = 16

[data]
source = "induction"
seed = 3
n_sequences = 64
period_min = 2
period_max = 6

[seeds]
init = [0, 1]
data = [5, 6]

[train]
steps = 24
batch_size = 4
context = 16

[optimizer]
lr = 3e-3
warmup_steps = 2

[checkpoints]
log_spaced = true
every = 5

[store]
checkpoints_per_shard = 4
commit_seconds = 0.0
"""


def write_spec(directory: Path, text: str = TINY_TOML, name: str = "tiny.toml") -> Path:
    """Write a spec file and return its path."""
    path = directory / name
    path.write_text(text)
    return path


@pytest.fixture
def tiny_spec_path(tmp_path: Path) -> Path:
    return write_spec(tmp_path)


@pytest.fixture
def tiny_spec(tiny_spec_path: Path) -> RunSpec:
    return load_run_spec(tiny_spec_path)


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory) -> tuple[RunSpec, Path]:
    """A fully trained tiny family (2 seeds), shared read-only by tests of the readers."""
    from observatory.trainer import train_family

    directory = tmp_path_factory.mktemp("trained")
    spec = load_run_spec(write_spec(directory))
    store = train_family(spec, store=directory / "tiny.zarr", progress=False)
    return spec, store


@pytest.fixture(scope="session")
def trained_tiny_attn_only(tmp_path_factory) -> tuple[RunSpec, Path]:
    """The tiny family with the attention-only architecture, trained (2 seeds)."""
    from observatory.trainer import train_family

    directory = tmp_path_factory.mktemp("trained_attn_only")
    text = TINY_TOML.replace('architecture = "gpt_neox"', 'architecture = "attn_only"')
    spec = load_run_spec(write_spec(directory, text))
    store = train_family(spec, store=directory / "tiny.zarr", progress=False)
    return spec, store
