"""The model families: Hugging Face GPT-NeoX (Pythia-style) and an attention-only toy transformer.

Both are real ``transformers`` models (``save_pretrained`` / ``from_pretrained`` work) with eager
attention, so attention patterns can be read with ``output_attentions=True``.

Shapes follow TransformerLens names in the comments: ``d_vocab``, ``d_model``, ``n_heads``,
``d_head``, ``n_ctx``. ``PARAMETER_DIMS`` names the dims of every parameter once the per-layer
parameters are stacked along a leading ``layer`` dim (see :func:`stacked_name`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutput

from observatory.spec import ModelSpec, SizeSpec

BOS_TOKEN = 0  # every probe and synthetic sequence starts with token 0


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


def build_config(spec: ModelSpec, size: SizeSpec) -> PretrainedConfig:
    """The Hugging Face config of one size of the family (eager attention, no dropout)."""
    if spec.architecture == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=spec.vocab_size,
            hidden_size=size.d_model,
            num_hidden_layers=size.n_layers,
            num_attention_heads=size.n_heads,
            intermediate_size=size.d_mlp or 4 * size.d_model,
            max_position_embeddings=size.n_positions,
            rotary_pct=spec.rotary_pct,  # transformers < 5
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": spec.rotary_pct,
            },
            attn_implementation="eager",
            bos_token_id=BOS_TOKEN,
            eos_token_id=BOS_TOKEN,
            tie_word_embeddings=False,
            use_cache=False,
        )
    return AttnOnlyConfig(
        vocab_size=spec.vocab_size,
        hidden_size=size.d_model,
        num_hidden_layers=size.n_layers,
        num_attention_heads=size.n_heads,
        max_position_embeddings=size.n_positions,
        layer_norm=spec.layer_norm,
        bos_token_id=BOS_TOKEN,
    )


def model_from_config(config: PretrainedConfig) -> PreTrainedModel:
    """Instantiate the model class that matches ``config`` (eager attention)."""
    if isinstance(config, AttnOnlyConfig):
        return AttnOnlyForCausalLM(config)
    config._attn_implementation = "eager"
    return GPTNeoXForCausalLM(config)


def build_model(spec: ModelSpec, size: SizeSpec, *, init_seed: int) -> PreTrainedModel:
    """A freshly initialised model: the same ``init_seed`` always gives bit-identical weights."""
    torch.manual_seed(init_seed)
    return model_from_config(build_config(spec, size))


# --------------------------------------------------------------------------------------------
# Parameter names and dims, for storing per-layer parameters stacked along a `layer` dim.

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")

# Dims of each stacked parameter, keyed by its name with the layer index removed.
# Linear weights are [out, in]; `d_qkv` is GPT-NeoX's fused [n_heads, 3 (q, k, v), d_head] axis
# and `d_heads` is the concatenation [n_heads, d_head] of all heads' outputs.
PARAMETER_DIMS: dict[str, tuple[str, ...]] = {
    # GPT-NeoX
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
    # attention-only
    "embed.weight": ("d_vocab", "d_model"),
    "pos_embed.weight": ("n_ctx", "d_model"),
    "layers.ln.weight": ("layer", "d_model"),
    "layers.ln.bias": ("layer", "d_model"),
    "layers.attn.q_proj.weight": ("layer", "d_heads", "d_model"),
    "layers.attn.q_proj.bias": ("layer", "d_heads"),
    "layers.attn.k_proj.weight": ("layer", "d_heads", "d_model"),
    "layers.attn.k_proj.bias": ("layer", "d_heads"),
    "layers.attn.v_proj.weight": ("layer", "d_heads", "d_model"),
    "layers.attn.v_proj.bias": ("layer", "d_heads"),
    "layers.attn.o_proj.weight": ("layer", "d_model", "d_heads"),
    "layers.attn.o_proj.bias": ("layer", "d_model"),
    "ln_final.weight": ("d_model",),
    "ln_final.bias": ("d_model",),
    "unembed.weight": ("d_vocab", "d_model"),
}

# Dims whose entries belong to one head each, in blocks of d_head (chunked per head on disk).
PER_HEAD_DIMS = ("d_qkv", "d_heads")


def stacked_name(name: str) -> tuple[str, int | None]:
    """Split ``a.layers.3.b`` into the stacked name ``a.layers.b`` and the layer index 3."""
    match = _LAYER_INDEX.search("." + name)
    if match is None:
        return name, None
    return ("." + name).replace(match.group(0), ".layers.", 1)[1:], int(match.group(1))


def layer_name(stacked: str, layer: int) -> str:
    """Inverse of :func:`stacked_name`: the per-layer parameter name of ``stacked``."""
    return ("." + stacked).replace(".layers.", f".layers.{layer}.", 1)[1:]


def parameter_dims(stacked: str) -> tuple[str, ...]:
    """Dim names of a stacked parameter, e.g. ``("layer", "d_qkv", "d_model")``."""
    try:
        return PARAMETER_DIMS[stacked]
    except KeyError:
        raise KeyError(f"no dims known for {stacked!r}; add it to PARAMETER_DIMS") from None


def stack_layers(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Copy per-layer tensors into float32 numpy arrays stacked along a leading ``layer`` dim.

    ``{"a.layers.0.w": t0, "a.layers.1.w": t1, "b": u}`` becomes
    ``{"a.layers.w": stack([t0, t1]), "b": u}``.  Always copies, so the result is a snapshot.
    """
    groups: dict[str, dict[int, np.ndarray]] = {}
    out: dict[str, np.ndarray] = {}
    for name, tensor in tensors.items():
        array = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
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
        if stacked_name(name)[1] is None and parameter_dims(name)[0] == "layer":
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
        ``"gpt_neox"`` or ``"attn_only"``.
    n_heads
        Heads per layer.

    Returns
    -------
    dict
        ``W_Q, W_K, W_V [layer, head, d_model, d_head]``, ``W_O [layer, head, d_head, d_model]``,
        ``b_Q, b_K, b_V [layer, head, d_head]``, ``b_O [layer, d_model]``,
        ``W_E [d_vocab, d_model]``, ``W_U [d_model, d_vocab]`` and, for ``attn_only``,
        ``W_pos [n_ctx, d_model]`` (each with the leading ``step`` dim if the input had one).
    """

    def lead(array: Any, own_ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        extra = array.ndim - own_ndim  # 0, or 1 for a leading step dim
        return tuple(array.shape[:extra]), tuple(range(extra))

    def split_heads(weight: Any, parts: int) -> Any:
        # [..., layer, n_heads*parts*d_head, d_model] -> [..., layer, head, part, d_head, d_model]
        prefix, _ = lead(weight, 3)
        n_layers, rows, d_model = weight.shape[-3:]
        d_head = rows // (n_heads * parts)
        return weight.reshape(*prefix, n_layers, n_heads, parts, d_head, d_model)

    def heads_in(weight: Any) -> Any:
        # weight[..., layer, d_model, n_heads * d_head] -> W_O[..., layer, head, d_head, d_model]
        prefix, axes = lead(weight, 3)
        n_layers, d_model, cols = weight.shape[-3:]
        w = weight.reshape(*prefix, n_layers, d_model, n_heads, cols // n_heads)
        k = len(axes)
        return w.transpose(*axes, k, k + 2, k + 3, k + 1)

    def to_d_model_d_head(w: Any) -> Any:
        # [..., layer, head, d_head, d_model] -> [..., layer, head, d_model, d_head]
        axes = tuple(range(w.ndim - 2))
        return w.transpose(*axes, w.ndim - 1, w.ndim - 2)

    out: dict[str, Any] = {}
    if architecture == "gpt_neox":
        qkv = split_heads(stacked["gpt_neox.layers.attention.query_key_value.weight"], 3)
        bias = stacked["gpt_neox.layers.attention.query_key_value.bias"]
        prefix, _ = lead(bias, 2)
        bias = bias.reshape(*prefix, bias.shape[-2], n_heads, 3, bias.shape[-1] // (3 * n_heads))
        for index, key in enumerate("QKV"):
            out[f"W_{key}"] = to_d_model_d_head(qkv[..., index, :, :])
            out[f"b_{key}"] = bias[..., index, :]
        out["W_O"] = heads_in(stacked["gpt_neox.layers.attention.dense.weight"])
        out["b_O"] = stacked["gpt_neox.layers.attention.dense.bias"]
        out["W_E"] = stacked["gpt_neox.embed_in.weight"]
        unembed = stacked["lm_head.weight" if "lm_head.weight" in stacked else "embed_out.weight"]
    elif architecture == "attn_only":
        for key in "QKV":
            proj = f"layers.attn.{key.lower()}_proj"
            w = split_heads(stacked[f"{proj}.weight"], 1)[..., 0, :, :]
            out[f"W_{key}"] = to_d_model_d_head(w)
            b = stacked[f"{proj}.bias"]
            prefix, _ = lead(b, 2)
            out[f"b_{key}"] = b.reshape(*prefix, b.shape[-2], n_heads, b.shape[-1] // n_heads)
        out["W_O"] = heads_in(stacked["layers.attn.o_proj.weight"])
        out["b_O"] = stacked["layers.attn.o_proj.bias"]
        out["W_E"] = stacked["embed.weight"]
        out["W_pos"] = stacked["pos_embed.weight"]
        unembed = stacked["unembed.weight"]
    else:
        raise ValueError(f"unknown architecture {architecture!r}")
    prefix, axes = lead(unembed, 2)
    k = len(axes)
    out["W_U"] = unembed.transpose(*axes, k + 1, k)
    return out


def model_weights(model: PreTrainedModel) -> dict[str, np.ndarray]:
    """TransformerLens-shaped per-head weights (numpy) of an in-memory model."""
    config = model.config
    architecture = "attn_only" if isinstance(config, AttnOnlyConfig) else "gpt_neox"
    stacked = stack_layers(dict(model.named_parameters()))
    return transformer_lens_weights(
        stacked, architecture=architecture, n_heads=config.num_attention_heads
    )
