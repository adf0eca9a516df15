"""``train(cfg)``: nanoGPT's training loop with a checkpoint history, exact resume and a live probe.

One pure function (``train.py`` is a thin ``@hydra.main`` around it). Per iteration ``it``
(the state after ``it`` optimizer steps), in this order::

    eval (it % eval_every == 0 or last)    -> val/loss, train/eval_loss, W&B
    probe (it % probe.every == 0 or last)  -> probe/*, W&B
    history checkpoint (it in checkpoint.history_steps(...)) -> checkpoints/step_XXXXXX.pt
    resume file (at history steps and evals) -> resume.pt (optimizer, RNG, data position)
    optimizer step: grad_accum micro-batches, clip, AdamW with warm-up + cosine lr

Evaluation and the probe draw from their own generators and run in eval mode, so they never
change the training trajectory: same seed -> bitwise-identical weights on CPU, and a run
resumed from ``resume.pt`` ends with the weights of an uninterrupted one.

Distributed-ready: every rank draws the same global batch (train.batch_size rows) and keeps
its slice ``[rank*b:(rank+1)*b]``, so the data order does not depend on the number of
processes; files, W&B and the probe belong to the main rank (``DistContext.is_main``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from induction_dynamics import checkpoint as ckpt_io
from induction_dynamics.config import ConfigError, run_names, to_plain, validate, validate_tokens
from induction_dynamics.data import BatchSampler, curriculum_args, load_data
from induction_dynamics.distributed import DistContext
from induction_dynamics.interpretability.metrics import probe_token_ids
from induction_dynamics.model import GPT, GPTConfig
from induction_dynamics.probe import InductionProbe
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


# --------------------------------------------------------------------------- RNG state

def rng_state(device: torch.device) -> dict:
    """Every RNG the process owns, as tensors and plain lists (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
             "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


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


# --------------------------------------------------------------------------- train

def train(cfg, run_dir: str | Path | None = None, dist: DistContext | None = None) -> dict:
    """Train a GPT as configured; write checkpoints, resume file and W&B run into ``run_dir``.

    ``run_dir`` defaults to Hydra's output directory. Returns a summary dict (final losses,
    last probe metrics, checkpoint steps, tokens/s). Raises ConfigError / DataError /
    CheckpointError / TrainingError with one-line messages.
    """
    dist = dist or DistContext()
    cfg = copy.deepcopy(cfg)  # names get filled in below; the caller's config stays as it was
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig
        run_dir = HydraConfig.get().runtime.output_dir
    run_dir = Path(run_dir)
    validate(cfg)
    resume_file = ckpt_io.resume_path(run_dir)
    resume = None
    if cfg.train.resume:  # a kill during a save leaves only a temporary file: drop it
        for tmp in [*run_dir.glob(".*.tmp"), *run_dir.glob("checkpoints/.*.tmp")]:
            tmp.unlink(missing_ok=True)
    if cfg.train.resume and resume_file.exists():
        resume = ckpt_io.load_checkpoint(resume_file)
        missing = {"optimizer", "rng", "sampler", "iter_num", "tokens_seen", "config"} - set(resume)
        if missing:
            raise ckpt_io.CheckpointError(f"not a resume file (no {', '.join(sorted(missing))}): {resume_file}")
        cfg = _resume_config(cfg, resume["config"])
        validate(cfg)
    elif cfg.train.resume:  # "resume if there is anything to resume": a fresh run dir just starts
        (log.warning if ckpt_io.list_checkpoints(run_dir) else log.info)(
            "train.resume=true but %s does not exist: starting from iteration 0", resume_file)
    elif ckpt_io.list_checkpoints(run_dir):
        raise ConfigError(f"{run_dir} already holds checkpoints; continue it with train.resume=true "
                          "or choose another hydra.run.dir")
    if cfg.wandb.group is None or cfg.wandb.name is None:  # train.py fills them from Hydra's choices
        cfg.wandb.group, cfg.wandb.name = run_names(cfg)
    device = dist.device or pick_device(cfg.train.device)  # under torchrun: cuda:LOCAL_RANK or cpu
    t, o = cfg.train, cfg.optim

    # ---- data, probe tokens (all checks done before the first file is written)
    data = load_data(cfg.data.name, path=cfg.data.path, cache_dir=cfg.data.cache_dir, val_frac=cfg.data.val_frac,
                     synthetic_vocab_size=cfg.data.synthetic_vocab_size,
                     synthetic_tokens=cfg.data.synthetic_tokens, seed=0)
    allowed = probe_token_ids(data.vocab_size, data.counts)  # (n_allowed,) repeats and probe draw from these
    validate_tokens(cfg, len(allowed))
    if t.batch_size % dist.world_size:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the {dist.world_size} processes")
    d = cfg.data
    sampler = BatchSampler(data.train, t.batch_size, cfg.model.block_size, cfg.seed, **curriculum_args(d),
                           allowed_ids=allowed, token_weights=data.counts)  # unigram segments: train frequencies
    probe = (InductionProbe(data.vocab_size, data.counts, cfg.probe.seq_len, cfg.probe.batch_size,
                            seed=cfg.probe.seed, device=device) if cfg.probe.enabled else None)

    # ---- model and optimizer (seeded: same seed -> same initial weights)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    gptconf = GPTConfig(vocab_size=data.vocab_size, **OmegaConf.to_container(cfg.model))
    raw_model = GPT(gptconf).to(device)
    optimizer = raw_model.configure_optimizers(o.weight_decay, o.lr, (o.beta1, o.beta2), device.type)
    iter_num, tokens_seen, last_val = 0, 0, None
    if resume is not None:
        raw_model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        sampler.load_state_dict(resume["sampler"])
        set_rng_state(resume["rng"], device)
        iter_num, tokens_seen, last_val = resume["iter_num"], resume["tokens_seen"], resume.get("val_loss")
        log.info("resumed from %s at iteration %d", resume_file, iter_num)
    dist.check_same(iter_num, f"the torchrun processes do not all see {resume_file} at the same iteration; "
                              "the run directory must be on a filesystem shared by every node")
    model = dist.wrap(torch.compile(raw_model) if t.compile else raw_model)  # DDP under torchrun
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    plain = to_plain(cfg)
    steps = set(ckpt_io.history_steps(t.max_iters, cfg.checkpoint.every, cfg.checkpoint.schedule))
    lr_decay_iters = o.lr_decay_iters or t.max_iters
    tokens_per_iter = t.grad_accum * t.batch_size * cfg.model.block_size
    wb = None
    if resume is not None and iter_num >= t.max_iters:
        log.info("%s is already complete (iteration %d of %d); nothing to do", run_dir, iter_num, t.max_iters)
    elif dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / ".config.yaml.tmp"
        tmp.write_text(OmegaConf.to_yaml(plain))
        tmp.replace(run_dir / "config.yaml")  # atomic: analysis never reads half a config
        wb = WandbLogger(mode=cfg.wandb.mode, project=cfg.wandb.project, group=cfg.wandb.group,
                         name=cfg.wandb.name, job_type="train", config=plain, dir=run_dir)
    log.info("model: %.2fM parameters, %d tokens/iteration, device %s%s, %d torch threads%s",
             raw_model.get_num_params() / 1e6, tokens_per_iter, device, " (bf16 autocast)" if use_bf16 else "",
             torch.get_num_threads(), f", DDP over {dist.world_size} processes" if dist.enabled else "")

    def history(step: int, val_loss) -> dict:
        return {"model": raw_model.state_dict(), "model_args": asdict(gptconf), "iter_num": step, "step": step,
                "tokens_seen": tokens_seen, "vocab": list(data.vocab), "token_counts": data.counts.tolist(),
                "config": plain, "val_loss": val_loss}

    def save_resume(step: int) -> None:
        state = history(step, last_val)
        state.update(optimizer=optimizer.state_dict(), rng=rng_state(device), sampler=sampler.state_dict())
        ckpt_io.save_atomic(state, resume_file)

    summary = {"run_dir": str(run_dir), "probe": {}, "train_loss": None, "val_loss": last_val}
    timing = summary["timing_s"] = {"eval": 0.0, "probe": 0.0, "checkpoint": 0.0}  # seconds inside the loop
    start_iter, t_start = iter_num, time.perf_counter()
    t_log, it_log, loss_sum, loss_n = t_start, iter_num, 0.0, 0
    bar = tqdm(total=t.max_iters, initial=iter_num, disable=not (dist.is_main and t.progress), unit="it",
               dynamic_ncols=True)
    model.train()
    try:
        with logging_redirect_tqdm():
            while True:
                last = iter_num == t.max_iters
                fresh = not (resume is not None and iter_num == start_iter)  # done before the resume file
                is_eval = fresh and (iter_num % t.eval_every == 0 or last)
                t0 = time.perf_counter()
                if is_eval:
                    model.eval()
                    last_val = _estimate_loss(model, data.val, cfg, dist, device, autocast, False, allowed, data.counts)
                    metrics = {"val/loss": last_val,
                               "train/eval_loss": _estimate_loss(model, data.train, cfg, dist, device, autocast, True,
                                                                 allowed, data.counts)}
                    if d.repeat_frac > 0:  # the val text with the training curriculum's repeats
                        metrics["val/loss_repeats"] = _estimate_loss(model, data.val, cfg, dist, device, autocast, True,
                                                                     allowed, data.counts)
                    model.train()
                    summary["val_loss"] = last_val
                    log.info("iter %d: val loss %.4f, train loss %.4f", iter_num, last_val,
                             metrics["train/eval_loss"])
                    if wb:
                        wb.log(metrics, step=iter_num)
                t1 = time.perf_counter()
                if probe is not None and dist.is_main and fresh and (iter_num % cfg.probe.every == 0 or last):
                    summary["probe"] = probe(raw_model)  # the un-compiled model: hooks need eager mode
                    if wb:
                        wb.log(summary["probe"], step=iter_num)
                t2 = time.perf_counter()
                if dist.is_main and fresh and (iter_num in steps or is_eval):
                    if not all(torch.isfinite(p).all() for p in raw_model.parameters()):
                        raise TrainingError(f"non-finite weights at iteration {iter_num}; stopped. The last good "
                                            f"checkpoints are in {run_dir / 'checkpoints'} and {resume_file}")
                    if iter_num in steps:
                        ckpt_io.save_atomic(history(iter_num, last_val if is_eval else None),
                                            ckpt_io.history_path(run_dir, iter_num))
                    if iter_num in steps or is_eval:
                        save_resume(iter_num)
                t3 = time.perf_counter()
                for key, dt in (("eval", t1 - t0), ("probe", t2 - t1), ("checkpoint", t3 - t2)):
                    timing[key] += dt
                if last:
                    summary["elapsed_s"] = time.perf_counter() - t_start  # the loop only, not W&B's finish
                    break

                # ---- one optimizer step
                lr = get_lr(iter_num, o.lr, o.min_lr, o.warmup_iters, lr_decay_iters)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                step_loss = 0.0
                for micro in range(t.grad_accum):
                    x, y = sampler.sample()  # (B, T) global batch, identical on every rank
                    x, y = dist.my_rows(x).to(device), dist.my_rows(y).to(device)  # (B / world_size, T)
                    with dist.sync_grads(model, sync=micro == t.grad_accum - 1):  # DDP all-reduces once per step
                        with autocast:
                            _, loss = model(x, y)
                        (loss / t.grad_accum).backward()
                    step_loss += loss.item() / t.grad_accum
                step_loss = dist.mean(step_loss)  # every rank sees the same loss (and stops on NaN together)
                if not math.isfinite(step_loss):
                    raise TrainingError(
                        f"loss is {step_loss} at iteration {iter_num}; stopped. The last good checkpoints are in "
                        f"{run_dir / 'checkpoints'} and {resume_file} (try a lower optim.lr or optim.grad_clip=1)")
                if o.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), o.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                iter_num += 1
                tokens_seen += tokens_per_iter
                loss_sum, loss_n = loss_sum + step_loss, loss_n + 1
                bar.update(1)
                if iter_num % t.log_every == 0 or iter_num == t.max_iters:
                    now = time.perf_counter()
                    tok_s = (iter_num - it_log) * tokens_per_iter / max(now - t_log, 1e-9)
                    summary["train_loss"] = loss_sum / loss_n
                    bar.set_postfix(loss=f"{summary['train_loss']:.4f}", tok_s=f"{tok_s:,.0f}")
                    if wb:
                        wb.log({"train/loss": summary["train_loss"], "train/lr": lr, "train/tokens_per_sec": tok_s,
                                "train/tokens_seen": tokens_seen}, step=iter_num)
                    t_log, it_log, loss_sum, loss_n = now, iter_num, 0.0, 0
    finally:
        bar.close()
        if wb:
            wb.summary({"final/val_loss": summary["val_loss"], "final/iter": iter_num,
                        **{f"final/{k}": v for k, v in summary["probe"].items() if k.count("/") == 1}})
            wb.finish()
    elapsed = summary["elapsed_s"]
    summary.update(iter_num=iter_num, tokens_seen=tokens_seen, wandb_mode=wb.mode if wb else None,
                   tokens_per_sec=(iter_num - start_iter) * tokens_per_iter / max(elapsed, 1e-9),
                   checkpoints=[s for s, _ in ckpt_io.list_checkpoints(run_dir)])
    return summary
