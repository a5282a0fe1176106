import dataclasses
import math
import time

import numpy as np
import pytest
import zarr

from observatory.errors import StoreError
from observatory.spec import StoreSpec
from observatory.store import (
    MOMENTS,
    Checkpoint,
    FamilyStore,
    RunWriter,
    StepRecord,
    create_family,
)
from observatory.store import layout as store_layout
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
