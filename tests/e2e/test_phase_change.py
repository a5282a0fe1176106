"""Ground truth on real training: the demo family's phase change, in every seed."""

import dataclasses

import numpy as np
import pytest

from observatory.analysis import emergence, loss_bump
from observatory.jobs.analyze import run_analysis
from observatory.jobs.job_spec import AnalysisSpec, ExecutionSpec, HeldOutSpec
from observatory.query import open_family
from observatory.report.results import summary
from observatory.report.transitions import transitions
from observatory.spec import CheckpointSpec, SeedSpec, load_run_spec
from observatory.train import train_family


@pytest.mark.slow
def test_demo_family_shows_induction_heads_a_loss_bump_and_an_icl_benefit(tmp_path):
    spec = load_run_spec("runs/induction.toml")
    spec = dataclasses.replace(
        spec,
        seeds=SeedSpec(init=(0, 1), data=(0, 1)),
        train=dataclasses.replace(spec.train, steps=600, threads=1),
        checkpoints=CheckpointSpec(log_spaced=True, every=25),
    )
    # One single-threaded dask worker per seed: the seeds train side by side on 2 cores.
    store = train_family(spec, store=tmp_path / "demo.zarr", progress=False, workers=2)
    job = AnalysisSpec(
        store=str(store),
        analyses=("head_scores", "icl", "per_token_loss"),
        held_out=HeldOutSpec(n_sequences=32),
        execution=ExecutionSpec(block_size=6, workers=2),
    )
    run_analysis(job, progress=False)
    # Ablations cost a forward pass per head: only from the bumps on (both end by ~step 350).
    ablated = dataclasses.replace(
        job, analyses=("head_ablation",), steps=tuple(range(275, 601, 25))
    )
    run_analysis(ablated, progress=False)
    ds = open_family(store, size="l2-d64")
    # Causal checks. As the phase change ends, the best induction head is among the two heads
    # whose ablation hurts most (beside the previous-token head it reads from). Later every
    # layer-1 head becomes an induction head, so knocking out any one of them costs little
    # (the others copy too); the single point of failure is the previous-token head they all
    # read from: at the last checkpoint its ablation hurts most.
    per_seed = summary(store).per_seed
    assert (per_seed["ablation_step"] == 600).all()
    assert (per_seed["bump_end_ablation_step"] >= per_seed["bump_end_step"]).all()
    assert (per_seed["bump_end_best_head_ablation_rank"] <= 2).all(), per_seed.T
    last = ds.sel(step=600)
    for seed in ds["seed"].values:
        previous = last["previous_token_score"].sel(seed=seed, layer=0)
        prev_head = f"L0H{int(previous.argmax('head'))}"
        row = per_seed.loc[int(seed)]
        assert row["top_ablation_head"] == prev_head, (seed, row["top_ablation_head"], prev_head)
        assert row["top_ablation_effect"] > row["best_head_ablation_effect"] > 0
        formed = int((last["induction_score"].sel(seed=seed, layer=1) > 0.5).sum())
        assert formed >= 2, f"seed {seed}: {formed} induction heads"
    tokens_per_step = spec.train.batch_size * spec.train.context
    for seed in ds["seed"].values:
        run = ds.sel(seed=seed)
        steps = run["step"].values
        induction = run["induction_score"].sel(layer=1).max("head").values  # best layer-1 head
        assert induction[0] < 0.2, f"seed {seed}: induction score at init {induction[0]:.2f}"
        assert induction[-1] > 0.5, f"seed {seed}: final induction score {induction[-1]:.2f}"

        jump = emergence(steps, induction, threshold=0.5)
        bump = loss_bump(
            run["train_step"].values, run["loss"].values, tokens_per_step=tokens_per_step
        )
        assert bump is not None, f"seed {seed}: no loss bump detected"
        assert bump.start_step <= jump.midpoint_step <= bump.end_step, (
            f"seed {seed}: induction jump at {jump.midpoint_step:.0f} outside the bump "
            f"window {bump.start_step:.0f}-{bump.end_step:.0f}"
        )
        icl = run["icl_score"]
        before = float(icl.sel(step=bump.start_step, method="nearest"))
        after = float(icl.sel(step=bump.end_step, method="nearest"))
        assert after < before - 0.5, f"seed {seed}: ICL score {before:.2f} -> {after:.2f}"
        assert np.isfinite(icl.values).all()

    # The induction transition, found without being looked for: one transition in every seed,
    # matched across seeds, over the induction heads' emergence, with the layer-1 heads listed.
    table = transitions(store)
    per_seed_rows = table[table["universal"]]
    assert len(per_seed_rows) >= 2, table.drop(columns="tokens")
    found = []
    for seed in ds["seed"].values:
        induction = ds.sel(seed=seed)["induction_score"].sel(layer=1).max("head").values
        midpoint = emergence(ds["step"].values, induction, threshold=0.5).midpoint_step
        rows = per_seed_rows[per_seed_rows["seed"] == seed]
        inside = rows[(rows["start_step"] <= midpoint) & (midpoint <= rows["end_step"])]
        assert len(inside) == 1, (seed, midpoint, table.drop(columns="tokens"))
        assert inside["components"].str.contains("L1H. induction", regex=True).all()
        found.append(int(inside["transition"].iloc[0]))
    assert len(set(found)) == 1  # the same transition in every seed
