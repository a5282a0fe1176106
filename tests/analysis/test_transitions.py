"""Transition discovery on constructed per-token loss curves, where the truth is known."""

import numpy as np
import pytest

from observatory.analysis.transitions import (
    find_transitions,
    gaussian_mixture,
    jaccard,
    match_transitions,
    token_learning,
)

STEPS = np.unique(np.concatenate([[0, 1, 2, 4, 8, 16, 32, 64], np.arange(0, 1001, 20)]))


def drop(steps, at, width=0.15):
    """A sigmoid fall from 1 to 0 centred at step ``at``, over log step."""
    return 1.0 / (1.0 + np.exp((np.log1p(steps) - np.log1p(at)) / width))


def planted_losses(seed, groups=((60, 300, 2.0), (500, 400, 3.0)), n_flat=400, noise=0.15):
    """``losses[step, token]``: groups of (learned at step, size, drop) and flat tokens."""
    rng = np.random.default_rng(seed)
    columns, truth = [], []
    for index, (at, size, nats) in enumerate(groups):
        jitter = np.exp(rng.normal(0, 0.1, size))  # each token's own time, near the group's
        for shift in jitter:
            columns.append(4.2 - nats * (1 - drop(STEPS, at * shift)))
        truth += [index] * size
    columns += [np.full(len(STEPS), 4.2)] * n_flat
    truth += [-1] * n_flat
    losses = np.column_stack(columns) + rng.normal(0, noise, (len(STEPS), len(columns)))
    return losses, np.array(truth)


def test_learning_time_is_halfway_from_first_to_final_loss():
    losses = np.column_stack([4.0 - 2.0 * (1 - drop(STEPS, 200)), np.full(len(STEPS), 4.0)])
    learning = token_learning(STEPS, losses)
    assert learning.learned.tolist() == [True, False]
    assert np.expm1(learning.log_step[0]) == pytest.approx(200, rel=0.1)
    assert np.isnan(learning.log_step[1]) and learning.gain[1] == pytest.approx(0)


def test_mixture_by_bic_separates_two_clusters_and_keeps_one_together():
    rng = np.random.default_rng(0)
    two = np.concatenate([rng.normal(2, 0.2, 300), rng.normal(6, 0.2, 500)])
    labels, means = gaussian_mixture(two, max_components=6, min_sd=0.1)
    assert len(means) == 2 and means[0] < means[1]
    assert (labels[:300] == 0).all() and (labels[300:] == 1).all()
    labels, means = gaussian_mixture(rng.normal(4, 0.3, 800), max_components=6, min_sd=0.1)
    assert len(means) == 1 and (labels == 0).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_planted_group_is_found_with_its_tokens_and_time(seed):
    losses, truth = planted_losses(seed)
    found = find_transitions(STEPS, losses)
    assert len(found) == 2
    for index, (transition, at) in enumerate(zip(found, (60, 500), strict=True)):
        planted = np.flatnonzero(truth == index)
        overlap = len(np.intersect1d(transition.tokens, planted))
        assert overlap / transition.n_tokens >= 0.95  # precision
        assert overlap / len(planted) >= 0.95  # recall
        assert transition.start_step <= at <= transition.end_step
        assert transition.loss_drop > 1.0


def test_noise_alone_gives_no_transition():
    rng = np.random.default_rng(3)
    losses = 4.2 + rng.normal(0, 0.3, (len(STEPS), 2000))
    assert find_transitions(STEPS, losses) == []


def test_a_smooth_decline_shared_by_every_token_is_not_a_transition():
    # every token improves a little along one power law: no abrupt drop, nothing to report
    rng = np.random.default_rng(4)
    trend = 4.2 - 0.4 * np.log1p(STEPS) / np.log1p(STEPS[-1])
    losses = trend[:, None] + rng.normal(0, 0.05, (len(STEPS), 500))
    assert find_transitions(STEPS, losses, min_gain=0.2) == []


def test_transitions_are_matched_across_seeds_by_their_tokens():
    per_seed = {}
    for seed in range(3):
        groups = ((60, 300, 2.0), (500, 400, 3.0)) if seed < 2 else ((60, 300, 2.0),)
        per_seed[seed] = find_transitions(STEPS, planted_losses(seed, groups)[0])
    ids = match_transitions(per_seed)
    assert ids[(0, 0)] == ids[(1, 0)] == ids[(2, 0)] == 0  # the early group, in every seed
    assert ids[(0, 1)] == ids[(1, 1)] == 1  # the late group, in seeds 0 and 1 only
    assert len(ids) == 5


def test_unrelated_token_sets_are_not_matched():
    a, b = planted_losses(0, ((60, 300, 2.0),))[0], planted_losses(1, ((60, 300, 2.0),))[0]
    b = b[:, ::-1]  # the same kind of drop on other tokens
    ids = match_transitions({0: find_transitions(STEPS, a), 1: find_transitions(STEPS, b)})
    assert ids[(0, 0)] != ids[(1, 0)]
    assert jaccard(np.arange(4), np.arange(2, 6)) == pytest.approx(2 / 6)
