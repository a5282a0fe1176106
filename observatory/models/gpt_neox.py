"""GPT-NeoX (Pythia-style): Hugging Face's model, with eager attention.

Its attention fuses the query, key and value projections into one ``query_key_value`` linear
layer whose rows are ``[head, (q, k, v), d_head]``; the output projection ``dense`` takes the
heads' outputs side by side.  TransformerLens has its own adapter for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PretrainedConfig

from observatory.models.naming import BOS_TOKEN, config_keys
from observatory.models.registry import Architecture

if TYPE_CHECKING:
    from observatory.spec import ModelSpec, SizeSpec


def build_config(spec: ModelSpec, size: SizeSpec) -> GPTNeoXConfig:
    """The config of one size: eager attention, no dropout, untied embeddings."""
    return GPTNeoXConfig(
        **config_keys(spec, size),
        intermediate_size=size.d_mlp or 4 * size.d_model,
        rotary_pct=spec.rotary_pct,  # transformers < 5
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": spec.rotary_pct,
        },
        attn_implementation="eager",
        eos_token_id=BOS_TOKEN,
        tie_word_embeddings=False,
        use_cache=False,
    )


def model_from_config(config: PretrainedConfig) -> GPTNeoXForCausalLM:
    """A freshly initialised model of ``config``, with eager attention (patterns readable)."""
    config._attn_implementation = "eager"
    return GPTNeoXForCausalLM(config)


def output_projections(model: GPTNeoXForCausalLM) -> list[nn.Module]:
    """The attention output projection of every layer (its input: the heads' ``z``)."""
    return [layer.attention.dense for layer in model.gpt_neox.layers]


def spec_keys(config: PretrainedConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The rotary fraction (``[model]``) and MLP width (``[[model.sizes]]``) of a checkpoint."""
    rope = getattr(config, "rope_parameters", None) or {}
    rotary = rope.get("partial_rotary_factor", getattr(config, "rotary_pct", 0.25))
    return {"rotary_pct": float(rotary)}, {"d_mlp": config.intermediate_size}


# Stacked parameter dims (Linear weights are [out, in]).
PARAMETER_DIMS: dict[str, tuple[str, ...]] = {
    "gpt_neox.embed_in.weight": ("d_vocab", "d_model"),
    "gpt_neox.layers.input_layernorm.weight": ("layer", "d_model"),
    "gpt_neox.layers.input_layernorm.bias": ("layer", "d_model"),
    "gpt_neox.layers.post_attention_layernorm.weight": ("layer", "d_model"),
    "gpt_neox.layers.post_attention_layernorm.bias": ("layer", "d_model"),
    "gpt_neox.layers.attention.query_key_value.weight": ("layer", "d_qkv", "d_model"),
    "gpt_neox.layers.attention.query_key_value.bias": ("layer", "d_qkv"),
    "gpt_neox.layers.attention.dense.weight": ("layer", "d_model", "d_heads"),
    "gpt_neox.layers.attention.dense.bias": ("layer", "d_model"),
    "gpt_neox.layers.mlp.dense_h_to_4h.weight": ("layer", "d_mlp", "d_model"),
    "gpt_neox.layers.mlp.dense_h_to_4h.bias": ("layer", "d_mlp"),
    "gpt_neox.layers.mlp.dense_4h_to_h.weight": ("layer", "d_model", "d_mlp"),
    "gpt_neox.layers.mlp.dense_4h_to_h.bias": ("layer", "d_model"),
    "gpt_neox.final_layer_norm.weight": ("d_model",),
    "gpt_neox.final_layer_norm.bias": ("d_model",),
    "lm_head.weight": ("d_vocab", "d_model"),
    "embed_out.weight": ("d_vocab", "d_model"),  # transformers < 5 name of lm_head
}

ARCHITECTURE = Architecture(
    name="gpt_neox",
    model_type="gpt_neox",
    config=build_config,
    model=model_from_config,
    parameter_dims=PARAMETER_DIMS,
    # q, k and v are fused: each head owns three d_head blocks of query_key_value's rows
    head_blocks={
        f"{kind}_{key}": (f"gpt_neox.layers.attention.query_key_value.{name}", part, 3)
        for kind, name in (("W", "weight"), ("b", "bias"))
        for part, key in enumerate("QKV")
    }
    | {"W_O": ("gpt_neox.layers.attention.dense.weight", 0, 1)},
    whole_views={
        "b_O": ("gpt_neox.layers.attention.dense.bias",),
        "W_E": ("gpt_neox.embed_in.weight",),
        "W_U": ("lm_head.weight", "embed_out.weight"),  # embed_out: transformers < 5
    },
    output_projections=output_projections,
    lens_name=lambda _config: "GPTNeoXForCausalLM",
    spec_keys=spec_keys,
)
