"""Head ablation: the increase in loss when one head's output is removed (a causal check).

A head's output is its ``z`` (the attention-weighted values, ``[batch, pos, d_head]``) times
``W_O``; ablating the head replaces its slice of the attention output projection's input (the
per-head ``z`` before ``W_O``) by zero or by its mean over every sequence and position of the
evaluated tokens (mean ablation changes the next layer's input distribution less). The
projection's bias ``b_O`` is kept. Works for every architecture: each declares its output
projections (GPT-NeoX's ``attention.dense``, the attention-only ``attn.o_proj``), whose inputs
are head-major. Ablating
every head of a layer at once measures what heads that duplicate each other do together.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from observatory.analysis.icl import token_losses
from observatory.models.registry import of_config

Ablation = Literal["zero", "mean"]


def output_projections(model: PreTrainedModel) -> list[nn.Linear]:
    """The attention output projection (``W_O``) of every layer, in layer order."""
    return of_config(model.config).output_projections(model)


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


def _replace_heads(heads: list[int], value: torch.Tensor | float, n_heads: int) -> Callable:
    """A pre-hook on ``W_O`` setting the ``z`` of ``heads`` to ``value`` (0, ``[head, d_head]``)."""

    def hook(_module: nn.Module, args: tuple) -> tuple:
        z = args[0].clone()
        _head_view(z, n_heads)[..., heads, :] = value
        return (z, *args[1:])

    return hook


def ablated_losses(
    model: PreTrainedModel,
    tokens: np.ndarray,
    *,
    ablation: Ablation = "zero",
    whole_layers: bool = False,
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
    whole_layers
        Ablate every head of a layer at once instead of one head at a time (heads that
        duplicate each other's work each cost little alone, but not together).

    Returns
    -------
    tuple of numpy.ndarray
        ``clean[batch, pos - 1]`` and ``ablated[layer, head, batch, pos - 1]``, or
        ``ablated[layer, batch, pos - 1]`` with ``whole_layers`` (float64, nats; index
        convention of :func:`~observatory.analysis.token_losses`).
    """
    if ablation not in ("zero", "mean"):
        raise ValueError(f"unknown ablation {ablation!r} (allowed: zero, mean)")
    n_heads = model.config.num_attention_heads
    projections = output_projections(model)
    clean = token_losses(model, tokens)
    means = mean_head_outputs(model, tokens) if ablation == "mean" else None
    groups = [list(range(n_heads))] if whole_layers else [[head] for head in range(n_heads)]
    ablated = np.empty((len(projections), len(groups), *clean.shape))
    for layer, projection in enumerate(projections):
        for index, heads in enumerate(groups):
            value = 0.0 if means is None else means[layer][heads]
            handle = projection.register_forward_pre_hook(_replace_heads(heads, value, n_heads))
            try:
                ablated[layer, index] = token_losses(model, tokens)
            finally:
                handle.remove()
    return clean, ablated[:, 0] if whole_layers else ablated


def head_ablation_effects(
    model: PreTrainedModel,
    tokens: np.ndarray,
    *,
    ablation: Ablation = "zero",
    from_position: int = 0,
    whole_layers: bool = False,
) -> np.ndarray:
    """Increase in mean loss when each head is ablated, over loss positions ``>= from_position``.

    Parameters
    ----------
    model, tokens, ablation, whole_layers
        As in :func:`ablated_losses`.
    from_position
        First loss index counted (``loss[:, t]`` predicts ``tokens[:, t + 1]``); on the
        repeated-token probe, ``block_length`` counts exactly the predictable repeats.

    Returns
    -------
    numpy.ndarray
        ``effect[layer, head]``, or ``effect[layer]`` with ``whole_layers`` (float64, nats):
        ablated minus clean mean loss.
    """
    clean, ablated = ablated_losses(model, tokens, ablation=ablation, whole_layers=whole_layers)
    return ablated[..., from_position:].mean(axis=(-2, -1)) - clean[:, from_position:].mean()
