"""The run-directory contract: where every file of a run lives, for the trainer and the analysis.
No torch here (``plots_only`` reads it without torch installed)::

    <run>/config.yaml                        the resolved training config (plain YAML)
    <run>/checkpoints/step_000500.pt         history checkpoint, one file per step (checkpoint.py)
    <run>/checkpoints/manifest.json          sha256 and size of each history checkpoint
    <run>/resume.pt                          optimizer + RNG + data position (latest only)
    <run>/wandb/                             W&B's files (offline runs: ``wandb sync`` them)
    <run>/wandb/train_run.json               the W&B run id training logs to, last step per stream,
    <run>/wandb/train_run.journal.jsonl      every record it logged (wandb_logger.py);
                                             analysis_run.* the same for the analysis run
    <run>/analysis/cache/step_000500.parquet      tidy rows of one checkpoint (the analysis cache)
    <run>/analysis/cache/step_000500.tokens.npy   its per-token losses
    <run>/analysis/cache/step_000500.attention.npz every head's pattern on the fixed [x, x]
    <run>/analysis/cache/step_000500.llc.json     its LLC chains' loss traces (when llc is on)
    <run>/analysis/cache/step_000500.key.json     what that result was computed from
    <run>/analysis/cache/suite.json               settings and code the cache was computed with
    <run>/analysis/results.parquet (+ .csv)  every checkpoint's rows (analysis/table.py)
    <run>/analysis/token_losses.parquet      per-token losses, one row per checkpoint
    <run>/analysis/attention_patterns.npz    those patterns, every checkpoint
    <run>/analysis/llc_traces.json           those LLC traces, every checkpoint (analysis/llc_traces.py)
    <run>/analysis/phase_change.csv          detected phase changes (one row per curve)
    <run>/analysis/run_info.json             the run record (analysis/record.py)
    <run>/analysis/errors.json               unreadable checkpoints and failed metrics, a line each
    <run>/plots/*.png, *.pdf

A run dir is a folder with a ``checkpoints/`` sub-folder; a sweep dir is any folder whose
sub-folders (recursively) hold run dirs, e.g. a Hydra multirun folder, and gets the combined
view under ``<sweep>/analysis/`` and ``<sweep>/plots/``. The manifest is written by the trainer
right after each checkpoint and read by the analysis, which refuses a checkpoint whose bytes
no longer match (a file replaced or damaged after the run wrote it).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from induction_dynamics.errors import AnalysisError, RefusedFileError
from induction_dynamics.files import read_json, sha256_file, write_json
from induction_dynamics.untrusted import check_yaml, read_capped

STEP_RE = re.compile(r"^step_(\d+)\.pt$")
MANIFEST = "manifest.json"
# folders a run writes itself: never searched for further runs
SKIP_DIRS = {"analysis", "plots", "wandb", ".hydra", "checkpoints", "__pycache__", ".git"}


# --------------------------------------------------------------------------- training side

def history_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}.pt"


def resume_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "resume.pt"


def manifest_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / MANIFEST


def wandb_state_path(run_dir: str | Path, job_type: str = "train") -> Path:
    """Where ``wandb_logger.WandbLogger`` keeps the W&B run id of the run's training or analysis
    (``state_file``; its journal lies beside it)."""
    return Path(run_dir) / "wandb" / f"{job_type}_run.json"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """History checkpoints of a run as ``[(step, path), ...]`` sorted by step (numerically)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_RE.match(p.name))]
    return sorted(found)


def read_manifest(run_dir: str | Path) -> dict[str, dict]:
    """``{file name: {"sha256": hex, "size": bytes}}``; empty for runs written before manifests."""
    manifest = read_json(manifest_path(run_dir), {})
    return manifest if isinstance(manifest, dict) else {}


def record_checkpoint(path: str | Path) -> dict:
    """Hash a freshly written history checkpoint into its run's manifest; returns its entry."""
    path = Path(path)
    entry = {"sha256": sha256_file(path), "size": path.stat().st_size}
    run_dir = path.parent.parent
    manifest = read_manifest(run_dir)
    manifest[path.name] = entry
    write_json(dict(sorted(manifest.items())), manifest_path(run_dir))
    return entry


def verify_checkpoint(path: str | Path, digest: str | None = None) -> str | None:
    """The file's sha256 when the manifest records it and it matches, None when the manifest
    has no entry for it; raises ValueError (one line) when the bytes differ from the record.
    ``digest``: the file's sha256 when the caller has already computed it."""
    path = Path(path)
    if path.parent.name != "checkpoints":
        return None
    entry = read_manifest(path.parent.parent).get(path.name)
    if entry is None:
        return None
    digest = digest or sha256_file(path)
    if digest != entry.get("sha256"):
        raise ValueError(f"{path} does not match the sha256 recorded when it was written "
                         f"({digest[:12]}... vs {str(entry.get('sha256'))[:12]}...): replaced or damaged")
    return digest


# --------------------------------------------------------------------------- analysis side

CONFIG_MAX_BYTES = 1 << 20  # a resolved training config is ~3 KB; OmegaConf reads 1 MiB in ~0.3 s


def read_config(run_dir: str | Path) -> dict | None:
    """The run's resolved training config (``<run>/config.yaml``) as a plain dict, None when there
    is none. Checked before OmegaConf builds it (``untrusted.check_yaml``: size, events, depth,
    no aliases, no interpolations), so a hostile file is one line, not minutes or a RecursionError."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    raw = read_capped(path, CONFIG_MAX_BYTES, "config.yaml")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RefusedFileError(f"refusing {path}: not UTF-8 text") from None
    check_yaml(text, str(path))
    from omegaconf import OmegaConf  # here: the trainer's side of this module never needs it
    config = OmegaConf.to_container(OmegaConf.create(text)) if text.strip() else {}
    if not isinstance(config, dict):
        raise RefusedFileError(f"refusing {path}: not a mapping of settings")
    return config


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "checkpoints").is_dir()


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


def llc_trace_cache_path(run_dir: Path, step: int) -> Path:
    return cache_dir(run_dir) / f"step_{step:06d}.llc.json"


def step_of(path: Path) -> int | None:
    """The step in a history checkpoint's or cache file's name (``step_000500.pt`` -> 500)."""
    m = re.match(r"^step_(\d+)\.", Path(path).name)
    return int(m.group(1)) if m else None
