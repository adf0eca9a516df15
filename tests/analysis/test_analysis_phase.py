"""The phase-change detector finds known onsets and says "none" on flat curves."""

import math

import numpy as np
import pandas as pd
import pytest

from induction_dynamics.analysis.phase import (
    detect_phase_change,
    format_summary,
    loss_bump,
    summarize_across_seeds,
)


def sigmoid_curve(rng, mid, *, lo=0.05, amp=0.6, width=150.0, noise=0.03, n=41, last=10_000):
    steps = np.linspace(0, last, n)
    y = lo + amp / (1 + np.exp(-(steps - mid) / width)) + rng.normal(0, noise, n)
    return steps, y


@pytest.mark.parametrize("mid", [1_500, 3_700, 5_000, 6_250, 8_800])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finds_known_midpoint_within_5_percent(mid, seed):
    rng = np.random.default_rng(seed)
    steps, y = sigmoid_curve(rng, mid)
    pc = detect_phase_change(steps, y, "induction_score_max", min_amplitude=0.1)
    assert pc.detected, pc.reason
    assert abs(pc.mid_step - mid) <= 0.05 * (steps[-1] - steps[0])
    assert pc.start_step < pc.mid_step < pc.end_step
    assert pc.amp == pytest.approx(0.6, abs=0.1)


def test_skip_initial_frac_finds_the_phase_change_behind_an_early_transient():
    # the ICL score on the training distribution: a large fall in the first few hundred steps
    # (n-grams), flat, then the phase change's smaller fall at 1,250 (the quickstart's shape)
    rng = np.random.default_rng(4)
    steps = np.concatenate([[0, 1, 2, 4, 8, 16, 32, 64], np.arange(100, 4001, 100)]).astype(float)
    y = (-0.4 * (1 - np.exp(-steps / 150)) - 0.25 / (1 + np.exp(-(steps - 1_250) / 100))
         + rng.normal(0, 0.01, len(steps)))
    whole = detect_phase_change(steps, y, "icl_score_repeats", min_amplitude=0.05)
    assert whole.mid_step < 700  # fits the transient (or a blend of both), not the phase change
    pc = detect_phase_change(steps, y, "icl_score_repeats", min_amplitude=0.05, skip_initial_frac=0.15)
    assert pc.detected, pc.reason
    assert abs(pc.mid_step - 1_250) <= 150 and pc.amp == pytest.approx(-0.25, abs=0.05)
    assert pc.n_points == int((steps >= 600).sum())
    with pytest.raises(ValueError, match="skip_initial_frac"):
        detect_phase_change(steps, y, skip_initial_frac=1.0)


def test_falling_curve_and_outlier():
    # an ICL-score-like curve falls; one wild checkpoint must not move the answer
    rng = np.random.default_rng(3)
    steps, y = sigmoid_curve(rng, 4_000, lo=0.0, amp=-0.5, noise=0.02, n=60)
    y[10] += 1.0
    pc = detect_phase_change(steps, y, "icl_score", min_amplitude=0.05)
    assert pc.detected, pc.reason
    assert pc.amp < 0
    assert abs(pc.mid_step - 4_000) <= 500


def test_sharp_jump_few_checkpoints():
    steps = np.array([0, 250, 500, 750, 1000])
    y = np.array([0.05, 0.06, 0.05, 0.7, 0.72])
    pc = detect_phase_change(steps, y, "x", min_amplitude=0.1)
    assert pc.detected, pc.reason
    assert 500 <= pc.mid_step <= 750


@pytest.mark.parametrize("seed", range(5))
def test_flat_noisy_curve_is_none(seed):
    rng = np.random.default_rng(seed)
    steps = np.linspace(0, 10_000, 41)
    y = 0.05 + rng.normal(0, 0.03, len(steps))
    pc = detect_phase_change(steps, y, "induction_score_max", min_amplitude=0.1)
    assert not pc.detected
    assert math.isnan(pc.mid_step) and pc.reason


def test_exactly_flat_and_linear_and_short_curves_are_none():
    steps = np.linspace(0, 1000, 20)
    assert not detect_phase_change(steps, np.full(20, 0.3)).detected
    ramp = detect_phase_change(steps, np.linspace(0, 1, 20), min_amplitude=0.1)
    assert not ramp.detected and "trend" in ramp.reason
    short = detect_phase_change([0, 1, 2], [0, 1, 1])
    assert not short.detected and "3 checkpoints" in short.reason


def test_loss_bump():
    steps = np.arange(0, 1100, 100)
    loss = np.array([3.0, 2.5, 2.2, 2.0, 1.90, 1.93, 1.95, 1.85, 1.8, 1.78, 1.77])
    assert loss_bump(steps, loss, 420, 620) == pytest.approx(0.05)
    assert loss_bump(steps, loss, 0, 300) == 0.0
    assert math.isnan(loss_bump(steps, loss, math.nan, math.nan))


def test_summary_across_seeds():
    rng = np.random.default_rng(0)
    rows = []
    for seed, mid in enumerate([4_000, 4_500, 5_000]):
        steps, y = sigmoid_curve(rng, mid)
        d = detect_phase_change(steps, y, "induction_score_max", min_amplitude=0.1).as_dict()
        rows.append({**d, "run": f"seed{seed}", "shape": "L2", "loss_bump_in_window": True})
    flat = detect_phase_change(np.arange(10), np.zeros(10), "icl_score").as_dict()
    rows.append({**flat, "run": "seed0", "shape": "L2", "loss_bump_in_window": False})
    summary = summarize_across_seeds(pd.DataFrame(rows))
    ind = summary.set_index("metric").loc["induction_score_max"]
    assert ind.n_detected == 3 and ind.n_loss_bump == 3
    assert ind.mid_step_mean == pytest.approx(4_500, abs=200)
    assert ind.mid_step_sd == pytest.approx(500, abs=200)
    text = format_summary(summary)
    assert "induction_score_max: fastest change at step" in text and "±" in text
    assert "icl_score: no phase change detected" in text
