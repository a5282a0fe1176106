import numpy as np
import pytest

from observatory.errors import StoreError
from observatory.store import (
    MOMENTS,
    Checkpoint,
    FamilyStore,
)
from tests.store.test_writer import make_writer


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
