"""Checkpoint files: the contract between the trainer and the analysis sweep.

A run directory holds::

    <run_dir>/config.yaml                  resolved config (plain YAML)
    <run_dir>/checkpoints/step_000500.pt   history checkpoint, one file per step
    <run_dir>/resume.pt                    optimizer + RNG + data position (latest only)

A history checkpoint is nanoGPT's format without optimizer state::

    {"model": state_dict, "model_args": {...GPTConfig fields...},
     "iter_num": int, "step": int, "tokens_seen": int,
     "vocab": [str, ...],            # itos: token id -> character
     "token_counts": [int, ...],     # training-text frequency of each token (probe design)
     "config": {...resolved config as plain dict...},
     "val_loss": float | None}

Every file is written atomically (temporary name, fsync, rename) and read with
``torch.load(weights_only=True)``: no pickled objects, so a malicious file cannot run code.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

from induction_dynamics.model import GPT, GPTConfig

STEP_RE = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupted or not in our format."""


def history_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}.pt"


def resume_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "resume.pt"


def save_atomic(obj, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; checkpoints are meant to be shared and read
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint safely (``weights_only=True``); raise CheckpointError with one clear line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad magic, or a pickle that asks for a forbidden global
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"not a checkpoint (no 'model' entry): {path}")
    return ckpt


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """History checkpoints of a run as ``[(step, path), ...]`` sorted by step."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_RE.match(p.name))]
    return sorted(found)


def history_steps(max_iters: int, every: int, schedule: str = "linear") -> list[int]:
    """Steps at which the trainer writes history checkpoints.

    ``linear``: 0, every, 2*every, ..., and max_iters. ``log``: additionally 1, 2, 4, 8, ...
    below ``every`` (Pythia's early checkpoints).
    """
    if every <= 0:
        raise ValueError("checkpoint.every must be positive")
    steps = set(range(0, max_iters + 1, every)) | {0, max_iters}
    if schedule == "log":
        p = 1
        while p < min(every, max_iters):
            steps.add(p)
            p *= 2
    elif schedule != "linear":
        raise ValueError(f"checkpoint.schedule must be 'linear' or 'log', got {schedule!r}")
    return sorted(steps)


def strip_prefixes(state_dict: dict) -> dict:
    """Drop ``_orig_mod.`` (torch.compile) and ``module.`` (DDP) prefixes, as nanoGPT's sample.py does."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def model_from_checkpoint(ckpt: dict, device="cpu") -> GPT:
    """Rebuild the GPT from a checkpoint dict, in eval mode."""
    fields = set(GPTConfig.__dataclass_fields__)
    model = GPT(GPTConfig(**{k: v for k, v in ckpt["model_args"].items() if k in fields}))
    model.load_state_dict(strip_prefixes(ckpt["model"]))
    return model.to(device).eval()
