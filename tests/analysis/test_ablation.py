"""Head ablation: known answers on the compiled induction circuit, and hooks that match W_O."""

import numpy as np
import pytest
import torch

from observatory.analysis import (
    ablated_losses,
    compiled_induction_model,
    head_ablation_effects,
    repeated_tokens,
    token_losses,
)
from observatory.analysis.ablation import output_projections
from observatory.models import build_model
from observatory.spec import ModelSpec, SizeSpec


@pytest.fixture(scope="module")
def compiled():
    model = compiled_induction_model(vocab_size=32, n_ctx=48, n_heads=3)
    probe = repeated_tokens(vocab_size=32, n_ctx=48, seed=0, n_sequences=4, block_length=15)
    return model, probe


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_the_circuit_heads_have_large_effects_and_empty_heads_none(compiled, ablation):
    model, probe = compiled
    effect = head_ablation_effects(
        model, probe.tokens, ablation=ablation, from_position=probe.block_length
    )  # [layer, head]
    assert effect.shape == (2, 3)
    if ablation == "zero":  # zero: the induction head's output is gone, logits exactly uniform
        assert np.unravel_index(effect.argmax(), effect.shape) == (1, 0)
    # copying is gone without either head: near-uniform predictions (the previous-token head
    # feeds the induction head by K-composition; mean ablation leaves both an average output)
    assert effect[1, 0] > 0.75 * np.log(32) and effect[0, 0] > 0.75 * np.log(32)
    np.testing.assert_allclose(effect[:, 1:], 0.0, atol=1e-6)  # zero heads implement nothing


def test_ablation_leaves_the_model_unchanged(compiled):
    model, probe = compiled
    before = token_losses(model, probe.tokens)
    ablated_losses(model, probe.tokens, ablation="mean")
    np.testing.assert_array_equal(token_losses(model, probe.tokens), before)
    assert all(not p._forward_pre_hooks for p in output_projections(model))


def random_model(architecture: str):
    """A freshly initialised 2-layer, 4-head model of ``architecture`` and random tokens."""
    size = SizeSpec(name="s", n_layers=2, d_model=16, n_heads=4, n_positions=12)
    spec = ModelSpec(architecture=architecture, vocab_size=16, sizes=(size,))
    model = build_model(spec, size, init_seed=0).eval()
    return model, np.random.default_rng(0).integers(0, 16, size=(3, 12))


@pytest.mark.parametrize("architecture", ["gpt_neox", "attn_only"])
def test_zero_ablation_equals_zeroing_the_heads_columns_of_w_o(architecture):
    model, tokens = random_model(architecture)
    _, ablated = ablated_losses(model, tokens)
    layer, head, d_head = 1, 2, 4
    with torch.no_grad():
        output_projections(model)[layer].weight[:, head * d_head : (head + 1) * d_head] = 0
    np.testing.assert_allclose(ablated[layer, head], token_losses(model, tokens), rtol=1e-6)
    assert not np.allclose(ablated[0, 0], ablated[layer, head])


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_a_whole_layer_ablation_is_its_one_working_head_in_the_compiled_circuit(compiled, ablation):
    model, probe = compiled
    heads, layers = (
        head_ablation_effects(
            model,
            probe.tokens,
            ablation=ablation,
            from_position=probe.block_length,
            whole_layers=whole,
        )
        for whole in (False, True)
    )
    assert layers.shape == (2,)
    np.testing.assert_allclose(layers, heads[:, 0], atol=1e-6)  # the other heads add nothing


@pytest.mark.parametrize("architecture", ["gpt_neox", "attn_only"])
def test_zero_ablation_of_a_layer_equals_zeroing_its_w_o(architecture):
    model, tokens = random_model(architecture)
    _, ablated = ablated_losses(model, tokens, whole_layers=True)  # [layer, batch, pos - 1]
    assert ablated.shape == (2, 3, 11)
    with torch.no_grad():
        output_projections(model)[1].weight.zero_()
    np.testing.assert_allclose(ablated[1], token_losses(model, tokens), rtol=1e-6)
