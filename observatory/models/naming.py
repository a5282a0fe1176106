"""Names and dims shared by every architecture: stacked parameters and TransformerLens views.

A model's per-layer parameters (``a.layers.3.b``) are stored stacked along a leading ``layer``
dim under their stacked name (``a.layers.b``); each architecture declares the dims of its
stacked parameters (:attr:`~observatory.models.registry.Architecture.parameter_dims`).  The
TransformerLens-style per-head views (``W_Q[layer, head, d_model, d_head]``, ...) are derived
from the stacked parameters by the architecture's ``head_blocks`` and ``whole_views``.

Shapes follow TransformerLens names: ``d_vocab``, ``d_model``, ``n_heads``, ``d_head``,
``n_ctx``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from observatory.models import registry

BOS_TOKEN = 0  # every probe and synthetic sequence starts with token 0

# Dims whose entries belong to one head each, in blocks of d_head (chunked per head on disk):
# `d_qkv` is a fused [n_heads, 3 (q, k, v), d_head] axis, `d_heads` the concatenation
# [n_heads, d_head] of every head's rows.
PER_HEAD_DIMS = ("d_qkv", "d_heads")

# Dims of each TransformerLens view (before any leading ``step`` dim).
VIEW_DIMS: dict[str, tuple[str, ...]] = {
    "W_Q": ("layer", "head", "d_model", "d_head"),
    "W_K": ("layer", "head", "d_model", "d_head"),
    "W_V": ("layer", "head", "d_model", "d_head"),
    "W_O": ("layer", "head", "d_head", "d_model"),
    "b_Q": ("layer", "head", "d_head"),
    "b_K": ("layer", "head", "d_head"),
    "b_V": ("layer", "head", "d_head"),
    "b_O": ("layer", "d_model"),
    "W_E": ("d_vocab", "d_model"),
    "W_U": ("d_model", "d_vocab"),
    "W_pos": ("n_ctx", "d_model"),
}


def config_keys(spec: Any, size: Any) -> dict[str, Any]:
    """The Hugging Face config entries that every architecture takes from a spec.

    Parameters
    ----------
    spec, size
        The family's :class:`~observatory.spec.ModelSpec` and one of its sizes.
    """
    return {
        "vocab_size": spec.vocab_size,
        "hidden_size": size.d_model,
        "num_hidden_layers": size.n_layers,
        "num_attention_heads": size.n_heads,
        "max_position_embeddings": size.n_positions,
        "bos_token_id": BOS_TOKEN,
    }


_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def stacked_name(name: str) -> tuple[str, int | None]:
    """Split ``a.layers.3.b`` into the stacked name ``a.layers.b`` and the layer index 3."""
    match = _LAYER_INDEX.search("." + name)
    if match is None:
        return name, None
    return ("." + name).replace(match.group(0), ".layers.", 1)[1:], int(match.group(1))


def layer_name(stacked: str, layer: int) -> str:
    """Inverse of :func:`stacked_name`: the per-layer parameter name of ``stacked``."""
    return ("." + stacked).replace(".layers.", f".layers.{layer}.", 1)[1:]


def is_stacked(name: str) -> bool:
    """Whether ``name`` is a stacked name (``a.layers.b``: a leading ``layer`` dim)."""
    return ".layers." in "." + name and stacked_name(name)[1] is None


def stack_layers(
    tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> dict[str, np.ndarray]:
    """Copy per-layer tensors into numpy arrays (float32, or ``dtype``) stacked along a leading
    ``layer`` dim.

    ``{"a.layers.0.w": t0, "a.layers.1.w": t1, "b": u}`` becomes
    ``{"a.layers.w": stack([t0, t1]), "b": u}``.  Always copies, so the result is a snapshot.
    """
    groups: dict[str, dict[int, np.ndarray]] = {}
    out: dict[str, np.ndarray] = {}
    for name, tensor in tensors.items():
        array = tensor.detach().to(device="cpu", dtype=dtype).numpy()
        stacked, layer = stacked_name(name)
        if layer is None:
            out[name] = array.copy()
        else:
            groups.setdefault(stacked, {})[layer] = array
    for stacked, layers in groups.items():
        out[stacked] = np.stack([layers[i] for i in range(len(layers))])
    return out


def unstack_layers(stacked: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`stack_layers`: per-layer tensors named as in the model's state dict."""
    out: dict[str, torch.Tensor] = {}
    for name, array in stacked.items():
        if is_stacked(name):
            for layer in range(array.shape[0]):
                out[layer_name(name, layer)] = torch.from_numpy(np.array(array[layer]))
        else:
            out[name] = torch.from_numpy(np.array(array))
    return out


def transformer_lens_weights(
    stacked: Mapping[str, Any], *, architecture: str, n_heads: int
) -> dict[str, Any]:
    """Per-head weights in TransformerLens shapes, from stacked HF parameters.

    Works on anything with numpy's ``reshape``/``transpose`` (numpy, dask, xarray ``.data``),
    so the query layer can build lazy views and analyses can use in-memory weights alike.

    Parameters
    ----------
    stacked
        Stacked parameters by name, as written by :func:`stack_layers` (a leading ``step`` dim
        is allowed: it is carried through as the first dim of every output).
    architecture
        The architecture (``"gpt_neox"``, ``"attn_only"``, ...), whose declaration says where
        each view sits.
    n_heads
        Heads per layer.

    Returns
    -------
    dict
        The views of :data:`VIEW_DIMS` that the architecture declares: ``W_Q, W_K, W_V
        [layer, head, d_model, d_head]``, ``W_O [layer, head, d_head, d_model]``,
        ``b_Q, b_K, b_V [layer, head, d_head]``, ``b_O [layer, d_model]``,
        ``W_E [d_vocab, d_model]``, ``W_U [d_model, d_vocab]`` and, with learned positions,
        ``W_pos [n_ctx, d_model]`` (each with the leading ``step`` dim if the input had one).
    """
    declared = registry.architecture(architecture)

    def dims(param: str, array: Any) -> tuple[str, ...]:
        own = declared.parameter_dims[param]
        return ("step",) * (array.ndim - len(own)) + own

    out: dict[str, Any] = {}
    for view, (param, part, parts) in declared.head_blocks.items():
        array = stacked[param]
        picked, expanded = _head_block(array, dims(param, array), n_heads, part, parts)
        out[view] = _reordered(picked, expanded, VIEW_DIMS[view])
    for view, params in declared.whole_views.items():
        # the first name the model has (a KeyError naming the first if it has none)
        param = next((name for name in params if name in stacked), params[0])
        out[view] = _reordered(stacked[param], dims(param, stacked[param]), VIEW_DIMS[view])
    return out


def _head_block(
    array: Any, dims: tuple[str, ...], n_heads: int, part: int, parts: int
) -> tuple[Any, tuple[str, ...]]:
    """Block ``part`` of every head's ``parts`` blocks, its per-head dim split in two."""
    axis = next(i for i, dim in enumerate(dims) if dim in PER_HEAD_DIMS)
    shape = array.shape
    d_head = shape[axis] // (n_heads * parts)
    split = array.reshape(*shape[:axis], n_heads, parts, d_head, *shape[axis + 1 :])
    picked = split[(slice(None),) * (axis + 1) + (part,)]
    return picked, (*dims[:axis], "head", "d_head", *dims[axis + 1 :])


def _reordered(array: Any, dims: tuple[str, ...], view_dims: tuple[str, ...]) -> Any:
    """``array`` (dims ``dims``) with its dims in the order of ``view_dims`` (after any lead)."""
    lead = dims[: len(dims) - len(view_dims)]
    return array.transpose(*(dims.index(dim) for dim in (*lead, *view_dims)))


def model_weights(model: Any) -> dict[str, np.ndarray]:
    """TransformerLens-shaped per-head weights (numpy) of an in-memory model."""
    stacked = stack_layers(dict(model.named_parameters()))
    return transformer_lens_weights(
        stacked,
        architecture=registry.of_config(model.config).name,
        n_heads=model.config.num_attention_heads,
    )
