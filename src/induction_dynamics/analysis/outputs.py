"""A run's and a sweep's outputs from their tidy tables: tables, phase changes, plots, the report.
No torch here: ``plots_only=true`` runs all of it from saved tables (``redraw``).

Per run (``write_run``): ``analysis/results.parquet`` (+ csv), ``token_losses.parquet``,
``errors.json``, ``phase_change.csv`` and the plots. Per sweep (``write_sweep``): the combined
table, the phase tables and their across-seed summary, and per-shape plots under the sweep
folder. Where each file lies: ``run_dir.py``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from induction_dynamics import run_dir as layout
from induction_dynamics.analysis import llc_traces
from induction_dynamics.analysis.attention import load_history
from induction_dynamics.analysis.phase import (
    detect_phase_change,
    format_summary,
    holm,
    loss_bump,
    min_change_of,
    noise_level,
    summarize_across_seeds,
)
from induction_dynamics.analysis.plots import make_plots
from induction_dynamics.analysis.plots.attention import (
    plot_attention_over_training,
    run_attention_html,
)
from induction_dynamics.analysis.plots.circuit import plot_llc_traces
from induction_dynamics.analysis.record import OfRun, RunRecord
from induction_dynamics.analysis.table import (
    curve,
    curve_stderr,
    make_frame,
    model_metric,
    write_atomic,
)
from induction_dynamics.errors import AnalysisError
from induction_dynamics.files import read_json, write_json, write_text

log = logging.getLogger(__name__)


@dataclass
class RunResult(OfRun):
    """Everything known about one analysed run (built from the cache or the saved tables)."""

    record: RunRecord
    table: pd.DataFrame
    tokens: pd.DataFrame
    errors: list = field(default_factory=list)
    phase: pd.DataFrame = field(default_factory=pd.DataFrame)
    plots: list = field(default_factory=list)
    attention_panels: list = field(default_factory=list)  # [(W&B key, PNG, step)] of the attention figure
    has_record: bool = True  # False: saved tables without a run_info.json (no W&B run to continue)


def phase_table(table: pd.DataFrame, phase_cfg, record: RunRecord | None = None,
                control: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per curve of ``phase.metrics``: the PhaseChange fields (each curve's own test),
    ``p_holm`` (Holm's correction over those curves), and the loss bump in its window
    (``loss_bumps``). ``record``: the run the table is of (its label, seed and
    shape head each row); ``control``: a control run's table (its bump is subtracted)."""
    record = record or RunRecord(run="", run_dir="")
    rows = []
    for name, opts in phase_cfg.metrics.items():
        c = curve(table, name)
        pc = detect_phase_change(c.index.to_numpy(), c.to_numpy(), name, min_change=opts.min_change,
                                 alpha=phase_cfg.alpha, skip_initial_frac=opts.skip_initial_frac,
                                 n_sim=phase_cfg.n_sim)
        if c.empty:
            pc.reason = f"no {name} in the table"
        rows.append({"run": record.run, "seed": record.seed, "shape": record.shape, **pc.as_dict()})
    phase = pd.DataFrame(rows)
    phase["p_holm"] = holm(phase["p_value"])  # the summary's call (summarize_across_seeds) uses it
    return loss_bumps(phase, table, phase_cfg, control)


def loss_bumps(phase: pd.DataFrame, table: pd.DataFrame, phase_cfg, control: pd.DataFrame | None = None) -> pd.DataFrame:
    """``phase`` with the loss bump of each window: ``loss_bump`` (the largest rise of the loss above
    its running minimum there), ``loss_noise`` (the loss's checkpoint-to-checkpoint jitter),
    ``loss_bump_control`` (the control run's bump in the same window; NaN without one) and
    ``loss_bump_in_window``: the bump, less the control's, above ``bump_snr`` x the jitter."""
    loss, loss_name = model_metric(table, phase_cfg.loss_metric), phase_cfg.loss_metric
    if loss.empty:
        loss, loss_name = model_metric(table, "val_loss"), "val_loss"
    ctrl = model_metric(control, loss_name) if control is not None else pd.Series(dtype=float)
    noise = noise_level(loss.to_numpy()) if len(loss) else math.nan
    out = phase.copy()
    bumps = [loss_bump(loss.index.to_numpy(), loss.to_numpy(), a, b) for a, b in zip(out["start_step"], out["end_step"])]
    ctrl_bumps = [loss_bump(ctrl.index.to_numpy(), ctrl.to_numpy(), a, b) if len(ctrl) else math.nan
                  for a, b in zip(out["start_step"], out["end_step"])]
    out["loss_metric"], out["loss_bump"], out["loss_noise"], out["loss_bump_control"] = loss_name, bumps, noise, ctrl_bumps
    out["loss_bump_in_window"] = [bool(math.isfinite(b) and b - (c if math.isfinite(c) else 0.0) > phase_cfg.bump_snr * noise)
                                  for b, c in zip(bumps, ctrl_bumps)]
    return out


def write_run(r: RunResult, cfg, draw: bool = True) -> None:
    """The run's tables and phase changes; its plots too unless ``draw`` is off (a watch draws once, at the end)."""
    out = layout.analysis_dir(r.run_dir)
    draw = draw and bool(cfg.plots.formats)  # plots.formats=[]: tables only
    if not r.table.empty:
        write_atomic(r.table, out / "results.parquet", csv=cfg.csv)
    if not r.tokens.empty:
        write_atomic(r.tokens, out / "token_losses.parquet")
    write_json(r.errors, out / "errors.json")
    if r.table.empty:
        return
    r.phase = phase_table(r.table, cfg.phase, r.record)
    write_text(out / "phase_change.csv", r.phase.to_csv(index=False))
    if draw:
        r.plots, skipped = make_plots({r.label: r.table}, {r.label: r.tokens} if len(r.tokens) else {},
                                      r.phase, r.run_dir / "plots", formats=list(cfg.plots.formats),
                                      dpi=cfg.plots.dpi, loss_metric=cfg.phase.loss_metric)
        _attention_views(r, cfg)
        r.plots += plot_llc_traces(llc_traces.load(r.run_dir), r.run_dir / "plots", list(cfg.plots.formats),
                                   cfg.plots.dpi)
        for note in skipped:
            log.info("%s: plot skipped: %s", r.label, note)


def _attention_views(r: RunResult, cfg) -> None:
    """The attention-over-training figure (and its panels for W&B), CircuitsVis views of plots.attention_html."""
    paths, r.attention_panels, note = plot_attention_over_training(
        r.table, r.phase, load_history(r.run_dir), r.run_dir / "plots", list(cfg.plots.formats), cfg.plots.dpi)
    r.plots += paths
    if note:
        log.info("%s: plot skipped: %s", r.label, note)
    for step in cfg.plots.attention_html:
        try:
            run_attention_html(r.run_dir, step)
        except AnalysisError as e:
            log.warning("%s: no interactive attention view: %s", r.label, e)


def write_sweep(root: Path, results: list[RunResult], cfg) -> pd.DataFrame:
    """Combined table, phase tables and per-shape plots under ``root``; returns the across-seed summary."""
    done = [r for r in results if not r.table.empty]
    out = layout.analysis_dir(root)
    write_json([e for r in results for e in r.errors], out / "errors.json")
    if not done:
        return pd.DataFrame()
    write_atomic(make_frame(pd.concat([r.table for r in done])), out / "results.parquet", csv=cfg.csv)
    control = next((r for r in done if r.label == cfg.phase.control), None)
    if cfg.phase.control is not None and control is None:
        log.warning("phase.control=%s is not among the runs analysed: loss bumps are judged without a control",
                    cfg.phase.control)
    for r in done if control is not None else []:
        r.phase = loss_bumps(r.phase, r.table, cfg.phase, None if r is control else control.table)
        write_text(layout.analysis_dir(r.run_dir) / "phase_change.csv", r.phase.to_csv(index=False))
    phase = pd.concat([r.phase for r in done], ignore_index=True)
    write_text(out / "phase_change.csv", phase.to_csv(index=False))
    summary = summarize_across_seeds(phase, alpha=cfg.phase.alpha)
    write_text(out / "phase_change_summary.csv", summary.to_csv(index=False))
    shapes = sorted({r.record.shape for r in done})
    if len(shapes) > 1:
        log.warning("the runs have %d different model shapes (%s): analysed and plotted apart under %s/<shape>/",
                    len(shapes), ", ".join(f"{s}: {sum(r.record.shape == s for r in done)} run(s)" for s in shapes),
                    root / "plots")
    for shape in shapes if cfg.plots.formats else []:
        group = [r for r in done if r.record.shape == shape]
        plot_dir = root / "plots" / shape if len(shapes) > 1 else root / "plots"
        make_plots({r.label: r.table for r in group}, {r.label: r.tokens for r in group if len(r.tokens)},
                   phase[phase["shape"] == shape], plot_dir, formats=list(cfg.plots.formats),
                   dpi=cfg.plots.dpi, loss_metric=cfg.phase.loss_metric)
    return summary


NOISE_FRACTION = 0.5  # above this fraction of a change, a score's standard error hides it (change < 2 se)


def noise_warnings(r: RunResult, phase_cfg) -> list[str]:
    """One line per phase curve of run ``r`` whose numbers are within their own noise: a curve
    whose median standard error exceeds ``NOISE_FRACTION`` of the smallest change that counts, or a
    detected change smaller than twice its window ends' standard errors added in quadrature."""
    out = []
    phase = r.phase.set_index("metric") if r.phase is not None and len(r.phase) else None
    for name, opts in phase_cfg.metrics.items():
        se = curve_stderr(r.table, name).dropna()
        if se.empty:
            continue
        min_change = min_change_of(name, opts.min_change)
        med = float(se.median())
        if min_change > 0 and med > NOISE_FRACTION * min_change:
            out.append(f"{r.label}: {name}'s standard error (median {med:.3g}) is above {NOISE_FRACTION:g} of the "
                       f"smallest change that counts ({min_change:g}): raise suite.text_windows")
        if phase is not None and name in phase.index and bool(phase.loc[name, "detected"]):
            row = phase.loc[name]
            ends = se.reindex([se.index[np.abs(se.index - row.start_step).argmin()],
                               se.index[np.abs(se.index - row.end_step).argmin()]])
            # the ends' errors added as if independent: every checkpoint is scored on the same
            # windows, so the paired error of the change is smaller and this can warn too often
            noise = 2.0 * math.sqrt(float((ends ** 2).sum()))
            if abs(row.amp) < noise:
                out.append(f"{r.label}: {name}'s change across its window ({row.amp:+.3g}) may be within its own "
                           f"noise (2 se of two independent ends = {noise:.3g}; the checkpoints share their windows, "
                           "so the paired error is smaller)")
    return out


def report(root: Path, results: list[RunResult], summary: pd.DataFrame, is_sweep: bool, headline: str,
           phase_cfg=None) -> str:
    """What the command prints at the end: the headline, the phase changes, numbers within their
    noise (with ``phase_cfg``), errors, where the files are."""
    lines = [headline]
    done = [r for r in results if not r.table.empty]
    if summary.empty and done:
        summary = summarize_across_seeds(pd.concat([r.phase for r in done], ignore_index=True))
    if not summary.empty:
        lines.append("phase change" + (" (median [95 % bootstrap interval] across runs)" if len(done) > 1 else "") + ":")
        lines += ["  " + s for s in format_summary(summary).splitlines()]
    for r in done if phase_cfg is not None else []:
        lines += ["warning: " + w for w in noise_warnings(r, phase_cfg)]
    kinds = [e.get("kind", "checkpoint") for r in results for e in r.errors]
    if kinds.count("checkpoint"):
        lines.append(f"{kinds.count('checkpoint')} checkpoint(s) could not be read: see errors.json")
    if kinds.count("metric"):
        lines.append(f"{kinds.count('metric')} metric(s) failed on a checkpoint (its other metrics are kept): "
                     "see errors.json")
    if kinds.count("note"):
        lines.append(f"{kinds.count('note')} note(s) on undefined values (NaN in the table, and why): see errors.json")
    where = root if is_sweep else results[0].run_dir
    lines.append(f"tables: {layout.analysis_dir(where)}/   plots: {where / 'plots'}/")
    return "\n".join(lines)


def saved_results(root: Path, run_dirs: list[Path]) -> list[RunResult]:
    """Every run's saved analysis (``plots_only``); a run without one is skipped with a warning."""
    results = []
    for d in run_dirs:
        label = layout.run_label(d, root)
        path = layout.analysis_dir(d) / "results.parquet"
        if not path.is_file():
            log.warning("%s: no saved analysis (%s); run without plots_only first", label, path)
            continue
        table = make_frame(pd.read_parquet(path).assign(run=label))
        tok_path = layout.analysis_dir(d) / "token_losses.parquet"
        tokens = pd.read_parquet(tok_path).assign(run=label) if tok_path.is_file() else pd.DataFrame()
        record = RunRecord.read(layout.analysis_dir(d) / "run_info.json", d, label)
        seed = int(table["seed"].iloc[0]) if len(table) else -1
        result = RunResult(record or RunRecord(label, str(d)), table, tokens,
                           read_json(layout.analysis_dir(d) / "errors.json", []) or [], has_record=record is not None)
        result.record.seed = seed
        results.append(result)
    return results
