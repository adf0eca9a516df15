"""The per-checkpoint analysis cache: what a cached result was computed from, and reading it back.

Each checkpoint's rows are written to ``analysis/cache/step_XXXXXX.parquet`` by the worker
(atomically, the Parquet file last: its presence means "done"), so an interrupted sweep
resumes where it stopped and a new checkpoint is analysed alone. A cached result is used only
when its key (``step_XXXXXX.key.json``) matches: the sha256 and size of the checkpoint file it
was computed from, and the fingerprint of the analysis (settings, data_dir, the prompts' tokens,
seed, the code: package version + a hash of every module of the package, and the versions of
torch, numpy and devinterp; ``cache/suite.json`` holds it with its ingredients). A checkpoint replaced under the same name, a changed setting or a
changed metric is analysed again; a stale result is deleted before anything could read it.
Where the files lie: ``run_dir.py``. No torch here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from induction_dynamics import run_dir as layout
from induction_dynamics.analysis.table import COLUMNS, TOKEN_LOSS_PREFIX, make_frame
from induction_dynamics.files import read_json, sha256_file, write_json

log = logging.getLogger(__name__)
CACHE_VERSION = 3  # the layout of the cache files; a new layout re-analyses every checkpoint
# Every module of the package, found by walking it: a cached number goes through checkpoint
# loading, the config upgrade, the tokenizer, the data readers, the model, attention, the
# metrics and table building, and a hand-kept list of those misses the next module they start
# to import. Hashing what a process happens to have imported instead would key the same
# analysis differently in a process that imported one more module (plots, W&B). The price:
# an edit to a file no number depends on (cli.py, plots/) re-analyses too. The tests point
# this at a copy of the package.
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "numpy", "devinterp")  # whose code computes the numbers; devinterp: the llc


@lru_cache(maxsize=None)
def source_sha256(root: Path) -> str:
    """sha256 over every ``.py`` file under ``root`` (relative path and bytes, sorted by path):
    read once per process and root (~200 KB)."""
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py"), key=lambda f: f.relative_to(root).as_posix()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def code_version() -> dict:
    """The package version and a sha256 over the source of every module of the package."""
    try:
        pkg = version("induction-dynamics")
    except PackageNotFoundError:
        pkg = "unknown"
    return {"package": pkg, "source_sha256": source_sha256(PACKAGE_ROOT)}


@lru_cache(maxsize=1)
def library_versions() -> dict:
    """The installed version of Python and of each of ``LIBRARIES`` ("absent" when not
    installed), from the package metadata: nothing is imported."""
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def fingerprint(run_dir: Path, label: str, cfg, metrics: list[str], prompts_info: dict,
                prompts_sha256: str) -> str:
    """The analysis half of every cache key of a run, recorded with its ingredients in
    ``cache/suite.json``: the settings (seed, metrics, suite, ``data_dir``), the prompts (their
    description and ``prompts_sha256``, the hash of the token tensors actually drawn, validation
    windows included: ``Prompts.sha256``), the code (``code_version``) and the libraries
    (``library_versions``). ``force=true`` discards every cached result of the run."""
    suite = OmegaConf.to_container(cfg.suite, resolve=True, enum_to_str=True)
    if "llc" not in metrics:  # SGLD settings change nothing the other metrics compute
        suite.pop("llc", None)
    data_dir = cfg.get("data_dir")
    settings = {"version": CACHE_VERSION, "seed": int(cfg.seed), "metrics": sorted(metrics),
                "suite": suite, "data_dir": None if data_dir is None else str(data_dir),
                "prompts": prompts_info, "prompts_sha256": prompts_sha256, "code": code_version(),
                "libraries": library_versions()}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    if cfg.force:
        cached = list(layout.cache_dir(run_dir).glob("step_*"))
        log.info("%s: discarding %d cached files (force=true)", label, len(cached))
        for p in cached:
            p.unlink()
    meta_path = layout.cache_dir(run_dir) / "suite.json"
    old = read_json(meta_path) or {}
    if old.get("fingerprint") != digest:
        changed = sorted(k for k in settings if old and old.get(k) != settings[k])
        if changed:
            log.info("%s: the analysis differs from the cached one in %s", label, ", ".join(changed))
        write_json({"fingerprint": digest, **settings}, meta_path)
    return digest


def checkpoint_key(path: Path, fingerprint: str) -> dict:
    """What a cached result was computed from: the checkpoint's bytes and the analysis."""
    return {"checkpoint_sha256": sha256_file(path), "checkpoint_size": path.stat().st_size,
            "fingerprint": fingerprint}


def drop(run_dir: Path, step: int) -> None:
    for p in (layout.cache_path(run_dir, step), layout.token_cache_path(run_dir, step),
              layout.key_path(run_dir, step), layout.attention_cache_path(run_dir, step),
              layout.llc_trace_cache_path(run_dir, step)):
        p.unlink(missing_ok=True)


def pending(run_dir: Path, label: str, fingerprint: str) -> tuple[list[tuple[int, Path]], dict[int, list[dict]]]:
    """(checkpoints of the run without a valid cached result, {step: metric errors} of the valid
    ones). A stale result (another file under that name, other settings or code) is deleted
    here, so it can never be collected."""
    todo, errors = [], {}
    for step, path in layout.list_checkpoints(run_dir):
        cached = read_json(layout.key_path(run_dir, step))
        try:
            key = checkpoint_key(path, fingerprint)
        except OSError:  # vanished since it was listed (a sweep that prunes): nothing to analyse
            continue
        if cached is not None and layout.cache_path(run_dir, step).exists() and cached.get("key") == key:
            errors[step] = cached.get("metric_errors", [])
            continue
        if cached is not None or layout.cache_path(run_dir, step).exists():
            log.info("%s: step %d: cached result is stale (%s); analysing it again", label, step,
                     _why_stale(cached, key))
        drop(run_dir, step)
        todo.append((step, path))
    return todo, errors


def _why_stale(cached: dict | None, key: dict) -> str:
    old = (cached or {}).get("key") or {}
    if not old:
        return "no key"
    if old.get("checkpoint_sha256") != key["checkpoint_sha256"]:
        return "the checkpoint file changed"
    return "the analysis settings or code changed"


def collect(run_dir: Path, label: str, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(tidy table, per-token-loss table) of a run from its cache files."""
    frames, token_rows = [], []
    for p in sorted(layout.cache_dir(run_dir).glob("step_*.parquet")):
        df = pd.read_parquet(p)
        frames.append(df)
        step = int(df["step"].iloc[0])
        tok = layout.token_cache_path(run_dir, step)
        if tok.exists():
            token_rows.append((step, int(df["tokens_seen"].iloc[0]), np.load(tok)))
    if not frames:
        return make_frame(pd.DataFrame(columns=COLUMNS)), pd.DataFrame()
    table = pd.concat(frames, ignore_index=True).assign(run=label, seed=seed)
    table = make_frame(table).sort_values(["step", "metric", "layer", "head"], kind="stable")
    tokens = pd.DataFrame()
    if token_rows:
        n = min(len(v) for _, _, v in token_rows)
        values = np.stack([v[:n] for _, _, v in token_rows])  # (n_ckpt, n_tokens)
        cols = [f"{TOKEN_LOSS_PREFIX}{i:05d}" for i in range(n)]
        tokens = pd.concat([pd.DataFrame({"run": label, "seed": seed, "step": [s for s, _, _ in token_rows],
                                          "tokens_seen": [t for _, t, _ in token_rows]}),
                            pd.DataFrame(values, columns=cols)], axis=1).sort_values("step")
    return table.reset_index(drop=True), tokens.reset_index(drop=True)
