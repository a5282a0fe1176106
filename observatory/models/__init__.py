"""The model families: one module per architecture, a registry of them, and shared naming.

- ``gpt_neox.py``, ``attn_only.py``: one architecture each (config, model, parameter dims,
  per-head views, Hugging Face model type, TransformerLens adapter, head outputs), declared as
  an :class:`~observatory.models.registry.Architecture`;
- ``registry.py``: the architectures by name, found as the modules of this package;
- ``naming.py``: stacked parameter names and the TransformerLens views shared by all;
- ``build.py``: a spec's models, built through its architecture.

Names are imported from their module on first use, so that the registry (and so a spec's
check of its architecture) does not import torch.
"""

from importlib import import_module

# Public names, by the module that defines them.
_LAZY = {
    **dict.fromkeys(("build_config", "build_model", "model_from_config"), "build"),
    **dict.fromkeys(
        (
            "BOS_TOKEN",
            "PER_HEAD_DIMS",
            "VIEW_DIMS",
            "layer_name",
            "model_weights",
            "stack_layers",
            "stacked_name",
            "transformer_lens_weights",
            "unstack_layers",
        ),
        "naming",
    ),
    **dict.fromkeys(("Architecture", "architecture", "parameter_dims"), "registry"),
    **dict.fromkeys(("AttnOnlyConfig", "AttnOnlyForCausalLM"), "attn_only"),
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"observatory.models.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'observatory.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
