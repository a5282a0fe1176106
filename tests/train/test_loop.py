import numpy as np
import pytest
import torch

from observatory.analysis.phase import final_loss
from observatory.data import build_corpus
from observatory.errors import StoreError
from observatory.spec import load_run_spec
from observatory.store import FamilyStore, create_family
from observatory.train import (
    train_family,
    train_run,
)
from tests.conftest import TINY_TOML, assert_bit_identical, final_params, write_spec


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
    from tests.conftest import damage, tree_bytes

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
