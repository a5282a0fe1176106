"""The query layer's describe: `observatory inspect`."""

from __future__ import annotations

from observatory.cli import main


def test_inspect_prints_runs_checkpoints_tokens_and_disk(uncommitted, capsys):
    assert main(["inspect", str(uncommitted)]) == 0
    out = capsys.readouterr().out
    assert "family 'tiny'" in out and "2 runs" in out and "MB on disk" in out
    seed0, seed1 = (line.split() for line in out.splitlines() if "seed" in line)
    assert seed0[:5] == ["seed0", "0", "5", "incomplete", "6/11"]
    assert seed1[:5] == ["seed1", "1", "6", "complete", "11/11"]
    assert "1,536" in seed1 and "512" in seed0 and "kB" in seed1


def test_inspect_missing_store_exits_2_with_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope.zarr")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("observatory: error: ") and "no such store" in err
    assert err.count("\n") == 1
