"""Per-step attribution: the terms sum to the measured change, wherever the tasks run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

import observatory as obs
from observatory.errors import StoreError
from observatory.store import ATTRIBUTION, FamilyStore, analyses
from tests.conftest import tree_bytes


def best_induction_head(store) -> dict[str, int]:
    """The layer-1 head with the highest induction score at the last checkpoint."""
    from observatory.analysis.heads import attention_patterns, head_scores
    from observatory.jobs.analyze import shared_data
    from observatory.jobs.job_spec import HeldOutSpec, ProbeSpec

    data = shared_data(FamilyStore(store).spec, ProbeSpec(), HeldOutSpec())
    model = obs.model_at(store, size="l2-d16", seed=0, step=24)
    scores = head_scores(attention_patterns(model, data.probe_tokens), data.probe_tokens)
    return {"layer": 1, "head": int(np.argmax(scores["induction"][1]))}


def test_step_terms_sum_to_the_measured_change(tiny_store):
    head = best_induction_head(tiny_store)
    att = obs.attribute(
        tiny_store, size="l2-d16", seed=0, start=2, stop=20, target="induction_score", options=head
    )
    change = float(att["target_stop"] - att["target_start"])
    residual = float(att["residual"])
    print(
        f"change {change:.4g}, sum {float(att['step_contribution'].sum()):.4g}, "
        f"residual {residual:.3g} ({100 * abs(residual / change):.3g}% of the change)"
    )
    assert abs(residual) <= 0.01 * abs(change)
    assert att.sizes == {"train_step": 18}
    assert att.attrs["rule"] == "trapezoid" and att.attrs["target_options"] == head
    # the target at each state, and the replay met every stored checkpoint it passed at a span end
    assert att["target_value"][0] == att["target_start"]
    assert att.attrs["checked_checkpoints"] == [4, 5, 8, 10, 15, 16, 20]
    xr.testing.assert_identical(
        att, obs.attribution(tiny_store, size="l2-d16", seed=0, name="induction_score")
    )


def test_a_target_that_changes_the_model_is_caught(tiny_store):
    @obs.target
    def meddling(model, data):
        with torch.no_grad():
            next(model.parameters()).add_(1e-3)
        return model(torch.as_tensor(data.probe_tokens)).logits.mean()

    with pytest.raises(StoreError, match="differ from the stored checkpoint"):
        obs.attribute(tiny_store, size="l2-d16", seed=0, start=2, stop=4, target=meddling)
    assert (
        obs.store.analyses(FamilyStore(tiny_store).run("l2-d16", 0), kind=obs.store.ATTRIBUTION)
        == []
    )


@pytest.mark.slow
def test_results_are_identical_in_process_and_on_1_and_2_workers(tiny_store):
    def run(workers):
        return obs.attribute(
            tiny_store,
            size="l2-d16",
            seed=0,
            start=3,
            stop=11,
            target="induction_score",
            options={"layer": 1, "head": 1},
            per_example=True,
            workers=workers,
        )

    here, one, two = run(0), run(1), run(2)
    for other in (one, two):
        for name in here.data_vars:
            assert here[name].values.tobytes() == other[name].values.tobytes(), name


RUN = {"size": "l2-d16", "seed": 0}
SPAN = RUN | {"start": 5, "stop": 12}  # the branches fork at step 7
TARGET = {"target": "induction_score", "options": {"layer": 1, "head": 1}}


def test_a_branch_without_intervention_is_attributed_as_its_parent(branch_store):
    run = obs.attribute(branch_store, **SPAN, **TARGET)
    same = obs.attribute(branch_store, **SPAN, **TARGET, branch="same")
    # from the parent's steps before the fork through the branch's own after it, bit for bit
    assert same.attrs["run"] == "l2-d16/seed0/branches/same"
    xr.testing.assert_identical(same.drop_attrs(), run.drop_attrs())
    stored = obs.attribution(branch_store, **RUN, name="induction_score", branch="same")
    xr.testing.assert_identical(stored, same)
    family = FamilyStore(branch_store)
    assert analyses(family.run(**RUN, branch="same"), kind=ATTRIBUTION) == ["induction_score"]
    assert analyses(family.run(**RUN, branch="no-prev"), kind=ATTRIBUTION) == []


def test_a_branch_with_an_ablated_head_is_attributed_along_its_own_steps(branch_store):
    run = obs.attribute(branch_store, **SPAN, **TARGET)
    ablated = obs.attribute(branch_store, **SPAN, **TARGET, branch="no-prev")
    terms, parent = ablated["step_contribution"].values, run["step_contribution"].values
    np.testing.assert_array_equal(terms[:2], parent[:2])  # steps 5 and 6: before the fork
    assert not np.array_equal(terms[2:], parent[2:])
    change = float(ablated["target_stop"] - ablated["target_start"])
    assert abs(float(ablated["residual"])) <= 0.01 * abs(change)
    nested = obs.attribute(branch_store, **SPAN, **TARGET, branch="no-prev/same")
    xr.testing.assert_identical(nested.drop_attrs(), ablated.drop_attrs())
    stored = obs.attribution(branch_store, **RUN, name="induction_score", branch="no-prev")
    xr.testing.assert_identical(stored, ablated)


def test_an_unknown_branch_is_refused_before_anything_is_written(branch_store):
    before = tree_bytes(branch_store)
    with pytest.raises(StoreError, match="has no branch 'nope'"):
        obs.attribute(branch_store, **SPAN, **TARGET, branch="nope")
    assert tree_bytes(branch_store) == before
