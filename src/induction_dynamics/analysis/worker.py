"""Checkpoints -> cached tidy rows: a run's setup, and the worker that analyses one checkpoint.

``prepare_run``: read a run's first readable checkpoint (model shape, vocabulary, token counts,
training config), load its validation text and draw its prompts (``prompts.py``), fix the
cache fingerprint (``cache.py``) and write the run record (``record.py``). ``cache_pending``:
every checkpoint without a valid cached result, ``n_jobs`` at a time; ``cache_checkpoint``
(the worker) loads one, runs the suite (``checkpoint_rows``, which ``notebook.analyze_checkpoint``
runs too) and writes its cache files. An
unreadable checkpoint is reported and skipped; it is retried on the next pass. A checkpoint
whose bytes differ from the sha256 the trainer recorded in ``checkpoints/manifest.json`` is
refused. A metric that raises is recorded as a metric error (in the key and in
``errors.json``); the checkpoint's other metrics are kept.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from joblib import Parallel, cpu_count, delayed
from tqdm.auto import tqdm

from induction_dynamics import run_dir as layout
from induction_dynamics.analysis import cache
from induction_dynamics.analysis.attention import write_checkpoint_patterns
from induction_dynamics.analysis.prompts import Prompts, prompts_for, train_config_of
from induction_dynamics.analysis.record import OfRun, RunRecord, shape_key
from induction_dynamics.analysis.suite import run_suite
from induction_dynamics.checkpoint import load_checkpoint, model_from_checkpoint
from induction_dynamics.data.vocab import Vocab
from induction_dynamics.errors import CheckpointError, WriteError, one_line
from induction_dynamics.files import atomic_write, write_json
from induction_dynamics.interpretability.utils import attention_patterns

log = logging.getLogger(__name__)
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "attn_only")


@dataclass
class RunContext(OfRun):
    """What the analysis of one run needs, fixed for all its checkpoints."""

    record: RunRecord
    train_config: dict = field(default_factory=dict)
    prompts: Prompts | None = None    # None: no checkpoint of the run could be read
    fingerprint: str = ""             # of the analysis settings + code (the cache key's second half)
    errors: list[dict] = field(default_factory=list)

    def replace_errors(self, step: int, new: list[dict]) -> None:
        """This step's latest errors replace its earlier ones (a retried checkpoint)."""
        self.errors[:] = [e for e in self.errors if e["step"] != step] + new


def run_options(suite_cfg) -> dict:
    """How the suite runs, not what it computes: ``run_suite``'s ``chunk`` and ``precision``."""
    return {"chunk": suite_cfg.get("chunk_windows"), "precision": str(suite_cfg.get("precision", "float32"))}


def checkpoint_rows(model, ckpt: dict, step: int, prompts: Prompts, metrics,
                    errors: list[dict] | None = None, options: dict | None = None,
                    extras: dict | None = None) -> tuple[pd.DataFrame, np.ndarray | None]:
    """(the checkpoint's rows: step, tokens_seen, metric, layer, head, value, stderr; its per-token
    losses). ``errors``: collects failing metrics instead of raising; ``options``: ``run_options``
    (``suite.run_suite``); ``extras``: what the metrics give besides rows."""
    rows, tokens = run_suite(model, prompts, metrics, errors=errors, extras=extras, **(options or {}))
    if ckpt.get("val_loss") is not None:
        rows.append(("val_loss", -1, -1, float(ckpt["val_loss"]), float("nan")))
    df = pd.DataFrame(rows, columns=["metric", "layer", "head", "value", "stderr"])
    df.insert(0, "step", step)
    df.insert(1, "tokens_seen", int(ckpt.get("tokens_seen", -1)))
    return df, tokens


def prepare_run(run_dir: Path, label: str, cfg) -> RunContext | None:
    """Set up one run from its first readable checkpoint; None when it has no checkpoint at all,
    a context without prompts (its errors recorded) when none could be read."""
    metrics = [str(m) for m in cfg.suite.metrics]
    errors = []
    for step, path in layout.list_checkpoints(run_dir):
        try:
            ckpt = load_checkpoint(path)
            break
        except CheckpointError as e:
            errors.append({"run": label, "step": step, "path": str(path), "kind": "checkpoint", "error": one_line(e)})
    else:
        return RunContext(RunRecord(label, str(run_dir), metrics=metrics), errors=errors) if errors else None
    args = dict(ckpt["model_args"])
    train_config = train_config_of(ckpt, run_dir)
    prompts = prompts_for(ckpt, train_config, cfg)
    wb = train_config.get("wandb") or {}
    record = RunRecord(run=label, run_dir=str(run_dir), seed=int(train_config.get("seed", -1)), shape=shape_key(args),
                       model_args={k: args.get(k) for k in SHAPE_FIELDS},
                       max_iters=(train_config.get("train") or {}).get("max_iters"), metrics=metrics,
                       prompts=prompts.info(), train_wandb={k: wb.get(k) for k in ("project", "group", "name", "mode")})
    ctx = RunContext(record, train_config, prompts,
                     cache.fingerprint(run_dir, label, cfg, metrics, record.prompts, prompts.sha256()), errors)
    record.write(layout.analysis_dir(run_dir) / "run_info.json")
    return ctx


def cache_checkpoint(run_dir: str, label: str, step: int, path: str, prompts: Prompts, metrics: list[str],
                     expected_args: dict, fingerprint: str, device: str = "cpu", threads: int | None = None,
                     options: dict | None = None) -> dict:
    """Analyse one checkpoint and write its cache files. Never raises: errors come back as data.

    Runs in a worker process when n_jobs > 1, hence plain arguments and ``threads``
    (each worker gets ``cores // n_jobs`` torch threads). The key is taken from the bytes
    before they are loaded, so a file replaced meanwhile is caught on the next pass.
    """
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    run_dir, path = Path(run_dir), Path(path)
    metric_errors: list[dict] = []
    try:
        key = cache.checkpoint_key(path, fingerprint)
        ckpt = load_checkpoint(path, map_location=device, sha256=key["checkpoint_sha256"])  # manifest-checked
        args = {k: ckpt["model_args"].get(k) for k in SHAPE_FIELDS}
        if args != expected_args:
            raise CheckpointError(f"model shape {args} differs from the run's first checkpoint {expected_args}")
        model = model_from_checkpoint(ckpt, device)
    except Exception as e:  # a bad checkpoint must not stop the sweep; report it in one line
        return {"run": label, "step": step, "path": str(path), "ok": False, "kind": "checkpoint", "error": one_line(e)}
    del ckpt["model"]  # the weights are in the model now; a GPT-2-sized copy is half a gigabyte
    extras: dict = {}
    df, tokens = checkpoint_rows(model, ckpt, step, prompts.to(device), metrics, errors=metric_errors, options=options, extras=extras)
    _save_attention(model, ckpt, prompts, layout.attention_cache_path(run_dir, step), device, metric_errors)
    metric_errors = [{"run": label, "step": step, "path": str(path), "kind": "note" if "note" in e else "metric", **e}
                     for e in metric_errors]
    if tokens is not None:
        atomic_write(layout.token_cache_path(run_dir, step), lambda f: np.save(f, tokens.astype(np.float32)))
    if "llc_traces" in extras:  # gathered per run by llc_traces.save
        write_json({"step": step, **extras["llc_traces"]}, layout.llc_trace_cache_path(run_dir, step), durable=False)
    write_json({"key": key, "metric_errors": metric_errors}, layout.key_path(run_dir, step))
    # written last: its presence (with a matching key) marks the checkpoint as done
    atomic_write(layout.cache_path(run_dir, step), lambda f: df.to_parquet(f, index=False))
    return {"run": label, "step": step, "path": str(path), "ok": True, "n_rows": len(df),
            "metric_errors": metric_errors, "seconds": time.perf_counter() - t0}


def _save_attention(model, ckpt: dict, prompts: Prompts, path: Path, device, errors: list[dict]) -> None:
    """Every head's pattern on the fixed [x, x] (the attention figure's input), or a metric error."""
    seq = prompts.induction[0]  # (T,)
    try:
        patterns = attention_patterns(model, seq.to(device))[:, 0].float().cpu().numpy()  # (L, H, T, T)
        try:
            labels = Vocab.from_checkpoint(ckpt).labels(seq)
        except CheckpointError:  # no tokenizer saved: the token ids themselves
            labels = [str(t) for t in seq.tolist()]
        write_checkpoint_patterns(path, patterns, seq.tolist(), labels)
    except WriteError:  # a full disk is not the metric's failure: stop, this checkpoint stays pending
        raise
    except Exception as e:
        errors.append({"metric": "attention_patterns", "error": one_line(e)})


def cache_pending(contexts: list[RunContext], n_jobs: int = 1, device: str = "cpu",
                  threads: int | None = None, progress: bool = True, options: dict | None = None) -> list[dict]:
    """Analyse every pending checkpoint of ``contexts``, ``n_jobs`` at a time; returns the statuses."""
    tasks = []
    for c in contexts:
        if c.prompts is None:
            continue
        todo, cached_errors = cache.pending(c.run_dir, c.label, c.fingerprint)
        for step, errors in cached_errors.items():  # valid cached results keep their metric errors
            c.replace_errors(step, errors)
        tasks += [(str(c.run_dir), c.label, s, str(p), c.prompts, c.record.metrics, c.record.model_args,
                   c.fingerprint, device) for s, p in todo]
    if not tasks:
        return []
    bar = tqdm(total=len(tasks), desc="analysing checkpoints", unit="ckpt", disable=not progress)
    results = []
    if n_jobs == 1:
        for t in tasks:
            results.append(cache_checkpoint(*t, threads=threads, options=options))
            bar.update()
    else:
        threads = threads or max(1, cpu_count() // n_jobs)
        jobs = Parallel(n_jobs=n_jobs, backend="loky", return_as="generator_unordered")
        for r in jobs(delayed(cache_checkpoint)(*t, threads=threads, options=options) for t in tasks):
            results.append(r)
            bar.update()
    bar.close()
    by_label = {c.label: c for c in contexts}
    for r in results:
        if r["ok"]:
            for e in r["metric_errors"]:
                if e["kind"] == "note":
                    log.info("%s: step %d: %s: %s", r["run"], r["step"], e["metric"], e["note"])
                else:
                    log.warning("%s: step %d: metric %s failed: %s", r["run"], r["step"], e["metric"], e["error"])
            by_label[r["run"]].replace_errors(r["step"], r["metric_errors"])
        else:
            log.warning("%s: skipped checkpoint step %d: %s", r["run"], r["step"], r["error"])
            by_label[r["run"]].replace_errors(r["step"], [{k: r[k] for k in ("run", "step", "path", "kind", "error")}])
    return results
