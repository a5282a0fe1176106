"""Exact replay of a run between its checkpoints, from the store alone.

A store records everything a training step depends on: the whole training state (weights,
AdamW moments, RNG state) at its keyframes, the corpus indices of every batch, the spec (and
so the learning-rate schedule) and the recipe (library versions, threads, CPU).  Replay loads
the nearest keyframe at or before the first step asked for and re-executes the recorded
batches with the trainer's own :func:`~observatory.train.step.train_step`, so the weights it
reaches at a stored checkpoint are bit-identical to the stored ones, and the weights between
checkpoints are the ones training had.  It only reads the store.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from observatory import arguments
from observatory.data import Corpus, stored_corpus
from observatory.errors import StoreError
from observatory.models import build_model
from observatory.spec import RunSpec
from observatory.store import FamilyStore, RunReader
from observatory.train.interventions import Course, course_of
from observatory.train.step import recipe, recipe_record, restore, train_step

# on_step(step, model, batch, loss, grads): see :func:`replay`.
OnStep = Callable[[int, PreTrainedModel, torch.Tensor, float, dict[str, torch.Tensor]], None]


# Why an ingested run (weights only) is refused, after the note that says it was ingested.
REPLAY_NEEDS = "it cannot be replayed, which needs both"


class RecipeError(StoreError):
    """This machine cannot honour the recipe a run was trained with (replay would differ)."""


def replay(
    store: str | Path,
    *,
    size: str,
    seed: int,
    start: int,
    stop: int,
    every: int = 1,
    on_step: OnStep | None = None,
    strict: bool = True,
    branch: str = "",
) -> Iterator[tuple[int, PreTrainedModel]]:
    """The exact model after every optimizer step from ``start`` to ``stop``.

    Parameters
    ----------
    store
        The family store.
    size
        Size name.
    seed
        Seed index.
    start, stop
        Steps (numbers of updates applied), ``0 <= start <= stop <= `` the recorded steps.
        Replay starts from the latest keyframe at or before ``start``.
    every
        Yield the model at ``start``, ``start + every``, ... (every step is still computed).
    on_step
        ``on_step(step, model, batch, loss, grads)`` for every training step replayed from the
        keyframe up to ``stop``: the update from step ``step`` to ``step + 1``, with the model
        holding the weights of step ``step``, its token ``batch`` ``[batch, context]``, the loss
        (float) and ``grads`` (HF parameter name -> the unclipped gradient of that loss, a
        copy).  It must not change the model; it runs with the caller's RNG.
    strict
        Refuse when this machine differs from the recorded recipe (torch or transformers
        version, thread count, CPU kernels); with ``False``, warn and replay anyway.
    branch
        Replay this branch of the run (``"a/b"`` for a branch ``b`` of the branch ``a``): its
        steps from each fork on take that branch's intervention.

    Yields
    ------
    tuple of (int, transformers.PreTrainedModel)
        The step and the live model (train mode) after that many updates; it changes when
        replay continues, so copy what you keep.

    Raises
    ------
    ArgumentError
        If an argument has the wrong type or an impossible value (``every < 1``).
    StoreError
        If the run or the steps do not exist, the run was ingested (it has no optimizer state
        or data order), the corpus changed, or (``strict``) the recipe cannot be honoured
        (:class:`RecipeError`).

    Examples
    --------
    >>> for step, model in obs.replay(path, size="l2-d64", seed=0, start=280, stop=320):
    ...     print(step, model(tokens).loss)
    """
    start, stop = arguments.index(start, "start"), arguments.index(stop, "stop")
    every = arguments.index(every, "every", minimum=1)
    on_step = arguments.function(on_step, "on_step")
    strict = arguments.flag(strict, "strict")
    source = ReplaySource.open(store, size=size, seed=seed, strict=strict, branch=branch)
    source.check_range(start, stop)
    keyframe = source.keyframe_before(start)
    wanted = range(start, stop + 1, every)
    return source.run(keyframe, stop, yield_at=set(wanted), on_step=on_step)


def model_at_step(
    store: str | Path, *, size: str, seed: int, step: int, branch: str = ""
) -> PreTrainedModel:
    """The model after ``step`` updates when ``step`` is no checkpoint: replayed, with a warning.

    See :func:`observatory.query.model_at`, which calls this for steps between checkpoints.
    """
    source = ReplaySource.open(store, size=size, seed=seed, strict=True, branch=branch)
    source.check_range(step, step)
    keyframe = source.keyframe_before(step)
    warnings.warn(
        f"{source.reader.run.path}: step {step} is not a checkpoint; replayed "
        f"{step - keyframe} steps from the keyframe at step {keyframe}",
        stacklevel=3,
    )
    *_, (_, model) = source.run(keyframe, step, yield_at={step})
    return model.eval()


@dataclass
class ReplaySource:
    """What replaying one run (or branch) needs from its store: the reader, the spec, the
    corpus and the course its steps took."""

    reader: RunReader
    spec: RunSpec
    corpus: Corpus
    course: Course

    @classmethod
    def open(
        cls, store: str | Path, *, size: str, seed: int, strict: bool, branch: str = ""
    ) -> ReplaySource:
        family = FamilyStore(store)
        reader = family.run(size, seed, branch)
        reader.refuse_if_ingested(REPLAY_NEEDS)
        check_recipe(reader, strict=strict)
        return cls.of(reader)

    @classmethod
    def of(cls, reader: RunReader) -> ReplaySource:
        """The replay source of an open run or branch."""
        corpus = stored_corpus(reader.family)
        course = course_of(reader, len(corpus))
        return cls(reader=reader, spec=reader.family.spec, corpus=corpus, course=course)

    def check_range(self, start: int, stop: int) -> None:
        """A clear error unless ``0 <= start <= stop <= `` the last recorded step."""
        recorded = self.reader.n_steps
        if not 0 <= start <= stop <= recorded:
            raise StoreError(
                f"{self.reader.run.path}: cannot replay steps {start}..{stop}: steps 0..{recorded} "
                "are recorded (committed)"
            )

    def keyframe_before(self, step: int) -> int:
        """The latest committed keyframe step at or before ``step``."""
        keyframes = self.reader.keyframe_steps()
        earlier = keyframes[keyframes <= step]
        if not len(earlier):
            raise StoreError(f"{self.reader.run.path}: no committed keyframe at or before {step}")
        return int(earlier[-1])

    def run(
        self,
        keyframe: int,
        stop: int,
        *,
        yield_at: set[int],
        on_step: OnStep | None = None,
    ) -> Iterator[tuple[int, PreTrainedModel]]:
        """Replay from the stored ``keyframe`` to ``stop``, yielding the model at ``yield_at``."""
        states = self.run_states(keyframe, stop, yield_at=yield_at, on_step=on_step)
        return ((step, model) for step, model, _, _ in states)

    def run_states(
        self,
        keyframe: int,
        stop: int,
        *,
        yield_at: set[int],
        on_step: OnStep | None = None,
    ) -> Iterator[tuple[int, PreTrainedModel, torch.optim.Optimizer, torch.Tensor]]:
        """As :meth:`run`, yielding the whole training state: ``(step, model, optimizer, rng)``
        with ``rng`` the RNG state the next step starts from (training's global one)."""
        spec, run = self.spec, self.reader.run
        state = self.reader.checkpoint(keyframe)
        indices = self.reader.batch_indices_between(keyframe, stop)
        with torch.random.fork_rng(devices=[]):  # building draws init numbers; keep the caller's
            model = build_model(spec.model, spec.size(run.size), init_seed=run.init_seed)
            model.train()
            optimizer = spec.optimizer.build(model)
            restore(model, optimizer, state)  # sets the recorded RNG state ...
            rng = torch.get_rng_state()  # ... which replay carries from step to step
        return self._steps(model, optimizer, rng, keyframe, indices, yield_at, on_step)

    def _steps(self, model, optimizer, rng, keyframe, indices, yield_at, on_step):
        spec, course = self.spec, self.course
        hooks = course.hooks(model)
        stop = keyframe + len(indices)
        if keyframe in yield_at:
            yield keyframe, model, optimizer, rng
        for step in range(keyframe, stop):
            tokens = self.corpus.batch(indices[step - keyframe])
            inspect = None if on_step is None else _inspector(on_step, step, model, tokens)
            # Between yields the caller owns the global RNG and thread count; each step runs
            # under the run's recipe and carries on the run's own RNG stream.
            with recipe(spec.train.threads), torch.random.fork_rng(devices=[]):
                torch.set_rng_state(rng)
                train_step(
                    model,
                    optimizer,
                    tokens,
                    lr=course.lr(step),
                    grad_clip=spec.optimizer.grad_clip,
                    before_update=inspect,
                    hooks=hooks(step),
                )
                rng = torch.get_rng_state()
            if step + 1 in yield_at:
                yield step + 1, model, optimizer, rng


def _inspector(on_step: OnStep, step: int, model, tokens) -> Callable[[torch.Tensor], None]:
    def inspect(loss: torch.Tensor) -> None:
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
        with torch.random.fork_rng(devices=[]):
            on_step(step, model, tokens, loss.item(), grads)

    return inspect


def check_recipe(reader: RunReader, *, strict: bool) -> None:
    """Refuse (or, not ``strict``, warn) where this machine differs from the run's recipe.

    Raises
    ------
    RecipeError
        Naming what differs, e.g. ``torch 2.13.0 (recorded 2.12.1)``.
    """
    recorded = reader.recipe
    here = recipe_record(reader.family.spec)
    if not recorded:
        differences = ["no recipe is recorded for this run"]
    else:
        differences = [
            f"{key} {here.get(key)} (recorded {value})"
            for key, value in recorded.items()
            if here.get(key) != value
        ]
    if not differences:
        return
    message = (
        f"{reader.run.path}: replay cannot promise the trained numbers here: "
        f"{'; '.join(differences)}"
    )
    if strict:
        raise RecipeError(f"{message} (pass strict=False to replay anyway)")
    warnings.warn(message, stacklevel=3)
