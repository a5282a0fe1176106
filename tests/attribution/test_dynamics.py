"""Training dynamics of a replay: norms against the stored weights, heads against their blocks,
cosines against direct ones, read back exactly, wherever the tasks run."""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest
import xarray as xr

import observatory as obs
from observatory.arguments import ArgumentError
from observatory.errors import StoreError
from observatory.models import architecture, unstack_layers
from observatory.store import DYNAMICS, FamilyStore, analyses
from observatory.train.step import clip_factor

RUN = {"size": "l2-d16", "seed": 0}


@pytest.fixture(scope="module")
def measured(trained_tiny, tmp_path_factory):
    """A copy of the tiny store with the dynamics of updates 0..5 measured (every checkpoint of
    the tiny family is a keyframe, so the span is five tasks)."""
    store = tmp_path_factory.mktemp("dynamics") / "tiny.zarr"
    shutil.copytree(trained_tiny[1], store)
    return store, obs.measure_dynamics(store, **RUN, start=0, stop=6)


def stored(store, step: int) -> dict[str, np.ndarray]:
    """The stored checkpoint's weights by the model's parameter names, as float64."""
    stacked = FamilyStore(store).run(**RUN).parameters_at(step)
    return {name: t.numpy().astype(np.float64) for name, t in unstack_layers(stacked).items()}


def test_block_norms_are_those_of_the_stored_checkpoints(measured):
    store, ds = measured
    assert sorted(ds["block"].values) == sorted(stored(store, 0))
    for step in (0, 1, 4):  # the consecutive checkpoints 0, 1, 2 and 4, 5
        before, after = stored(store, step), stored(store, step + 1)
        row = ds.sel(train_step=step)
        updates = np.array([np.linalg.norm(after[b] - before[b]) for b in ds["block"].values])
        weights = np.array([np.linalg.norm(before[b]) for b in ds["block"].values])
        np.testing.assert_allclose(row["block_update_norm"], updates, rtol=1e-12)
        np.testing.assert_allclose(row["block_weight_norm"], weights, rtol=1e-12)
        np.testing.assert_allclose(row["update_norm"], np.sqrt(np.sum(updates**2)), rtol=1e-12)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = row["block_update_norm"] / row["block_weight_norm"]
        np.testing.assert_array_equal(row["block_update_ratio"], ratio)
    # a zero-initialised bias moved from zero: an infinite ratio at step 0, finite after
    bias = ds["block_weight_norm"].sel(train_step=0) == 0
    assert bias.any() and np.isinf(ds["block_update_ratio"].sel(train_step=0)[bias]).all()
    assert np.isfinite(ds["block_update_ratio"].sel(train_step=slice(1, None))).all()


def test_one_heads_update_norm_is_that_of_its_stored_views(measured):
    store, ds = measured
    views = architecture("gpt_neox").head_blocks
    read = {v: obs.head_weights(store, **RUN, layer=1, head=0, weight=v) for v in views}
    for step in (0, 1):
        change = sum(
            np.sum((w.sel(step=step + 1).values.astype(np.float64) - w.sel(step=step).values) ** 2)
            for w in read.values()
        )
        found = ds["head_update_norm"].sel(train_step=step, layer=1, head=0)
        np.testing.assert_allclose(found, np.sqrt(change), rtol=1e-12)


def test_head_norms_square_sum_to_their_attention_blocks(measured):
    _, ds = measured
    per_head = {param for param, _, _ in architecture("gpt_neox").head_blocks.values()}
    for layer in ds["layer"].values:
        attention = ds["block_parameter"].isin(list(per_head)) & (ds["block_layer"] == layer)
        assert int(attention.sum()) == len(per_head)
        for what in ("grad", "update", "weight"):
            heads = (ds[f"head_{what}_norm"].sel(layer=layer) ** 2).sum("head")
            blocks = (ds[f"block_{what}_norm"].where(attention) ** 2).sum("block")
            np.testing.assert_allclose(heads, blocks, rtol=1e-12)


def direct_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def test_cosines_are_cosines_of_consecutive_updates(measured):
    store, ds = measured
    cosines = ds["block_update_cosine"].values
    assert np.isnan(ds["update_cosine"].sel(train_step=0)) and np.isnan(cosines[0]).all()
    known = np.concatenate([ds["update_cosine"].values[1:], cosines[1:].ravel()])
    assert np.isfinite(known).all() and (np.abs(known) <= 1).all()
    # step 1, where two tasks meet: from the stored checkpoints 0, 1, 2
    weights = [stored(store, step) for step in (0, 1, 2)]
    first, second = ({b: w1[b] - w0[b] for b in w0} for w0, w1 in itertools.pairwise(weights))
    flat = [np.concatenate([u[b].ravel() for b in u]) for u in (first, second)]
    row = ds.sel(train_step=1)
    np.testing.assert_allclose(row["update_cosine"], direct_cosine(*flat), rtol=1e-12)
    direct = [direct_cosine(first[b].ravel(), second[b].ravel()) for b in ds["block"].values]
    np.testing.assert_allclose(row["block_update_cosine"], direct, rtol=1e-12)


def test_gradient_norm_and_clip_factor_are_the_steps_own(measured):
    store, ds = measured
    recorded = FamilyStore(store).run(**RUN).metrics()["grad_norm"][:6]
    np.testing.assert_allclose(ds["grad_norm"], recorded, rtol=1e-5)
    blocks = np.sqrt((ds["block_grad_norm"] ** 2).sum("block"))
    np.testing.assert_allclose(ds["grad_norm"], blocks, rtol=1e-12)
    clip = [clip_factor(ds.attrs["grad_clip"], float(norm)) for norm in recorded]
    np.testing.assert_array_equal(ds["clip_factor"], clip)


def test_read_back_identical_and_the_same_from_any_start(measured):
    store, ds = measured
    xr.testing.assert_identical(ds, obs.dynamics(store, **RUN))
    assert ds.attrs["checked_checkpoints"] == [1, 2, 4, 5]
    # a span starting inside: its first task replays the update before it for the cosine
    inside = obs.measure_dynamics(store, **RUN, start=3, stop=6, name="inside")
    for variable in ds.data_vars:
        part = ds[variable].sel(train_step=slice(3, None)).values
        assert part.tobytes() == inside[variable].values.tobytes(), variable
    xr.testing.assert_identical(inside, obs.dynamics(store, **RUN, name="inside"))
    with pytest.raises(StoreError, match="2 training dynamics results stored"):
        obs.dynamics(store, **RUN)
    with pytest.raises(StoreError, match="no training dynamics 'nope'"):
        obs.dynamics(store, **RUN, name="nope")


def test_a_name_is_replaced_and_bad_arguments_write_nothing(tiny_store):
    with pytest.raises(StoreError, match="no training dynamics stored"):
        obs.dynamics(tiny_store, **RUN)
    obs.measure_dynamics(tiny_store, **RUN, start=2, stop=4, name="again")
    again = obs.measure_dynamics(tiny_store, **RUN, start=3, stop=5, name="again")
    xr.testing.assert_identical(again, obs.dynamics(tiny_store, **RUN, name="again"))
    for bad, error in (
        ({"start": 4, "stop": 4}, ArgumentError),
        ({"start": 1, "stop": 99}, StoreError),
        ({"start": 1, "stop": 2, "name": "a b"}, ArgumentError),
        ({"start": 1, "stop": 2, "workers": -1}, ArgumentError),
    ):
        with pytest.raises(error):
            obs.measure_dynamics(tiny_store, **RUN, **bad)
    assert analyses(FamilyStore(tiny_store).run(**RUN), kind=DYNAMICS) == ["again"]


@pytest.mark.slow
def test_results_are_identical_in_process_and_on_1_and_2_workers(tiny_store):
    def run(workers):
        return obs.measure_dynamics(tiny_store, **RUN, start=3, stop=5, workers=workers)

    here, one, two = run(0), run(1), run(2)
    for other in (one, two):
        for name in here.data_vars:
            assert here[name].values.tobytes() == other[name].values.tobytes(), name


def test_dynamics_of_branches(branch_store):
    span = RUN | {"start": 6, "stop": 9}  # the branches fork at step 7
    run = obs.measure_dynamics(branch_store, **span)
    same = obs.measure_dynamics(branch_store, **span, branch="same")
    xr.testing.assert_identical(same.drop_attrs(), run.drop_attrs())
    ablated = obs.measure_dynamics(branch_store, **span, branch="no-prev")
    moved, parent = ablated["update_norm"].values, run["update_norm"].values
    np.testing.assert_array_equal(moved[:1], parent[:1])  # step 6: before the fork
    assert not np.array_equal(moved[1:], parent[1:])
    stored = obs.dynamics(branch_store, **RUN, branch="no-prev")
    xr.testing.assert_identical(stored, ablated)
    assert stored.attrs["run"] == "l2-d16/seed0/branches/no-prev"
    with pytest.raises(StoreError, match="has no branch 'nope'"):
        obs.dynamics(branch_store, **RUN, branch="nope")
