"""Analyse a checkpoint history: per-head scores, ICL, patching, logit lens -> tables, plots, W&B.

    python analyze_checkpoints.py run_dir=outputs/<run>          # one run
    python analyze_checkpoints.py run_dir=multirun/<sweep>       # every run of a sweep (all seeds)
    python analyze_checkpoints.py run_dir=... watch=true         # follow a training that is running
    python analyze_checkpoints.py run_dir=... plots_only=true    # redraw from saved tables (no torch)
    python analyze_checkpoints.py run_dir=... n_jobs=2           # checkpoints in parallel
    python analyze_checkpoints.py -m run_dir=a,b hydra/launcher=submitit_local   # one job per run dir

Config: conf/analyze.yaml. The work is done by ``induction_dynamics.analysis.pipeline.analyze``.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

import induction_dynamics.analysis.config  # noqa: F401  (registers the config schema)
from induction_dynamics.analysis.pipeline import analyze
from induction_dynamics.analysis.runs import AnalysisError


@hydra.main(version_base="1.3", config_path="conf", config_name="analyze")
def main(cfg: DictConfig) -> None:
    try:
        analyze(cfg)
    except AnalysisError as e:  # bad input: one clear line, no traceback
        logging.getLogger("analyze").debug("analysis failed", exc_info=True)
        print(f"analyze_checkpoints.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
