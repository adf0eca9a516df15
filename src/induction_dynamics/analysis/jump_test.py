"""Does a curve sampled at checkpoint steps make a sudden move? A likelihood-ratio test (numpy only).

``phase.py`` asks one question of a metric's curve: is there a sudden rise (or fall) beyond what
a smooth monotone curve in correlated noise explains? ``jump_test`` answers for both signs with a
p-value from a parametric bootstrap of the no-jump model, and the fitted jump.

Models, in x = log(1 + step) rescaled to [0, 1] (the history is log-spaced early and linear late,
so a narrow window in log-steps is narrow wherever it lies):

    H0  y = a + b u + c x + d g + noise
                                      u the step and x the log-step rescaled to [0, 1], g one of
                                      ``_shapes``: 1 - exp(-k u), 1 - exp(-k x) or the power law
                                      exp(k (x - 1)), k on ``RATES``: smooth curves (monotone or
                                      nearly so). A rise that starts at the first checkpoint and
                                      levels off is H0.
    H1  H0 + amp sigmoid((x - mid) / w)
                                      a logistic with at least ``MIN_BEFORE`` checkpoints before its
                                      midpoint (a plateau to rise from) and ``MIN_AFTER`` after it,
                                      a 10-90 % width 2 ln(9) w of at most ``MAX_WIDTH`` of the
                                      x range (so H1 cannot pass for a slow trend), ``amp`` of the
                                      tested sign

    noise ~ N(0, s^2 C), C one of ``noise_models``: white, AR(1) (with or without a white share),
    or a random walk over checkpoints or over steps (with or without a white share)

Every model is linear given its grid point (shape, mid, w, C), so a fit is a projection on a
precomputed orthonormal basis in whitened coordinates, and s^2 is profiled out:
log L = -n/2 ln RSS_C - 1/2 ln|C|. The statistic is twice the log-likelihood ratio, each side
maximised over its whole grid (noise model included). The sign constraint is exact: when the free
amplitude has the wrong sign the constrained optimum is amp = 0, the H0 fit of that shape.

Null distribution: curves simulated from the H0 fit (its shape and its noise model, chosen by
maximum likelihood under H0, so that a random walk is simulated as a random walk), each refitted
on the whole grid. Simulation stops once ``STOP_AFTER`` simulated statistics reach the observed
one (Besag & Clifford 1991): cheap where there is nothing to find. The false-positive rate this
gives on simulated nulls, and the power on simulated phase changes, are in docs/phase_change.md
(``benchmarks/phase_calibration.py`` measures them; a test checks them at a smaller size).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

LN9 = math.log(9.0)          # the 10 %-90 % span of a logistic is 2 ln(9) widths
MIN_BEFORE, MIN_AFTER = 3, 2  # checkpoints before / after the midpoint
MAX_WIDTH = 0.12             # largest 10-90 % width, as a fraction of the log-step range
WIDTHS = np.array([0.02, 0.05, 0.1, MAX_WIDTH]) / (2 * LN9)
RATES = np.geomspace(0.5, 80.0, 16)  # curvatures of the exponential shapes
MIN_POINTS = MIN_BEFORE + MIN_AFTER + 5  # H1: 5 linear parameters, a (mid, w) grid point, 3 left for the noise
STOP_AFTER = 20              # Besag-Clifford: stop simulating after this many exceedances
BATCH = 64                   # simulated curves per projection
DIRECTIONS = ("rise", "fall")


def log_step(steps) -> np.ndarray:
    return np.log1p(np.maximum(np.asarray(steps, dtype=float), 0.0))


def _logistic(x: np.ndarray, mid: float, w: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip((x - mid) / w, -60.0, 60.0)))


def _shapes(tu: np.ndarray, tx: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Exponential approach in the step (a rise from step 0 that levels off), in the log-step (a
    log-saturating curve), and exp(k (x - 1)) = ((1 + step) / (1 + last step))^(k / ln(1 + last
    step)) in the log-step: a power law of the step."""
    return ([(f"saturating (k={k:.3g}) in step", 1.0 - np.exp(-k * tu)) for k in RATES]
            + [(f"saturating (k={k:.3g}) in log-step", 1.0 - np.exp(-k * tx)) for k in RATES]
            + [(f"power law (k={k:.3g})", np.exp(k * (tx - 1.0))) for k in RATES])


def noise_models(steps: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(name, correlation matrix up to scale) of every noise model the test profiles over."""
    n = len(steps)
    i = np.arange(n, dtype=float)
    u = (steps - steps[0]) / max(float(steps[-1] - steps[0]), 1e-12)
    eye = np.eye(n)
    out = [("white", eye)]
    for phi in (0.5, 0.8, 0.95):
        ar = phi ** np.abs(i[:, None] - i[None, :])
        out += [(f"AR(1) phi={phi}", ar), (f"AR(1) phi={phi} + white", 0.5 * ar + 0.5 * eye)]
    for name, k in (("random walk over checkpoints", np.minimum(i[:, None], i[None, :]) + 1.0),
                    ("random walk over steps", np.minimum(u[:, None], u[None, :]) + 1.0 / n)):
        k = k / np.mean(np.diag(k))
        out += [(name, k), (f"{name} + white", 0.9 * k + 0.1 * eye), (f"{name} + white (1:1)", 0.5 * k + 0.5 * eye)]
    return out


class _Design:
    """Every H0 shape and H1 (shape, mid, w) design of one set of steps, whitened by every noise model."""

    def __init__(self, steps: tuple[float, ...]):
        s = np.asarray(steps, dtype=float)
        n = self.n = len(s)
        x = log_step(s)
        self.x0, self.span = float(x[0]), max(float(x[-1] - x[0]), 1e-12)
        tx = (x - self.x0) / self.span
        tu = (s - s[0]) / max(float(s[-1] - s[0]), 1e-12)
        shapes = _shapes(tu, tx)
        self.shape_names = [name for name, _ in shapes]
        ones = np.ones(n)
        # every H0 shape rides on a line in the step and a line in the log-step
        self.X0 = np.stack([np.stack([ones, tu, tx, g], axis=1) for _, g in shapes])   # (S, n, P0)
        self.p0 = self.X0.shape[2]
        # midpoints halfway between checkpoints, MIN_BEFORE checkpoints before and MIN_AFTER after
        mids = (tx[MIN_BEFORE - 1:n - MIN_AFTER] + tx[MIN_BEFORE:n - MIN_AFTER + 1]) / 2.0
        self.grid = [(si, m, w) for si in range(len(shapes)) for m in mids for w in WIDTHS]
        self.tx = tx
        self.noise = noise_models(s)
        self.whiten, self.logdet, self.q0, self.q1, self.r1 = [], [], [], [], []
        for _, c in self.noise:
            chol = np.linalg.cholesky(c)
            w = np.linalg.inv(chol)
            self.whiten.append(w)
            self.logdet.append(2.0 * float(np.sum(np.log(np.diag(chol)))))
            q0, _ = np.linalg.qr(w @ self.X0)
            q1, r1 = np.linalg.qr(w @ self._x1())
            # basis vectors mapped back to y-space: one matrix product per batch and noise model
            self.q0.append(q0.transpose(0, 2, 1).reshape(-1, n) @ w)
            self.q1.append(q1.transpose(0, 2, 1).reshape(-1, n) @ w)
            self.r1.append(r1[:, -1, -1])

    def _x1(self, g: int | None = None) -> np.ndarray:
        grid = self.grid if g is None else [self.grid[g]]
        return np.stack([np.concatenate([self.X0[si], _logistic(self.tx, m, w)[:, None]], axis=1)
                         for si, m, w in grid])

    def loglik(self, y: np.ndarray):
        """Profile log-likelihoods of a batch (B, n): H0's and each sign's H1, with the argmax
        (noise model, design) of each."""
        b, n = y.shape
        rows = np.arange(b)
        best0 = (np.full(b, -np.inf), np.zeros(b, int), np.zeros(b, int))
        best1 = {d: (np.full(b, -np.inf), np.zeros(b, int), np.zeros(b, int)) for d in DIRECTIONS}

        def keep(best, ll, j, g):
            better = ll > best[0]
            return (np.where(better, ll, best[0]), np.where(better, j, best[1]), np.where(better, g, best[2]))

        for j in range(len(self.noise)):
            const = -0.5 * self.logdet[j]
            rss0, rss1 = self.rss(y, j)
            g0 = rss0.argmin(axis=1)
            best0 = keep(best0, -0.5 * n * np.log(np.maximum(rss0[rows, g0], 1e-300)) + const, j, g0)
            for d in DIRECTIONS:
                g1 = rss1[d].argmin(axis=1)
                best1[d] = keep(best1[d], -0.5 * n * np.log(np.maximum(rss1[d][rows, g1], 1e-300)) + const, j, g1)
        return best0, best1

    def rss(self, y: np.ndarray, j: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Whitened residual sums of squares of a batch (B, n) under noise model ``j``: H0's per
        shape (B, S) and each sign's H1 per grid point (B, G), the amplitude's sign constrained."""
        b = y.shape[0]
        z = y @ self.whiten[j].T
        zz = np.einsum("bn,bn->b", z, z)[:, None]
        rss0 = zz - np.sum((y @ self.q0[j].T).reshape(b, -1, self.p0) ** 2, axis=-1)
        c1 = (y @ self.q1[j].T).reshape(b, -1, self.p0 + 1)
        base = zz - np.sum(c1[..., :-1] ** 2, axis=-1)
        jump = c1[..., -1]
        sign = np.sign(jump * self.r1[j])
        return rss0, {d: base - np.where(sign == s, jump ** 2, 0.0) for d, s in zip(DIRECTIONS, (1.0, -1.0))}

    def fit(self, y: np.ndarray, j: int, X: np.ndarray) -> tuple[np.ndarray, float]:
        """GLS coefficients of ``y`` on ``X`` under noise model ``j`` and the noise scale s."""
        w = self.whiten[j]
        beta, *_ = np.linalg.lstsq(w @ X, w @ y, rcond=None)
        r = w @ (y - X @ beta)
        return beta, math.sqrt(float(r @ r) / self.n)


@functools.lru_cache(maxsize=2)
def _design(steps: tuple[float, ...]) -> _Design:
    return _Design(steps)  # ~1 s and ~150 MB for 48 checkpoints; the runs of a sweep share their steps


@dataclass
class Jump:
    """The best H1 fit of one sign: y = H0 + a sigmoid((x - mid_x) / w_x), x = log(1 + step)."""

    direction: str
    statistic: float     # 2 ln(L1 / L0), >= 0
    p_value: float
    mid_x: float
    w_x: float
    fitted: np.ndarray   # the H1 curve at the steps (smooth curve + logistic)

    def step_at(self, frac: float) -> float:
        """The step where the logistic has covered ``frac`` of its amplitude."""
        return float(np.expm1(self.mid_x + self.w_x * math.log(frac / (1.0 - frac))))


@dataclass
class JumpTest:
    n: int
    null_shape: str      # the H0 fit the simulations start from
    null_noise: str
    rise: Jump
    fall: Jump

    def of(self, direction: str) -> Jump:
        return self.rise if direction == "rise" else self.fall

    @property
    def null(self) -> str:
        return f"{self.null_shape} + {self.null_noise} noise"


def jump_test(steps, y, *, n_sim: int = 500, seed: int = 0) -> JumpTest:
    """Test ``y(steps)`` (sorted, distinct, finite; at least ``MIN_POINTS``) for a sudden rise and a
    sudden fall. Each sign's p-value is (1 + exceedances) / (1 + simulations) over at most
    ``n_sim`` curves simulated from the H0 fit; 1 where H1 fits no better than H0."""
    s = np.asarray(steps, dtype=float)
    y = np.asarray(y, dtype=float)
    if len(s) < MIN_POINTS:
        raise ValueError(f"need at least {MIN_POINTS} checkpoints, got {len(s)}")
    d = _design(tuple(s.tolist()))
    (ll0, j0, g0), best1 = d.loglik(y[None])
    j0, g0 = int(j0[0]), int(g0[0])
    beta0, sd = d.fit(y, j0, d.X0[g0])
    f0 = d.X0[g0] @ beta0
    jumps = {}
    for direction, (ll1, j1, g1) in best1.items():
        x1 = d._x1(int(g1[0]))[0]
        beta, _ = d.fit(y, int(j1[0]), x1)
        _, mid, w = d.grid[int(g1[0])]
        jumps[direction] = Jump(direction, max(0.0, float(2.0 * (ll1[0] - ll0[0]))), 1.0,
                                d.x0 + mid * d.span, w * d.span, x1 @ beta)
    rng = np.random.default_rng(seed)
    chol = np.linalg.cholesky(d.noise[j0][1])
    exceed = dict.fromkeys(DIRECTIONS, 0)
    done = dict.fromkeys(DIRECTIONS, 0)
    # a curve H0 fits to rounding error (a noiseless line) has nothing to test: its likelihood ratio
    # compares residuals of ~1e-16, which BLAS builds round differently
    exact = sd <= 1e-9 * max(float(np.std(y)), 1e-300)
    pending = {k for k, j in jumps.items() if j.statistic > 1e-9 and not exact}
    while pending:
        sims = f0[None] + sd * rng.standard_normal((BATCH, d.n)) @ chol.T
        (l0, _, _), l1 = d.loglik(sims)
        for k in pending:
            exceed[k] += int(np.sum(2.0 * (l1[k][0] - l0) >= jumps[k].statistic - 1e-9))
            done[k] += BATCH
        pending = {k for k in pending if exceed[k] < STOP_AFTER and done[k] < n_sim}
    for k, j in jumps.items():
        if done[k]:
            j.p_value = (1 + exceed[k]) / (1 + done[k])
    return JumpTest(d.n, d.shape_names[g0], d.noise[j0][0], jumps["rise"], jumps["fall"])
