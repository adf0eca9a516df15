"""The attention-over-training figure: the induction head and its previous-token partner, seen at
checkpoints before, inside and after the phase window; and CircuitsVis's interactive view.

From the saved patterns (``analysis/attention.py``), the tidy table and the phase table: the
induction head and its previous-token partner of ``table.induction_circuit`` (top
``induction_score`` in layer >= 1 at the last checkpoint; top ``previous_token_score`` in an
earlier layer), at the last checkpoint before the window's start, the one nearest its midpoint
and the first after its end (the ``induction_score_max`` window; without a window: the first,
middle and last checkpoints). ``attention_html`` writes CircuitsVis's interactive view of every
head at one checkpoint (optional: needs ``circuitsvis``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from induction_dynamics import run_dir as layout
from induction_dynamics.analysis.attention import AttentionHistory, load_history
from induction_dynamics.analysis.plots.style import save
from induction_dynamics.analysis.table import induction_circuit
from induction_dynamics.errors import AnalysisError
from induction_dynamics.files import write_text

FIGURE = "attention_over_training"
WINDOW_METRIC = "induction_score_max"


def choose_steps(steps, phase: pd.DataFrame | None) -> tuple[list[tuple[str, int]], bool]:
    """([(role, step), ...] before / inside / after the window, whether a window was detected)."""
    steps = np.sort(np.asarray(steps))
    row = None
    if phase is not None and not phase.empty:
        d = phase[(phase["metric"] == WINDOW_METRIC) & phase["detected"].astype(bool)]
        row = d.iloc[0] if len(d) else None
    if row is None:
        picks = [("first", steps[0]), ("middle", steps[len(steps) // 2]), ("last", steps[-1])]
    else:
        before = steps[steps < row["start_step"]]
        after = steps[steps > row["end_step"]]
        picks = [("before", before[-1] if len(before) else steps[0]),
                 ("inside", steps[int(np.argmin(np.abs(steps - row["mid_step"])))]),
                 ("after", after[0] if len(after) else steps[-1])]
    out, seen = [], set()
    for role, s in picks:  # coarse checkpoints: one panel per step
        if int(s) not in seen:
            seen.add(int(s))
            out.append((role, int(s)))
    return out, row is not None


def _panel(ax, pattern: np.ndarray, labels: list[str], title: str, xlabels: bool = True, ylabels: bool = True):
    """One head's (T, T) pattern with the tokens on the axes (tick labels are most of the drawing
    time, so a grid labels only its outer axes)."""
    im = ax.imshow(pattern, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ticks = np.arange(len(labels))
    size = 5 if len(labels) <= 40 else 3.5
    ax.set_xticks(ticks, labels if xlabels else [], fontsize=size, rotation=90)
    ax.set_yticks(ticks, labels if ylabels else [], fontsize=size)
    ax.tick_params(length=1.5, pad=1)
    ax.set_title(title, fontsize=8)
    return im


def plot_attention_over_training(table: pd.DataFrame, phase: pd.DataFrame | None, hist: AttentionHistory | None,
                                 out_dir: Path, formats, dpi: int):
    """(files, [(W&B key, panel PNG, step), ...], note): the figure, its panels one PNG each, or a note why not."""
    heads = induction_circuit(table) if hist is not None else None
    if heads is None:
        why = ("no saved attention patterns" if hist is None else
               "no induction circuit (needs induction_score, previous_token_score and two layers)")
        return [], [], f"{FIGURE}: {why}"
    top, partner = heads
    picks, detected = choose_steps(hist.steps, phase)
    rows = [("previous_token_head", partner, "previous-token"), ("induction_head", top, "induction")]
    n, m = len(picks), len(rows)
    width, height = 3.0 * n + 1.6, 3.0 * m + 1.0  # inches: squares of 2.6 in, room for labels and colorbar
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(m, n, squeeze=False)
    fig.subplots_adjust(left=0.6 / width, right=1 - 1.2 / width, bottom=0.55 / height, top=1 - 0.45 / height,
                        wspace=0.12, hspace=0.16)
    panels, im = [], None
    for i, (key, (l, h), name) in enumerate(rows):
        for j, (role, step) in enumerate(picks):
            pattern = hist.at(step)[l, h]
            title = f"L{l}H{h} {name} · step {step:,} ({role})"
            im = _panel(axes[i, j], pattern, hist.labels, title, xlabels=i == m - 1, ylabels=j == 0)
            single = Figure(figsize=(4.2, 4))
            single.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.92)
            _panel(single.subplots(), pattern, hist.labels, title)
            panels.append((f"analysis/attention/{key}",
                           save(single, out_dir / FIGURE, f"L{l}H{h}_step_{step:06d}", ["png"], dpi)[0], step))
    for ax in axes[:, 0]:
        ax.set_ylabel("query")
    for ax in axes[-1]:
        ax.set_xlabel("key (attended to)")
    fig.colorbar(im, cax=fig.add_axes((1 - 0.95 / width, 0.2, 0.15 / width, 0.6)), label="attention")
    seeds = table["seed"].unique()
    where = "around the phase window" if detected else "(no phase window detected: first, middle, last checkpoint)"
    fig.suptitle(f"Attention on a repeated sequence {where}" + (f", seed {seeds[0]}" if len(seeds) == 1 and seeds[0] >= 0 else ""),
                 fontsize=10)
    return save(fig, out_dir, FIGURE, formats, dpi), panels, ""


def attention_html(patterns: np.ndarray, labels: list[str], path: str | Path, title: str = "") -> Path:
    """CircuitsVis's interactive view of (L, H, T, T) patterns, every head, as a self-contained
    HTML file (the JavaScript is inlined: it opens offline). Needs ``pip install circuitsvis``."""
    try:
        from circuitsvis.attention import attention_heads
    except ImportError as e:
        raise AnalysisError("the interactive attention view needs circuitsvis (pip install circuitsvis)") from e
    L, H, T, _ = patterns.shape
    view = attention_heads(attention=np.asarray(patterns, dtype=np.float32).reshape(L * H, T, T),
                           tokens=list(labels), attention_head_names=[f"L{l}H{h}" for l in range(L) for h in range(H)])
    return write_text(path, f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{title}</title></head>\n"
                      f"<body><h3>{title}</h3>\n{view.local_src}\n</body></html>\n")


def run_attention_html(run_dir: str | Path, step: int | None = None, out: str | Path | None = None) -> Path:
    """The interactive view of a run's checkpoint at ``step`` (None: the last) from its saved patterns;
    written to ``out`` or ``<run>/plots/attention_step_XXXXXX.html``."""
    run_dir = Path(run_dir)
    hist = load_history(run_dir)
    if hist is None:
        raise AnalysisError(f"no saved attention patterns in {layout.analysis_dir(run_dir)}: run analyze_checkpoints.py first")
    step = int(hist.steps.max()) if step is None else int(step)
    try:
        patterns = hist.at(step)
    except KeyError as e:
        raise AnalysisError(f"{run_dir}: {e.args[0]}") from None
    out = Path(out) if out is not None else run_dir / "plots" / f"attention_step_{step:06d}.html"
    return attention_html(patterns, hist.labels, out, title=f"{run_dir.name}: attention at step {step:,}")
