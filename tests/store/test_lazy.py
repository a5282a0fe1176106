import re

import pytest

from observatory.errors import StoreError


def test_a_store_served_over_http_reads_lazily_and_is_read_only(trained_tiny, tmp_path, capsys):
    import xarray as xr

    from observatory import open_family
    from observatory.cli import main
    from observatory.store import FamilyStore, create_family
    from tests.conftest import http_server

    spec, local = trained_tiny
    with http_server(local.parent) as (base, served):
        url = f"{base}/{local.name}"
        assert main(["inspect", url]) == 0
        assert "seed1" in capsys.readouterr().out
        remote = open_family(url, size="l2-d16")
        xr.testing.assert_equal(remote, open_family(local, size="l2-d16"))

        served.clear()
        head = remote["W_Q"].sel(layer=1, head=0).values  # every seed and checkpoint
        assert head.shape[:2] == (2, len(remote["step"]))
        qkv = "gpt_neox.layers.attention.query_key_value.weight"
        data = [(path, n) for path, n in served if not path.endswith("zarr.json")]
        # only layer 1's first block of d_head rows (W_Q of head 0): one request per file
        assert data and all(re.search(f"/{qkv}/c/\\d+/1/0/0$", path) for path, _ in data), data
        assert len(data) == len({path for path, _ in data}) == 2 * 3  # seeds x checkpoint blocks
        chunk_files = (local / "l2-d16").rglob(f"{qkv}/c/*/*/*/*")
        assert 20 * sum(n for _, n in data) < sum(f.stat().st_size for f in chunk_files)

        with pytest.raises(StoreError, match="read-only"):
            FamilyStore(url, mode="r+")
        with pytest.raises(StoreError, match="read-only"):
            create_family(url, spec, data={"fingerprint": "x"})
