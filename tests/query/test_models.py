"""The query layer's models and batches at a step."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import zarr
import zarr.storage

import observatory as obs
from observatory.data import stored_corpus
from observatory.errors import StoreError
from observatory.models.naming import unstack_layers
from observatory.spec import load_run_spec
from observatory.store import ATTRS_KEY, FamilyStore
from tests.query.conftest import SIZE


def test_model_at_reproduces_the_trainers_logits(captured):
    store, models, batches = captured
    tokens = torch.cat([batches[(0, 3)], batches[(0, 17)]])
    for steps in (10, 24):  # an intermediate checkpoint (stop_after) and the final one
        trained = models[(0, steps)].eval()
        loaded = obs.model_at(store, size=SIZE, seed=0, step=steps)
        assert type(loaded) is type(trained) and not loaded.training
        with torch.no_grad():
            assert torch.equal(loaded(tokens).logits, trained(tokens).logits)


def test_batch_at_returns_the_batches_the_trainer_consumed(captured):
    store, _, batches = captured
    assert len(batches) == 24 + 5
    for (seed, step), tokens in batches.items():
        assert torch.equal(obs.batch_at(store, size=SIZE, seed=seed, step=step), tokens)


def test_batch_at_refuses_a_changed_corpus(captured, tmp_path):
    store, _, _ = captured
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    root = zarr.open_group(copy, mode="r+")
    attrs = dict(root.attrs[ATTRS_KEY])
    root.attrs[ATTRS_KEY] = attrs | {"data": attrs["data"] | {"fingerprint": "0123abcd"}}
    with pytest.raises(StoreError, match="fingerprint .* but the store was trained on 0123abcd"):
        obs.batch_at(copy, size=SIZE, seed=0, step=0)


def test_models_at_yields_the_same_weights_as_model_at(trained_tiny):
    from observatory.query import models_at

    _, store = trained_tiny
    tokens = torch.arange(16)[None] % 16
    steps = [4, 5, 8]
    for step, model in models_at(store, size="l2-d16", seed=1, steps=steps):
        expected = obs.model_at(store, size="l2-d16", seed=1, step=step)
        assert torch.equal(model(tokens).logits, expected(tokens).logits), step


def _reference_windows(store, corpus) -> list[str]:
    """Each window's text: the corpus documents encoded by the stored tokenizer and joined by
    EOS, cut into windows of BOS and 15 tokens, each window decoded on its own."""
    from observatory.data.tokenizer import TextTokenizer
    from tests.conftest import TEXT_CORPUS

    tokenizer = TextTokenizer("bpe", FamilyStore(store).attrs["data"]["tokenizer"])
    stream = np.concatenate(
        [np.append(tokenizer.encode([TEXT_CORPUS[name]])[0], 0) for name in sorted(TEXT_CORPUS)]
    )
    n = len(stream) // 15
    return [tokenizer.decode([0, *stream[i * 15 : (i + 1) * 15]]) for i in range(n)]


def test_batch_at_decode_gives_the_source_text_of_each_window(trained_text):
    from tests.conftest import TEXT_CORPUS

    _, store, corpus = trained_text
    reference = _reference_windows(store, corpus)
    eot = "<|endoftext|>"
    # the windows in corpus order spell the corpus: documents separated by EOS
    spelled = "".join(text.removeprefix(eot) for text in reference)
    source = eot.join(TEXT_CORPUS[name] for name in sorted(TEXT_CORPUS)) + eot
    assert source.startswith(spelled) and len(source) - len(spelled) < 200
    indices = obs.open_run(store, size=SIZE, seed=1)["batch_indices"].values
    for step in (0, 7):
        texts = obs.batch_at(store, size=SIZE, seed=1, step=step, decode=True)
        assert texts == [reference[i] for i in indices[step]]
        tokens = obs.batch_at(store, size=SIZE, seed=1, step=step)
        assert tokens.shape == (4, 16) and tokens.dtype == torch.int64


def test_batch_at_decode_of_byte_level_text_replaces_cut_characters(tmp_path):
    from observatory.train import train_family
    from tests.conftest import text_family_toml, write_spec

    (tmp_path / "a.txt").write_text("é" * 100 + "ab" * 50, encoding="utf-8")
    toml = text_family_toml(tmp_path / "a.txt", tokenizer="bytes", vocab_size=256)
    spec = load_run_spec(
        write_spec(
            tmp_path,
            toml.replace("init = [0, 1]", "init = [0]").replace("data = [5, 6]", "data = [5]"),
        )
    )
    store = train_family(spec, store=tmp_path / "bytes.zarr", progress=False)
    indices = obs.open_run(store, size=SIZE, seed=0)["batch_indices"].values[2]
    stream = ("é" * 100 + "ab" * 50).encode() + b"\0"
    expected = [(b"\0" + stream[i * 15 : (i + 1) * 15]).decode(errors="replace") for i in indices]
    assert obs.batch_at(store, size=SIZE, seed=0, step=2, decode=True) == expected


def test_batch_at_decode_refuses_token_ids_in_one_line(trained_tiny):
    _, store = trained_tiny
    with pytest.raises(StoreError, match=r"corpus \(induction\) has no tokenizer to decode$"):
        obs.batch_at(store, size=SIZE, seed=0, step=0, decode=True)


@pytest.fixture(scope="module")
def redrawn(tmp_path_factory):
    """The tiny family's seed 0 and its branch ``redrawn`` (a new data seed from step 7)."""
    from observatory.train import Intervention, train_branch, train_family
    from tests.conftest import write_spec

    directory = tmp_path_factory.mktemp("redrawn")
    spec = load_run_spec(write_spec(directory))
    store = train_family(spec, store=directory / "tiny.zarr", seeds=[0], progress=False)
    options = {"size": "l2-d16", "seed": 0, "at": 7, "store": store, "progress": False}
    train_branch(spec, name="redrawn", intervention=Intervention(data_seed=9), **options)
    return store


def test_a_branchs_batches_are_its_parents_before_the_fork_and_its_own_after(redrawn):
    run = {"size": "l2-d16", "seed": 0}
    for step in (0, 6):
        parent = obs.batch_at(redrawn, **run, step=step)
        assert torch.equal(obs.batch_at(redrawn, **run, step=step, branch="redrawn"), parent)
    after = obs.batch_at(redrawn, **run, step=7, branch="redrawn")
    assert not torch.equal(after, obs.batch_at(redrawn, **run, step=7))
    family = FamilyStore(redrawn)
    indices = family.run("l2-d16", 0, "redrawn").batch_indices(7)
    assert torch.equal(after, stored_corpus(family).batch(indices))


def test_a_branchs_model_is_its_stored_weights_or_its_own_replay(redrawn):
    run = {"size": "l2-d16", "seed": 0}
    reader = FamilyStore(redrawn).run("l2-d16", 0, "redrawn")
    tokens = torch.arange(16)[None] % 16
    last = reader.steps()[-1]
    branch = obs.model_at(redrawn, **run, step=last, branch="redrawn")
    stored = dict(branch.state_dict())
    for name, values in unstack_layers(reader.parameters_at(last)).items():
        assert np.array_equal(stored[name].numpy(), np.asarray(values)), name
    parent = obs.model_at(redrawn, **run, step=last)
    assert not torch.equal(branch(tokens).logits, parent(tokens).logits)
    between = next(s for s in range(8, last) if s not in reader.steps())
    with pytest.warns(UserWarning, match="replayed"):
        replayed = obs.model_at(redrawn, **run, step=between, branch="redrawn")
    with pytest.warns(UserWarning, match="replayed"):
        parents = obs.model_at(redrawn, **run, step=between)
    assert not torch.equal(replayed(tokens).logits, parents(tokens).logits)


def test_an_unknown_branch_is_one_line(redrawn):
    with pytest.raises(StoreError, match="no-such"):
        obs.model_at(redrawn, size="l2-d16", seed=0, step=0, branch="no-such")
    with pytest.raises(StoreError, match="no-such"):
        obs.batch_at(redrawn, size="l2-d16", seed=0, step=0, branch="no-such")
