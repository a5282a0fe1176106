import shutil

import pytest
import zarr

import observatory as obs
from observatory.cli import main
from observatory.models import stack_layers
from observatory.store import FamilyStore, state_digest, weights_digest
from tests.conftest import damage


@pytest.fixture
def copied(trained_tiny, tmp_path):
    """A private copy of the trained tiny store, to tamper with."""
    _, store = trained_tiny
    return shutil.copytree(store, tmp_path / "copy.zarr")


def verify(capsys, store, *args):
    code = main(["verify", str(store), "--no-progress", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def overwrite_weights(store, seed, step, params):
    """Replace a checkpoint's weights and its ledger entry, with valid chunk checksums."""
    run = FamilyStore(store).run("l2-d16", seed)
    index = run.checkpoint_index(step)
    group = zarr.open_group(store / run.run.path, mode="r+")
    for name, values in params.items():
        group[name][index] = values
    group["weights_sha256"][index] = weights_digest(params)


@pytest.mark.slow
def test_a_fresh_store_verifies_with_replay_on_two_workers(trained_tiny, capsys):
    spec, store = trained_tiny
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    code, out, err = verify(capsys, store, "--workers", "2")
    assert code == 0, out + err
    n = len(spec.checkpoints.steps(spec.train.steps))
    lines = out.splitlines()
    assert lines[0].split() == ["run", "checkpoints", "replayed", "result"]
    assert lines[1].split() == ["l2-d16/seed0", str(n), str(n - 1), "ok"]  # all but step 0
    assert lines[2].split() == ["l2-d16/seed1", str(n), str(n - 1), "ok"]
    assert lines[-1].startswith("verified 2 runs (checksums, ledger and replay)")
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before


def test_a_damaged_chunk_fails_naming_run_and_step(copied, capsys):
    run = FamilyStore(copied).run("l2-d16", 1)
    index = run.checkpoint_index(8)  # the 6th checkpoint: chunk 1 of 4 checkpoints each
    damage(copied / run.run.path / "lm_head.weight" / "c" / str(index // 4) / "0" / "0")
    code, out, _ = verify(capsys, copied, "--quick")
    assert code == 1
    assert "l2-d16/seed0" in out.splitlines()[1] and out.splitlines()[1].endswith("ok")
    last = out.splitlines()[-1]
    assert last.startswith("verification failed: step 5:")  # the first in the damaged chunk
    assert "l2-d16/seed1/lm_head.weight" in last and "damaged" in last


def test_steps_made_identical_fail_naming_both(copied, capsys):
    run = FamilyStore(copied).run("l2-d16", 0)
    overwrite_weights(copied, 0, 5, run.parameters_at(4))
    code, out, _ = verify(capsys, copied, "--quick")
    assert code == 1
    assert out.splitlines()[-1] == (
        "verification failed: l2-d16/seed0: steps 4 and 5 hold identical weights"
    )


@pytest.mark.slow
def test_weights_of_another_step_with_a_valid_hash_fail_replay(copied, capsys):
    with pytest.warns(UserWarning, match="not a checkpoint"):
        step9 = obs.model_at(copied, size="l2-d16", seed=1, step=9)
    overwrite_weights(copied, 1, 8, stack_layers(dict(step9.named_parameters())))
    code, out, _ = verify(capsys, copied, "--quick", "--seeds", "1")
    assert code == 0, out  # checksums and ledger agree: only replay can tell
    code, out, _ = verify(capsys, copied, "--seeds", "1", "--workers", "1")
    assert code == 1
    assert out.splitlines()[-1] == (
        "verification failed: l2-d16/seed1: the weights stored at step 8 differ from a "
        "replay of steps 5..8 from the keyframe at step 5"
    )


@pytest.mark.slow
def test_optimizer_state_of_another_step_with_a_valid_hash_fails_replay(copied, capsys):
    run = FamilyStore(copied).run("l2-d16", 0)
    moments = run.checkpoint(5).moments  # step 8's keyframe gets step 5's AdamW moments
    rng_state = run.checkpoint(8).rng_state
    keyframe = run.keyframe_index(8)
    group = zarr.open_group(copied / run.run.path / "state", mode="r+")
    for moment, arrays in moments.items():
        for name, values in arrays.items():
            group[f"{moment}/{name}"][keyframe] = values
    group["sha256"][keyframe] = state_digest(moments, rng_state)
    code, out, _ = verify(capsys, copied, "--quick", "--seeds", "0")
    assert code == 0, out  # checksums and ledger agree, and the weights are right
    code, out, _ = verify(capsys, copied, "--seeds", "0", "--workers", "1")
    assert code == 1
    assert out.splitlines()[-1] == (
        "verification failed: l2-d16/seed0: the optimizer and RNG state stored at step 8 "
        "differ from a replay of steps 5..8 from the keyframe at step 5"
    )


def test_weights_that_differ_from_the_ledger_fail(copied, capsys):
    run = FamilyStore(copied).run("l2-d16", 0)
    group = zarr.open_group(copied / run.run.path, mode="r+")
    group["lm_head.weight"][run.checkpoint_index(10)] = run.parameters_at(10)["lm_head.weight"] * 2
    code, out, _ = verify(capsys, copied, "--quick", "--sizes", "l2-d16")
    assert code == 1
    assert out.splitlines()[-1] == (
        "verification failed: l2-d16/seed0: the weights of step 10 differ from the hash "
        "recorded when they were written"
    )


def test_bad_input_is_exit_code_2(trained_tiny, tmp_path, capsys):
    _, store = trained_tiny
    assert verify(capsys, tmp_path / "nothing.zarr")[0] == 2
    code, _, err = verify(capsys, store, "--seeds", "7", "--quick")
    assert code == 2 and "no seed 7" in err and err.count("\n") == 1


def test_a_run_still_training_verifies_what_is_committed(tiny_spec, tmp_path, capsys):
    from observatory.train import train_family

    store = train_family(
        tiny_spec, store=tmp_path / "s.zarr", seeds=[0], progress=False, stop_after=10
    )
    code, out, _ = verify(capsys, store, "--quick")
    assert code == 0, out
    assert out.splitlines()[1].split() == ["l2-d16/seed0", "7", "0", "ok"]  # 0 1 2 4 5 8 10
