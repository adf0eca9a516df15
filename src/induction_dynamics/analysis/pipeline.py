"""``analyze(cfg)``: the pure function behind ``analyze_checkpoints.py``.

run dir(s) -> [sweep: checkpoints -> cached rows] -> tidy tables -> phase change -> plots
-> W&B. ``plots_only=true`` starts from the saved tables and never imports torch or the
model (the torch-side modules, ``sweep`` and ``suite``, are imported only when
checkpoints are analysed). Output layout: see ``runs.py``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from induction_dynamics.analysis import attention
from induction_dynamics.analysis import runs as R
from induction_dynamics.analysis.phase import (detect_phase_change, format_summary, loss_bump,
                                               summarize_across_seeds)
from induction_dynamics.analysis.plots import make_plots
from induction_dynamics.analysis.table import curve, make_frame, model_metric, write_atomic
from induction_dynamics.files import write_text

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """Everything known about one analysed run (built from the cache or the saved tables)."""

    run_dir: Path
    label: str
    seed: int
    shape: str
    info: dict
    table: pd.DataFrame
    tokens: pd.DataFrame
    errors: list = field(default_factory=list)
    phase: pd.DataFrame = field(default_factory=pd.DataFrame)
    plots: list = field(default_factory=list)
    attention_panels: list = field(default_factory=list)  # [(W&B key, PNG, step)] of the attention figure


def phase_table(table: pd.DataFrame, label: str, seed: int, shape: str, phase_cfg) -> pd.DataFrame:
    """One row per curve of ``phase.metrics``: the PhaseChange fields + the loss bump in its window."""
    loss = model_metric(table, phase_cfg.loss_metric)
    loss_name = phase_cfg.loss_metric
    if loss.empty:
        loss, loss_name = model_metric(table, "val_loss"), "val_loss"
    rows = []
    for name, opts in phase_cfg.metrics.items():
        c = curve(table, name)
        pc = detect_phase_change(c.index.to_numpy(), c.to_numpy(), name, min_amplitude=opts.min_amplitude,
                                 min_snr=phase_cfg.min_snr, min_r2=phase_cfg.min_r2,
                                 max_window_frac=phase_cfg.max_window_frac,
                                 skip_initial_frac=opts.skip_initial_frac)
        if c.empty:
            pc.reason = f"no {name} in the table"
        bump = loss_bump(loss.index.to_numpy(), loss.to_numpy(), pc.start_step, pc.end_step)
        rows.append({"run": label, "seed": seed, "shape": shape, **pc.as_dict(), "loss_metric": loss_name,
                     "loss_bump": bump, "loss_bump_in_window": bool(math.isfinite(bump) and bump > phase_cfg.bump_tol)})
    return pd.DataFrame(rows)


def _write_run_outputs(r: RunResult, cfg, draw: bool = True) -> None:
    out = R.analysis_dir(r.run_dir)
    draw = draw and bool(cfg.plots.formats)  # plots.formats=[]: tables only
    if not r.table.empty:
        write_atomic(r.table, out / "results.parquet", csv=cfg.csv)
    if not r.tokens.empty:
        write_atomic(r.tokens, out / "token_losses.parquet")
    R.write_json(r.errors, out / "errors.json")
    if r.table.empty:
        return
    r.phase = phase_table(r.table, r.label, r.seed, r.shape, cfg.phase)
    write_text(out / "phase_change.csv", r.phase.to_csv(index=False))
    if draw:
        r.plots, skipped = make_plots({r.label: r.table}, {r.label: r.tokens} if len(r.tokens) else {},
                                      r.phase, r.run_dir / "plots", formats=list(cfg.plots.formats),
                                      dpi=cfg.plots.dpi, loss_metric=cfg.phase.loss_metric)
        _attention_views(r, cfg)
        for note in skipped:
            log.info("%s: plot skipped: %s", r.label, note)


def _attention_views(r: RunResult, cfg) -> None:
    """The attention-over-training figure (and its panels for W&B), CircuitsVis views of plots.attention_html."""
    hist = attention.load_history(r.run_dir)
    paths, r.attention_panels, note = attention.plot_attention_over_training(
        r.table, r.phase, hist, r.run_dir / "plots", list(cfg.plots.formats), cfg.plots.dpi)
    r.plots += paths
    if note:
        log.info("%s: plot skipped: %s", r.label, note)
    for step in cfg.plots.attention_html:
        try:
            attention.run_attention_html(r.run_dir, step)
        except R.AnalysisError as e:
            log.warning("%s: no interactive attention view: %s", r.label, e)


def _write_sweep_outputs(root: Path, results: list[RunResult], cfg) -> pd.DataFrame:
    """Combined table, phase tables and per-shape plots under ``root``; returns the across-seed summary."""
    done = [r for r in results if not r.table.empty]
    out = R.analysis_dir(root)
    errors = [e for r in results for e in r.errors]
    R.write_json(errors, out / "errors.json")
    if not done:
        return pd.DataFrame()
    write_atomic(make_frame(pd.concat([r.table for r in done])), out / "results.parquet", csv=cfg.csv)
    phase = pd.concat([r.phase for r in done], ignore_index=True)
    write_text(out / "phase_change.csv", phase.to_csv(index=False))
    summary = summarize_across_seeds(phase)
    write_text(out / "phase_change_summary.csv", summary.to_csv(index=False))
    shapes = sorted({r.shape for r in done})
    if len(shapes) > 1:
        log.warning("the runs have %d different model shapes (%s): analysed and plotted apart under %s/<shape>/",
                    len(shapes), ", ".join(f"{s}: {sum(r.shape == s for r in done)} run(s)" for s in shapes),
                    root / "plots")
    for shape in shapes if cfg.plots.formats else []:
        group = [r for r in done if r.shape == shape]
        plot_dir = root / "plots" / shape if len(shapes) > 1 else root / "plots"
        make_plots({r.label: r.table for r in group}, {r.label: r.tokens for r in group if len(r.tokens)},
                   phase[phase["shape"] == shape], plot_dir, formats=list(cfg.plots.formats),
                   dpi=cfg.plots.dpi, loss_metric=cfg.phase.loss_metric)
    return summary


def _report(root: Path, results: list[RunResult], summary: pd.DataFrame, is_sweep: bool, extra: str) -> str:
    lines = [extra]
    done = [r for r in results if not r.table.empty]
    if summary.empty and done:
        summary = summarize_across_seeds(pd.concat([r.phase for r in done], ignore_index=True))
    if not summary.empty:
        lines.append("phase change" + (" (mean ± sd across runs)" if len(done) > 1 else "") + ":")
        lines += ["  " + s for s in format_summary(summary).splitlines()]
    errors = [e for r in results for e in r.errors]
    n_metric = sum(e.get("kind") == "metric" for e in errors)
    if len(errors) - n_metric:
        lines.append(f"{len(errors) - n_metric} checkpoint(s) could not be read: see errors.json")
    if n_metric:
        lines.append(f"{n_metric} metric(s) failed on a checkpoint (its other metrics are kept): see errors.json")
    where = root if is_sweep else results[0].run_dir
    lines.append(f"tables: {R.analysis_dir(where)}/   plots: {where / 'plots'}/")
    return "\n".join(lines)


def _plots_only(root: Path, run_dirs: list[Path], is_sweep: bool, cfg) -> dict:
    t0 = time.perf_counter()
    results = []
    for d in run_dirs:
        label = R.run_label(d, root)
        path = R.analysis_dir(d) / "results.parquet"
        if not path.is_file():
            log.warning("%s: no saved analysis (%s); run without plots_only first", label, path)
            continue
        table = pd.read_parquet(path).assign(run=label)
        tok_path = R.analysis_dir(d) / "token_losses.parquet"
        tokens = pd.read_parquet(tok_path).assign(run=label) if tok_path.is_file() else pd.DataFrame()
        info = R.read_json(R.analysis_dir(d) / "run_info.json", {}) or {}
        seed = int(table["seed"].iloc[0]) if len(table) else -1
        errors = R.read_json(R.analysis_dir(d) / "errors.json", []) or []
        results.append(RunResult(d, label, seed, info.get("shape", "unknown"), info, make_frame(table), tokens, errors))
    if not results:
        raise R.AnalysisError(f"no saved analysis under {root}: run analyze_checkpoints.py without plots_only first")
    for r in results:
        _write_run_outputs(r, cfg)
        if cfg.wandb.mode != "disabled" and not r.table.empty and r.info.get("run"):
            # the same analysis run as the sweep that made the tables: new plots and summary
            from induction_dynamics.analysis.wandb_log import AnalysisLogger
            logger = AnalysisLogger(r.info, cfg.wandb, r.run_dir, {"analysis": _analysis_config(cfg)})
            logger.log_new(r.table)
            # run_info.json written before the analysis inputs were renamed prompts has "probes"
            logger.finish(r.table, r.phase, r.plots, r.info.get("prompts", r.info.get("probes", {})))
    summary = _write_sweep_outputs(root, results, cfg) if is_sweep else pd.DataFrame()
    text = _report(root, results, summary, is_sweep, f"plots regenerated for {len(results)} run(s) "
                                                     f"in {time.perf_counter() - t0:.1f} s (plots_only)")
    print(text)
    return {"results": results, "summary": summary, "report": text}


def _analysis_config(cfg) -> dict:
    c = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    c.pop("hydra", None)
    return c


def analyze(cfg) -> dict:
    """Analyse the run or sweep at ``cfg.run_dir`` (see conf/analyze.yaml). Raises AnalysisError on bad input."""
    if OmegaConf.is_missing(cfg, "run_dir") or not str(cfg.run_dir).strip():
        raise R.AnalysisError("run_dir is required: python analyze_checkpoints.py run_dir=outputs/<run or sweep>")
    if cfg.n_jobs < 1:
        raise R.AnalysisError(f"n_jobs must be >= 1, got {cfg.n_jobs}")
    root = Path(cfg.run_dir).expanduser()
    if not root.exists():
        raise R.AnalysisError(f"run_dir not found: {root}")
    is_sweep = not R.is_run_dir(root)
    if cfg.plots_only:
        return _plots_only(root, R.find_runs(root), is_sweep, cfg)
    if not cfg.watch and not any(R.list_checkpoints(d) for d in R.find_runs(root)):  # before importing torch
        where = f"{root}/checkpoints" if not is_sweep else f"any run under {root}"
        raise R.AnalysisError(f"no checkpoints in {where}")

    from induction_dynamics.analysis import sweep  # torch and the model from here on
    try:
        sweep.validate_metrics(cfg.suite.metrics)
    except ValueError as e:
        raise R.AnalysisError(str(e)) from None

    t0 = time.perf_counter()
    deadline = time.monotonic() + cfg.watch_timeout_s
    contexts: dict[str, object] = {}
    loggers: dict[str, object] = {}
    failed: dict[str, str] = {}
    empty: set[str] = set()
    results: dict[str, RunResult] = {}
    n_new = 0
    while True:
        try:
            run_dirs = R.find_runs(root)
        except R.AnalysisError:
            if not cfg.watch:
                raise
            run_dirs = []
        for d in run_dirs:
            label = R.run_label(d, root)
            if label in failed or (label in contexts and contexts[label].prompts is not None):
                continue
            if not R.list_checkpoints(d):
                if label not in empty:
                    empty.add(label)
                    log.warning("%s: no checkpoints yet in %s", label, d / "checkpoints")
                continue
            try:
                ctx = sweep.prepare_run(d, label, cfg)
            except (R.AnalysisError, ValueError) as e:
                failed[label] = str(e)
                log.error("%s: cannot analyse this run: %s", label, e)
                continue
            contexts[label] = ctx
        statuses = sweep.analyse_pending(list(contexts.values()), n_jobs=cfg.n_jobs, device=cfg.device,
                                          threads=cfg.threads)
        n_new += sum(s["ok"] for s in statuses)
        for label, ctx in contexts.items():
            if label in results and not any(s["run"] == label for s in statuses):
                continue  # nothing new for this run this round
            table, tokens = sweep.collect_run(ctx.run_dir, label, ctx.seed)
            attention.save_history(ctx.run_dir)
            done = set(table["step"].tolist())
            # a checkpoint that failed to load once and has rows now was retried and read fine
            ctx.errors[:] = [e for e in ctx.errors if e.get("kind") == "metric" or e["step"] not in done]
            info = ctx.info() if ctx.prompts is not None else {"run": label}
            r = RunResult(ctx.run_dir, label, ctx.seed, ctx.shape, info, table, tokens, ctx.errors)
            _write_run_outputs(r, cfg, draw=not cfg.watch)
            results[label] = r
            if cfg.wandb.mode != "disabled" and ctx.prompts is not None and not table.empty:
                if label not in loggers:
                    loggers[label] = _logger(ctx, cfg)
                loggers[label].log_new(table)
        if not cfg.watch or _finished(contexts, results, run_dirs) or time.monotonic() > deadline:
            if cfg.watch and time.monotonic() > deadline:
                log.warning("watch: stopped after watch_timeout_s=%s s before training finished", cfg.watch_timeout_s)
            break
        time.sleep(cfg.watch_poll_s)

    ordered = [results[k] for k in sorted(results)]
    for r in ordered:
        if cfg.watch:
            _write_run_outputs(r, cfg)  # plots drawn once, at the end of the watch
        if r.label in loggers:
            loggers[r.label].log_images(r.attention_panels)
            loggers[r.label].finish(r.table, r.phase, r.plots, r.info.get("prompts", {}))
    summary = _write_sweep_outputs(root, ordered, cfg) if is_sweep else pd.DataFrame()
    n_ckpt = sum(r.table["step"].nunique() for r in ordered if not r.table.empty)
    text = _report(root, ordered, summary, is_sweep,
                   f"analysed {len(ordered)} run(s), {n_ckpt} checkpoint(s) ({n_new} new) "
                   f"in {time.perf_counter() - t0:.1f} s") if ordered else ""
    if text:
        print(text)
    if not any(not r.table.empty for r in ordered) and not failed:
        raise R.AnalysisError(f"no checkpoint under {root} could be read (see {R.analysis_dir(ordered[0].run_dir)}/errors.json)"
                              if ordered else f"no checkpoints appeared under {root} before watch_timeout_s")
    if failed:
        raise R.AnalysisError(f"{len(failed)} run(s) could not be analysed: "
                              + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    return {"results": ordered, "summary": summary, "report": text}


def _logger(ctx, cfg):
    from induction_dynamics.analysis.wandb_log import AnalysisLogger
    config = {"analysis": _analysis_config(cfg), "train": ctx.train_config, "prompts": ctx.prompts.info(),
              "run_dir": str(ctx.run_dir), "shape": ctx.shape}
    return AnalysisLogger(ctx.info(), cfg.wandb, ctx.run_dir, config, new_run=bool(cfg.force))


def _finished(contexts: dict, results: dict, run_dirs: list[Path]) -> bool:
    """Watch is over when every known run's final step (config max_iters) has been analysed (or failed)."""
    if not contexts or len(contexts) < len(run_dirs):
        return False
    for label, ctx in contexts.items():
        r = results.get(label)
        done = set(r.table["step"].tolist()) if r is not None else set()
        done |= {e["step"] for e in ctx.errors}
        if ctx.max_iters is None or not done or max(done) < ctx.max_iters:
            return False
    return True
