"""Probe, attention-score and copying-score analyses against hand-made known answers."""

import numpy as np
import pytest

from observatory.analysis import (
    attention_patterns,
    copying_score,
    head_score_attrs,
    head_scores,
    repeated_tokens,
)
from observatory.models import BOS_TOKEN, build_model, model_weights
from observatory.spec import ModelSpec, SizeSpec

VOCAB = 64
N_CTX = 64


def naive_scores(pattern: np.ndarray, tokens: np.ndarray) -> dict[str, dict[str, float]]:
    """Loop-by-loop reference for one head: pattern[batch, q, k], tokens[batch, pos]."""
    pm = {"induction": [], "previous_token": [], "duplicate_token": []}
    tl = {"induction": [], "previous_token": [], "duplicate_token": []}
    for a, toks in zip(pattern, tokens, strict=True):
        numerators = dict.fromkeys(tl, 0.0)
        for q in range(len(toks)):
            earlier = [k for k in range(q) if toks[k] == toks[q]]
            targets = {
                "induction": [k + 1 for k in earlier],
                "previous_token": [q - 1] if q > 0 else [],
                "duplicate_token": earlier,
            }
            for name, keys in targets.items():
                if keys:
                    pm[name].append(sum(a[q, k] for k in keys))
                numerators[name] += sum(a[q, k] for k in keys)
        for name in tl:
            tl[name].append(numerators[name] / a.sum())
    return {
        "prefix_matching": {k: float(np.mean(v)) for k, v in pm.items()},
        "transformer_lens": {k: float(np.mean(v)) for k, v in tl.items()},
    }


def random_patterns(rng, n_layers, batch, n_heads, n_pos):
    """Random causal attention patterns [layer, batch, head, q, k] whose rows sum to 1."""
    logits = rng.normal(size=(n_layers, batch, n_heads, n_pos, n_pos))
    logits = np.where(np.tril(np.ones((n_pos, n_pos), dtype=bool)), logits, -np.inf)
    return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


def uniform_patterns(batch: int, n_pos: int) -> np.ndarray:
    """Uniform causal attention [1, batch, 1, q, k]."""
    pattern = np.tril(np.ones((n_pos, n_pos)))
    pattern /= pattern.sum(-1, keepdims=True)
    return np.broadcast_to(pattern, (1, batch, 1, n_pos, n_pos))


# --------------------------------------------------------------------------------------------
# Probe


def test_probe_is_bos_then_a_block_of_distinct_tokens_repeated():
    probe = repeated_tokens(vocab_size=VOCAB, n_ctx=200, seed=3)
    assert (probe.block_length, probe.repeats) == (25, 4)  # Olsson's 25 x 4 fits in 200
    assert probe.tokens.shape == (10, 101) and probe.tokens.dtype == np.int64
    assert (probe.tokens[:, 0] == BOS_TOKEN).all()
    blocks = probe.tokens[:, 1:].reshape(10, 4, 25)
    assert (blocks == blocks[:, :1]).all()
    assert (blocks[:, 0] != BOS_TOKEN).all() and (blocks[:, 0] < VOCAB).all()
    assert all(len(set(block)) == 25 for block in blocks[:, 0])
    assert probe.attrs["probe_seed"] == 3 and probe.attrs["probe_repeats"] == 4


def test_probe_is_deterministic_from_its_seed():
    a = repeated_tokens(vocab_size=VOCAB, n_ctx=N_CTX, seed=7).tokens
    b = repeated_tokens(vocab_size=VOCAB, n_ctx=N_CTX, seed=7).tokens
    c = repeated_tokens(vocab_size=VOCAB, n_ctx=N_CTX, seed=8).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize(
    ("vocab_size", "n_ctx", "expected"),
    [
        (64, 64, (25, 2)),  # repeats reduced first: 1 + 25 * 2 = 51 <= 64
        (64, 80, (25, 3)),
        (64, 40, (19, 2)),  # then the block: (40 - 1) // 2
        (10, 200, (9, 4)),  # block capped at vocab_size - 1 distinct tokens
    ],
)
def test_probe_shrinks_to_fit_the_context(vocab_size, n_ctx, expected):
    probe = repeated_tokens(vocab_size=vocab_size, n_ctx=n_ctx, seed=0)
    assert (probe.block_length, probe.repeats) == expected
    assert probe.tokens.shape[1] == 1 + expected[0] * expected[1] <= n_ctx


def test_probe_rejects_a_context_too_short_to_repeat():
    with pytest.raises(ValueError, match="n_ctx"):
        repeated_tokens(vocab_size=VOCAB, n_ctx=2, seed=0)


# --------------------------------------------------------------------------------------------
# Scores on hand-made patterns


def test_exact_previous_token_pattern_scores_one():
    tokens = np.arange(8)[None]
    pattern = np.eye(8, k=-1)
    pattern[0, 0] = 1.0  # the BOS row can only attend to itself
    patterns = pattern[None, None, None]
    pm = head_scores(patterns, tokens)
    assert pm["previous_token"][0, 0] == 1.0
    tl = head_scores(patterns, tokens, convention="transformer_lens")
    assert tl["previous_token"][0, 0] == pytest.approx(7 / 8)  # the BOS row counts, no target
    tl = head_scores(patterns, tokens, convention="transformer_lens", exclude_current_token=True)
    assert tl["previous_token"][0, 0] == 1.0


def test_exact_induction_pattern_on_known_tokens():
    tokens = np.array([[0, 1, 2, 3, 1, 2, 3]])
    pattern = np.zeros((7, 7))
    pattern[:4, 0] = 1.0  # no earlier occurrence: attend to BOS
    pattern[4, 2] = pattern[5, 3] = pattern[6, 4] = 1.0  # the token after the earlier copy
    patterns = pattern[None, None, None]
    pm = head_scores(patterns, tokens)
    assert pm["induction"][0, 0] == 1.0
    assert pm["duplicate_token"][0, 0] == 0.0
    assert pm["previous_token"][0, 0] == pytest.approx(1 / 6)  # only row 1 (-> BOS) counts
    tl = head_scores(patterns, tokens, convention="transformer_lens")
    assert tl["induction"][0, 0] == pytest.approx(3 / 7)  # rows without a target count
    tl = head_scores(patterns, tokens, convention="transformer_lens", exclude_bos=True)
    assert tl["induction"][0, 0] == 1.0


def test_induction_score_sums_over_all_earlier_occurrences():
    tokens = np.array([[0, 5, 7, 5, 7, 5]])
    pattern = np.zeros((6, 6))
    pattern[:3, 0] = 1.0
    pattern[3, 2] = 1.0  # 5 at 3: after the 5 at 1
    pattern[4, 3] = 1.0  # 7 at 4: after the 7 at 2
    pattern[5, [2, 4]] = 0.5  # 5 at 5: split between the tokens after the 5s at 1 and 3
    pm = head_scores(pattern[None, None, None], tokens)
    assert pm["induction"][0, 0] == 1.0


@pytest.mark.parametrize("convention", ["prefix_matching", "transformer_lens"])
def test_scores_match_a_loop_reference_on_random_patterns(convention):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 4, size=(3, 12))  # small vocab: many repeats
    patterns = random_patterns(rng, 2, 3, 2, 12)
    scores = head_scores(patterns, tokens, convention=convention)
    for layer in range(2):
        for head in range(2):
            expected = naive_scores(patterns[layer, :, head], tokens)[convention]
            for name, value in expected.items():
                assert scores[name][layer, head] == pytest.approx(value, rel=1e-12)


def test_uniform_attention_scores_earlier_occurrences_over_position():
    probe = repeated_tokens(vocab_size=VOCAB, n_ctx=N_CTX, seed=0)
    n_pos = probe.tokens.shape[1]
    scores = head_scores(uniform_patterns(10, n_pos), probe.tokens)
    # second repeat, query i = 1 + L + a: one earlier occurrence, i + 1 keys
    second = np.arange(1 + probe.block_length, n_pos)
    assert scores["induction"][0, 0] == pytest.approx(np.mean(1 / (second + 1)))
    assert scores["previous_token"][0, 0] == pytest.approx(np.mean(1 / np.arange(2, n_pos + 1)))


def test_duplicate_and_induction_scores_are_nan_without_repeats():
    tokens = np.arange(6)[None]
    scores = head_scores(uniform_patterns(1, 6), tokens)
    assert np.isnan(scores["induction"]).all() and np.isnan(scores["duplicate_token"]).all()
    assert np.isfinite(scores["previous_token"]).all()


def test_score_options_are_validated_and_recorded():
    tokens = np.arange(4)[None]
    with pytest.raises(ValueError, match="unknown convention"):
        head_scores(uniform_patterns(1, 4), tokens, convention="olsson")
    with pytest.raises(ValueError, match="transformer_lens"):
        head_scores(uniform_patterns(1, 4), tokens, exclude_bos=True)
    attrs = head_score_attrs(convention="transformer_lens", exclude_bos=True)
    assert attrs["score_convention"] == "transformer_lens" and attrs["exclude_bos"] is True
    assert "detect_head" in attrs["score_source"]


# --------------------------------------------------------------------------------------------
# Real models


@pytest.fixture(scope="module")
def fresh_model():
    spec = ModelSpec("attn_only", VOCAB, (SizeSpec("s", 2, 64, 4, N_CTX),), layer_norm=False)
    return build_model(spec, spec.sizes[0], init_seed=0)


def test_attention_patterns_shape_and_mode(fresh_model):
    probe = repeated_tokens(vocab_size=VOCAB, n_ctx=N_CTX, seed=0)
    fresh_model.train()
    patterns = attention_patterns(fresh_model, probe.tokens)
    assert fresh_model.training  # mode restored
    assert patterns.shape == (2, 10, 4, 51, 51)
    np.testing.assert_allclose(patterns.sum(-1), 1.0, atol=1e-5)
    assert np.abs(np.triu(patterns, k=1)).max() == 0.0  # causal


def test_fresh_model_scores_near_uniform_chance(fresh_model):
    probe = repeated_tokens(vocab_size=VOCAB, n_ctx=N_CTX, seed=0)
    scores = head_scores(attention_patterns(fresh_model, probe.tokens), probe.tokens)
    chance = head_scores(uniform_patterns(10, probe.tokens.shape[1]), probe.tokens)
    assert scores["induction"].max() < 0.2
    for name in ("induction", "previous_token", "duplicate_token"):
        np.testing.assert_allclose(scores[name], chance[name][0, 0], atol=0.01)


def test_fresh_gpt_neox_scores_near_uniform_chance():
    spec = ModelSpec("gpt_neox", VOCAB, (SizeSpec("s", 2, 32, 2, N_CTX),))
    model = build_model(spec, spec.sizes[0], init_seed=1)
    probe = repeated_tokens(vocab_size=VOCAB, n_ctx=N_CTX, seed=0)
    scores = head_scores(attention_patterns(model, probe.tokens), probe.tokens)
    chance = head_scores(uniform_patterns(10, probe.tokens.shape[1]), probe.tokens)
    assert scores["induction"].shape == (2, 2)
    np.testing.assert_allclose(scores["induction"], chance["induction"][0, 0], atol=0.01)


# --------------------------------------------------------------------------------------------
# Copying score


def copy_weights(sign: float, rng) -> dict[str, np.ndarray]:
    """Weights whose OV circuits are sign * (a projection onto d_head token directions)."""
    d_vocab, d_model, d_head = 16, 8, 4
    w_e = np.linalg.qr(rng.normal(size=(d_vocab, d_model)))[0]  # orthonormal columns
    w_v = rng.normal(size=(1, 2, d_model, d_head))
    # W_U @ W_E = I and pinv(W_V) @ W_V = I, so W_O @ W_U @ W_E @ W_V = sign * I
    w_o = sign * np.linalg.pinv(w_v)
    return {"W_E": w_e, "W_U": w_e.T, "W_V": w_v, "W_O": w_o}


def test_copying_score_is_plus_one_for_a_copying_head_and_minus_one_negated():
    rng = np.random.default_rng(0)
    np.testing.assert_allclose(copying_score(copy_weights(1.0, rng)), 1.0, atol=1e-9)
    np.testing.assert_allclose(copying_score(copy_weights(-1.0, rng)), -1.0, atol=1e-9)


def test_copying_score_of_random_and_zero_heads(fresh_model):
    weights = model_weights(fresh_model)
    scores = copying_score(weights)
    assert scores.shape == (2, 4)
    assert np.all((scores >= -1) & (scores <= 1)) and np.all(np.abs(scores) < 0.9)
    weights["W_O"] = weights["W_O"].copy()
    weights["W_O"][1, 2] = 0.0
    assert np.isnan(copying_score(weights)[1, 2])
