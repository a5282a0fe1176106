"""The architectures: each module of this package that declares an :class:`Architecture`.

An architecture is one module of ``observatory/models/`` (``gpt_neox.py``, ``attn_only.py``)
whose ``ARCHITECTURE`` holds everything the rest of the package asks about it: how a spec
builds its Hugging Face config and model, its Hugging Face ``model_type``, the dims of its
stored parameters, where each TransformerLens per-head view sits in those parameters, its
TransformerLens adapter and where a head's output can be hooked.  The module's name is the
spec's ``model.architecture``.

The names are the package's module files, listed without importing them, so that a spec can
be checked without importing torch; a module is imported when its architecture is asked for.
Adding an architecture is adding its module (and its test): nothing else names it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel

# Modules of this package that are not architectures.
SUPPORT_MODULES = frozenset({"build", "naming", "registry"})


@dataclass(frozen=True)
class Architecture:
    """Everything about one architecture, declared beside its model code.

    Attributes
    ----------
    name
        The spec's ``model.architecture`` (the module's name).
    model_type
        The Hugging Face ``config.model_type`` of its checkpoints (what ingest recognises).
    config
        ``config(model_spec, size_spec)``: the Hugging Face config of one size.
    model
        ``model(config)``: a freshly initialised model of a config (eager attention).
    parameter_dims
        Dims of each parameter once the per-layer ones are stacked along a leading ``layer``
        dim (see :func:`observatory.models.naming.stacked_name`), keyed by stacked name.
        Linear weights are ``[out, in]``; a per-head dim (``d_qkv``, ``d_heads``, see
        :data:`~observatory.models.naming.PER_HEAD_DIMS`) holds ``d_head``-sized blocks per head.
    head_blocks
        Each per-head TransformerLens view (``W_Q``, ``b_Q``, ..., ``W_O``) as
        ``(parameter, part, parts)``: each head owns ``parts`` consecutive ``d_head`` blocks
        along the parameter's per-head dim, and the view is block ``part`` of them.
    whole_views
        The other views (``b_O``, ``W_E``, ``W_U``, ``W_pos``): the parameter, the first of
        the names given that a model has, with its dims reordered to the view's.
    output_projections
        ``output_projections(model)``: the attention output projection (``W_O``) of each layer,
        whose input is every head's ``z`` side by side (head-major): where a head's output is
        hooked or ablated.
    lens_name
        ``lens_name(config)``: the TransformerLens architecture name that wraps the model.
    lens_adapters
        TransformerLens adapter classes to register by name before wrapping (built on demand,
        as TransformerLens is optional); none where TransformerLens has its own.
    spec_keys
        ``spec_keys(config)``: the ``[model]`` and ``[[model.sizes]]`` entries, beyond the
        shared ones, that describe an ingested checkpoint of this architecture.
    """

    name: str
    model_type: str
    config: Callable[[Any, Any], PretrainedConfig]  # (ModelSpec, SizeSpec): spec imports us
    model: Callable[[PretrainedConfig], PreTrainedModel]
    parameter_dims: Mapping[str, tuple[str, ...]]
    head_blocks: Mapping[str, tuple[str, int, int]]
    whole_views: Mapping[str, tuple[str, ...]]
    output_projections: Callable[[PreTrainedModel], list[nn.Module]]
    lens_name: Callable[[PretrainedConfig], str]
    spec_keys: Callable[[PretrainedConfig], tuple[dict[str, Any], dict[str, Any]]]
    lens_adapters: Callable[[], Mapping[str, type]] | None = field(default=None)


def names() -> tuple[str, ...]:
    """The architecture names (sorted), read from the package's modules without importing them."""
    return _module_names(tuple(importlib.import_module(__package__).__path__))


@cache
def _module_names(path: tuple[str, ...]) -> tuple[str, ...]:
    """The architecture modules found on the package's search path (listed once per path)."""
    found = {
        module.name
        for module in pkgutil.iter_modules(path)
        if not module.ispkg and not module.name.startswith("_")
    }
    return tuple(sorted(found - SUPPORT_MODULES))


def architecture(name: str) -> Architecture:
    """The declaration of architecture ``name`` (its module is imported on first use).

    Raises
    ------
    ValueError
        If no module of the package is called ``name`` (the message lists the names).
    """
    valid = names()
    if name not in valid:
        raise ValueError(f"unknown architecture {name!r} (architectures: {', '.join(valid)})")
    declared = importlib.import_module(f"{__package__}.{name}").ARCHITECTURE
    if declared.name != name:
        raise ValueError(f"module {name!r} declares architecture {declared.name!r}")
    return declared


def architectures() -> list[Architecture]:
    """Every architecture's declaration (importing every architecture module)."""
    return [architecture(name) for name in names()]


def model_types() -> dict[str, str]:
    """Architecture name by Hugging Face ``model_type``, for every architecture."""
    return {declared.model_type: declared.name for declared in architectures()}


def of_config(config: PretrainedConfig) -> Architecture:
    """The architecture of a Hugging Face config, by its ``model_type``.

    Raises
    ------
    ValueError
        If no architecture has that model type (the message lists the supported ones).
    """
    types = model_types()
    if config.model_type not in types:
        raise ValueError(
            f"model type {config.model_type!r} is not supported (supported: {', '.join(types)})"
        )
    return architecture(types[config.model_type])


def parameter_dims(stacked: str) -> tuple[str, ...]:
    """Dim names of a stacked parameter, e.g. ``("layer", "d_qkv", "d_model")``.

    Raises
    ------
    KeyError
        If no architecture declares a parameter of that name.
    """
    for declared in architectures():
        if stacked in declared.parameter_dims:
            return declared.parameter_dims[stacked]
    raise KeyError(f"no dims known for {stacked!r}; declare them in its architecture module")
