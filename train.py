"""Train a GPT and write its checkpoint history: ``python train.py [overrides]``.

    python train.py                                  # CPU-friendly default on Shakespeare
    python train.py model=baby_shakespeare           # nanoGPT's shakespeare_char (GPU)
    python train.py experiment=synthetic_attn_only   # attention-only model on repeated tokens
    python train.py train.resume=true hydra.run.dir=outputs/2025-01-01/12-00-00   # continue a run
    torchrun --standalone --nproc_per_node=8 train.py model=baby_shakespeare   # DDP (docs/scaling.md)

Configuration: conf/ (groups model, data, optim, checkpoint, monitor, wandb, experiment), typed by
src/induction_dynamics/training/config.py. Errors in the configuration or the data print one line and
exit with status 2; set HYDRA_FULL_ERROR=1 for the full traceback. SIGTERM, SIGUSR1 or SIGUSR2
(a scheduler's warning before it kills the job) stop training after the current iteration with a
resume point, and the process exits with status 75 (``preempt.EXIT_REQUEUE``: run it again with
train.resume=true; a job SLURM requeues resumes by itself).
"""

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from induction_dynamics.cli import (
    agree_run_dir,
    hydra_overrides_for_rank,
    main_wrapper,
    multirun_show_cfg,
    one_line_errors,
    thread_budget,
)
from induction_dynamics.errors import ConfigError
from induction_dynamics.training.config import (
    check_renamed_overrides,
    run_names,
    validate,
)
from induction_dynamics.training.preempt import EXIT_REQUEUE, slurm_restarted

log = logging.getLogger("train")


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
    if slurm_restarted() and not cfg.train.resume:  # requeued after a stop signal or a preemption
        log.warning("SLURM restarted this job (SLURM_RESTART_COUNT=%s): train.resume=true",
                    os.environ["SLURM_RESTART_COUNT"])
        cfg.train.resume = True
    validate(cfg)  # before importing torch: a bad value fails in about a second
    from induction_dynamics.training import distributed  # torch from here on
    from induction_dynamics.training.loop import train

    if distributed.under_torchrun() and hc.mode == RunMode.MULTIRUN:
        raise ConfigError("torchrun runs one training; launch a sweep (-m) without torchrun")
    # parallel jobs (joblib, submitit, torchrun ranks) share the cores: cores // processes threads each
    distributed.set_worker_threads(thread_budget(hc.launcher if hc.mode == RunMode.MULTIRUN else None))
    dist = distributed.setup(cfg.train.device)  # torchrun: join the process group; else one process
    try:
        run_dir = agree_run_dir(dist, hc.runtime.output_dir)  # rank 0's, on every rank
        result = train(cfg, run_dir=run_dir, dist=dist)
    finally:
        distributed.cleanup(dist)
    if result["stopped_by"]:  # resume.pt written, W&B finished: "run me again" (preempt.py)
        raise SystemExit(EXIT_REQUEUE)
    return result["val_loss"]  # a sweeper (e.g. Optuna) can minimise it


if __name__ == "__main__":
    if int(os.environ.get("RANK", "0")) > 0:  # torchrun: Hydra's files come from rank 0 (docs/scaling.md)
        sys.argv += hydra_overrides_for_rank()
    sys.argv = multirun_show_cfg(sys.argv)  # -m ... --cfg hydra: show a sweep job's launcher config

    def main():
        check_renamed_overrides(sys.argv[1:])  # probe.every=... names monitor.every, in one line
        hydra_main()

    sys.exit(main_wrapper(main))
