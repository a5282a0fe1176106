import numpy as np
import pytest
import torch

import observatory as obs
from observatory.errors import StoreError
from observatory.models import build_model, stack_layers, unstack_layers
from observatory.spec import load_run_spec
from observatory.store import FamilyStore
from observatory.train import train_family
from observatory.train.replay import RecipeError
from tests.conftest import TINY_TOML, assert_bit_identical, write_spec


def weights(model) -> dict[str, np.ndarray]:
    return stack_layers(dict(model.named_parameters()))


def store_bytes(store):
    return {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}


def test_replay_reaches_every_stored_checkpoint_bit_identically(trained_tiny):
    _, store = trained_tiny
    run = FamilyStore(store).run("l2-d16", 1)
    before = store_bytes(store)
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    seen = []
    for step, model in obs.replay(store, size="l2-d16", seed=1, start=6, stop=20):
        seen.append(step)
        if step in run.steps():
            assert_bit_identical(weights(model), run.parameters_at(step))
    assert seen == list(range(6, 21))
    checked = [s for s in run.steps() if 6 <= s <= 20]
    assert checked == [8, 10, 15, 16, 20]
    # replay leaves the caller's RNG and threads alone, and never writes to the store
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads
    assert store_bytes(store) == before


def test_replay_yields_every_nth_step_from_start(trained_tiny):
    _, store = trained_tiny
    steps = [s for s, _ in obs.replay(store, size="l2-d16", seed=0, start=3, stop=12, every=4)]
    assert steps == [3, 7, 11]


def test_model_at_a_step_between_checkpoints_equals_a_run_that_saved_it(trained_tiny, tmp_path):
    spec, store = trained_tiny
    assert 13 not in spec.checkpoints.steps(spec.train.steps)
    with pytest.warns(UserWarning, match="step 13 is not a checkpoint; replayed 3 steps from"):
        model = obs.model_at(store, size="l2-d16", seed=0, step=13)
    assert not model.training
    text = TINY_TOML.replace("every = 5", "every = 5\nextra = [13]")
    other = train_family(
        load_run_spec(write_spec(tmp_path, text)), store=tmp_path / "x.zarr", seeds=[0]
    )
    saved = FamilyStore(other).run("l2-d16", 0).parameters_at(13)
    assert_bit_identical(weights(model), saved)


def test_on_step_gets_the_gradients_of_every_step(trained_tiny):
    spec, store = trained_tiny
    run = FamilyStore(store).run("l2-d16", 0)
    calls = []

    def on_step(step, model, batch, loss, grads):
        calls.append((step, weights(model), batch.clone(), loss, grads))

    replayed = obs.replay(store, size="l2-d16", seed=0, start=9, stop=12, on_step=on_step)
    assert [s for s, _ in replayed] == [9, 10, 11, 12]
    assert [c[0] for c in calls] == [8, 9, 10, 11]  # from the keyframe at 8
    loss = run.metrics()["loss"]
    fresh = build_model(spec.model, spec.size("l2-d16"), init_seed=0)
    torch.set_num_threads(spec.train.threads)
    for step, stacked, batch, step_loss, grads in calls:
        if step in run.steps():
            assert_bit_identical(stacked, run.parameters_at(step))
        assert torch.equal(batch, obs.batch_at(store, size="l2-d16", seed=0, step=step))
        assert np.float32(step_loss) == loss[step]
        fresh.load_state_dict(unstack_layers(stacked))
        fresh.zero_grad(set_to_none=True)
        fresh(input_ids=batch, labels=batch).loss.backward()
        assert grads.keys() == dict(fresh.named_parameters()).keys()
        for name, p in fresh.named_parameters():
            assert torch.equal(grads[name], p.grad), (step, name)


def test_replay_refuses_another_recipe_unless_not_strict(trained_tiny, monkeypatch):
    _, store = trained_tiny
    import observatory.train.replay as replay_module

    real = replay_module.recipe_record
    monkeypatch.setattr(
        replay_module, "recipe_record", lambda spec: real(spec) | {"torch": "0.0.1"}
    )
    with pytest.raises(RecipeError, match=r"torch 0.0.1 \(recorded .*strict=False") as err:
        obs.replay(store, size="l2-d16", seed=0, start=1, stop=2)
    assert "\n" not in str(err.value)
    with pytest.warns(UserWarning, match="torch 0.0.1"):
        steps = obs.replay(store, size="l2-d16", seed=0, start=1, stop=2, strict=False)
    assert [s for s, _ in steps] == [1, 2]


def test_replay_of_a_run_still_training_stops_at_what_is_committed(tiny_spec, tmp_path):
    store = train_family(
        tiny_spec, store=tmp_path / "s.zarr", seeds=[0], progress=False, stop_after=10
    )
    run = FamilyStore(store).run("l2-d16", 0)
    assert not run.complete and run.n_steps == 10
    *_, (last, model) = obs.replay(store, size="l2-d16", seed=0, start=6, stop=10)
    assert last == 10 and 10 in run.steps()
    assert_bit_identical(weights(model), run.parameters_at(10))
    with pytest.raises(StoreError, match=r"cannot replay steps 6..11: steps 0..10 are recorded"):
        obs.replay(store, size="l2-d16", seed=0, start=6, stop=11)


def test_an_ingested_run_cannot_be_replayed_and_says_why(trained_tiny, tmp_path, capsys):
    from observatory.cli import main
    from tests.conftest import tree_bytes

    _, store = trained_tiny
    assert main(["export", str(store), "--seed", "0", "--out", str(tmp_path / "hf")]) == 0
    ingested = tmp_path / "in.zarr"
    assert main(["ingest", str(tmp_path / "hf"), "--out", str(ingested), "--no-progress"]) == 0
    capsys.readouterr()
    before = tree_bytes(ingested)
    why = "without optimizer state or data order: it cannot be replayed, which needs both"
    for call in (
        lambda: list(obs.replay(ingested, size="l2-d16", seed=0, start=0, stop=2)),
        lambda: list(obs.replay(ingested, size="l2-d16", seed=0, start=0, stop=2, strict=False)),
        lambda: obs.model_at(ingested, size="l2-d16", seed=0, step=3),  # between checkpoints
    ):
        with pytest.raises(StoreError) as raised:
            call()
        message = str(raised.value)
        assert "\n" not in message and "recipe" not in message and "strict" not in message
        assert why in message or "no committed checkpoint at step 3 (nearest: 2, 4;" in message
    assert main(["verify", str(ingested), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and why in err and "verify --quick" in err
    assert main(["verify", str(ingested), "--quick", "--no-progress"]) == 0  # checksums, ledger
    assert tree_bytes(ingested) == before
