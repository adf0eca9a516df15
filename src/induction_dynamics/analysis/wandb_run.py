"""One W&B run per analysed training run (job_type "analysis"), through ``wandb_logger.WandbLogger``.

Its id is kept in ``<run>/wandb/analysis_run.json``: analysing the run again (new checkpoints,
``watch=true``, ``plots_only=true``) continues the same W&B run, and only checkpoints newer
than those already logged add curve points (values recomputed for a logged step show in the
table and summary, not as a second point). ``force=true`` starts a new analysis run.

Same project and group as the training run (read from its checkpoint's ``config["wandb"]``,
unless ``wandb.project`` / ``wandb.group`` are set), a name holding the seed, and every
curve logged against the *training* iteration (step metric ``iter``), so the analysis
curves sit on the same x-axis as ``train/loss`` in the group's workspace. Keys:

    analysis/<metric>                      model-level (icl_score, text_loss, ...)
    analysis/<metric>/L<l>                 layer-level (patch_resid/L1, logit_lens_prob/L0, ...)
    analysis/<metric>/L<l>H<h>             head-level (induction_score/L1H3, ...)
    analysis/<metric>_max                  max over heads of a head-level metric
    analysis/phase_window/<curve>          1 inside the detected window, else 0 (a marker)
    analysis/circuit/<k|q|v>_composition   composition of the previous-token head into the
                                           induction head (table.induction_circuit; summary
                                           analysis/circuit/induction_head, .../previous_token_head)
    analysis/plots/<plot>                  the run's plots as images (heatmaps etc.)
    analysis/attention/<head role>         attention-pattern panels at their checkpoints' iterations
    analysis/checkpoints                   wandb.Table, one row per checkpoint
    summary analysis/phase/<curve>/...     detected, mid_step, start_step, end_step, loss_bump

No torch here: this runs in the main process after the workers are done.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from induction_dynamics.analysis.record import RunRecord
from induction_dynamics.analysis.table import (
    circuit_composition,
    induction_circuit,
    wide_by_step,
)
from induction_dynamics.run_dir import wandb_state_path
from induction_dynamics.wandb_logger import WandbLogger


def run_name(record: RunRecord) -> str:
    """The training run's W&B name (or the run label) + the seed + ``-analysis``."""
    base = (record.train_wandb or {}).get("name") or Path(record.run).name
    seed = record.seed
    if seed is not None and f"seed{seed}" not in base.replace("_", "").replace("-", "").replace("=", ""):
        base = f"{base}-seed{seed}"
    return f"{base}-analysis"


class AnalysisLogger:
    """Streams a run's analysis rows to W&B in step order; images, table, summary at the end."""

    def __init__(self, record: RunRecord, wandb_cfg, run_dir: Path, config: dict, new_run: bool = False):
        train = record.train_wandb or {}
        state = wandb_state_path(run_dir, "analysis")
        if new_run:
            state.unlink(missing_ok=True)
        self.logger = WandbLogger(
            mode=wandb_cfg.mode, project=wandb_cfg.project or train.get("project") or "induction-dynamics",
            group=wandb_cfg.group or train.get("group"), name=run_name(record), job_type="analysis",
            config=config, dir=run_dir, step_metric="iter", state_file=state)

    @property
    def active(self) -> bool:
        return self.logger.run is not None

    def log_new(self, table: pd.DataFrame) -> int:
        """Log checkpoints newer than the last logged one, over every analysis of this run
        (W&B records go in step order); returns how many were logged."""
        if not self.active or table.empty:
            return 0
        wide = wide_by_step(table[table["step"] > self.logger.last_step("curves")])
        n = 0
        for row in wide.to_dict("records"):
            step = int(row.pop("step"))
            record = {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))}
            record["analysis/tokens_seen"] = record.pop("tokens_seen")
            n += self.logger.log(record, step=step, stream="curves")
        return n

    def log_images(self, images: list[tuple[str, Path, int]]) -> None:
        """Images logged at training iterations: ``[(key, png path, step), ...]``."""
        for key, path, step in images if self.active else []:
            self.logger.log_image(key, path, step=int(step))

    def finish(self, table: pd.DataFrame, phase: pd.DataFrame, plot_paths: list[Path], prompts: dict) -> None:
        """Phase markers and summary, plot images, the per-checkpoint table; then close the run."""
        if not self.active:
            return
        steps = sorted(table["step"].unique())
        summary = {f"analysis/prompts/{k}": v for k, v in prompts.items()}
        records = phase.to_dict("records")
        for r in records:
            for key in ("detected", "mid_step", "start_step", "end_step", "open_ended", "amp", "p_value",
                        "p_holm", "null", "loss_bump", "loss_bump_in_window", "reason"):
                if key in r:
                    summary[f"analysis/phase/{r['metric']}/{key}"] = r[key]
        for s in steps if records else []:  # the marker: a step function over the training iterations
            self.logger.log({f"analysis/phase_window/{r['metric']}":
                             int(bool(r["detected"]) and r["start_step"] <= s <= r["end_step"]) for r in records},
                            step=int(s), stream="phase_window")
        comp = circuit_composition(table)  # the pair is known only once the last checkpoint is in
        if comp is not None:
            (li, hi), (lp, hp) = induction_circuit(table)
            summary["analysis/circuit/induction_head"] = f"L{li}H{hi}"
            summary["analysis/circuit/previous_token_head"] = f"L{lp}H{hp}"
            for s in steps:
                self.logger.log({f"analysis/circuit/{k.lower()}_composition": float(v[s])
                                 for k, v in comp.items() if s in v.index}, step=int(s), stream="circuit")
        summary["analysis/n_checkpoints"] = len(steps)
        self.logger.summary(summary)
        for p in plot_paths:
            if Path(p).suffix == ".png":
                self.logger.log_image(f"analysis/plots/{Path(p).stem}", p)
        self.logger.log_table("analysis/checkpoints", wide_by_step(table))
        self.logger.finish()
