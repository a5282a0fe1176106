"""Ground truth by construction: on a corpus of half repeated blocks, half walks on one bigram
table, the repeated windows drive the induction score and the bigram windows the bigram loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import observatory as obs
from observatory.spec import load_run_spec
from observatory.train import train_family
from tests.conftest import TINY_TOML, write_spec

PERIODS = range(2, 7)  # the tiny corpus's period_min .. period_max


def repeats_a_block(windows: np.ndarray) -> np.ndarray:
    """Whether each window (after its BOS) repeats a block of one of the corpus's periods."""
    body = windows[:, 1:]
    return np.array(
        [any(np.array_equal(row[p:], row[:-p]) for p in PERIODS) for row in body], dtype=bool
    )


@obs.target
def bigram_loss(model, data):
    """The mean loss on the bigram windows of the held-out sequences."""
    windows = data.held_out_tokens[~repeats_a_block(data.held_out_tokens)]
    ids = torch.as_tensor(windows)
    return model(input_ids=ids, labels=ids).loss


def positive_share(att, repeated: np.ndarray, sign: float) -> float:
    """The share of the (sign-oriented) positive per-example attribution on ``repeated``."""
    values = sign * att["example_contribution"].values
    positive = np.clip(values, 0, None)
    return float(positive[repeated].sum() / positive.sum())


@pytest.mark.slow
def test_repeated_windows_drive_induction_and_bigram_windows_the_bigram_loss(tmp_path):
    text = TINY_TOML.replace("period_max = 6", "period_max = 6\nbigram_fraction = 0.5")
    spec = load_run_spec(write_spec(tmp_path, text.replace("steps = 24", "steps = 40")))
    store = train_family(spec, store=tmp_path / "mixed.zarr", progress=False)
    common = {"size": "l2-d16", "seed": 0, "start": 10, "stop": 40, "per_example": True}
    induction = obs.attribute(
        store, target="induction_score", options={"layer": 1, "head": 0}, **common
    )
    corpus = obs.data.stored_corpus(obs.store.FamilyStore(store))
    windows = corpus.windows(induction["example_index"].values.reshape(-1))
    repeated = repeats_a_block(windows).reshape(induction["example_index"].shape)
    assert 0.3 < repeated.mean() < 0.7
    to_induction = positive_share(induction, repeated, 1.0)
    bigram = obs.attribute(store, target=bigram_loss, **common)
    to_bigram = positive_share(bigram, ~repeated, -1.0)  # lowering the loss
    print(
        f"repeated windows' share of the positive attribution to the induction score: "
        f"{to_induction:.3f}; bigram windows' share of the attribution lowering the bigram "
        f"loss: {to_bigram:.3f}"
    )
    assert to_induction > 0.5
    # every bigram window walks the corpus's one bigram table: the bigram windows teach it
    assert to_bigram > 0.5
