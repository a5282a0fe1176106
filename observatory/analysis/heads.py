"""Per-head scores: induction, previous-token and duplicate-token scores, and the copying score.

Two conventions for the attention scores (see ``shared/science.md``):

``"prefix_matching"`` (Olsson et al. 2022)
    Each score is the attention a query pays to its targets (summed over the targets),
    averaged over the query positions that *have* a target, pooled over all sequences.
``"transformer_lens"`` (``transformer_lens.head_detector.detect_head``, error measure "mul")
    For each sequence, ``sum(A * P) / sum(A)`` over the whole pattern, with ``P`` the 0/1
    detection pattern; rows without a target still count in the denominator, so this is lower
    than the prefix-matching score of the same head. Averaged over sequences, as ``detect_head``
    does for a list of sequences.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch
from transformers import PreTrainedModel

Convention = Literal["prefix_matching", "transformer_lens"]
CONVENTIONS: tuple[str, ...] = ("prefix_matching", "transformer_lens")
SCORE_NAMES: tuple[str, ...] = ("induction", "previous_token", "duplicate_token")
_SOURCES = {
    "prefix_matching": "Olsson et al. 2022, In-context Learning and Induction Heads",
    "transformer_lens": "transformer_lens.head_detector.detect_head, error_measure='mul'",
}


def attention_patterns(model: PreTrainedModel, tokens: np.ndarray) -> np.ndarray:
    """Attention patterns of every layer and head, in eval mode and without gradients.

    Parameters
    ----------
    model
        An :class:`~observatory.models.AttnOnlyForCausalLM` or GPT-NeoX model with eager
        attention. Its train/eval mode is restored afterwards.
    tokens
        ``tokens[batch, pos]`` (integers).

    Returns
    -------
    numpy.ndarray
        ``pattern[layer, batch, head, query_pos, key_pos]`` (float32); rows sum to 1.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
            out = model(ids, output_attentions=True)
    finally:
        model.train(was_training)
    return np.stack([a.float().numpy() for a in out.attentions])


def _target_masks(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """0/1 target masks ``[batch, query_pos, key_pos]`` of each score, from the tokens alone."""
    tokens = np.asarray(tokens)
    n_pos = tokens.shape[1]
    earlier = np.tril(np.ones((n_pos, n_pos), dtype=bool), k=-1)  # key_pos < query_pos
    duplicate = (tokens[:, :, None] == tokens[:, None, :]) & earlier  # earlier occurrences
    # the position right after each earlier occurrence (TransformerLens: shift one column right)
    induction = np.zeros_like(duplicate)
    induction[:, :, 1:] = duplicate[:, :, :-1]
    previous = np.broadcast_to(np.eye(n_pos, k=-1, dtype=bool), duplicate.shape)
    return {"induction": induction, "previous_token": previous, "duplicate_token": duplicate}


def head_scores(
    patterns: np.ndarray,
    tokens: np.ndarray,
    *,
    convention: Convention = "prefix_matching",
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
) -> dict[str, np.ndarray]:
    """Induction, previous-token and duplicate-token scores of every head.

    The targets are computed from ``tokens``, so any token sequences work, not only the probe:
    induction targets are the positions right after each earlier occurrence of the query's
    token, duplicate-token targets are the earlier occurrences themselves and the
    previous-token target is the position just before the query.

    Parameters
    ----------
    patterns
        ``pattern[layer, batch, head, query_pos, key_pos]`` from :func:`attention_patterns`.
    tokens
        ``tokens[batch, pos]`` the patterns were computed on.
    convention
        ``"prefix_matching"`` (Olsson) or ``"transformer_lens"`` (``detect_head``, "mul"); see
        the module docstring. Record it with :func:`head_score_attrs`.
    exclude_bos, exclude_current_token
        ``"transformer_lens"`` only: zero the attention to key 0 / to the query's own position
        before summing (numerator and denominator), as ``detect_head`` does.

    Returns
    -------
    dict
        ``{"induction", "previous_token", "duplicate_token"}`` -> ``score[layer, head]``
        (float64). Under ``"prefix_matching"`` a score is NaN if no query has a target (e.g.
        duplicate and induction scores on sequences without repeated tokens).

    Raises
    ------
    ValueError
        On an unknown convention, or exclusions asked for with ``"prefix_matching"``.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r} (allowed: {', '.join(CONVENTIONS)})")
    patterns = np.asarray(patterns, dtype=np.float64)
    masks = _target_masks(tokens)
    if convention == "prefix_matching":
        if exclude_bos or exclude_current_token:
            raise ValueError("exclude_bos / exclude_current_token belong to 'transformer_lens'")
        scores = {}
        for name, mask in masks.items():
            # attention on the targets of each query: [layer, batch, head, query_pos]
            on_target = np.einsum("lbhqk,bqk->lbhq", patterns, mask.astype(np.float64))
            has_target = mask.any(axis=-1)  # [batch, query_pos]
            total = np.einsum("lbhq,bq->lh", on_target, has_target.astype(np.float64))
            n_queries = has_target.sum()
            scores[name] = total / n_queries if n_queries else np.full(total.shape, np.nan)
        return scores
    if exclude_bos:
        patterns = patterns.copy()
        patterns[..., 0] = 0.0
    if exclude_current_token:
        n_pos = patterns.shape[-1]
        patterns = patterns * (1.0 - np.eye(n_pos))
    denominator = patterns.sum(axis=(-2, -1))  # [layer, batch, head]
    scores = {}
    for name, mask in masks.items():
        numerator = np.einsum("lbhqk,bqk->lbh", patterns, mask.astype(np.float64))
        scores[name] = (numerator / denominator).mean(axis=1)  # per-sequence ratio, then mean
    return scores


def head_score_attrs(
    *,
    convention: Convention = "prefix_matching",
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
) -> dict[str, str | bool]:
    """The attributes to store next to :func:`head_scores` computed with these options.

    Parameters
    ----------
    convention, exclude_bos, exclude_current_token
        The options passed to :func:`head_scores`.

    Returns
    -------
    dict
        ``score_convention``, ``score_source``, ``exclude_bos``, ``exclude_current_token``.
    """
    return {
        "score_convention": convention,
        "score_source": _SOURCES[convention],
        "exclude_bos": exclude_bos,
        "exclude_current_token": exclude_current_token,
    }


def copying_score(weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """Copying score of every head's full OV circuit (Elhage et al. 2021).

    For ``M = W_E @ W_V[l, h] @ W_O[l, h] @ W_U`` (``[d_vocab, d_vocab]``) the score is
    ``Re(sum(eig)) / sum(|eig|)`` in ``[-1, 1]``; positive means the head raises the logits of
    the tokens it attends to. The eigenvalues are taken of the ``[d_head, d_head]`` factor
    ``W_O @ W_U @ W_E @ W_V``, which has the same non-zero eigenvalues. Biases, positional
    embeddings and LayerNorm are ignored (LayerNorm is not folded in).

    Parameters
    ----------
    weights
        TransformerLens-shaped weights from :func:`observatory.models.model_weights`:
        ``W_E[d_vocab, d_model]``, ``W_V[layer, head, d_model, d_head]``,
        ``W_O[layer, head, d_head, d_model]``, ``W_U[d_model, d_vocab]``.

    Returns
    -------
    numpy.ndarray
        ``score[layer, head]`` (float64); NaN for a head whose OV circuit is zero.
    """
    w_e = np.asarray(weights["W_E"], dtype=np.float64)  # [d_vocab, d_model]
    w_u = np.asarray(weights["W_U"], dtype=np.float64)  # [d_model, d_vocab]
    w_v = np.asarray(weights["W_V"], dtype=np.float64)  # [layer, head, d_model, d_head]
    w_o = np.asarray(weights["W_O"], dtype=np.float64)  # [layer, head, d_head, d_model]
    unembed_embed = w_u @ w_e  # [d_model, d_model]
    small = w_o @ unembed_embed @ w_v  # [layer, head, d_head, d_head]
    eig = np.linalg.eigvals(small)  # [layer, head, d_head]
    total = np.abs(eig).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, eig.real.sum(axis=-1) / total, np.nan)


def prefix_matching_score(
    attention: torch.Tensor, tokens: np.ndarray, *, score: str = "induction"
) -> torch.Tensor:
    """One head's prefix-matching score as a differentiable torch scalar (float64).

    The same number as :func:`head_scores` with ``convention="prefix_matching"`` gives for
    that head, computed in torch so that gradients flow through the attention pattern.

    Parameters
    ----------
    attention
        ``pattern[batch, query_pos, key_pos]`` of one head on ``tokens`` (with grad).
    tokens
        ``tokens[batch, pos]`` the pattern was computed on.
    score
        ``"induction"``, ``"previous_token"`` or ``"duplicate_token"``.

    Returns
    -------
    torch.Tensor
        A 0-d float64 tensor; NaN if no query has a target.
    """
    mask = torch.tensor(_target_masks(tokens)[score], dtype=torch.float64)  # a copy
    has_target = mask.amax(dim=-1)  # [batch, query_pos]: 1 where the query has a target
    on_target = (attention.double() * mask).sum(dim=-1)  # [batch, query_pos]
    return (on_target * has_target).sum() / has_target.sum()
