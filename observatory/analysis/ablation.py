"""Head ablation: the increase in loss when one head's output is removed (a causal check).

A head's output is its ``z`` (the attention-weighted values, ``[batch, pos, d_head]``) times
``W_O``; ablating the head replaces its slice of the attention output projection's input (the
per-head ``z`` before ``W_O``) by zero or by its mean over every sequence and position of the
evaluated tokens (mean ablation changes the next layer's input distribution less). The
projection's bias ``b_O`` is kept. Works for GPT-NeoX (``attention.dense``) and the
attention-only models (``attn.o_proj``), whose projection inputs are head-major.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from observatory.analysis.icl import token_losses

Ablation = Literal["zero", "mean"]


def output_projections(model: PreTrainedModel) -> list[nn.Linear]:
    """The attention output projection (``W_O``) of every layer, in layer order."""
    if hasattr(model, "gpt_neox"):
        return [layer.attention.dense for layer in model.gpt_neox.layers]
    return [layer.attn.o_proj for layer in model.layers]


def _head_view(z: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``z[batch, pos, n_heads * d_head]`` as ``[batch, pos, head, d_head]`` (a view)."""
    return z.view(*z.shape[:-1], n_heads, z.shape[-1] // n_heads)


def mean_head_outputs(model: PreTrainedModel, tokens: np.ndarray) -> list[torch.Tensor]:
    """Per layer, every head's ``z`` averaged over sequences and positions: ``[head, d_head]``."""
    n_heads = model.config.num_attention_heads
    means: list[torch.Tensor] = []

    def record(_module: nn.Module, args: tuple) -> None:
        means.append(_head_view(args[0], n_heads).mean(dim=(0, 1)))

    handles = [p.register_forward_pre_hook(record) for p in output_projections(model)]
    try:
        token_losses(model, tokens)
    finally:
        for handle in handles:
            handle.remove()
    return means


def _replace_head(head: int, value: torch.Tensor, n_heads: int) -> Callable:
    def hook(_module: nn.Module, args: tuple) -> tuple:
        z = args[0].clone()
        _head_view(z, n_heads)[..., head, :] = value
        return (z, *args[1:])

    return hook


def ablated_losses(
    model: PreTrainedModel, tokens: np.ndarray, *, ablation: Ablation = "zero"
) -> tuple[np.ndarray, np.ndarray]:
    """Per-token losses of the model and of the model with each head ablated in turn.

    Parameters
    ----------
    model
        A GPT-NeoX or attention-only model (its train/eval mode is restored).
    tokens
        ``tokens[batch, pos]``.
    ablation
        ``"zero"``: the head's ``z`` becomes 0; ``"mean"``: its mean over ``tokens``.

    Returns
    -------
    tuple of numpy.ndarray
        ``clean[batch, pos - 1]`` and ``ablated[layer, head, batch, pos - 1]`` (float64, nats;
        index convention of :func:`~observatory.analysis.token_losses`).
    """
    if ablation not in ("zero", "mean"):
        raise ValueError(f"unknown ablation {ablation!r} (allowed: zero, mean)")
    n_heads = model.config.num_attention_heads
    projections = output_projections(model)
    clean = token_losses(model, tokens)
    if ablation == "mean":
        means = mean_head_outputs(model, tokens)
    ablated = np.empty((len(projections), n_heads, *clean.shape))
    for layer, projection in enumerate(projections):
        for head in range(n_heads):
            value = means[layer][head] if ablation == "mean" else 0.0
            handle = projection.register_forward_pre_hook(_replace_head(head, value, n_heads))
            try:
                ablated[layer, head] = token_losses(model, tokens)
            finally:
                handle.remove()
    return clean, ablated


def head_ablation_effects(
    model: PreTrainedModel,
    tokens: np.ndarray,
    *,
    ablation: Ablation = "zero",
    from_position: int = 0,
) -> np.ndarray:
    """Increase in mean loss when each head is ablated, over loss positions ``>= from_position``.

    Parameters
    ----------
    model, tokens, ablation
        As in :func:`ablated_losses`.
    from_position
        First loss index counted (``loss[:, t]`` predicts ``tokens[:, t + 1]``); on the
        repeated-token probe, ``block_length`` counts exactly the predictable repeats.

    Returns
    -------
    numpy.ndarray
        ``effect[layer, head]`` (float64, nats): ablated minus clean mean loss.
    """
    clean, ablated = ablated_losses(model, tokens, ablation=ablation)
    return ablated[..., from_position:].mean(axis=(-2, -1)) - clean[:, from_position:].mean()
