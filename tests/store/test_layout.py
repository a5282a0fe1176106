import dataclasses
import multiprocessing
import shutil

import pytest
import zarr

from observatory.errors import StoreError
from observatory.store import (
    ATTRS_KEY,
    SCHEMA_VERSION,
    FamilyStore,
    create_family,
)
from tests.store.test_writer import checkpoint, make_writer


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


def _create_at_once(path, spec, barrier) -> str:
    barrier.wait()  # every process starts creating the same store at the same moment
    try:
        create_family(path, spec, data={"fingerprint": "abc"})
    except StoreError as err:
        return str(err)
    return "ok"


def test_processes_creating_one_store_at_once_all_see_a_whole_store(tiny_spec, tmp_path):
    """No process may open the store while another is halfway through creating it."""
    context = multiprocessing.get_context("fork")
    with context.Manager() as manager, context.Pool(4) as pool:
        for attempt in range(20):
            path, barrier = tmp_path / f"s{attempt}.zarr", manager.Barrier(4)
            results = pool.starmap(_create_at_once, [(path, tiny_spec, barrier)] * 4)
            assert results == ["ok"] * 4, results
            assert FamilyStore(path).spec == tiny_spec
            assert [p.name for p in tmp_path.iterdir() if "creating" in p.name] == []
    empty = tmp_path / "empty.zarr"
    empty.mkdir()  # made by the user beforehand: the store is created in it
    create_family(empty, tiny_spec, data={"fingerprint": "abc"})
    assert FamilyStore(empty).spec == tiny_spec
