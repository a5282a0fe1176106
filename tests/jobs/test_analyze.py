import shutil

import numpy as np
import pytest
import xarray as xr

from observatory.analysis import attention_patterns, circuit_statistics, head_scores
from observatory.analysis.builtins import BUILTINS
from observatory.cli import main
from observatory.errors import SpecError
from observatory.jobs.analyze import run_analysis, select_runs, shared_data
from observatory.jobs.compute import compute
from observatory.jobs.job_spec import ProbeSpec, load_analysis_spec
from observatory.query import model_at, open_family, open_run
from observatory.store import FamilyStore, analysis_arrays, analysis_group
from tests.conftest import BRANCH_FORK, dask_processes

JOB = """\
store = "{store}"
analyses = ["head_scores", "copying", "circuits", "icl", "token_loss"]

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
    steps, arrays = analysis_arrays(run, "head_scores")
    assert sorted(steps) == sorted(run.steps())
    data = shared_data(family.spec, spec.probe, spec.held_out)
    row = int(np.flatnonzero(steps == 8)[0])
    model = model_at(store_copy, size="l2-d16", seed=1, step=8)
    expected = head_scores(attention_patterns(model, data.probe_tokens), data.probe_tokens)
    np.testing.assert_allclose(arrays["induction_score"][row], expected["induction"], rtol=1e-6)
    assert np.array_equal(analysis_group(run, "head_scores")["probe_tokens"][:], data.probe_tokens)

    again = run_analysis(spec, progress=False)
    assert (again.computed, again.skipped) == (0, n_ckpt)
    assert len(analysis_arrays(run, "head_scores")[0]) == len(steps)  # nothing appended twice
    redo = run_analysis(spec, progress=False, recompute=True)
    assert redo.computed == n_ckpt


def test_results_are_readable_with_plain_xarray(store_copy, tmp_path):
    spec = load_analysis_spec(write_job(tmp_path, store_copy))
    run_analysis(spec, progress=False)
    ds = xr.open_zarr(store_copy, group="l2-d16/seed0/analysis/head_scores", consolidated=False)
    assert ds["induction_score"].dims == ("step", "layer", "head")
    assert ds["induction_score"].sizes == {"step": len(ds["step"]), "layer": 2, "head": 2}
    assert np.all(np.isfinite(ds["induction_score"].values))

    # a weights-only analysis: its declared dims, and what the stored weights give
    circuits = xr.open_zarr(store_copy, group="l2-d16/seed0/analysis/circuits", consolidated=False)
    run = open_run(store_copy, size="l2-d16", seed=0)
    expected = circuit_statistics({view: run[view].values for view in ("W_Q", "W_K", "W_V", "W_O")})
    for variable, dims in BUILTINS["circuits"].declared().items():
        assert circuits[variable].dims == ("step", *dims)
        assert list(circuits["step"].values) == list(run["step"].values)
        np.testing.assert_allclose(circuits[variable].values, expected[variable], rtol=1e-6)
        np.testing.assert_allclose(run[variable].values, expected[variable], rtol=1e-6)


@pytest.fixture
def dask_cluster(tmp_path):
    """A dask scheduler and one worker, separate processes on loopback; the worker runs in its
    own empty directory, so user code can only reach it by being shipped."""
    workdir = tmp_path / "worker"
    workdir.mkdir()
    with dask_processes(1, workdir=workdir) as address:
        yield address


CUSTOM = '''\
import observatory as obs
from observatory.analysis import attention_patterns


@obs.analysis(variables={"bos_attention": ("layer", "head")})
def bos_attention(model, data, *, scale: float = 1.0):
    """Mean attention to the first token on the probe."""
    patterns = attention_patterns(model, data.probe_tokens)  # [layer, batch, head, q, k]
    return {"bos_attention": scale * patterns[..., 0].mean(axis=(1, 3))}


@obs.analysis(variables={"fragile": ()})
def fragile(model, data):
    """Fails at every checkpoint."""
    raise ValueError("no good\\nsecond line")
'''


CUSTOM_JOB = """\
store = "{store}"
analyses = ["icl", "mine/analyses.py:bos_attention"]
seeds = [1]

[probe]
n_sequences = 3

[held_out]
n_sequences = 6

[bos_attention]
scale = 2.0

[execution]
block_size = 4
"""


def test_custom_analysis_from_a_file_runs_on_a_separate_scheduler_and_worker(
    store_copy, tmp_path, dask_cluster, capsys
):
    code = tmp_path / "jobs" / "mine" / "analyses.py"  # outside the package, beside the job
    code.parent.mkdir(parents=True)
    code.write_text(CUSTOM)
    job = tmp_path / "jobs" / "custom.toml"
    job.write_text(CUSTOM_JOB.format(store=store_copy))
    analyze = ["analyze", str(job), "--scheduler", dask_cluster, "--no-progress"]
    assert main(analyze) == 0
    n_ckpt = FamilyStore(store_copy).run("l2-d16", 1).n_checkpoints
    assert f"analysed {n_ckpt} checkpoints" in capsys.readouterr().out

    ds = open_family(store_copy, size="l2-d16", seeds=[1])
    assert ds["bos_attention"].dims == ("seed", "step", "layer", "head")
    stored = ds["bos_attention"].values
    assert np.isfinite(stored).all() and np.isfinite(ds["icl_score"].values).all()
    # the same values in this process, without a job (and nothing written)
    computed = compute(
        f"{code}:bos_attention",
        store_copy,
        size="l2-d16",
        seeds=[1],
        options={"scale": 2.0},
        probe=ProbeSpec(n_sequences=3),
    )
    np.testing.assert_array_equal(computed["bos_attention"].values, stored)

    assert main(analyze) == 0  # a re-run computes nothing
    assert "analysed 0 checkpoints" in capsys.readouterr().out

    code.write_text(CUSTOM.replace("scale * patterns", "scale * 0.5 * patterns"))
    assert main(analyze) == 2  # changed source: refused, one line
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "source_sha256" in err and "--recompute" in err
    assert main([*analyze, "--recompute"]) == 0
    recomputed = open_family(store_copy, size="l2-d16", seeds=[1])["bos_attention"].values
    np.testing.assert_allclose(recomputed, stored / 2, rtol=1e-6)

    job.write_text(
        CUSTOM_JOB.format(store=store_copy).replace(
            ':bos_attention"]', ':bos_attention", "mine/analyses.py:fragile"]'
        )
    )
    assert main(analyze) == 2  # a failing function: one line naming it, the run and the step
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert (
        "analysis 'fragile' on l2-d16/seed1 at step" in err
        and "at step" in err
        and "ValueError: no good" in err
    )
    after = open_family(store_copy, size="l2-d16", seeds=[1])
    np.testing.assert_array_equal(after["bos_attention"].values, recomputed)  # intact
    assert "fragile" not in after or np.isnan(after["fragile"].values).all()


def test_explicit_steps_that_are_not_checkpoints_are_an_error_that_writes_nothing(
    store_copy, tmp_path, capsys
):
    from tests.conftest import tree_bytes

    before = tree_bytes(store_copy)
    job = write_job(
        tmp_path, store_copy, JOB.replace("analyses = [", "steps = [0, 3]\nanalyses = [")
    )
    assert main(["analyze", str(job), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "steps: l2-d16/seed0: no committed checkpoint at step 3" in err
    assert "2, 4" in err  # the nearest checkpoints it has
    assert tree_bytes(store_copy) == before


def test_the_probe_of_a_text_corpus_uses_only_tokens_that_occur_in_it(tmp_path):
    import dataclasses

    from observatory.spec import DataSpec, load_run_spec
    from tests.conftest import TINY_TOML, write_spec

    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    # lowercase letters and spaces, with a few very common and very rare bytes
    rng = np.random.default_rng(0)
    text = "QZ" + "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 4000)) + " " * 2000
    (corpus_dir / "a.py").write_text(text)
    spec = load_run_spec(
        write_spec(tmp_path, TINY_TOML.replace("vocab_size = 16", "vocab_size = 256"))
    )
    spec = dataclasses.replace(spec, data=DataSpec(source="text", paths=(str(corpus_dir),)))
    job = load_analysis_spec(write_job(tmp_path, "unused.zarr"))
    data = shared_data(spec, job.probe, job.held_out)
    used = set(np.unique(data.probe_tokens[:, 1:]).tolist())
    occurring = set(text.encode())
    assert used <= occurring and len(used) > 2
    assert not used & {ord(" "), ord("Q"), ord("Z")}  # the commonest and the rarest
    attrs = data.probe.attrs
    assert attrs["probe_tokens_from"] == "training corpus"
    assert attrs["probe_n_candidates"] == len(occurring) - 2 * int(0.1 * len(occurring))  # 29 - 4
    synthetic = shared_data(load_run_spec(write_spec(tmp_path)), job.probe, job.held_out)
    assert "probe_tokens_from" not in synthetic.probe.attrs


BAD = """\
import numpy as np
import observatory as obs


@obs.analysis(variables={"ws": ("layer", "head")})
def wrong_shape(model, data):
    return {"ws": np.zeros((7, 3))}


@obs.analysis(variables={"mv_a": (), "mv_b": ()})
def missing_variable(model, data):
    return {"mv_a": 1.0}


@obs.analysis(variables={"ev": ()})
def extra_variable(model, data):
    return {"ev": 1.0, "ev_more": 2.0}


@obs.analysis(variables={"li": ()})
def a_list(model, data):
    return [1.0]


@obs.analysis(variables={"st": ("layer",)})
def strings(model, data):
    return {"st": ["a", "b"]}


@obs.analysis(variables={"no": ()})
def none(model, data):
    return None


@obs.analysis(variables={"ra": ()})
def raises(model, data):
    raise RuntimeError("broken")


@obs.analysis(variables={"nan_loss": ("layer",)})
def nan_loss(model, data):
    return {"nan_loss": np.array([np.nan, 1.0])}


@obs.analysis(variables={"log_ratio": ("layer",)}, nonfinite=True)
def log_ratio(model, data):
    return {"log_ratio": np.array([np.nan, -np.inf])}


@obs.analysis(variables={"loss": ("layer",)})
def clash_run(model, data):
    return {"loss": np.zeros(2)}


@obs.analysis(variables={"W_Q": ()})
def clash_view(model, data):
    return {"W_Q": 0.0}


@obs.analysis(variables={"layer": ()})
def clash_dim(model, data):
    return {"layer": 0.0}


@obs.analysis(variables={"induction_score": ()})
def clash_analysis(model, data):
    return {"induction_score": 0.0}


@obs.analysis(variables={"seed_bias": (("seed", 2),)})
def clash_coordinate(model, data):
    return {"seed_bias": np.zeros(2)}
"""

BAD_JOB = """\
store = "{store}"
analyses = [{analyses}]
seeds = [0]

[probe]
n_sequences = 2

[held_out]
n_sequences = 2

[execution]
block_size = 64
workers = 1
"""


def bad_job(tmp_path, store, *names):
    code = tmp_path / "bad.py"
    code.write_text(BAD)
    refs = ", ".join(f'"bad.py:{name}"' for name in names)
    job = tmp_path / f"{'-'.join(names)}.toml"
    job.write_text(BAD_JOB.format(store=store, analyses=refs))
    return job


def test_a_failing_user_analysis_leaves_the_store_as_it_was(
    store_copy, tmp_path, dask_cluster, capsys
):
    from tests.conftest import tree_bytes

    kinds = {
        "wrong_shape": "variable 'ws' has shape (7, 3), declared (2, 2)",
        "missing_variable": "returned a dict that lacks mv_b",
        "extra_variable": "returned a dict that has undeclared ev_more",
        "a_list": "returned list, expected a dict",
        "strings": "variable 'st' holds <U1 values",
        "none": "returned NoneType, expected a dict",
        "raises": "failed: RuntimeError: broken",
    }
    capsys.readouterr()
    assert main(["inspect", str(store_copy)]) == 0
    described = capsys.readouterr().out
    before = tree_bytes(store_copy)
    for name, needle in kinds.items():
        job = bad_job(tmp_path, store_copy, name)
        assert main(["analyze", str(job), "--scheduler", dask_cluster, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert f"analysis {name!r} on l2-d16/seed0 at step" in err and needle in err, err
        assert tree_bytes(store_copy) == before, name  # no analysis/<name> group, nothing
    ds = open_family(store_copy, size="l2-d16", seeds=[0])
    assert not {"ws", "mv_a", "ev", "li", "st", "no", "ra"} & set(ds.data_vars)
    assert main(["inspect", str(store_copy)]) == 0
    assert capsys.readouterr().out == described


def test_a_declared_name_that_the_runs_or_other_analyses_have_is_refused_before_any_work(
    store_copy, tmp_path, capsys
):
    from observatory.store import AnalysisWriter
    from tests.conftest import tree_bytes

    run = FamilyStore(store_copy, mode="r+").run("l2-d16", 0)  # results of another analysis
    stored = AnalysisWriter(run, "head_scores", attrs={}, variables={"induction_score": ((), ())})
    stored.append(np.array([0]), {"induction_score": np.zeros((1,), np.float32)})
    stored.flush()
    before = tree_bytes(store_copy)
    cases = {
        ("clash_run",): "variable 'loss' is a name the run has",
        ("clash_view",): "variable 'W_Q' is a name the run has",
        ("clash_dim",): "variable 'layer' is a name every run (a coordinate or dim) has",
        ("clash_coordinate",): "dim 'seed' is a name every run (a coordinate or dim) has",
        ("clash_analysis",): "'induction_score' is a name analysis 'head_scores' stored in",
        ("clash_run", "nan_loss"): "variable 'loss'",
    }
    for names, needle in cases.items():
        assert main(["analyze", str(bad_job(tmp_path, store_copy, *names)), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
        assert tree_bytes(store_copy) == before
    # two analyses of one job that declare the same name: refused when the job loads
    job = bad_job(tmp_path, store_copy, "nan_loss")
    job.write_text(job.read_text().replace('"]', '", "bad2.py:nan_loss"]'))
    (tmp_path / "bad2.py").write_text(BAD.replace("def nan_loss", "def nan_loss_again"))
    job.write_text(job.read_text().replace("bad2.py:nan_loss", "bad2.py:nan_loss_again"))
    with pytest.raises(SpecError, match="variable 'nan_loss' is a name analysis 'nan_loss' has"):
        load_analysis_spec(job)


def test_non_finite_results_are_refused_unless_declared_then_stored_as_analysed(
    store_copy, tmp_path, capsys
):
    from tests.conftest import tree_bytes

    before = tree_bytes(store_copy)
    assert main(["analyze", str(bad_job(tmp_path, store_copy, "nan_loss")), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "analysis 'nan_loss' on l2-d16/seed0 at step 0: variable 'nan_loss' has 1 " in err
    assert "non-finite values (NaN)" in err and "nonfinite=True" in err
    assert tree_bytes(store_copy) == before

    job = bad_job(tmp_path, store_copy, "log_ratio")
    job.write_text(job.read_text().replace("seeds = [0]", "seeds = [0]\nsteps = [0, 8]"))
    assert main(["analyze", str(job), "--no-progress"]) == 0
    ds = open_family(store_copy, size="l2-d16", seeds=[0])
    values = ds["log_ratio"].sel(seed=0)
    assert values.attrs["nonfinite"] is True  # NaN may be a result here
    covered, _ = analysis_arrays(FamilyStore(store_copy).run("l2-d16", 0), "log_ratio")
    assert sorted(covered) == [0, 8]  # what tells a result from "not analysed"
    for step in values["step"].values:
        row = values.sel(step=step).values
        expected = [np.nan, -np.inf] if step in covered else [np.nan, np.nan]
        np.testing.assert_array_equal(row, expected)


def test_branches_are_analysed_from_their_fork_into_their_own_group(analysed_branches):
    store, report = analysed_branches
    family = FamilyStore(store)
    parent, same = family.run("l2-d16", 0), family.run("l2-d16", 0, "same")
    assert report.runs == (
        "l2-d16/seed0",
        "l2-d16/seed0/branches/no-prev",
        "l2-d16/seed0/branches/no-prev/branches/same",
        "l2-d16/seed0/branches/same",
    )
    own = same.own_steps()
    assert own[0] == BRANCH_FORK and set(same.steps()) - set(own) == {
        s for s in parent.steps() if s < BRANCH_FORK
    }
    for name in ("no-prev", "same"):
        steps, _ = analysis_arrays(family.run("l2-d16", 0, name), "head_scores")
        assert list(steps) == list(own)  # the checkpoints before the fork are the parent's
    # an empty intervention: the parent's values at every step both have, bit for bit
    steps, branch = analysis_arrays(same, "head_scores")
    parent_steps, values = analysis_arrays(parent, "head_scores")
    shared = [s for s in steps if s in parent_steps]
    assert len(shared) >= 3
    for key in ("induction_score", "previous_token_score"):
        got = branch[key][:][[list(steps).index(s) for s in shared]]
        expected = values[key][:][[list(parent_steps).index(s) for s in shared]]
        assert got.tobytes() == expected.tobytes(), key
    ablated = analysis_arrays(family.run("l2-d16", 0, "no-prev"), "head_scores")[1]
    last = ablated["induction_score"][:][-1]
    assert not np.array_equal(last, values["induction_score"][:][-1])


def test_a_job_can_leave_branches_out(analysed_branches, tmp_path):
    store, _ = analysed_branches
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    job = write_job(tmp_path, copy, JOB.replace("[probe]", "branches = false\n\n[probe]"))
    spec = load_analysis_spec(job)
    assert not spec.branches
    assert [r.path for r in select_runs(spec, FamilyStore(copy))] == ["l2-d16/seed0"]
