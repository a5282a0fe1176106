"""Training dynamics from an exact replay: what each update moved, step by step.

For every update ``k`` of ``[start, stop)``, from ``theta_k`` (the weights after ``k`` updates)
to ``theta_{k+1}``, the replay (the trainer's own step) gives:

- ``grad_norm[k] = ||g_k||``: ``g_k`` is the gradient of the step's training loss at
  ``theta_k`` that the step used, before clipping; ``clip_factor[k]`` is the factor clipping
  scaled it by (from the recorded gradient norm, by ``clip_grad_norm_``'s rule);
- ``update_norm[k] = ||theta_{k+1} - theta_k||`` (AdamW's whole update: the clipped,
  preconditioned step and weight decay), ``weight_norm[k] = ||theta_k||`` and
  ``update_ratio[k] = update_norm[k] / weight_norm[k]``;
- ``update_cosine[k] = cos(theta_{k+1} - theta_k, theta_k - theta_{k-1})``, the cosine between
  consecutive updates (NaN at step 0, which has no update before it).

Each also per block, ``block_*[train_step, block]`` (one block per parameter of the model, each
layer's its own, named as the model names it; the coordinates ``block_parameter`` and
``block_layer`` give its stored, stacked name and its layer, -1 for none), and all but the
cosine per head, ``head_*[train_step, layer, head]`` (the entries of every per-head view the
architecture's ``head_blocks`` declare: ``W_Q``, ``W_K``, ``W_V``, ``W_O`` and, where it has
them, ``b_Q``, ``b_K``, ``b_V``).  Norms are float64 sums of squares of the float32 values; a
block whose weights are zero (a bias at initialisation) has an infinite ratio, and a zero
update a NaN cosine.

The span is split at keyframes into tasks (:mod:`~observatory.attribution.spans`); the first
also replays the update before ``start``, so that ``start`` has its cosine, and the cosine at
a task boundary is computed from the two tasks' updates there when they are combined.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from observatory import arguments
from observatory.attribution.spans import (
    check_stop,
    flat_weights,
    map_spans,
    open_span,
    read_rows,
    result_name,
    write_rows,
)
from observatory.models import architecture, stack_layers, stacked_name, transformer_lens_weights
from observatory.models.registry import of_config
from observatory.store import DYNAMICS
from observatory.train.replay import ReplaySource
from observatory.train.step import clip_factor

MEASURES = ("grad", "update", "weight")  # what each norm is of: g_k, the update, theta_k
VARIABLES = (
    "grad_norm",
    "clip_factor",
    "update_norm",
    "weight_norm",
    "update_ratio",
    "update_cosine",
    "block_grad_norm",
    "block_update_norm",
    "block_weight_norm",
    "block_update_ratio",
    "block_update_cosine",
    "head_grad_norm",
    "head_update_norm",
    "head_weight_norm",
    "head_update_ratio",
)
# a ratio is infinite where the weights are zero, a cosine NaN where an update is
NONFINITE = tuple(v for v in VARIABLES if v.endswith(("update_ratio", "update_cosine")))


@dataclass(frozen=True)
class Blocks:
    """A model's parameters as blocks of a flat vector (``named_parameters`` order), and where
    its heads sit in them."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    architecture: str
    n_heads: int

    @classmethod
    def of(cls, model) -> Blocks:
        """The blocks of a model."""
        named = list(model.named_parameters())
        return cls(
            names=tuple(name for name, _ in named),
            shapes=tuple(tuple(p.shape) for _, p in named),
            architecture=of_config(model.config).name,
            n_heads=model.config.num_attention_heads,
        )

    @cached_property
    def _starts(self) -> np.ndarray:
        sizes = [int(np.prod(shape)) for shape in self.shapes]
        return np.cumsum([0, *sizes[:-1]])

    def dots(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``<a, b>`` within each block of two flat vectors."""
        return np.add.reduceat(a * b, self._starts)

    def squares(self, flat: np.ndarray) -> np.ndarray:
        """The sum of squares of each block of a flat vector."""
        return self.dots(flat, flat)

    def head_squares(self, flat: np.ndarray) -> np.ndarray:
        """The sum of squares of each head's entries, ``[layer, head]``, by ``head_blocks``."""
        parts = np.split(flat, self._starts[1:])
        tensors = {
            name: torch.from_numpy(part.reshape(shape))
            for name, part, shape in zip(self.names, parts, self.shapes, strict=True)
        }
        stacked = stack_layers(tensors, dtype=torch.float64)
        views = transformer_lens_weights(
            stacked, architecture=self.architecture, n_heads=self.n_heads
        )
        return sum(
            np.square(views[view]).reshape(*views[view].shape[:2], -1).sum(axis=2)
            for view in architecture(self.architecture).head_blocks
        )


def cosines(blocks: Blocks, before: np.ndarray | None, after: np.ndarray) -> np.ndarray:
    """The cosine between two updates, whole (first) and per block; NaN without ``before``."""
    if before is None:
        return np.full(1 + len(blocks.names), np.nan)
    dots, first, second = blocks.dots(before, after), blocks.squares(before), blocks.squares(after)
    with np.errstate(divide="ignore", invalid="ignore"):
        whole = dots.sum() / np.sqrt(first.sum() * second.sum())
        each = dots / np.sqrt(first * second)
    return np.clip(np.concatenate([[whole], each]), -1.0, 1.0)


@dataclass(frozen=True)
class SpanDynamics:
    """What one task returns for the updates ``start .. stop - 1``.

    Attributes
    ----------
    start, stop
        The span.
    blocks
        The model's blocks.
    squares
        ``grad``, ``update``, ``weight``: ``[step, block]`` sums of squares; ``head_grad``,
        ``head_update``, ``head_weight``: ``[step, layer, head]``.
    cosines
        ``[step, 1 + block]``: the cosine with the update before, whole then per block (NaN
        at the span's first step unless the task replayed the update before it).
    first_update, last_update
        The flat updates at ``start`` and ``stop - 1`` (to fill the cosines at task boundaries).
    checked
        The stored checkpoint steps the replayed weights were compared with (bit-identical).
    """

    start: int
    stop: int
    blocks: Blocks
    squares: dict[str, np.ndarray]
    cosines: np.ndarray
    first_update: np.ndarray
    last_update: np.ndarray
    checked: tuple[int, ...]


class _Recorder:
    """The measures of the steps ``start .. stop - 1``, as the replay visits them."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop
        self.blocks: Blocks | None = None
        keys = (*MEASURES, *(f"head_{what}" for what in MEASURES), "cosines")
        self.rows: dict[str, list[np.ndarray]] = {key: [] for key in keys}
        self._weights = self._update = self._first = None

    def _measure(self, what: str, flat: np.ndarray) -> None:
        self.rows[what].append(self.blocks.squares(flat))
        self.rows[f"head_{what}"].append(self.blocks.head_squares(flat))

    def gradient(self, step: int, _model, _tokens, _loss: float, grads: dict) -> None:
        """``on_step`` of the replay: the step's gradient before clipping, at ``theta_step``."""
        if self.start <= step < self.stop:
            flat = torch.cat([g.reshape(-1).double() for g in grads.values()])
            self._measure("grad", flat.numpy())

    def weights(self, step: int, model) -> None:
        """The weights after ``step`` updates, and the update that reached them."""
        self.blocks = self.blocks or Blocks.of(model)
        weights = flat_weights(model).numpy()
        if self.start <= step < self.stop:
            self._measure("weight", weights)
        if self._weights is not None:
            update = weights - self._weights
            if step > self.start:
                self._measure("update", update)
                self.rows["cosines"].append(cosines(self.blocks, self._update, update))
                self._first = update if self._first is None else self._first
            self._update = update
        self._weights = weights

    def result(self, checked: tuple[int, ...]) -> SpanDynamics:
        rows = {key: np.asarray(values, dtype=np.float64) for key, values in self.rows.items()}
        return SpanDynamics(
            start=self.start,
            stop=self.stop,
            blocks=self.blocks,
            squares={key: values for key, values in rows.items() if key != "cosines"},
            cosines=rows["cosines"],
            first_update=self._first,
            last_update=self._update,
            checked=checked,
        )


def dynamics_span(
    store: str, size: str, seed: int, branch: str, span: tuple[int, int], first: int
) -> SpanDynamics:
    """Replay one span of a run (or its branch ``branch``) and measure its updates (runs on a
    worker).

    ``first`` is the whole span's first step: the task that starts there (if it is not 0)
    also replays the update before it, for the cosine at ``first``.

    Raises
    ------
    StoreError
        If the replayed weights differ from a stored checkpoint at the span's end.
    """
    start, stop = span
    source = ReplaySource.open(store, size=size, seed=seed, strict=True, branch=branch)
    begin = start - 1 if start == first > 0 else start
    recorder = _Recorder(start, stop)
    states = source.run_states(
        source.keyframe_before(begin),
        stop,
        yield_at=set(range(begin, stop + 1)),
        on_step=recorder.gradient,
    )
    for step, model, _, _ in states:
        recorder.weights(step, model)
    return recorder.result(check_stop(source, stop, model))


def combine(results: list[SpanDynamics]) -> SpanDynamics:
    """The tasks' results, in order, as one; the cosines at their boundaries filled in."""
    first, last = results[0], results[-1]
    found = np.concatenate([r.cosines for r in results])
    for before, after in itertools.pairwise(results):
        found[after.start - first.start] = cosines(
            first.blocks, before.last_update, after.first_update
        )
    return SpanDynamics(
        start=first.start,
        stop=last.stop,
        blocks=first.blocks,
        squares={key: np.concatenate([r.squares[key] for r in results]) for key in first.squares},
        cosines=found,
        first_update=first.first_update,
        last_update=last.last_update,
        checked=tuple(step for r in results for step in r.checked),
    )


def measure_dynamics(
    store: str | Path,
    *,
    size: str,
    seed: int,
    start: int,
    stop: int,
    workers: int = 0,
    scheduler: str | None = None,
    name: str | None = None,
    branch: str = "",
) -> xr.Dataset:
    """Measure every update of training steps ``[start, stop)`` on an exact replay, and store it.

    Parameters
    ----------
    store, size, seed
        The run.
    start, stop
        The updates ``start .. stop - 1`` (``0 <= start < stop <=`` the recorded steps).
    workers, scheduler
        0 and None: compute in this process; else the span's keyframe segments are dask tasks
        on a local cluster of ``workers`` processes or on the scheduler at ``scheduler``.
    name
        The stored group's name (default: ``steps_<start>_<stop>``); existing results of that
        name are replaced.
    branch
        Measure this branch of the run (``"a/b"`` for a branch of a branch), its intervention
        acting from its fork on (its steps before are replayed through its parent), and store
        the result in the branch's group.

    Returns
    -------
    xarray.Dataset
        Along ``train_step`` (see :mod:`observatory.attribution.dynamics`): ``grad_norm``,
        ``clip_factor``, ``update_norm``, ``weight_norm``, ``update_ratio``,
        ``update_cosine``; ``block_*[train_step, block]`` of the same but the clip factor;
        ``head_*[train_step, layer, head]`` of the norms and the ratio.  Attributes: ``start``,
        ``stop``, ``grad_clip``, ``blocks``, ``checked_checkpoints`` (the stored checkpoints
        the replayed weights were found bit-identical to), ``store``, ``size``, ``seed``,
        ``branch``, ``name``.

    Raises
    ------
    ObservatoryError
        One line, before anything is written: unknown run or branch, steps out of range,
        ``stop <= start``, a name that is not an identifier; or a replay that differs from the
        store.
    """
    workers = arguments.index(workers, "workers")
    name = None if name is None else result_name(name)
    span = open_span(store, size=size, seed=seed, start=start, stop=stop, branch=branch)
    name = name or f"steps_{span.start}_{span.stop}"
    results = map_spans(dynamics_span, span, span.start, workers=workers, scheduler=scheduler)
    result = combine(results)
    grad_clip = span.family.spec.optimizer.grad_clip
    norms = span.source.reader.metrics()["grad_norm"][span.start : span.stop]
    clip = np.array([clip_factor(grad_clip, float(norm)) for norm in norms], dtype=np.float64)
    parameters = {"start": span.start, "stop": span.stop, "grad_clip": grad_clip}
    parameters |= {"blocks": list(result.blocks.names), "checked_checkpoints": list(result.checked)}
    dataset = _dataset(result, clip, json.loads(json.dumps(parameters)))
    write_rows(span, name, dataset, DYNAMICS, nonfinite=NONFINITE)
    return dataset.assign_attrs(span.where, name=name)


def _dataset(result: SpanDynamics, clip: np.ndarray, parameters: dict[str, Any]) -> xr.Dataset:
    squares, norms = result.squares, {}
    for what in MEASURES:
        norms[f"{what}_norm"] = np.sqrt(squares[what].sum(axis=1))
        norms[f"block_{what}_norm"] = np.sqrt(squares[what])
        norms[f"head_{what}_norm"] = np.sqrt(squares[f"head_{what}"])
    with np.errstate(divide="ignore", invalid="ignore"):
        for prefix in ("", "block_", "head_"):
            norms[f"{prefix}update_ratio"] = (
                norms[f"{prefix}update_norm"] / norms[f"{prefix}weight_norm"]
            )
    norms |= {"clip_factor": clip, "update_cosine": result.cosines[:, 0]}
    norms["block_update_cosine"] = result.cosines[:, 1:]
    variables = {v: (_dims(v), norms[v]) for v in VARIABLES}
    steps = np.arange(result.start, result.stop, dtype=np.int64)
    dataset = xr.Dataset(variables, coords={"train_step": steps}, attrs=parameters)
    return _with_coords(dataset)


def _dims(variable: str) -> tuple[str, ...]:
    """A variable's dims, by its prefix (``block_``, ``head_`` or none)."""
    prefix = variable.split("_", 1)[0]
    return {"block": ("train_step", "block"), "head": ("train_step", "layer", "head")}.get(
        prefix, ("train_step",)
    )


def _with_coords(dataset: xr.Dataset) -> xr.Dataset:
    """The ``block``, ``layer`` and ``head`` coordinates, from the stored block names."""
    blocks = dataset.attrs["blocks"]
    where = [stacked_name(block) for block in blocks]
    return dataset.assign_coords(
        block=np.array(blocks),
        block_parameter=("block", np.array([parameter for parameter, _ in where])),
        block_layer=("block", np.array([-1 if at is None else at for _, at in where])),
        layer=np.arange(dataset.sizes["layer"]),
        head=np.arange(dataset.sizes["head"]),
    )


def dynamics(
    store: str | Path, *, size: str, seed: int, name: str | None = None, branch: str = ""
) -> xr.Dataset:
    """Training dynamics stored by :func:`measure_dynamics`, read back (the same dataset).

    ``name=None`` reads the run's (or the branch ``branch``'s) only stored one.

    Raises
    ------
    StoreError
        If the run or branch has none of that name (the message lists the stored ones), or
        ``name`` is None and it has several or none; or the branch does not exist.
    """
    where = {"size": size, "seed": seed, "name": name, "branch": branch}
    return _with_coords(read_rows(store, **where, kind=DYNAMICS, order=VARIABLES))


def format_dynamics(ds: xr.Dataset, heads: int = 5) -> str:
    """What ``observatory dynamics`` prints: the whole model's update ratio, gradient norm and
    cosine, each block's median and largest update ratio, and the ``heads`` heads that moved
    most (by their update ratio summed over the span); infinite and NaN values are left out of
    medians and extremes."""
    steps = ds["train_step"].values
    lines = [
        f"updates {ds.attrs['start']}..{ds.attrs['stop'] - 1} of {ds.attrs.get('size')}/"
        f"seed{ds.attrs.get('seed')}:"
    ]
    for variable, what in (
        ("update_ratio", "update ratio |dw|/|w|"),
        ("grad_norm", "gradient norm (before clipping)"),
        ("update_cosine", "cosine of consecutive updates"),
    ):
        lines.append(f"  {what}: {_summary(ds[variable].values, steps)}")
    clipped = int((ds["clip_factor"].values < 1).sum())
    lines.append(f"  clipped in {clipped} of {len(steps)} steps")
    lines.append(f"{'block':<52} {'median ratio':>12} {'largest':>10} {'at step':>8}")
    for i, block in enumerate(ds["block"].values):
        ratios = ds["block_update_ratio"].values[:, i]
        at = _largest(ratios)
        lines.append(
            f"{block:<52} {finite_median(ratios):>12.3g} {ratios[at]:>10.3g} {steps[at]:>8}"
        )
    lines.append(f"{'head':<6} {'summed ratio':>12} {'largest':>10} {'at step':>8}")
    for layer, head, summed in moved_heads(ds, heads):
        ratios = ds["head_update_ratio"].values[:, layer, head]
        at = _largest(ratios)
        lines.append(f"{f'L{layer}H{head}':<6} {summed:>12.3g} {ratios[at]:>10.3g} {steps[at]:>8}")
    return "\n".join(lines)


def moved_heads(ds: xr.Dataset, n: int) -> list[tuple[int, int, float]]:
    """The ``n`` heads that moved most over a result's span: ``(layer, head, summed ratio)``,
    by ``head_update_ratio`` summed over the steps, largest first (ties: the first head)."""
    summed = ds["head_update_ratio"].sum("train_step").transpose("layer", "head").values
    order = np.argsort(-summed, axis=None, kind="stable")[:n]
    where = np.unravel_index(order, summed.shape)
    return [
        (int(layer), int(head), float(summed[layer, head]))
        for layer, head in zip(*where, strict=True)
    ]


def _largest(values: np.ndarray) -> int:
    """The position of the largest finite value (the first if none is finite): a block whose
    weights start at zero has an infinite ratio at step 0, which says nothing."""
    return int(np.argmax(np.where(np.isfinite(values), values, -np.inf)))


def finite_median(values: np.ndarray) -> float:
    """The median of the finite values (NaN if none): ratios are infinite where weights are
    zero, cosines NaN where there is no update before."""
    known = values[np.isfinite(values)]
    return float(np.median(known)) if known.size else float("nan")


def _summary(values: np.ndarray, steps: np.ndarray) -> str:
    """Median, smallest and largest (with their steps) of the finite values of a per-step
    value."""
    if not np.isfinite(values).any():
        return "none (e.g. no update before step 0)"
    low = int(np.argmin(np.where(np.isfinite(values), values, np.inf)))
    high = _largest(values)
    return (
        f"median {finite_median(values):.3g}, smallest {values[low]:.3g} at step {steps[low]}, "
        f"largest {values[high]:.3g} at step {steps[high]}"
    )
