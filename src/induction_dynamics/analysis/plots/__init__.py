"""The figures, drawn from the saved tables only (matplotlib; no torch, no model).

``make_plots`` draws every figure whose data is in a run's (or a sweep's) tables:

- ``curves``: ``induction_heatmap``, ``induction_score_max``, ``loss_icl`` (the Olsson figure),
  ``patching``, ``logit_lens``, ``token_loss_pca``
- ``circuit``: ``composition`` (the previous-token head into the induction head), ``llc``
- ``attention``: ``attention_over_training`` (drawn by the outputs stage, from the saved
  patterns) and CircuitsVis's interactive view

``style`` holds what they share (saving, the phase window's shading, labels, bands).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from induction_dynamics.analysis.plots.circuit import plot_composition, plot_llc
from induction_dynamics.analysis.plots.curves import (
    plot_induction_heatmap,
    plot_induction_max,
    plot_logit_lens,
    plot_loss_icl,
    plot_patching,
    plot_token_loss_pca,
)
from induction_dynamics.analysis.table import circuit_composition

PLOT_NAMES = ["induction_heatmap", "induction_score_max", "loss_icl", "patching", "logit_lens",
              "token_loss_pca", "composition"]

def make_plots(runs: dict[str, pd.DataFrame], tokens: dict[str, pd.DataFrame], phase: pd.DataFrame | None,
               out_dir: str | Path, *, formats=("png", "pdf"), dpi: int = 120,
               loss_metric: str = "text_loss") -> tuple[list[Path], list[str]]:
    """Draw every plot whose data is in the tables; returns (files written, skipped-plot notes)."""
    out_dir = Path(out_dir)
    present = set().union(*(set(df["metric"].unique()) for df in runs.values()))
    paths, skipped = [], []

    def need(name, *metrics):
        missing = [m for m in metrics if m not in present]
        if missing:
            skipped.append(f"{name}: no {', '.join(missing)} in the table (metric not in suite.metrics)")
        return not missing

    if need("induction_heatmap", "induction_score"):
        paths += plot_induction_heatmap(runs, out_dir, formats, dpi)
        paths += plot_induction_max(runs, phase, out_dir, formats, dpi)
    if need("loss_icl", "icl_score"):
        paths += plot_loss_icl(runs, phase, loss_metric, out_dir, formats, dpi)
    if need("patching", "patch_resid", "patch_head"):
        paths += plot_patching(runs, out_dir, formats, dpi)
    if need("logit_lens", "logit_lens_prob"):
        paths += plot_logit_lens(runs, out_dir, formats, dpi)
    if need("composition", "composition_baseline", "induction_score", "previous_token_score"):
        if any(circuit_composition(df) is not None for df in runs.values()):
            paths += plot_composition(runs, phase, out_dir, formats, dpi)
        else:
            skipped.append("composition: no head pair (a one-layer model)")
    if "llc" in present:  # opt-in metric: no note when it was not asked for
        paths += plot_llc(runs, phase, out_dir, formats, dpi)
    if not any(r in tokens and len(tokens[r]) for r in runs):
        skipped.append("token_loss_pca: no per-token losses (token_loss not in suite.metrics)")
    else:
        paths += plot_token_loss_pca(runs, tokens, out_dir, formats, dpi)
    return paths, skipped
