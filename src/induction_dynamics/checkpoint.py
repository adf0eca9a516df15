"""Checkpoint files: the contract between the trainer and the analysis sweep.

Where the files of a run directory live: ``run_dir.py``.

A history checkpoint is nanoGPT's format without optimizer state::

    {"model": state_dict, "model_args": {...GPTConfig fields...},
     "iter_num": int, "step": int, "tokens_seen": int,
     "vocab": [str, ...] | None,     # a label per token id (the character, for characters)
     "tokenizer": {"kind": ..., ...}, # data/tokenizer.py state: tokenizer_from_checkpoint(ckpt)
     "token_counts": [int, ...],     # training-text frequency of each token (which tokens random repeats and prompts draw from)
     "data_source": {...},           # source and tokenizer sha256 (what the run saw)
     "config": {...resolved config as plain dict...},
     "val_loss": float | None}

Every file is written atomically (``files.atomic_write``) and read with
``torch.load(weights_only=True)``: no pickled objects, so a malicious file cannot run code.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from induction_dynamics.errors import CheckpointError, one_line
from induction_dynamics.files import atomic_write
from induction_dynamics.model import GPT, GPTConfig
from induction_dynamics.options import CheckpointSchedule
from induction_dynamics.run_dir import verify_checkpoint


def save_atomic(obj, path: str | Path) -> None:
    """torch.save ``obj`` to ``path`` atomically (``files.atomic_write``)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | Path, map_location="cpu", sha256: str | None = None) -> dict:
    """Load a checkpoint safely (``weights_only=True``); raise CheckpointError with one clear line.

    A history checkpoint whose bytes differ from the sha256 its run's manifest recorded at save
    time is refused (``sha256``: the file's digest, when the caller has computed it already).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        verify_checkpoint(path, sha256)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad magic, or a pickle that asks for a forbidden global
        raise CheckpointError(f"cannot read checkpoint {path}: {one_line(e)}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"not a checkpoint (no 'model' entry): {path}")
    return ckpt


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
        raise ValueError(f"checkpoint.schedule must be one of {', '.join(CheckpointSchedule.values())}, got {schedule!r}")
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


# resume.pt's RNG state: every generator the process owns, restored exactly on resume

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
