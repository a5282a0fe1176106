"""Developmental transitions: groups of tokens whose loss drops abruptly at the same time.

The signal is the per-token loss of a fixed held-out set at every analysed checkpoint
(``losses[step, token]``, the ``per_token_loss`` analysis). A run's transitions are found in
three steps, each a standard tool that a reviewer can check on its own:

1. **When each token is learned.** A token's loss curve is smoothed by a running median over
   ``smooth`` checkpoints. Its *gain* is its loss at the first checkpoint minus its mean loss
   over the last ``tail`` fraction of checkpoints; tokens that gain at least ``min_gain`` nats
   are *learned*, and their *learning time* is the step at which the smoothed curve first
   reaches halfway between the two levels (interpolated in log step, as the emergence
   midpoint of a head score). Tokens that only fluctuate, or whose loss rises, are left out.
2. **Which tokens are learned together.** The learning times (in log step: early and late
   transitions are equally resolved) are modelled as a mixture of Gaussians fitted by EM, with
   the number of components (1 to ``max_groups``) chosen by the Bayesian information criterion;
   each learned token joins its most probable component. A component is a candidate
   transition: the tokens learned around the same time.
3. **Is the group's drop abrupt?** The group's mean loss over log step is searched for a
   steepening with the loss-bump change-point rule (:func:`~observatory.analysis.phase.
   loss_bump`: a piecewise-linear fit whose slope steepens by a significant amount). The
   group is a transition when that rule finds a window, the fitted drop across it is at least
   ``min_drop`` nats, and the group holds at least ``min_tokens`` tokens. The window is the
   transition's ``start_step``-``end_step``.

Grouping uses only *when* tokens are learned, the test only the group's mean curve, so a
group of tokens that merely fluctuate (no structure to learn) has no common drop to find.
Across seeds, transitions are matched by the overlap of their token sets (the held-out set is
the same for every seed): :func:`match_transitions`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.ndimage import median_filter

from observatory.analysis.phase import loss_bump
from observatory.errors import AnalysisError


@dataclass(frozen=True)
class TransitionOptions:
    """The settings of discovery and matching (this module's).

    ``min_gain``: nats a token's loss must fall to count as learned; ``min_drop``: nats a
    group's mean loss must drop across its window; ``min_tokens``: the smallest group;
    ``resolution``: the finest spread of a group's learning times, in log step;
    ``min_overlap``: the Jaccard overlap of the token sets of two matched transitions;
    ``min_score_change``: how much a head score must change across a window for the head to
    be listed among the transition's components; ``n_examples``: example tokens per row.
    """

    min_gain: float = 0.5
    min_drop: float = 0.25
    min_tokens: int = 20
    resolution: float = 0.125
    min_overlap: float = 0.3
    min_score_change: float = 0.2
    n_examples: int = 3

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise AnalysisError(f"transitions: {name} must be positive, got {value}")
        if self.min_overlap > 1:
            raise AnalysisError(
                f"transitions: min_overlap must be at most 1, got {self.min_overlap}"
            )


METHOD = (
    "learning time of each token (halfway from its first to its final loss, log step); "
    "Gaussian mixture of learning times (EM, components by BIC); abrupt drop of each group's "
    "mean loss by the loss-bump change-point rule over log step"
)


@dataclass(frozen=True)
class Learning:
    """When each token of a run is learned (see the module docstring, step 1)."""

    gain: np.ndarray  # [token]: first loss minus final loss, nats
    log_step: np.ndarray  # [token]: log(1 + step) of the learning time (NaN if not learned)
    learned: np.ndarray  # [token] bool: gain >= min_gain


@dataclass(frozen=True, eq=False)
class Transition:
    """A group of tokens whose mean loss drops abruptly over a window of steps."""

    start_step: float
    end_step: float
    loss_drop: float  # the group's fitted mean loss at start_step minus at end_step, nats
    tokens: np.ndarray  # indices of the group's tokens (into the flattened held-out tokens)
    learning_step: float  # median learning time of the group's tokens
    curve: np.ndarray  # [step]: the group's mean loss

    @property
    def n_tokens(self) -> int:
        """How many held-out tokens the group holds."""
        return len(self.tokens)


def token_learning(
    steps: np.ndarray,
    losses: np.ndarray,
    *,
    min_gain: float = 0.5,
    smooth: int = 5,
    tail: float = 0.2,
) -> Learning:
    """When each token is learned: its gain and learning time (module docstring, step 1).

    Parameters
    ----------
    steps
        ``steps[checkpoint]``, increasing, the first one the start of the curve.
    losses
        ``losses[checkpoint, token]``, nats.
    min_gain, smooth, tail
        See the module docstring.

    Returns
    -------
    Learning
    """
    x = np.log1p(np.asarray(steps, dtype=np.float64))
    smoothed = median_filter(losses, size=(min(smooth, len(x)), 1), mode="nearest")
    n_tail = max(1, int(round(tail * len(x))))
    first, final = losses[0], losses[-n_tail:].mean(axis=0)
    gain = first - final
    half = first - gain / 2
    reached = np.argmax(smoothed <= half, axis=0)  # first checkpoint at or below half
    before = np.maximum(reached - 1, 0)
    tokens = np.arange(losses.shape[1])
    above, below = smoothed[before, tokens], smoothed[reached, tokens]
    span = np.where(above > below, above - below, 1.0)
    fraction = np.clip(np.where(above > below, (above - half) / span, 0.0), 0.0, 1.0)
    log_step = x[before] + fraction * (x[reached] - x[before])
    learned = gain >= min_gain
    return Learning(gain=gain, log_step=np.where(learned, log_step, np.nan), learned=learned)


def gaussian_mixture(
    x: np.ndarray, *, max_components: int, min_sd: float, iterations: int = 300
) -> tuple[np.ndarray, np.ndarray]:
    """A 1-D Gaussian mixture by EM, its number of components chosen by BIC.

    Parameters
    ----------
    x
        The values (at least two).
    max_components
        Fits 1 to this many components.
    min_sd
        The smallest standard deviation of a component (a floor that keeps EM from fitting a
        component to a single repeated value).
    iterations
        EM iterations at most per fit.

    Returns
    -------
    labels, means
        ``labels[len(x)]``: each value's most probable component, numbered by increasing mean;
        ``means[n_components]``.
    """
    x = np.asarray(x, dtype=np.float64)
    fits = [_em(x, k, min_sd, iterations) for k in range(1, min(max_components, len(x)) + 1)]
    _, means, responsibility = min(fits, key=lambda fit: fit[0])
    order = np.argsort(means)
    rank = np.argsort(order)
    return rank[responsibility.argmax(axis=1)], means[order]


def _em(x: np.ndarray, k: int, min_sd: float, iterations: int):
    """``(bic, means, responsibilities)`` of a k-component mixture, started at quantiles."""
    mean = np.quantile(x, (np.arange(k) + 0.5) / k)
    sd = np.full(k, max(x.std() / k, min_sd))
    weight = np.full(k, 1.0 / k)
    previous = -np.inf
    for _ in range(iterations):
        log_p = -0.5 * ((x[:, None] - mean) / sd) ** 2 - np.log(sd * np.sqrt(2 * np.pi))
        log_p += np.log(weight)
        top = log_p.max(axis=1, keepdims=True)
        likelihood = float(np.sum(top[:, 0] + np.log(np.exp(log_p - top).sum(axis=1))))
        responsibility = np.exp(log_p - top)
        responsibility /= responsibility.sum(axis=1, keepdims=True)
        counts = responsibility.sum(axis=0) + 1e-12
        weight = counts / len(x)
        mean = (responsibility * x[:, None]).sum(axis=0) / counts
        spread = (responsibility * (x[:, None] - mean) ** 2).sum(axis=0) / counts
        sd = np.maximum(np.sqrt(spread), min_sd)
        if likelihood - previous <= 1e-9 * abs(likelihood):
            break
        previous = likelihood
    bic = -2 * likelihood + (3 * k - 1) * np.log(len(x))
    return bic, mean, responsibility


def find_transitions(
    steps: np.ndarray,
    losses: np.ndarray,
    *,
    min_gain: float = 0.5,
    min_drop: float = 0.25,
    min_tokens: int = 20,
    max_groups: int = 8,
    resolution: float = 0.125,
) -> list[Transition]:
    """The transitions of one run (see the module docstring).

    Parameters
    ----------
    steps
        ``steps[checkpoint]``, increasing.
    losses
        ``losses[checkpoint, token]``: the per-token loss of the held-out tokens, nats.
    min_gain, min_drop, min_tokens, max_groups
        See the module docstring.
    resolution
        The smallest spread of a group's learning times in log step (the floor on a mixture
        component's standard deviation): groups learned within about this factor of each
        other's step, ``exp(resolution)``, are not told apart.

    Returns
    -------
    list of Transition
        In the order of their windows' starts; empty if no group drops abruptly.
    """
    steps = np.asarray(steps, dtype=np.float64)
    learning = token_learning(steps, losses, min_gain=min_gain)
    learned = np.flatnonzero(learning.learned)
    if len(learned) < min_tokens:
        return []
    x = np.log1p(steps)
    labels, _ = gaussian_mixture(
        learning.log_step[learned], max_components=max_groups, min_sd=resolution
    )
    found = []
    for group in range(labels.max() + 1):
        tokens = learned[labels == group]
        if len(tokens) < min_tokens:
            continue
        curve = losses[:, tokens].mean(axis=1)
        bump = loss_bump(x, curve, min_size=3)
        if bump is None or bump.loss_drop < min_drop:
            continue
        found.append(
            Transition(
                start_step=float(np.expm1(bump.start_step)),
                end_step=float(np.expm1(bump.end_step)),
                loss_drop=float(bump.loss_drop),
                tokens=tokens,
                learning_step=float(np.expm1(np.median(learning.log_step[tokens]))),
                curve=curve,
            )
        )
    return sorted(found, key=lambda t: t.start_step)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """The overlap of two token sets: size of the intersection over size of the union."""
    union = len(np.union1d(a, b))
    return len(np.intersect1d(a, b)) / union if union else 0.0


def match_transitions(
    per_seed: dict[int, list[Transition]], *, min_overlap: float = 0.3
) -> dict[tuple[int, int], int]:
    """Match transitions across seeds by the overlap of their token sets.

    Every pair of seeds is matched one to one (Hungarian assignment on the Jaccard overlap of
    the token sets, pairs below ``min_overlap`` left unmatched); matched pairs link
    transitions, and each connected set of linked transitions is one matched transition.
    A set that holds two transitions of one seed is split back into its seeds' transitions
    (the overlap is ambiguous).

    Parameters
    ----------
    per_seed
        ``{seed: [Transition, ...]}``.
    min_overlap
        The smallest Jaccard overlap of two matched transitions.

    Returns
    -------
    dict
        ``{(seed, index in per_seed[seed]): matched transition id}``, ids numbered from 0 in
        the order of their earliest window start.
    """
    from scipy.optimize import linear_sum_assignment

    nodes = [(seed, i) for seed, found in per_seed.items() for i in range(len(found))]
    parent = {node: node for node in nodes}

    def root(node):
        while parent[node] != node:
            node = parent[node]
        return node

    seeds = sorted(per_seed)
    for a_pos, a in enumerate(seeds):
        for b in seeds[a_pos + 1 :]:
            if not per_seed[a] or not per_seed[b]:
                continue
            overlap = np.array(
                [[jaccard(x.tokens, y.tokens) for y in per_seed[b]] for x in per_seed[a]]
            )
            for i, j in zip(*linear_sum_assignment(-overlap), strict=True):
                if overlap[i, j] >= min_overlap:
                    parent[root((a, i))] = root((b, j))
    return _number_groups(per_seed, {node: root(node) for node in nodes})


def _number_groups(per_seed, roots) -> dict[tuple[int, int], int]:
    """Ids for the linked sets, split where a set holds two transitions of one seed."""
    members: dict = {}
    for node, top in roots.items():
        members.setdefault(top, []).append(node)
    groups = []
    for nodes in members.values():
        seeds = [seed for seed, _ in nodes]
        groups += [nodes] if len(set(seeds)) == len(seeds) else [[node] for node in nodes]

    def start(nodes):
        return min(per_seed[seed][i].start_step for seed, i in nodes)

    ordered = sorted(groups, key=lambda nodes: (start(nodes), min(nodes)))
    return {node: gid for gid, nodes in enumerate(ordered) for node in nodes}
