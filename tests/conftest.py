"""Shared fixtures: a tiny model family that trains in seconds on 2 CPU cores."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from observatory.spec import RunSpec, load_run_spec

TINY_TOML = """\
name = "tiny"

[model]
architecture = "gpt_neox"
vocab_size = 16

[[model.sizes]]
name = "l2-d16"
n_layers = 2
d_model = 16
n_heads = 2
n_positions = 16

[data]
source = "induction"
seed = 3
n_sequences = 64
period_min = 2
period_max = 6

[seeds]
init = [0, 1]
data = [5, 6]

[train]
steps = 24
batch_size = 4
context = 16

[optimizer]
lr = 3e-3
warmup_steps = 2

[checkpoints]
log_spaced = true
every = 5

[store]
checkpoints_per_shard = 4
commit_seconds = 0.0
"""


def write_spec(directory: Path, text: str = TINY_TOML, name: str = "tiny.toml") -> Path:
    """Write a spec file and return its path."""
    path = directory / name
    path.write_text(text)
    return path


@pytest.fixture
def tiny_spec_path(tmp_path: Path) -> Path:
    return write_spec(tmp_path)


@pytest.fixture
def tiny_spec(tiny_spec_path: Path) -> RunSpec:
    return load_run_spec(tiny_spec_path)


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory) -> tuple[RunSpec, Path]:
    """A fully trained tiny family (2 seeds), shared read-only by tests of the readers."""
    from observatory.trainer import train_family

    directory = tmp_path_factory.mktemp("trained")
    spec = load_run_spec(write_spec(directory))
    store = train_family(spec, store=directory / "tiny.zarr", progress=False)
    return spec, store


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def dask_processes(n_workers: int, *, nanny: bool = True) -> Iterator[str]:
    """A ``dask scheduler`` and ``n_workers`` single-threaded ``dask worker`` processes on
    loopback, stopped on exit; yields the scheduler address."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler"]
            + ["--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
            **quiet,
        )
    ]
    worker = [sys.executable, "-m", "distributed.cli.dask_worker", address]
    worker += ["--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"]
    worker += [] if nanny else ["--no-nanny"]
    procs += [subprocess.Popen(worker, **quiet) for _ in range(n_workers)]
    try:
        deadline = time.monotonic() + 120
        while True:  # wait until every worker has joined
            try:
                with Client(address, timeout=5) as client:
                    if len(client.scheduler_info()["workers"]) == n_workers:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "dask scheduler/workers did not start"
            time.sleep(0.5)
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def store_arrays(path) -> dict[str, np.ndarray]:
    """Every array of a zarr store by its path, read whole."""
    import zarr

    root = zarr.open_group(path, mode="r")
    members = root.members(max_depth=None)
    return {name: node[...] for name, node in members if isinstance(node, zarr.Array)}


def assert_stores_identical(a, b) -> None:
    """Same arrays, shapes, dtypes and bits in two stores."""
    left, right = store_arrays(a), store_arrays(b)
    assert sorted(left) == sorted(right)
    for name, values in left.items():
        assert values.dtype == right[name].dtype, name
        assert values.shape == right[name].shape, name
        assert values.tobytes() == right[name].tobytes(), name
