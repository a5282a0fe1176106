import dataclasses

import pytest

from observatory.spec import load_run_spec
from observatory.train import train_family
from observatory.train.budget import disk_estimate


def _disk_use(store) -> int:
    """Bytes the store's files take: their sizes or their allocated blocks, the larger."""
    files = [path.stat() for path in store.rglob("*") if path.is_file()]
    return max(sum(f.st_size for f in files), sum(f.st_blocks * 512 for f in files))


def _shortened(path, steps, per_chunk, **changes):
    """A spec of ``runs/`` with few steps and small chunks, so that a few checkpoints still
    fill several chunks and pad the last one, as the full run does."""
    spec = load_run_spec(path)
    checkpoints = dataclasses.replace(spec.checkpoints, **changes.pop("checkpoints", {}))
    return dataclasses.replace(
        spec,
        train=dataclasses.replace(spec.train, steps=steps),
        checkpoints=checkpoints,
        store=dataclasses.replace(spec.store, checkpoints_per_chunk=per_chunk),
        **changes,
    )


SPECS = {
    "demo": lambda: _shortened("runs/induction.toml", steps=12, per_chunk=4),
    "every step": lambda: _shortened(
        "runs/induction.toml", steps=9, per_chunk=4, checkpoints={"every_step": True}
    ),
    "keyframes every 3rd": lambda: _shortened(
        "runs/induction.toml", steps=20, per_chunk=4, checkpoints={"state_every": 3}
    ),
    "pythia-14m shaped": lambda: _shortened("runs/pythia14m.toml", steps=4, per_chunk=2),
}


@pytest.mark.parametrize("name", SPECS)
def test_the_disk_estimate_bounds_a_finished_run_from_above(name, tmp_path):
    spec = SPECS[name]()
    if spec.data.source == "text":  # a smaller corpus: the store holds none of it
        spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, max_tokens=200_000))
    runs = spec.runs(seeds=[0])
    store = train_family(spec, store=tmp_path / "s.zarr", seeds=[0], progress=False)
    used, estimate = _disk_use(store), disk_estimate(spec, runs)
    assert used <= estimate < 2 * used, (used, estimate)
