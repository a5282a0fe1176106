"""The query layer: lazy xarray views, per-head weights, models and batches at a step."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr
import zarr
import zarr.storage

import observatory as obs
from observatory import train as trainer
from observatory.cli import main
from observatory.errors import StoreError
from observatory.store import ATTRS_KEY, FamilyStore, analysis_group
from observatory.store import common as store_common

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
    with pytest.raises(StoreError, match=r"no committed checkpoint at step 10 \(6 committed"):
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


def test_plain_xarray_opens_the_store_without_observatory(trained_tiny):
    _, store = trained_tiny
    script = f"""
import json, sys
import xarray as xr
tree = xr.open_datatree({str(store)!r}, engine="zarr", consolidated=False)
run = tree["{SIZE}/seed0"].to_dataset()
ds = xr.open_zarr({str(store)!r}, group="{SIZE}/seed1", consolidated=False)
print(json.dumps({{
    "qkv": list(run["{QKV}"].dims),
    "loss": list(ds["loss"].dims),
    "coords": sorted(run.coords),
    "steps": run["step"].values.tolist(),
    "moments": list(tree["{SIZE}/seed0/state/exp_avg"].to_dataset()["{QKV}"].dims),
    "imported": "observatory" in sys.modules,
}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    found = json.loads(out)
    assert found["qkv"] == ["step", "layer", "d_qkv", "d_model"]
    assert found["loss"] == ["train_step"]
    assert found["coords"] == ["step", "tokens_seen", "train_step"]
    assert found["steps"] == FamilyStore(store).run(SIZE, 0).steps().tolist()
    assert found["moments"] == ["keyframe", "layer", "d_qkv", "d_model"]
    assert not found["imported"]


def test_inspect_prints_runs_checkpoints_tokens_and_disk(uncommitted, capsys):
    assert main(["inspect", str(uncommitted)]) == 0
    out = capsys.readouterr().out
    assert "family 'tiny'" in out and "2 runs" in out and "MB on disk" in out
    seed0, seed1 = (line.split() for line in out.splitlines() if "seed" in line)
    assert seed0[:5] == ["seed0", "0", "5", "incomplete", "6/11"]
    assert seed1[:5] == ["seed1", "1", "6", "complete", "11/11"]
    assert "1,536" in seed1 and "512" in seed0 and "kB" in seed1


def test_inspect_missing_store_exits_2_with_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope.zarr")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("observatory: error: ") and "no such store" in err
    assert err.count("\n") == 1


def test_models_at_yields_the_same_weights_as_model_at(trained_tiny):
    from observatory.query import models_at

    _, store = trained_tiny
    tokens = torch.arange(16)[None] % 16
    steps = [4, 5, 8]
    for step, model in models_at(store, size="l2-d16", seed=1, steps=steps):
        expected = obs.model_at(store, size="l2-d16", seed=1, step=step)
        assert torch.equal(model(tokens).logits, expected(tokens).logits), step


def read_committed(store, group):
    """The README's recipe for reading a run with plain xarray while it trains: chunk files
    are replaced whole, so a read needs no retry."""
    run = xr.open_zarr(store, group=group, consolidated=False)
    marks = run.attrs["observatory"]
    return run.isel(
        step=slice(0, marks["committed_checkpoints"]),
        train_step=slice(0, marks["committed_steps"]),
    ).load()


def test_plain_xarray_polling_a_training_run_sees_only_whole_checkpoints(tmp_path):
    """The README's plain-xarray recipe works while a run trains: arrays never change length."""
    from observatory.spec import load_run_spec
    from tests.conftest import TINY_TOML, write_spec

    text = TINY_TOML.replace("steps = 24", "steps = 150").replace("every = 5", "every = 3")
    spec_path = write_spec(tmp_path, text.replace("init = [0, 1]\ndata = [5, 6]", "init = [0]"))
    schedule = list(load_run_spec(spec_path).checkpoints.steps(150))
    store = tmp_path / "s.zarr"
    command = [sys.executable, "-m", "observatory.cli", "train", str(spec_path)]
    proc = subprocess.Popen(
        [*command, "--store", str(store), "--no-progress"], stdout=subprocess.DEVNULL
    )
    seen = []
    try:
        finished = False
        while not finished:
            finished = proc.poll() is not None  # then one last read sees the whole run
            group = store / SIZE / "seed0" / "zarr.json"
            if not group.exists() or ATTRS_KEY not in json.loads(group.read_text())["attributes"]:
                continue  # the run is being created: its attributes are written last
            run = read_committed(store, f"{SIZE}/seed0")
            n = len(run["step"])
            assert run["step"].values.tolist() == schedule[:n]
            for name in (QKV, "lm_head.weight"):  # chunked per head, and one chunk per file
                values = np.abs(run[name].values)
                rows = values.max(axis=tuple(range(1, values.ndim)))
                assert np.all(rows > 0), "a checkpoint read as zeros"
            assert np.all(run["loss"].values > 0)
            seen.append(n)
    finally:
        assert proc.wait() == 0
    assert len(set(seen)) > 2 and seen[-1] == len(schedule), seen
