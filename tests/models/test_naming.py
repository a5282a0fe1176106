import numpy as np
import torch

from observatory.models import (
    build_model,
    model_weights,
    stack_layers,
    stacked_name,
    unstack_layers,
)
from observatory.spec import ModelSpec
from tests.models.test_build import SIZE


def test_stacking_round_trips_and_names_layers():
    assert stacked_name("gpt_neox.layers.11.mlp.dense_h_to_4h.bias") == (
        "gpt_neox.layers.mlp.dense_h_to_4h.bias",
        11,
    )
    model = build_model(ModelSpec("gpt_neox", 20, (SIZE,)), SIZE, init_seed=0)
    stacked = stack_layers(dict(model.named_parameters()))
    assert stacked["gpt_neox.layers.attention.query_key_value.weight"].shape == (2, 96, 32)
    restored = unstack_layers(stacked)
    for name, param in model.named_parameters():
        assert torch.equal(restored[name], param.detach())


def test_stacking_keeps_a_wider_dtype_when_asked():
    values = torch.tensor([1.0 + 2.0**-40, 2.0], dtype=torch.float64)
    tensors = {"a.layers.0.w": values, "a.layers.1.w": -values, "b": values}
    stacked = stack_layers(tensors, dtype=torch.float64)
    assert stacked["a.layers.w"].dtype == np.float64 and stacked["b"].dtype == np.float64
    assert np.array_equal(stacked["a.layers.w"], np.stack([values.numpy(), -values.numpy()]))
    assert stack_layers(tensors)["b"][0] == 1.0  # float32 by default: the 2**-40 is rounded off


def test_transformer_lens_views_match_hand_slices_of_hf_weights():
    model = build_model(ModelSpec("gpt_neox", 20, (SIZE,)), SIZE, init_seed=0)
    weights = model_weights(model)
    d_head = 8
    qkv = model.gpt_neox.layers[1].attention.query_key_value.weight.detach().numpy()
    dense = model.gpt_neox.layers[1].attention.dense.weight.detach().numpy()
    head = 3
    rows = slice(head * 3 * d_head, (head + 1) * 3 * d_head)  # fused [head, (q, k, v), d_head]
    q, k, v = np.split(qkv[rows], 3)
    assert np.array_equal(weights["W_Q"][1, head], q.T)  # [d_model, d_head]
    assert np.array_equal(weights["W_K"][1, head], k.T)
    assert np.array_equal(weights["W_V"][1, head], v.T)
    assert np.array_equal(weights["W_O"][1, head], dense[:, head * d_head : (head + 1) * d_head].T)
    assert weights["W_U"].shape == (32, 20) and weights["W_E"].shape == (20, 32)

    attn = build_model(ModelSpec("attn_only", 20, (SIZE,)), SIZE, init_seed=0)
    w = model_weights(attn)
    q_proj = attn.layers[0].attn.q_proj.weight.detach().numpy()
    assert np.array_equal(w["W_Q"][0, 2], q_proj[2 * d_head : 3 * d_head].T)
    assert w["W_pos"].shape == (24, 32)
