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

from observatory._lazy import lazy_attributes

# Public names, by the module that defines them.
_LAZY = {
    "build": "build_config build_model model_from_config",
    "naming": "BOS_TOKEN PER_HEAD_DIMS VIEW_DIMS layer_name model_weights stack_layers "
    "stacked_name transformer_lens_weights unstack_layers",
    "registry": "Architecture architecture parameter_dims",
    "attn_only": "AttnOnlyConfig AttnOnlyForCausalLM",
}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
__all__ = sorted(name for names in _LAZY.values() for name in names.split())
