import torch

from observatory.models import (
    build_model,
)
from observatory.spec import ModelSpec, SizeSpec

SIZE = SizeSpec(name="s", n_layers=2, d_model=32, n_heads=4, n_positions=24)


def test_same_init_seed_gives_bit_identical_weights_and_other_seeds_differ():
    for arch in ("gpt_neox", "attn_only"):
        spec = ModelSpec(architecture=arch, vocab_size=20, sizes=(SIZE,))
        a, b = build_model(spec, SIZE, init_seed=3), build_model(spec, SIZE, init_seed=3)
        c = build_model(spec, SIZE, init_seed=4)
        for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
            assert torch.equal(pa, pb), name
        pairs = zip(a.parameters(), c.parameters(), strict=True)
        assert not all(torch.equal(pa, pc) for pa, pc in pairs)
