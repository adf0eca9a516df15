"""The phase-change detector: known onsets found, smooth curves and noise left alone, the expected
direction applied by itself, the error rate calibrated on simulated curves at the quickstart's
checkpoint spacing, and the across-seed summary."""

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from induction_dynamics.analysis.jump_test import MIN_POINTS
from induction_dynamics.analysis.phase import (
    detect_phase_change,
    format_summary,
    holm,
    loss_bump,
    stouffer,
    summarize_across_seeds,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import phase_calibration as cal  # noqa: E402  the benchmark's simulated families, at a smaller size

QUICKSTART = cal.spacing("quickstart")


def sigmoid_curve(rng, mid, *, lo=0.05, amp=0.6, width=150.0, noise=0.03, n=41, last=10_000):
    steps = np.linspace(0, last, n)
    y = lo + amp / (1 + np.exp(-(steps - mid) / width)) + rng.normal(0, noise, n)
    return steps, y


@pytest.mark.parametrize("mid,seed", [(1_500, 0), (3_700, 1), (5_000, 2), (6_250, 0), (8_800, 1)])
def test_finds_known_midpoint_within_5_percent(mid, seed):
    steps, y = sigmoid_curve(np.random.default_rng(seed), mid)
    pc = detect_phase_change(steps, y, "induction_score_max")
    assert pc.detected, pc.reason
    assert pc.direction == "rise" and pc.p_value <= 0.05 and pc.amp > 0.3
    assert abs(pc.mid_step - mid) <= 0.05 * (steps[-1] - steps[0])
    assert steps[0] <= pc.start_step < pc.mid_step < pc.end_step <= steps[-1]


def test_the_metrics_direction_and_min_change_apply_bare():
    rng = np.random.default_rng(3)
    steps, y = sigmoid_curve(rng, 4_000, lo=0.0, amp=-0.5, noise=0.02, n=60)
    y[10] += 1.0  # one wild checkpoint must not move the answer
    icl = detect_phase_change(steps, y, "icl_score")  # ICL scores fall while induction heads form
    assert icl.detected and icl.direction == "fall" and icl.amp < 0, icl.reason
    assert abs(icl.mid_step - 4_000) <= 500
    # the same fall on an induction score is the opposite of the expected rise: said, not detected
    ind = detect_phase_change(steps, y, "induction_score_max")
    assert not ind.detected and "opposite to the rise" in ind.reason and ind.opposite_p_value <= 0.05
    # a significant change smaller than the registry's min_change (0.1 for induction scores)
    small = detect_phase_change(steps, 0.1 - y / 10, "induction_score_max")
    assert not small.detected and "below min_change 0.1" in small.reason, small.reason
    assert detect_phase_change(steps, 0.1 - y / 10, "induction_score_max", min_change=0.01).detected
    with pytest.raises(ValueError, match="direction"):
        detect_phase_change(steps, y, direction="up")


def test_a_rise_from_the_first_checkpoint_is_not_a_phase_change():
    # nearly every such curve was a "phase change" to a logistic fit: no plateau comes before it
    rng = np.random.default_rng(0)
    calls = [detect_phase_change(QUICKSTART, 0.1 + 0.5 * (1 - np.exp(-QUICKSTART / tau)) + rng.normal(0, 0.01, len(QUICKSTART)),
                                 "induction_score_max", seed=i).detected for i, tau in enumerate([100, 300, 800, 1500])]
    assert not any(calls)


def test_skip_initial_frac_and_the_early_transient():
    # the ICL score on the training distribution: a large fall in the first few hundred steps
    # (n-grams), flat, then the phase change's smaller fall at 1,250 (the quickstart's shape)
    rng = np.random.default_rng(4)
    steps = QUICKSTART
    y = (-0.4 * (1 - np.exp(-steps / 150)) - 0.25 / (1 + np.exp(-(steps - 1_250) / 100))
         + rng.normal(0, 0.01, len(steps)))
    for skip in (0.0, 0.15):  # the transient is a smooth curve from step 0: part of the null either way
        pc = detect_phase_change(steps, y, "icl_score_repeats", skip_initial_frac=skip)
        assert pc.detected, pc.reason
        assert abs(pc.mid_step - 1_250) <= 150 and pc.amp < -0.15
    assert pc.n_points == int((steps >= 600).sum())
    with pytest.raises(ValueError, match="skip_initial_frac"):
        detect_phase_change(steps, y, skip_initial_frac=1.0)


def test_a_window_past_the_last_checkpoint_is_clipped_and_said_to_be_open_ended():
    rng = np.random.default_rng(1)
    steps = QUICKSTART  # the rise is still under way at the last checkpoint, 4,000
    y = 0.05 + 0.6 / (1 + np.exp(-(np.log1p(steps) - np.log(3_450)) / 0.08)) + rng.normal(0, 0.02, len(steps))
    pc = detect_phase_change(steps, y, "induction_score_max")
    assert pc.detected, pc.reason
    assert pc.open_ended and pc.end_step == steps[-1] and steps[0] < pc.start_step < pc.mid_step < 4_000


def test_flat_constant_and_short_curves_are_none():
    rng = np.random.default_rng(0)
    steps = np.linspace(0, 10_000, 41)
    flat = detect_phase_change(steps, 0.05 + rng.normal(0, 0.03, len(steps)), "induction_score_max")
    assert not flat.detected and math.isnan(flat.mid_step) and "no sudden rise" in flat.reason
    assert flat.p_value > 0.05 and "noise" in flat.null
    assert "constant" in detect_phase_change(steps, np.full(41, 0.3)).reason
    line = detect_phase_change(steps, np.linspace(0, 1, 41), direction="rise")
    assert not line.detected
    short = detect_phase_change([0, 250, 500, 750, 1000], [0.05, 0.06, 0.05, 0.7, 0.72])
    assert not short.detected and f"need {MIN_POINTS}" in short.reason


def test_calibration_at_the_quickstart_spacing_small():
    """A small run of benchmarks/phase_calibration.py (its table is in docs/phase_change.md)."""
    assert cal.false_positive_rate(QUICKSTART, "saturating", 0.01, n=10, seed=7) <= 1 / 10
    assert cal.false_positive_rate(QUICKSTART, "flat", 0.03, n=10, seed=7) <= 1 / 10
    assert cal.power(QUICKSTART, 6.0, 0.1, n=6, seed=7) >= 5 / 6


@pytest.mark.slow
@pytest.mark.parametrize("family,sigma,most", [("saturating", 0.01, 3), ("power", 0.01, 3), ("AR(1)", 0.03, 3),
                                               ("linear", 0.01, 3), ("random walk", 0.03, 6)])
def test_false_positive_rate_at_the_quickstart_spacing(family, sigma, most):
    """At most 3 of 24 (a 5 % test exceeds that 3 % of the time); random walks, at 6.7 % on 600
    curves (docs/phase_change.md), at most 6 of 24: a guard against the walk calibration breaking."""
    assert cal.false_positive_rate(QUICKSTART, family, sigma, n=24, seed=11) <= most / 24


@pytest.mark.slow
def test_power_at_the_quickstart_spacing():
    """6 x noise, 10-90 % over a tenth of the run: 0.95 measured (40 curves); 4 x: 0.58."""
    assert cal.power(QUICKSTART, 6.0, 0.1, n=20, seed=11) >= 16 / 20
    assert cal.power(QUICKSTART, 4.0, 0.1, n=20, seed=11) >= 6 / 20


def test_loss_bump():
    steps = np.arange(0, 1100, 100)
    loss = np.array([3.0, 2.5, 2.2, 2.0, 1.90, 1.93, 1.95, 1.85, 1.8, 1.78, 1.77])
    assert loss_bump(steps, loss, 420, 620) == pytest.approx(0.05)
    assert loss_bump(steps, loss, 0, 300) == 0.0
    assert math.isnan(loss_bump(steps, loss, math.nan, math.nan))


def test_holm_and_stouffer():
    assert holm([0.01, 0.04, 0.03, math.nan]).tolist()[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(holm([0.01, math.nan])[1])
    assert stouffer([0.5, 0.5]) == pytest.approx(0.5)
    assert stouffer([0.05] * 4) == pytest.approx(0.000501, rel=0.01)  # z = 1.645 * 2
    assert stouffer([0.001, 1.0]) > 0.5  # a seed with no sign of it counts against


def test_summary_across_seeds():
    rng = np.random.default_rng(0)
    rows = []
    for seed, mid in enumerate([4_000, 4_500, 5_000]):
        steps, y = sigmoid_curve(rng, mid)
        d = detect_phase_change(steps, y, "induction_score_max", seed=seed).as_dict()
        rows.append({**d, "run": f"seed{seed}", "shape": "L2", "loss_bump_in_window": True})
        flat = detect_phase_change(steps, 0.1 + rng.normal(0, 0.02, len(steps)), "icl_score", seed=seed).as_dict()
        rows.append({**flat, "run": f"seed{seed}", "shape": "L2", "loss_bump_in_window": False})
    summary = summarize_across_seeds(pd.DataFrame(rows))
    ind = summary.set_index("metric").loc["induction_score_max"]
    assert ind.detected and ind.same_sign and ind.n_detected == 3 and ind.n_loss_bump == 3
    assert ind.p_combined < 1e-4 and ind.p_holm == pytest.approx(min(1.0, 2 * ind.p_combined))
    assert 4_000 - 300 <= ind.mid_step_median <= 5_000 + 300
    assert ind.mid_step_lo <= ind.mid_step_median <= ind.mid_step_hi
    icl = summary.set_index("metric").loc["icl_score"]
    assert not icl.detected and icl.p_combined > 0.05
    text = format_summary(summary)
    assert "induction_score_max: phase change at step" in text and "detected in 3/3" in text
    assert "icl_score: no phase change" in text
    # a seed whose larger move goes the other way: no phase change across the seeds
    flip = pd.DataFrame(rows).copy()
    i = flip.index[(flip.metric == "induction_score_max") & (flip.run == "seed2")][0]
    flip.loc[i, ["p_value", "opposite_p_value"]] = [0.5, 0.01]
    row = summarize_across_seeds(flip).set_index("metric").loc["induction_score_max"]
    assert not row.same_sign and not row.detected


def test_the_report_warns_when_a_score_is_within_its_own_noise():
    from induction_dynamics.analysis.config import PhaseConfig
    from induction_dynamics.analysis.outputs import RunResult, noise_warnings, phase_table
    from induction_dynamics.analysis.record import RunRecord
    from induction_dynamics.analysis.table import make_frame

    rng = np.random.default_rng(0)
    steps = QUICKSTART
    icl = -0.3 / (1 + np.exp(-(steps - 2_000) / 80)) + rng.normal(0, 0.01, len(steps))

    def result(stderr):
        rows = [dict(run="r", seed=0, shape="L2", step=int(s), tokens_seen=int(s), metric="icl_score", layer=-1,
                     head=-1, value=float(v), stderr=stderr) for s, v in zip(steps, icl)]
        r = RunResult(RunRecord(run="r", run_dir="."), make_frame(rows), pd.DataFrame())
        r.phase = phase_table(r.table, PhaseConfig())
        return r

    assert noise_warnings(result(0.005), PhaseConfig()) == []  # se 0.005: a tenth of min_change 0.05
    noisy = noise_warnings(result(0.2), PhaseConfig())
    assert any("icl_score's standard error (median 0.2)" in w and "raise suite.text_windows" in w for w in noisy)
    assert any("icl_score's change across its window" in w and "within its own noise" in w for w in noisy)
