"""What every figure shares: saving in several formats, the phase window's shading, seed labels,
the mean-and-sd band across runs, a curve's standard-error band, the heatmap of heads x steps. matplotlib's ``Figure`` (no
pyplot global state), so plotting is safe in any process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from induction_dynamics.files import save_figure


def seed_of(df: pd.DataFrame, label: str) -> str:
    seeds = df["seed"].unique()
    return f"seed {seeds[0]}" if len(seeds) == 1 else label


def save(fig: Figure, out_dir: Path, name: str, formats, dpi: int) -> list[Path]:
    engine = fig.get_layout_engine()
    if engine is not None:  # solve the constrained layout once, not once per file format
        engine.execute(fig)
        fig.set_layout_engine("none")
    paths = []
    for fmt in formats:
        p = out_dir / f"{name}.{fmt}"
        save_figure(fig, p, dpi=dpi)
        paths.append(p)
    return paths


def windows(phase: pd.DataFrame | None, metric: str) -> dict[str, tuple[float, float, float]]:
    """{run: (start, mid, end)} of detected phase changes of ``metric``."""
    if phase is None or phase.empty:
        return {}
    d = phase[(phase["metric"] == metric) & phase["detected"].astype(bool)]
    return {r.run: (r.start_step, r.mid_step, r.end_step) for r in d.itertuples()}


def shade(ax, windows: dict, labels=None, color="tab:orange"):
    """Shade each run's window lightly and mark its midpoint; one legend entry."""
    first = True
    for run, (start, mid, end) in windows.items():
        if labels is not None and run not in labels:
            continue
        lo, hi = ax.get_xlim()
        ax.axvspan(max(start, lo), min(end, hi), color=color, alpha=0.12 if len(windows) > 1 else 0.2,
                   lw=0, label="phase-change window" if first else None)
        ax.axvline(mid, color=color, lw=0.8, ls="--")
        ax.set_xlim(lo, hi)
        first = False


def mean_sd(series: list[pd.Series]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Mean and sd across runs on the steps all runs share (None when < 2 runs or steps)."""
    if len(series) < 2:
        return None
    common = sorted(set.intersection(*(set(s.index) for s in series)))
    if len(common) < 2:
        return None
    m = np.stack([s.loc[common].to_numpy() for s in series])
    return np.asarray(common), m.mean(0), m.std(0, ddof=1)


def heatmap(ax, steps: np.ndarray, labels: list[str], values: np.ndarray, **kw):
    """heads x steps as cells; cell edges halfway between checkpoints, so uneven spacing stays honest."""
    if len(steps) > 1:
        mids = (steps[1:] + steps[:-1]) / 2
        edges = np.concatenate([[steps[0] - (mids[0] - steps[0])], mids, [steps[-1] + (steps[-1] - mids[-1])]])
    else:
        edges = np.array([steps[0] - 0.5, steps[0] + 0.5])
    im = ax.pcolormesh(edges, np.arange(len(labels) + 1), values, **kw)
    ax.set_yticks(np.arange(len(labels)) + 0.5, labels, fontsize=7)
    ax.invert_yaxis()  # layer 0 head 0 on top, as in TransformerLens's head plots
    ax.set_xlabel("training step")
    ax.set_ylabel("head (layer.head)")
    return im


def band(ax, x, value, stderr, color, alpha: float = 0.2) -> None:
    """Shade value ± stderr (the table's standard error) around a curve; steps without one stay bare."""
    x, value = np.asarray(x, dtype=float), np.asarray(value, dtype=float)
    err = np.asarray(pd.Series(stderr).reindex(x).to_numpy() if isinstance(stderr, pd.Series) else stderr, dtype=float)
    ok = np.isfinite(value) & np.isfinite(err)
    if ok.any():
        ax.fill_between(x, np.where(ok, value - err, np.nan), np.where(ok, value + err, np.nan), color=color,
                        alpha=alpha, lw=0)
