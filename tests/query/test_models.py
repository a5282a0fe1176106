"""The query layer's models and batches at a step."""

from __future__ import annotations

import shutil

import pytest
import torch
import zarr
import zarr.storage

import observatory as obs
from observatory.errors import StoreError
from observatory.store import ATTRS_KEY
from tests.query.conftest import SIZE


def test_model_at_reproduces_the_trainers_logits(captured):
    store, models, batches = captured
    tokens = torch.cat([batches[(0, 3)], batches[(0, 17)]])
    for steps in (10, 24):  # an intermediate checkpoint (stop_after) and the final one
        trained = models[(0, steps)].eval()
        loaded = obs.model_at(store, size=SIZE, seed=0, step=steps)
        assert type(loaded) is type(trained) and not loaded.training
        with torch.no_grad():
            assert torch.equal(loaded(tokens).logits, trained(tokens).logits)


def test_batch_at_returns_the_batches_the_trainer_consumed(captured):
    store, _, batches = captured
    assert len(batches) == 24 + 5
    for (seed, step), tokens in batches.items():
        assert torch.equal(obs.batch_at(store, size=SIZE, seed=seed, step=step), tokens)


def test_batch_at_refuses_a_changed_corpus(captured, tmp_path):
    store, _, _ = captured
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    root = zarr.open_group(copy, mode="r+")
    attrs = dict(root.attrs[ATTRS_KEY])
    root.attrs[ATTRS_KEY] = attrs | {"data": attrs["data"] | {"fingerprint": "0123abcd"}}
    with pytest.raises(StoreError, match="fingerprint .* but the store was trained on 0123abcd"):
        obs.batch_at(copy, size=SIZE, seed=0, step=0)


def test_models_at_yields_the_same_weights_as_model_at(trained_tiny):
    from observatory.query import models_at

    _, store = trained_tiny
    tokens = torch.arange(16)[None] % 16
    steps = [4, 5, 8]
    for step, model in models_at(store, size="l2-d16", seed=1, steps=steps):
        expected = obs.model_at(store, size="l2-d16", seed=1, step=step)
        assert torch.equal(model(tokens).logits, expected(tokens).logits), step
