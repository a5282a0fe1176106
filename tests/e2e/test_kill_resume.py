import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from observatory.spec import load_run_spec
from observatory.store import FamilyStore, verify_checkpoint
from observatory.train import (
    train_family,
)
from tests.conftest import TINY_TOML, assert_bit_identical, final_params, write_spec


def _committed(store):
    try:
        family = FamilyStore(store)
        return family.run("l2-d16", 0).n_checkpoints
    except Exception:
        return 0


@pytest.mark.parametrize("state_every", [1, 8])
def test_sigkilled_run_resumes_to_bit_identical_weights(tmp_path, state_every):
    text = TINY_TOML.replace("steps = 24", "steps = 300").replace(
        "every = 5", f"every = 20\nstate_every = {state_every}"
    )
    text = text.replace("init = [0, 1]\ndata = [5, 6]", "init = [0]\ndata = [5]")
    spec_path = write_spec(tmp_path, text)
    spec = load_run_spec(spec_path)
    killed = tmp_path / "killed.zarr"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "observatory.cli",
            "train",
            str(spec_path),
            "--store",
            str(killed),
            "--no-progress",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        # with state_every = 8, past the second keyframe (the 9th checkpoint)
        wanted = 6 if state_every == 1 else 11
        while _committed(killed) < wanted and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    run = FamilyStore(killed).run("l2-d16", 0)
    assert not run.complete, "the run finished before it could be killed"
    assert run.n_checkpoints >= wanted
    # everything a reader can see is complete and readable
    for step in run.steps():
        assert all(np.all(np.isfinite(a)) for a in run.parameters_at(int(step)).values())

    train_family(spec, store=killed, resume=True, progress=False)
    uninterrupted = train_family(spec, store=tmp_path / "clean.zarr", progress=False)
    _, resumed_params = final_params(killed)
    _, clean_params = final_params(uninterrupted)
    assert_bit_identical(resumed_params, clean_params)
    resumed, clean = (
        FamilyStore(killed).run("l2-d16", 0),
        FamilyStore(uninterrupted).run("l2-d16", 0),
    )
    assert np.array_equal(resumed.steps(), clean.steps())
    assert np.array_equal(resumed.metrics()["loss"], clean.metrics()["loss"])
    assert np.array_equal(resumed.group["batch_indices"][:], clean.group["batch_indices"][:])
    assert np.array_equal(resumed.keyframe_steps(), clean.keyframe_steps())
    assert len(clean.keyframe_steps()) == len(spec.checkpoints.keyframes(spec.train.steps))
    for step in clean.keyframe_steps():
        a, b = resumed.checkpoint(int(step)), clean.checkpoint(int(step))
        assert np.array_equal(a.rng_state, b.rng_state)
        assert_bit_identical(a.moments["exp_avg_sq"], b.moments["exp_avg_sq"])
    for step in clean.steps():  # the ledger of the resumed run equals the clean one's
        assert np.array_equal(verify_checkpoint(resumed, step), verify_checkpoint(clean, step))


def cli_train(spec_path, store, *extra):
    command = [sys.executable, "-m", "observatory.cli", "train", str(spec_path)]
    return [*command, "--store", str(store), "--no-progress", *extra]


def test_two_concurrent_trainings_of_one_store_leave_a_single_runs_result(tiny_spec_path, tmp_path):
    store = tmp_path / "s.zarr"
    procs = [
        subprocess.Popen(
            cli_train(tiny_spec_path, store, "--seeds", "0"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = sorted((p.wait(), p.stderr.read()) for p in procs)
    assert [code for code, _ in results] == [0, 2], results
    err = results[1][1]
    assert err.count("\n") == 1, err
    assert "is being written by pid" in err or "already trained" in err, err
    spec = load_run_spec(tiny_spec_path)
    clean = train_family(spec, store=tmp_path / "clean.zarr", seeds=[0], progress=False)
    assert_bit_identical(final_params(store)[1], final_params(clean)[1])
    ours, theirs = FamilyStore(store).run("l2-d16", 0), FamilyStore(clean).run("l2-d16", 0)
    assert np.array_equal(ours.metrics()["loss"], theirs.metrics()["loss"])


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_a_signal_right_after_start_resumes_to_bit_identical_results(tiny_spec_path, tmp_path, sig):
    """A real signal as early as the store appears (creation or first commit)."""
    store = tmp_path / "s.zarr"
    proc = subprocess.Popen(
        cli_train(tiny_spec_path, store, "--seeds", "0"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (store / "l2-d16").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    proc.send_signal(sig)
    code = proc.wait()
    err = proc.stderr.read()
    assert code in (0, 128 + sig, -sig), err  # -sig: it came before or after training
    assert err.count("Traceback") == 0, err
    if code == 128 + sig:
        assert f"interrupted ({sig.name})" in err and "--resume" in err, err
    assert (
        subprocess.run(cli_train(tiny_spec_path, store, "--seeds", "0", "--resume")).returncode == 0
    )
    spec = load_run_spec(tiny_spec_path)
    clean = train_family(spec, store=tmp_path / "clean.zarr", seeds=[0], progress=False)
    assert_bit_identical(final_params(store)[1], final_params(clean)[1])
