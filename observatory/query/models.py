"""Models and batches of a run at a step: Hugging Face models with stored weights.

A committed checkpoint is read from the store; a step between checkpoints is replayed with the
training loop, which is imported only then.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedModel

from observatory import arguments
from observatory.data import stored_corpus
from observatory.models.naming import unstack_layers
from observatory.models.registry import architecture
from observatory.query.tokenizer import window_decoder
from observatory.store import FamilyStore, RunReader


def model_at(
    path: str | Path, *, size: str, seed: int, step: int, branch: str = ""
) -> PreTrainedModel:
    """The Hugging Face model of one run with its weights at checkpoint ``step``.

    Parameters
    ----------
    path, size, seed
        The run: its family store, size name and seed index.
    step
        The weights after ``step`` updates.  A committed checkpoint is read; any other
        recorded step is replayed from the nearest keyframe before it (with a warning that
        says so; see :func:`observatory.train.replay.replay`).
    branch
        A branch of the run instead (``"name"``, or ``"a/b"`` for a branch of a branch; see
        :func:`~observatory.query.open_run`): its weights, the parent's before the fork.  The
        model is the plain architecture: a branch's ablation hooks are not attached.

    Returns
    -------
    transformers.PreTrainedModel
        A model of the family's architecture (eager attention, eval mode) whose logits equal
        those of the trainer's model at that step.  The global torch RNG is left untouched.

    Raises
    ------
    StoreError
        If the store, size, seed or step does not exist (the message lists what does).
    """
    reader = FamilyStore(path).run(size, seed, branch)
    step = arguments.index(step, "step")
    if step not in reader.steps() and reader.origin is None and step <= reader.n_steps:
        from observatory.train.replay import model_at_step

        return model_at_step(path, size=size, seed=seed, step=step, branch=branch)
    model = _empty_model(reader)
    model.load_state_dict(unstack_layers(reader.parameters_at(step)), strict=True)
    return model.eval()


def models_at(
    path: str | Path, *, size: str, seed: int, steps: Sequence[int], branch: str = ""
) -> Iterator[tuple[int, PreTrainedModel]]:
    """The model of one run at each of several checkpoints, for scoring them in turn.

    Reads each parameter array once for all ``steps`` and loads the weights into one model,
    which is yielded again for every step: use it before asking for the next.

    Parameters
    ----------
    path, size, seed
        The run: its family store, size name and seed index.
    steps
        Committed checkpoint steps, best close together (they share chunks).
    branch
        A branch of the run instead (see :func:`~observatory.query.open_run`).

    Yields
    ------
    tuple of (int, transformers.PreTrainedModel)
        The step and the model (eval mode) with that step's weights.
    """
    reader = FamilyStore(path).run(size, seed, branch)
    steps = arguments.indices(steps, "steps")
    stacked = reader.parameters_for(steps)
    model = _empty_model(reader).eval()
    for row, step in enumerate(steps):
        weights = unstack_layers({name: values[row] for name, values in stacked.items()})
        model.load_state_dict(weights, strict=True)
        yield step, model


def _empty_model(reader: RunReader) -> PreTrainedModel:
    """A model of the run's stored config (its architecture's module registers the config)."""
    declared = architecture(reader.family.spec.model.architecture)
    config = AutoConfig.for_model(**reader.family.size_attrs(reader.run.size)["hf_config"])
    with torch.random.fork_rng(devices=[]):  # the throwaway initialisation draws numbers
        return declared.model(config)


def batch_at(
    path: str | Path, *, size: str, seed: int, step: int, decode: bool = False, branch: str = ""
) -> torch.Tensor | list[str]:
    """The token batch that a run consumed at training step ``step``, as ids or as text.

    The corpus is rebuilt from the stored spec (and cached) and must have the fingerprint
    recorded in the store; the batch's corpus indices are the ones the trainer recorded.

    Parameters
    ----------
    path, size, seed
        The run: its family store, size name and seed index.
    step
        Training step (0-based): the batch of the update from checkpoint ``step`` to
        ``step + 1``.
    decode
        Return the text of each window instead of its ids: exactly the window's tokens decoded
        with the family's tokenizer (BOS/EOS kept, as ``<|endoftext|>`` for a trained BPE), or
        for byte-level text its bytes decoded as UTF-8 with ``errors="replace"`` (a window may
        cut a character).
    branch
        A branch of the run instead: the batches it trained on (its parent's before the fork,
        its own data order after it: dropped windows skipped, a new data seed drawn).

    Returns
    -------
    torch.Tensor or list of str
        ``tokens[batch, context]`` (int64), or with ``decode`` one string per window.

    Raises
    ------
    StoreError
        If the store, size, seed or step does not exist, the rebuilt corpus differs from
        the one the store was trained on, or ``decode`` is asked of a family without a
        tokenizer (synthetic tokens, token files given without one).
    """
    family = FamilyStore(path)
    if decode:
        text_of = window_decoder(family)  # refuses a family without text before any work
    indices = family.run(size, seed, branch).batch_indices(step)
    tokens = stored_corpus(family).batch(indices)
    return [text_of(window) for window in tokens.tolist()] if decode else tokens
