"""Export to per-step Hugging Face folders and ingest of such folders (observatory/interop.py)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import xarray as xr
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

import observatory as obs
from observatory.cli import main
from observatory.errors import StoreError
from observatory.spec import load_run_spec
from observatory.train import train_family
from tests.conftest import TINY_TOML, write_spec
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
