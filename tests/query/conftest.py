"""Fixtures of the query tests: a store trained while capturing the trainer's models and
batches, and a copy with data past its commit markers."""

from __future__ import annotations

import shutil

import pytest
import zarr
import zarr.storage

from observatory import train as trainer
from observatory.store import ATTRS_KEY

SIZE = "l2-d16"


QKV = "gpt_neox.layers.attention.query_key_value.weight"


D_HEAD = 8  # tiny spec: d_model 16, 2 heads


@pytest.fixture(scope="module")
def captured(trained_tiny, tmp_path_factory):
    """A store trained while capturing the trainer's models and batches.

    Seed 0 stops after 10 steps (a checkpoint) and is resumed to the end; seed 1 stops after
    5 steps and stays unfinished.  Returns the store, ``{(seed, steps trained): model}`` and
    ``{(seed, step): tokens}``.
    """
    spec, _ = trained_tiny
    store = tmp_path_factory.mktemp("captured") / "tiny.zarr"
    models, built, batches = {}, [], {}
    from observatory.train import family, loop  # where train_family and train_run look them up

    build = loop.build_model

    def capture_build(spec, size, *, init_seed):
        model = build(spec, size, init_seed=init_seed)
        built.append(model)
        return model

    def capture_run(spec, run, *args, **kwargs):
        def record(step, tokens):
            batches[(run.seed, step)] = tokens.clone()

        train_run(spec, run, *args, on_batch=record, **kwargs)

    train_run = trainer.train_run
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "build_model", capture_build)
        patch.setattr(family, "train_run", capture_run)
        for seed, stop_after, resume in ((0, 10, False), (0, None, True), (1, 5, False)):
            trainer.train_family(
                spec,
                store=store,
                seeds=[seed],
                progress=False,
                stop_after=stop_after,
                resume=resume,
            )
            steps = max(s for (k, s) in batches if k == seed) + 1
            models[(seed, steps)] = built[-1]
    return store, models, batches


@pytest.fixture
def uncommitted(trained_tiny, tmp_path):
    """A copy of the tiny store whose seed 0 has data past its commit markers (6 of 11
    checkpoints and 9 of 24 steps committed), as a crash in the middle of a commit leaves it."""
    _, store = trained_tiny
    copy = tmp_path / "tiny.zarr"
    shutil.copytree(store, copy)
    group = zarr.open_group(copy / SIZE / "seed0", mode="r+")
    group.attrs[ATTRS_KEY] = dict(group.attrs[ATTRS_KEY]) | {
        "committed_checkpoints": 6,
        "committed_steps": 9,
        "complete": False,
    }
    return copy
