import os
import signal
import subprocess
import sys
import time

import pytest

from observatory.spec import load_run_spec
from observatory.store import FamilyStore
from observatory.train import (
    train_family,
)
from tests.conftest import TINY_TOML, assert_stores_identical, dask_processes, write_spec

FAMILY_TOML = TINY_TOML.replace(
    "init = [0, 1]\ndata = [5, 6]", "init = [0, 1, 2, 3]\ndata = [5, 6, 7, 8]"
)


def _cli_train(spec_path, store, *args, wait=True):
    command = [sys.executable, "-m", "observatory.cli", "train", str(spec_path)]
    command += ["--store", str(store), "--no-progress", *args]
    if wait:
        return subprocess.run(command, capture_output=True, text=True, timeout=1800)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _running_checkpoints(store, run_path) -> int:
    """Committed checkpoints of a run that is still training (0 if absent or complete)."""
    size, _, seed = run_path.partition("/seed")
    try:
        run = FamilyStore(store).run(size, int(seed))
    except Exception:
        return 0
    return 0 if run.complete else run.n_checkpoints


def _kill_a_worker_mid_run(address, store) -> str:
    """SIGKILL the worker process of a run that has committed checkpoints and is unfinished."""
    from distributed import Client

    with Client(address, timeout=10) as client:
        pids = client.run(os.getpid)
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            for worker, keys in client.processing().items():
                for key in keys:
                    run_path = str(key).removeprefix("train-")
                    if _running_checkpoints(store, run_path) >= 2:
                        os.kill(pids[worker], signal.SIGKILL)
                        return run_path
            time.sleep(0.01)
    raise AssertionError("no run was caught mid-way")


@pytest.mark.slow
def test_family_on_a_dask_cluster_is_bit_identical_to_sequential_even_after_a_worker_dies(
    tmp_path,
):
    spec_path = write_spec(tmp_path, FAMILY_TOML.replace("steps = 24", "steps = 40"))
    sequential = train_family(load_run_spec(spec_path), store=tmp_path / "seq.zarr", progress=False)
    killed = tmp_path / "killed.zarr"
    with dask_processes(2, nanny=False) as address:
        done = _cli_train(spec_path, tmp_path / "dask.zarr", "--scheduler", address)
        assert done.returncode == 0, done.stderr
        assert done.stdout.count(" steps in ") == 4  # a line per run
        assert_stores_identical(sequential, tmp_path / "dask.zarr")

        proc = _cli_train(spec_path, killed, "--scheduler", address, wait=False)
        try:
            victim = _kill_a_worker_mid_run(address, killed)
        finally:
            _, err = proc.communicate(timeout=1800)
        assert proc.returncode == 2, err
        assert victim in err and "--resume" in err and "Traceback" not in err
        size, _, seed = victim.partition("/seed")
        assert not FamilyStore(killed).run(size, int(seed)).complete

        resumed = _cli_train(spec_path, killed, "--scheduler", address, "--resume")
        assert resumed.returncode == 0, resumed.stderr
    assert_stores_identical(sequential, killed)
