"""Branches in the summary and the report: each branch beside its parent."""

import json

import numpy as np
import pandas as pd

from observatory.report import write_report
from observatory.report.results import load_branches, load_results, summary
from observatory.report.tables import intervention_text
from tests.conftest import BRANCH_FORK, NESTED_BRANCH_FORK

LABELS = ["seed0/no-prev", "seed0/no-prev/same", "seed0/same"]  # a branch after its parent
FORKS = [BRANCH_FORK, NESTED_BRANCH_FORK, BRANCH_FORK]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_branches_carry_their_parents_results_before_the_fork(analysed_branches):
    store, _ = analysed_branches
    runs, branches = load_results(store), load_branches(store)
    assert list(branches["branch"].values) == LABELS
    assert list(branches["fork"].values) == FORKS
    parent = runs["induction_score"].sel(seed=0)
    for label in branches["branch"].values:
        before = branches["induction_score"].sel(branch=label, step=parent["step"])
        before = before.sel(step=before["step"] < BRANCH_FORK)
        expected = parent.sel(step=before["step"]).values
        assert np.array_equal(before.values, expected, equal_nan=True)
    # a branch of a branch: its parent branch's results up to its fork (own ones from 7 on)
    nested = branches["induction_score"].sel(branch="seed0/no-prev/same")
    above = branches["induction_score"].sel(branch="seed0/no-prev")
    steps = nested["step"][(nested["step"] >= BRANCH_FORK) & (nested["step"] < NESTED_BRANCH_FORK)]
    assert bool(above.sel(step=steps).notnull().all()) and len(steps) >= 2
    assert np.array_equal(nested.sel(step=steps), above.sel(step=steps))
    assert load_branches(store, seeds=[0]).sizes["branch"] == 3


def test_summary_shows_each_branch_with_its_fork_and_intervention(analysed_branches):
    store, _ = analysed_branches
    result = summary(store)
    table = result.branches
    assert list(table.index) == LABELS
    assert list(table["parent"]) == ["seed0", "seed0/no-prev", "seed0"]
    assert list(table["fork"]) == FORKS
    assert intervention_text(table.loc["seed0/no-prev", "intervention"]) == (
        "ablate_heads L0H1; ablation zero"
    )
    assert intervention_text(table.loc["seed0/same", "intervention"]) == "none"
    same = table.loc["seed0/same"]
    assert (
        same["final_loss_delta"] == 0.0 and same["best_head"] == result.per_seed.loc[0, "best_head"]
    )
    # set against its parent branch, which it continues unchanged (not against the run)
    nested, above = table.loc["seed0/no-prev/same"], table.loc["seed0/no-prev"]
    assert intervention_text(nested["intervention"]) == "none"
    assert nested["final_loss_delta"] == 0.0 and above["final_loss_delta"] != 0.0
    assert nested["best_head"] == above["best_head"]
    assert "seed0/no-prev" in str(result) and "ablate_heads L0H1" in result.to_markdown()
    records = json.loads(json.dumps(result.to_dict(), allow_nan=False))["branches"]
    assert [r["branch"] for r in records] == LABELS


def test_report_draws_the_branches_figure_and_writes_their_table(analysed_branches, tmp_path):
    store, _ = analysed_branches
    files = {path.name: path for path in write_report(store, tmp_path)}
    assert files["branches.png"].read_bytes().startswith(PNG_MAGIC)
    table = pd.read_csv(files["branches.csv"], index_col="branch")
    assert list(table.index) == LABELS
    assert "seed0/no-prev" in files["report.html"].read_text()
