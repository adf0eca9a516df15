"""Analyse a checkpoint history: per-head scores, ICL, patching, logit lens -> tables, plots, W&B.

    python analyze_checkpoints.py run_dir=outputs/<run>          # one run
    python analyze_checkpoints.py run_dir=multirun/<sweep>       # every run of a sweep (all seeds)
    python analyze_checkpoints.py run_dir=... watch=true         # follow a training that is running
    python analyze_checkpoints.py run_dir=... plots_only=true    # redraw from saved tables (no torch)
    python analyze_checkpoints.py run_dir=... n_jobs=2           # checkpoints in parallel
    python analyze_checkpoints.py -m run_dir=a,b hydra/launcher=submitit_local   # one job per run dir

Config: conf/analyze.yaml. The work is done by ``induction_dynamics.analysis.driver.analyze``. Bad
input (an unknown key, a wrong type, a missing run_dir, a run without checkpoints) prints one line
and exits with status 2; set HYDRA_FULL_ERROR=1 for the full traceback.
"""

import sys

import hydra
from omegaconf import DictConfig

import induction_dynamics.analysis.config  # noqa: F401  (registers the config schema)
from induction_dynamics.cli import main_wrapper, one_line_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="analyze")
@one_line_errors
def hydra_main(cfg: DictConfig) -> None:
    from induction_dynamics.analysis.driver import analyze

    analyze(cfg)


if __name__ == "__main__":
    sys.exit(main_wrapper(hydra_main))
