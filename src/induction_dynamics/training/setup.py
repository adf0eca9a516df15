"""A training run's state (``Run``) and how it is set up: data, model, optimizer, resume, W&B.

``setup(cfg, run_dir, dist)`` does every check before the first file is written: a bad
config, missing data or a broken ``resume.pt`` fails here with one line. A resumed run takes
its saved config, except the keys of ``RUNTIME_KEYS``, and restores the weights, optimizer,
data position and every RNG, so it continues exactly where it stopped. The loop that then
runs on the ``Run``: ``loop.py``.
"""

from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from induction_dynamics import checkpoint as ckpt_io
from induction_dynamics import run_dir as layout
from induction_dynamics.data import (
    BatchSampler,
    TokenData,
    curriculum_args,
    load_run_data,
)
from induction_dynamics.errors import CheckpointError, ConfigError
from induction_dynamics.files import write_text
from induction_dynamics.interpretability.metrics import repeat_token_ids
from induction_dynamics.model import GPT, GPTConfig
from induction_dynamics.training.config import (
    run_names,
    to_plain,
    upgrade_saved_config,
    validate,
    validate_tokens,
)
from induction_dynamics.training.distributed import DistContext
from induction_dynamics.training.monitor import InductionMonitor
from induction_dynamics.wandb_logger import WandbLogger

log = logging.getLogger(__name__)

# keys a resumed run may change; everything else comes from the saved config
RUNTIME_KEYS = ("train.resume", "train.device", "train.compile", "train.progress", "wandb.mode")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available here; use train.device=cpu or auto")
    return torch.device(name)


def _resume_config(cfg, saved: dict):
    """The saved run's config, with only RUNTIME_KEYS taken from ``cfg``; warn about the rest."""
    merged = OmegaConf.merge(cfg, saved)  # typed (cfg's schema), with the saved values
    differ = []
    now = to_plain(cfg)
    for key in _flat_keys(now):
        if key in RUNTIME_KEYS:
            OmegaConf.update(merged, key, OmegaConf.select(cfg, key), merge=False)
        elif key not in ("wandb.group", "wandb.name") and OmegaConf.select(merged, key) != OmegaConf.select(cfg, key):
            differ.append(key)
    if differ:
        log.warning("resume: continuing with the run's saved config; ignoring different values for %s",
                    ", ".join(differ))
    return merged


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        keys += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return keys


@dataclass
class Run:
    """Everything one training run holds while it trains (set up by ``setup``)."""

    cfg: object
    run_dir: Path
    dist: DistContext
    device: torch.device
    data: TokenData
    allowed: torch.Tensor               # (n_allowed,) token ids the repeats and the monitor draw from
    sampler: BatchSampler
    monitor: InductionMonitor | None
    gptconf: GPTConfig
    raw_model: GPT                      # the un-wrapped model: state_dict, hooks, the monitor
    model: torch.nn.Module              # what the step runs: compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer
    autocast: contextlib.AbstractContextManager
    plain: dict                         # the resolved config as a plain dict (saved in checkpoints)
    history_steps: set[int]
    iter_num: int = 0
    tokens_seen: int = 0
    last_val: float | None = None
    lr: float = 0.0
    resumed_at: int | None = None       # the iteration resume.pt held, when resumed
    wb: WandbLogger | None = None
    summary: dict = field(default_factory=dict)
    # device-side sums since the last log_train (read back there, not per micro-step)
    loss_sum: torch.Tensor | None = None
    grad_norm_sum: torch.Tensor | None = None
    n_steps: int = 0
    t_log: float = 0.0
    it_log: int = 0

    @property
    def tokens_per_iter(self) -> int:
        t = self.cfg.train
        return t.grad_accum * t.batch_size * self.cfg.model.block_size

    @property
    def resume_file(self) -> Path:
        return layout.resume_path(self.run_dir)

    def due(self, every: int) -> bool:
        """At this iteration, every ``every`` iterations and at the last; never twice for the
        iteration a resumed run starts at (it was done before resume.pt was written)."""
        it = self.iter_num
        return it != self.resumed_at and (it % every == 0 or it == self.cfg.train.max_iters)

    def checkpoint(self, val_loss) -> dict:
        return {"model": self.raw_model.state_dict(), "model_args": asdict(self.gptconf), "iter_num": self.iter_num,
                "step": self.iter_num, "tokens_seen": self.tokens_seen,
                **self.data.checkpoint_entries(), "config": self.plain, "val_loss": val_loss}


def _load_resume(cfg, run_dir: Path):
    """(the config to train with, resume.pt's contents or None); checks done before any file is written."""
    resume_file = layout.resume_path(run_dir)
    if cfg.train.resume:  # a kill during a save leaves only a temporary file: drop it
        for tmp in [*run_dir.glob(".*.tmp"), *run_dir.glob("checkpoints/.*.tmp")]:
            tmp.unlink(missing_ok=True)
    if cfg.train.resume and resume_file.exists():
        resume = ckpt_io.load_checkpoint(resume_file)
        missing = {"optimizer", "rng", "sampler", "iter_num", "tokens_seen", "config"} - set(resume)
        if missing:
            raise CheckpointError(f"not a resume file (no {', '.join(sorted(missing))}): {resume_file}")
        cfg = _resume_config(cfg, upgrade_saved_config(resume["config"]))  # a run from before a rename too
        validate(cfg)
        return cfg, resume
    if cfg.train.resume:  # "resume if there is anything to resume": a fresh run dir just starts
        (log.warning if layout.list_checkpoints(run_dir) else log.info)(
            "train.resume=true but %s does not exist: starting from iteration 0", resume_file)
    elif layout.list_checkpoints(run_dir):
        raise ConfigError(f"{run_dir} already holds checkpoints; continue it with train.resume=true "
                          "or choose another hydra.run.dir")
    return cfg, None


def setup(cfg, run_dir: Path, dist: DistContext) -> Run:
    cfg, resume = _load_resume(cfg, run_dir)
    if cfg.wandb.group is None or cfg.wandb.name is None:  # train.py fills them from Hydra's choices
        cfg.wandb.group, cfg.wandb.name = run_names(cfg)
    device = dist.device or pick_device(cfg.train.device)  # under torchrun: cuda:LOCAL_RANK or cpu
    t, o = cfg.train, cfg.optim

    # ---- data, repeat tokens (all checks done before the first file is written)
    data = load_run_data(cfg.data)
    allowed = repeat_token_ids(data.vocab_size, data.counts)  # (n_allowed,) repeats and the monitor draw from these
    validate_tokens(cfg, len(allowed), data.vocab_size)
    if t.batch_size % dist.world_size:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the {dist.world_size} processes")
    sampler = BatchSampler(data.train, t.batch_size, cfg.model.block_size, cfg.seed, **curriculum_args(cfg.data),
                           allowed_ids=allowed, token_weights=data.counts)  # unigram segments: train frequencies
    monitor = (InductionMonitor(data.vocab_size, data.counts, cfg.monitor.seq_len, cfg.monitor.batch_size,
                                seed=cfg.monitor.seed, device=device) if cfg.monitor.enabled else None)

    # ---- model and optimizer (seeded: same seed -> same initial weights)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    gptconf = GPTConfig(**{**OmegaConf.to_container(cfg.model), "vocab_size": cfg.model.vocab_size or data.vocab_size})
    raw_model = GPT(gptconf).to(device)
    optimizer = raw_model.configure_optimizers(o.weight_decay, o.lr, (o.beta1, o.beta2), device.type)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    run = Run(cfg=cfg, run_dir=run_dir, dist=dist, device=device, data=data, allowed=allowed, sampler=sampler,
              monitor=monitor, gptconf=gptconf, raw_model=raw_model, model=raw_model, optimizer=optimizer,
              autocast=torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext(),
              plain=to_plain(cfg),
              history_steps=set(ckpt_io.history_steps(t.max_iters, cfg.checkpoint.every, cfg.checkpoint.schedule)))
    if resume is not None:
        raw_model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        sampler.load_state_dict(resume["sampler"])
        ckpt_io.set_rng_state(resume["rng"], device)
        run.iter_num, run.tokens_seen, run.last_val = resume["iter_num"], resume["tokens_seen"], resume.get("val_loss")
        run.resumed_at = run.iter_num
        log.info("resumed from %s at iteration %d", run.resume_file, run.iter_num)
    dist.check_same(run.iter_num, f"the torchrun processes do not all see {run.resume_file} at the same "
                                  "iteration; the run directory must be on a filesystem shared by every node")
    run.model = dist.wrap(torch.compile(raw_model) if t.compile else raw_model)  # DDP under torchrun

    if resume is not None and run.iter_num >= t.max_iters:
        log.info("%s is already complete (iteration %d of %d); nothing to do", run_dir, run.iter_num, t.max_iters)
    elif dist.is_main:
        write_text(run_dir / "config.yaml", OmegaConf.to_yaml(run.plain))  # analysis never reads half a config
        state = layout.wandb_state_path(run_dir)
        if resume is None:  # a run that starts at iteration 0 is a new W&B run
            state.unlink(missing_ok=True)
        run.wb = WandbLogger(mode=cfg.wandb.mode, project=cfg.wandb.project, group=cfg.wandb.group,
                             name=cfg.wandb.name, job_type="train", config=run.plain, dir=run_dir, state_file=state)
    log.info("model: %.2fM parameters, %d tokens/iteration, device %s%s, %d torch threads%s",
             raw_model.get_num_params() / 1e6, run.tokens_per_iter, device, " (bf16 autocast)" if use_bf16 else "",
             torch.get_num_threads(), f", DDP over {dist.world_size} processes" if dist.enabled else "")
    return run
