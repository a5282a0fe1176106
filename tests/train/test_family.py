import os
import sys
import threading

import numpy as np
import pytest

from observatory.errors import StoreError
from observatory.spec import load_run_spec
from observatory.store import FamilyStore
from observatory.train import (
    train_family,
)
from tests.conftest import (
    TINY_TOML,
    assert_bit_identical,
    assert_stores_identical,
    final_params,
    write_spec,
)


def test_same_spec_and_seeds_give_bit_identical_weights(tiny_spec, tmp_path):
    first = train_family(tiny_spec, store=tmp_path / "a.zarr", seeds=[0], progress=False)
    second = train_family(tiny_spec, store=tmp_path / "b.zarr", seeds=[0], progress=False)
    step_a, params_a = final_params(first)
    step_b, params_b = final_params(second)
    assert step_a == step_b == tiny_spec.train.steps
    assert_bit_identical(params_a, params_b)
    loss_a = FamilyStore(first).run("l2-d16", 0).metrics()["loss"]
    loss_b = FamilyStore(second).run("l2-d16", 0).metrics()["loss"]
    assert np.array_equal(loss_a, loss_b)


def test_init_seed_and_data_seed_vary_separately(tmp_path):
    text = TINY_TOML.replace(
        "init = [0, 1]\ndata = [5, 6]", 'init = [0, 1]\ndata = [5, 6]\npairing = "product"'
    )
    spec = load_run_spec(write_spec(tmp_path, text))
    store = train_family(spec, store=tmp_path / "p.zarr", progress=False)
    family = FamilyStore(store)
    runs = {(r.init_seed, r.data_seed): family.run(r.size, r.seed) for r in family.runs()}
    init = {k: r.parameters_at(0) for k, r in runs.items()}
    final = {k: r.parameters_at(spec.train.steps) for k, r in runs.items()}
    name = "gpt_neox.embed_in.weight"
    assert np.array_equal(init[(0, 5)][name], init[(0, 6)][name])  # same init seed
    assert not np.array_equal(init[(0, 5)][name], init[(1, 5)][name])
    assert not np.array_equal(final[(0, 5)][name], final[(0, 6)][name])  # data order differs
    assert not np.array_equal(runs[(0, 5)].batch_indices(0), runs[(0, 6)].batch_indices(0))


class Crash(BaseException):
    """Stands for a SIGKILL: nothing after the point it is raised at runs."""


def crash_at(monkeypatch, phase):
    """Make training stop dead at ``phase``, leaving the store as a kill there would."""
    from observatory import store as store_module

    if phase == "creation":  # arrays created, attributes not yet written
        original = store_module.RunWriter._create_arrays

        def create(self, *args):
            original(self, *args)
            raise Crash

        monkeypatch.setattr(store_module.RunWriter, "_create_arrays", create)
        return
    commits = {"first commit": 1, "mid-run": 4, "final flush": None}[phase]
    original_set = store_module.writer.set_attrs
    calls = []

    def set_attrs(node, **updates):
        # a commit writes every array, then the markers: crash before the markers
        if "committed_checkpoints" in updates and updates["committed_checkpoints"]:
            calls.append(updates)
            final = commits is None and updates["committed_steps"] == 24
            if len(calls) == commits or final:
                raise Crash
        original_set(node, **updates)

    monkeypatch.setattr(store_module.writer, "set_attrs", set_attrs)


@pytest.mark.parametrize("phase", ["creation", "first commit", "mid-run", "final flush"])
def test_a_crash_at_any_phase_resumes_to_bit_identical_results(
    tiny_spec, tmp_path, monkeypatch, phase
):
    store = tmp_path / "s.zarr"
    with monkeypatch.context() as patch:
        crash_at(patch, phase)
        with pytest.raises((Crash, StoreError)):
            train_family(tiny_spec, store=store, seeds=[0], progress=False)
    assert not (tmp_path / "s.zarr.locks").exists()  # released even so
    readers_view = [run.path for run in FamilyStore(store).runs()]
    assert readers_view == ([] if phase == "creation" else ["l2-d16/seed0"])
    train_family(tiny_spec, store=store, seeds=[0], resume=True, progress=False)
    clean = train_family(tiny_spec, store=tmp_path / "clean.zarr", seeds=[0], progress=False)
    assert_bit_identical(final_params(store)[1], final_params(clean)[1])
    ours, theirs = FamilyStore(store).run("l2-d16", 0), FamilyStore(clean).run("l2-d16", 0)
    assert ours.complete and np.array_equal(ours.steps(), theirs.steps())
    assert np.array_equal(ours.metrics()["loss"], theirs.metrics()["loss"])


def test_local_workers_train_the_same_store_as_one_process(trained_tiny, tmp_path):
    from observatory.errors import StoreError

    spec, sequential = trained_tiny
    store = tmp_path / "parallel.zarr"
    summaries = []
    train_family(spec, store=store, workers=2, progress=False, on_run_end=summaries.append)
    assert sorted(s.run for s in summaries) == ["l2-d16/seed0", "l2-d16/seed1"]
    assert all(s.steps == spec.train.steps for s in summaries)
    assert_stores_identical(sequential, store)
    with pytest.raises(StoreError, match="2 of 2 runs failed: .*already trained"):
        train_family(spec, store=store, workers=2, progress=False)


_RELEASE = threading.Event()


def _lost_or_cancelled(path, corpus):
    if path == "l2-d16/seed0":
        raise RuntimeError("the worker died\nwhile running it")  # as KilledWorker would
    _RELEASE.wait(60)  # until the test cancels it


def test_runs_lost_on_a_cluster_end_in_one_line_that_says_resume():
    from distributed import Client, Future

    from observatory.train.family import train_on_cluster

    jobs = {path: (path,) for path in ("l2-d16/seed0", "l2-d16/seed1")}
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as c:
        cancel = threading.Timer(2.0, lambda: c.cancel([Future("train-l2-d16/seed1", c)]))
        cancel.start()
        try:
            with pytest.raises(StoreError) as err:
                train_on_cluster(c, _lost_or_cancelled, jobs, [0], False, print, {})
        finally:
            _RELEASE.set()
            cancel.join()
    message = str(err.value)
    assert "\n" not in message and message.startswith("2 of 2 runs failed")
    for path in jobs:
        assert f"{path}: " in message
    assert message.count("continue with --resume") == 2 and "CancelledError" in message


def _worker_setup() -> tuple:
    import gc

    return os.environ.get("MALLOC_ARENA_MAX"), gc.get_freeze_count(), "torch" in sys.modules


def test_local_workers_start_warm_and_train_for_a_client_given(trained_tiny, tmp_path):
    from observatory.jobs.cluster import dask_client

    spec, sequential = trained_tiny
    with dask_client(workers=1) as client:
        # preloaded: torch imported at start-up and frozen out of the collector's reach
        ((arena, frozen, torch_imported),) = client.run(_worker_setup).values()
        assert arena == "1" and frozen > 10_000 and torch_imported
        store = train_family(spec, store=tmp_path / "given.zarr", client=client, progress=False)
    assert_stores_identical(sequential, store)


def _fill_disk_at(monkeypatch, which):
    """Every zarr file write counts; the one ``which`` picks (from the count) fails as a full
    disk would, with ``ENOSPC``."""
    import errno

    import zarr.storage._local as local

    original, writes = local._put, []

    def put(path, value, exclusive=False):
        writes.append(path)
        if which(len(writes)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(path, value, exclusive)

    monkeypatch.setattr(local, "_put", put)
    return writes


@pytest.mark.parametrize("at", ["creation", "mid-run", "last write"])
def test_a_full_disk_is_one_line_and_resume_finishes_bit_identical(
    tiny_spec_path, tmp_path, monkeypatch, capsys, at
):
    from observatory.cli import main

    clean, store = tmp_path / "clean.zarr", tmp_path / "full.zarr"
    args = ["train", str(tiny_spec_path), "--seeds", "0", "--no-progress", "--store"]
    with monkeypatch.context() as patch:
        writes = _fill_disk_at(patch, lambda n: False)
        assert main([*args, str(clean)]) == 0
    total = len(writes)
    fail_at = {"creation": 3, "mid-run": total // 2, "last write": total}[at]
    with monkeypatch.context() as patch:
        _fill_disk_at(patch, lambda n: n == fail_at)
        capsys.readouterr()
        assert main([*args, str(store)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(
        f"observatory: error: {store}: the disk is full (No space left on device)"
    )
    assert "free space, then continue with --resume" in err
    assert not (tmp_path / "full.zarr.locks").exists()
    assert main([*args, str(store), "--resume"]) == 0
    assert_stores_identical(store, clean)
    assert FamilyStore(store).run("l2-d16", 0).complete
