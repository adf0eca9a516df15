"""Shared helpers for the trainer tests: compose() configs, run train.py, read W&B records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# A model and run small enough for tests: synthetic data needs no cache, 1 layer x 32 dims.
TINY = [
    "data=synthetic", "data.repeat_min=4", "data.repeat_max=8", "data.synthetic_tokens=20000",
    "model.n_layer=1", "model.n_embd=32", "model.block_size=32",
    "train.batch_size=8", "train.max_iters=30", "train.eval_every=10", "train.eval_iters=2",
    "train.log_every=5", "train.progress=false",
    "checkpoint.every=10", "monitor.every=10", "monitor.seq_len=8", "monitor.batch_size=4",
    "wandb.mode=disabled",
]


def compose_cfg(overrides=()):
    """The config train.py would see for these overrides (Hydra's compose API, no run dir)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def cli_env(**extra) -> dict:
    """Environment for train.py subprocesses: one thread (bitwise-comparable runs), W&B quiet."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", **extra}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_train(args, env=None, timeout=300, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout, **popen)


def wandb_records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(all records, history items) of the latest W&B run in run_dir/wandb, via `wandb leet inspect --json`."""
    out = subprocess.run(["wandb", "leet", "inspect", "--json", str(run_dir / "wandb")],
                         capture_output=True, text=True, check=True).stdout
    recs = [json.loads(line) for line in out.splitlines() if line.strip()]
    return recs, [r["history"]["item"] for r in recs if r["type"] == "history"]


def train_then_kill(args, run_dir: Path, after_iter: int, pause: float = 0.05) -> int:
    """Start train.py, SIGKILL it once resume.pt holds ``after_iter`` or more (``pause`` later, to
    land somewhere in an iteration, a save or an eval); returns the iteration resume.pt holds."""
    import signal
    import time

    from induction_dynamics.checkpoint import load_checkpoint
    from induction_dynamics.run_dir import resume_path

    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:  # wait until training is under way
            try:
                if load_checkpoint(resume_path(run_dir))["iter_num"] >= after_iter:
                    break
            except Exception:  # not written yet
                pass
            time.sleep(0.02)
        time.sleep(pause)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    return load_checkpoint(resume_path(run_dir))["iter_num"]

