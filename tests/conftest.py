"""Shared fixtures: a tiny model family that trains in seconds on 2 CPU cores."""

from __future__ import annotations

import copy
import functools
import http.server
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from observatory.spec import RunSpec, load_run_spec
from observatory.store import FamilyStore

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
checkpoints_per_chunk = 4
commit_seconds = 0.0
"""


def write_spec(directory: Path, text: str = TINY_TOML, name: str = "tiny.toml") -> Path:
    """Write a spec file and return its path."""
    path = directory / name
    path.write_text(text)
    return path


@pytest.fixture(autouse=True, scope="session")
def _token_cache(tmp_path_factory) -> None:
    """Tests (and the processes they start) write token caches into a temporary folder."""
    os.environ["OBSERVATORY_CACHE"] = str(tmp_path_factory.mktemp("token-cache"))


@pytest.fixture
def tiny_spec_path(tmp_path: Path) -> Path:
    return write_spec(tmp_path)


@pytest.fixture
def tiny_spec(tiny_spec_path: Path) -> RunSpec:
    return load_run_spec(tiny_spec_path)


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory) -> tuple[RunSpec, Path]:
    """A fully trained tiny family (2 seeds), shared read-only by tests of the readers."""
    from observatory.train import train_family

    directory = tmp_path_factory.mktemp("trained")
    spec = load_run_spec(write_spec(directory))
    store = train_family(spec, store=directory / "tiny.zarr", progress=False)
    return spec, store


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def dask_processes(
    n_workers: int, *, nanny: bool = True, workdir: Path | None = None
) -> Iterator[str]:
    """A ``dask scheduler`` and ``n_workers`` single-threaded ``dask worker`` processes on
    loopback, stopped on exit; yields the scheduler address. ``workdir``: the workers' current
    and local directory (e.g. an empty one, so user code reaches them only by being shipped)."""
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
    worker += ["--preload", "observatory.jobs.cluster"]  # as the README starts workers
    worker += [] if nanny else ["--no-nanny"]
    worker += ["--local-directory", str(workdir)] if workdir else []
    environ = os.environ | {"MALLOC_ARENA_MAX": "1"}
    procs += [subprocess.Popen(worker, cwd=workdir, env=environ, **quiet) for _ in range(n_workers)]
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


def damage(path):
    """Flip one byte in the middle of a stored file."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def tree_bytes(store) -> dict:
    """Every file of a store and its bytes, to prove that a failed command changed nothing."""
    return {p: p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def final_params(store, seed=0):
    run = FamilyStore(store).run("l2-d16", seed)
    last = int(run.steps()[-1])
    return last, run.parameters_at(last)


def assert_bit_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == np.float32
        assert np.array_equal(a[name].view(np.uint32), b[name].view(np.uint32)), name


@pytest.fixture(scope="session")
def s3_bucket() -> Iterator[str]:
    """An S3 bucket on a moto server on loopback; fsspec in this process and in child processes
    (through the environment) points at it.  Yields the bucket's URL."""
    import fsspec
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "observatory-test-key",
        "AWS_SECRET_ACCESS_KEY": "observatory-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": f"http://{host}:{port}",
    }
    saved_env = {key: os.environ.get(key) for key in env}
    saved_conf = copy.deepcopy(fsspec.config.conf)
    os.environ.update(env)
    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = env["FSSPEC_S3_ENDPOINT_URL"]
    try:
        fsspec.filesystem("s3", skip_instance_cache=True).mkdir("observatory-test")
        yield "s3://observatory-test"
    finally:
        server.stop()
        fsspec.config.conf.clear()
        fsspec.config.conf.update(saved_conf)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class RangeRequestHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server that answers Range requests (as object stores and CDNs do) and
    logs ``(path, bytes sent)`` of every GET into ``served``."""

    served: list[tuple[str, int]]

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        path = self.translate_path(self.path)
        spec = self.headers.get("Range", "")
        if not spec.startswith("bytes=") or not os.path.isfile(path):
            size = os.path.getsize(path) if os.path.isfile(path) else 0
            self.served.append((self.path, size))
            return super().do_GET()
        data = Path(path).read_bytes()
        first, _, last = spec.removeprefix("bytes=").partition("-")
        if not first:  # the last N bytes
            start, stop = max(len(data) - int(last), 0), len(data)
        else:
            start, stop = int(first), min(int(last) + 1 if last else len(data), len(data))
        body = data[start:stop]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.served.append((self.path, len(body)))


@contextmanager
def http_server(directory: Path) -> Iterator[tuple[str, list[tuple[str, int]]]]:
    """Serve ``directory`` read-only on loopback; yields its URL and the log of GETs."""
    served: list[tuple[str, int]] = []
    handler = type("Handler", (RangeRequestHandler,), {"served": served})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(directory))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="session")
def trained_tiny_attn_only(tmp_path_factory) -> tuple[RunSpec, Path]:
    """The tiny family with the attention-only architecture, trained (2 seeds)."""
    from observatory.train import train_family

    directory = tmp_path_factory.mktemp("trained_attn_only")
    text = TINY_TOML.replace('architecture = "gpt_neox"', 'architecture = "attn_only"')
    spec = load_run_spec(write_spec(directory, text))
    store = train_family(spec, store=directory / "tiny.zarr", progress=False)
    return spec, store


BRANCH_FORK = 7  # no checkpoint of the tiny schedule: the fork's state comes from a replay
NESTED_BRANCH_FORK = 12  # a branch's branch forks here (replayed through its parent branch)
BRANCH_JOB = """\
store = "{store}"
analyses = ["head_scores", "icl", "token_loss"]

[probe]
n_sequences = 3

[held_out]
n_sequences = 6

[execution]
block_size = 16
workers = 1
"""


@pytest.fixture(scope="session")
def analysed_branches(tmp_path_factory) -> tuple[Path, object]:
    """The tiny family's seed 0 with two branches forked at :data:`BRANCH_FORK` (``no-prev``:
    head L0H1 zero-ablated; ``same``: no intervention) and a branch of ``no-prev`` forked at
    :data:`NESTED_BRANCH_FORK` with no intervention of its own (``no-prev/same``), analysed;
    the store and the job's :class:`~observatory.jobs.analyze.JobReport`."""
    from observatory.jobs.analyze import run_analysis
    from observatory.jobs.job_spec import load_analysis_spec
    from observatory.train import Intervention, train_branch, train_family

    directory = tmp_path_factory.mktemp("branches")
    spec = load_run_spec(write_spec(directory))
    store = train_family(spec, store=directory / "tiny.zarr", seeds=[0], progress=False)
    run = {"size": "l2-d16", "seed": 0, "at": BRANCH_FORK, "progress": False, "store": store}
    train_branch(spec, name="no-prev", intervention=Intervention(ablate_heads=((0, 1),)), **run)
    train_branch(spec, name="same", **run)
    train_branch(spec, name="same", branch="no-prev", **run | {"at": NESTED_BRANCH_FORK})
    job = directory / "job.toml"
    job.write_text(BRANCH_JOB.format(store=store))
    return store, run_analysis(load_analysis_spec(job), progress=False)


# A tiny text family: Python-like files, a BPE of 300 tokens, windows of 16 tokens.
TEXT_CORPUS = {
    "a.py": "def add(a, b):\n    return a + b\n\n" * 30,
    "b.py": "class Point:\n    x: int = 0\n    y: int = 0\n" * 30,
    "sub/c.py": "for i in range(10):\n    print(i, 'café <b>&')\n" * 30,
}


def text_family_toml(corpus: Path, tokenizer: str = "bpe", vocab_size: int = 300) -> str:
    """The tiny spec on a text corpus (8 steps)."""
    data = f'source = "text"\npaths = ["{corpus}"]\ntokenizer = "{tokenizer}"'
    induction = TINY_TOML[TINY_TOML.index('source = "induction"') : TINY_TOML.index("\n\n[seeds]")]
    text = TINY_TOML.replace(induction, data).replace('name = "tiny"', 'name = "text"')
    return text.replace("vocab_size = 16", f"vocab_size = {vocab_size}").replace(
        "steps = 24", "steps = 8"
    )


@pytest.fixture(scope="session")
def trained_text(tmp_path_factory) -> tuple[RunSpec, Path, Path]:
    """A trained tiny text family (2 seeds, BPE): ``(spec, store, corpus folder)``."""
    from observatory.train import train_family

    directory = tmp_path_factory.mktemp("text")
    corpus = directory / "corpus"
    for name, text in TEXT_CORPUS.items():
        (corpus / name).parent.mkdir(parents=True, exist_ok=True)
        (corpus / name).write_text(text, encoding="utf-8")
    spec = load_run_spec(write_spec(directory, text_family_toml(corpus), name="text.toml"))
    store = train_family(spec, store=directory / "text.zarr", progress=False)
    return spec, store, corpus
