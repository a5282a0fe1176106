"""``observatory attribute``: the table it prints, and bad input as one line, exit 2."""

from __future__ import annotations

import pytest

from observatory.cli import main
from tests.conftest import tree_bytes

ARGS = ["--size", "l2-d16", "--seed", "0", "--start", "2", "--stop", "5"]


def test_attribute_prints_the_table_and_the_residual(tiny_store, capsys):
    args = ["attribute", str(tiny_store), *ARGS, "--target", "induction_score"]
    assert main([*args, "--option", "layer=1", "--option", "head=1"]) == 0
    out = capsys.readouterr().out
    assert "measured change" in out and "% of the change" in out
    assert "stored as l2-d16/seed0/attribution/induction_score" in out
    assert main(["inspect", str(tiny_store)]) == 0
    seed0 = next(line for line in capsys.readouterr().out.splitlines() if "seed0 " in line)
    assert "attributions: induction_score" in seed0 and "dynamics" not in seed0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seed", "7"], "seed"),
        (["--stop", "99"], "cannot replay steps 2..99"),
        (["--target", "nope"], "unknown target 'nope'"),
        (["--option", "lay=1"], "unknown key 'lay'"),
        (["--option", "layer=x"], "layer"),
        (["--target", "{file}:vector"], "not a 0-d torch tensor"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(
    tiny_store, tmp_path, capsys, extra, message
):
    user = tmp_path / "mine.py"
    user.write_text(
        "import observatory as obs, torch\n\n@obs.target\ndef vector(model, data):\n"
        "    return model(torch.as_tensor(data.probe_tokens)).logits[0, 0]\n"
    )
    extra = [e.format(file=user) for e in extra]
    before = tree_bytes(tiny_store)
    args = ["attribute", str(tiny_store), *ARGS, "--target", "induction_score", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert tree_bytes(tiny_store) == before


def test_dynamics_prints_the_summary_and_stores_it(tiny_store, capsys):
    assert main(["dynamics", str(tiny_store), *ARGS]) == 0
    out = capsys.readouterr().out
    assert "update ratio |dw|/|w|: median" in out and "clipped in" in out
    assert "gpt_neox.layers.1.attention.query_key_value.weight" in out and "L1H" in out
    assert "stored as l2-d16/seed0/dynamics/steps_2_5" in out
    assert main(["inspect", str(tiny_store)]) == 0
    seed0 = next(line for line in capsys.readouterr().out.splitlines() if "seed0 " in line)
    assert seed0.endswith("dynamics: steps_2_5")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seed", "7"], "seed"),
        (["--size", "nope"], "nope"),
        (["--stop", "99"], "cannot replay steps 2..99"),
        (["--start", "5"], "stop: must be after start (5), got 5"),
        (["--start", "6"], "stop: must be after start (6), got 5"),
        (["--start", "-1"], "start: must be at least 0"),
        (["--name", "not a name"], "name: expected an identifier"),
    ],
)
def test_dynamics_bad_input_is_one_line_exit_2_and_changes_nothing(
    tiny_store, capsys, extra, message
):
    before = tree_bytes(tiny_store)
    assert main(["dynamics", str(tiny_store), *ARGS, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert tree_bytes(tiny_store) == before


def test_dynamics_of_the_first_step_says_it_has_no_cosine(tiny_store, capsys):
    args = ["dynamics", str(tiny_store), "--size", "l2-d16", "--seed", "0"]
    assert main([*args, "--start", "0", "--stop", "1"]) == 0
    assert "cosine of consecutive updates: none" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["attribute", "dynamics"])
def test_a_branch_is_replayed_and_stored_in_the_branch(branch_store, capsys, command):
    target = ["--target", "induction_score"] if command == "attribute" else []
    span = ["--size", "l2-d16", "--seed", "0", "--start", "7", "--stop", "9"]  # the fork: 7
    assert main([command, str(branch_store), *span, *target, "--branch", "no-prev"]) == 0
    assert "stored as l2-d16/seed0/branches/no-prev/" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["attribute", "dynamics"])
def test_an_unknown_branch_is_one_line_exit_2_and_changes_nothing(branch_store, capsys, command):
    before = tree_bytes(branch_store)
    target = ["--target", "induction_score"] if command == "attribute" else []
    assert main([command, str(branch_store), *ARGS, *target, "--branch", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no branch 'nope'" in err and len(err.splitlines()) == 1
    assert tree_bytes(branch_store) == before
