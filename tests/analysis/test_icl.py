"""Per-token losses, the ICL score and the per-token-loss PCA."""

import numpy as np
import pytest
import torch

from observatory.analysis import (
    compiled_induction_model,
    icl_positions,
    icl_score,
    linear_cka,
    loss_pca,
    loss_positions,
    repeated_tokens,
    token_losses,
)
from observatory.models import build_model
from observatory.spec import ModelSpec, SizeSpec

VOCAB = 64
N_CTX = 64


@pytest.fixture(scope="module")
def fresh_model():
    spec = ModelSpec("attn_only", VOCAB, (SizeSpec("s", 2, 64, 4, N_CTX),), layer_norm=False)
    return build_model(spec, spec.sizes[0], init_seed=0)


@pytest.fixture(scope="module")
def probe():
    return repeated_tokens(vocab_size=VOCAB, n_ctx=N_CTX, seed=0)


def test_token_losses_match_the_models_own_loss(fresh_model, probe):
    losses = token_losses(fresh_model, probe.tokens)
    assert losses.shape == (10, probe.tokens.shape[1] - 1) and losses.dtype == np.float64
    ids = torch.as_tensor(probe.tokens)
    with torch.no_grad():
        expected = fresh_model(ids, labels=ids).loss.item()
    assert losses.mean() == pytest.approx(expected, rel=1e-5)


def test_icl_positions_scale_olssons_50_and_500():
    assert icl_positions(512) == (50, 500)
    assert icl_positions(64) == (6, 62)
    for n_ctx in range(4, 600):
        early, late = icl_positions(n_ctx)
        assert 1 <= early < late <= n_ctx - 2
    with pytest.raises(ValueError):
        icl_positions(3)


def test_icl_score_is_negative_for_a_copying_model(probe):
    model = compiled_induction_model(vocab_size=VOCAB, n_ctx=N_CTX)
    early, late = icl_positions(probe.tokens.shape[1])
    score = icl_score(token_losses(model, probe.tokens), early=early, late=late)
    assert score == pytest.approx(-np.log(VOCAB), abs=1e-3)  # ln 64 in block 1, ~0 in block 2


def test_icl_score_is_near_zero_for_a_fresh_model(fresh_model, probe):
    early, late = icl_positions(probe.tokens.shape[1])
    assert abs(icl_score(token_losses(fresh_model, probe.tokens), early=early, late=late)) < 0.05


def test_icl_score_is_late_minus_early():
    losses = np.array([[3.0, 2.0, 1.0], [5.0, 2.0, 0.0]])
    assert icl_score(losses, early=0, late=2) == -3.5


def test_loss_positions_are_fixed_by_seed_and_in_range():
    a = loss_positions(n_sequences=100, n_losses=63, seed=1)
    np.testing.assert_array_equal(a, loss_positions(n_sequences=100, n_losses=63, seed=1))
    assert a.shape == (100,) and a.min() >= 0 and a.max() < 63


def test_loss_pca_recovers_a_planted_plane():
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(300, 2)) * [3.0, 1.0]  # [n_samples, 2]
    basis = np.linalg.qr(rng.normal(size=(40, 2)))[0].T  # [2, n_features], orthonormal rows
    x = 2.0 + latent @ basis + 0.01 * rng.normal(size=(300, 40))
    pca = loss_pca(x, n_components=2)
    assert pca.projections.shape == (300, 2) and pca.components.shape == (2, 40)
    assert pca.explained_variance_ratio.sum() > 0.99
    assert pca.explained_variance_ratio[0] > pca.explained_variance_ratio[1]
    # the components span the planted plane, and PC1 is its long axis
    np.testing.assert_allclose(np.linalg.svd(pca.components @ basis.T)[1], 1.0, atol=1e-3)
    assert abs(np.corrcoef(pca.projections[:, 0], latent[:, 0])[0, 1]) > 0.999
    assert linear_cka(pca.projections, latent) > 0.999
    np.testing.assert_allclose(loss_pca(x).components, pca.components)  # sign is fixed
