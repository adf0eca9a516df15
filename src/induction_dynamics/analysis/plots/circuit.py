"""Plots of how the induction circuit is built, from the saved tables only (no torch).

- ``composition``  K-, Q- and V-composition of the previous-token head into the induction
                    head (``table.induction_circuit``: picked at the last checkpoint) vs step,
                    with the random-matrix baseline; below, that pair's induction and
                    previous-token scores. Phase window shaded (Elhage et al. 2021).

- ``llc``          local learning coefficient (mean ± sd across SGLD chains) vs step, above
                    the max induction score; phase window shaded (Hoogland et al. 2024:
                    the induction stage ends where the LLC curve bends). Opt-in metric.
- ``llc_traces``   one run's SGLD chain losses vs SGLD step at a few checkpoints, burn-in
                    shaded (``plot_llc_traces``, from ``analysis/llc_traces.json``, not the table).

Same conventions as ``curves`` (``make_plots`` calls both): ``runs`` is ``{run label: tidy
DataFrame}`` of one model shape, one line per run, files ``<out_dir>/<name>.<fmt>``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from induction_dynamics.analysis.plots.style import save, seed_of, shade, windows
from induction_dynamics.analysis.table import (
    circuit_composition,
    curve,
    induction_circuit,
    model_metric,
)


def _head_curve(df: pd.DataFrame, metric: str, layer: int, head: int) -> pd.Series:
    d = df[(df["metric"] == metric) & (df["layer"] == layer) & (df["head"] == head)]
    return d.groupby("step")["value"].mean().sort_index()


def _finish(ax, ax_scores, phase, ylabel: str, score_label: str, title: str) -> None:
    """Shade the induction phase window on both panels; labels, legends, a 0-1 score axis."""
    w = windows(phase, "induction_score_max")
    for a in (ax, ax_scores):
        shade(a, w)
        a.legend(fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax_scores.set_ylabel(score_label)
    ax_scores.set_ylim(0, 1)
    ax_scores.set_xlabel("training step")


def plot_composition(runs: dict, phase, out_dir: Path, formats, dpi) -> list[Path]:
    fig = Figure(figsize=(6.4, 6), layout="constrained")
    ax, ax_scores = fig.subplots(2, 1, sharex=True)
    baselines = []
    for label, df in runs.items():
        comp = circuit_composition(df)
        if comp is None:
            continue
        (li, hi), (lp, hp) = induction_circuit(df)
        name = f"{seed_of(df, label)}: L{lp}H{hp} → L{li}H{hi}"
        line, = ax.plot(comp["K"].index, comp["K"].to_numpy(), marker="o", ms=3, lw=1.5, label=f"{name}, K")
        c = line.get_color()
        ax.plot(comp["Q"].index, comp["Q"].to_numpy(), ls="--", lw=1, color=c, label=f"{name}, Q")
        ax.plot(comp["V"].index, comp["V"].to_numpy(), ls=":", lw=1, color=c, label=f"{name}, V")
        ind = _head_curve(df, "induction_score", li, hi)
        prev = _head_curve(df, "previous_token_score", lp, hp)
        ax_scores.plot(ind.index, ind.to_numpy(), color=c, lw=1.5, label=f"{seed_of(df, label)}: induction L{li}H{hi}")
        ax_scores.plot(prev.index, prev.to_numpy(), color=c, lw=1, ls="--",
                       label=f"{seed_of(df, label)}: previous token L{lp}H{hp}")
        b = model_metric(df, "composition_baseline")
        if not b.empty:
            baselines.append(float(b.mean()))
    if baselines:
        ax.axhline(sum(baselines) / len(baselines), color="grey", lw=1, ls="-.", label="random matrices")
    _finish(ax, ax_scores, phase, "composition score", "head score",
            "Previous-token head → induction head (pair of the last checkpoint)")
    return save(fig, out_dir, "composition", formats, dpi)


def plot_llc(runs: dict, phase, out_dir: Path, formats, dpi) -> list[Path]:
    fig = Figure(figsize=(6.4, 5.5), layout="constrained")
    ax, ax_ind = fig.subplots(2, 1, sharex=True)
    for label, df in runs.items():
        name = seed_of(df, label)
        llc, sd = model_metric(df, "llc"), model_metric(df, "llc_std").reindex(model_metric(df, "llc").index)
        line, = ax.plot(llc.index, llc.to_numpy(), marker="o", ms=3, lw=1.5, label=name)
        ax.fill_between(llc.index, (llc - sd).to_numpy(), (llc + sd).to_numpy(), color=line.get_color(),
                        alpha=0.2, lw=0)
        ind = curve(df, "induction_score_max")
        ax_ind.plot(ind.index, ind.to_numpy(), color=line.get_color(), lw=1.5, label=name)
    _finish(ax, ax_ind, phase, "LLC (± sd across chains)", "max induction score",
            "Local learning coefficient around the phase change")
    return save(fig, out_dir, "llc", formats, dpi)


def plot_llc_traces(saved: dict | None, out_dir: Path, formats, dpi, max_panels: int = 6) -> list[Path]:
    """One run's SGLD chain losses minus L(w*) vs SGLD step, a panel per checkpoint (up to
    ``max_panels``, evenly spread, first and last always), burn-in shaded: a chain should rise and
    level off inside the burn-in (devinterp's convergence check)."""
    steps = (saved or {}).get("steps") or []
    if not steps:
        return []
    picks = sorted({round(i * (len(steps) - 1) / max(1, max_panels - 1)) for i in range(min(max_panels, len(steps)))})
    cols = min(3, len(picks))
    rows = -(-len(picks) // cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, i in zip(axes, picks):
        s = steps[i]
        for c, trace in enumerate(s["traces"]):
            ax.plot(np.asarray(trace, dtype=float) - s["init_loss"], lw=0.8, label=f"chain {c}")
        if s["num_burnin_steps"]:
            ax.axvspan(0, s["num_burnin_steps"], color="grey", alpha=0.15, lw=0, label="burn-in")
        ax.axhline(0, color="black", lw=0.6, ls="--")
        ax.set_title(f"step {s['step']}: LLC {s['llc']:.3g}", fontsize=8)
        ax.set_xlabel("SGLD step", fontsize=8)
        ax.set_ylabel("L(w) - L(w*) (nats)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(picks):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=6)
    fig.suptitle(f"LLC chains' minibatch losses (n_beta {steps[-1]['n_beta']:.4g})", fontsize=9)
    return save(fig, out_dir, "llc_traces", formats, dpi)
