"""Loss-bump detection and emergence steps on synthetic curves with known answers."""

import numpy as np
import pytest

from observatory.analysis import emergence, loss_bump

STEPS = np.arange(1000)


def plateau_drop_plateau(rng, noise: float, start=400, end=550) -> np.ndarray:
    """Loss at ln 64 until ``start``, a smooth drop to 1.0 by ``end``, then flat; plus noise."""
    u = np.clip((STEPS - start) / (end - start), 0.0, 1.0)
    return np.log(64) - (np.log(64) - 1.0) * u * u * (3 - 2 * u) + rng.normal(0, noise, STEPS.size)


@pytest.mark.parametrize(("seed", "noise"), [(0, 0.02), (1, 0.1), (2, 0.3)])
def test_loss_bump_brackets_the_drop(seed, noise):
    rng = np.random.default_rng(seed)
    bump = loss_bump(STEPS, plateau_drop_plateau(rng, noise), tokens_per_step=2048)
    assert bump is not None
    assert 300 <= bump.start_step <= 450
    assert 500 <= bump.end_step <= 650
    assert bump.loss_drop == pytest.approx(np.log(64) - 1.0, abs=0.8)
    assert bump.start_tokens == bump.start_step * 2048
    assert bump.attrs["bump_end_tokens"] == bump.end_step * 2048


def test_loss_bump_ignores_a_fast_initial_drop_and_a_slow_tail():
    rng = np.random.default_rng(3)
    loss = plateau_drop_plateau(rng, 0.1) + 0.5 * np.exp(-STEPS / 20) - 0.2 * STEPS / 1000
    bump = loss_bump(STEPS, loss)
    assert bump is not None and 300 <= bump.start_step <= 450 and 500 <= bump.end_step <= 650


@pytest.mark.parametrize("tau", [30.0, 200.0, 1000.0])
@pytest.mark.parametrize("shape", ["exponential", "power_law"])
def test_loss_bump_is_none_on_a_smooth_decay(tau, shape):
    rng = np.random.default_rng(int(tau))
    decay = np.exp(-STEPS / tau) if shape == "exponential" else 1 / (1 + STEPS / tau)
    assert loss_bump(STEPS, 1.0 + 3.0 * decay + rng.normal(0, 0.1, STEPS.size)) is None


def test_emergence_on_a_sigmoid():
    steps = np.arange(0, 1001, 10)
    score = 0.05 + 0.8 / (1 + np.exp(-(steps - 475) / 20))
    result = emergence(steps, score, threshold=0.5)
    assert result.crossing_step == steps[np.flatnonzero(score >= 0.5)[0]]
    assert score[steps == result.crossing_step - 10] < 0.5  # the *first* crossing
    assert result.midpoint_step == pytest.approx(475, abs=1)  # halfway from 0.05 to 0.85
    assert result.attrs["emergence_threshold"] == 0.5


def test_emergence_when_nothing_emerges():
    steps = np.arange(10)
    never = emergence(steps, np.linspace(0.0, 0.3, 10), threshold=0.5)
    assert never.crossing_step is None and never.midpoint_step == pytest.approx(4.5)
    flat = emergence(steps, np.full(10, 0.1))
    assert flat.crossing_step is None and flat.midpoint_step is None


def test_emergence_midpoint_of_a_falling_score_interpolates():
    result = emergence([0, 10, 20], [1.0, 0.8, 0.0])  # halfway level 0.5 between 10 and 20
    assert result.midpoint_step == pytest.approx(10 + 10 * 0.3 / 0.8)
    assert result.crossing_step == 0
