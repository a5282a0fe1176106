"""A store read with plain xarray, without observatory: at rest, and while a run trains."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import xarray as xr

from observatory.store import ATTRS_KEY, FamilyStore
from tests.query.conftest import QKV, SIZE


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
