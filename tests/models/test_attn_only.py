import torch
from transformers import AutoModelForCausalLM

from observatory.models import (
    build_model,
)
from observatory.spec import ModelSpec
from tests.models.test_build import SIZE


def test_attention_only_model_is_a_proper_pretrained_model(tmp_path):
    spec = ModelSpec(architecture="attn_only", vocab_size=20, sizes=(SIZE,), layer_norm=False)
    model = build_model(spec, SIZE, init_seed=0).eval()
    assert not any("mlp" in name for name, _ in model.named_parameters())
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, 20, (2, 24))
    out = loaded(tokens, output_attentions=True)
    assert torch.equal(out.logits, model(tokens).logits)
    assert out.attentions[1].shape == (2, 4, 24, 24)  # [batch, head, query_pos, key_pos]
    assert torch.allclose(out.attentions[0].sum(-1), torch.ones(2, 4, 24))
    assert torch.all(out.attentions[0].triu(1) == 0)  # causal
