"""Causal sanity on the demo family: branches forked just before the phase change that take
away the layer-0 heads the induction heads read from, set against their parent in the summary.

At the fork the previous-token head has begun to form (score ~0.2, the other layer-0 heads
below it): ablating it (the head the ablation analysis names at the end) makes another layer-0
head take the role from further behind, and the induction heads form later; ablating every
layer-0 head leaves them nothing to compose with, and none forms.
"""

import dataclasses
import math

import pytest

from observatory.jobs.analyze import run_analysis
from observatory.jobs.job_spec import AnalysisSpec, ExecutionSpec, HeldOutSpec
from observatory.query import open_family
from observatory.report.results import load_branches, summary
from observatory.spec import CheckpointSpec, SeedSpec, load_run_spec
from observatory.train import Intervention, train_branch, train_family

STEPS = 400  # past the end of seed 0's loss bump (about step 330); the schedule is constant
FORK = 240  # before the bump; forked at 200 or 225, no head has begun forming and none is late


@pytest.mark.slow
def test_ablating_the_previous_token_heads_before_the_bump(tmp_path):
    spec = load_run_spec("runs/induction.toml")
    spec = dataclasses.replace(
        spec,
        seeds=SeedSpec(init=(0,), data=(0,)),
        train=dataclasses.replace(spec.train, steps=STEPS, threads=1),
        checkpoints=CheckpointSpec(log_spaced=True, every=25),
    )
    store = train_family(spec, store=tmp_path / "demo.zarr", progress=False)
    job = AnalysisSpec(
        store=str(store),
        analyses=("head_scores", "icl"),
        held_out=HeldOutSpec(n_sequences=32),
        execution=ExecutionSpec(block_size=6, workers=2),
    )
    run_analysis(job, progress=False)
    run_analysis(
        dataclasses.replace(job, analyses=("head_ablation",), steps=(STEPS,)), progress=False
    )
    parent = summary(store).per_seed.loc[0]
    # The head whose ablation hurts the repeated tokens most at the end is the previous-token
    # head of layer 0 that the induction heads read from.
    previous = open_family(store, size="l2-d64")["previous_token_score"].sel(seed=0, step=STEPS)
    prev_head = int(previous.sel(layer=0).argmax("head"))
    assert parent["top_ablation_head"] == f"L0H{prev_head}", parent
    assert FORK < parent["bump_start_step"] and parent["n_induction_heads"] >= 2, parent

    run = {"size": "l2-d64", "seed": 0, "at": FORK, "store": store, "progress": False}
    ablate = Intervention(ablate_heads=((0, prev_head),))
    train_branch(spec, name="no-prev", intervention=ablate, **run)
    every_head = tuple((0, head) for head in range(spec.size("l2-d64").n_heads))
    train_branch(spec, name="no-layer0", intervention=Intervention(ablate_heads=every_head), **run)
    run_analysis(job, progress=False)  # the branches' own checkpoints

    result = summary(store)
    table = result.branches
    columns = ["n_induction_heads", "emergence_midpoint_step", "final_loss"]
    print(f"\nparent seed0: {parent[columns].to_dict()}")
    print(table[["fork", *columns, "emergence_midpoint_step_delta"]].to_string())
    assert list(table.index) == ["seed0/no-layer0", "seed0/no-prev"]
    assert "seed0/no-prev" in str(result) and f"ablate_heads L0H{prev_head}" in str(result)
    # Without any layer-0 head there is nothing to compose with: no induction head forms.
    alone = table.loc["seed0/no-layer0"]
    assert alone["n_induction_heads"] == 0 and math.isnan(alone["emergence_midpoint_step"])
    assert alone["final_loss"] > parent["final_loss"] + 1.0
    # Without the previous-token head, another layer-0 head takes its place from further
    # behind: the induction heads still form, later than in the parent.
    branch = table.loc["seed0/no-prev"]
    assert branch["n_induction_heads"] >= 2
    assert 0 < branch["emergence_midpoint_step_delta"] <= 50, branch
    took_over = load_branches(store)["previous_token_score"].sel(
        branch="seed0/no-prev", step=STEPS, layer=0
    )
    assert float(took_over.sel(head=prev_head)) < 0.2  # it never trained as a head
    assert float(took_over.drop_sel(head=prev_head).max()) > 0.5, took_over.values
