"""Attention patterns over training, saved: every head's pattern on one fixed repeated sequence
at every checkpoint (numpy only; no torch, no plotting here).

The sweep's worker saves each checkpoint's patterns on the first row of the run's induction
prompt (``[x, x]``, ``Prompts.induction[0]``) next to its rows (``run_dir.attention_cache_path``);
``save_history`` gathers them into ``analysis/attention_patterns.npz``::

    steps     (n_ckpt,)                  int64
    patterns  (n_ckpt, L, H, T, T)       float16, rows = query, columns = key
    tokens    (T,)                       the sequence's token ids
    labels    (T,)                       the same, decoded with the run's vocabulary

so the figure (``plots/attention.py``) is redrawn from saved results (``plots_only=true``)
and any checkpoint can be viewed later.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from induction_dynamics import run_dir as layout
from induction_dynamics.files import atomic_write


@dataclass
class AttentionHistory:
    steps: np.ndarray      # (n_ckpt,)
    patterns: np.ndarray   # (n_ckpt, L, H, T, T)
    tokens: np.ndarray     # (T,)
    labels: list[str]      # (T,)

    def at(self, step: int) -> np.ndarray:
        """(L, H, T, T) patterns of one checkpoint."""
        i = np.flatnonzero(self.steps == step)
        if not len(i):
            raise KeyError(f"no saved attention patterns at step {step} (saved: {self.steps.tolist()})")
        return self.patterns[int(i[0])].astype(np.float32)


def _write_npz(path: Path, **arrays) -> None:
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays), durable=False)


def write_checkpoint_patterns(path: Path, patterns: np.ndarray, tokens, labels) -> None:
    """One checkpoint's (L, H, T, T) patterns on the fixed sequence (called by the sweep's worker)."""
    _write_npz(path, patterns=patterns.astype(np.float16), tokens=np.asarray(tokens, dtype=np.int64),
               labels=np.asarray(labels, dtype=str))


def save_history(run_dir: Path) -> AttentionHistory | None:
    """Gather the cached per-checkpoint patterns into ``analysis/attention_patterns.npz``."""
    found = sorted(layout.cache_dir(run_dir).glob("step_*.attention.npz"))
    if not found:
        return None
    steps, patterns = [], []
    for p in found:
        with np.load(p) as z:
            steps.append(int(p.name.split(".")[0][len("step_"):]))
            patterns.append(z["patterns"])
            tokens, labels = z["tokens"], z["labels"]
    hist = AttentionHistory(np.asarray(steps, dtype=np.int64), np.stack(patterns), tokens, labels.tolist())
    _write_npz(layout.analysis_dir(run_dir) / "attention_patterns.npz", steps=hist.steps, patterns=hist.patterns,
               tokens=hist.tokens, labels=np.asarray(hist.labels, dtype=str))
    return hist


def load_history(run_dir: Path) -> AttentionHistory | None:
    path = layout.analysis_dir(run_dir) / "attention_patterns.npz"
    if not path.is_file():
        return None
    with np.load(path) as z:
        return AttentionHistory(z["steps"], z["patterns"], z["tokens"], z["labels"].tolist())
