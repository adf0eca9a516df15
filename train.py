"""Train a GPT and write its checkpoint history: ``python train.py [overrides]``.

    python train.py                                  # CPU-friendly default on Shakespeare
    python train.py model=baby_shakespeare           # nanoGPT's shakespeare_char (GPU)
    python train.py experiment=synthetic_attn_only   # attention-only model on repeated tokens
    python train.py train.resume=true hydra.run.dir=outputs/2025-01-01/12-00-00   # continue a run

Configuration: conf/ (groups model, data, optim, checkpoint, probe, wandb, experiment), typed by
src/induction_dynamics/config.py. Errors in the configuration or the data print one line and
exit with status 2; set HYDRA_FULL_ERROR=1 for the full traceback.
"""

import os
import sys

import hydra
from omegaconf import DictConfig

from induction_dynamics.cli import main_wrapper, one_line_errors
from induction_dynamics.config import run_names, validate


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
@one_line_errors
def hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    sweep = None
    if hc.mode == RunMode.MULTIRUN:
        parts = os.path.normpath(hc.sweep.dir).split(os.sep)
        sweep = "_".join(parts[-2:])  # outputs/multirun/<date>/<time> -> <date>_<time>
    cfg.wandb.group, cfg.wandb.name = run_names(cfg, experiment=hc.runtime.choices.get("experiment"), sweep=sweep)
    validate(cfg)  # before importing torch: a bad value fails in about a second
    from induction_dynamics.trainer import train

    result = train(cfg, run_dir=hc.runtime.output_dir)
    return result["val_loss"]  # a sweeper (e.g. Optuna) can minimise it


if __name__ == "__main__":
    sys.exit(main_wrapper(hydra_main))
