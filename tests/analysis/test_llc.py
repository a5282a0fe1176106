"""The local learning coefficient estimate (devinterp SGLD)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from observatory.analysis.llc import SGLD, local_learning_coefficient
from observatory.data.synthetic import induction_corpus
from observatory.errors import SpecError
from observatory.models import build_model
from observatory.spec import DataSpec, ModelSpec, SizeSpec

SIZE = SizeSpec("s", 1, 16, 2, 16)
OPTIONS = {
    "lr": 1e-3,
    "n_beta": 10.0,
    "localization": 100.0,
    "chains": 2,
    "draws": 8,
    "burnin": 2,
    "batch_size": 4,
}


def tokens() -> np.ndarray:
    data = DataSpec("induction", seed=1, n_sequences=16, period_min=2, period_max=6)
    return induction_corpus(data, context=16, vocab_size=12)


def test_llc_is_finite_and_reproducible_for_a_fixed_seed():
    model = build_model(ModelSpec("gpt_neox", 12, (SIZE,)), SIZE, init_seed=0)
    before = {name: p.clone() for name, p in model.named_parameters()}
    torch.manual_seed(5)
    random.seed(5)
    state = torch.get_rng_state()
    first = local_learning_coefficient(model, tokens(), SGLD(seed=3, **OPTIONS))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    assert random.random() == random.Random(5).random()
    assert all(np.isfinite(value).all() for value in first.values())
    assert first["llc_loss_trace"].shape == (OPTIONS["burnin"] + OPTIONS["draws"],)
    again = local_learning_coefficient(model, tokens(), SGLD(seed=3, **OPTIONS))
    for name, value in first.items():
        np.testing.assert_array_equal(value, again[name])
    other = local_learning_coefficient(model, tokens(), SGLD(seed=4, **OPTIONS))
    assert other["llc"] != first["llc"]
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name])  # the sampler works on a copy


def test_llc_analysis_on_stored_checkpoints_is_reproducible_and_checked(trained_tiny):
    import observatory as obs

    _, store = trained_tiny
    options = OPTIONS | {"seed": 0}
    first = obs.compute("llc", store, size="l2-d16", seeds=[0], steps=[0, 24], options=options)
    assert first["llc_loss_trace"].dims == ("seed", "step", "sgld_step")
    assert first["llc_loss_trace"].sizes["sgld_step"] == OPTIONS["burnin"] + OPTIONS["draws"]
    assert np.isfinite(first["llc"].values).all() and np.isfinite(first["llc_std"].values).all()
    again = obs.compute("llc", store, size="l2-d16", seeds=[0], steps=[0, 24], options=options)
    np.testing.assert_array_equal(first["llc"].values, again["llc"].values)
    trained_loss = first["llc_init_loss"].sel(step=24)
    assert (trained_loss < first["llc_init_loss"].sel(step=0)).all()  # training lowered it
    with pytest.raises(SpecError, match=r"llc\.chains: must be >= 1"):
        obs.compute("llc", store, size="l2-d16", options={"chains": 0})
