"""Interventions of counterfactual branches, and the course a run's steps take.

A branch continues a run from a step with an :class:`Intervention`: windows dropped from the
data order, the data order re-drawn with another seed, another learning-rate schedule, heads
ablated or frozen while training.  A :class:`Course` is what decides each step besides the
weights (its batch, learning rate and hooks) for a run or a branch: training, replay and
verify take it from the same place, so a replayed branch step is the step its training took.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from observatory.data import BranchOrder, Corpus, batch_indices, data_order_fingerprint
from observatory.errors import SpecError
from observatory.models import PER_HEAD_DIMS, layer_name
from observatory.models.registry import of_config
from observatory.spec import OptimizerSpec, RunSpec
from observatory.usercode import file_source, source_module, source_sha256

ABLATIONS = ("zero", "mean")
SCHEDULES = ("constant", "linear", "cosine")
# What ablating and freezing a head do while a branch trains (stored with every branch).
DEFINITIONS = {
    "zero": "the head's z (its attention-weighted values, the input of W_O) is replaced by 0 "
    "in every forward pass of training; W_O's bias is kept",
    "mean": "the head's z is replaced by its mean over the batch's sequences and positions in "
    "the same forward pass, detached (a constant of the step: no gradient flows through it)",
    "freeze": "the head's blocks (its Q, K and V rows and its W_O columns, as the architecture "
    "declares them) get a zero gradient before clipping, so the gradient norm counts the other "
    "entries only, and are restored after each optimizer step (weight decay and AdamW's "
    "momentum do not move them; their moments evolve as AdamW computes them)",
}

Head = tuple[int, int]  # (layer, head)


@dataclass(frozen=True)
class Intervention:
    """What a branch changes from its fork on (the empty intervention changes nothing).

    Attributes
    ----------
    drop_windows
        Corpus indices the branch never reads (sorted, unique): from ``--drop-windows`` and,
        once resolved (:meth:`resolved`), the windows ``drop_predicate`` matches.
    drop_predicate
        ``"file.py:name"``: ``name(tokens) -> bool`` over a window's tokens (a numpy array);
        windows it returns True for are dropped.
    drop_predicate_sha256
        SHA-256 of the predicate file's source text (set by :meth:`resolved`).
    data_seed
        Re-draw the data order with this seed from the fork on.
    lr, schedule, warmup_steps
        Replace these keys of ``[optimizer]`` from the fork on.
    ablate_heads, ablation
        Heads ``(layer, head)`` whose output is ablated while training, ``"zero"`` or ``"mean"``
        (see :data:`DEFINITIONS`).
    freeze_heads
        Heads whose weights do not change from the fork on (see :data:`DEFINITIONS`).
    """

    drop_windows: tuple[int, ...] = ()
    drop_predicate: str | None = None
    drop_predicate_sha256: str | None = None
    data_seed: int | None = None
    lr: float | None = None
    schedule: str | None = None
    warmup_steps: int | None = None
    ablate_heads: tuple[Head, ...] = ()
    ablation: str = "zero"
    freeze_heads: tuple[Head, ...] = field(default=())

    def __post_init__(self) -> None:
        windows = tuple(int(i) for i in self.drop_windows)
        if any(i < 0 for i in windows):
            raise SpecError("drop_windows: corpus indices must be >= 0")
        object.__setattr__(self, "drop_windows", tuple(sorted(set(windows))))
        for name in ("ablate_heads", "freeze_heads"):
            heads = tuple(sorted({(int(layer), int(head)) for layer, head in getattr(self, name)}))
            if any(layer < 0 or head < 0 for layer, head in heads):
                raise SpecError(f"{name}: layers and heads are indices >= 0")
            object.__setattr__(self, name, heads)
        if self.ablation not in ABLATIONS:
            raise SpecError(f"ablation: {self.ablation!r} is not one of {', '.join(ABLATIONS)}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise SpecError(f"schedule: {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.lr is not None and not self.lr > 0:
            raise SpecError("lr: must be positive")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise SpecError("warmup_steps: must be >= 0")
        if self.data_seed is not None and self.data_seed < 0:
            raise SpecError("data_seed: must be >= 0")
        if self.drop_predicate is not None and not self.drop_predicate.partition(":")[0].endswith(
            ".py"
        ):
            raise SpecError(f"drop: expected 'file.py:name', got {self.drop_predicate!r}")

    @property
    def reorders(self) -> bool:
        """Whether the branch reads other windows than its parent would."""
        return bool(self.drop_windows) or self.data_seed is not None

    def optimizer(self, base: OptimizerSpec) -> OptimizerSpec:
        """``base`` with the learning-rate keys this intervention replaces."""
        keys = {"lr": self.lr, "schedule": self.schedule, "warmup_steps": self.warmup_steps}
        return dataclasses.replace(base, **{k: v for k, v in keys.items() if v is not None})

    def to_json(self) -> str:
        """The intervention as canonical JSON (what the branch stores and hashes)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Intervention:
        return cls(**json.loads(text))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def resolved(self, corpus: Corpus) -> Intervention:
        """This intervention with the windows its predicate matches added to ``drop_windows``.

        Raises
        ------
        SpecError
            One line if the file or name is missing, or the predicate raises or does not
            return a bool (naming the window).
        """
        if self.drop_predicate is None or self.drop_predicate_sha256 is not None:
            return self
        filename, _, name = self.drop_predicate.rpartition(":")
        source = file_source(filename, "predicate")
        predicate = getattr(source_module(filename, source), name, None)
        if not callable(predicate):
            raise SpecError(f"drop: {self.drop_predicate}: no function {name!r} in {filename}")
        matched = [
            i for i in range(len(corpus)) if _matches(predicate, self.drop_predicate, corpus, i)
        ]
        return dataclasses.replace(
            self,
            drop_windows=(*self.drop_windows, *matched),
            drop_predicate_sha256=source_sha256(source),
        )

    def check(self, spec: RunSpec, size: str, dataset_size: int) -> None:
        """A one-line :class:`SpecError` for a head or window the run does not have."""
        layers, heads = spec.size(size).n_layers, spec.size(size).n_heads
        for name in ("ablate_heads", "freeze_heads"):
            for layer, head in getattr(self, name):
                if layer >= layers or head >= heads:
                    raise SpecError(
                        f"{name}: no head {layer}.{head} in size {size} "
                        f"({layers} layers of {heads} heads)"
                    )
        if self.drop_windows and self.drop_windows[-1] >= dataset_size:
            raise SpecError(
                f"drop: window {self.drop_windows[-1]} is not in the corpus "
                f"({dataset_size} windows)"
            )
        if len(self.drop_windows) >= dataset_size:
            raise SpecError(f"drop: every one of the corpus's {dataset_size} windows is dropped")
        self.optimizer(spec.optimizer).validate("optimizer")


def _matches(predicate, ref: str, corpus: Corpus, index: int) -> bool:
    """Whether window ``index`` is to be dropped (a one-line error if the predicate fails)."""
    tokens = corpus.batch(np.array([index]))[0].numpy()
    try:
        answer = predicate(tokens)
    except Exception as err:
        message = f"drop: {ref} raised {type(err).__name__} on window {index}: {err}"
        raise SpecError(message.splitlines()[0]) from None
    if not isinstance(answer, bool | np.bool_):
        raise SpecError(
            f"drop: {ref} returned {type(answer).__name__}, not a bool, on window {index}"
        )
    return bool(answer)


class Hooks:
    """What interventions do inside :func:`~observatory.train.step.train_step`: ablation hooks
    on the heads' output projections, and the gradient and update mask of frozen heads (see
    :data:`DEFINITIONS`).  A branch of a branch takes its parent's interventions and its own,
    in that order."""

    def __init__(self, interventions: Sequence[Intervention], model):
        self._model = model
        self._interventions = tuple(interventions)
        frozen = {head for one in self._interventions for head in one.freeze_heads}
        self._frozen = _head_masks(model, tuple(sorted(frozen)))

    @contextmanager
    def forward(self) -> Iterator[None]:
        """Ablate the heads in the forward passes of the block."""
        projections = of_config(self._model.config).output_projections(self._model)
        n_heads = self._model.config.num_attention_heads
        handles = [
            projections[layer].register_forward_pre_hook(
                _ablate([h for at, h in one.ablate_heads if at == layer], n_heads, mean)
            )
            for one, mean in ((one, one.ablation == "mean") for one in self._interventions)
            for layer in sorted({layer for layer, _ in one.ablate_heads})
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def mask_gradients(self) -> None:
        """Zero the frozen entries' gradients (after the backward pass, before clipping)."""
        for param, mask in self._frozen:
            if param.grad is not None:
                param.grad.masked_fill_(mask, 0.0)

    @contextmanager
    def update(self) -> Iterator[None]:
        """Restore the frozen entries after the optimizer step of the block."""
        saved = [param.detach()[mask].clone() for param, mask in self._frozen]
        yield
        with torch.no_grad():
            for (param, mask), values in zip(self._frozen, saved, strict=True):
                param[mask] = values


def _ablate(heads: list[int], n_heads: int, mean: bool):
    """A pre-hook on ``W_O`` replacing the ``z`` of ``heads`` by 0 or its detached mean."""

    def hook(_module, args: tuple) -> tuple:
        z = args[0]
        value = 0.0
        if mean:
            value = z.view(*z.shape[:-1], n_heads, -1)[..., heads, :].mean(dim=(0, 1)).detach()
        z = z.clone()
        z.view(*z.shape[:-1], n_heads, -1)[..., heads, :] = value
        return (z, *args[1:])

    return hook


def _head_masks(model, heads: tuple[Head, ...]) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """Each parameter holding a block of ``heads`` (by the architecture's ``head_blocks``),
    with a mask of the heads' entries."""
    declared = of_config(model.config)
    n_heads, named = model.config.num_attention_heads, dict(model.named_parameters())
    masks: dict[str, torch.Tensor] = {}
    for param, _part, _parts in declared.head_blocks.values():
        dims = declared.parameter_dims[param]
        axis = next(i for i, dim in enumerate(dims) if dim in PER_HEAD_DIMS) - 1  # no layer dim
        for layer, head in heads:
            name = layer_name(param, layer)
            tensor = named[name]
            mask = masks.setdefault(name, torch.zeros_like(tensor, dtype=torch.bool))
            width = tensor.shape[axis] // n_heads  # every block of one head
            index = [slice(None)] * tensor.ndim
            index[axis] = slice(head * width, (head + 1) * width)
            mask[tuple(index)] = True
    return [(named[name], mask) for name, mask in sorted(masks.items())]


@dataclass(frozen=True)
class Course:
    """What decides each step of a run besides the weights: its batch, learning rate and hooks.

    A run's course is its spec and data seed; a branch's is its parent's before ``fork`` and
    the intervention's on top of its parent's from the fork on: a branch of a branch keeps the
    interventions of the branches it comes from (``parent``: the course of the branch it
    forks from; None for a branch of a run, and for a run).
    """

    spec: RunSpec
    data_seed: int
    dataset_size: int
    fork: int = 0
    intervention: Intervention = field(default_factory=Intervention)
    parent: Course | None = None

    @cached_property
    def order(self) -> BranchOrder | None:
        """The data order from the fork on; None where it is the run's plain order."""
        inherited = None if self.parent is None else self.parent.order
        own = self.intervention
        if not own.reorders:
            return inherited
        dropped = own.drop_windows if inherited is None else [*inherited.dropped, *own.drop_windows]
        keys = {
            "fork": self.fork,
            "batch_size": self.spec.train.batch_size,
            "dataset_size": self.dataset_size,
            "dropped": sorted(set(dropped)),
        }
        if own.data_seed is not None:
            return BranchOrder(data_seed=own.data_seed, **keys)
        if inherited is None:
            return BranchOrder(data_seed=self.data_seed, **keys)
        # A branch of a branch continues its parent's stream where the parent had reached.
        return BranchOrder(
            data_seed=inherited.data_seed, start=inherited.entry_at(self.fork), **keys
        )

    @property
    def chain(self) -> tuple[tuple[int, Intervention], ...]:
        """``(fork, intervention)`` of each branch from the run's first one to this one."""
        above = () if self.parent is None else self.parent.chain
        return (*above, (self.fork, self.intervention))

    @property
    def optimizer(self) -> OptimizerSpec:
        """The ``[optimizer]`` of the steps from the fork on."""
        base = self.spec.optimizer if self.parent is None else self.parent.optimizer
        return self.intervention.optimizer(base)

    def batch_indices(self, step: int) -> np.ndarray:
        """Corpus indices of the batch of ``step``."""
        if step < self.fork and self.parent is not None:
            return self.parent.batch_indices(step)
        if step >= self.fork and self.order is not None:
            return self.order.indices(step)
        return batch_indices(
            data_seed=self.data_seed,
            step=step,
            batch_size=self.spec.train.batch_size,
            dataset_size=self.dataset_size,
        )

    def lr(self, step: int) -> float:
        """The learning rate of ``step``."""
        if step < self.fork and self.parent is not None:
            return self.parent.lr(step)
        optimizer = self.optimizer if step >= self.fork else self.spec.optimizer
        return optimizer.lr_at(step, self.spec.train.steps)

    def hooks(self, model) -> Callable[[int], Hooks | None]:
        """The hooks of each step on ``model``: those of every intervention of the chain from
        its fork on (None where none ablates or freezes a head)."""
        acting = [(fork, one) for fork, one in self.chain if one.ablate_heads or one.freeze_heads]
        stages = [
            (fork, Hooks([one for _, one in acting[: i + 1]], model))
            for i, (fork, _) in enumerate(acting)
        ]

        def at(step: int) -> Hooks | None:
            started = [hooks for fork, hooks in stages if fork <= step]
            return started[-1] if started else None

        return at

    def fingerprint(self) -> str:
        """The data order's fingerprint (checked when a run or branch is reopened)."""
        if self.parent is None:
            base = data_order_fingerprint(data_seed=self.data_seed, dataset_size=self.dataset_size)
        else:
            base = self.parent.fingerprint()
        if not self.intervention.reorders:
            return base
        text = f"{base}|{self.fork}|{self.intervention.sha256}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def branch_record(parent, fork: int, intervention: Intervention) -> dict[str, Any]:
    """The provenance stored with a branch (``parent`` is the :class:`RunId` of the run or
    branch it forks from)."""
    where = {"size": parent.size, "seed": parent.seed}
    return {
        "parent": where | ({"branch": parent.branch} if parent.branch else {}),
        "fork": fork,
        "intervention": json.loads(intervention.to_json()),
        "intervention_sha256": intervention.sha256,
        "definitions": DEFINITIONS,
    }


def course_of(reader, dataset_size: int) -> Course:
    """The course of a stored run or branch (a :class:`~observatory.store.RunReader`)."""
    spec, run, branch = reader.family.spec, reader.run, reader.branch
    if branch is None:
        return Course(spec, run.data_seed, dataset_size)
    intervention = Intervention.from_json(json.dumps(branch["intervention"]))
    parent = course_of(reader.parent, dataset_size) if reader.parent.branch else None
    return Course(spec, run.data_seed, dataset_size, branch["fork"], intervention, parent)
