"""The query layer's per-head views of the fused weights."""

from __future__ import annotations

import numpy as np
import xarray as xr

import observatory as obs
from observatory.store import FamilyStore
from tests.query.conftest import D_HEAD, QKV, SIZE


def test_per_head_views_slice_the_fused_qkv_weight(trained_tiny):
    _, store = trained_tiny
    ds = obs.open_run(store, size=SIZE, seed=1)
    qkv = FamilyStore(store).run(SIZE, 1).parameter_array(QKV)[:]
    for layer in range(2):
        for head in range(2):
            for part, name in enumerate(("W_Q", "W_K", "W_V")):
                # GPT-NeoX fused rows: [head, (q, k, v), d_head]; W_* is [d_model, d_head]
                start = (3 * head + part) * D_HEAD
                by_hand = qkv[:, layer, start : start + D_HEAD, :].transpose(0, 2, 1)
                view = ds[name].sel(layer=layer, head=head)
                np.testing.assert_array_equal(view.values, by_hand)
                direct = obs.head_weights(
                    store, size=SIZE, seed=1, layer=layer, head=head, weight=name
                )
                xr.testing.assert_identical(direct, view.compute())
    for name in ("W_O", "b_Q", "b_K", "b_V"):
        xr.testing.assert_identical(
            obs.head_weights(store, size=SIZE, seed=1, layer=1, head=0, weight=name),
            ds[name].sel(layer=1, head=0).compute(),
        )
