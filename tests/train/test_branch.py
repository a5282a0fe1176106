"""Counterfactual branches: a run continued from a step with an intervention."""

from __future__ import annotations

import numpy as np
import pytest

from observatory.errors import ObservatoryError
from observatory.models import stack_layers
from observatory.spec import load_run_spec
from observatory.store import FamilyStore
from observatory.train import Intervention, train_branch, train_branches, train_family
from observatory.train.replay import replay
from tests.conftest import assert_bit_identical, tree_bytes, write_spec

FORK = 7  # no checkpoint of the tiny schedule: the fork's state comes from a replay
NESTED_FORK = 12  # no checkpoint either: replayed through the parent branch, with its hooks
OUTER = Intervention(ablate_heads=((0, 1),), lr=2e-3)  # the parent branch of nested ones


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """The tiny family's seed 0, trained once for the module's branches."""
    directory = tmp_path_factory.mktemp("branch")
    spec = load_run_spec(write_spec(directory))
    store = train_family(spec, store=directory / "tiny.zarr", seeds=[0], progress=False)
    return spec, store


def branch(family, name, intervention=None, **options):
    spec, store = family
    options = {"size": "l2-d16", "seed": 0, "at": FORK, "progress": False} | options
    return train_branch(spec, store=store, name=name, intervention=intervention, **options)


def ensure(family, name, intervention=None, **options):
    """The reader of branch ``name`` (``"a/b"``: ``b`` of ``a``), trained if the module's store
    lacks it."""
    parent, _, own = name.rpartition("/")
    if name not in FamilyStore(family[1]).branches("l2-d16", 0):
        branch(family, own, intervention, branch=parent, **options)
    return FamilyStore(family[1]).run("l2-d16", 0, name)


@pytest.fixture(scope="module")
def outer(family):
    """The branch ``outer`` of seed 0 (:data:`OUTER` from :data:`FORK`), the parent of the
    module's branches of a branch."""
    return ensure(family, "outer", OUTER)


def state_at(reader, step):
    """Every array of the whole training state at a keyframe, and its ledger entries."""
    checkpoint = reader.checkpoint(step)
    index = reader.checkpoint_index(step)
    arrays = dict(checkpoint.params)
    arrays |= {
        f"{m}/{n}": a for m, moments in checkpoint.moments.items() for n, a in moments.items()
    }
    arrays["rng_state"] = checkpoint.rng_state
    arrays["weights_sha256"] = reader.read(reader.array("weights_sha256"), index)
    return arrays


def assert_same_arrays(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].tobytes() == b[name].tobytes(), name


def test_an_empty_intervention_branch_is_bit_identical_to_its_parent(family):
    summary = branch(family, "same")
    assert summary.complete and summary.steps == 24 - FORK
    store = FamilyStore(family[1])
    parent, same = store.run("l2-d16", 0), store.run("l2-d16", 0, "same")
    assert same.branch["fork"] == FORK and same.branch["parent"] == {"size": "l2-d16", "seed": 0}
    assert list(same.steps()) == sorted({*parent.steps().tolist(), FORK})
    for step in parent.steps():
        assert_same_arrays(state_at(parent, int(step)), state_at(same, int(step)))
    for name, values in parent.metrics().items():
        assert values.tobytes() == same.metrics()[name].tobytes(), name
    assert np.array_equal(parent.batch_indices_between(0, 24), same.batch_indices_between(0, 24))
    # the checkpoints before the fork are the parent's, not copied into the branch
    own = store.root["l2-d16/seed0/branches/same"]
    assert own["step"][: same.branch["fork_checkpoint"]].tolist() == [0] * 5


def test_a_killed_branch_resumes_bit_identically(family):
    intervention = Intervention(ablate_heads=((0, 1),))
    branch(family, "whole", intervention)
    branch(family, "killed", intervention, stop_after=4)
    with pytest.raises(ObservatoryError, match="exists"):
        branch(family, "killed", intervention)
    assert branch(family, "killed", intervention, resume=True).complete
    store = FamilyStore(family[1])
    whole, killed = store.run("l2-d16", 0, "whole"), store.run("l2-d16", 0, "killed")
    assert list(whole.steps()) == list(killed.steps())
    for step in whole.steps():
        assert_same_arrays(state_at(whole, int(step)), state_at(killed, int(step)))


def test_ablating_a_head_changes_the_trajectory_and_replay_reproduces_it(family):
    spec, store = family
    branch(family, "ablated", Intervention(ablate_heads=((1, 0),), ablation="mean"))
    reader = FamilyStore(store)
    parent, ablated = reader.run("l2-d16", 0), reader.run("l2-d16", 0, "ablated")
    assert not np.array_equal(parent.metrics()["loss"][FORK:], ablated.metrics()["loss"][FORK:])
    assert ablated.metrics()["loss"][:FORK].tobytes() == parent.metrics()["loss"][:FORK].tobytes()
    # from the keyframe at 16, replaying steps 16..19 with the ablation hooks
    for step, model in replay(store, size="l2-d16", seed=0, branch="ablated", start=18, stop=20):
        if step == 20:
            replayed = stack_layers(dict(model.named_parameters()))
    assert_bit_identical(replayed, ablated.parameters_at(20))


def test_a_frozen_head_keeps_its_weights(family):
    branch(family, "frozen", Intervention(freeze_heads=((0, 1),)))
    reader = FamilyStore(family[1]).run("l2-d16", 0, "frozen")
    qkv = "gpt_neox.layers.attention.query_key_value.weight"
    dense = "gpt_neox.layers.attention.dense.weight"
    first, last = reader.parameters_at(FORK), reader.parameters_at(24)
    rows = slice(3 * 8, 6 * 8)  # head 1 of d_head 8: its q, k and v rows
    assert np.array_equal(first[qkv][0, rows], last[qkv][0, rows])
    assert np.array_equal(first[dense][0][:, 8:16], last[dense][0][:, 8:16])
    assert not np.array_equal(first[qkv][0, :24], last[qkv][0, :24])


def test_dropped_windows_are_never_read(family, tmp_path):
    seen = []
    dropped = (1, 2, 3, 40)
    reader = ensure(family, "drop", Intervention(drop_windows=dropped))
    after = reader.batch_indices_between(FORK, 24)
    assert not np.isin(after, dropped).any()
    parent = FamilyStore(family[1]).run("l2-d16", 0).batch_indices_between(0, 24)
    stream = parent.ravel()[FORK * 4 :]
    kept = stream[~np.isin(stream, dropped)]  # the parent's stream from the fork, filtered
    assert np.array_equal(after.ravel()[: kept.size], kept)
    filters = tmp_path / "filters.py"
    filters.write_text("def starts_low(tokens):\n    return bool(tokens[1] < 4)\n")
    branch(
        family,
        "pred",
        Intervention(drop_predicate=f"{filters}:starts_low"),
        on_batch=lambda s, t: seen.append(t),
    )
    assert all(int(tokens[1]) >= 4 for batch in seen for tokens in batch)
    stored = FamilyStore(family[1]).run("l2-d16", 0, "pred").branch["intervention"]
    assert stored["drop_predicate_sha256"] and stored["drop_windows"]


def test_bad_inputs_are_one_line_and_leave_the_store_unchanged(family, tmp_path):
    spec, store = family
    raises = tmp_path / "raises.py"
    raises.write_text("def bad(tokens):\n    raise ValueError('no')\n")
    if "same" not in FamilyStore(store).branches("l2-d16", 0):
        branch(family, "same")
    before = tree_bytes(store)
    cases = {
        "cannot fork at step 30": {"at": 30},
        "leaves nothing to train": {"at": 24},
        "branch name '../x'": {"name": "../x"},
        "no seed 1": {"seed": 1},
        "exists": {"name": "same"},
        "raised ValueError on window 0: no": {
            "intervention": Intervention(drop_predicate=f"{raises}:bad")
        },
        "no head 2.0": {"intervention": Intervention(ablate_heads=((2, 0),))},
        "window 64 is not in the corpus": {"intervention": Intervention(drop_windows=(64,))},
        "before this branch's own fork at step 7 .* branch that run instead": {
            "branch": "same",
            "at": 3,
        },
        "has no branch 'nope'": {"branch": "nope"},
        "branch name 'x/y'": {"name": "x/y"},
    }
    for message, options in cases.items():
        options = {"name": "new"} | options
        name = options.pop("name")
        with pytest.raises(ObservatoryError, match=message) as err:
            branch(family, name, **options)
        assert "\n" not in str(err.value)
    several = {  # every branch is checked before any trains: the first would train
        "give each parent once": (["l2-d16/seed0", "l2-d16/seed0"], "new"),
        "no branch 'nope'": (["l2-d16/seed0", "l2-d16/seed0/branches/nope"], "new"),
        "expected a run like": (["l2-d16/seed0", "l2-d16/seed0/nope"], "new"),
        "seed0/branches/same exists": (["l2-d16/seed0/branches/same", "l2-d16/seed0"], "same"),
    }
    for message, (runs, name) in several.items():
        with pytest.raises(ObservatoryError, match=message) as err:
            train_branches(spec, store=store, runs=runs, at=FORK, name=name, progress=False)
        assert "\n" not in str(err.value)
    assert tree_bytes(store) == before


@pytest.mark.slow  # verify replays every branch of the module's store on a dask worker
def test_the_branch_command_trains_verifies_and_inspects(family, tmp_path, capsys):
    from observatory.cli import main

    spec, store = family
    spec_path = write_spec(tmp_path)
    common = ["--store", str(store), "--run", "l2-d16/seed0", "--no-progress"]
    windows = tmp_path / "windows.txt"
    windows.write_text("5, 6\n7")
    before = tree_bytes(store)
    bad = {
        "unknown": ["--at", "5", "--name", "x", "--run", "l9-d16/seed0"],
        "beyond": ["--at", "99", "--name", "x"],
        "head": ["--at", "5", "--name", "x", "--ablate-head", "0.7"],
        "list": ["--at", "5", "--name", "x", "--drop-windows", str(tmp_path / "none.txt")],
        "run path": ["--at", "5", "--name", "x", "--run", "l2-d16/seed0/branch/cli"],
    }
    for args in bad.values():
        try:
            code = main(["branch", str(spec_path), *common, *args])
        except SystemExit as err:  # argparse's own errors
            code = err.code
        assert code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert tree_bytes(store) == before
    args = ["--at", "10", "--name", "cli", "--ablate-head", "1.1", "--drop-windows", str(windows)]
    assert main(["branch", str(spec_path), *common, *args]) == 0
    assert "l2-d16/seed0/branches/cli: 14 steps" in capsys.readouterr().out
    nested = ["--store", str(store), "--run", "l2-d16/seed0/branches/cli", "--no-progress"]
    assert main(["branch", str(spec_path), *nested, "--at", "15", "--name", "deeper"]) == 0
    assert "l2-d16/seed0/branches/cli/branches/deeper: 9 steps" in capsys.readouterr().out
    assert main(["inspect", str(store)]) == 0
    out = capsys.readouterr().out
    assert "seed0/cli " in out and "seed0/cli/deeper" in out
    assert main(["verify", str(store), "--no-progress", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "l2-d16/seed0/branches/cli/branches/deeper" in out and "verification failed" not in out


def test_a_branch_of_a_branch_with_no_intervention_is_its_parent_bit_for_bit(family, outer):
    import observatory as obs

    inner = ensure(family, "outer/inner", at=NESTED_FORK)
    assert inner.run.path == "l2-d16/seed0/branches/outer/branches/inner"
    assert inner.branch["parent"] == {"size": "l2-d16", "seed": 0, "branch": "outer"}
    chain = inner.lineage()  # the provenance, from the run's first branch on
    assert [(r["path"], r["fork"]) for r in chain] == [
        (outer.run.path, FORK),
        (inner.run.path, NESTED_FORK),
    ]
    assert chain[0]["intervention"] == outer.branch["intervention"]
    assert chain[0]["intervention_sha256"] == outer.branch["intervention_sha256"]
    assert list(inner.steps()) == sorted({*outer.steps().tolist(), NESTED_FORK})
    for step in outer.steps():  # the parent's ablation and learning rate go on in the branch
        assert_same_arrays(state_at(outer, int(step)), state_at(inner, int(step)))
    for name, values in outer.metrics().items():
        assert values.tobytes() == inner.metrics()[name].tobytes(), name
    assert np.array_equal(outer.batch_indices_between(0, 24), inner.batch_indices_between(0, 24))
    own = FamilyStore(family[1]).root[inner.run.path]  # the rows before the fork: not copied
    assert not own["step"][: inner.branch["fork_checkpoint"]].any()
    ds = obs.open_family(family[1], size="l2-d16", branches=True)
    assert "outer/inner" in ds["branch"].values
    loss = obs.open_run(family[1], size="l2-d16", seed=0, branch="outer/inner")["loss"]
    assert loss.values.tobytes() == outer.metrics()["loss"].tobytes()


def test_a_killed_branch_of_a_branch_resumes_bit_identically(family, outer):
    inner = ensure(family, "outer/inner", at=NESTED_FORK)
    branch(family, "killed", branch="outer", at=NESTED_FORK, stop_after=3)
    killed = FamilyStore(family[1]).run("l2-d16", 0, "outer/killed")
    assert not killed.complete
    assert branch(family, "killed", branch="outer", at=NESTED_FORK, resume=True).complete
    killed = FamilyStore(family[1]).run("l2-d16", 0, "outer/killed")
    assert list(killed.steps()) == list(inner.steps())
    for step in inner.own_steps():
        assert_same_arrays(state_at(inner, int(step)), state_at(killed, int(step)))


def test_a_branch_of_a_branch_takes_both_interventions_in_training_replay_and_verify(family, outer):
    from observatory.jobs.verify import _check_run, _tasks, replay_span

    _, store = family
    second = ensure(
        family, "outer/second", Intervention(ablate_heads=((1, 1),), ablation="mean"), at=16
    )
    assert not np.array_equal(outer.metrics()["loss"][16:], second.metrics()["loss"][16:])
    assert outer.metrics()["loss"][:16].tobytes() == second.metrics()["loss"][:16].tobytes()
    assert _check_run(second).failure is None  # verify's checksums, ledger, lr and batches
    spans = _tasks(second)  # what verify replays on dask, here in this process
    assert spans and spans[0][0] == 16
    for span in spans:
        compared, failure = replay_span(str(store), "l2-d16", 0, *span, "outer/second")
        assert failure is None and compared
    # from the keyframe at 15 (the parent's, read through it): the parent's hooks, then both
    for step, model in replay(
        store, size="l2-d16", seed=0, branch="outer/second", start=15, stop=20
    ):
        if step == 20:
            assert_bit_identical(
                stack_layers(dict(model.named_parameters())), second.parameters_at(20)
            )


def test_a_branch_of_a_dropping_branch_drops_both_lists_from_its_parents_stream(family):
    parent = ensure(family, "drop", Intervention(drop_windows=(1, 2, 3, 40)))
    child = ensure(family, "drop/more", Intervention(drop_windows=(5, 6, 9)), at=NESTED_FORK)
    after = child.batch_indices_between(NESTED_FORK, 24)
    assert not np.isin(after, (1, 2, 3, 40, 5, 6, 9)).any()
    stream = parent.batch_indices_between(NESTED_FORK, 24).ravel()  # the parent's from the fork
    kept = stream[~np.isin(stream, (5, 6, 9))]
    assert np.array_equal(after.ravel()[: kept.size], kept)
    assert np.array_equal(
        child.batch_indices_between(0, NESTED_FORK), parent.batch_indices_between(0, NESTED_FORK)
    )


@pytest.mark.slow  # starts a local dask cluster of two worker processes
def test_branches_on_two_dask_workers_are_bit_identical_to_branches_trained_here(
    family, outer, tmp_path, capsys
):
    from observatory.cli import main

    spec, store = family
    runs = ["l2-d16/seed0", "l2-d16/seed0/branches/outer"]
    intervention = Intervention(freeze_heads=((1, 0),), data_seed=11)
    here = train_branches(
        spec,
        store=store,
        runs=runs,
        at=NESTED_FORK,
        name="here",
        intervention=intervention,
        progress=False,
    )
    assert [s.run for s in here] == [f"{run}/branches/here" for run in runs]
    args = ["branch", str(write_spec(tmp_path)), "--store", str(store), "--no-progress"]
    args += ["--run", runs[0], "--run", runs[1], "--at", str(NESTED_FORK), "--name", "dask"]
    args += ["--freeze-head", "1.0", "--data-seed", "11", "--workers", "2"]
    assert main(args) == 0
    assert capsys.readouterr().out.count(f"{24 - NESTED_FORK} steps") == 2
    reader = FamilyStore(store)
    for parent in ("", "outer/"):
        local, remote = (reader.run("l2-d16", 0, f"{parent}{name}") for name in ("here", "dask"))
        assert local.branch == remote.branch
        assert list(local.steps()) == list(remote.steps())
        for step in local.own_steps():
            assert_same_arrays(state_at(local, int(step)), state_at(remote, int(step)))
        for name, values in local.metrics().items():
            assert values.tobytes() == remote.metrics()[name].tobytes(), name
        batches = (r.batch_indices_between(0, 24) for r in (local, remote))
        assert np.array_equal(*batches)
