"""A hand-compiled two-layer induction circuit: a known-answer model for testing the analyses.

The residual stream is split into orthogonal one-hot subspaces:

==========  ==============================  =========================================
subspace    dims                            written by
==========  ==============================  =========================================
``TOK``     ``[0, d_vocab)``                token embedding ``W_E``: one-hot token
``POS``     ``[d_vocab, d_vocab + n_ctx)``  position embedding ``W_pos``: one-hot position
``PREV``    next ``d_vocab`` dims           layer 0 head 0: the previous token, one-hot
``OUT``     next ``d_vocab`` dims           layer 1 head 0: the predicted token; read by ``W_U``
==========  ==============================  =========================================

Layer 0 head 0 is a previous-token head (query: own position, key: position + 1); layer 1
head 0 is an induction head by K-composition (query: own token, key: ``PREV``), so it attends
to the token right after each earlier occurrence of the current token and copies it into
``OUT``. When the current token has no earlier occurrence it attends to BOS, whose value is
zero, giving uniform logits. Every other head has zero weights: uniform attention, no output.
"""

from __future__ import annotations

import math

import torch

from observatory.models import BOS_TOKEN, AttnOnlyConfig, AttnOnlyForCausalLM


def compiled_induction_model(
    *,
    vocab_size: int = 64,
    n_ctx: int = 64,
    n_heads: int = 4,
    d_head: int | None = None,
    attention_logit: float = 40.0,
    output_logit: float = 20.0,
) -> AttnOnlyForCausalLM:
    """A 2-layer attention-only model (no LayerNorm) whose weights implement induction exactly.

    Parameters
    ----------
    vocab_size
        ``d_vocab``; token 0 is BOS.
    n_ctx
        Number of positions.
    n_heads
        Heads per layer; heads other than head 0 of each layer are zero.
    d_head
        Head dimension; ``d_model = n_heads * d_head``. Default: the smallest that fits the
        four residual subspaces (``3 * d_vocab + n_ctx`` dims) and the head-space needs
        (``max(d_vocab + 1, n_ctx)``: token dims plus a BOS-sink dim, or position dims).
    attention_logit
        Attention score (after the ``1 / sqrt(d_head)`` scaling) of a matching key; the
        induction head's BOS sink gets half of it, other keys 0. Large means near one-hot.
    output_logit
        Logit the induction head adds to the copied token.

    Returns
    -------
    AttnOnlyForCausalLM
        The model in eval mode.

    Raises
    ------
    ValueError
        If ``d_head`` is too small for the subspaces.
    """
    min_head = max(vocab_size + 1, n_ctx)
    d_model_needed = 3 * vocab_size + n_ctx
    if d_head is None:
        d_head = max(min_head, math.ceil(d_model_needed / n_heads))
    if d_head < min_head or n_heads * d_head < d_model_needed:
        raise ValueError(
            f"d_head={d_head} too small: need d_head >= {min_head} and "
            f"n_heads * d_head >= {d_model_needed}"
        )
    config = AttnOnlyConfig(
        vocab_size=vocab_size,
        hidden_size=n_heads * d_head,
        num_hidden_layers=2,
        num_attention_heads=n_heads,
        max_position_embeddings=n_ctx,
        layer_norm=False,
        bos_token_id=BOS_TOKEN,
    )
    model = AttnOnlyForCausalLM(config)
    tok = torch.arange(vocab_size)  # residual dims of TOK
    pos = vocab_size + torch.arange(n_ctx)  # residual dims of POS
    prev = vocab_size + n_ctx + tok  # residual dims of PREV
    out = 2 * vocab_size + n_ctx + tok  # residual dims of OUT
    non_bos = tok[tok != BOS_TOKEN]
    # q.k is divided by sqrt(d_head) in attention: scale queries so scores equal the logits
    query_scale = attention_logit * math.sqrt(d_head)
    sink_dim = vocab_size  # head dim of the induction head's BOS sink (after the token dims)

    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.embed.weight[tok, tok] = 1.0  # W_E[d_vocab, d_model]
        model.pos_embed.weight[torch.arange(n_ctx), pos] = 1.0  # W_pos[n_ctx, d_model]
        model.unembed.weight[tok, out] = 1.0  # W_U.T[d_vocab, d_model]

        # Layer 0, head 0 (rows/cols 0 .. d_head-1 of the projections): previous-token head.
        attn = model.layers[0].attn
        positions = torch.arange(n_ctx - 1)
        attn.q_proj.weight[positions + 1, pos[1:]] = query_scale  # query at i: head dim i
        attn.k_proj.weight[positions + 1, pos[:-1]] = 1.0  # key at j: head dim j + 1
        attn.v_proj.weight[tok, tok] = 1.0  # value: the key's token
        attn.o_proj.weight[prev, tok] = 1.0  # written into PREV

        # Layer 1, head 0: induction head (K-composition with the previous-token head).
        attn = model.layers[1].attn
        attn.q_proj.weight[tok, tok] = query_scale  # query: own token
        attn.k_proj.weight[tok, prev] = 1.0  # key: the token before the key position
        # BOS sink at half the match score: taken only when no key matches
        attn.q_proj.bias[sink_dim] = query_scale / 2
        attn.k_proj.weight[sink_dim, BOS_TOKEN] = 1.0
        attn.v_proj.weight[non_bos, non_bos] = 1.0  # value: the key's token, zero for BOS
        attn.o_proj.weight[out, tok] = output_logit  # written into OUT, read by W_U
    return model.eval()
