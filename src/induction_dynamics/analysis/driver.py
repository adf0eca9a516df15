"""``analyze(cfg)``: the pure function behind ``analyze_checkpoints.py``.

run dir(s) -> [worker: checkpoints -> cached rows] -> tidy tables -> phase change -> plots -> W&B.
A ``Session`` holds the state of one analysed folder, a ``RunState`` per run; one pass
(``discover`` + ``analyse``) is the whole batch analysis, and ``watch.follow`` repeats passes
until training is done. ``plots_only=true`` starts from the saved tables (``outputs.redraw``)
and never imports torch or the model: the worker is imported only when checkpoints are
analysed. Output layout: ``run_dir.py``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from induction_dynamics import run_dir as layout
from induction_dynamics.analysis import attention, llc_traces, outputs
from induction_dynamics.analysis.cache import collect
from induction_dynamics.analysis.outputs import RunResult
from induction_dynamics.analysis.registry import SUITE_IDS
from induction_dynamics.analysis.wandb_run import AnalysisLogger
from induction_dynamics.analysis.watch import follow
from induction_dynamics.errors import AnalysisError

log = logging.getLogger(__name__)


def _worker():
    """The torch side (model, toolkit, suite), imported only when checkpoints are analysed:
    ``plots_only`` and a bad command line never load torch."""
    from induction_dynamics.analysis import worker
    return worker


def _analysis_config(cfg) -> dict:
    c = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    c.pop("hydra", None)
    return c


@dataclass
class RunState:
    """One run of a session: its setup (None until it has a checkpoint), W&B run, latest result."""

    context: object = None            # worker.RunContext
    logger: AnalysisLogger | None = None
    result: RunResult | None = None
    failure: str = ""                 # why the run cannot be analysed at all (set up once)
    warned_empty: bool = False

    @property
    def ready(self) -> bool:
        return self.context is not None and self.context.prompts is not None


class Session:
    """The analysis of one folder (a run or a sweep): its runs' states, pass after pass."""

    def __init__(self, root: Path, cfg):
        self.root, self.cfg = root, cfg
        self.is_sweep = not layout.is_run_dir(root)
        self.runs: dict[str, RunState] = {}
        self.run_dirs: list[Path] = []
        self.n_new = 0

    def discover(self) -> None:
        """Find the run dirs under the folder; set up each new one that has a checkpoint."""
        try:
            self.run_dirs = layout.find_runs(self.root)
        except AnalysisError:
            if not self.cfg.watch:
                raise
            self.run_dirs = []
        for d in self.run_dirs:
            label = layout.run_label(d, self.root)
            state = self.runs.setdefault(label, RunState())
            if state.failure or state.ready:
                continue
            if not layout.list_checkpoints(d):
                if not state.warned_empty:
                    state.warned_empty = True
                    log.warning("%s: no checkpoints yet in %s", label, d / "checkpoints")
                continue
            try:
                state.context = _worker().prepare_run(d, label, self.cfg)
            except (AnalysisError, ValueError) as e:
                state.failure = str(e)
                log.error("%s: cannot analyse this run: %s", label, e)

    def analyse(self) -> None:
        """Analyse every pending checkpoint; refresh the tables (and W&B) of the runs that changed."""
        contexts = [s.context for s in self.runs.values() if s.context is not None]
        statuses = _worker().cache_pending(contexts, n_jobs=self.cfg.n_jobs, device=self.cfg.device,
                                           threads=self.cfg.threads, options=_worker().run_options(self.cfg.suite))
        self.n_new += sum(s["ok"] for s in statuses)
        changed = {s["run"] for s in statuses}
        for label, state in self.runs.items():
            ctx = state.context
            if ctx is None or (state.result is not None and label not in changed):
                continue  # nothing new for this run this pass
            table, tokens = collect(ctx.run_dir, label, ctx.record.seed)
            attention.save_history(ctx.run_dir)
            llc_traces.save(ctx.run_dir)
            done = set(table["step"].tolist())
            # a checkpoint that failed to load once and has rows now was retried and read fine
            ctx.errors[:] = [e for e in ctx.errors if e.get("kind") in ("metric", "note") or e["step"] not in done]
            state.result = RunResult(ctx.record, table, tokens, ctx.errors)
            outputs.write_run(state.result, self.cfg, draw=not self.cfg.watch)
            if self.cfg.wandb.mode != "disabled" and state.ready and not table.empty:
                if state.logger is None:
                    state.logger = self._logger(ctx)
                state.logger.log_new(table)

    def _logger(self, ctx) -> AnalysisLogger:
        config = {"analysis": _analysis_config(self.cfg), "train": ctx.train_config, "prompts": ctx.record.prompts,
                  "run_dir": str(ctx.run_dir), "shape": ctx.record.shape}
        return AnalysisLogger(ctx.record, self.cfg.wandb, ctx.run_dir, config, new_run=bool(self.cfg.force))

    def close(self, t0: float) -> dict:
        """Final plots, W&B summaries, the sweep's outputs and the report; raises when nothing was read."""
        ordered = [self.runs[k].result for k in sorted(self.runs) if self.runs[k].result is not None]
        for r in ordered:
            if self.cfg.watch:
                outputs.write_run(r, self.cfg)  # plots drawn once, at the end of the watch
            logger = self.runs[r.label].logger
            if logger is not None:
                logger.log_images(r.attention_panels)
                logger.finish(r.table, r.phase, r.plots, r.record.prompts)
        summary = outputs.write_sweep(self.root, ordered, self.cfg) if self.is_sweep else pd.DataFrame()
        n_ckpt = sum(r.table["step"].nunique() for r in ordered if not r.table.empty)
        text = outputs.report(self.root, ordered, summary, self.is_sweep,
                              f"analysed {len(ordered)} run(s), {n_ckpt} checkpoint(s) ({self.n_new} new) "
                              f"in {time.perf_counter() - t0:.1f} s", self.cfg.phase) if ordered else ""
        if text:
            print(text)
        failed = {k: s.failure for k, s in self.runs.items() if s.failure}
        if not any(not r.table.empty for r in ordered) and not failed:
            raise AnalysisError(f"no checkpoint under {self.root} could be read (see "
                                f"{layout.analysis_dir(ordered[0].run_dir)}/errors.json)" if ordered else
                                f"no checkpoints appeared under {self.root} before watch_timeout_s")
        if failed:
            raise AnalysisError(f"{len(failed)} run(s) could not be analysed: "
                                + "; ".join(f"{k}: {v}" for k, v in failed.items()))
        return {"results": ordered, "summary": summary, "report": text}


def redraw(root: Path, cfg) -> dict:
    """``plots_only=true``: every output again from the saved tables, and the same W&B analysis runs."""
    t0 = time.perf_counter()
    is_sweep = not layout.is_run_dir(root)
    results = outputs.saved_results(root, layout.find_runs(root))
    if not results:
        raise AnalysisError(f"no saved analysis under {root}: run analyze_checkpoints.py without plots_only first")
    for r in results:
        outputs.write_run(r, cfg)
        if cfg.wandb.mode != "disabled" and not r.table.empty and r.has_record:
            # the same analysis run as the sweep that made the tables: new plots and summary
            logger = AnalysisLogger(r.record, cfg.wandb, r.run_dir, {"analysis": _analysis_config(cfg)})
            logger.log_new(r.table)
            logger.finish(r.table, r.phase, r.plots, r.record.prompts)
    summary = outputs.write_sweep(root, results, cfg) if is_sweep else pd.DataFrame()
    text = outputs.report(root, results, summary, is_sweep, f"plots regenerated for {len(results)} run(s) "
                                                            f"in {time.perf_counter() - t0:.1f} s (plots_only)", cfg.phase)
    print(text)
    return {"results": results, "summary": summary, "report": text}


def analyze(cfg) -> dict:
    """Analyse the run or sweep at ``cfg.run_dir`` (see conf/analyze.yaml). Raises AnalysisError on bad input."""
    if OmegaConf.is_missing(cfg, "run_dir") or not str(cfg.run_dir).strip():
        raise AnalysisError("run_dir is required: python analyze_checkpoints.py run_dir=outputs/<run or sweep>")
    if cfg.n_jobs < 1:
        raise AnalysisError(f"n_jobs must be >= 1, got {cfg.n_jobs}")
    root = Path(cfg.run_dir).expanduser()
    if not root.exists():
        raise AnalysisError(f"run_dir not found: {root}")
    unknown = [str(m) for m in cfg.suite.metrics if str(m) not in SUITE_IDS]
    if unknown:
        raise AnalysisError(f"unknown suite metric(s) {unknown}; choose from {list(SUITE_IDS)}")
    if cfg.plots_only:
        return redraw(root, cfg)
    if not cfg.watch and not any(layout.list_checkpoints(d) for d in layout.find_runs(root)):  # before torch
        where = f"{root}/checkpoints" if layout.is_run_dir(root) else f"any run under {root}"
        raise AnalysisError(f"no checkpoints in {where}")
    t0 = time.perf_counter()
    session = Session(root, cfg)
    if cfg.watch:
        follow(session)
    else:
        session.discover()
        session.analyse()
    return session.close(t0)
