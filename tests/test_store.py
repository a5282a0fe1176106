import dataclasses
import math
import re
import shutil
import time

import numpy as np
import pytest
import xarray as xr
import zarr

from observatory.errors import StoreError
from observatory.spec import StoreSpec
from observatory.store import (
    ATTRS_KEY,
    MOMENTS,
    SCHEMA_VERSION,
    AnalysisWriter,
    Checkpoint,
    FamilyStore,
    RunWriter,
    StepRecord,
    analysis_arrays,
    create_family,
)
from observatory.store import layout as store_layout
from observatory.store import lock as store_lock
from observatory.store import paths as store_paths
from observatory.store import results as store_results
from observatory.store import writer as store_writer


def make_writer(spec, path, **store):
    spec = dataclasses.replace(spec, store=StoreSpec(**store))
    root = create_family(path, spec, data={"fingerprint": "abc"})
    shapes = {
        "gpt_neox.layers.attention.query_key_value.weight": (2, 12, 4),
        "lm_head.weight": (5, 4),
    }
    writer = RunWriter(
        root,
        spec.runs()[0],
        spec,
        param_shapes=shapes,
        d_head=2,
        schedule=(0, 1, 2, 3, 4),
        rng_bytes=3,
        data_order_fingerprint="f",
    )
    return writer, shapes


def checkpoint(step, shapes):
    params = {k: np.full(s, step, dtype=np.float32) for k, s in shapes.items()}
    moments = {m: params for m in ("exp_avg", "exp_avg_sq")}
    return Checkpoint(step, step * 10, params, moments, np.full(3, step, dtype=np.uint8))


def record(step):
    return StepRecord(step, 1.0, 0.1, 0.5, (step + 1) * 10, np.arange(4) + step)


def test_large_blocks_are_chunked_and_written_a_chunk_width_at_a_time(
    tiny_spec, tmp_path, monkeypatch
):
    # Blocks over WRITE_PIECE are split along their first dim (layer, or rows), so a commit
    # never hands zarr (which encodes a write's chunks all at once) more than that.
    monkeypatch.setattr(store_layout, "WRITE_PIECE", 100)
    written = []
    setitem = zarr.Array.__setitem__

    def spy(array, selection, value):
        width = math.prod(array.chunks[:2]) * math.prod(array.shape[2:]) * 4  # bytes
        written.append((array.path, np.asarray(value).nbytes, width))
        setitem(array, selection, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", spy)
    writer, shapes = make_writer(
        tiny_spec, tmp_path / "s.zarr", checkpoints_per_chunk=4, commit_seconds=0
    )
    rng = np.random.default_rng(0)
    saved = [
        {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(5)
    ]
    writer.start()
    for step, params in enumerate(saved):
        moments = {m: params for m in MOMENTS}
        writer.put_checkpoint(Checkpoint(step, step, params, moments, np.zeros(3, np.uint8)))
    writer.close(complete=True)
    run = tmp_path / "s.zarr/l2-d16/seed0"
    # lm_head [5, 4]: 3 checkpoints x 2 rows x 4 x 4 bytes = 96 <= 100; moments per layer
    assert zarr.open_array(run / "lm_head.weight").chunks == (3, 2, 4)
    qkv_moment = run / "state/exp_avg/gpt_neox.layers.attention.query_key_value.weight"
    assert zarr.open_array(qkv_moment).chunks == (3, 1, 12, 4)
    params = [(path, n, width) for path, n, width in written if "weight" in path]
    assert len(params) > 6 and all(n <= width for _, n, width in params)
    reader = FamilyStore(tmp_path / "s.zarr").run("l2-d16", 0)
    for step, expected in enumerate(saved):
        got = reader.parameters_at(step)
        assert all(np.array_equal(got[k], v) for k, v in expected.items())
    last = writer.last_keyframe()  # the moments, written per layer
    assert last.step == 4
    assert all(np.array_equal(last.moments["exp_avg_sq"][k], v) for k, v in saved[4].items())


def test_commits_write_whole_chunks_and_a_resumed_writer_keeps_its_chunk(
    tiny_spec, tmp_path, monkeypatch
):
    # commit_seconds=0 commits every checkpoint: each commit rewrites its chunk whole, so zarr
    # never reads a chunk back to merge new rows into it; a writer reopened in mid-chunk
    # starts from the committed rows of that chunk.
    reads = []
    get = zarr.storage.LocalStore.get

    async def spy(store, key, *args, **kwargs):
        reads.append(key)
        return await get(store, key, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "get", spy)
    path = tmp_path / "s.zarr"
    writer, shapes = make_writer(tiny_spec, path, checkpoints_per_chunk=4, commit_seconds=0)
    writer.start()
    for step in range(4):  # chunks of 3 checkpoints: the second chunk is left with one row
        writer.put_checkpoint(checkpoint(step, shapes))
    writer.close(complete=False)
    assert writer.committed == (4, 0)
    assert not [key for key in reads if ".weight/c/" in key]
    resumed = RunWriter(
        zarr.open_group(path),
        writer.run,
        dataclasses.replace(tiny_spec, store=StoreSpec(checkpoints_per_chunk=4)),
        param_shapes=shapes,
        d_head=2,
        schedule=(0, 1, 2, 3, 4),
        rng_bytes=3,
        data_order_fingerprint="f",
    )
    resumed.start()
    resumed.put_checkpoint(checkpoint(4, shapes))
    resumed.close(complete=True)
    reader = FamilyStore(path).run("l2-d16", 0)
    assert list(reader.steps()) == [0, 1, 2, 3, 4]
    for step in range(5):
        assert all(np.all(a == step) for a in reader.parameters_at(step).values())
    assert np.all(resumed.last_keyframe().moments["exp_avg"]["lm_head.weight"] == 4)


def test_buffered_checkpoints_stay_invisible_until_committed(tiny_spec, tmp_path):
    writer, shapes = make_writer(
        tiny_spec, tmp_path / "s.zarr", checkpoints_per_chunk=4, commit_seconds=1e9
    )
    writer.start()
    for step in range(3):
        writer.put_checkpoint(checkpoint(step, shapes))
        writer.put_step(record(step))
    reader = FamilyStore(tmp_path / "s.zarr").run("l2-d16", 0)
    assert reader.n_checkpoints == 0 and len(reader.steps()) == 0
    writer.put_checkpoint(checkpoint(3, shapes))  # fills a chunk: committed as a whole
    writer.close(complete=False)
    reader = FamilyStore(tmp_path / "s.zarr").run("l2-d16", 0)
    assert list(reader.steps()) == [0, 1, 2, 3] and reader.n_steps == 3
    assert np.all(reader.parameters_at(2)["lm_head.weight"] == 2)
    assert list(reader.batch_indices(1)) == [1, 2, 3, 4]


def test_arrays_are_chunked_by_checkpoint_and_per_head(tiny_spec, tmp_path):
    writer, shapes = make_writer(
        tiny_spec, tmp_path / "s.zarr", checkpoints_per_chunk=4, commit_seconds=0
    )
    writer.start()
    for step in range(5):
        writer.put_checkpoint(checkpoint(step, shapes))
    writer.close(complete=True)
    path = tmp_path / "s.zarr/l2-d16/seed0/gpt_neox.layers.attention.query_key_value.weight"
    qkv = zarr.open_array(path)
    assert qkv.shape == (5, 2, 12, 4)  # created at the schedule's length
    assert qkv.shards is None  # plain chunk files: one request reads one head's block
    # 5 checkpoints in blocks of 3 (not 4 and 1: a last block is stored at full size), one
    # layer, one d_head block of rows
    assert qkv.chunks == (3, 1, 2, 4)
    assert qkv.metadata.dimension_names == ("step", "layer", "d_qkv", "d_model")
    assert [type(c).__name__ for c in qkv.compressors] == ["Crc32cCodec"]  # weights: no Blosc
    mlp = zarr.open_array(tmp_path / "s.zarr/l2-d16/seed0/lm_head.weight")
    assert mlp.shards is None and mlp.chunks == (3, 5, 4)  # no per-head dim: one plain chunk
    moment = zarr.open_array(
        tmp_path / "s.zarr/l2-d16/seed0/state/exp_avg/gpt_neox.layers.attention.query_key_value"
        ".weight"
    )
    assert moment.chunks == (3, 2, 12, 4)  # read whole, by resume and replay only
    assert [type(c).__name__ for c in moment.compressors] == ["BloscCodec", "Crc32cCodec"]
    # 5 checkpoints -> 2 blocks of checkpoints x 2 layers x 6 row blocks
    assert len(list(path.rglob("c/*/*/*/*"))) == 2 * 2 * 6


def test_a_crash_mid_commit_exposes_nothing_and_resume_truncates(tiny_spec, tmp_path):
    writer, shapes = make_writer(tiny_spec, tmp_path / "s.zarr", commit_seconds=0)
    writer.start()
    writer.put_checkpoint(checkpoint(0, shapes))
    writer.close(complete=False)
    # Simulate a crash after an array was extended but before the marker moved.
    array = zarr.open_array(tmp_path / "s.zarr/l2-d16/seed0/lm_head.weight", mode="r+")
    array.resize((2, 5, 4))
    array[1] = 99.0
    reader = FamilyStore(tmp_path / "s.zarr").run("l2-d16", 0)
    assert reader.n_checkpoints == 1 and list(reader.steps()) == [0]
    with pytest.raises(StoreError, match="no committed checkpoint at step 1"):
        reader.parameters_at(1)
    writer, _ = make_writer(tiny_spec, tmp_path / "s.zarr", commit_seconds=0)
    writer.truncate(*writer.committed)
    assert writer.committed == (1, 0)
    writer.start()  # the resumed run overwrites what the crash left
    writer.put_checkpoint(checkpoint(1, shapes))
    writer.close(complete=False)
    assert np.all(
        FamilyStore(tmp_path / "s.zarr").run("l2-d16", 0).parameters_at(1)["lm_head.weight"] == 1
    )


def test_opening_something_else_is_a_clear_error(tiny_spec, tmp_path):
    with pytest.raises(StoreError, match="no such store"):
        FamilyStore(tmp_path / "missing.zarr")
    zarr.open_group(tmp_path / "plain.zarr", mode="w")
    with pytest.raises(StoreError, match="not an observatory store"):
        FamilyStore(tmp_path / "plain.zarr")
    (tmp_path / "file.zarr").write_text("hello")
    with pytest.raises(StoreError):
        FamilyStore(tmp_path / "file.zarr")


def test_a_store_with_runs_refuses_a_different_spec(trained_tiny, tmp_path):
    spec, trained = trained_tiny
    store = tmp_path / "s.zarr"
    shutil.copytree(trained, store)
    data = FamilyStore(store).attrs["data"]
    other = dataclasses.replace(spec, name="other")
    with pytest.raises(StoreError, match="different spec"):
        create_family(store, other, data=data)
    with pytest.raises(StoreError, match="corpus changed"):
        create_family(store, spec, data={"fingerprint": "xyz"})
    # a store with nothing trained yet (an earlier spec failed) takes the corrected spec
    create_family(tmp_path / "e.zarr", spec, data={"fingerprint": "abc"})
    create_family(tmp_path / "e.zarr", other, data={"fingerprint": "abc"})
    assert FamilyStore(tmp_path / "e.zarr").spec.name == "other"


def test_unknown_run_and_step_errors_list_what_exists(trained_tiny):
    _, store = trained_tiny
    family = FamilyStore(store)
    with pytest.raises(StoreError, match=r"no size 'big' \(sizes: l2-d16\)"):
        family.run("big", 0)
    with pytest.raises(StoreError, match=r"no seed 7 .*seeds: \[0, 1\]"):
        family.run("l2-d16", 7)
    with pytest.raises(StoreError, match=r"step 3 .*0, 1, 2, 4, 5, 8, \.\.\., 24"):
        family.run("l2-d16", 0).parameters_at(3)
    with pytest.raises(StoreError, match="recorded steps: 0..23"):
        family.run("l2-d16", 0).batch_indices(24)


def test_checkpoint_reads_back_the_whole_training_state(tiny_spec, tmp_path):
    writer, shapes = make_writer(tiny_spec, tmp_path / "s.zarr")
    written = []
    for step in range(3):
        params = {k: np.random.default_rng(step).random(s, np.float32) for k, s in shapes.items()}
        moments = {m: {k: v + i + 1 for k, v in params.items()} for i, m in enumerate(MOMENTS)}
        written.append(Checkpoint(step, step * 10, params, moments, np.arange(3, dtype=np.uint8)))
    writer.start()
    for c in written:
        writer.put_checkpoint(c)
    writer.close(complete=False)
    reader = FamilyStore(tmp_path / "s.zarr").run("l2-d16", 0)
    for c in written:
        read = reader.checkpoint(c.step)
        assert (read.step, read.tokens_seen) == (c.step, c.tokens_seen)
        assert np.array_equal(read.rng_state, c.rng_state)
        for name in shapes:
            assert np.array_equal(read.params[name], c.params[name])
            for m in MOMENTS:
                assert np.array_equal(read.moments[m][name], c.moments[m][name])
    with pytest.raises(StoreError, match="no committed checkpoint at step 7"):
        reader.checkpoint(7)


def test_a_buffer_smaller_than_a_chunk_commits_in_parts(tiny_spec, tmp_path, monkeypatch):
    # make_writer's checkpoints take 1483 bytes (3 x 116 float32, RNG, step, tokens, 2 hashes,
    # keyframe step): 2 fit
    monkeypatch.setattr(store_writer, "MAX_BUFFER_BYTES", 3000)
    writer, shapes = make_writer(
        tiny_spec, tmp_path / "s.zarr", checkpoints_per_chunk=4, commit_seconds=1e9
    )
    writer.start()
    for step in range(2):
        writer.put_checkpoint(checkpoint(step, shapes))
    deadline = time.monotonic() + 30
    while FamilyStore(tmp_path / "s.zarr").run("l2-d16", 0).n_checkpoints < 2:
        assert time.monotonic() < deadline, "a full buffer was not committed"
        time.sleep(0.01)
    for step in range(2, 5):
        writer.put_checkpoint(checkpoint(step, shapes))
    writer.close(complete=True)
    reader = FamilyStore(tmp_path / "s.zarr").run("l2-d16", 0)
    assert list(reader.steps()) == [0, 1, 2, 3, 4]
    for step in range(5):
        assert np.all(reader.checkpoint(step).moments["exp_avg"]["lm_head.weight"] == step)


def test_analysis_rows_are_buffered_then_written_step_last(tiny_spec, tmp_path, monkeypatch):
    monkeypatch.setattr(store_results, "ANALYSIS_FLUSH_ROWS", 4)
    writer, shapes = make_writer(tiny_spec, tmp_path / "s.zarr")
    writer.start()
    writer.close(complete=True)
    family = FamilyStore(tmp_path / "s.zarr", mode="r+")
    results = AnalysisWriter(
        family.run("l2-d16", 0),
        "scores",
        attrs={},
        variables={"score": (("head",), (2,))},
    )
    results.append(np.array([8, 2]), {"score": np.array([[8, 8], [2, 2]], np.float32)})
    assert results.done_steps() == {8, 2}  # buffered rows count as done for this job ...
    covered, _ = analysis_arrays(FamilyStore(tmp_path / "s.zarr").run("l2-d16", 0), "scores")
    assert len(covered) == 0  # ... but readers do not see them yet
    results.append(np.array([5, 1]), {"score": np.array([[5, 5], [1, 1]], np.float32)})
    covered, arrays = analysis_arrays(FamilyStore(tmp_path / "s.zarr").run("l2-d16", 0), "scores")
    assert list(covered) == [1, 2, 5, 8]  # 4 rows: written together, in step order
    assert np.array_equal(arrays["score"][:, 0], [1, 2, 5, 8])
    results.append(np.array([9]), {"score": np.array([[9, 9]], np.float32)})
    results.flush()  # after every stored row: appended
    results.append(np.array([3]), {"score": np.array([[3, 3]], np.float32)})
    results.flush()  # between stored rows: everything rewritten in order
    covered, arrays = analysis_arrays(FamilyStore(tmp_path / "s.zarr").run("l2-d16", 0), "scores")
    assert list(covered) == [1, 2, 3, 5, 8, 9]
    assert np.array_equal(arrays["score"], np.repeat(covered[:, None], 2, axis=1))
    plain = xr.open_zarr(
        tmp_path / "s.zarr", group="l2-d16/seed0/analysis/scores", consolidated=False
    )
    assert plain["step"].values.tolist() == [1, 2, 3, 5, 8, 9]  # plain xarray: sorted too


def test_results_without_a_variable_the_analysis_now_returns_need_recompute(tiny_spec, tmp_path):
    writer, _ = make_writer(tiny_spec, tmp_path / "s.zarr")
    writer.start()
    writer.close(complete=True)
    run = FamilyStore(tmp_path / "s.zarr", mode="r+").run("l2-d16", 0)
    old = AnalysisWriter(run, "scores", attrs={}, variables={"score": (("head",), (2,))})
    old.append(np.array([8]), {"score": np.array([[8, 8]], np.float32)})
    old.flush()
    grown = {"score": (("head",), (2,)), "extra": (("layer",), (2,))}
    with pytest.raises(StoreError, match="scores: existing results lack extra, .*--recompute"):
        AnalysisWriter(run, "scores", attrs={}, variables=grown)
    covered, _ = analysis_arrays(run, "scores")
    assert list(covered) == [8]  # kept
    AnalysisWriter(run, "scores", attrs={}, variables=grown, recompute=True)
    assert set(analysis_arrays(run, "scores")[1]) == {"score", "extra"}


def damage(path):
    """Flip one byte in the middle of a stored file."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_chunk_is_a_clear_error_not_wrong_numbers(trained_tiny, tmp_path):
    _, trained = trained_tiny
    store = tmp_path / "copy.zarr"
    shutil.copytree(trained, store)
    run = FamilyStore(store).run("l2-d16", 0)
    qkv = "gpt_neox.layers.attention.query_key_value.weight"  # chunked per head
    damage(store / run.run.path / qkv / "c" / "0" / "0" / "0" / "0")  # checkpoints 0..3
    damage(store / run.run.path / "gpt_neox.embed_in.weight" / "c" / "1" / "0" / "0")  # 4..7
    damage(store / run.run.path / "loss" / "c" / "0")
    with pytest.raises(StoreError, match=f"{qkv}.*damaged"):
        run.parameters_at(1)
    with pytest.raises(StoreError, match="embed_in.weight.*damaged"):
        run.parameters_at(5)  # the 5th checkpoint
    with pytest.raises(StoreError, match="loss.*damaged"):
        run.metrics()
    assert set(run.parameters_at(16)) == set(run.parameter_names)  # the 9th: still readable


def tree_bytes(store) -> dict:
    """Every file of a store and its bytes, to prove that a failed command changed nothing."""
    return {p: p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


QKV = "gpt_neox.layers.attention.query_key_value.weight"
# A file of each kind of array, and the checkpoint steps / train steps it holds (the tiny
# spec has 4 checkpoints per chunk: index 4..7 is steps 5, 8, 10, 15).
MISSING_FILES = {
    "weights": (f"{QKV}/c/1/0/0/0", "checkpoint steps 5..15"),
    "moments": ("state/exp_avg_sq/lm_head.weight/c/1/0/0", "keyframe 4..7"),
    "loss": ("loss/c/0", "train_step 0..23"),
    "batches": ("batch_indices/c/0/0", "train_step 0..23"),
}


def read_paths(store):
    """Every way observatory reads a run's stored data (each must fail on a missing file)."""
    import observatory as obs
    from observatory.query import models_at

    def run():
        return FamilyStore(store).run("l2-d16", 0)

    family = {"size": "l2-d16", "seed": 0}
    return {
        "parameters_at": lambda: run().parameters_at(10),
        "checkpoint": lambda: run().checkpoint(10),
        "model_at": lambda: obs.model_at(store, **family, step=10),
        "models_at": lambda: list(models_at(store, **family, steps=[8, 10])),
        "head_weights": lambda: obs.head_weights(store, **family, layer=0, head=0),
        "lazy": lambda: obs.open_family(store, size="l2-d16")["W_Q"].sel(seed=0).values,
        "lazy_raw": lambda: obs.open_run(store, **family)[QKV].values,
        "lazy_moment": lambda: obs.open(store)["l2-d16/seed0"].to_dataset(),
        "metrics": lambda: run().metrics(),
        "lazy_loss": lambda: obs.open_run(store, **family)["loss"].values,
        "batch_indices": lambda: run().batch_indices(3),
        "batch_at": lambda: obs.batch_at(store, **family, step=3),
        "lazy_batches": lambda: obs.open_run(store, **family)["batch_indices"].values,
    }


READS = {
    "weights": ["parameters_at", "checkpoint", "model_at", "models_at", "head_weights", "lazy"],
    "moments": ["checkpoint"],
    "loss": ["metrics", "lazy_loss"],
    "batches": ["batch_indices", "batch_at", "lazy_batches"],
}


@pytest.mark.parametrize("kind", sorted(MISSING_FILES))
def test_a_missing_chunk_is_an_error_on_every_read_path_never_a_fill_value(
    trained_tiny, tmp_path, kind
):
    _, trained = trained_tiny
    store = tmp_path / "copy.zarr"
    shutil.copytree(trained, store)
    relpath, held = MISSING_FILES[kind]
    (store / "l2-d16/seed0" / relpath).unlink()
    before = tree_bytes(store)
    array = relpath.split("/c/")[0]
    paths = read_paths(store)
    for name in READS[kind]:
        with pytest.raises(StoreError) as err:
            paths[name]()
        message = str(err.value)
        assert "\n" not in message, name
        assert f"l2-d16/seed0/{array}: stored data is missing" in message, (name, message)
        assert held in message, (name, message)
    assert tree_bytes(store) == before
    # what the missing file did not hold still reads (the other seed, other checkpoints)
    FamilyStore(store).run("l2-d16", 1).checkpoint(10)
    assert FamilyStore(store).run("l2-d16", 0).parameters_at(0)


def test_a_missing_analysis_chunk_is_damage_not_missing_results(trained_tiny, tmp_path, capsys):
    import observatory as obs
    from observatory.cli import main
    from tests.test_analysis_summary import analysed_copy

    _, trained = trained_tiny
    store = analysed_copy(trained, tmp_path / "a.zarr")
    (store / "l2-d16/seed1/analysis/head_scores/induction_score/c/0/0/0").unlink()
    (store / "l2-d16/seed0/analysis/icl/step/c/0").unlink()
    before = tree_bytes(store)
    with pytest.raises(StoreError, match="induction_score: stored data is missing"):
        obs.open_run(store, size="l2-d16", seed=1)["induction_score"].compute()
    with pytest.raises(StoreError, match="icl/step: stored data is missing"):
        obs.summary(store)
    assert main(["report", str(store), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "analysis/icl/step: stored data is missing" in err
    assert tree_bytes(store) == before


def test_a_flipped_byte_fails_every_read_of_its_chunk_and_no_other(trained_tiny, tmp_path):
    """Each chunk is checksummed: a read returns exactly the stored values or fails."""
    import observatory as obs

    _, trained = trained_tiny
    store = tmp_path / "copy.zarr"
    shutil.copytree(trained, store)
    clean = obs.open_run(trained, size="l2-d16", seed=0)["W_Q"].values
    damage(store / "l2-d16/seed0" / QKV / "c/1/0/0/0")  # one head's chunk of checkpoints 4..7
    before = tree_bytes(store)
    ds = obs.open_run(store, size="l2-d16", seed=0)
    failed = []
    for layer in range(2):
        for head in range(2):
            lazy = ds["W_Q"].sel(layer=layer, head=head)
            try:
                values = lazy.values
            except StoreError as err:
                assert "\n" not in str(err) and f"{QKV}: stored data is damaged" in str(err)
                failed.append((layer, head))
                with pytest.raises(StoreError, match="damaged"):
                    obs.head_weights(store, size="l2-d16", seed=0, layer=layer, head=head)
                continue
            # the chunks the flipped byte is not in read back exactly
            np.testing.assert_array_equal(values, clean[:, layer, head])
            np.testing.assert_array_equal(lazy.isel(step=slice(0, 4)), clean[:4, layer, head])
    assert len(failed) == 1
    for read in ("parameters_at", "checkpoint", "model_at", "models_at", "lazy_raw"):
        with pytest.raises(StoreError, match="damaged"):
            read_paths(store)[read]()
    assert tree_bytes(store) == before


def rewrite_json(path, change):
    import json

    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def test_metadata_that_disagrees_with_the_markers_is_a_one_line_error(
    trained_tiny, tmp_path, capsys
):
    import observatory as obs
    from observatory.cli import main

    _, trained = trained_tiny
    cases = {
        "markers beyond the arrays": (
            "l2-d16/seed0/zarr.json",
            lambda m: m["attributes"]["observatory"].update(committed_checkpoints=99) or m,
            "commit markers (99 checkpoints",
        ),
        "shrunk array": (
            f"l2-d16/seed0/{QKV}/zarr.json",
            lambda m: m.update(shape=[5, *m["shape"][1:]]) or m,
            f"{QKV}: metadata disagrees with the commit markers (5 entries along 'step', 11",
        ),
        "shrunk per-step array": (
            "l2-d16/seed1/loss/zarr.json",
            lambda m: m.update(shape=[3]) or m,
            "loss: metadata disagrees with the commit markers (3 entries along 'train_step'",
        ),
    }
    for case, (relpath, change, message) in cases.items():
        store = tmp_path / case.replace(" ", "_")
        shutil.copytree(trained, store)
        rewrite_json(store / relpath, change)
        before = tree_bytes(store)
        with pytest.raises(StoreError, match=message.replace("(", r"\(")):
            seed = int(relpath.split("/")[1][-1])
            # the lazy path reads an array's metadata when it reads the array
            variable = QKV if case == "shrunk array" else "loss"
            obs.open_family(store, size="l2-d16")[variable].sel(seed=seed).compute()
        assert main(["inspect", str(store)]) in (0, 2)
        capsys.readouterr()
        assert tree_bytes(store) == before, case
    store = tmp_path / "invalid_json"
    shutil.copytree(trained, store)
    (store / "l2-d16/seed1/zarr.json").write_text("{not json")
    assert main(["inspect", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "l2-d16/seed1/zarr.json: metadata is damaged" in err


def test_a_run_whose_creation_was_interrupted_is_invisible_then_recreated(tiny_spec, tmp_path):
    writer, shapes = make_writer(tiny_spec, tmp_path / "s.zarr")
    group = writer._group
    group.attrs.put({})  # as if killed after creating the arrays, before the attributes
    family = FamilyStore(tmp_path / "s.zarr")
    assert family.runs() == []
    with pytest.raises(StoreError, match="no size 'l2-d16' \\(sizes: none\\)"):
        family.run("l2-d16", 0)
    writer, _ = make_writer(tiny_spec, tmp_path / "s.zarr")
    assert writer.committed == (0, 0)
    assert FamilyStore(tmp_path / "s.zarr").run("l2-d16", 0).n_checkpoints == 0


# --------------------------------------------------------------------------------------------
# Stores at URLs: S3 (a moto server on loopback) and plain HTTP, read-only.

S3_JOB = """\
store = "{store}"
analyses = ["head_scores", "icl"]

[probe]
n_sequences = 3

[held_out]
n_sequences = 6

[execution]
workers = 1
block_size = 8
"""


def _s3_spec(directory, *, seeds: str, steps: int, every: int):
    """The tiny spec, shrunk: every request to the local S3 server costs milliseconds."""
    from observatory.spec import load_run_spec
    from tests.conftest import TINY_TOML, write_spec

    text = TINY_TOML.replace("init = [0, 1]\ndata = [5, 6]", seeds)
    text = text.replace("steps = 24", f"steps = {steps}")
    text = text.replace("log_spaced = true\nevery = 5", f"log_spaced = false\nevery = {every}")
    return load_run_spec(write_spec(directory, text))


def _analyse(store, directory):
    from observatory.jobs.analyze import run_analysis
    from observatory.jobs.job_spec import load_analysis_spec

    job = directory / f"job{len(list(directory.glob('job*')))}.toml"
    job.write_text(S3_JOB.format(store=store))
    return run_analysis(load_analysis_spec(job), progress=False)


@pytest.mark.slow
def test_a_family_in_s3_trains_analyses_and_reads_back_as_on_local_disk(
    s3_bucket, tmp_path, capsys
):
    import xarray as xr

    from observatory import open_family
    from observatory.cli import main
    from observatory.train import train_family

    tiny_spec = _s3_spec(tmp_path, seeds="init = [0, 1]\ndata = [5, 6]", steps=24, every=12)
    url = f"{s3_bucket}/family.zarr"
    assert train_family(tiny_spec, store=url, progress=False) == url
    local = train_family(tiny_spec, store=tmp_path / "local.zarr", progress=False)
    assert _analyse(url, tmp_path).computed == _analyse(local, tmp_path).computed > 0
    from_s3, from_disk = open_family(url, size="l2-d16"), open_family(local, size="l2-d16")
    xr.testing.assert_equal(from_s3, from_disk)  # every variable, analyses included
    assert "induction_score" in from_s3
    assert main(["inspect", url]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(url) and "complete" in shown
    assert "observatory-test-secret" not in shown  # credentials are never printed ...
    fs, path = store_paths.filesystem(url)
    stored = b"".join(fs.cat(f) for f in fs.find(path) if f.endswith("zarr.json"))
    assert b"observatory-test-secret" not in stored and b"test-key" not in stored  # ... nor stored


@pytest.mark.slow
def test_one_writer_per_run_on_s3_and_a_stale_lock_is_taken_over(
    s3_bucket, tmp_path, monkeypatch, capsys
):
    import json
    import os

    from observatory.cli import main
    from observatory.store import FamilyStore, RunLock

    spec = _s3_spec(tmp_path, seeds="init = [0]\ndata = [5]", steps=4, every=4)
    url = f"{s3_bucket}/locked.zarr"
    spec_file = str(tmp_path / "tiny.toml")
    assert main(["train", spec_file, "--store", url, "--stop-after", "1", "--no-progress"]) == 0
    root = FamilyStore(url, mode="r+").root
    fs, _ = store_paths.filesystem(url)
    with RunLock(root, spec.runs()[0]) as held:  # another writer holds seed 0
        assert json.loads(fs.cat_file(held.path))["pid"] == os.getpid()
        assert main(["train", spec_file, "--store", url, "--resume"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "l2-d16/seed0 is being written by pid" in err
    assert not fs.exists(held.path)  # released
    fs.pipe_file(held.path, json.dumps({"host": "elsewhere", "pid": 1, "since": 0}).encode())
    monkeypatch.setattr(store_lock, "LOCK_STALE_SECONDS", 0.0)  # its heartbeat is stale
    assert main(["train", spec_file, "--store", url, "--resume", "--no-progress"]) == 0
    assert not fs.exists(held.path)


def _committed_snapshot(url):
    """Every committed checkpoint of seed 0 that a reader can see now: {step: weights}."""
    from observatory.store import FamilyStore

    try:
        reader = FamilyStore(url).run("l2-d16", 0)
    except StoreError:
        return {}  # not created yet
    steps = [int(s) for s in reader.steps()]
    if not steps:
        return {}
    params = reader.parameters_for(steps)
    return {step: {k: v[i] for k, v in params.items()} for i, step in enumerate(steps)}


@pytest.mark.slow
def test_a_reader_polling_s3_during_training_never_sees_a_partial_checkpoint(s3_bucket, tmp_path):
    import threading

    from observatory.store import FamilyStore
    from observatory.train import train_family

    spec = _s3_spec(tmp_path, seeds="init = [0]\ndata = [5]", steps=12, every=3)
    url = f"{s3_bucket}/polled.zarr"
    training = threading.Thread(
        target=train_family, args=(spec,), kwargs={"store": url, "progress": False}
    )
    training.start()
    seen = []
    try:
        while training.is_alive():
            seen.append(_committed_snapshot(url))
    finally:
        training.join()
    final = FamilyStore(url).run("l2-d16", 0)
    assert final.complete
    done = _committed_snapshot(url)
    sizes = sorted({len(snapshot) for snapshot in seen})
    assert len(sizes) >= 3, f"the reader saw too few commits ({sizes})"
    for snapshot in seen:  # what a reader saw is what the finished store holds, bit for bit
        for step, params in snapshot.items():
            for name, values in params.items():
                assert values.tobytes() == done[step][name].tobytes(), (step, name)


def test_a_store_served_over_http_reads_lazily_and_is_read_only(trained_tiny, tmp_path, capsys):
    import xarray as xr

    from observatory import open_family
    from observatory.cli import main
    from observatory.store import FamilyStore, create_family
    from tests.conftest import http_server

    spec, local = trained_tiny
    with http_server(local.parent) as (base, served):
        url = f"{base}/{local.name}"
        assert main(["inspect", url]) == 0
        assert "seed1" in capsys.readouterr().out
        remote = open_family(url, size="l2-d16")
        xr.testing.assert_equal(remote, open_family(local, size="l2-d16"))

        served.clear()
        head = remote["W_Q"].sel(layer=1, head=0).values  # every seed and checkpoint
        assert head.shape[:2] == (2, len(remote["step"]))
        qkv = "gpt_neox.layers.attention.query_key_value.weight"
        data = [(path, n) for path, n in served if not path.endswith("zarr.json")]
        # only layer 1's first block of d_head rows (W_Q of head 0): one request per file
        assert data and all(re.search(f"/{qkv}/c/\\d+/1/0/0$", path) for path, _ in data), data
        assert len(data) == len({path for path, _ in data}) == 2 * 3  # seeds x checkpoint blocks
        chunk_files = (local / "l2-d16").rglob(f"{qkv}/c/*/*/*/*")
        assert 20 * sum(n for _, n in data) < sum(f.stat().st_size for f in chunk_files)

        with pytest.raises(StoreError, match="read-only"):
            FamilyStore(url, mode="r+")
        with pytest.raises(StoreError, match="read-only"):
            create_family(url, spec, data={"fingerprint": "x"})


def test_a_store_of_another_schema_version_is_refused_in_one_line(tiny_spec, tmp_path):
    path = tmp_path / "s.zarr"
    root = create_family(path, tiny_spec, data={"fingerprint": "abc"})
    attrs = dict(root.attrs[ATTRS_KEY])
    root.attrs[ATTRS_KEY] = attrs | {"schema_version": SCHEMA_VERSION - 1}
    for mode in ("r", "r+"):
        with pytest.raises(StoreError) as err:
            FamilyStore(path, mode=mode)
        message = str(err.value)
        assert "\n" not in message
        assert f"schema version {SCHEMA_VERSION - 1}" in message
        assert f"schema version {SCHEMA_VERSION} only" in message
