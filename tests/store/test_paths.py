import functools
import http.server
import os
import subprocess
import sys
import threading
from contextlib import contextmanager

import pytest

from observatory.errors import StoreError
from tests.conftest import free_port, tree_bytes

# --------------------------------------------------------------------------------------------
# A remote store that cannot be reached, read or found is one line naming the URL and the cause
# (exit 2; StoreError from the Python API), never a botocore/aiohttp exception or a hang.


def _no_aws_credentials(endpoint: str) -> dict[str, str]:
    """The environment of a user without AWS credentials, pointed at ``endpoint``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_"))}
    return env | {
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
    }


@pytest.mark.parametrize(
    "url, env, cause",
    [
        ("s3://nonexistent-bucket/x.zarr", {}, "no S3 credentials found"),
        ("s3://bucket/x.zarr", {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}, "reach"),
        ("http://127.0.0.1:{port}/x.zarr", {}, "cannot reach the server"),
        ("http://observatory.invalid/x.zarr", {}, "cannot reach the server"),
    ],
    ids=["s3-no-credentials", "s3-closed-port", "http-closed-port", "http-dns-failure"],
)
def test_an_unreachable_remote_store_is_one_line_within_20s(url, env, cause):
    closed = f"http://127.0.0.1:{free_port()}"
    url = url.format(port=closed.rpartition(":")[2])
    done = subprocess.run(
        [sys.executable, "-m", "observatory.cli", "inspect", url],
        env=_no_aws_credentials(closed) | env,
        capture_output=True,
        text=True,
        timeout=20,  # bounded timeouts and retries: a hang fails here
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"observatory: error: {url}: ") and cause in done.stderr


@pytest.fixture
def s3_without_credentials(monkeypatch):
    """fsspec in this process without AWS credentials, pointed at a closed loopback port."""
    import fsspec
    import s3fs

    for key, value in _no_aws_credentials(f"http://127.0.0.1:{free_port()}").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(
        fsspec.config.conf, "s3", {"endpoint_url": os.environ["FSSPEC_S3_ENDPOINT_URL"]}
    )
    s3fs.S3FileSystem.clear_instance_cache()  # instances hold the credentials they found
    yield "s3://nonexistent-bucket/family.zarr"
    s3fs.S3FileSystem.clear_instance_cache()


def test_every_command_and_the_python_api_report_a_remote_failure_in_one_line(
    s3_without_credentials, tmp_path, capsys
):
    import observatory as obs
    from observatory.cli import main
    from tests.conftest import write_spec

    url = s3_without_credentials
    job = tmp_path / "job.toml"
    job.write_text(f'store = "{url}"\nanalyses = ["head_scores"]\n')
    commands = [
        ["inspect", url],
        ["verify", url, "--quick"],
        ["report", url, "--out", str(tmp_path / "report")],
        ["export", url, "--out", str(tmp_path / "hf")],
        ["analyze", str(job)],
        ["train", str(write_spec(tmp_path)), "--store", url, "--no-progress"],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err == f"observatory: error: {url}: no S3 credentials found{err.split('found')[1]}"
        assert err.count("\n") == 1, argv
    for call in (
        lambda: obs.open_family(url, size="l2-d16"),
        lambda: obs.open_run(url, size="l2-d16", seed=0),
    ):
        with pytest.raises(StoreError, match="no S3 credentials found"):
            call()
    assert not (tmp_path / "report").exists() and not (tmp_path / "hf").exists()


def test_s3_access_denied_and_missing_buckets_or_stores_are_one_line(
    s3_bucket, monkeypatch, capsys
):
    import fsspec
    import s3fs

    from observatory.cli import main

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.pipe(f"{s3_bucket}/private.zarr/zarr.json", b"{}")
    assert main(["inspect", "s3://observatory-no-such-bucket/x.zarr"]) == 2
    assert capsys.readouterr().err.endswith(": no such bucket 'observatory-no-such-bucket'\n")
    assert main(["inspect", f"{s3_bucket}/absent.zarr"]) == 2
    assert capsys.readouterr().err.endswith(f"{s3_bucket}/absent.zarr: no such store\n")
    monkeypatch.setitem(fsspec.config.conf, "s3", fsspec.config.conf["s3"] | {"anon": True})
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        assert main(["inspect", f"{s3_bucket}/private.zarr"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"observatory: error: {s3_bucket}/private.zarr: access denied (")
        assert err.count("\n") == 1
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    """A plain static file server: no Range support (every GET answers the whole file)."""

    def log_message(self, *args) -> None:
        pass


class _Forbidden(_Quiet):
    def do_GET(self) -> None:
        self.send_error(403)

    do_HEAD = do_GET


@contextmanager
def _serve(directory, handler):
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(directory))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_http_stores_refused_or_missing_are_one_line_and_no_range_support_reads_exactly(
    trained_tiny, capsys
):
    import xarray as xr

    import observatory as obs
    from observatory.cli import main

    _, store = trained_tiny
    before = tree_bytes(store)
    with _serve(store.parent, _Forbidden) as base:
        url = f"{base}/{store.name}"
        assert main(["inspect", url]) == 2
        assert (
            capsys.readouterr().err
            == f"observatory: error: {url}: the server answered HTTP 403 Forbidden\n"
        )
        with pytest.raises(StoreError, match="HTTP 403"):
            obs.open_family(url, size="l2-d16")
    with _serve(store.parent, _Quiet) as base:
        assert main(["inspect", f"{base}/missing.zarr"]) == 2
        assert capsys.readouterr().err.endswith(f"{base}/missing.zarr: no such store\n")
        # Chunks are whole files: a server without Range requests serves exactly the values.
        remote = obs.open_family(f"{base}/{store.name}", size="l2-d16")
        xr.testing.assert_equal(remote, obs.open_family(store, size="l2-d16"))
    assert tree_bytes(store) == before


@pytest.mark.parametrize(
    "url, cause",
    [
        ("foo://bucket/x.zarr", "not a store URL (Protocol not known: foo)"),
        ("s3://", "no path after '://' (e.g. s3://bucket/family.zarr)"),
        ("http:///", "no path after '://' (e.g. s3://bucket/family.zarr)"),
    ],
)
def test_a_url_that_names_no_store_is_one_line(url, cause, capsys):
    from observatory.cli import main

    assert main(["inspect", url]) == 2
    assert capsys.readouterr().err == f"observatory: error: {url}: {cause}\n"
    with pytest.raises(StoreError, match=cause.split(" (")[0]):
        import observatory as obs

        obs.open_family(url)
