"""Finding run directories and the files the analysis keeps in them. No torch here.

A run dir is a folder with a ``checkpoints/`` sub-folder (see checkpoint.py). A sweep dir
is any folder whose sub-folders (recursively) contain run dirs, e.g. a Hydra multirun
folder. Per run the analysis writes::

    <run>/analysis/cache/step_000500.parquet   tidy rows of one checkpoint (the cache)
    <run>/analysis/cache/step_000500.tokens.npy per-token losses of that checkpoint
    <run>/analysis/cache/step_000500.attention.npz every head's pattern on the fixed [x, x]
    <run>/analysis/cache/step_000500.key.json  what that result was computed from (see sweep.py)
    <run>/analysis/cache/suite.json            settings and code the cache was computed with
    <run>/analysis/results.parquet (+ .csv)    every checkpoint's rows (table.COLUMNS)
    <run>/analysis/token_losses.parquet        per-token losses, one row per checkpoint
    <run>/analysis/attention_patterns.npz      those patterns, every checkpoint (attention.py)
    <run>/analysis/phase_change.csv            detected phase changes (one row per metric)
    <run>/analysis/run_info.json               seed, model shape, prompt sizes, W&B names
    <run>/analysis/errors.json                 unreadable checkpoints and failed metrics (one line each)
    <run>/plots/*.png, *.pdf

and, when a sweep folder was given, the combined view under ``<sweep>/analysis/`` and
``<sweep>/plots/`` (one sub-folder per model shape when the sweep mixes shapes).
"""

from __future__ import annotations

import os
from pathlib import Path

from induction_dynamics.files import read_json, write_json  # noqa: F401 (the analysis' JSON files)
from induction_dynamics.run_files import list_checkpoints  # noqa: F401 (one lister for trainer and analysis)
SKIP_DIRS = {"analysis", "plots", "wandb", ".hydra", "checkpoints", "__pycache__", ".git"}


class AnalysisError(RuntimeError):
    """Bad input to the analysis (missing folder, no checkpoints, ...): one line, no traceback."""


def is_run_dir(path: Path) -> bool:
    return (path / "checkpoints").is_dir()


def find_runs(root: str | Path) -> list[Path]:
    """Run dirs at or under ``root``, sorted; raises AnalysisError with a clear line when none."""
    root = Path(root)
    if not root.exists():
        raise AnalysisError(f"run_dir not found: {root}")
    if not root.is_dir():
        raise AnalysisError(f"run_dir is not a folder: {root}")
    if is_run_dir(root):
        return [root]
    runs = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if is_run_dir(here):
            runs.append(here)
            dirnames.clear()  # a run dir does not nest other runs
            continue
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
    if not runs:
        raise AnalysisError(f"no run directories (folders with checkpoints/) under {root}")
    return sorted(runs)


def run_label(run_dir: Path, root: Path) -> str:
    """How a run is named in tables: its path under the analysed folder, or its own name."""
    rel = Path(run_dir).resolve().relative_to(Path(root).resolve())
    return Path(run_dir).resolve().name if str(rel) == "." else rel.as_posix()


def shape_key(model_args: dict) -> str:
    """A short label of a model shape, e.g. ``L2H4D64T64V65`` (+ ``-attn`` for attention-only)."""
    key = "L{n_layer}H{n_head}D{n_embd}T{block_size}V{vocab_size}".format(**model_args)
    return key + ("-attn" if model_args.get("attn_only") else "")


def analysis_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "analysis"


def cache_dir(run_dir: Path) -> Path:
    return analysis_dir(run_dir) / "cache"


def cache_path(run_dir: Path, step: int) -> Path:
    return cache_dir(run_dir) / f"step_{step:06d}.parquet"


def token_cache_path(run_dir: Path, step: int) -> Path:
    return cache_dir(run_dir) / f"step_{step:06d}.tokens.npy"


def key_path(run_dir: Path, step: int) -> Path:
    return cache_dir(run_dir) / f"step_{step:06d}.key.json"


def attention_cache_path(run_dir: Path, step: int) -> Path:
    return cache_dir(run_dir) / f"step_{step:06d}.attention.npz"
