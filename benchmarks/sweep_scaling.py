"""Wall time of the analysis sweep vs number of checkpoints and n_jobs.

    OMP_NUM_THREADS=1 python benchmarks/sweep_scaling.py            # 4, 8, 16 checkpoints; n_jobs 1, 2
    python benchmarks/sweep_scaling.py --counts 4 8 16 32 --jobs 1 2 --full

Checkpoints are of the quickstart shape (2 layers x 4 heads x 64 dims, block 64, the
Shakespeare character vocabulary), written in the trainer's format with
``checkpoint.save_atomic``; the weights take a small random step between checkpoints (the
sweep's cost does not depend on what the weights learned). Each timing is a fresh
``analyze(cfg)`` over an empty cache with plots and W&B off (the per-checkpoint part, which
is what scales); ``--full`` adds one run with plots (PNG+PDF) and W&B offline for the largest
count. Run it alone: other processes on the same cores make the figures meaningless.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

import induction_dynamics.analysis.config  # noqa: F401  (registers the schema)
from induction_dynamics.analysis.driver import analyze
from induction_dynamics.checkpoint import save_atomic
from induction_dynamics.data import load_data
from induction_dynamics.model import GPT, GPTConfig
from induction_dynamics.run_dir import history_path

REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, dropout=0.0, bias=False, attn_only=False)
DATA = {"name": "shakespeare", "val_frac": 0.1}


def write_run(run_dir: Path, n_ckpt: int, every: int = 100) -> None:
    torch.manual_seed(0)
    data = load_data(**DATA)
    args = {**SHAPE, "vocab_size": data.vocab_size}
    model = GPT(GPTConfig(**args))
    config = {"seed": 0, "data": DATA, "model": SHAPE, "train": {"max_iters": (n_ckpt - 1) * every},
              "wandb": {"project": "induction-dynamics-bench", "group": "bench", "name": "bench-seed0"}}
    for i in range(n_ckpt):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.002 * torch.randn_like(p))
        step = i * every
        save_atomic({"model": model.state_dict(), "model_args": args, "iter_num": step, "step": step,
                     "tokens_seen": step * 32 * 64, "vocab": data.vocab, "token_counts": data.counts.tolist(),
                     "config": config, "val_loss": None}, history_path(run_dir, step))


def timed(run_dir: Path, *overrides: str) -> float:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("analyze", overrides=[f"run_dir={run_dir}", *overrides])
    shutil.rmtree(run_dir / "analysis", ignore_errors=True)
    t0 = time.perf_counter()
    analyze(cfg)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--full", action="store_true", help="also time plots + W&B offline at the largest count")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.counts:
            run_dir = Path(tmp) / f"run{n}"
            write_run(run_dir, n)
            for jobs in args.jobs:
                wall = timed(run_dir, f"n_jobs={jobs}", "wandb.mode=disabled", "plots.formats=[]")
                rows.append((n, jobs, "tables", wall))
        if args.full:
            n = max(args.counts)
            wall = timed(Path(tmp) / f"run{n}", "n_jobs=1", "wandb.mode=offline")
            rows.append((n, 1, "tables+plots+W&B", wall))
    print(f"\n{'checkpoints':>11} {'n_jobs':>6} {'what':>17} {'wall s':>7} {'s/ckpt':>7}")
    for n, jobs, what, wall in rows:
        print(f"{n:>11} {jobs:>6} {what:>17} {wall:>7.1f} {wall / n:>7.2f}")


if __name__ == "__main__":
    main()
