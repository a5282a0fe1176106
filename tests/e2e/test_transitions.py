"""Ground truth for transition discovery: planted mechanisms, and noise with nothing to learn."""

import dataclasses

import numpy as np
import pytest

from observatory.analysis import emergence
from observatory.data.synthetic import RULES, token_rules
from observatory.jobs.analyze import held_out_tokens, run_analysis
from observatory.jobs.job_spec import AnalysisSpec, ExecutionSpec, HeldOutSpec
from observatory.report.results import load_results
from observatory.report.transitions import transitions
from observatory.spec import CheckpointSpec, SeedSpec, load_run_spec
from observatory.train import train_family

HELD_OUT = HeldOutSpec(n_sequences=48)


def trained(tmp_path, name: str, steps: int, **data) -> tuple:
    """A 2-seed demo-sized family on a variant of the synthetic corpus, analysed."""
    spec = load_run_spec("runs/induction.toml")
    spec = dataclasses.replace(
        spec,
        data=dataclasses.replace(spec.data, **data),
        seeds=SeedSpec(init=(0, 1), data=(0, 1)),
        train=dataclasses.replace(spec.train, steps=steps, threads=1),
        checkpoints=CheckpointSpec(log_spaced=True, every=20),
    )
    store = train_family(spec, store=tmp_path / f"{name}.zarr", progress=False, workers=2)
    job = AnalysisSpec(
        store=str(store),
        analyses=("head_scores", "per_token_loss"),
        held_out=HELD_OUT,
        execution=ExecutionSpec(block_size=12, workers=2),
    )
    run_analysis(job, progress=False)
    return spec, store


def probe_steps(spec, store) -> dict[int, dict[str, float]]:
    """When each planted mechanism's own probe crosses its threshold, per seed.

    Bigram: the mean loss of the bigram tokens halfway from its first to its final level;
    induction: the best layer-1 head's induction score reaching 0.5.
    """
    ds = load_results(store)
    tokens, _ = held_out_tokens(spec, HELD_OUT)
    rules = token_rules(tokens, spec.data, vocab_size=spec.model.vocab_size).ravel()
    out = {}
    for seed in ds["seed"].values:
        one = ds.sel(seed=seed)
        losses = one["per_token_loss"].stack(token=("held_out", "loss_position"))
        bigram = losses.isel(token=np.flatnonzero(rules == RULES.index("bigram"))).mean("token")
        induction = one["induction_score"].sel(layer=1).max("head")
        steps = one["step"].values
        out[int(seed)] = {
            "bigram": emergence(steps, -bigram.values, threshold=np.inf).midpoint_step,
            "induction": emergence(steps, induction.values, threshold=0.5).crossing_step,
        }
    return out, rules


@pytest.mark.slow
def test_every_planted_transition_is_found_in_every_seed_with_its_tokens(tmp_path):
    # A quarter of the sequences walk one shared bigram table (learned in the weights, early);
    # the rest repeat a random block (induction heads, later).
    spec, store = trained(tmp_path, "planted", 800, bigram_fraction=0.25)
    crossings, rules = probe_steps(spec, store)
    table = transitions(store)
    assert table.attrs["seeds"] == [0, 1]
    mixed = np.flatnonzero(rules == RULES.index("mixed"))
    for rule in ("bigram", "induction"):
        truth = np.flatnonzero(rules == RULES.index(rule))
        matched = set()
        for row in table.itertuples():
            judged = np.setdiff1d(row.tokens, mixed)  # tokens two rules predict are not scored
            hits = len(np.intersect1d(judged, truth))
            precision, recall = hits / max(len(judged), 1), hits / len(truth)
            if precision >= 0.8 and recall >= 0.8:
                assert row.start_step <= crossings[row.seed][rule] <= row.end_step, (rule, row)
                matched.add((row.seed, row.transition))
        assert {seed for seed, _ in matched} == {0, 1}, (rule, table.drop(columns="tokens"))
        assert len({tid for _, tid in matched}) == 1  # the same transition in both seeds
    assert table["universal"].all()
    induction = table[table["start_step"] == table["start_step"].max()]
    assert induction["components"].str.contains("L1H. induction", regex=True).all()
    assert induction["ablation"].str.contains("L", regex=False).all()  # ablating heads hurts it


@pytest.mark.slow
def test_noise_with_nothing_to_learn_gives_no_transition(tmp_path):
    # A block as long as the window never repeats: every token is uniform noise.
    # 300 steps: past the early drop to the uniform distribution, the one change noise allows.
    spec, store = trained(tmp_path, "noise", 300, period_min=63, period_max=63)
    assert len(transitions(store)) == 0
