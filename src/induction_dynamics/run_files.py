"""The layout of a run directory, shared by the trainer and the analysis (no torch here)::

    <run_dir>/config.yaml                  resolved config (plain YAML)
    <run_dir>/checkpoints/step_000500.pt   history checkpoint, one file per step
    <run_dir>/checkpoints/manifest.json    sha256 and size of each history checkpoint
    <run_dir>/resume.pt                    optimizer + RNG + data position (latest only)
    <run_dir>/wandb/                       W&B's files (offline runs: ``wandb sync`` them), and
    <run_dir>/wandb/train_run.json         the W&B run id the training logs to, last step per stream,
    <run_dir>/wandb/train_run.journal.jsonl  every record it logged (see wandb_utils.py);
                                           analysis_run.* the same for the analysis run

The manifest is written by the trainer right after each checkpoint and read by the analysis,
which refuses a checkpoint whose bytes no longer match (a file replaced or damaged after the
run wrote it).
"""

from __future__ import annotations

import re
from pathlib import Path

from induction_dynamics.files import read_json, sha256_file, write_json

STEP_RE = re.compile(r"^step_(\d+)\.pt$")
MANIFEST = "manifest.json"


def history_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}.pt"


def resume_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "resume.pt"


def manifest_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / MANIFEST


def wandb_state_path(run_dir: str | Path, job_type: str = "train") -> Path:
    """Where ``wandb_utils.WandbLogger`` keeps the W&B run id of the run's training or analysis
    (``state_file``; its journal lies beside it)."""
    return Path(run_dir) / "wandb" / f"{job_type}_run.json"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """History checkpoints of a run as ``[(step, path), ...]`` sorted by step."""
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
