"""Phase-change detection on a metric-vs-step curve (numpy only: no torch).

Olsson et al. (2022, section "Argument 1") see induction heads form in a narrow window of
training where the induction score jumps, the in-context-learning score drops and the training
loss shows a small bump. This module calls that window on a curve sampled at checkpoint steps,
and says "none" with a reason when the curve does not show it.

Method
------
1. Drop NaNs, sort by step; with ``skip_initial_frac`` > 0, drop the checkpoints in that first
   fraction of the step range. Fewer than ``jump_test.MIN_POINTS`` checkpoints: "none".
2. ``jump_test``: a likelihood-ratio test of a sudden rise and of a sudden fall (a logistic in
   log-step, with a plateau of at least three checkpoints before its midpoint and a window of at
   most 12 % of the log-step range) against smooth monotone curves in white, AR(1) or
   random-walk noise, with a p-value from a parametric bootstrap of the best no-jump fit. A rise
   that starts at the first checkpoint and levels off is one of those smooth curves.
3. The metric's expected direction (``registry``: induction-type scores rise, ICL scores fall) is
   the phase change: detected when its p-value is at most ``alpha`` and its amplitude at least
   ``min_change`` (the registry's smallest change that counts, in the metric's unit). A
   significant change of the other sign is reported as what it is, not as the phase change. A
   metric with no expected direction is tested both ways (Bonferroni: p doubled).

Reported: ``mid_step`` (the logistic's midpoint), ``start_step``/``end_step`` (where it covers
10 % and 90 % of its amplitude), clipped to the observed steps (``open_ended`` says so), ``amp``
(the fitted curve's change across the window),
``p_value``, ``null`` (the no-jump model the bootstrap simulated), ``noise`` (the curve's
checkpoint-to-checkpoint jitter), the other
sign's ``opposite_p_value``. The false-positive rate and power, measured on simulated curves at
the histories' own checkpoint spacing: docs/phase_change.md.

Loss bump: inside the window (widened to the nearest checkpoint on each side), the largest rise
of the loss above its running minimum so far; it counts when it exceeds the loss's own
checkpoint-to-checkpoint noise (``bump_snr`` times it) and, when a control run is analysed, the
control's bump in the same window by as much.

Across seeds (``summarize_across_seeds``): the per-seed p-values combined by Stouffer's method;
a phase change counts only when every seed's larger move has the expected sign; the midpoint is
the median over seeds with a bootstrap interval; Holm's correction over the metrics tested.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd

from induction_dynamics.analysis import registry
from induction_dynamics.analysis.jump_test import DIRECTIONS, MIN_POINTS, jump_test

# the bootstrap p-value's threshold: at 0.02 the false-positive rate is at most 5 % on every simulated
# null family at both history spacings but random walks, which are called 6.7 % / 7.3 % of the time
# (600 curves: docs/phase_change.md); at 0.05 random walks and AR(1) noise are called 8.7-15.2 %
ALPHA = 0.02


@dataclass
class PhaseChange:
    """The phase change of one curve (NaN window fields and a ``reason`` when none)."""

    metric: str
    detected: bool
    direction: str = ""          # the sign tested as the phase change (the metric's expected one)
    mid_step: float = math.nan
    start_step: float = math.nan
    end_step: float = math.nan
    open_ended: bool = False     # the 10-90 % window reaches past the first or last checkpoint
    amp: float = math.nan        # change of the fitted curve across the window, in the metric's unit (signed)
    p_value: float = math.nan    # of the expected direction
    null: str = ""               # the no-jump model rejected (or not)
    noise: float = math.nan      # checkpoint-to-checkpoint jitter of the curve (``noise_level``)
    opposite_p_value: float = math.nan
    n_points: int = 0
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def noise_level(y: np.ndarray) -> float:
    """Robust checkpoint-to-checkpoint jitter: 1.4826 * MAD(diff(y)) / sqrt(2)."""
    d = np.diff(np.asarray(y, dtype=float))
    if len(d) == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(2.0))


def _declared(metric: str) -> registry.Metric | None:
    try:
        return registry.of(metric)
    except KeyError:  # a curve the registry does not know: no direction, no smallest change
        return None


def expected_direction(metric: str) -> str:
    """The registry's expected direction of a curve ("rise", "fall" or "none"; "none" when unknown)."""
    m = _declared(metric)
    return str(m.direction) if m is not None else "none"


def min_change_of(metric: str, given: float | None = None) -> float:
    """The smallest change of ``metric`` that counts: ``given`` when set, else the registry's (0 when unknown)."""
    if given is not None:
        return float(given)
    m = _declared(metric)
    return float(m.min_change) if m is not None else 0.0


def detect_phase_change(steps, values, metric: str = "", *, direction: str | None = None,
                        min_change: float | None = None, alpha: float = ALPHA, skip_initial_frac: float = 0.0,
                        n_sim: int = 500, seed: int = 0) -> PhaseChange:
    """Call the phase change of one curve (see the module docstring for the method).

    ``steps`` and ``values``: 1-D sequences of equal length (any order; NaNs dropped).
    ``direction`` and ``min_change`` default to the registry's for ``metric``.
    Returns a PhaseChange; ``detected=False`` with a ``reason`` when there is none.
    """
    direction = expected_direction(metric) if direction is None else str(direction)
    if direction not in (*DIRECTIONS, "none"):
        raise ValueError(f"direction must be one of rise, fall, none, got {direction!r}")
    min_change = min_change_of(metric, min_change)
    if not 0.0 <= skip_initial_frac < 1.0:
        raise ValueError(f"skip_initial_frac must lie in [0, 1), got {skip_initial_frac}")
    s = np.asarray(steps, dtype=float)
    y = np.asarray(values, dtype=float)
    keep = np.isfinite(s) & np.isfinite(y)
    s, y = s[keep], y[keep]
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    if skip_initial_frac > 0 and len(s):
        later = s >= s[0] + skip_initial_frac * (s[-1] - s[0])
        s, y = s[later], y[later]
    out = PhaseChange(metric=metric, detected=False, direction=direction, n_points=len(s))
    if len(s) < MIN_POINTS:
        out.reason = f"only {len(s)} checkpoints (need {MIN_POINTS})"
        return out
    if len(np.unique(s)) < len(s):
        out.reason = "two values at one step"
        return out
    if np.ptp(y) == 0:
        out.reason = "the curve is constant"
        return out
    test = jump_test(s, y, n_sim=n_sim, seed=seed)
    out.null, out.noise = test.null, noise_level(y)
    if direction == "none":  # either sign may be the change: the better one, at twice its p-value
        best = min(DIRECTIONS, key=lambda d: test.of(d).p_value)
        jump, other = test.of(best), test.of("fall" if best == "rise" else "rise")
        out.direction, p = best, min(1.0, 2.0 * jump.p_value)
    else:
        jump, other = test.of(direction), test.of("fall" if direction == "rise" else "rise")
        p = jump.p_value
    start, mid, end = jump.step_at(0.1), jump.step_at(0.5), jump.step_at(0.9)
    out.open_ended = bool(start < s[0] or end > s[-1])
    out.start_step, out.mid_step, out.end_step = max(start, s[0]), mid, min(end, s[-1])
    # what the curve does across the window (the smooth part included): the size a reader sees
    amp = float(np.interp(out.end_step, s, jump.fitted) - np.interp(out.start_step, s, jump.fitted))
    out.p_value, out.opposite_p_value, out.amp = p, other.p_value, amp

    if p > alpha:
        out.reason = f"no sudden {out.direction} beyond the smooth null (p={p:.3g} > {alpha:g}; null: {test.null})"
        if direction != "none" and other.p_value <= alpha:
            out.reason = (f"a sudden {other.direction} (p={other.p_value:.3g}), opposite to the {direction} "
                          f"expected of {metric}: not the phase change")
    elif abs(amp) < min_change or (amp > 0) != (out.direction == "rise"):
        out.reason = f"significant (p={p:.3g}) but the change across the window, {amp:+.3g}, is below min_change {min_change:g}"
    else:
        out.detected = True
    if not out.detected:  # keep the fit's diagnostics but no window
        out.mid_step = out.start_step = out.end_step = math.nan
        out.open_ended = False
    return out


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error over the tests given)."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(len(p), math.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def loss_bump(steps, loss, start: float, end: float) -> float:
    """Largest rise of ``loss`` above its running minimum at checkpoints in [start, end].

    The window is widened to the nearest checkpoint outside it on each side. Returns NaN
    when start/end are NaN or there is no loss, 0.0 when the loss only falls there.
    """
    s = np.asarray(steps, dtype=float)
    y = np.asarray(loss, dtype=float)
    keep = np.isfinite(s) & np.isfinite(y)
    s, y = s[keep], y[keep]
    if len(s) < 2 or not (math.isfinite(start) and math.isfinite(end)):
        return math.nan
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    lo_i = max(0, int(np.searchsorted(s, start, side="right")) - 1)
    hi_i = min(len(s) - 1, int(np.searchsorted(s, end, side="left")))
    running_min = np.minimum.accumulate(y)
    rises = [y[j] - running_min[j - 1] for j in range(max(lo_i, 1), hi_i + 1)]
    return float(max(0.0, max(rises))) if rises else 0.0


def stouffer(p_values) -> float:
    """One-sided p-values of independent tests combined: 1 - Phi(sum z_i / sqrt(k))."""
    p = np.clip(np.asarray(p_values, dtype=float), 1e-12, 1.0 - 1e-12)
    if len(p) == 0:
        return math.nan
    z = NormalDist()  # the standard normal (stdlib: the plots-only path imports no scipy.stats)
    return float(1.0 - z.cdf(sum(z.inv_cdf(1.0 - float(x)) for x in p) / math.sqrt(len(p))))


def median_interval(values, *, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(median, lower, upper): the median of ``values`` and a percentile bootstrap interval."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    boots = np.median(np.random.default_rng(seed).choice(v, size=(n_boot, len(v))), axis=1)
    tail = (1.0 - level) / 2.0
    return float(np.median(v)), float(np.quantile(boots, tail)), float(np.quantile(boots, 1.0 - tail))


def summarize_across_seeds(per_run: pd.DataFrame, by: tuple[str, ...] = ("shape", "metric"),
                           alpha: float = ALPHA) -> pd.DataFrame:
    """One row per (shape, metric) over the runs (seeds): Stouffer's combination of the per-seed
    p-values, Holm-adjusted over the metrics of a shape (``p_holm``); ``detected`` when that is at
    most ``alpha`` and no seed's larger move is of the other sign (``same_sign``); the median
    midpoint and window with 95 % bootstrap intervals over the seeds that detected it.

    ``per_run`` has one row per (run, metric) with the PhaseChange fields (+ ``loss_bump_in_window``).
    """
    by = [c for c in by if c in per_run.columns]
    rows = []
    for key, g in per_run.groupby(by, sort=True):
        d = g[g["detected"].astype(bool)]
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        p, q = g["p_value"].astype(float), g["opposite_p_value"].astype(float)
        row.update(n_runs=len(g), n_detected=len(d), same_sign=bool(((p <= q) | q.isna()).all()),
                   p_combined=stouffer(p.fillna(1.0)))
        for col in ("mid_step", "start_step", "end_step"):
            m, lo, hi = median_interval(d[col].astype(float))
            row.update({f"{col}_median": m, f"{col}_lo": lo, f"{col}_hi": hi})
        if "loss_bump_in_window" in d:
            row["n_loss_bump"] = int(d["loss_bump_in_window"].fillna(False).astype(bool).sum())
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    groups = out.groupby([c for c in by if c != "metric"], sort=False) if len(by) > 1 else [(None, out)]
    out["p_holm"] = math.nan
    for _, g in groups:
        out.loc[g.index, "p_holm"] = holm(g["p_combined"])
    out["detected"] = (out["p_holm"] <= alpha) & out["same_sign"] & (out["n_detected"] > 0)
    return out


def format_summary(summary: pd.DataFrame) -> str:
    """Human-readable lines: 'metric: phase change at step M [lo, hi] (window S -> E), p=..., k/n runs'."""

    def fmt(r, col):
        m = r[f"{col}_median"]
        if not math.isfinite(m):
            return "-"
        lo, hi = r[f"{col}_lo"], r[f"{col}_hi"]
        return f"{m:,.0f}" + (f" [{lo:,.0f}, {hi:,.0f}]" if r["n_detected"] > 1 and lo != hi else "")

    lines = []
    for r in summary.itertuples(index=False):
        r = r._asdict()
        prefix = f"[{r['shape']}] " if "shape" in r else ""
        p = f"p={r['p_combined']:.2g}" + (f", Holm {r['p_holm']:.2g}" if r["p_holm"] != r["p_combined"] else "")
        if not r["detected"]:
            why = "" if r["same_sign"] else ", a seed moves the other way"
            lines.append(f"{prefix}{r['metric']}: no phase change ({p}{why}; detected in "
                         f"{r['n_detected']}/{r['n_runs']} run(s))")
            continue
        bump = f", loss bump in {r['n_loss_bump']}" if "n_loss_bump" in r else ""
        lines.append(f"{prefix}{r['metric']}: phase change at step {fmt(r, 'mid_step')} (window "
                     f"{fmt(r, 'start_step')} -> {fmt(r, 'end_step')}), {p}, detected in "
                     f"{r['n_detected']}/{r['n_runs']} run(s){bump}")
    return "\n".join(lines)
