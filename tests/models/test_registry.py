"""The architecture registry: every architecture is one module of observatory/models/."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import observatory.models
from observatory.interop.hf import export, ingest
from observatory.models import registry
from observatory.models.naming import PER_HEAD_DIMS, VIEW_DIMS
from observatory.query import head_weights, model_at, open_run
from observatory.spec import load_run_spec
from observatory.train import train_family
from tests.conftest import TINY_TOML, write_spec


def test_every_architecture_module_declares_itself_consistently():
    assert registry.names() == ("attn_only", "gpt_neox")
    for declared in registry.architectures():
        assert registry.model_types()[declared.model_type] == declared.name
        for view, (param, part, parts) in declared.head_blocks.items():
            dims = declared.parameter_dims[param]
            assert 0 <= part < parts and sum(d in PER_HEAD_DIMS for d in dims) == 1, view
        for view, params in declared.whole_views.items():
            assert view in VIEW_DIMS and all(p in declared.parameter_dims for p in params)
    with pytest.raises(ValueError, match="architectures: attn_only, gpt_neox"):
        registry.architecture("mamba")


@pytest.fixture
def toy_architecture(tmp_path: Path):
    """A third architecture added as a real one is: one new module in the models package.

    The module is a copy of the attention-only one under other names, written into a folder
    that joins the package's search path for the test (as if it were observatory/models/).
    """
    source = Path(observatory.models.__file__).with_name("attn_only.py").read_text()
    folder = tmp_path / "models"
    folder.mkdir()
    toy = source.replace("AttnOnly", "ToyAttn").replace("attn_only", "toy_attn")
    (folder / "toy_attn.py").write_text(toy)
    paths = observatory.models.__path__
    paths.append(str(folder))
    try:
        yield "toy_attn"
    finally:
        paths.remove(str(folder))
        sys.modules.pop("observatory.models.toy_attn", None)
        vars(observatory.models).pop("toy_attn", None)


def test_a_third_architecture_from_one_new_module_trains_queries_and_exports(
    toy_architecture, tmp_path
):
    assert toy_architecture in registry.names()
    text = TINY_TOML.replace('architecture = "gpt_neox"', f'architecture = "{toy_architecture}"')
    spec = load_run_spec(write_spec(tmp_path, text))
    store = train_family(spec, store=tmp_path / "toy.zarr", seeds=[0], progress=False)

    ds = open_run(store, size="l2-d16", seed=0)
    assert ds.attrs["architecture"] == "toy_attn"
    assert ds["W_Q"].dims == ("step", "layer", "head", "d_model", "d_head")
    last = int(ds["step"][-1])
    w_q = head_weights(store, size="l2-d16", seed=0, layer=1, head=1)
    assert np.array_equal(w_q.values, ds["W_Q"].sel(layer=1, head=1).values)
    model = model_at(store, size="l2-d16", seed=0, step=last)
    assert type(model).__name__ == "ToyAttnForCausalLM"
    q_proj = model.layers[1].attn.q_proj.weight.detach().numpy()
    assert np.array_equal(w_q.sel(step=last).values, q_proj[8:16].T)  # head 1: rows 8..15

    (folder,) = export(store, tmp_path / "export", seeds=[0])
    loaded = AutoModelForCausalLM.from_pretrained(folder / f"step{last}").eval()
    tokens = torch.randint(0, 16, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    back = ingest([folder], tmp_path / "back.zarr", progress=False)
    again = head_weights(back, size="l2-d16", seed=0, layer=1, head=1)
    assert np.array_equal(again.sel(step=last).values, w_q.sel(step=last).values)
