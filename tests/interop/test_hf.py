"""Export to per-step Hugging Face folders and ingest of such folders (observatory/interop.py)."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
import xarray as xr
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

import observatory as obs
from observatory.cli import main
from observatory.errors import StoreError
from observatory.spec import load_run_spec
from observatory.store import FamilyStore
from observatory.train import train_family
from tests.conftest import TINY_TOML, tree_bytes, write_spec
from tests.jobs.test_analyze import JOB  # the tiny analysis job

SIZE = "l2-d16"


@pytest.fixture(scope="module")
def scheduler():
    """One single-worker dask cluster for this module's analysis jobs (started once)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def three_seeds(tmp_path_factory):
    """The tiny family trained with three seeds."""
    directory = tmp_path_factory.mktemp("three")
    text = TINY_TOML.replace("init = [0, 1]", "init = [0, 1, 2]")
    spec = load_run_spec(write_spec(directory, text.replace("data = [5, 6]", "data = [5, 6, 7]")))
    return spec, train_family(spec, store=directory / "tiny.zarr", progress=False)


def analyze(store, directory, scheduler) -> None:
    job = directory / f"{store.stem}.toml"
    job.write_text(JOB.format(store=store))
    assert main(["analyze", str(job), "--scheduler", scheduler, "--no-progress"]) == 0


def test_round_trip_export_ingest_gives_the_same_analysis(three_seeds, scheduler, tmp_path):
    spec, store = three_seeds
    assert main(["export", str(store), "--seeds", "0-2", "--out", str(tmp_path / "hf")]) == 0
    runs = [tmp_path / "hf" / f"seed{k}" for k in range(3)]
    ingested = tmp_path / "ingested.zarr"
    assert main(["ingest", *map(str, runs), "--out", str(ingested), "--no-progress"]) == 0

    original, copy = obs.open_family(store, size=SIZE), obs.open_family(ingested, size=SIZE)
    for name in ("W_Q", "W_O", "W_E", "W_U", "loss", "lr", "grad_norm"):
        xr.testing.assert_identical(original[name].load(), copy[name].load())
    analyze(store, tmp_path, scheduler)
    analyze(ingested, tmp_path, scheduler)
    original, copy = obs.open_family(store, size=SIZE), obs.open_family(ingested, size=SIZE)
    results = [name for name in original.data_vars if "analysis" in original[name].attrs]
    assert {"induction_score", "tl_induction_score", "copying_score", "icl_score"} <= set(results)
    for name in results:
        np.testing.assert_allclose(copy[name].values, original[name].values, rtol=0, atol=1e-6)
    columns = ["emergence_crossing_step", "emergence_midpoint_step", "best_head"]
    expected = obs.summary(store).per_seed[columns]
    assert obs.summary(ingested).per_seed[columns].equals(expected)


def test_export_writes_hugging_face_folders_and_provenance(trained_tiny, tmp_path):
    spec, store = trained_tiny
    out = tmp_path / "pythia-style"
    assert main(["export", str(store), "--seed", "1", "--steps", "0,8,24", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["step0", "step24", "step8"]
    tokens = torch.randint(1, 16, (2, 16))
    for step in (0, 8, 24):
        folder = out / f"step{step}"
        loaded = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
        expected = obs.model_at(store, size=SIZE, seed=1, step=step)
        for (name, got), want in zip(loaded.named_parameters(), expected.parameters(), strict=True):
            assert torch.equal(got, want), name
        with torch.no_grad():
            assert torch.equal(loaded(tokens).logits, expected(tokens).logits)
    provenance = json.loads((out / "observatory.json").read_text())
    assert provenance["spec"] == spec.to_dict()
    assert (provenance["seed"], provenance["init_seed"], provenance["data_seed"]) == (1, 1, 6)
    assert provenance["steps"] == [0, 8, 24]
    with (out / "data_order.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 24 * spec.train.batch_size  # every step up to the last checkpoint
    for step in (0, 23):
        recorded = [int(r["sequence_index"]) for r in rows if int(r["train_step"]) == step]
        assert (
            recorded
            == obs.open_run(store, size=SIZE, seed=1)["batch_indices"][step].values.tolist()
        )


def test_export_of_a_text_family_writes_its_tokenizer_and_ingest_keeps_it(trained_text, tmp_path):
    from transformers import AutoTokenizer

    _, store, _ = trained_text
    out = tmp_path / "hf"
    assert main(["export", str(store), "--seed", "0", "--steps", "0,8", "--out", str(out)]) == 0
    stored = obs.tokenizer(store)
    text = "def main(a, b):\n    return 'café'"
    for step in (0, 8):
        folder = out / f"step{step}"
        # transformers 5 keeps the special tokens in tokenizer_config.json (4.x also wrote
        # special_tokens_map.json)
        assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
        loaded = AutoTokenizer.from_pretrained(folder)
        assert loaded(text)["input_ids"] == stored(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"]) == text
        assert loaded.bos_token_id == loaded.eos_token_id == loaded.pad_token_id == 0
    ingested = tmp_path / "ingested.zarr"
    assert main(["ingest", str(out), "--out", str(ingested), "--no-progress"]) == 0
    again = obs.tokenizer(ingested)
    assert again(text)["input_ids"] == stored(text)["input_ids"]


def test_export_of_a_token_id_family_writes_no_tokenizer(trained_tiny, tmp_path):
    _, store = trained_tiny
    out = tmp_path / "hf"
    assert main(["export", str(store), "--seed", "0", "--steps", "0", "--out", str(out)]) == 0
    assert not any("token" in p.name for p in (out / "step0").iterdir())


def test_ingested_run_refuses_batches_resume_and_says_where_it_came_from(
    trained_tiny, tmp_path, capsys
):
    spec, store = trained_tiny
    obs_dir = tmp_path / "hf"
    assert main(["export", str(store), "--seed", "0", "--out", str(obs_dir)]) == 0
    ingested = tmp_path / "in.zarr"
    assert main(["ingest", str(obs_dir), "--out", str(ingested), "--no-progress"]) == 0
    capsys.readouterr()
    with pytest.raises(StoreError, match="ingested from .*without optimizer state or data order"):
        obs.batch_at(ingested, size=SIZE, seed=0, step=3)
    with pytest.raises(StoreError, match="cannot be resumed"):
        train_family(spec, store=ingested, resume=True, progress=False)
    assert main(["inspect", str(ingested)]) == 0
    out = capsys.readouterr().out
    assert "ingested" in out and str(obs_dir.resolve()) in out and "config " in out


def neox_series(directory, *, seed: int, steps, step_name="checkpoint-{}", **config):
    """Checkpoint folders of a tiny GPTNeoXForCausalLM that differs from ours."""
    settings = {
        "vocab_size": 20,
        "hidden_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 3,
        "intermediate_size": 48,
        "max_position_embeddings": 32,
        "rotary_pct": 0.5,
        "use_parallel_residual": False,
        "attn_implementation": "eager",
    } | config
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**settings))
    models = {}
    for step in steps:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.01 * torch.randn_like(parameter))
        model.save_pretrained(directory / step_name.format(step))
        models[step] = [p.detach().clone() for p in model.parameters()]
    return models


def test_ingest_of_foreign_gpt_neox_series_analyses_and_reports(scheduler, tmp_path):
    steps = (0, 10, 20, 40)
    saved = [neox_series(tmp_path / f"run{k}", seed=k, steps=steps) for k in range(2)]
    store = tmp_path / "foreign.zarr"
    command = ["ingest", str(tmp_path / "run0"), str(tmp_path / "run1"), "--out", str(store)]
    assert main([*command, "--context", "24", "--no-progress"]) == 0
    ds = obs.open_family(store, size="l2-d24")
    assert ds["W_Q"].shape == (2, 4, 2, 3, 24, 8)
    model = obs.model_at(store, size="l2-d24", seed=1, step=20)
    assert model.config.use_parallel_residual is False
    for parameter, original in zip(model.parameters(), saved[1][20], strict=True):
        assert torch.equal(parameter, original)
    analyze(store, tmp_path, scheduler)
    assert main(["report", str(store), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "report.html").stat().st_size > 0
    assert np.isfinite(obs.open_family(store, size="l2-d24")["induction_score"].values).all()


def test_ingest_reads_a_mapping_file(tmp_path):
    neox_series(tmp_path / "ckpts", seed=0, steps=(0, 5), step_name="rev-{}")
    (tmp_path / "map.json").write_text(json.dumps({"0": "ckpts/rev-0", "5": "ckpts/rev-5"}))
    store = tmp_path / "m.zarr"
    command = ["ingest", str(tmp_path / "map.json"), "--out", str(store), "--size", "tiny"]
    assert main([*command, "--name", "mapped", "--no-progress"]) == 0
    assert obs.open_run(store, size="tiny", seed=0)["step"].values.tolist() == [0, 5]


def test_attention_only_round_trip(trained_tiny_attn_only, tmp_path):
    _, store = trained_tiny_attn_only
    assert (
        main(["export", str(store), "--seed", "0", "--steps", "0,24", "--out", str(tmp_path / "a")])
        == 0
    )
    ingested = tmp_path / "a.zarr"
    assert main(["ingest", str(tmp_path / "a"), "--out", str(ingested), "--no-progress"]) == 0
    for name in ("W_pos", "W_Q", "W_O"):
        expected = obs.open_run(store, size=SIZE, seed=0)[name].sel(step=[0, 24])
        xr.testing.assert_equal(
            obs.open_run(ingested, size=SIZE, seed=0)[name].load(), expected.load()
        )


def one_line_error(capsys, argv) -> str:
    capsys.readouterr()  # drop what the test printed before
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("observatory: error: ") and err.count("\n") == 1, err
    return err


def test_bad_ingest_input_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = str(tmp_path / "x.zarr")
    assert "no checkpoints" in one_line_error(
        capsys, ["ingest", str(tmp_path / "empty"), "--out", out]
    )
    neox_series(tmp_path / "twice", seed=0, steps=(5,), step_name="step{}")
    neox_series(tmp_path / "twice", seed=0, steps=(5,), step_name="checkpoint-{}")
    err = one_line_error(capsys, ["ingest", str(tmp_path / "twice"), "--out", out])
    assert "step 5 appears twice" in err
    neox_series(tmp_path / "a", seed=0, steps=(0,))
    neox_series(tmp_path / "b", seed=0, steps=(0,), num_attention_heads=4)
    err = one_line_error(capsys, ["ingest", str(tmp_path / "a"), str(tmp_path / "b"), "--out", out])
    assert "mixed architectures" in err and "num_attention_heads" in err
    (tmp_path / "map.json").write_text('{"0": "a/checkpoint-0", "0": "b/checkpoint-0"}')
    assert "appears twice" in one_line_error(
        capsys, ["ingest", str(tmp_path / "map.json"), "--out", out]
    )
    (tmp_path / "gpt2" / "step0").mkdir(parents=True)
    (tmp_path / "gpt2" / "step0" / "config.json").write_text('{"model_type": "gpt2"}')
    assert "not supported" in one_line_error(
        capsys, ["ingest", str(tmp_path / "gpt2"), "--out", out]
    )
    assert "no such" in one_line_error(capsys, ["ingest", str(tmp_path / "nope"), "--out", out])
    assert not (tmp_path / "x.zarr").exists()


def test_bad_export_input_is_a_one_line_error(trained_tiny, tmp_path, capsys):
    _, store = trained_tiny
    out = tmp_path / "out"
    err = one_line_error(
        capsys, ["export", str(store), "--seed", "0", "--steps", "3", "--out", str(out)]
    )
    assert "no committed checkpoint at step 3" in err
    assert "no seed 9" in one_line_error(
        capsys, ["export", str(store), "--seed", "9", "--out", str(out)]
    )
    (out / "junk").mkdir(parents=True)
    assert "not empty" in one_line_error(
        capsys, ["export", str(store), "--seed", "0", "--out", str(out)]
    )


@pytest.fixture(scope="module")
def branched(trained_tiny, tmp_path_factory):
    """A copy of the tiny family with a branch of seed 1 (``abl``: head L0H1 ablated from step
    7) and a branch of that branch (``abl/late``: another learning rate from step 12)."""
    from observatory.train import Intervention, train_branch

    spec, store = trained_tiny
    copy = tmp_path_factory.mktemp("branched") / "tiny.zarr"
    shutil.copytree(store, copy)
    run = {"size": SIZE, "seed": 1, "progress": False, "store": copy}
    train_branch(spec, name="abl", at=7, intervention=Intervention(ablate_heads=((0, 1),)), **run)
    train_branch(spec, name="late", branch="abl", at=12, intervention=Intervention(lr=1e-3), **run)
    return spec, copy


@pytest.mark.parametrize("branch", ["abl", "abl/late"])
def test_a_branch_exports_as_a_run_with_its_provenance_and_ingest_keeps_it(
    branched, branch, tmp_path, capsys
):
    from observatory.models import stack_layers

    _, store = branched
    reader = FamilyStore(store).run(SIZE, 1, branch)
    out, path = tmp_path / "hf", reader.run.path
    assert main(["export", str(store), "--run", path, "--out", str(out)]) == 0
    steps = [int(step) for step in reader.steps()]  # the parent's before the fork, then its own
    assert sorted(int(p.name.removeprefix("step")) for p in out.glob("step*")) == steps
    for step in steps:
        loaded = AutoModelForCausalLM.from_pretrained(out / f"step{step}")
        assert loaded.dtype == torch.float32
        read_back = stack_layers(dict(loaded.named_parameters()))
        stored = reader.parameters_at(step)
        assert set(read_back) == set(stored)
        for name, values in stored.items():
            assert read_back[name].tobytes() == values.tobytes(), (step, name)
    provenance = json.loads((out / "observatory.json").read_text())
    record = provenance["branch"]
    assert (record["name"], record["path"], record["fork"]) == (branch, path, reader.branch["fork"])
    assert record["parent"] == reader.branch["parent"]
    assert record["intervention"] == reader.branch["intervention"]
    text = json.dumps(record["intervention"], sort_keys=True, separators=(",", ":"))
    assert record["intervention_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert [r["path"] for r in record["lineage"]] == [r["path"] for r in reader.lineage()]
    assert record["lineage"][0]["path"] == f"{SIZE}/seed1/branches/abl"
    with (out / "metrics.csv").open() as file:
        loss = [float(row["loss"]) for row in csv.DictReader(file)]
    assert np.array_equal(np.float32(loss), reader.metrics()["loss"])
    with (out / "data_order.csv").open() as file:
        order = [int(row["sequence_index"]) for row in csv.DictReader(file)]
    assert order == reader.batch_indices_between(0, 24).ravel().tolist()
    ingested = tmp_path / "ingested.zarr"
    assert main(["ingest", str(out), "--out", str(ingested), "--no-progress"]) == 0
    assert f"the export of branch {path}, forked at step" in capsys.readouterr().out
    assert FamilyStore(ingested).run(SIZE, 1).origin["branch"] == record


def test_a_bad_branch_to_export_is_a_one_line_error(branched, tmp_path, capsys):
    _, store = branched
    out = tmp_path / "out"
    export = ["export", str(store), "--out", str(out)]
    assert "has no branch 'nope' (branches: abl, abl/late)" in one_line_error(
        capsys, [*export, "--run", f"{SIZE}/seed1/branches/nope"]
    )
    assert "has no branch 'abl/nope'" in one_line_error(
        capsys, [*export, "--run", f"{SIZE}/seed1/branches/abl/branches/nope"]
    )
    assert "leave out --size" in one_line_error(
        capsys, [*export, "--run", f"{SIZE}/seed1", "--size", SIZE]
    )
    for wrong in (["--run", f"{SIZE}/seed1/abl"], ["--run", f"{SIZE}/seed1", "--seed", "1"]):
        with pytest.raises(SystemExit) as exit_:
            main([*export, *wrong])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert not out.exists()


@pytest.fixture(scope="module")
def sources(trained_tiny, tmp_path_factory):
    """An export of seed 0 and plain step<N> folders of a foreign model, to ingest from."""
    _, store = trained_tiny
    directory = tmp_path_factory.mktemp("sources")
    assert (
        main(
            [
                "export",
                str(store),
                "--seed",
                "0",
                "--steps",
                "0,24",
                "--out",
                str(directory / "export"),
            ]
        )
        == 0
    )
    neox_series(directory / "plain", seed=0, steps=(0, 4), step_name="step{}")
    return directory


BAD_FLAGS = [
    (["--batch-size", "-1"], "--batch-size: expected a positive number, got -1"),
    (["--batch-size", "0"], "--batch-size: expected a positive number, got 0"),
    (["--context", "0"], "--context: expected at least 2, got 0"),
    (["--context", "-3"], "--context: expected at least 2, got -3"),
    (["--context", "1"], "--context: expected at least 2, got 1"),
    (["--size", "a/b"], "--size: expected a name of letters, digits"),
    (["--size", ""], "--size: expected a name of letters, digits"),
    (["--size", ".."], "--size: expected a name of letters, digits"),
    (["--name", "x y"], "--name: expected a name of letters, digits"),
    (["--name", "a\\b"], "--name: expected a name of letters, digits"),
]


@pytest.mark.parametrize("source", ["export", "plain"])
@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS)
def test_every_ingest_flag_is_checked_the_same_way_for_any_source(
    sources, source, flags, message, tmp_path, capsys
):
    before = tree_bytes(sources)
    out = tmp_path / "new" / "x.zarr"
    err = one_line_error(capsys, ["ingest", str(sources / source), "--out", str(out), *flags])
    assert message in err
    assert not (tmp_path / "new").exists()
    assert tree_bytes(sources) == before


def test_an_export_refuses_the_flags_it_does_not_use(sources, tmp_path, capsys):
    out = tmp_path / "x.zarr"
    for flags in (["--context", "8"], ["--batch-size", "2"], ["--size", "s"], ["--name", "n"]):
        err = one_line_error(capsys, ["ingest", str(sources / "export"), "--out", str(out), *flags])
        assert "an observatory export keeps its recorded family, size, context" in err
        assert f"leave out {flags[0]}" in err
        assert not out.exists()
    # ... which plain folders use.
    command = ["ingest", str(sources / "plain"), "--out", str(out), "--no-progress"]
    assert main([*command, "--context", "8", "--batch-size", "2", "--size", "s"]) == 0
    spec = FamilyStore(out).spec
    assert (spec.train.context, spec.train.batch_size, spec.model.sizes[0].name) == (8, 2, "s")


def test_a_bad_ingest_target_is_a_one_line_error(sources, tmp_path, capsys):
    plain = str(sources / "plain")
    (tmp_path / "file.zarr").write_text("x")
    (tmp_path / "dir.zarr").mkdir()
    cases = {
        str(tmp_path / "file.zarr"): "a file; ingest into a new store",
        str(tmp_path / "dir.zarr"): "already exists; ingest into a new store",
        str(sources / "plain" / "in.zarr"): "inside the checkpoint source",
        "s3://bucket/x.zarr": "ingest writes a local store",
    }
    before = tree_bytes(sources)
    for out, message in cases.items():
        assert message in one_line_error(capsys, ["ingest", plain, "--out", out])
    assert "given twice" in one_line_error(
        capsys, ["ingest", plain, plain, "--out", str(tmp_path / "y.zarr")]
    )
    assert "--context: 99 tokens do not fit the model's 32 positions" in one_line_error(
        capsys, ["ingest", plain, "--out", str(tmp_path / "y.zarr"), "--context", "99"]
    )
    huge = ["--batch-size", str(2**62)]
    assert "the tokens seen by step 4 (4611686018427387904 x 32 per step) overflow" in (
        one_line_error(capsys, ["ingest", plain, "--out", str(tmp_path / "y.zarr"), *huge])
    )
    assert tree_bytes(sources) == before and not (tmp_path / "y.zarr").exists()


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _random_bytes(path):
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def _header_only(path):
    path.write_bytes(path.read_bytes()[:5])


def _retype(dtype):
    def retype(path):
        from safetensors.numpy import load_file, save_file

        tensors = load_file(path)
        save_file({k: v.astype(dtype) for k, v in tensors.items()}, path, metadata={"format": "pt"})

    return retype


def _as_pickle(path):
    from safetensors.numpy import load_file

    tensors = {k: torch.from_numpy(v) for k, v in load_file(path).items()}
    torch.save(tensors, path.parent / "pytorch_model.bin")
    path.unlink()


def _nan(path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name][...] = np.nan
    save_file(tensors, path, metadata={"format": "pt"})


def _drop_tensor(path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path)
    del tensors[sorted(tensors)[-1]]
    save_file(tensors, path, metadata={"format": "pt"})


def _config(text):
    def write(path):
        (path.parent / "config.json").write_text(text)

    return write


def _other_shapes(path):
    config = json.loads((path.parent / "config.json").read_text())
    (path.parent / "config.json").write_text(json.dumps(config | {"intermediate_size": 40}))


BROKEN_CHECKPOINTS = {
    "truncated": (_truncate, "cannot read model.safetensors"),
    "random bytes": (_random_bytes, "cannot read model.safetensors"),
    "header only": (_header_only, "cannot read model.safetensors"),
    "int tensors": (_retype(np.int32), "is I32; weights must be float32, float16 or bfloat16"),
    "float64 tensors": (_retype(np.float64), "is F64; weights must be float32"),
    "missing weights": (lambda path: path.unlink(), "no model.safetensors"),
    "pickle only": (_as_pickle, "holds pytorch_model.bin (a pickle, which is not read)"),
    "NaN weights": (_nan, "has NaN or infinite values"),
    "missing tensor": (_drop_tensor, "the weights do not match config.json (missing keys"),
    "other shapes": (_other_shapes, "mixed architectures: its config differs from"),
    "config not JSON": (_config("{not json"), "cannot read config.json"),
    "config without keys": (_config("{}"), "cannot read config.json"),
    "config of wrong types": (
        _config('{"model_type": "gpt_neox", "hidden_size": "x"}'),
        "cannot read config.json",
    ),
}


@pytest.mark.parametrize("source", ["export", "plain"])
@pytest.mark.parametrize("kind", BROKEN_CHECKPOINTS)
def test_a_checkpoint_that_does_not_load_is_a_one_line_error_and_leaves_no_store(
    sources, source, kind, tmp_path, capsys
):
    import shutil

    copy = tmp_path / "src"
    shutil.copytree(sources / source, copy)
    folder = copy / max(copy.glob("step*"), key=lambda p: int(p.name[4:])).name
    breaker, message = BROKEN_CHECKPOINTS[kind]
    breaker(folder / "model.safetensors")
    before = tree_bytes(copy)
    out = str(tmp_path / "x.zarr")
    err = one_line_error(capsys, ["ingest", str(copy), "--out", out, "--no-progress"])
    assert str(folder) in err and message in err
    assert not (tmp_path / "x.zarr").exists() and tree_bytes(copy) == before


def test_float16_checkpoints_are_ingested_exactly(sources, tmp_path):
    import shutil

    shutil.copytree(sources / "plain", tmp_path / "src")
    for folder in (tmp_path / "src").glob("step*"):
        _retype(np.float16)(folder / "model.safetensors")
    out = tmp_path / "x.zarr"
    assert main(["ingest", str(tmp_path / "src"), "--out", str(out), "--no-progress"]) == 0
    stored = obs.open_run(out, size="l2-d24", seed=0)["W_E"].sel(step=4).values
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "src" / "step4").gpt_neox.embed_in
    assert np.array_equal(stored, expected.weight.detach().half().float().numpy())


def test_an_internal_error_during_ingest_leaves_no_store(sources, tmp_path, monkeypatch, capsys):
    import observatory.interop.hf as hf

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(hf, "_metrics", broken)
    out = tmp_path / "new" / "deeper" / "x.zarr"
    assert main(["ingest", str(sources / "export"), "--out", str(out)]) == 1
    assert "internal error: RuntimeError: boom" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["export", "S", "--out", "o", "--steps", "abc"],
            "argument --steps: expected steps like 0,512,1000 or 0-1000, got 'abc'",
        ),
        (
            ["export", "S", "--out", "o", "--seeds", "x"],
            "argument --seeds: expected seeds like 0-2 or 0,3, got 'x'",
        ),
        (
            ["export", "S", "--out", "o", "--steps", "5-1"],
            "argument --steps: the range '5-1' is empty",
        ),
        (["export", "S", "--out", "o", "--steps", "0,,3"], "argument --steps: expected steps"),
        (["export", "S", "--out", "o", "--steps", "²"], "argument --steps: expected steps"),
        (["export", "S", "--out", "o", "--steps", "0-99999999999"], "argument --steps: more than"),
        (
            ["report", "S", "--out", "o", "--sizes", ","],
            "argument --sizes/--size: expected size names",
        ),
        (
            ["train", "s.toml", "--stop-after", "x"],
            "argument --stop-after: expected a positive number",
        ),
        (["verify", "S", "--workers", "0"], "argument --workers: expected a positive number"),
        (["ingest", "d", "--out", "o", "--context", "x"], "argument --context: invalid int value"),
    ],
)
def test_list_and_number_options_name_themselves_in_their_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and err.count("\n") == 1, err
