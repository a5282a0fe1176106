import pytest

from observatory.cli import main
from observatory.errors import SpecError
from observatory.jobs.job_spec import load_analysis_spec
from tests.jobs.test_analyze import JOB, write_job


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (("[probe]", "[probe]\nbogus = 1"), "bogus"),
        (
            (
                'analyses = ["head_scores", "copying", "circuits", "icl", "token_loss"]',
                "analyses = []",
            ),
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


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (
            'analyses = ["head_ablation"]\n[head_ablation]\nablation = "half"',
            "head_ablation.ablation",
        ),
        ('analyses = ["head_ablation"]\n[head_ablation]\nbogus = 1', "'bogus'"),
        ('analyses = ["attention_patterns"]\n[attention_patterns]\nsequence = "0"', "sequence"),
        ('analyses = ["icl"]\n[head_ablation]\nablation = "mean"', "[head_ablation]"),
        ('analyses = ["missing.py:fn"]', "analyses[0]: no such analysis file"),
        ('analyses = ["mine.py:undecorated"]', "not decorated with @obs.analysis"),
        ('analyses = ["mine.py:nothing"]', "no such name"),
        ('analyses = ["no_such_module_xyz:fn"]', "cannot import 'no_such_module_xyz'"),
        ('analyses = ["positional.py:positional"]', "parameter 'base' is not keyword-only"),
        ('analyses = ["icl"]\nsteps = "abc"', "steps"),
        ('analyses = ["icl"]\nsteps = [1.5]', "steps"),
        ('analyses = ["icl"]\nicl = 3', "unknown key 'icl'"),
        ('analyses = ["icl"]\n[icl]\nx = 1', "unknown key 'x'"),
    ],
)
def test_analysis_references_and_options_are_checked_when_the_job_loads(
    tmp_path, options, needle, capsys
):
    (tmp_path / "mine.py").write_text("def undecorated(model, data):\n    return {}\n")
    (tmp_path / "positional.py").write_text(
        'import observatory as obs\n\n\n@obs.analysis(variables={"x": ()})\n'
        'def positional(model, data, base=2.0):\n    return {"x": base}\n'
    )
    job = tmp_path / "job.toml"
    job.write_text(f'store = "{tmp_path / "x.zarr"}"\n{options}\n')
    assert main(["analyze", str(job)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err, err
