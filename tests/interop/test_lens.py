"""TransformerLens models of stored checkpoints (needs the ``tl`` extra, part of ``dev``)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from transformer_lens.head_detector import detect_head

import observatory as obs
from observatory.cli import main
from observatory.errors import ObservatoryError
from observatory.interop import lens

SIZE = "l2-d16"
JOB = """\
store = "{store}"
analyses = ["head_scores"]
steps = {steps}
seeds = [0]

[probe]
seed = 7
n_sequences = 4
"""


@pytest.fixture(scope="module")
def scheduler():
    """One single-worker dask cluster for this module's analysis jobs (started once)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


@pytest.fixture(params=["gpt_neox", "attn_only"])
def trained(request, trained_tiny, trained_tiny_attn_only):
    return {"gpt_neox": trained_tiny, "attn_only": trained_tiny_attn_only}[request.param]


def test_logits_equal_model_at_at_several_steps(trained):
    spec, store = trained
    steps = obs.open_run(store, size=SIZE, seed=1)["step"].values
    tokens = torch.randint(1, spec.model.vocab_size, (3, spec.train.context))
    tokens[:, 0] = 0
    for step in (0, int(steps[len(steps) // 2]), int(steps[-1])):
        hf = obs.model_at(store, size=SIZE, seed=1, step=step)
        tl = obs.transformer_lens_at(store, size=SIZE, seed=1, step=step)
        with torch.no_grad():
            expected = hf(tokens).logits
            logits, cache = tl.run_with_cache(tokens)
        assert float((logits - expected).abs().max()) <= 1e-4
        assert cache["blocks.1.attn.hook_pattern"].shape == (3, 2, len(tokens[0]), len(tokens[0]))


def test_weights_have_transformer_lens_shapes_and_stored_values(trained):
    _, store = trained
    step = int(obs.open_run(store, size=SIZE, seed=0)["step"].values[-1])
    tl = obs.transformer_lens_at(store, size=SIZE, seed=0, step=step)
    stored = obs.open_run(store, size=SIZE, seed=0).sel(step=step)
    for name in ("W_Q", "W_K", "W_V", "W_O"):
        np.testing.assert_array_equal(getattr(tl, name).detach().numpy(), stored[name].values)


def test_detect_head_matches_stored_transformer_lens_induction_score(trained, scheduler, tmp_path):
    _, original = trained
    store = tmp_path / "copy.zarr"
    shutil.copytree(original, store)
    steps = [int(s) for s in obs.open_run(store, size=SIZE, seed=0)["step"].values[::4]]
    job = tmp_path / "job.toml"
    job.write_text(JOB.format(store=store, steps=steps))
    assert main(["analyze", str(job), "--scheduler", scheduler, "--no-progress"]) == 0
    ds = obs.open_run(store, size=SIZE, seed=0)
    probe = ds["probe_tokens"].values
    assert (probe[:, 0] == 0).all()
    texts = [" ".join(f"<{t}>" for t in row[1:]) for row in probe]  # BOS prepended by TL
    for step in steps:
        tl = obs.transformer_lens_at(store, size=SIZE, seed=0, step=step)
        np.testing.assert_array_equal(tl.to_tokens(texts).numpy(), probe)
        scores = detect_head(tl, texts, "induction_head").numpy()
        stored = ds["tl_induction_score"].sel(step=step).values
        np.testing.assert_allclose(scores, stored, atol=1e-4, rtol=0)


def test_no_layer_norm_attention_only_model():
    from observatory.models import build_model
    from observatory.spec import ModelSpec, SizeSpec

    size = SizeSpec("s", 1, 16, 2, 16)
    spec = ModelSpec("attn_only", 12, (size,), layer_norm=False)
    model = build_model(spec, size, init_seed=3).eval()
    tokens = torch.randint(0, 12, (2, 10))
    with torch.no_grad():
        expected = model(tokens).logits
        got = lens.bridge(build_model(spec, size, init_seed=3))(tokens)
    assert float((got - expected).abs().max()) <= 1e-6


def test_missing_transformer_lens_is_a_one_line_error(trained_tiny, monkeypatch, capsys):
    _, store = trained_tiny
    monkeypatch.setitem(__import__("sys").modules, "transformer_lens", None)
    with pytest.raises(ObservatoryError, match=r'pip install -e "\.\[tl\]"'):
        obs.transformer_lens_at(store, size=SIZE, seed=0, step=0)


def test_a_text_family_has_its_tokenizer(trained_text):
    _, store, _ = trained_text
    tl = obs.transformer_lens_at(store, size=SIZE, seed=0, step=8)
    ids = obs.tokenizer(store)("def main(")["input_ids"]
    assert len(ids) > 1 and 0 not in ids
    assert tl.to_tokens("def main(").tolist() == [[0, *ids]]
    assert tl.to_str_tokens("def main(")[1:] == [obs.tokenizer(store).decode([i]) for i in ids]
    tokens = tl.to_tokens("class Point:\n    x")
    with torch.no_grad():
        expected = obs.model_at(store, size=SIZE, seed=0, step=8)(tokens).logits
        assert float((tl(tokens) - expected).abs().max()) <= 1e-4
