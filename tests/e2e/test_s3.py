import pytest

from observatory.errors import StoreError
from observatory.store import lock as store_lock
from observatory.store import paths as store_paths

# --------------------------------------------------------------------------------------------
# Stores in S3 (a moto server on loopback); HTTP stores: tests/store/test_lazy.py.

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
