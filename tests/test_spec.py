import subprocess
import sys

import pytest

from observatory.cli import main
from observatory.errors import SpecError
from observatory.spec import CheckpointSpec, OptimizerSpec, load_run_spec, spec_from_dict
from tests.conftest import TINY_TOML, write_spec


def test_tiny_spec_loads_into_frozen_dataclasses(tiny_spec):
    assert tiny_spec.train.steps == 24
    assert [(r.init_seed, r.data_seed) for r in tiny_spec.runs()] == [(0, 5), (1, 6)]
    with pytest.raises(AttributeError):
        tiny_spec.train.steps = 3  # frozen
    assert spec_from_dict(tiny_spec.to_dict()) == tiny_spec


def test_checkpoint_schedule_is_log_spaced_plus_every_n_plus_extra():
    steps = CheckpointSpec(log_spaced=True, every=10, extra=(7,)).steps(40)
    assert steps == (0, 1, 2, 4, 7, 8, 10, 16, 20, 30, 32, 40)
    assert CheckpointSpec(every_step=True).steps(5) == (0, 1, 2, 3, 4, 5)
    assert CheckpointSpec(log_spaced=False).steps(9) == (0, 9)


def test_seed_pairing_product_crosses_init_and_data_seeds(tmp_path):
    text = TINY_TOML.replace("data = [5, 6]", 'data = [5, 6, 7]\npairing = "product"')
    spec = load_run_spec(write_spec(tmp_path, text))
    assert len(spec.runs()) == 6
    assert {(r.init_seed, r.data_seed) for r in spec.runs()} == {
        (i, d) for i in (0, 1) for d in (5, 6, 7)
    }


def test_lr_schedule_warms_up_then_decays():
    opt = OptimizerSpec(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert opt.lr_at(0, 100) == pytest.approx(0.25)
    assert opt.lr_at(4, 100) == pytest.approx(1.0)
    assert opt.lr_at(100, 100) == pytest.approx(0.1)
    assert OptimizerSpec(lr=2.0).lr_at(50, 100) == 2.0


def test_lr_schedule_can_decay_over_the_last_steps_only():
    opt = OptimizerSpec(lr=1.0, warmup_steps=4, schedule="linear", decay_steps=20)
    assert opt.lr_at(1, 100) == pytest.approx(0.5)
    assert [opt.lr_at(step, 100) for step in (4, 50, 80)] == [1.0, 1.0, 1.0]
    assert opt.lr_at(90, 100) == pytest.approx(0.55)
    assert opt.lr_at(100, 100) == pytest.approx(0.1)


MALFORMED = {
    "unknown key": (("steps = 24", "steps = 24\nbogus = 1"), "bogus"),
    "wrong type": (("steps = 24", 'steps = "ten"'), "train.steps"),
    "negative steps": (("steps = 24", "steps = -5"), "train.steps"),
    "empty seeds": (("init = [0, 1]\ndata = [5, 6]", "init = []"), "seeds.init"),
    "context longer than the position table": (("context = 16", "context = 32"), "train.context"),
    "missing corpus path": (
        (
            'source = "induction"\nseed = 3\nn_sequences = 64\nperiod_min = 2\nperiod_max = 6',
            'source = "text"\npaths = ["/no/such/corpus"]',
        ),
        "/no/such/corpus",
    ),
    "zip with unequal seed lists": (("data = [5, 6]", "data = [5]"), "seeds.data"),
    "heads do not divide d_model": (("n_heads = 2", "n_heads = 3"), "d_model"),
    "not TOML": (("[train]", "[train"), "not valid TOML"),
    "unknown architecture": (
        ('architecture = "gpt_neox"', 'architecture = "mamba"'),
        "model.architecture: expected 'attn_only' or 'gpt_neox', got 'mamba'",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_spec_gives_one_line_error_and_nonzero_exit(case, tmp_path, capsys):
    (old, new), needle = MALFORMED[case]
    assert old in TINY_TOML
    text = TINY_TOML.replace(old, new)
    if case == "missing corpus path":
        text = text.replace("vocab_size = 16", "vocab_size = 256")
    path = write_spec(tmp_path, text)
    with pytest.raises(SpecError, match="."):
        load_run_spec(path)
    code = main(["train", str(path), "--store", str(tmp_path / "s.zarr"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err and str(path) in err
    assert not (tmp_path / "s.zarr").exists()


def test_missing_spec_file_is_a_one_line_error(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.toml")]) == 2
    assert "no such spec file" in capsys.readouterr().err


def test_console_command_reports_bad_spec_without_traceback(tmp_path):
    path = write_spec(tmp_path, TINY_TOML.replace("steps = 24", "steps = -1"))
    proc = subprocess.run(
        [sys.executable, "-m", "observatory.cli", "train", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"observatory: error: {path}: train.steps: must be positive"
    ]


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("lr = 3e-3", "lr = inf", "optimizer.lr: expected a finite number, got inf"),
        ("lr = 3e-3", "lr = nan", "optimizer.lr: expected a finite number, got nan"),
        ("lr = 3e-3", "lr = 3e-3\neps = -1e-8", "optimizer.eps: must be positive"),
        (
            "lr = 3e-3",
            'lr = 3e-3\nschedule = "linear"\ndecay_steps = 23',
            "optimizer.decay_steps: 23 after 2 warm-up steps do not fit in 24 steps",
        ),
        ("lr = 3e-3", "lr = 3e-3\ndecay_steps = 5", "a constant schedule does not decay"),
        ("context = 16", "context = 1", "train.context: must be at least 2"),
        ("every = 5", "every = 5\nextra = [25]", "checkpoints.extra: step 25 is after the last"),
        ("init = [0, 1]\ndata = [5, 6]", "init = [0, 0]\ndata = [5, 5]", "(0, 5) appears twice"),
        (
            "n_heads = 2",
            'n_heads = 2\ncontrol = "l1-d16"',
            "model.sizes[0].control: 'l1-d16' is not another size of the family (sizes: l2-d16)",
        ),
        ("n_heads = 2", 'n_heads = 2\ncontrol = "l2-d16"', "'l2-d16' is not another size"),
    ],
)
def test_meaningless_values_are_one_line_errors_before_any_store(
    tmp_path, capsys, old, new, message
):
    assert old in TINY_TOML
    path = write_spec(tmp_path, TINY_TOML.replace(old, new))
    assert main(["train", str(path), "--store", str(tmp_path / "s.zarr")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "s.zarr").exists()


def test_a_spec_file_that_is_not_utf8_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "latin1.toml"
    path.write_bytes(TINY_TOML.replace('"tiny"', '"caf\xe9"').encode("latin-1"))
    assert main(["train", str(path), "--store", str(tmp_path / "s.zarr")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a UTF-8 text file" in err


def test_checkpoints_per_shard_is_a_deprecated_alias_of_checkpoints_per_chunk(tmp_path):
    old = TINY_TOML.replace("checkpoints_per_chunk = 4", "checkpoints_per_shard = 4")
    deprecated = "store.checkpoints_per_shard is deprecated: use 'checkpoints_per_chunk'"
    with pytest.warns(FutureWarning, match=deprecated):
        spec = load_run_spec(write_spec(tmp_path, old))
    assert spec.store.checkpoints_per_chunk == 4
    assert spec == load_run_spec(write_spec(tmp_path, TINY_TOML, "new.toml"))
    both = TINY_TOML.replace(
        "checkpoints_per_chunk = 4", "checkpoints_per_chunk = 4\ncheckpoints_per_shard = 4"
    )
    with pytest.raises(SpecError) as err:
        load_run_spec(write_spec(tmp_path, both, "both.toml"))
    message = str(err.value)
    assert "\n" not in message
    assert "checkpoints_per_shard" in message and "checkpoints_per_chunk" in message


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ('source = "tokens"\npaths = ["{here}"]\ntokenizer = "bpe"', "data.tokenizer: 'bpe'"),
        ('source = "text"\npaths = ["{here}"]\ndtype = "uint16"', "data.dtype: only for"),
        ('source = "tokens"\npaths = ["{here}"]\ndtype = "float32"', "data.dtype: expected"),
        ('source = "text"\npaths = ["{here}"]\ntokenizer = "/no/tok"', "data.tokenizer: no such"),
        ('source = "text"\npaths = ["{here}"]\nerrors = "ignore"', "data.errors: expected"),
        ('source = "text"\npaths = ["{here}"]\nmax_tokens = 0', "data.max_tokens"),
        ('source = "induction"\ntokenizer = "bpe"', "data.tokenizer: not for source"),
    ],
)
def test_data_options_are_checked_strictly(tmp_path, data, needle):
    old = 'source = "induction"\nseed = 3\nn_sequences = 64\nperiod_min = 2\nperiod_max = 6'
    text = TINY_TOML.replace(old, data.replace("{here}", str(tmp_path)))
    with pytest.raises(SpecError, match=needle):
        load_run_spec(write_spec(tmp_path, text.replace("vocab_size = 16", "vocab_size = 512")))


def test_max_bytes_is_read_as_max_tokens(tmp_path):
    old = "n_sequences = 64"
    text = TINY_TOML.replace(old, f"{old}\nmax_bytes = 1000")
    with pytest.warns(FutureWarning, match="use 'max_tokens'"):
        assert load_run_spec(write_spec(tmp_path, text)).data.max_tokens == 1000


@pytest.mark.parametrize("branch", ["", "a", "a/b", "no-prev/late.2/x"])
def test_a_run_path_names_its_run_and_branches_and_parses_back(branch):
    from observatory.spec import RunId, parse_run_path

    run = RunId(size="l2-d64", seed=3, init_seed=0, data_seed=1, branch=branch)
    parts = [f"branches/{name}" for name in branch.split("/") if name]
    assert run.path == "/".join(["l2-d64/seed3", *parts])
    assert parse_run_path(run.path) == ("l2-d64", 3, branch)


@pytest.mark.parametrize(
    "text",
    [
        "l2-d64",
        "l2-d64/seed",
        "/seed0",
        "l2-d64/seedx",
        "l2-d64/seed0/branch/a",
        "l2-d64/seed0/branches",
        "l2-d64/seed0/branches/",
        "l2-d64/seed0/branches/a/b",
        "l2-d64/seed٣",
    ],
)
def test_a_malformed_run_path_is_a_one_line_error(text):
    from observatory.spec import parse_run_path

    with pytest.raises(SpecError, match="expected a run like l2-d64/seed0") as err:
        parse_run_path(text)
    assert "\n" not in str(err.value)
