"""Per-step attribution during an exact replay: the change of a target, one term per update.

For the updates ``k`` of ``[start, stop)`` the replay (:class:`~observatory.train.replay.
ReplaySource`, the trainer's own step) visits the weights ``theta_start .. theta_stop``; at each
the target's value and gradient are computed once, and each update gets the trapezoid term::

    term_k = <(grad f(theta_k) + grad f(theta_{k+1})) / 2, theta_{k+1} - theta_k>

whose error is third order in the step.  ``residual = (f(theta_stop) - f(theta_start)) -
sum_k term_k`` is measured, not assumed.  The span is split at keyframes into tasks (each
replays from its own keyframe), run in this process or on dask; a task's numbers do not
depend on where it runs, since the target is evaluated under the run's recipe (threads,
deterministic kernels), on its own RNG stream and without touching the model.

On a branch the replay takes the branch's intervention from its fork on; its ablation hooks act
in the training steps only, so the target is evaluated on the weights the branch reached, with
every head present, as the analyses of the branch's checkpoints see them.  The terms then
split the change of that same function of the weights, and sum to it as on a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from observatory.analysis.protocol import SharedData
from observatory.attribution.examples import ExampleTerms
from observatory.attribution.spans import check_stop, flat_weights
from observatory.attribution.targets import ChosenTarget, value_and_gradient
from observatory.train.replay import ReplaySource
from observatory.train.step import recipe


@dataclass(frozen=True)
class SpanResult:
    """What one task returns for the updates ``start .. stop - 1``.

    Attributes
    ----------
    start, stop
        The span.
    values
        ``f(theta_k)`` for ``k = start .. stop`` (float64).
    terms
        ``term_k`` for ``k = start .. stop - 1`` (float64).
    examples
        ``example_contribution[k - start, i]`` (float64), or None without per-example terms.
    indices
        ``example_index[k - start, i]``: the corpus window of each example (int64), or None.
    checked
        The stored checkpoint steps the replayed weights were compared with (bit-identical).
    """

    start: int
    stop: int
    values: np.ndarray
    terms: np.ndarray
    examples: np.ndarray | None = None
    indices: np.ndarray | None = None
    checked: tuple[int, ...] = field(default=())


def attribute_span(
    store: str,
    size: str,
    seed: int,
    branch: str,
    span: tuple[int, int],
    chosen: ChosenTarget,
    data: SharedData,
    per_example: bool,
) -> SpanResult:
    """Replay one span of a run (or its branch ``branch``) and attribute the target's change
    to its updates (runs on a worker).

    Raises
    ------
    TargetError
        If the target fails or is not a differentiable scalar.
    StoreError
        If the replayed weights differ from a stored checkpoint at the span's end.
    """
    start, stop = span
    source = ReplaySource.open(store, size=size, seed=seed, strict=True, branch=branch)
    chosen, threads = chosen.on_worker(), source.spec.train.threads
    states = source.run_states(
        source.keyframe_before(start), stop, yield_at=set(range(start, stop + 1))
    )
    indices = source.reader.batch_indices_between(start, stop)
    examples = None
    if per_example:
        norms = source.reader.metrics()["grad_norm"][start:stop]
        examples = ExampleTerms(source.spec, norms, start)
    values, terms, rows, previous = [], [], [], None
    for step, model, optimizer, _ in states:
        where = f"target {chosen.name!r} at step {step} of {source.reader.run.path}"
        with recipe(threads):
            value, gradient = value_and_gradient(chosen, model, data, where)
            weights = flat_weights(model)
            if previous is not None:
                average = (previous[0] + gradient) / 2
                terms.append(float(torch.dot(average, weights - previous[1])))
                if examples is not None:
                    rows.append(examples.finish(step - 1, model, optimizer, average))
            if examples is not None and step < stop:
                examples.begin(model, source.corpus.batch(indices[step - start]))
        values.append(value)
        previous = (gradient, weights)
    checked = check_stop(source, stop, model, "; did the target change the model?")
    return SpanResult(
        start=start,
        stop=stop,
        values=np.asarray(values, dtype=np.float64),
        terms=np.asarray(terms, dtype=np.float64),
        examples=np.asarray(rows, dtype=np.float64) if per_example else None,
        indices=np.asarray(indices, dtype=np.int64) if per_example else None,
        checked=checked,
    )


def combine(results: list[SpanResult]) -> SpanResult:
    """The spans' results, in order, as one (a boundary's value from the span it ends)."""
    first = results[0]
    values = np.concatenate([first.values[:1], *(r.values[1:] for r in results)])
    examples = indices = None
    if first.examples is not None:
        examples = np.concatenate([r.examples for r in results])
        indices = np.concatenate([r.indices for r in results])
    return SpanResult(
        start=first.start,
        stop=results[-1].stop,
        values=values,
        terms=np.concatenate([r.terms for r in results]),
        examples=examples,
        indices=indices,
        checked=tuple(s for r in results for s in r.checked),
    )
