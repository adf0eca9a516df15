"""Phase-change detection on a metric-vs-step curve (numpy/scipy only: no torch).

Olsson et al. (2022, section "Argument 1") see induction heads form in a narrow window
of training where the induction score jumps, the in-context-learning score drops and the
training loss shows a small bump. This module finds that window on a curve sampled at
checkpoint steps.

Method
------
1. Drop NaNs, sort by step; with ``skip_initial_frac`` > 0, drop the checkpoints in that
   first fraction of the step range (a curve with an early-training transient, like the ICL
   score, which falls while the model first learns n-grams, long before any induction head;
   a single logistic would fit that transient instead of the phase change). Fewer than
   ``MIN_POINTS`` checkpoints: "none".
2. Robust smoothing: a running median of 3 (from 5 points on), which removes a single
   outlying checkpoint but keeps a sharp jump sharp.
3. Noise level: ``1.4826 * MAD(diff(y)) / sqrt(2)``, the median-absolute-deviation of the
   first differences of the raw curve. A jump is a few large differences among many small
   ones, so the MAD ignores it and measures only the checkpoint-to-checkpoint jitter.
4. Fit a four-parameter logistic to the smoothed curve,
   ``y = lo + amp / (1 + exp(-(step - mid) / width))``, with ``scipy.optimize.least_squares``
   (soft-L1 loss, scale = noise level, so remaining outliers pull little), steps rescaled to
   [0, 1], ``mid`` bounded to the observed range, ``width`` to [1e-4, 1] of it, and started
   from several midpoints (where the smoothed curve is steepest, and a grid); the best fit
   wins. ``amp`` has a sign: a falling curve (the ICL score) fits with ``amp < 0``.
5. Accept the fit only if it is a real transition: ``|amp| >= min_amplitude`` (in the
   metric's units, from config), ``|amp| >= min_snr * noise``, R^2 of the fit against the
   raw curve ``>= min_r2``, and the 10%->90% window no wider than ``max_window_frac`` of the
   observed step range (a straight trend over the whole run is not a phase change).
   Otherwise the answer is "none" with the reason.

Reported: ``mid_step`` (where the fitted curve changes fastest: the logistic's midpoint),
``start_step``/``end_step`` (where the fit crosses 10% and 90% of its amplitude, i.e.
``mid -/+ ln(9) * width``), and the fit's ``lo``, ``amp``, ``r2``, ``noise``.

Loss bump: inside the window (widened to the nearest checkpoint on each side, so coarse
checkpoints still count), the largest rise of the loss above its running minimum so far:
``max_j (loss_j - min_{i<j} loss_i)``. A loss that only falls gives 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

MIN_POINTS = 4  # a 4-parameter logistic needs at least 4 checkpoints
LN9 = math.log(9.0)  # 10% -> 90% of a logistic spans mid +/- ln(9) * width


@dataclass
class PhaseChange:
    """The detected transition of one curve (NaN fields and a ``reason`` when none)."""

    metric: str
    detected: bool
    mid_step: float = math.nan
    start_step: float = math.nan
    end_step: float = math.nan
    lo: float = math.nan
    amp: float = math.nan
    width_steps: float = math.nan
    r2: float = math.nan
    noise: float = math.nan
    n_points: int = 0
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _running_median3(y: np.ndarray) -> np.ndarray:
    if len(y) < 5:
        return y.copy()
    out = y.copy()
    out[1:-1] = np.median(np.stack([y[:-2], y[1:-1], y[2:]]), axis=0)
    return out


def noise_level(y: np.ndarray) -> float:
    """Robust checkpoint-to-checkpoint jitter: 1.4826 * MAD(diff(y)) / sqrt(2)."""
    d = np.diff(np.asarray(y, dtype=float))
    if len(d) == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(2.0))


def _logistic(u: np.ndarray, lo: float, amp: float, mid: float, width: float) -> np.ndarray:
    z = np.clip((u - mid) / width, -60.0, 60.0)  # avoid exp overflow warnings on sharp fits
    return lo + amp / (1.0 + np.exp(-z))


def _fit(u: np.ndarray, y: np.ndarray, scale: float):
    """Best logistic fit of y(u), u in [0, 1], from several starting midpoints."""
    k = max(1, len(y) // 4)
    lo0, hi0 = float(np.median(y[:k])), float(np.median(y[-k:]))
    amp0 = hi0 - lo0 if hi0 != lo0 else float(y.max() - y.min()) or 1e-3
    slope = np.gradient(y, u) if len(np.unique(u)) == len(u) else np.zeros_like(y)
    starts = {float(u[int(np.argmax(np.abs(slope)))])} | {0.1, 0.3, 0.5, 0.7, 0.9}
    best = None
    for mid0 in sorted(starts):
        x0 = [lo0, amp0, min(max(mid0, 1e-3), 1 - 1e-3), 0.05]
        try:
            res = least_squares(
                lambda p: _logistic(u, *p) - y, x0,
                bounds=([-np.inf, -np.inf, 0.0, 1e-4], [np.inf, np.inf, 1.0, 1.0]),
                loss="soft_l1", f_scale=max(scale, 1e-6), max_nfev=2000,
            )
        except (ValueError, np.linalg.LinAlgError):
            continue
        sse = float(np.sum((_logistic(u, *res.x) - y) ** 2))
        if best is None or sse < best[1]:
            best = (res.x, sse)
    return None if best is None else best[0]


def detect_phase_change(steps, values, metric: str = "", *, min_amplitude: float = 0.05,
                        min_snr: float = 4.0, min_r2: float = 0.5,
                        max_window_frac: float = 1.0, skip_initial_frac: float = 0.0) -> PhaseChange:
    """Find the phase change of one curve (see the module docstring for the method).

    ``steps`` and ``values`` are 1-D sequences of equal length (any order; NaNs dropped).
    Returns a PhaseChange; ``detected=False`` with a ``reason`` when there is none.
    """
    s = np.asarray(steps, dtype=float)
    y = np.asarray(values, dtype=float)
    keep = np.isfinite(s) & np.isfinite(y)
    s, y = s[keep], y[keep]
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    if not 0.0 <= skip_initial_frac < 1.0:
        raise ValueError(f"skip_initial_frac must lie in [0, 1), got {skip_initial_frac}")
    if skip_initial_frac > 0 and len(s):
        later = s >= s[0] + skip_initial_frac * (s[-1] - s[0])
        s, y = s[later], y[later]
    out = PhaseChange(metric=metric, detected=False, n_points=len(s))
    if len(s) < MIN_POINTS:
        out.reason = f"only {len(s)} checkpoints (need {MIN_POINTS})"
        return out
    span = float(s[-1] - s[0])
    if span <= 0:
        out.reason = "all checkpoints at one step"
        return out

    u = (s - s[0]) / span  # steps rescaled to [0, 1] for a well-conditioned fit
    noise = noise_level(y)
    out.noise = noise
    smooth = _running_median3(y)
    params = _fit(u, smooth, scale=noise if noise > 0 else float(np.std(y)) or 1e-3)
    if params is None:
        out.reason = "logistic fit failed"
        return out
    lo, amp, mid, width = (float(p) for p in params)
    fitted = _logistic(u, lo, amp, mid, width)
    sst = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((y - fitted) ** 2)) / sst if sst > 0 else 0.0
    out.lo, out.amp, out.r2 = lo, amp, r2
    out.mid_step = s[0] + mid * span
    out.width_steps = width * span
    out.start_step = out.mid_step - LN9 * out.width_steps
    out.end_step = out.mid_step + LN9 * out.width_steps

    if abs(amp) < min_amplitude:
        out.reason = f"amplitude {abs(amp):.3g} below min_amplitude {min_amplitude:g}"
    elif noise > 0 and abs(amp) < min_snr * noise:
        out.reason = f"amplitude {abs(amp):.3g} below {min_snr:g} x noise {noise:.3g}"
    elif r2 < min_r2:
        out.reason = f"logistic explains R^2={r2:.2f} < {min_r2:g} of the curve"
    elif 2 * LN9 * width > max_window_frac:
        out.reason = "gradual trend over the whole run, no window (10%->90% wider than the range)"
    else:
        out.detected = True
    if not out.detected:  # keep the fit diagnostics but no window
        out.mid_step = out.start_step = out.end_step = math.nan
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


def summarize_across_seeds(per_run: pd.DataFrame, by: tuple[str, ...] = ("shape", "metric")) -> pd.DataFrame:
    """Mean and sd across runs (seeds) of each metric's phase-change steps.

    ``per_run`` has one row per (run, metric) with the PhaseChange fields (+ ``loss_bump_in_window``).
    Only detected runs enter the means; ``n_detected`` of ``n_runs`` says how many.
    """
    by = [c for c in by if c in per_run.columns]
    rows = []
    for key, g in per_run.groupby(by, sort=True):
        d = g[g["detected"].astype(bool)]
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        row.update(n_runs=len(g), n_detected=len(d))
        for col in ("mid_step", "start_step", "end_step"):
            vals = d[col].astype(float)
            row[f"{col}_mean"] = float(vals.mean()) if len(vals) else math.nan
            row[f"{col}_sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
        if "loss_bump_in_window" in d:
            row["n_loss_bump"] = int(d["loss_bump_in_window"].fillna(False).astype(bool).sum())
        rows.append(row)
    return pd.DataFrame(rows)


def format_summary(summary: pd.DataFrame) -> str:
    """Human-readable lines: 'metric: phase change at step M +/- sd (window start S +/- sd), k/n runs'."""

    def pm(mean, sd):
        if not math.isfinite(mean):
            return "-"
        return f"{mean:,.0f}" + (f" ± {sd:,.0f}" if math.isfinite(sd) else "")

    lines = []
    for r in summary.itertuples(index=False):
        r = r._asdict()
        prefix = f"[{r['shape']}] " if "shape" in r else ""
        if r["n_detected"] == 0:
            lines.append(f"{prefix}{r['metric']}: no phase change detected in {r['n_runs']} run(s)")
            continue
        bump = f", loss bump in {r['n_loss_bump']}" if "n_loss_bump" in r else ""
        lines.append(
            f"{prefix}{r['metric']}: fastest change at step {pm(r['mid_step_mean'], r['mid_step_sd'])} "
            f"(window {pm(r['start_step_mean'], r['start_step_sd'])} -> {pm(r['end_step_mean'], r['end_step_sd'])}), "
            f"detected in {r['n_detected']}/{r['n_runs']} run(s){bump}")
    return "\n".join(lines)
