"""Per-example attribution: the terms, what they leave out, and the windows they name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import observatory as obs
from observatory.attribution.examples import per_example_gradients
from observatory.store import FamilyStore


def test_example_terms_and_carried_add_up_to_the_step_term(tiny_store):
    att = obs.attribute(
        tiny_store,
        size="l2-d16",
        seed=0,
        start=4,
        stop=9,
        target="held_out_loss",
        per_example=True,
    )
    total = att["example_contribution"].sum("batch") + att["carried"]
    np.testing.assert_allclose(total, att["step_contribution"], rtol=0, atol=1e-15)
    reader = FamilyStore(tiny_store).run("l2-d16", 0)
    assert np.array_equal(att["example_index"], reader.batch_indices_between(4, 9))
    # with betas[0] = 0.9 most of a step is this batch's own share, not the carried momentum
    assert att.sizes == {"train_step": 5, "batch": 4}
    top = obs.top_examples(att, k=3, sign="negative")
    assert list(top.columns) == ["train_step", "batch", "window", "contribution", "tokens"]
    assert (np.diff(top["contribution"]) >= 0).all() and len(top["tokens"][0]) == 16


def test_per_example_gradients_average_to_the_batch_gradient(trained_tiny):
    _, store = trained_tiny
    model = obs.model_at(store, size="l2-d16", seed=0, step=8)
    tokens = obs.batch_at(store, size="l2-d16", seed=0, step=8)
    grads = per_example_gradients(model, tokens)
    model(input_ids=tokens, labels=tokens).loss.backward()
    batch = torch.cat([p.grad.reshape(-1).double() for p in model.parameters()])
    torch.testing.assert_close(grads.mean(0), batch, rtol=1e-4, atol=1e-6)


def test_top_examples_decodes_text_windows(trained_text, tmp_path):
    import shutil

    _, store, _ = trained_text
    copy = tmp_path / "text.zarr"
    shutil.copytree(store, copy)
    att = obs.attribute(
        copy, size="l2-d16", seed=0, start=2, stop=4, target="held_out_loss", per_example=True
    )
    top = obs.top_examples(att, k=2)
    assert len(top) == 2 and all(isinstance(text, str) and text for text in top["text"])
    with pytest.raises(obs.errors.ObservatoryError, match="sign"):
        obs.top_examples(att, sign="up")
