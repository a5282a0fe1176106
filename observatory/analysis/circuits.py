"""Each head's OV and QK circuits: Frobenius norm and effective rank, from the factored form.

Elhage et al. 2021 ("A Mathematical Framework for Transformer Circuits") read a head as two
``[d_model, d_model]`` matrices: the OV circuit ``W_V[l, h] @ W_O[l, h]`` (what the head writes
into the residual stream for what it reads) and the QK circuit ``W_Q[l, h] @ W_K[l, h]^T`` (the
bilinear form of its attention scores). Both have rank at most ``d_head``, so their singular
values are those of a ``[d_head, d_head]`` core (:func:`factored_singular_values`) and no
``d_model x d_model`` matrix is ever formed.

What the circuits leave out: biases (``b_Q``, ``b_K``, ``b_V``, ``b_O``), LayerNorm (not folded
in), the ``1 / sqrt(d_head)`` scale of the attention scores, and rotary position embeddings
(GPT-NeoX rotates queries and keys by position; the QK circuit here is the product before the
rotation).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# The variables of :func:`circuit_statistics`, each ``[..., layer, head]``.
CIRCUIT_VARIABLES = ("ov_norm", "qk_norm", "ov_effective_rank", "qk_effective_rank")
# The definitions stored with the results.
CIRCUIT_ATTRS = {
    "ov_circuit": "W_V[l, h] @ W_O[l, h] (d_model x d_model)",
    "qk_circuit": "W_Q[l, h] @ W_K[l, h]^T (d_model x d_model)",
    "norm": "Frobenius norm: sqrt(sum sigma_i^2)",
    "effective_rank": "exp(-sum p_i ln p_i), p_i = sigma_i / sum sigma (Roy & Vetterli 2007); "
    "NaN for a zero circuit",
    "ignored": "biases, LayerNorm, the 1/sqrt(d_head) score scale, rotary embeddings",
}


def factored_singular_values(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Singular values of ``left @ right^T`` without forming the product (float64).

    With reduced QR factorisations ``left = Q_l R_l`` and ``right = Q_r R_r``, the product is
    ``Q_l (R_l R_r^T) Q_r^T`` and ``Q_l``, ``Q_r`` have orthonormal columns, so its non-zero
    singular values are those of the small core ``R_l R_r^T``; the remaining ones are zero.

    Parameters
    ----------
    left, right
        ``[..., n, k]`` factors (any matching leading dims), e.g. ``W_Q`` and ``W_K`` of
        shape ``[layer, head, d_model, d_head]``.

    Returns
    -------
    numpy.ndarray
        ``[..., min(n, k)]`` singular values in descending order (float64).
    """
    r_left = np.linalg.qr(np.asarray(left, dtype=np.float64), mode="r")
    r_right = np.linalg.qr(np.asarray(right, dtype=np.float64), mode="r")
    core = r_left @ np.swapaxes(r_right, -1, -2)  # [..., min(n, k), min(n, k)]
    return np.linalg.svd(core, compute_uv=False)


def effective_rank(singular_values: np.ndarray) -> np.ndarray:
    """Entropy effective rank of matrices given their singular values (Roy & Vetterli 2007).

    ``erank = exp(H(p))`` with ``p_i = sigma_i / sum_j sigma_j`` and ``H(p) = -sum p_i ln p_i``
    (``0 ln 0 = 0``): 1 for a rank-1 matrix, ``k`` for ``k`` equal singular values, between
    for anything else; zero singular values do not change it.

    Parameters
    ----------
    singular_values
        ``[..., k]`` non-negative singular values of each matrix.

    Returns
    -------
    numpy.ndarray
        ``[...]`` effective ranks (float64); NaN for a zero matrix (every ``sigma_i = 0``).
    """
    sigma = np.asarray(singular_values, dtype=np.float64)
    total = sigma.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = sigma / total
        entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=-1)
    return np.where(total[..., 0] > 0, np.exp(entropy), np.nan)


def circuit_statistics(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Frobenius norm and effective rank of every head's OV and QK circuits (float64).

    See the module docstring for the circuits and what they leave out.

    Parameters
    ----------
    weights
        TransformerLens-shaped weights, e.g. from :func:`observatory.models.model_weights`:
        ``W_Q``, ``W_K``, ``W_V`` ``[..., layer, head, d_model, d_head]`` and ``W_O``
        ``[..., layer, head, d_head, d_model]`` (leading dims such as ``step`` carried).

    Returns
    -------
    dict
        ``{"ov_norm", "qk_norm", "ov_effective_rank", "qk_effective_rank"}`` ->
        ``[..., layer, head]`` (float64): norms (0 for a zero circuit) and effective ranks
        (:func:`effective_rank`, in ``[1, d_head]``; NaN for a zero circuit).
    """
    w_o = np.swapaxes(np.asarray(weights["W_O"]), -1, -2)  # [..., d_model, d_head]
    out = {}
    for name, left, right in (
        ("ov", weights["W_V"], w_o),
        ("qk", weights["W_Q"], weights["W_K"]),
    ):
        sigma = factored_singular_values(left, right)
        out[f"{name}_norm"] = np.sqrt((sigma**2).sum(axis=-1))
        out[f"{name}_effective_rank"] = effective_rank(sigma)
    return {name: out[name] for name in CIRCUIT_VARIABLES}
