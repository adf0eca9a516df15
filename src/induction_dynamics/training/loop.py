"""``train(cfg)``: nanoGPT's training loop with a checkpoint history, exact resume and a live induction monitor.

One pure function (``train.py`` is a thin ``@hydra.main`` around it). ``train`` sets up a
``Run`` (``setup.py``: data, model, optimizer, W&B), then loops over named steps; at
iteration ``it`` (the state after ``it`` optimizer steps), in this order::

    evaluate  (it % eval_every == 0 or last)  -> val/loss, train/eval_loss, W&B
    monitor   (it % monitor.every == 0 or last) -> monitor/*, W&B
    save      (it in checkpoint.history_steps(...)) -> checkpoints/step_XXXXXX.pt + manifest.json;
              (history steps and evals) -> resume.pt (optimizer, RNG, data position)
    step      one optimizer step: grad_accum micro-batches, clip, AdamW, warm-up + cosine lr
    log_train (it % log_every == 0 or last)   -> train/loss, train/grad_norm, train/lr, W&B

A stop signal (SIGTERM, SIGUSR1, SIGUSR2: ``preempt.py``) ends the loop before the next step:
resume.pt at that iteration, W&B finished, ``summary["stopped_by"]`` set (train.py then exits
with ``preempt.EXIT_REQUEUE``); nothing computed is lost.

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
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from induction_dynamics import checkpoint as ckpt_io
from induction_dynamics import run_dir as layout
from induction_dynamics.data import BatchSampler, curriculum_args
from induction_dynamics.errors import TrainingError
from induction_dynamics.training.config import validate
from induction_dynamics.training.distributed import DistContext
from induction_dynamics.training.preempt import EXIT_REQUEUE, StopSignals
from induction_dynamics.training.setup import Run, setup

log = logging.getLogger(__name__)

EVAL_SEED = 1_000_003  # eval batches are the same at every evaluation, for every seed


def get_lr(it: int, lr: float, min_lr: float, warmup_iters: int, lr_decay_iters: int) -> float:
    """nanoGPT's schedule: linear warm-up, cosine decay to min_lr, then min_lr."""
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


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
        path = layout.history_path(run.run_dir, run.iter_num)
        ckpt_io.save_atomic(run.checkpoint(val_loss), path)
        layout.record_checkpoint(path)
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
    last monitor metrics, checkpoint steps, tokens/s; ``stopped_by``: the signal's name when
    SIGTERM/SIGUSR1/SIGUSR2 ended the run early with a resume point, see ``preempt.py``).
    Raises ConfigError / DataError / CheckpointError / TrainingError with one-line messages.
    """
    dist = dist or DistContext()
    cfg = copy.deepcopy(cfg)  # names get filled in below; the caller's config stays as it was
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig
        run_dir = HydraConfig.get().runtime.output_dir
    validate(cfg)
    with StopSignals() as stop:  # from the start: a signal during setup stops after iteration 0's save
        run = setup(cfg, Path(run_dir), dist)
        start_iter = run.iter_num
        _loop(run, stop)
    if run.summary["stopped_by"]:
        stop.forward()  # the launcher's own handler, if any (submitit's requeues the job and exits there)
    summary = run.summary
    summary.update(iter_num=run.iter_num, tokens_seen=run.tokens_seen, wandb_mode=run.wb.mode if run.wb else None,
                   wandb_run_id=run.wb.run_id if run.wb else None,
                   tokens_per_sec=(run.iter_num - start_iter) * run.tokens_per_iter / max(summary["elapsed_s"], 1e-9),
                   checkpoints=[s for s, _ in layout.list_checkpoints(run.run_dir)])
    return summary


def _loop(run: Run, stop: StopSignals) -> None:
    """The named steps until max_iters or a stop signal; W&B finished either way."""
    t, main = run.cfg.train, run.dist.is_main
    run.summary.update({"run_dir": str(run.run_dir), "monitor": {}, "train_loss": None, "val_loss": run.last_val,
                        "stopped_by": None})
    timing = run.summary["timing_s"] = {"eval": 0.0, "monitor": 0.0, "checkpoint": 0.0}  # seconds inside the loop
    t_start = time.perf_counter()
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
                run.summary["elapsed_s"] = time.perf_counter() - t_start  # the loop only, not W&B's finish
                if run.iter_num == t.max_iters:
                    break
                # Here, before the step, everything due at this iteration is done, and a run resumed
                # from it skips exactly that (Run.due). Every rank asks: all stop at the same step.
                if run.dist.any(stop.requested):
                    run.summary["stopped_by"] = stop.name or "a signal to another rank"
                    if main and not (is_history or is_eval) and run.iter_num != run.resumed_at:
                        save(run, False, None)  # resume.pt at this iteration (else written just above)
                    log.warning("stopped at iteration %d by %s: %s holds it; exiting with status %d "
                                "(continue with train.resume=true)", run.iter_num, run.summary["stopped_by"],
                                run.resume_file, EXIT_REQUEUE)
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
    if run.summary["stopped_by"]:
        run.dist.barrier()  # rank 0 has written resume.pt and finished W&B: the ranks exit together
