"""Helpers for the analysis tests: tiny runs written in the trainer's checkpoint format.

Not a stand-in for the trainer: the checkpoints are real GPT weights, trained for a few
steps on repeated random sequences between checkpoints so that metrics move, and saved with
``checkpoint.save_atomic`` in the documented format (see checkpoint.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from induction_dynamics.checkpoint import history_path, save_atomic
from induction_dynamics.data import load_data
from induction_dynamics.model import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]
DATA = {"name": "synthetic", "synthetic_vocab_size": 26, "val_frac": 0.1}
SHAPE = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, dropout=0.0, bias=True, attn_only=False)


def make_run(run_dir: Path, seed: int, steps=(0, 5, 10, 15), *, shape: dict | None = None,
             group: str = "test-group", iters_per_step: int = 1, batch: int = 8, lr: float = 3e-3) -> Path:
    """Write checkpoints at ``steps`` of a tiny model trained on [x, x] sequences."""
    torch.manual_seed(seed)
    data = load_data(**DATA)
    args = {**SHAPE, **(shape or {}), "vocab_size": data.vocab_size}
    model = GPT(GPTConfig(**args))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    T = args["block_size"]
    g = torch.Generator().manual_seed(seed)
    config = {"seed": seed, "data": DATA, "model": {k: args[k] for k in SHAPE},
              "train": {"max_iters": max(steps), "batch_size": batch},
              "wandb": {"mode": "offline", "project": "induction-dynamics-tests", "group": group,
                        "name": f"tiny-seed{seed}"}}
    done = 0
    for step in steps:
        while done < step:
            for _ in range(iters_per_step):
                half = torch.stack([torch.randperm(data.vocab_size, generator=g)[: T // 2] for _ in range(batch)])
                x = half.repeat(1, 2)  # (batch, T)
                _, loss = model(x[:, :-1].contiguous(), x[:, 1:].contiguous())
                opt.zero_grad()
                loss.backward()
                opt.step()
            done += 1
        ckpt = {"model": model.state_dict(), "model_args": args, "iter_num": step, "step": step,
                "tokens_seen": step * batch * T, "vocab": data.vocab, "token_counts": data.counts.tolist(),
                "config": config, "val_loss": 3.0 - 0.01 * step}
        save_atomic(ckpt, history_path(run_dir, step))
    (run_dir / "config.yaml").write_text("seed: %d\n" % seed)
    return run_dir


def run_entry(*overrides: str, cwd: Path, env_extra: dict | None = None, pre: str = "",
              timeout: int = 600) -> subprocess.CompletedProcess:
    """Run analyze_checkpoints.py in a subprocess (``pre``: Python run before the entry point)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
           **(env_extra or {})}
    code = (f"{pre}\nimport sys, runpy\nsys.argv = ['analyze_checkpoints.py'] + {list(overrides)!r}\n"
            f"runpy.run_path({str(REPO / 'analyze_checkpoints.py')!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
