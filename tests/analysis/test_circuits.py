"""OV and QK circuit norms and effective ranks against the full d_model x d_model matrices."""

import numpy as np
import pytest

from observatory.analysis import circuit_statistics, effective_rank, factored_singular_values
from observatory.analysis.builtins import BUILTINS, DEFAULT_ANALYSES
from observatory.analysis.circuits import CIRCUIT_VARIABLES

N_LAYERS, N_HEADS, D_MODEL, D_HEAD = 2, 3, 24, 8


def random_weights(rng) -> dict[str, np.ndarray]:
    """TransformerLens-shaped W_Q, W_K, W_V, W_O of random heads."""
    qkv = (N_LAYERS, N_HEADS, D_MODEL, D_HEAD)
    return {
        "W_Q": rng.normal(size=qkv),
        "W_K": rng.normal(size=qkv),
        "W_V": rng.normal(size=qkv),
        "W_O": rng.normal(size=(N_LAYERS, N_HEADS, D_HEAD, D_MODEL)),
    }


def direct_statistics(weights) -> dict[str, np.ndarray]:
    """Loop-by-loop reference on the full d_model x d_model circuits."""
    out = {name: np.zeros((N_LAYERS, N_HEADS)) for name in CIRCUIT_VARIABLES}
    for layer in range(N_LAYERS):
        for head in range(N_HEADS):
            at = (layer, head)
            circuits = {
                "ov": weights["W_V"][at] @ weights["W_O"][at],
                "qk": weights["W_Q"][at] @ weights["W_K"][at].T,
            }
            for name, matrix in circuits.items():
                assert matrix.shape == (D_MODEL, D_MODEL)
                sigma = np.linalg.svd(matrix, compute_uv=False)
                p = sigma / sigma.sum()
                p = p[p > 0]
                out[f"{name}_norm"][at] = np.linalg.norm(matrix, "fro")
                out[f"{name}_effective_rank"][at] = np.exp(-(p * np.log(p)).sum())
    return out


def test_factored_form_equals_the_direct_computation():
    rng = np.random.default_rng(0)
    weights = random_weights(rng)
    got = circuit_statistics(weights)
    expected = direct_statistics(weights)
    for name in CIRCUIT_VARIABLES:
        assert got[name].shape == (N_LAYERS, N_HEADS) and got[name].dtype == np.float64
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-10, atol=0)
    ranks = got["ov_effective_rank"]
    assert np.all((ranks > 1) & (ranks < D_HEAD))  # random: between rank 1 and d_head
    # the singular values themselves: the top d_head of the full matrix, the rest zero
    left, right = weights["W_Q"][1, 2], weights["W_K"][1, 2]
    full = np.linalg.svd(left @ right.T, compute_uv=False)
    np.testing.assert_allclose(factored_singular_values(left, right), full[:D_HEAD], rtol=1e-10)
    assert np.all(full[D_HEAD:] < 1e-10 * full[0])


def test_leading_dims_are_carried():
    rng = np.random.default_rng(1)
    steps = [random_weights(rng) for _ in range(3)]
    stacked = circuit_statistics({k: np.stack([w[k] for w in steps]) for k in steps[0]})
    for i, weights in enumerate(steps):
        for name, value in circuit_statistics(weights).items():
            np.testing.assert_array_equal(stacked[name][i], value)


def test_planted_rank_one_and_full_rank_heads():
    rng = np.random.default_rng(2)
    weights = random_weights(rng)
    # L0H1 writes one direction for one direction: W_V = u a^T has rank 1
    weights["W_V"][0, 1] = np.outer(rng.normal(size=D_MODEL), rng.normal(size=D_HEAD))
    # L1H0 compares d_head orthonormal directions with themselves: d_head equal singular values
    basis = np.linalg.qr(rng.normal(size=(D_MODEL, D_HEAD)))[0]
    weights["W_Q"][1, 0] = weights["W_K"][1, 0] = 3.0 * basis
    got = circuit_statistics(weights)
    assert got["ov_effective_rank"][0, 1] == pytest.approx(1.0, abs=1e-6)
    assert got["qk_effective_rank"][0, 1] > 1.5  # its QK circuit is untouched
    assert got["qk_effective_rank"][1, 0] == pytest.approx(D_HEAD, rel=1e-10)
    assert got["qk_norm"][1, 0] == pytest.approx(9.0 * np.sqrt(D_HEAD), rel=1e-10)


def test_a_zero_circuit_has_norm_zero_and_no_effective_rank():
    rng = np.random.default_rng(3)
    weights = random_weights(rng)
    weights["W_O"][1, 2] = 0.0
    weights["W_K"][0, 0] = 0.0
    got = circuit_statistics(weights)
    assert got["ov_norm"][1, 2] == 0.0 and np.isnan(got["ov_effective_rank"][1, 2])
    assert got["qk_norm"][0, 0] == 0.0 and np.isnan(got["qk_effective_rank"][0, 0])
    finite = np.isfinite(got["ov_effective_rank"]) & np.isfinite(got["qk_effective_rank"])
    assert finite.sum() == N_LAYERS * N_HEADS - 2
    assert np.isnan(effective_rank(np.zeros((2, 4)))).all()


def test_the_analysis_declares_per_head_variables_and_runs_by_default():
    circuits = BUILTINS["circuits"]
    assert circuits.declared() == dict.fromkeys(CIRCUIT_VARIABLES, ("layer", "head"))
    assert circuits.allows_nonfinite("ov_effective_rank") and not circuits.allows_nonfinite(
        "ov_norm"
    )
    assert "circuits" in DEFAULT_ANALYSES
    assert "Roy & Vetterli" in circuits.parameters(circuits.options(), None)["effective_rank"]
