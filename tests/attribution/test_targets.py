"""Targets: the built-ins against the analyses' numbers, and the one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from observatory.analysis.heads import attention_patterns, head_scores
from observatory.attribution.targets import BUILTINS, TargetError, choose, target
from observatory.attribution.targets import value_and_gradient as evaluate
from observatory.errors import SpecError
from observatory.jobs.analyze import shared_data
from observatory.jobs.job_spec import HeldOutSpec, ProbeSpec
from observatory.query import model_at


@pytest.fixture(scope="module")
def model_and_data(trained_tiny):
    spec, store = trained_tiny
    model = model_at(store, size="l2-d16", seed=0, step=24)
    return model, shared_data(spec, ProbeSpec(), HeldOutSpec())


@pytest.mark.parametrize("score", ["induction", "previous_token"])
def test_head_scores_equal_the_analysis_numbers(model_and_data, score):
    model, data = model_and_data
    expected = head_scores(attention_patterns(model, data.probe_tokens), data.probe_tokens)
    for layer in range(2):
        for head in range(2):
            chosen = choose(f"{score}_score", {"layer": layer, "head": head})
            value, gradient = evaluate(chosen, model, data, "here")
            assert abs(value - expected[score][layer, head]) < 1e-6
            assert gradient.shape == (sum(p.numel() for p in model.parameters()),)
            assert torch.count_nonzero(gradient) > 0


def test_losses_are_the_mean_token_losses(model_and_data):
    from observatory.analysis.icl import token_losses

    model, data = model_and_data
    held_out, _ = evaluate(choose("held_out_loss", None), model, data, "here")
    assert held_out == pytest.approx(token_losses(model, data.held_out_tokens).mean(), abs=1e-6)
    repeated, _ = evaluate(choose("probe_repeated_loss", None), model, data, "here")
    losses = token_losses(model, data.probe_tokens)[:, data.probe.block_length :]
    assert repeated == pytest.approx(losses.mean(), abs=1e-6)


def test_evaluation_leaves_the_model_grads_mode_and_rng_alone(model_and_data):
    model, data = model_and_data
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    evaluate(choose("induction_score", {"layer": 1}), model, data, "here")
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    for name, p in model.named_parameters():
        assert p.grad is None and torch.equal(p.detach(), before[name])


def test_bad_targets_are_one_line_errors(model_and_data):
    model, data = model_and_data

    @target
    def vector(model, data):
        return model(torch.as_tensor(data.probe_tokens)).logits[0, 0]

    @target
    def constant(model, data, *, value: float = 1.0):
        return torch.tensor(value)

    for bad, message in ((vector, "not a 0-d torch tensor"), (constant, "does not require grad")):
        with pytest.raises(TargetError, match=message) as err:
            evaluate(choose(bad, None), model, data, "here")
        assert "\n" not in str(err.value)
    with pytest.raises(SpecError, match="unknown target 'nope'"):
        choose("nope", None)
    with pytest.raises(SpecError, match="unknown key 'lay'"):
        choose("induction_score", {"lay": 1})

    def one_argument(model):
        return model

    with pytest.raises(SpecError, match="must take \\(model, data\\) first"):
        target(one_argument)
    with pytest.raises(TargetError, match="no head 5.0"):
        evaluate(choose("induction_score", {"layer": 5}), model, data, "here")


def test_a_user_target_resolves_from_a_file(tmp_path, model_and_data):
    model, data = model_and_data
    path = tmp_path / "mine.py"
    path.write_text(
        "import observatory as obs, torch\n\n"
        "@obs.target\n"
        "def first_logit(model, data, *, token: int = 1):\n"
        "    return model(torch.as_tensor(data.probe_tokens)).logits[:, -1, token].mean()\n"
    )
    chosen = choose(f"{path}:first_logit", {"token": 2})
    value, _ = evaluate(chosen, model, data, "here")
    assert np.isfinite(value) and "target_sha256" in chosen.parameters()
    assert chosen.portable().on_worker().target.name == "first_logit"
    assert set(BUILTINS) == {
        "induction_score",
        "previous_token_score",
        "probe_repeated_loss",
        "held_out_loss",
    }
