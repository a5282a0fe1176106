import shutil

import numpy as np
import pytest

from observatory.errors import StoreError
from observatory.store import (
    FamilyStore,
)
from tests.conftest import damage, tree_bytes


def test_a_damaged_chunk_is_a_clear_error_not_wrong_numbers(trained_tiny, tmp_path):
    _, trained = trained_tiny
    store = tmp_path / "copy.zarr"
    shutil.copytree(trained, store)
    run = FamilyStore(store).run("l2-d16", 0)
    qkv = "gpt_neox.layers.attention.query_key_value.weight"  # chunked per head
    damage(store / run.run.path / qkv / "c" / "0" / "0" / "0" / "0")  # checkpoints 0..3
    damage(store / run.run.path / "gpt_neox.embed_in.weight" / "c" / "1" / "0" / "0")  # 4..7
    damage(store / run.run.path / "loss" / "c" / "0")
    with pytest.raises(StoreError, match=f"{qkv}.*damaged"):
        run.parameters_at(1)
    with pytest.raises(StoreError, match="embed_in.weight.*damaged"):
        run.parameters_at(5)  # the 5th checkpoint
    with pytest.raises(StoreError, match="loss.*damaged"):
        run.metrics()
    assert set(run.parameters_at(16)) == set(run.parameter_names)  # the 9th: still readable


QKV = "gpt_neox.layers.attention.query_key_value.weight"


# A file of each kind of array, and the checkpoint steps / train steps it holds (the tiny
# spec has 4 checkpoints per chunk: index 4..7 is steps 5, 8, 10, 15).
MISSING_FILES = {
    "weights": (f"{QKV}/c/1/0/0/0", "checkpoint steps 5..15"),
    "moments": ("state/exp_avg_sq/lm_head.weight/c/1/0/0", "keyframe 4..7"),
    "loss": ("loss/c/0", "train_step 0..23"),
    "batches": ("batch_indices/c/0/0", "train_step 0..23"),
}


def read_paths(store):
    """Every way observatory reads a run's stored data (each must fail on a missing file)."""
    import observatory as obs
    from observatory.query import models_at

    def run():
        return FamilyStore(store).run("l2-d16", 0)

    family = {"size": "l2-d16", "seed": 0}
    return {
        "parameters_at": lambda: run().parameters_at(10),
        "checkpoint": lambda: run().checkpoint(10),
        "model_at": lambda: obs.model_at(store, **family, step=10),
        "models_at": lambda: list(models_at(store, **family, steps=[8, 10])),
        "head_weights": lambda: obs.head_weights(store, **family, layer=0, head=0),
        "lazy": lambda: obs.open_family(store, size="l2-d16")["W_Q"].sel(seed=0).values,
        "lazy_raw": lambda: obs.open_run(store, **family)[QKV].values,
        "lazy_moment": lambda: obs.open(store)["l2-d16/seed0"].to_dataset(),
        "metrics": lambda: run().metrics(),
        "lazy_loss": lambda: obs.open_run(store, **family)["loss"].values,
        "batch_indices": lambda: run().batch_indices(3),
        "batch_at": lambda: obs.batch_at(store, **family, step=3),
        "lazy_batches": lambda: obs.open_run(store, **family)["batch_indices"].values,
    }


READS = {
    "weights": ["parameters_at", "checkpoint", "model_at", "models_at", "head_weights", "lazy"],
    "moments": ["checkpoint"],
    "loss": ["metrics", "lazy_loss"],
    "batches": ["batch_indices", "batch_at", "lazy_batches"],
}


@pytest.mark.parametrize("kind", sorted(MISSING_FILES))
def test_a_missing_chunk_is_an_error_on_every_read_path_never_a_fill_value(
    trained_tiny, tmp_path, kind
):
    _, trained = trained_tiny
    store = tmp_path / "copy.zarr"
    shutil.copytree(trained, store)
    relpath, held = MISSING_FILES[kind]
    (store / "l2-d16/seed0" / relpath).unlink()
    before = tree_bytes(store)
    array = relpath.split("/c/")[0]
    paths = read_paths(store)
    for name in READS[kind]:
        with pytest.raises(StoreError) as err:
            paths[name]()
        message = str(err.value)
        assert "\n" not in message, name
        assert f"l2-d16/seed0/{array}: stored data is missing" in message, (name, message)
        assert held in message, (name, message)
    assert tree_bytes(store) == before
    # what the missing file did not hold still reads (the other seed, other checkpoints)
    FamilyStore(store).run("l2-d16", 1).checkpoint(10)
    assert FamilyStore(store).run("l2-d16", 0).parameters_at(0)


def test_a_missing_analysis_chunk_is_damage_not_missing_results(trained_tiny, tmp_path, capsys):
    import observatory as obs
    from observatory.cli import main
    from tests.report.test_summary import analysed_copy

    _, trained = trained_tiny
    store = analysed_copy(trained, tmp_path / "a.zarr")
    (store / "l2-d16/seed1/analysis/head_scores/induction_score/c/0/0/0").unlink()
    (store / "l2-d16/seed0/analysis/icl/step/c/0").unlink()
    before = tree_bytes(store)
    with pytest.raises(StoreError, match="induction_score: stored data is missing"):
        obs.open_run(store, size="l2-d16", seed=1)["induction_score"].compute()
    with pytest.raises(StoreError, match="icl/step: stored data is missing"):
        obs.summary(store)
    assert main(["report", str(store), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "analysis/icl/step: stored data is missing" in err
    assert tree_bytes(store) == before


def test_a_flipped_byte_fails_every_read_of_its_chunk_and_no_other(trained_tiny, tmp_path):
    """Each chunk is checksummed: a read returns exactly the stored values or fails."""
    import observatory as obs

    _, trained = trained_tiny
    store = tmp_path / "copy.zarr"
    shutil.copytree(trained, store)
    clean = obs.open_run(trained, size="l2-d16", seed=0)["W_Q"].values
    damage(store / "l2-d16/seed0" / QKV / "c/1/0/0/0")  # one head's chunk of checkpoints 4..7
    before = tree_bytes(store)
    ds = obs.open_run(store, size="l2-d16", seed=0)
    failed = []
    for layer in range(2):
        for head in range(2):
            lazy = ds["W_Q"].sel(layer=layer, head=head)
            try:
                values = lazy.values
            except StoreError as err:
                assert "\n" not in str(err) and f"{QKV}: stored data is damaged" in str(err)
                failed.append((layer, head))
                with pytest.raises(StoreError, match="damaged"):
                    obs.head_weights(store, size="l2-d16", seed=0, layer=layer, head=head)
                continue
            # the chunks the flipped byte is not in read back exactly
            np.testing.assert_array_equal(values, clean[:, layer, head])
            np.testing.assert_array_equal(lazy.isel(step=slice(0, 4)), clean[:4, layer, head])
    assert len(failed) == 1
    for read in ("parameters_at", "checkpoint", "model_at", "models_at", "lazy_raw"):
        with pytest.raises(StoreError, match="damaged"):
            read_paths(store)[read]()
    assert tree_bytes(store) == before


def rewrite_json(path, change):
    import json

    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def test_metadata_that_disagrees_with_the_markers_is_a_one_line_error(
    trained_tiny, tmp_path, capsys
):
    import observatory as obs
    from observatory.cli import main

    _, trained = trained_tiny
    cases = {
        "markers beyond the arrays": (
            "l2-d16/seed0/zarr.json",
            lambda m: m["attributes"]["observatory"].update(committed_checkpoints=99) or m,
            "commit markers (99 checkpoints",
        ),
        "shrunk array": (
            f"l2-d16/seed0/{QKV}/zarr.json",
            lambda m: m.update(shape=[5, *m["shape"][1:]]) or m,
            f"{QKV}: metadata disagrees with the commit markers (5 entries along 'step', 11",
        ),
        "shrunk per-step array": (
            "l2-d16/seed1/loss/zarr.json",
            lambda m: m.update(shape=[3]) or m,
            "loss: metadata disagrees with the commit markers (3 entries along 'train_step'",
        ),
    }
    for case, (relpath, change, message) in cases.items():
        store = tmp_path / case.replace(" ", "_")
        shutil.copytree(trained, store)
        rewrite_json(store / relpath, change)
        before = tree_bytes(store)
        with pytest.raises(StoreError, match=message.replace("(", r"\(")):
            seed = int(relpath.split("/")[1][-1])
            # the lazy path reads an array's metadata when it reads the array
            variable = QKV if case == "shrunk array" else "loss"
            obs.open_family(store, size="l2-d16")[variable].sel(seed=seed).compute()
        assert main(["inspect", str(store)]) in (0, 2)
        capsys.readouterr()
        assert tree_bytes(store) == before, case
    store = tmp_path / "invalid_json"
    shutil.copytree(trained, store)
    (store / "l2-d16/seed1/zarr.json").write_text("{not json")
    assert main(["inspect", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "l2-d16/seed1/zarr.json: metadata is damaged" in err
