"""The phase detector's false-positive rate and power on simulated curves at the histories' spacing.

    OMP_NUM_THREADS=1 python benchmarks/phase_calibration.py [--n 100] [--spacing quickstart natural_text]
        [--nulls-only | --reference-only] [--family "random walk" "AR(1)"]

Every curve is sampled at the history steps of an experiment (``checkpoint.history_steps`` with
its ``max_iters`` and ``checkpoint.every``, log schedule) and fed to ``detect_phase_change`` with
``direction="rise"`` and ``min_change=0`` (the test alone; a metric's ``min_change`` only removes
detections). Null families (no phase change; the truth is known):

    flat            0.1 + white noise
    linear          0.1 + 0.5 u + white noise                      (u: the step rescaled to [0, 1])
    saturating      0.1 + 0.5 (1 - exp(-u / tau)), tau ~ U(0.05, 0.4): a rise from step 0, no plateau
    power           0.1 + 0.5 u^a, a ~ U(0.3, 3)
    log-saturating  0.1 + 0.5 (1 - exp(-x / tau)), x the log-step rescaled, tau ~ U(0.1, 0.5)
    random walk     0.1 + cumulative sum of N(0, sigma) over checkpoints
    AR(1)           the saturating curve (tau 0.2) + AR(1) noise, phi 0.7, innovations N(0, sigma)

white noise N(0, sigma), sigma 0.01 (a trend 50x the noise: the hardest for the smooth null to
fit) and 0.05 for the saturating family; the test is invariant to the scale of a flat curve and
of a walk (sigma 0.03). Phase changes: 0.1 + a logistic
in the step, amplitude 4 or 6 sigma (sigma 0.03), midpoint ~ U(0.2, 0.8) of the last step, 10-90 %
width 10 % or 20 % of the step range, white noise; found when detected with its midpoint inside
the true 10-90 % window. Rates at the detector's threshold (``phase.ALPHA``) and at 0.05. Prints
the table of docs/phase_change.md. Run it alone (~30 min at --n 40 on one core; ``--nulls-only`` at
--n 200 takes ~30 min a spacing, since a null curve stops simulating early).

Then two reference tests that keep the detector's smooth H0 (``--reference-only`` prints them
alone, in ~1 min): "white known", the same likelihood ratio and logistic grid told that the noise
is white with a known sd (so it need not guard against walks or AR(1) noise), thresholded at the
``ALPHA`` quantile of its statistic on simulated flat and saturating (50x the noise) nulls; and
"location known", a one-sided z-test that also knows the sigmoid's midpoint and width. The second
bounds the power of any test that holds its level on every smooth H0 curve; the first is what a
fixed threshold gets when it must search for the window (the detector's threshold adapts to each
curve, so it can come out above it).
"""

from __future__ import annotations

import argparse
import math
import time
from statistics import NormalDist

import numpy as np

from induction_dynamics.analysis.jump_test import _design
from induction_dynamics.analysis.phase import ALPHA, detect_phase_change
from induction_dynamics.checkpoint import history_steps

SPACINGS = {"quickstart": (4000, 100), "natural_text": (56000, 2000)}  # (max_iters, checkpoint.every)
NULLS = [("flat", 0.03), ("random walk", 0.03), ("linear", 0.01), ("saturating", 0.01), ("saturating", 0.05),
         ("power", 0.01), ("log-saturating", 0.01), ("AR(1)", 0.01), ("AR(1)", 0.03)]
RISES = [(4.0, 0.1), (4.0, 0.2), (6.0, 0.1), (6.0, 0.2)]  # (amplitude / sigma, 10-90 % width / step range)
RISE_SIGMA = 0.03


def spacing(name: str) -> np.ndarray:
    max_iters, every = SPACINGS[name]
    return np.asarray(history_steps(max_iters, every, "log"), dtype=float)


def null_curve(rng, s: np.ndarray, family: str, sigma: float) -> np.ndarray:
    n = len(s)
    u = (s - s[0]) / (s[-1] - s[0])
    x = np.log1p(s) / np.log1p(s[-1])
    white = rng.normal(0.0, sigma, n)
    if family == "flat":
        return 0.1 + white
    if family == "linear":
        return 0.1 + 0.5 * u + white
    if family == "saturating":
        return 0.1 + 0.5 * (1 - np.exp(-u / rng.uniform(0.05, 0.4))) + white
    if family == "power":
        return 0.1 + 0.5 * u ** rng.uniform(0.3, 3.0) + white
    if family == "log-saturating":
        return 0.1 + 0.5 * (1 - np.exp(-x / rng.uniform(0.1, 0.5))) + white
    if family == "random walk":
        return 0.1 + np.cumsum(white)
    if family == "AR(1)":
        phi, z = 0.7, np.empty(n)
        z[0] = white[0] / math.sqrt(1 - phi * phi)
        for i in range(1, n):
            z[i] = phi * z[i - 1] + white[i]
        return 0.1 + 0.5 * (1 - np.exp(-u / 0.2)) + z
    raise ValueError(family)


def rise_curve(rng, s: np.ndarray, amp_over_sigma: float, width_frac: float, sigma: float = RISE_SIGMA,
               noisy: bool = True):
    """(curve, true 10 % step, true 90 % step)."""
    mid = rng.uniform(0.2, 0.8) * s[-1]
    w = width_frac * (s[-1] - s[0]) / (2 * math.log(9))
    y = 0.1 + amp_over_sigma * sigma / (1 + np.exp(-(s - mid) / w))
    if noisy:
        y = y + rng.normal(0.0, sigma, len(s))
    return y, mid - math.log(9) * w, mid + math.log(9) * w


LEVELS = (ALPHA, 0.05)  # the detector's threshold, and the conventional 5 %


def p_values(s, family, sigma, n, seed=0) -> np.ndarray:
    """The rise's p-value of each of ``n`` null curves of ``family``."""
    rng = np.random.default_rng(seed)
    return np.array([detect_phase_change(s, null_curve(rng, s, family, sigma), direction="rise", min_change=0.0,
                                         alpha=1.0, seed=i).p_value for i in range(n)])


def rise_p_values(s, amp_over_sigma, width_frac, n, seed=0) -> np.ndarray:
    """The rise's p-value of each of ``n`` simulated phase changes; 1 where the midpoint found lies
    outside the true 10-90 % window (a detection in the wrong place is not a success)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        y, lo, hi = rise_curve(rng, s, amp_over_sigma, width_frac)
        pc = detect_phase_change(s, y, direction="rise", min_change=0.0, alpha=1.0, seed=i)
        out.append(pc.p_value if lo <= pc.mid_step <= hi else 1.0)
    return np.array(out)


def false_positive_rate(s, family, sigma, n, seed=0, level=ALPHA) -> float:
    return float(np.mean(p_values(s, family, sigma, n, seed) <= level))


def power(s, amp_over_sigma, width_frac, n, seed=0, level=ALPHA) -> float:
    return float(np.mean(rise_p_values(s, amp_over_sigma, width_frac, n, seed) <= level))


def _white(d) -> int:
    return [name for name, _ in d.noise].index("white")


def _known_white_statistic(d, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RSS(H0) - RSS(H1, rise) of a batch (B, n) in units of the known noise variance, and each
    curve's H1 midpoint step."""
    rss0, rss1 = d.rss(y, _white(d))
    g = rss1["rise"].argmin(axis=1)
    mid_step = np.expm1(d.x0 + np.array([d.grid[i][1] for i in g]) * d.span)
    return rss0.min(axis=1) - rss1["rise"][np.arange(len(y)), g], mid_step


def white_known_power(s, amp_over_sigma, width_frac, n, seed=0, level=ALPHA, n_null=4000) -> float:
    """The power of the "white known" test (module docstring), midpoint inside the true window."""
    d, rng = _design(tuple(s.tolist())), np.random.default_rng(seed)
    crit = max(np.quantile(_known_white_statistic(d, np.stack(  # in units of the noise sd
        [null_curve(rng, s, family, sigma) / sigma for _ in range(n_null)]))[0], 1.0 - level)
        for family, sigma in (("flat", 1.0), ("saturating", 0.01)))
    curves = [rise_curve(rng, s, amp_over_sigma, width_frac, sigma=1.0) for _ in range(n)]
    stat, mid = _known_white_statistic(d, np.stack([y for y, _, _ in curves]))
    inside = np.array([lo <= m <= hi for m, (_, lo, hi) in zip(mid, curves)])
    return float(np.mean((stat > crit) & inside))


def known_location_power(s, amp_over_sigma, width_frac, n, seed=0, level=ALPHA) -> float:
    """The power of a one-sided z-test that also knows the sigmoid's midpoint and width: its
    noncentrality is the part of the noiseless sigmoid that the closest smooth H0 curve leaves over
    (the closest null is the hardest, so no test valid against all of H0 does better)."""
    d, rng = _design(tuple(s.tolist())), np.random.default_rng(seed)
    z, out = NormalDist(), []
    for _ in range(n):
        clean = rise_curve(rng, s, amp_over_sigma, width_frac, sigma=1.0, noisy=False)[0]
        resid = float(d.rss(clean[None], _white(d))[0].min())
        out.append(z.cdf(math.sqrt(max(resid, 0.0)) - z.inv_cdf(1.0 - level)))
    return float(np.mean(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="curves per family")
    ap.add_argument("--spacing", nargs="+", default=list(SPACINGS), choices=list(SPACINGS))
    only = ap.add_mutually_exclusive_group()  # together they would print nothing
    only.add_argument("--reference-only", action="store_true", help="print only the two reference tests")
    only.add_argument("--nulls-only", action="store_true", help="only the null rows (a false-positive rate needs more "
                    "curves than a power, and a null curve stops simulating early)")
    ap.add_argument("--family", nargs="+", choices=sorted({f for f, _ in NULLS}),
                    help="only these null families (and no phase-change rows): more curves where a rate is close to 5 %%")
    args = ap.parse_args()
    if args.family and args.reference_only:
        ap.error("--family picks null rows, which --reference-only does not print")
    args.nulls_only = args.nulls_only or args.family is not None
    se = lambda p: math.sqrt(max(p * (1 - p), 1e-12) / args.n)  # noqa: E731
    head = " | ".join(f"rate at p <= {a:g} (± se)" for a in LEVELS)
    for name in args.spacing if not args.reference_only else ():
        s = spacing(name)
        print(f"\n{name}: {len(s)} checkpoints, steps 0..{s[-1]:.0f}, {args.n} curves per row\n")
        print(f"| curves | sigma | {head} |\n|---|---|" + "---|" * len(LEVELS))
        rows = [(f"null: {f}", sig, lambda f=f, sig=sig: p_values(s, f, sig, args.n)) for f, sig in NULLS
                if args.family is None or f in args.family]
        rows += [(f"phase change: {k:g} x sigma, 10-90 % over {w:.0%} of the steps", RISE_SIGMA,
                  lambda k=k, w=w: rise_p_values(s, k, w, args.n)) for k, w in RISES if not args.nulls_only]
        for label, sigma, run in rows:
            t = time.perf_counter()
            p = run()
            rates = " | ".join(f"{np.mean(p <= a):.3f} ± {se(np.mean(p <= a)):.3f}" for a in LEVELS)
            print(f"| {label} | {sigma:g} | {rates} |  ({time.perf_counter() - t:.0f} s)", flush=True)
    if args.nulls_only:
        return
    print(f"\nreference tests at p <= {ALPHA:g} (2,000 curves per cell): the test that knows the noise is white; "
          "the one that also knows where the sigmoid is\n")
    print("| phase change | " + " | ".join(f"{n}: white known | {n}: location known" for n in args.spacing)
          + " |\n|---|" + "---|---|" * len(args.spacing))
    for k, w in RISES:
        cells = " | ".join(f"{white_known_power(spacing(name), k, w, 2000):.3f} | "
                           f"{known_location_power(spacing(name), k, w, 2000):.3f}" for name in args.spacing)
        print(f"| {k:g} x sigma, 10-90 % over {w:.0%} of the steps | {cells} |", flush=True)

if __name__ == "__main__":
    main()
