"""The hand-compiled induction model: the analyses must find the circuit that was built in."""

import numpy as np
import pytest

from observatory.analysis import (
    attention_patterns,
    compiled_induction_model,
    copying_score,
    head_scores,
    repeated_tokens,
    token_losses,
)
from observatory.models import AttnOnlyForCausalLM, model_weights

VOCAB = 64
N_CTX = 64
INDUCTION = (1, 0)  # layer, head
PREVIOUS = (0, 0)


@pytest.fixture(scope="module")
def model():
    return compiled_induction_model(vocab_size=VOCAB, n_ctx=N_CTX)


@pytest.fixture(scope="module")
def probe():
    return repeated_tokens(vocab_size=VOCAB, n_ctx=N_CTX, seed=0)


@pytest.fixture(scope="module")
def patterns(model, probe):
    return attention_patterns(model, probe.tokens)


def others(scores: np.ndarray, head: tuple[int, int]) -> np.ndarray:
    mask = np.ones(scores.shape, dtype=bool)
    mask[head] = False
    return scores[mask]


def test_compiled_model_is_a_two_layer_attention_only_model(model):
    assert isinstance(model, AttnOnlyForCausalLM)
    assert model.config.num_hidden_layers == 2 and model.config.layer_norm is False
    assert model.config.hidden_size >= 3 * VOCAB + N_CTX
    assert not model.training


def test_induction_head_scores_high_and_every_other_head_low(patterns, probe):
    induction = head_scores(patterns, probe.tokens)["induction"]
    assert induction[INDUCTION] > 0.9
    assert others(induction, INDUCTION).max() < 0.1


def test_previous_token_head_in_layer_zero(patterns, probe):
    previous = head_scores(patterns, probe.tokens)["previous_token"]
    assert previous[PREVIOUS] > 0.9
    assert others(previous, PREVIOUS).max() < 0.1


def test_transformer_lens_convention_is_lower_but_still_picks_the_induction_head(patterns, probe):
    olsson = head_scores(patterns, probe.tokens)["induction"]
    tl = head_scores(patterns, probe.tokens, convention="transformer_lens")["induction"]
    assert tl[INDUCTION] < olsson[INDUCTION]
    assert np.unravel_index(tl.argmax(), tl.shape) == INDUCTION
    # the first repeat has no target: about half the rows of a 2-repeat probe
    assert tl[INDUCTION] == pytest.approx(0.5, abs=0.05)


def test_induction_head_copies(model):
    scores = copying_score(model_weights(model))
    assert scores[INDUCTION] == pytest.approx(1.0)
    assert np.isnan(scores[PREVIOUS])  # writes PREV, which the unembedding does not read


def test_repeated_half_is_predicted_with_low_loss(model, probe):
    losses = token_losses(model, probe.tokens)  # [batch, pos - 1]
    # losses[:, t] predicts token t + 1: tokens 1 .. L + 1 have nothing earlier to copy
    unseen = losses[:, : probe.block_length + 1]
    repeated = losses[:, probe.block_length + 1 :]  # tokens L + 2 .. 2L
    assert repeated.max() < 1e-3
    np.testing.assert_allclose(unseen, np.log(VOCAB), atol=1e-3)  # uniform: BOS value is zero


def test_d_head_too_small_is_rejected():
    with pytest.raises(ValueError, match="too small"):
        compiled_induction_model(vocab_size=VOCAB, n_ctx=N_CTX, d_head=32)
