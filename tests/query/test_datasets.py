"""The query layer's datasets: lazy xarray views of a store, its tree, coordinates and errors."""

from __future__ import annotations

import shutil

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr
import zarr.storage

import observatory as obs
from observatory.errors import StoreError
from observatory.store import ATTRS_KEY, FamilyStore, analysis_group
from observatory.store import common as store_common
from tests.query.conftest import QKV, SIZE


def spy_reads(monkeypatch) -> list[str]:
    """Record the key of every read from a zarr LocalStore."""
    keys: list[str] = []
    get, get_partial = zarr.storage.LocalStore.get, zarr.storage.LocalStore.get_partial_values

    async def spy_get(self, key, prototype=None, byte_range=None):
        keys.append(key)
        return await get(self, key, prototype, byte_range)

    async def spy_get_partial(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        keys.extend(key for key, _ in key_ranges)
        return await get_partial(self, prototype, key_ranges)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", spy_get)
    monkeypatch.setattr(zarr.storage.LocalStore, "get_partial_values", spy_get_partial)
    return keys


@pytest.mark.parametrize("chunks", [None, {}], ids=["lazily-indexed", "dask"])
def test_open_family_reads_metadata_only_and_views_are_lazy(trained_tiny, monkeypatch, chunks):
    _, store = trained_tiny
    keys = spy_reads(monkeypatch)
    ds = obs.open_family(store, size=SIZE, chunks=chunks)
    wq = ds["W_Q"].sel(layer=1, head=1).sel(step=slice(4, 16))
    # not even the coordinates: steps come from the run's schedule, tokens_seen from the steps
    assert all(key.endswith("zarr.json") for key in keys)  # metadata only, if any
    if chunks is not None:
        for name in ("W_Q", "W_O", "b_Q", "W_E", "W_U", QKV, "loss"):
            assert isinstance(ds[name].data, da.Array), name
    assert wq.dims == ("seed", "step", "d_model", "d_head")
    values = wq.values
    read = {key for key in keys if not key.endswith("zarr.json")}
    # only head 1 of layer 1, in both runs (chunk keys: step block / layer / row block / col)
    runs = tuple(f"{SIZE}/seed{seed}/{QKV}/c/" for seed in (0, 1))
    assert read and all(key.startswith(runs) for key in read)
    assert {tuple(key.split("/c/")[1].split("/")[1:3]) for key in read} == {("1", "3")}
    run = obs.open_run(store, size=SIZE, seed=1)["W_Q"][:, 1, 1].sel(step=slice(4, 16))
    np.testing.assert_array_equal(values[1], run)


@pytest.fixture
def fresh_copy(trained_tiny, tmp_path, monkeypatch):
    """A copy of the tiny store whose metadata is reused at once (it is seconds old)."""
    _, trained = trained_tiny
    store = tmp_path / "tiny.zarr"
    shutil.copytree(trained, store)
    monkeypatch.setattr(store_common, "_SETTLED_NS", 0)
    return store


def test_reopening_an_unchanged_store_reads_no_metadata_and_sees_every_change(
    fresh_copy, monkeypatch
):
    store = fresh_copy
    before = obs.open_run(store, size=SIZE, seed=0)["W_Q"].values
    keys = spy_reads(monkeypatch)
    np.testing.assert_array_equal(obs.open_run(store, size=SIZE, seed=0)["W_Q"].values, before)
    assert keys and not [key for key in keys if key.endswith("zarr.json")]  # chunks only
    # A rewritten run group (fewer checkpoints committed) is seen at the next open.
    group = zarr.open_group(store / SIZE / "seed0", mode="r+")
    group.attrs[ATTRS_KEY] = dict(group.attrs[ATTRS_KEY]) | {"committed_checkpoints": 3}
    assert obs.open_run(store, size=SIZE, seed=0).sizes["step"] == 3
    # So is a new analysis group, and damaged metadata is an error, not an old copy.
    analysis = group.require_group("analysis/extra")
    analysis.create_array("step", data=np.array([1]), dimension_names=("step",))
    analysis.create_array("extra_score", data=np.array([0.5]), dimension_names=("step",))
    assert float(obs.open_run(store, size=SIZE, seed=0)["extra_score"].sel(step=1)) == 0.5
    (store / SIZE / "seed0" / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match="metadata is damaged"):
        obs.open_run(store, size=SIZE, seed=0)


def test_reopened_datasets_are_copies_that_read_through_current_metadata(fresh_copy):
    store = fresh_copy
    ds = obs.open_run(store, size=SIZE, seed=0)
    expected = ds["W_Q"].values
    ds.attrs["family"] = "mine"
    ds["W_Q"].attrs["note"] = "mine"
    del ds["W_K"]
    again = obs.open_run(store, size=SIZE, seed=0)
    assert again.attrs["family"] == "tiny" and "note" not in again["W_Q"].attrs
    assert "W_K" in again
    tree = obs.open(store)
    tree[f"{SIZE}/seed0"].attrs["family"] = "mine"
    tree[f"{SIZE}/seed0"]["W_Q"].attrs["note"] = "mine"
    del tree[f"{SIZE}/seed0"]["W_K"]
    tree.attrs["spec"] = "mine"
    again = obs.open(store)
    assert again[f"{SIZE}/seed0"].attrs["family"] == "tiny" and again.attrs["spec"] != "mine"
    assert "W_K" in again[f"{SIZE}/seed0"] and "note" not in again[f"{SIZE}/seed0/W_Q"].attrs
    assert "W_K" in obs.open_run(store, size=SIZE, seed=0)
    # The same array rewritten with another codec (same shape): read with its new metadata.
    plain = FamilyStore(store).run(SIZE, 0).parameter_array(QKV)
    values = plain[:]
    group = zarr.open_group(store / plain.path.rpartition("/")[0], mode="r+")
    group.create_array(
        QKV,
        shape=plain.shape,
        chunks=plain.chunks,
        dtype=plain.dtype,
        compressors=zarr.codecs.BloscCodec(),
        dimension_names=plain.metadata.dimension_names,
        overwrite=True,
    )[:] = values
    np.testing.assert_array_equal(obs.open_run(store, size=SIZE, seed=0)["W_Q"].values, expected)


def test_runs_whose_results_disagree_in_shape_are_an_error_not_a_ragged_read(fresh_copy):
    for seed, rows in ((0, 3), (1, 2)):
        group = zarr.open_group(fresh_copy / SIZE / f"seed{seed}", mode="r+")
        extra = group.require_group("analysis/extra")
        extra.create_array("step", data=np.array([1]), dimension_names=("step",))
        extra.create_array("table", data=np.arange(1, rows + 1), dimension_names=("row",))
    assert obs.open_run(fresh_copy, size=SIZE, seed=1).sizes["row"] == 2
    with pytest.raises(StoreError, match="runs disagree on the dims or shape of"):
        obs.open_family(fresh_copy, size=SIZE)


def test_dims_and_coordinates(trained_tiny):
    spec, store = trained_tiny
    ds = obs.open_family(store, size=SIZE)
    run = FamilyStore(store).run(SIZE, 1)
    assert list(ds["seed"].values) == [0, 1]
    assert list(ds["init_seed"].values) == [0, 1] and list(ds["data_seed"].values) == [5, 6]
    assert list(ds["step"].values) == list(run.steps())
    assert list(ds["tokens_seen"].values) == list(run.tokens_seen())
    assert list(ds["train_step"].values) == list(range(spec.train.steps))
    # derived coordinates agree with the arrays stored for plain zarr readers
    assert np.array_equal(ds["step"].values, run.group["step"][:])
    assert np.array_equal(ds["tokens_seen"].values, run.group["tokens_seen"][:])
    assert np.array_equal(ds["train_step"].values, run.group["train_step"][:])
    assert ds["loss"].sel(seed=0).dims == ("train_step",)
    expected = {
        "W_Q": ("seed", "step", "layer", "head", "d_model", "d_head"),
        "W_O": ("seed", "step", "layer", "head", "d_head", "d_model"),
        "b_K": ("seed", "step", "layer", "head", "d_head"),
        "b_O": ("seed", "step", "layer", "d_model"),
        "W_E": ("seed", "step", "d_vocab", "d_model"),
        "W_U": ("seed", "step", "d_model", "d_vocab"),
        QKV: ("seed", "step", "layer", "d_qkv", "d_model"),
        "batch_indices": ("seed", "train_step", "batch"),
    }
    for name, dims in expected.items():
        assert ds[name].dims == dims, name
    np.testing.assert_array_equal(ds["loss"].sel(seed=1).values, run.metrics()["loss"])


def test_tree_has_family_size_seed_levels(trained_tiny):
    spec, store = trained_tiny
    tree = obs.open(store)
    assert tree.name == "tiny" and list(tree.children) == [SIZE]
    assert list(tree[SIZE].children) == ["seed0", "seed1"]
    assert tree.attrs["spec"] == spec.to_dict()
    assert tree[SIZE].attrs["size"]["n_heads"] == 2
    xr.testing.assert_identical(
        tree[f"{SIZE}/seed1"].to_dataset(), obs.open_run(store, size=SIZE, seed=1)
    )


def test_open_family_aligns_steps_of_unequal_runs(captured):
    store, _, _ = captured
    ds = obs.open_family(store, size=SIZE)
    full, partial = (FamilyStore(store).run(SIZE, seed) for seed in (0, 1))
    assert partial.n_checkpoints == 5 and not partial.complete
    assert list(ds["step"].values) == list(full.steps())
    short = obs.open_run(store, size=SIZE, seed=1)
    assert list(short["step"].values) == [0, 1, 2, 4, 5]
    wq = ds["W_Q"].sel(layer=0, head=1)
    np.testing.assert_array_equal(wq.sel(seed=1, step=short["step"]), short["W_Q"][:, 0, 1])
    assert wq.sel(seed=1, step=slice(8, None)).isnull().all()
    np.testing.assert_array_equal(
        wq.sel(seed=0), obs.open_run(store, size=SIZE, seed=0)["W_Q"][:, 0, 1]
    )
    assert ds["loss"].sel(seed=1).notnull().sum() == 5
    # integers of a run with gaps become floats with NaN, as xarray's outer join makes them
    batches = ds["batch_indices"]
    assert (
        batches.dtype == np.float64
        and batches.sel(seed=1, train_step=slice(5, None)).isnull().all()
    )
    full_batches = obs.open_run(store, size=SIZE, seed=0)["batch_indices"].values
    np.testing.assert_array_equal(batches.sel(seed=0).values, full_batches)
    assert list(ds["tokens_seen"].values) == list(full.tokens_seen())


def test_only_committed_checkpoints_are_visible(uncommitted):
    ds = obs.open_run(uncommitted, size=SIZE, seed=0)
    assert list(ds["step"].values) == [0, 1, 2, 4, 5, 8]
    assert ds.sizes["train_step"] == 9 and ds["loss"].shape == (9,)
    assert ds["W_Q"].shape[0] == ds[QKV].shape[0] == 6
    assert obs.head_weights(uncommitted, size=SIZE, seed=0, layer=0, head=0).sizes["step"] == 6
    family = obs.open_family(uncommitted, size=SIZE)
    assert family["W_Q"].sel(seed=0, step=10).isnull().all()
    with pytest.raises(
        StoreError, match=r"no committed checkpoint at step 10 \(nearest: 8; 6 committed"
    ):
        obs.model_at(uncommitted, size=SIZE, seed=0, step=10)
    with pytest.raises(StoreError, match=r"recorded steps: 0\.\.8"):
        obs.batch_at(uncommitted, size=SIZE, seed=0, step=9)


def test_unknown_names_raise_one_line_errors_listing_what_exists(trained_tiny, tmp_path):
    _, store = trained_tiny
    cases = [
        (lambda: obs.open_run(store, size="l9", seed=0), r"no size 'l9' \(sizes: l2-d16\)"),
        (lambda: obs.open_family(store, size="l9"), r"no size 'l9' \(sizes: l2-d16\)"),
        (lambda: obs.open_family(store, size=SIZE, seeds=[0, 4]), r"no seed 4 .* \[0, 1\]"),
        (lambda: obs.model_at(store, size=SIZE, seed=3, step=0), r"seeds: \[0, 1\]"),
        (lambda: obs.model_at(store, size=SIZE, seed=0, step=25), r"0, 1, 2, 4, 5, 8, \.\.\., 24"),
        (lambda: obs.batch_at(store, size=SIZE, seed=0, step=24), r"recorded steps: 0\.\.23"),
        (lambda: obs.head_weights(store, size=SIZE, seed=0, layer=2, head=0), r"layers: 0\.\.1"),
        (
            lambda: obs.head_weights(store, size=SIZE, seed=0, layer=0, head=0, weight="W_X"),
            "per-head weights: W_Q, W_K, W_V, b_Q",
        ),
        (lambda: obs.open(tmp_path / "missing.zarr"), "no such store"),
        (lambda: obs.open(tmp_path), "not a zarr store"),
    ]
    zarr.open_group(tmp_path / "plain.zarr", mode="w")
    cases.append((lambda: obs.open(tmp_path / "plain.zarr"), "not an observatory store"))
    for call, message in cases:
        with pytest.raises(StoreError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


def test_analysis_groups_are_merged_on_the_step_axis(trained_tiny, tmp_path):
    _, source = trained_tiny
    store = tmp_path / "tiny.zarr"
    shutil.copytree(source, store)
    run = FamilyStore(store, mode="r+").run(SIZE, 0)
    heads = analysis_group(run, "heads", create=True)
    scores = np.arange(4 * 2 * 2, dtype=np.float32).reshape(4, 2, 2)
    heads.create_array("induction_score", data=scores, dimension_names=("step", "layer", "head"))
    heads.create_array(
        "probe_tokens",
        data=np.ones((3, 5), np.int64),
        dimension_names=("probe_sequence", "probe_position"),
    )
    # rows in any order; the 4th row is not listed in `step` yet (still being written)
    heads.create_array("step", data=np.array([24, 0, 8]), dimension_names=("step",))
    icl = analysis_group(run, "icl", create=True)
    icl.create_array("icl_score", data=np.array([0.5, 0.25]), dimension_names=("step",))
    icl.create_array("step", data=np.array([1, 2]), dimension_names=("step",))

    ds = obs.open_run(store, size=SIZE, seed=0)
    score = ds["induction_score"]
    assert score.dims == ("step", "layer", "head") and score.attrs["analysis"] == "heads"
    np.testing.assert_array_equal(score.sel(step=[24, 0, 8]), scores[:3])
    assert score.drop_sel(step=[24, 0, 8]).isnull().all()
    assert ds["probe_tokens"].dims == ("probe_sequence", "probe_position")
    assert list(ds["icl_score"].sel(step=[0, 1, 2]).values[1:]) == [0.5, 0.25]

    family = obs.open_family(store, size=SIZE)
    assert family["induction_score"].dims == ("seed", "step", "layer", "head")
    assert family["induction_score"].sel(seed=1).isnull().all()  # seed 1 has no analyses
    np.testing.assert_array_equal(family["induction_score"].sel(seed=0, step=8), scores[2])


def test_branches_are_read_like_runs_and_stack_beside_their_parents(trained_tiny, tmp_path):
    from observatory.train import Intervention, train_branch

    spec, original = trained_tiny
    store = tmp_path / "tiny.zarr"
    shutil.copytree(original, store)
    ablate = Intervention(ablate_heads=((1, 0),))
    train_branch(
        spec, store=store, size=SIZE, seed=1, at=10, name="abl", intervention=ablate, progress=False
    )
    run, branch = (
        obs.open_run(store, size=SIZE, seed=1),
        obs.open_run(store, size=SIZE, seed=1, branch="abl"),
    )
    assert branch["branch"].item() == "abl" and branch["fork"].item() == 10
    assert list(branch.step.values) == list(run.step.values)
    before, after = branch.sel(step=slice(0, 10)), branch.sel(step=slice(15, None))
    losses = branch["loss"].values, run["loss"].values
    assert losses[0][:10].tobytes() == losses[1][:10].tobytes()
    assert not np.array_equal(losses[0][10:], losses[1][10:])
    assert (before[QKV].values == run.sel(step=slice(0, 10))[QKV].values).all()
    assert not (after[QKV].values == run.sel(step=slice(15, None))[QKV].values).all()
    ds = obs.open_family(store, size=SIZE, branches=True)
    assert ds.sizes["run"] == 3 and list(ds["fork"].values) == [-1, -1, 10]
    mains = ds.sel(branch="")
    assert list(mains.seed.values) == [0, 1]
    stacked = ds.sel(seed=1, branch="abl")[QKV].values
    assert stacked.tobytes() == branch[QKV].values.tobytes()
    with pytest.raises(StoreError, match="has no branch 'nope' \\(branches: abl\\)"):
        obs.open_run(store, size=SIZE, seed=1, branch="nope")
