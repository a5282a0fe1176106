"""The command line: every error is one line and exit code 2 (1 for internal errors)."""

import errno
import os
import shutil
from pathlib import Path

import pytest

from observatory.cli import main
from tests.conftest import TINY_TOML, tree_bytes, write_spec


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "3-1"], "the range '3-1' is empty"),
        (["--seeds", "0-x"], "expected seeds like 0-2 or 0,3"),
        (["--stop-after", "-3"], "expected a positive number, got '-3'"),
        (["--stop-after", "0"], "expected a positive number"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_malformed_arguments_are_one_line_errors(tiny_spec_path, tmp_path, capsys, args, message):
    store = tmp_path / "s.zarr"
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(tiny_spec_path), "--store", str(store), *args])
    assert exit_.value.code == 2
    assert message in one_line_error(capsys)
    assert not store.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "0,5"], "--seeds: no seed 5 in the spec (seeds: 0..1)"),
        (["--sizes", "l2-d61"], "--sizes: no size 'l2-d61' in the spec (sizes: l2-d16)"),
        (["--workers", "2", "--seeds", "0,5"], "--seeds: no seed 5 in the spec (seeds: 0..1)"),
    ],
)
def test_a_selection_typo_is_an_error_and_creates_no_store(
    tiny_spec_path, tmp_path, capsys, args, message
):
    store = tmp_path / "s.zarr"
    assert main(["train", str(tiny_spec_path), "--store", str(store), *args]) == 2
    assert message in one_line_error(capsys)
    assert not store.exists()


def test_a_store_path_naming_a_file_is_a_one_line_error(tiny_spec_path, tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    assert main(["train", str(tiny_spec_path), "--store", str(path)]) == 2
    assert "notes.txt: is a file, not a store" in one_line_error(capsys)
    assert main(["inspect", str(path)]) == 2
    assert "notes.txt" in one_line_error(capsys)
    assert path.read_text() == "mine"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"d_model = 16\n": "d_model = 4194304\n"}, "size 'l2-d16'"),
        ({"n_layers = 2": "n_layers = 100000000"}, "size 'l2-d16'"),
        ({"vocab_size = 16": "vocab_size = 100000000000"}, "size 'l2-d16'"),
        ({"n_sequences = 64": "n_sequences = 1000000000000"}, "for the corpus"),
        ({"batch_size = 4": "batch_size = 100000000000"}, "the activations of a batch"),
        ({"steps = 24": "steps = 1000000000000000"}, "for the checkpoint schedule"),
        ({"steps = 24": "steps = 10000000000000", "every = 5": "every = 0"}, "on disk"),
    ],
)
def test_a_spec_beyond_this_machine_is_refused_before_anything_is_allocated(
    tmp_path, capsys, changes, message
):
    text = TINY_TOML
    for old, new in changes.items():
        assert old in text
        text = text.replace(old, new)
    store = tmp_path / "s.zarr"
    assert main(["train", str(write_spec(tmp_path, text)), "--store", str(store)]) == 2
    err = one_line_error(capsys)
    assert "needs" in err and message in err, err
    assert "this machine has" in err or "free" in err
    assert not store.exists()


def test_a_spec_beyond_this_machine_is_refused_on_local_workers_too(tmp_path, capsys):
    text = TINY_TOML.replace("n_sequences = 64", "n_sequences = 1000000000000")
    store = tmp_path / "s.zarr"
    spec_path = write_spec(tmp_path, text)
    assert main(["train", str(spec_path), "--store", str(store), "--workers", "1"]) == 2
    assert "for the corpus" in one_line_error(capsys)
    assert not store.exists()


def test_an_unexpected_error_prints_one_line_and_where_the_traceback_is(
    trained_tiny, monkeypatch, capsys
):
    import observatory.query

    def broken(path):
        raise RuntimeError("boom")

    monkeypatch.setattr(observatory.query, "describe", broken)
    _, store = trained_tiny
    assert main(["inspect", str(store)]) == 1
    err = one_line_error(capsys)
    assert "internal error: RuntimeError: boom" in err
    log = Path(err.split("traceback in ")[1].split(";")[0])
    assert "Traceback" in log.read_text() and "broken" in log.read_text()
    log.unlink()
    monkeypatch.setenv("OBSERVATORY_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(["inspect", str(store)])


def test_a_full_disk_is_a_one_line_error(tiny_spec_path, tmp_path, monkeypatch, capsys):
    import observatory.train

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "s.zarr"))

    monkeypatch.setattr(observatory.train, "train_family", full)
    assert main(["train", str(tiny_spec_path), "--resume"]) == 2
    assert "No space left on device: " in one_line_error(capsys)


def test_a_store_without_runs_takes_a_corrected_spec(tmp_path, capsys):
    from observatory.spec import load_run_spec
    from observatory.store import create_family

    bad = load_run_spec(write_spec(tmp_path, TINY_TOML.replace("lr = 3e-3", "lr = 1e-3")))
    store = tmp_path / "s.zarr"
    create_family(store, bad, data={"fingerprint": "x"})  # as if a run failed to start
    path = write_spec(tmp_path, TINY_TOML.replace("steps = 24", "steps = 6"), "good.toml")
    assert main(["train", str(path), "--store", str(store), "--seeds", "0", "--no-progress"]) == 0
    before = tree_bytes(store)
    assert main(["train", str(write_spec(tmp_path)), "--store", str(store)]) == 2
    assert "created by a different spec" in one_line_error(capsys)
    assert tree_bytes(store) == before


def test_transitions_say_in_one_line_what_is_missing(trained_tiny, tmp_path, capsys):
    from observatory.jobs.analyze import run_analysis
    from observatory.jobs.job_spec import AnalysisSpec, ExecutionSpec

    store = tmp_path / "tiny.zarr"
    shutil.copytree(trained_tiny[1], store)

    def analyse(**selection) -> None:
        job = AnalysisSpec(
            store=str(store),
            analyses=("per_token_loss",),
            execution=ExecutionSpec(workers=1),
            **selection,
        )
        run_analysis(job, progress=False)

    def fails(expected: str) -> None:
        assert main(["transitions", str(store)]) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err

    fails("no results of analysis 'per_token_loss'; run `observatory analyze` first")
    analyse(seeds=(0,))
    fails("1 seed(s) with per_token_loss results; transitions are matched across seeds")
    analyse(seeds=(1,), steps=(0, 1, 2))
    fails("seed 1 has per_token_loss at 3 checkpoints; transitions need at least 8")
    analyse(seeds=(1,))
    assert main(["transitions", str(store), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("size l2-d16:") and (tmp_path / "out" / "transitions.json").is_file()
    assert main(["transitions", str(store), "--min-overlap", "2"]) == 2
    assert "min_overlap must be at most 1" in capsys.readouterr().err
