import shutil

import numpy as np
import pytest
import xarray as xr

from observatory.analysis import attention_patterns, head_scores
from observatory.analysis.jobs import load_analysis_spec, make_plan, run_analysis
from observatory.cli import main
from observatory.errors import SpecError
from observatory.query import model_at
from observatory.store import FamilyStore
from tests.conftest import dask_processes

JOB = """\
store = "{store}"
analyses = ["head_scores", "copying", "icl", "token_loss"]

[probe]
seed = 7
n_sequences = 3

[held_out]
n_sequences = 6

[execution]
block_size = 4
workers = 1
"""


@pytest.fixture
def store_copy(trained_tiny, tmp_path):
    _, store = trained_tiny
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    return copy


def write_job(tmp_path, store, text=JOB):
    path = tmp_path / "job.toml"
    path.write_text(text.format(store=store))
    return path


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (("[probe]", "[probe]\nbogus = 1"), "bogus"),
        (
            ('analyses = ["head_scores", "copying", "icl", "token_loss"]', "analyses = []"),
            "analyses",
        ),
        (('analyses = ["head_scores"', 'analyses = ["nope"'), "analyses[0]"),
        (
            (
                "[execution]",
                "[head_scores]\nexclude_bos = true\ntransformer_lens_too = false\n[execution]",
            ),
            "exclude_bos",
        ),
    ],
)
def test_malformed_job_spec_is_a_one_line_error(tmp_path, change, needle, capsys):
    path = write_job(tmp_path, tmp_path / "x.zarr", JOB.replace(*change))
    with pytest.raises(SpecError, match="."):
        load_analysis_spec(path)
    assert main(["analyze", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err


def test_missing_store_is_a_one_line_error(tmp_path, capsys):
    path = write_job(tmp_path, tmp_path / "missing.zarr")
    assert main(["analyze", str(path), "--no-progress"]) == 2
    assert "no such store" in capsys.readouterr().err


def test_local_cluster_job_scores_every_checkpoint_and_reruns_idempotently(store_copy, tmp_path):
    spec = load_analysis_spec(write_job(tmp_path, store_copy))
    report = run_analysis(spec, progress=False)
    family = FamilyStore(store_copy)
    n_ckpt = sum(family.run(r.size, r.seed).n_checkpoints for r in family.runs())
    assert (report.computed, report.skipped) == (n_ckpt, 0)

    # stored values are exactly what the pure functions give on the model at that step
    run = family.run("l2-d16", 1)
    steps, arrays = run.analysis_arrays("head_scores")
    assert sorted(steps) == sorted(run.steps())
    plan = make_plan(spec, family.spec)
    row = int(np.flatnonzero(steps == 8)[0])
    model = model_at(store_copy, size="l2-d16", seed=1, step=8)
    expected = head_scores(attention_patterns(model, plan.probe_tokens), plan.probe_tokens)
    np.testing.assert_allclose(arrays["induction_score"][row], expected["induction"], rtol=1e-6)
    assert np.array_equal(run.analysis_group("head_scores")["probe_tokens"][:], plan.probe_tokens)

    again = run_analysis(spec, progress=False)
    assert (again.computed, again.skipped) == (0, n_ckpt)
    assert len(run.analysis_arrays("head_scores")[0]) == len(steps)  # nothing appended twice
    redo = run_analysis(spec, progress=False, recompute=True)
    assert redo.computed == n_ckpt


def test_results_are_readable_with_plain_xarray(store_copy, tmp_path):
    spec = load_analysis_spec(write_job(tmp_path, store_copy))
    run_analysis(spec, progress=False)
    ds = xr.open_zarr(store_copy, group="l2-d16/seed0/analysis/head_scores", consolidated=False)
    assert ds["induction_score"].dims == ("step", "layer", "head")
    assert ds["induction_score"].sizes == {"step": len(ds["step"]), "layer": 2, "head": 2}
    assert np.all(np.isfinite(ds["induction_score"].values))


def test_job_runs_on_a_separate_dask_scheduler_and_worker(store_copy, tmp_path):
    with dask_processes(1) as address:
        spec = load_analysis_spec(write_job(tmp_path, store_copy))
        report = run_analysis(spec, scheduler=address, progress=False)
        assert report.computed > 0
        steps, arrays = FamilyStore(store_copy).run("l2-d16", 0).analysis_arrays("icl")
        assert len(steps) == FamilyStore(store_copy).run("l2-d16", 0).n_checkpoints
        assert np.all(np.isfinite(arrays["icl_score"][:]))
