"""Building a family's models from its spec, through the architecture's declaration."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from observatory.models import registry

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

    from observatory.spec import ModelSpec, SizeSpec


def build_config(spec: ModelSpec, size: SizeSpec) -> PretrainedConfig:
    """The Hugging Face config of one size of the family (eager attention, no dropout)."""
    return registry.architecture(spec.architecture).config(spec, size)


def model_from_config(config: PretrainedConfig) -> PreTrainedModel:
    """Instantiate the model class that matches ``config`` (eager attention)."""
    return registry.of_config(config).model(config)


def build_model(spec: ModelSpec, size: SizeSpec, *, init_seed: int) -> PreTrainedModel:
    """A freshly initialised model: the same ``init_seed`` always gives bit-identical weights."""
    torch.manual_seed(init_seed)
    return model_from_config(build_config(spec, size))
