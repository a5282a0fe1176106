"""The attention-only toy transformer of the induction papers, as a Hugging Face model.

Token and learned position embeddings, residual layers of (LayerNorm and) multi-head causal
attention with separate Q/K/V/O projections (with biases), and an unembedding: no MLP.  A real
``transformers`` model (``save_pretrained`` / ``from_pretrained`` work) with eager attention,
so patterns can be read with ``output_attentions=True``.  TransformerLens gets an adapter for
it from this module, with and without LayerNorm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from observatory.models.naming import config_keys
from observatory.models.registry import Architecture

if TYPE_CHECKING:
    from observatory.spec import ModelSpec, SizeSpec

# TransformerLens architecture names, with and without LayerNorm (see lens_adapters).
LENS_NAMES = {True: "ObservatoryAttnOnlyForCausalLM", False: "ObservatoryAttnOnlyNoLNForCausalLM"}


class AttnOnlyConfig(PretrainedConfig):
    """Config of :class:`AttnOnlyForCausalLM`: the attention-only toy of the induction papers."""

    model_type = "observatory_attn_only"

    def __init__(
        self,
        vocab_size: int = 64,
        hidden_size: int = 64,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        max_position_embeddings: int = 64,
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.layer_norm = layer_norm
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class AttnOnlyAttention(nn.Module):
    """Multi-head causal self-attention with separate Q/K/V/O projections (with biases)."""

    def __init__(self, config: AttnOnlyConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.d_head = config.hidden_size // config.num_attention_heads
        d_model = config.hidden_size
        # weight[n_heads * d_head, d_model]: rows h*d_head:(h+1)*d_head belong to head h
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        # weight[d_model, n_heads * d_head]
        self.o_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, n_ctx, d_model = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # [batch, head, pos, d_head]
            return t.view(batch, n_ctx, self.n_heads, self.d_head).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        scores = q @ k.transpose(-1, -2) / self.d_head**0.5  # [batch, head, query_pos, key_pos]
        causal = torch.ones(n_ctx, n_ctx, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        pattern = scores.softmax(dim=-1)  # hook_pattern[batch, head, query_pos, key_pos]
        z = (pattern @ v).transpose(1, 2).reshape(batch, n_ctx, d_model)
        return self.o_proj(z), pattern


class AttnOnlyLayer(nn.Module):
    def __init__(self, config: AttnOnlyConfig):
        super().__init__()
        self.ln = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            if config.layer_norm
            else nn.Identity()
        )
        self.attn = AttnOnlyAttention(config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, pattern = self.attn(self.ln(x))
        return x + out, pattern


class AttnOnlyForCausalLM(PreTrainedModel):
    """Token + learned position embeddings, attention-only residual layers, unembedding."""

    config_class = AttnOnlyConfig
    base_model_prefix = "model"
    _no_split_modules = ["AttnOnlyLayer"]

    def __init__(self, config: AttnOnlyConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)  # W_E[d_vocab, d_model]
        # W_pos[n_ctx, d_model]
        self.pos_embed = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(AttnOnlyLayer(config) for _ in range(config.num_hidden_layers))
        self.ln_final = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            if config.layer_norm
            else nn.Identity()
        )
        # W_U is unembed.weight.T: weight[d_vocab, d_model]
        self.unembed = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_attentions: bool = False,
        **_: object,
    ) -> CausalLMOutput:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) + self.pos_embed(positions)  # [batch, pos, d_model]
        patterns = []
        for layer in self.layers:
            x, pattern = layer(x)
            patterns.append(pattern)
        logits = self.unembed(self.ln_final(x))  # [batch, pos, d_vocab]
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
            )
        return CausalLMOutput(
            loss=loss, logits=logits, attentions=tuple(patterns) if output_attentions else None
        )


AutoConfig.register(AttnOnlyConfig.model_type, AttnOnlyConfig)
AutoModelForCausalLM.register(AttnOnlyConfig, AttnOnlyForCausalLM)


def build_config(spec: ModelSpec, size: SizeSpec) -> AttnOnlyConfig:
    """The config of one size (``spec.layer_norm``: LayerNorm before each layer and unembed)."""
    return AttnOnlyConfig(**config_keys(spec, size), layer_norm=spec.layer_norm)


def output_projections(model: AttnOnlyForCausalLM) -> list[nn.Module]:
    """The attention output projection of every layer (its input: the heads' ``z``)."""
    return [layer.attn.o_proj for layer in model.layers]


def spec_keys(config: AttnOnlyConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Whether a checkpoint has LayerNorm (``[model]``); its sizes need nothing more."""
    return {"layer_norm": bool(config.layer_norm)}, {}


def _adapter_class(layer_norm: bool) -> type:
    """The TransformerLens adapter of :class:`AttnOnlyForCausalLM`.

    The model's ``layer_norm`` flag does not reach an adapter (TransformerLens keeps only the
    config fields it knows), hence one adapter class with and one without LayerNorm.
    """
    from transformer_lens.conversion_utils.conversion_steps import RearrangeTensorConversion
    from transformer_lens.conversion_utils.param_processing_conversion import (
        ParamProcessingConversion,
    )
    from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter
    from transformer_lens.model_bridge.generalized_components import (
        AttentionBridge,
        BlockBridge,
        EmbeddingBridge,
        LinearBridge,
        NormalizationBridge,
        PosEmbedBridge,
        UnembeddingBridge,
    )

    class AttnOnlyBlockBridge(BlockBridge):
        """A block without an MLP: no mid-residual stream and no MLP output to hook."""

        def __init__(self, name: str, config: Any = None, submodules: Any = None):
            super().__init__(name, config=config, submodules=submodules)
            self.hook_aliases = {
                alias: target
                for alias, target in self.hook_aliases.items()
                if alias not in ("hook_resid_mid", "hook_mlp_out")
            }

    class AttnOnlyArchitectureAdapter(ArchitectureAdapter):
        """Token + learned position embeddings, (LayerNorm +) attention blocks, unembedding.

        Q/K/V/O are separate ``nn.Linear`` layers whose rows (columns for O) are
        ``[head, d_head]``; the conversions give TransformerLens's per-head shapes.
        """

        def __init__(self, cfg: Any) -> None:
            super().__init__(cfg)
            self.cfg.normalization_type = "LN" if layer_norm else None
            self.cfg.positional_embedding_type = "standard"
            self.cfg.final_rms = False
            self.cfg.gated_mlp = False
            self.cfg.attn_only = True
            n_heads = self.cfg.n_heads

            def rearrange(pattern: str) -> ParamProcessingConversion:
                return ParamProcessingConversion(
                    tensor_conversion=RearrangeTensorConversion(pattern, n=n_heads)
                )

            self.weight_processing_conversions = {
                **{f"blocks.{{i}}.attn.{x}.weight": rearrange("(n h) m -> n m h") for x in "qkv"},
                **{f"blocks.{{i}}.attn.{x}.bias": rearrange("(n h) -> n h") for x in "qkv"},
                "blocks.{i}.attn.o.weight": rearrange("m (n h) -> n h m"),
            }
            attention = AttentionBridge(
                name="attn",
                config=self.cfg,
                submodules={key: LinearBridge(name=f"{key}_proj") for key in ("q", "k", "v", "o")},
            )
            block = {"attn": attention}
            if layer_norm:
                block = {"ln1": NormalizationBridge(name="ln", config=self.cfg), **block}
            self.component_mapping = {
                "embed": EmbeddingBridge(name="embed"),
                "pos_embed": PosEmbedBridge(name="pos_embed"),
                "blocks": AttnOnlyBlockBridge(name="layers", config=self.cfg, submodules=block),
                "unembed": UnembeddingBridge(name="unembed"),
            }
            if layer_norm:
                self.component_mapping["ln_final"] = NormalizationBridge(
                    name="ln_final", config=self.cfg
                )

    return AttnOnlyArchitectureAdapter


def lens_adapters() -> dict[str, type]:
    """The TransformerLens adapter classes, by TransformerLens architecture name."""
    return {name: _adapter_class(layer_norm) for layer_norm, name in LENS_NAMES.items()}


# Stacked parameter dims (Linear weights are [out, in]; q/k/v rows and o columns are
# [head, d_head]).
PARAMETER_DIMS: dict[str, tuple[str, ...]] = {
    "embed.weight": ("d_vocab", "d_model"),
    "pos_embed.weight": ("n_ctx", "d_model"),
    **{f"layers.ln.{name}": ("layer", "d_model") for name in ("weight", "bias")},
    **{f"layers.attn.{x}_proj.weight": ("layer", "d_heads", "d_model") for x in "qkv"},
    **{f"layers.attn.{x}_proj.bias": ("layer", "d_heads") for x in "qkv"},
    "layers.attn.o_proj.weight": ("layer", "d_model", "d_heads"),
    "layers.attn.o_proj.bias": ("layer", "d_model"),
    **{f"ln_final.{name}": ("d_model",) for name in ("weight", "bias")},
    "unembed.weight": ("d_vocab", "d_model"),
}

ARCHITECTURE = Architecture(
    name="attn_only",
    model_type=AttnOnlyConfig.model_type,
    config=build_config,
    model=AttnOnlyForCausalLM,
    parameter_dims=PARAMETER_DIMS,
    head_blocks={
        f"{kind}_{key}": (f"layers.attn.{key.lower()}_proj.{name}", 0, 1)
        for kind, name in (("W", "weight"), ("b", "bias"))
        for key in "QKV"
    }
    | {"W_O": ("layers.attn.o_proj.weight", 0, 1)},
    whole_views={
        "b_O": ("layers.attn.o_proj.bias",),
        "W_E": ("embed.weight",),
        "W_U": ("unembed.weight",),
        "W_pos": ("pos_embed.weight",),
    },
    output_projections=output_projections,
    lens_name=lambda config: LENS_NAMES[bool(config.layer_norm)],
    spec_keys=spec_keys,
    lens_adapters=lens_adapters,
)
