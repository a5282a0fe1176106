import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from observatory.analysis.phase import final_loss
from observatory.data import build_corpus
from observatory.errors import StoreError
from observatory.spec import load_run_spec
from observatory.store import FamilyStore, create_family, verify_checkpoint
from observatory.train import (
    interrupts_between_steps,
    raise_if_interrupted,
    train_family,
    train_run,
)
from tests.conftest import TINY_TOML, assert_stores_identical, dask_processes, write_spec


def final_params(store, seed=0):
    run = FamilyStore(store).run("l2-d16", seed)
    last = int(run.steps()[-1])
    return last, run.parameters_at(last)


def assert_bit_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == np.float32
        assert np.array_equal(a[name].view(np.uint32), b[name].view(np.uint32)), name


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


def test_stored_indices_rebuild_the_exact_batches_the_trainer_consumed(tiny_spec, tmp_path):
    corpus = build_corpus(tiny_spec.data, context=tiny_spec.train.context, vocab_size=16)
    run = tiny_spec.runs()[1]
    root = create_family(tmp_path / "s.zarr", tiny_spec, data={"fingerprint": corpus.fingerprint})
    consumed = {}
    train_run(
        tiny_spec,
        run,
        root,
        corpus,
        progress=False,
        on_batch=lambda s, t: consumed.setdefault(s, t.clone()),
    )
    reader = FamilyStore(tmp_path / "s.zarr").run(run.size, run.seed)
    assert (
        sorted(consumed)
        == list(range(tiny_spec.train.steps))
        == list(reader.metrics()["train_step"])
    )
    rebuilt_corpus = build_corpus(tiny_spec.data, context=tiny_spec.train.context, vocab_size=16)
    for step, tokens in consumed.items():
        assert torch.equal(rebuilt_corpus.batch(reader.batch_indices(step)), tokens)


def test_metrics_and_checkpoints_are_recorded(trained_tiny):
    spec, store = trained_tiny
    family = FamilyStore(store)
    assert [r.path for r in family.runs()] == ["l2-d16/seed0", "l2-d16/seed1"]
    run = family.run("l2-d16", 1)
    assert run.complete
    assert list(run.steps()) == list(spec.checkpoints.steps(spec.train.steps))
    tokens_per_step = spec.train.batch_size * spec.train.context
    assert list(run.tokens_seen()) == [s * tokens_per_step for s in run.steps()]
    metrics = run.metrics()
    assert len(metrics["loss"]) == spec.train.steps
    assert np.all(np.isfinite(metrics["loss"])) and np.all(metrics["grad_norm"] > 0)
    assert metrics["lr"][0] == np.float32(spec.optimizer.lr / spec.optimizer.warmup_steps)
    assert metrics["loss"][-5:].mean() < metrics["loss"][:5].mean()


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


def test_state_every_keeps_optimizer_state_at_keyframes_only(tiny_spec, tmp_path):
    text = TINY_TOML.replace("every = 5", "every = 5\nstate_every = 4")
    spec = load_run_spec(write_spec(tmp_path, text))
    sparse = train_family(spec, store=tmp_path / "k.zarr", seeds=[0], progress=False)
    dense = train_family(tiny_spec, store=tmp_path / "d.zarr", seeds=[0], progress=False)
    run, full = FamilyStore(sparse).run("l2-d16", 0), FamilyStore(dense).run("l2-d16", 0)
    schedule = list(spec.checkpoints.steps(spec.train.steps))  # 0 1 2 4 5 8 10 15 16 20 24
    # every 4th checkpoint, and the last one
    assert list(run.keyframe_steps()) == [0, 5, 16, 24] == [*schedule[::4], schedule[-1]]
    assert list(full.keyframe_steps()) == schedule
    assert_bit_identical(final_params(sparse)[1], final_params(dense)[1])
    assert run.checkpoint(16).moments["exp_avg"].keys() == full.checkpoint(16).params.keys()
    with pytest.raises(StoreError, match=r"step 8 stores weights only.*keyframes: 0, 5, 16, 24"):
        run.checkpoint(8)
    family = FamilyStore(sparse)
    assert (
        family.disk_bytes(f"{run.run.path}/state")
        < FamilyStore(dense).disk_bytes(f"{full.run.path}/state") / 2
    )


def test_resume_between_keyframes_redoes_the_steps_since_the_last_one(tmp_path):
    text = TINY_TOML.replace("every = 5", "every = 5\nstate_every = 4")
    spec = load_run_spec(write_spec(tmp_path, text))
    store = train_family(spec, store=tmp_path / "r.zarr", seeds=[0], progress=False, stop_after=12)
    run = FamilyStore(store).run("l2-d16", 0)
    assert list(run.steps()) == [0, 1, 2, 4, 5, 8, 10] and list(run.keyframe_steps()) == [0, 5]
    train_family(spec, store=store, seeds=[0], progress=False, resume=True)
    clean = train_family(spec, store=tmp_path / "c.zarr", seeds=[0], progress=False)
    assert_bit_identical(final_params(store)[1], final_params(clean)[1])
    resumed = FamilyStore(store).run("l2-d16", 0)
    assert np.array_equal(
        resumed.metrics()["loss"], FamilyStore(clean).run("l2-d16", 0).metrics()["loss"]
    )


def test_stop_after_then_resume_matches_and_refuses_without_resume(tiny_spec, tmp_path):
    store = tmp_path / "r.zarr"
    train_family(tiny_spec, store=store, seeds=[0], progress=False, stop_after=7)
    assert not FamilyStore(store).run("l2-d16", 0).complete
    with pytest.raises(StoreError, match="--resume"):
        train_family(tiny_spec, store=store, seeds=[0], progress=False)
    train_family(tiny_spec, store=store, seeds=[0], progress=False, resume=True)
    clean = train_family(tiny_spec, store=tmp_path / "c.zarr", seeds=[0], progress=False)
    assert_bit_identical(final_params(store)[1], final_params(clean)[1])
    resumed = FamilyStore(store).run("l2-d16", 0)  # steps() reads the schedule, not the array
    assert np.array_equal(resumed.steps(), resumed.group["step"][: resumed.n_checkpoints])
    assert list(resumed.steps()) == list(tiny_spec.checkpoints.steps(tiny_spec.train.steps))


def test_train_run_reports_steps_checkpoints_and_final_loss(tiny_spec, tmp_path):
    corpus = build_corpus(tiny_spec.data, context=tiny_spec.train.context, vocab_size=16)
    run = tiny_spec.runs()[0]
    root = create_family(tmp_path / "s.zarr", tiny_spec, data={"fingerprint": corpus.fingerprint})
    schedule = tiny_spec.checkpoints.steps(tiny_spec.train.steps)

    first = train_run(tiny_spec, run, root, corpus, progress=False, stop_after=7)
    assert (first.run, first.steps) == (run.path, 7)
    assert first.checkpoints == sum(step <= 7 for step in schedule)
    rest = train_run(tiny_spec, run, root, corpus, progress=False, resume=True)
    resumed_from = max(step for step in schedule if step <= 7)  # the last committed checkpoint
    assert rest.steps == tiny_spec.train.steps - resumed_from
    assert first.checkpoints + rest.checkpoints == len(schedule)
    assert rest.seconds > 0 and 0 < rest.writer_seconds < rest.seconds
    stored_loss = FamilyStore(tmp_path / "s.zarr").run(run.size, run.seed).metrics()["loss"]
    assert rest.final_loss == final_loss(stored_loss)  # float32 losses, stored as float32
    assert rest.complete and not first.complete
    done = train_run(tiny_spec, run, root, corpus, progress=False, resume=True)
    assert (done.steps, done.checkpoints, done.final_loss) == (0, 0, None)


@pytest.mark.parametrize(
    "harm, array, message",
    [
        ("flip", "lm_head.weight", "damaged"),
        ("delete", "state/exp_avg/gpt_neox.layers.mlp.dense_h_to_4h.weight", "missing"),
    ],
)
def test_resume_from_a_damaged_checkpoint_is_a_one_line_error_that_changes_nothing(
    tiny_spec_path, tmp_path, capsys, harm, array, message
):
    from observatory.cli import main
    from tests.test_store import damage, tree_bytes

    store = tmp_path / "r.zarr"
    args = ["train", str(tiny_spec_path), "--store", str(store), "--seeds", "0", "--no-progress"]
    assert main([*args, "--stop-after", "7"]) == 0
    run = FamilyStore(store).run("l2-d16", 0)
    last_chunk = (run.n_checkpoints - 1) // 4  # the tiny spec has 4 checkpoints per chunk
    chunk = store / run.run.path / array / "c" / str(last_chunk) / "0"
    chunk = next(p for p in sorted(chunk.rglob("*")) + [chunk] if p.is_file())
    damage(chunk) if harm == "flip" else chunk.unlink()  # a moment chunk: resume needs it
    before = tree_bytes(store)
    out = capsys.readouterr().out  # one summary line per run, then the store
    assert out.startswith("l2-d16/seed0: 7 steps in ") and f"trained into {store}" in out

    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and array in err and message in err
    assert tree_bytes(store) == before


def test_a_second_writer_of_a_run_gets_one_line_naming_the_holder(tiny_spec_path, tmp_path, capsys):
    from observatory.cli import main
    from observatory.store import RunLock
    from tests.test_store import tree_bytes

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


def test_ctrl_c_while_training_is_held_until_the_next_step_boundary():
    handler = signal.getsignal(signal.SIGINT)
    with interrupts_between_steps():
        os.kill(os.getpid(), signal.SIGINT)  # arrives mid-"step": nothing is raised here
        time.sleep(0.05)
        with pytest.raises(KeyboardInterrupt):
            raise_if_interrupted()  # the boundary raises it
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C interrupts at once
            time.sleep(1)
    raise_if_interrupted()  # cleared on leaving the block
    assert signal.getsignal(signal.SIGINT) is handler


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
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
    assert code in (0, 130, -signal.SIGKILL), err
    assert err.count("Traceback") == 0, err
    assert (
        subprocess.run(cli_train(tiny_spec_path, store, "--seeds", "0", "--resume")).returncode == 0
    )
    spec = load_run_spec(tiny_spec_path)
    clean = train_family(spec, store=tmp_path / "clean.zarr", seeds=[0], progress=False)
    assert_bit_identical(final_params(store)[1], final_params(clean)[1])


FAMILY_TOML = TINY_TOML.replace(
    "init = [0, 1]\ndata = [5, 6]", "init = [0, 1, 2, 3]\ndata = [5, 6, 7, 8]"
)


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


def test_the_training_device_is_recorded_with_the_run(trained_tiny):
    _, store = trained_tiny
    devices = FamilyStore(store).run("l2-d16", 0).attrs["devices"]
    assert [d["type"] for d in devices] == ["cpu"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_one_line_error(tmp_path, capsys):
    from observatory.cli import main

    text = TINY_TOML.replace("context = 16\n", 'context = 16\ndevice = "cuda"\n')
    store = tmp_path / "gpu.zarr"
    assert main(["train", str(write_spec(tmp_path, text)), "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.device: 'cuda' but no CUDA device" in err
    assert not store.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_is_deterministic_and_records_the_gpu(tmp_path):
    text = TINY_TOML.replace("context = 16\n", 'context = 16\ndevice = "cuda"\n')
    spec = load_run_spec(write_spec(tmp_path, text))
    first = train_family(spec, store=tmp_path / "a.zarr", progress=False)
    second = train_family(spec, store=tmp_path / "b.zarr", progress=False)
    assert_stores_identical(first, second)
    (device,) = FamilyStore(first).run("l2-d16", 0).attrs["devices"]
    assert device["type"] == "cuda" and device["name"] == torch.cuda.get_device_name()
    assert device["cuda"] == torch.version.cuda
    # resuming on the GPU continues exactly, as on the CPU
    train_family(spec, store=tmp_path / "c.zarr", progress=False, stop_after=9)
    train_family(spec, store=tmp_path / "c.zarr", progress=False, resume=True)
    assert_stores_identical(first, tmp_path / "c.zarr")
