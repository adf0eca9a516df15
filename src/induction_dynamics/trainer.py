"""``train(cfg)``: nanoGPT's training loop with a checkpoint history, exact resume and a live induction monitor.

One pure function (``train.py`` is a thin ``@hydra.main`` around it). ``train`` sets up a
``Run`` (data, model, optimizer, W&B), then loops over named steps; at iteration ``it`` (the
state after ``it`` optimizer steps), in this order::

    evaluate  (it % eval_every == 0 or last)  -> val/loss, train/eval_loss, W&B
    monitor   (it % monitor.every == 0 or last) -> monitor/*, W&B
    save      (it in checkpoint.history_steps(...)) -> checkpoints/step_XXXXXX.pt + manifest.json;
              (history steps and evals) -> resume.pt (optimizer, RNG, data position)
    step      one optimizer step: grad_accum micro-batches, clip, AdamW, warm-up + cosine lr
    log_train (it % log_every == 0 or last)   -> train/loss, train/grad_norm, train/lr, W&B

As in nanoGPT, the loss is read back from the device (``.item()``, an all-reduce under DDP)
only at log intervals, never per micro-step: a GPU is not stalled to print a number. The
check for a non-finite loss runs there too; a checkpoint is never written from non-finite
weights.

Evaluation and the monitor draw from their own generators and run in eval mode, so they never
change the training trajectory: same seed -> bitwise-identical weights on CPU, and a run
resumed from ``resume.pt`` ends with the weights of an uninterrupted one.

Distributed-ready: every rank draws the same global batch (train.batch_size rows) and keeps
its slice ``[rank*b:(rank+1)*b]``, so the data order does not depend on the number of
processes; files, W&B and the monitor belong to the main rank (``DistContext.is_main``).

Over 400 lines on purpose: the loop, its named steps and the ``Run`` state they share read top
to bottom in one file, as nanoGPT's train.py does; what stands on its own lives elsewhere
(``checkpoint``, ``monitor``, ``data``, ``wandb_utils``, ``distributed``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from induction_dynamics import checkpoint as ckpt_io
from induction_dynamics import run_files
from induction_dynamics.config import (ConfigError, run_names, to_plain, upgrade_saved_config, validate,
                                       validate_tokens)
from induction_dynamics.data import BatchSampler, TokenData, curriculum_args, load_run_data
from induction_dynamics.distributed import DistContext
from induction_dynamics.files import write_text
from induction_dynamics.interpretability.metrics import repeat_token_ids
from induction_dynamics.model import GPT, GPTConfig
from induction_dynamics.monitor import InductionMonitor
from induction_dynamics.wandb_utils import WandbLogger

log = logging.getLogger(__name__)

EVAL_SEED = 1_000_003  # eval batches are the same at every evaluation, for every seed
# keys a resumed run may change; everything else comes from the saved config
RUNTIME_KEYS = ("train.resume", "train.device", "train.compile", "train.progress", "wandb.mode")


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss). The message is one line."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available here; use train.device=cpu or auto")
    return torch.device(name)


def get_lr(it: int, lr: float, min_lr: float, warmup_iters: int, lr_decay_iters: int) -> float:
    """nanoGPT's schedule: linear warm-up, cosine decay to min_lr, then min_lr."""
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


# --------------------------------------------------------------------------- helpers

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


@torch.no_grad()
def _estimate_loss(model, data: torch.Tensor, cfg, dist, device, autocast, repeat: bool, allowed,
                   weights: torch.Tensor) -> float:
    """Mean loss over eval_iters batches (nanoGPT's estimate_loss) from a fresh generator with a
    fixed seed: the same batches at every evaluation, and the training RNG is never touched.
    ``repeat``: write the training curriculum's repeats into the windows too, ``unigram``
    segments drawn from ``weights`` (the training split's token counts, as in training)."""
    sampler = BatchSampler(data, cfg.train.batch_size, cfg.model.block_size, EVAL_SEED,
                           **(curriculum_args(cfg.data) if repeat else {}), allowed_ids=allowed,
                           token_weights=weights)
    losses = torch.zeros(cfg.train.eval_iters)
    for k in range(cfg.train.eval_iters):
        x, y = sampler.sample()  # (B, T) global batch
        with autocast:
            _, loss = model(dist.my_rows(x).to(device), dist.my_rows(y).to(device))
        losses[k] = loss.float().item()
    return dist.mean(losses.mean().item())  # equal shards: the mean of rank means is the global mean


# --------------------------------------------------------------------------- the run

@dataclass
class Run:
    """Everything one training run holds while it trains (set up by ``_setup``)."""

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
        return ckpt_io.resume_path(self.run_dir)

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
    resume_file = ckpt_io.resume_path(run_dir)
    if cfg.train.resume:  # a kill during a save leaves only a temporary file: drop it
        for tmp in [*run_dir.glob(".*.tmp"), *run_dir.glob("checkpoints/.*.tmp")]:
            tmp.unlink(missing_ok=True)
    if cfg.train.resume and resume_file.exists():
        resume = ckpt_io.load_checkpoint(resume_file)
        missing = {"optimizer", "rng", "sampler", "iter_num", "tokens_seen", "config"} - set(resume)
        if missing:
            raise ckpt_io.CheckpointError(f"not a resume file (no {', '.join(sorted(missing))}): {resume_file}")
        cfg = _resume_config(cfg, upgrade_saved_config(resume["config"]))  # a run from before a rename too
        validate(cfg)
        return cfg, resume
    if cfg.train.resume:  # "resume if there is anything to resume": a fresh run dir just starts
        (log.warning if ckpt_io.list_checkpoints(run_dir) else log.info)(
            "train.resume=true but %s does not exist: starting from iteration 0", resume_file)
    elif ckpt_io.list_checkpoints(run_dir):
        raise ConfigError(f"{run_dir} already holds checkpoints; continue it with train.resume=true "
                          "or choose another hydra.run.dir")
    return cfg, None


def _setup(cfg, run_dir: Path, dist: DistContext) -> Run:
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
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "config.yaml", OmegaConf.to_yaml(run.plain))  # analysis never reads half a config
        state = run_files.wandb_state_path(run_dir)
        if resume is None:  # a run that starts at iteration 0 is a new W&B run
            state.unlink(missing_ok=True)
        run.wb = WandbLogger(mode=cfg.wandb.mode, project=cfg.wandb.project, group=cfg.wandb.group,
                             name=cfg.wandb.name, job_type="train", config=run.plain, dir=run_dir, state_file=state)
    log.info("model: %.2fM parameters, %d tokens/iteration, device %s%s, %d torch threads%s",
             raw_model.get_num_params() / 1e6, run.tokens_per_iter, device, " (bf16 autocast)" if use_bf16 else "",
             torch.get_num_threads(), f", DDP over {dist.world_size} processes" if dist.enabled else "")
    return run


# --------------------------------------------------------------------------- the named steps

def evaluate(run: Run) -> None:
    """val/loss, train/eval_loss (and val/loss_repeats under a repeat curriculum), in eval mode."""
    cfg, model = run.cfg, run.model
    model.eval()

    def loss(split, repeat):
        return _estimate_loss(model, split, cfg, run.dist, run.device, run.autocast, repeat, run.allowed,
                              run.data.counts)

    run.last_val = loss(run.data.val, False)
    metrics = {"val/loss": run.last_val, "train/eval_loss": loss(run.data.train, True)}
    if cfg.data.repeat_frac > 0:  # the val text with the training curriculum's repeats
        metrics["val/loss_repeats"] = loss(run.data.val, True)
    model.train()
    run.summary["val_loss"] = run.last_val
    log.info("iter %d: val loss %.4f, train loss %.4f", run.iter_num, run.last_val, metrics["train/eval_loss"])
    if run.wb:
        run.wb.log(metrics, step=run.iter_num, stream="eval")


def monitor(run: Run) -> None:
    """The live induction monitor on the un-compiled model (hooks need eager mode)."""
    run.summary["monitor"] = run.monitor(run.raw_model)
    if run.wb:
        run.wb.log(run.summary["monitor"], step=run.iter_num, stream="monitor")


def save(run: Run, history: bool, val_loss) -> None:
    """History checkpoint (+ its sha256 in the manifest) when ``history``; resume.pt always."""
    if not all(torch.isfinite(p).all() for p in run.raw_model.parameters()):
        raise TrainingError(f"non-finite weights at iteration {run.iter_num}; stopped. The last good "
                            f"checkpoints are in {run.run_dir / 'checkpoints'} and {run.resume_file}")
    if history:
        path = ckpt_io.history_path(run.run_dir, run.iter_num)
        ckpt_io.save_atomic(run.checkpoint(val_loss), path)
        run_files.record_checkpoint(path)
    state = run.checkpoint(run.last_val)
    state.update(optimizer=run.optimizer.state_dict(), rng=ckpt_io.rng_state(run.device), sampler=run.sampler.state_dict())
    ckpt_io.save_atomic(state, run.resume_file)


def step(run: Run) -> None:
    """One optimizer step over grad_accum micro-batches; the loss stays on the device."""
    t, o = run.cfg.train, run.cfg.optim
    lr = get_lr(run.iter_num, o.lr, o.min_lr, o.warmup_iters, o.lr_decay_iters or t.max_iters)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(t.grad_accum):
        x, y = run.sampler.sample()  # (B, T) global batch, identical on every rank
        x, y = run.dist.my_rows(x).to(run.device), run.dist.my_rows(y).to(run.device)  # (B / world_size, T)
        with run.dist.sync_grads(run.model, sync=micro == t.grad_accum - 1):  # DDP all-reduces once per step
            with run.autocast:
                _, loss = run.model(x, y)
            (loss / t.grad_accum).backward()
        loss_sum += loss.detach().float() / t.grad_accum
    # the global norm before clipping; max_norm=inf only measures it (grads scaled by exactly 1)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), o.grad_clip if o.grad_clip > 0 else math.inf)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.iter_num += 1
    run.tokens_seen += run.tokens_per_iter
    run.loss_sum = loss_sum if run.loss_sum is None else run.loss_sum + loss_sum
    grad_norm = grad_norm.detach().float()
    run.grad_norm_sum = grad_norm if run.grad_norm_sum is None else run.grad_norm_sum + grad_norm
    run.n_steps += 1
    run.lr = lr


def log_train(run: Run) -> float:
    """Mean train loss and grad norm since the last call, read back from the device here only;
    returns tokens/s over the interval."""
    now = time.perf_counter()
    loss = run.dist.mean(run.loss_sum.item() / run.n_steps)  # every rank sees the same loss
    grad_norm = run.dist.mean(run.grad_norm_sum.item() / run.n_steps)
    if not math.isfinite(loss):  # every rank stops together
        raise TrainingError(
            f"loss is {loss} at iterations {run.it_log + 1}-{run.iter_num}; stopped. The last good checkpoints are "
            f"in {run.run_dir / 'checkpoints'} and {run.resume_file} (try a lower optim.lr or optim.grad_clip=1)")
    tok_s = (run.iter_num - run.it_log) * run.tokens_per_iter / max(now - run.t_log, 1e-9)
    run.summary["train_loss"] = loss
    if run.wb:
        run.wb.log({"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": run.lr,
                    "train/tokens_per_sec": tok_s, "train/tokens_seen": run.tokens_seen},
                   step=run.iter_num, stream="train")
    run.loss_sum = run.grad_norm_sum = None
    run.n_steps, run.t_log, run.it_log = 0, now, run.iter_num
    return tok_s


# --------------------------------------------------------------------------- train

def train(cfg, run_dir: str | Path | None = None, dist: DistContext | None = None) -> dict:
    """Train a GPT as configured; write checkpoints, resume file and W&B run into ``run_dir``.

    ``run_dir`` defaults to Hydra's output directory. Returns a summary dict (final losses,
    last monitor metrics, checkpoint steps, tokens/s). Raises ConfigError / DataError /
    CheckpointError / TrainingError with one-line messages.
    """
    dist = dist or DistContext()
    cfg = copy.deepcopy(cfg)  # names get filled in below; the caller's config stays as it was
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig
        run_dir = HydraConfig.get().runtime.output_dir
    validate(cfg)
    run = _setup(cfg, Path(run_dir), dist)
    t, main = run.cfg.train, dist.is_main
    run.summary.update({"run_dir": str(run.run_dir), "monitor": {}, "train_loss": None, "val_loss": run.last_val})
    timing = run.summary["timing_s"] = {"eval": 0.0, "monitor": 0.0, "checkpoint": 0.0}  # seconds inside the loop
    start_iter, t_start = run.iter_num, time.perf_counter()
    run.t_log, run.it_log = t_start, run.iter_num
    bar = tqdm(total=t.max_iters, initial=run.iter_num, disable=not (main and t.progress), unit="it",
               dynamic_ncols=True)
    run.model.train()
    try:
        with logging_redirect_tqdm():
            while True:
                t0 = time.perf_counter()
                is_eval = run.due(t.eval_every)
                if is_eval:
                    evaluate(run)
                t1 = time.perf_counter()
                if run.monitor is not None and main and run.due(run.cfg.monitor.every):
                    monitor(run)
                t2 = time.perf_counter()
                is_history = run.iter_num in run.history_steps and run.iter_num != run.resumed_at
                if main and (is_history or is_eval):
                    save(run, is_history, run.last_val if is_eval else None)
                for key, dt in (("eval", t1 - t0), ("monitor", t2 - t1), ("checkpoint", time.perf_counter() - t2)):
                    timing[key] += dt
                if run.iter_num == t.max_iters:
                    run.summary["elapsed_s"] = time.perf_counter() - t_start  # the loop only, not W&B's finish
                    break
                step(run)
                bar.update(1)
                if run.iter_num % t.log_every == 0 or run.iter_num == t.max_iters:
                    tok_s = log_train(run)
                    bar.set_postfix(loss=f"{run.summary['train_loss']:.4f}", tok_s=f"{tok_s:,.0f}")
    finally:
        bar.close()
        if run.wb:
            run.wb.summary({"final/val_loss": run.summary["val_loss"], "final/iter": run.iter_num,
                            **{f"final/{k}": v for k, v in run.summary["monitor"].items() if k.count("/") == 1}})
            run.wb.finish()
    summary = run.summary
    elapsed = summary["elapsed_s"]
    summary.update(iter_num=run.iter_num, tokens_seen=run.tokens_seen, wandb_mode=run.wb.mode if run.wb else None,
                   wandb_run_id=run.wb.run_id if run.wb else None,
                   tokens_per_sec=(run.iter_num - start_iter) * run.tokens_per_iter / max(elapsed, 1e-9),
                   checkpoints=[s for s, _ in ckpt_io.list_checkpoints(run.run_dir)])
    return summary
