import os
import subprocess
import sys
import time

import pytest

from observatory.errors import StoreError
from observatory.spec import load_run_spec
from observatory.store import FamilyStore, create_family


def test_a_second_writer_of_a_run_gets_one_line_naming_the_holder(tiny_spec_path, tmp_path, capsys):
    from observatory.cli import main
    from observatory.store import RunLock
    from tests.conftest import tree_bytes

    store = tmp_path / "s.zarr"
    args = ["train", str(tiny_spec_path), "--store", str(store), "--seeds", "0", "--no-progress"]
    assert main([*args, "--stop-after", "3"]) == 0
    spec = load_run_spec(tiny_spec_path)
    root = create_family(store, spec, data=FamilyStore(store).attrs["data"])
    before = tree_bytes(store)
    with RunLock(root, spec.runs()[0]):  # another writer holds the run
        capsys.readouterr()
        assert main([*args, "--resume"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert f"l2-d16/seed0 is being written by pid {os.getpid()} on " in err
        assert tree_bytes(store) == before
    assert main([*args, "--resume"]) == 0


def test_a_lock_left_by_a_killed_writer_is_taken_over(tiny_spec, tmp_path):
    import json
    import socket

    from observatory.store import RunLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid no longer exists
    root = create_family(tmp_path / "s.zarr", tiny_spec, data={"fingerprint": "f"})
    lock = RunLock(root, tiny_spec.runs()[0])
    lock.path.parent.mkdir()
    holder = {"host": socket.gethostname(), "pid": dead.pid, "since": 0}
    lock.path.write_text(json.dumps(holder))
    with lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not lock.path.exists() and not lock.path.parent.exists()
    lock.path.parent.mkdir()
    lock.path.write_text(json.dumps(holder | {"host": "elsewhere"}))  # alive, for all we know
    with pytest.raises(StoreError, match="being written by pid"):
        with lock:
            pass
    old = time.time() - 3600  # ... until its heartbeat is stale
    os.utime(lock.path, (old, old))
    with lock:
        pass
