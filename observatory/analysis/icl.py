"""Per-token losses, the in-context-learning score and the per-token-loss PCA (Olsson et al. 2022).

Loss index convention: ``losses[:, t]`` is the cross-entropy of predicting ``tokens[:, t + 1]``
after seeing ``tokens[:, : t + 1]``; the loss axis has ``pos - 1`` entries.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from transformers import PreTrainedModel

# Olsson's ICL score compares the loss at token 500 with the loss at token 50. We scale both
# by n_ctx / 512 (512: the smallest power-of-two context that holds token 500), which keeps
# their 1:10 ratio and puts the late position near the end of the context.
ICL_REFERENCE = {"early": 50, "late": 500, "n_ctx": 512}


def token_losses(model: PreTrainedModel, tokens: np.ndarray) -> np.ndarray:
    """Next-token cross-entropy at every position, in eval mode and without gradients.

    Parameters
    ----------
    model
        A causal LM returning ``logits[batch, pos, d_vocab]``; its train/eval mode is restored.
    tokens
        ``tokens[batch, pos]`` (integers).

    Returns
    -------
    numpy.ndarray
        ``loss[batch, pos - 1]`` (float64, nats); ``loss[:, t]`` predicts ``tokens[:, t + 1]``.
    """
    ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(ids).logits.double()  # [batch, pos, d_vocab]
    finally:
        model.train(was_training)
    log_probs = logits[:, :-1].log_softmax(dim=-1)
    return -log_probs.gather(-1, ids[:, 1:, None])[..., 0].numpy()


def icl_positions(n_ctx: int) -> tuple[int, int]:
    """Olsson's ICL positions (50 and 500 of a 512-token context) scaled to ``n_ctx``.

    ``early = round(50 * n_ctx / 512)`` and ``late = round(500 * n_ctx / 512)`` (half up),
    then clipped so that ``1 <= early < late <= n_ctx - 2`` (valid indices of the loss axis).
    For ``n_ctx = 64`` this gives ``(6, 62)``; for ``n_ctx = 512``, ``(50, 500)``.

    Parameters
    ----------
    n_ctx
        Length of the evaluated sequences (tokens, BOS included).

    Returns
    -------
    tuple of int
        ``(early, late)``: indices into the loss axis of :func:`token_losses`. Store them as
        attributes next to the score.

    Raises
    ------
    ValueError
        If ``n_ctx < 4`` (no two distinct positions after the first).
    """
    if n_ctx < 4:
        raise ValueError(f"n_ctx must be at least 4, got {n_ctx}")
    scale = n_ctx / ICL_REFERENCE["n_ctx"]
    late = min(int(np.floor(ICL_REFERENCE["late"] * scale + 0.5)), n_ctx - 2)
    early = min(max(int(np.floor(ICL_REFERENCE["early"] * scale + 0.5)), 1), late - 1)
    return early, late


def icl_score(losses: np.ndarray, *, early: int, late: int) -> float:
    """In-context-learning score: mean loss at ``late`` minus mean loss at ``early``.

    Negative when the model predicts later tokens better by using the context.

    Parameters
    ----------
    losses
        ``loss[..., pos - 1]`` from :func:`token_losses` (any leading dims, e.g. ``batch``).
    early, late
        Indices into the loss axis, e.g. from :func:`icl_positions`.

    Returns
    -------
    float
        ``mean(losses[..., late]) - mean(losses[..., early])``.
    """
    losses = np.asarray(losses, dtype=np.float64)
    return float(losses[..., late].mean() - losses[..., early].mean())


def loss_positions(*, n_sequences: int, n_losses: int, seed: int) -> np.ndarray:
    """One fixed random loss position per held-out sequence, for the per-token-loss PCA.

    Use the same positions for every checkpoint and seed:
    ``token_losses(model, tokens)[np.arange(n_sequences), positions]`` is the loss vector of a
    checkpoint.

    Parameters
    ----------
    n_sequences
        Number of held-out sequences.
    n_losses
        Length of the loss axis (``pos - 1``).
    seed
        Seed of ``numpy.random.default_rng``; record it.

    Returns
    -------
    numpy.ndarray
        ``positions[n_sequences]`` (int64) in ``[0, n_losses)``.
    """
    return np.random.default_rng(seed).integers(0, n_losses, size=n_sequences, dtype=np.int64)


class LossPCA(NamedTuple):
    """Result of :func:`loss_pca`."""

    projections: np.ndarray  # [n_samples, n_components]
    explained_variance_ratio: np.ndarray  # [n_components]
    components: np.ndarray  # [n_components, n_features]


def loss_pca(loss_vectors: np.ndarray, *, n_components: int = 2) -> LossPCA:
    """PCA of per-token-loss vectors, fit jointly over all rows (numpy SVD).

    Rows are samples (every checkpoint of every seed), columns the fixed loss positions. Each
    component's sign is fixed so that its largest-magnitude loading is positive, so fits on the
    same data are reproducible.

    Parameters
    ----------
    loss_vectors
        ``loss[n_samples, n_features]``.
    n_components
        Number of principal components kept.

    Returns
    -------
    LossPCA
        ``projections[n_samples, n_components]`` (coordinates of the centred rows),
        ``explained_variance_ratio[n_components]`` and ``components[n_components, n_features]``
        (unit rows).
    """
    x = np.asarray(loss_vectors, dtype=np.float64)
    centred = x - x.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    components = vt[:n_components]
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
    components = components * signs[:, None]
    variance = singular**2
    return LossPCA(
        projections=centred @ components.T,
        explained_variance_ratio=variance[:n_components] / variance.sum(),
        components=components,
    )
