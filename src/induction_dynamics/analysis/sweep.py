"""Checkpoints -> cached tidy rows: per-run setup, the per-checkpoint cache, parallel workers.

For each run: read the first readable checkpoint (model shape, vocabulary, token counts,
training config), load its validation text (``run_data``: ``data.load_run_data(config["data"])``), draw
the prompts (``suite.make_prompts``), then analyse every checkpoint that has no cache file
yet. Each checkpoint's rows are written to ``analysis/cache/step_XXXXXX.parquet`` by the
worker itself (atomically, the Parquet file last: its presence means "done"), so an
interrupted sweep resumes where it stopped and a new checkpoint is analysed alone. An
unreadable checkpoint is reported and skipped; it is retried on the next pass.

A cached result is used only when its key (``step_XXXXXX.key.json``) matches: the sha256
and size of the checkpoint file it was computed from, and the fingerprint of the analysis
(settings, prompts, seed, and the code: package version + a hash of the modules that compute
the metrics; ``cache/suite.json`` holds it with its ingredients). A checkpoint replaced under
the same name, a changed setting or a changed metric is analysed again; nothing stale is
reused. A checkpoint whose bytes differ from the sha256 the trainer recorded in
``checkpoints/manifest.json`` is refused. A metric that raises is recorded as a metric error
(in the key and in ``errors.json``); the checkpoint's other metrics are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from induction_dynamics.analysis import runs as R
from induction_dynamics.analysis.attention import write_checkpoint_patterns
from induction_dynamics.analysis.suite import Prompts, make_prompts, run_suite, validate_metrics
from induction_dynamics.analysis.table import COLUMNS, TOKEN_LOSS_PREFIX, make_frame
from induction_dynamics.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from induction_dynamics.config import upgrade_saved_config
from induction_dynamics.files import atomic_write, sha256_file
from induction_dynamics.interpretability.attention_analysis import attention_patterns
from induction_dynamics.vocab import Vocab

log = logging.getLogger(__name__)
CACHE_VERSION = 3  # 3: each checkpoint's attention patterns are cached too
# the modules whose code decides a cached number: a change to any of them re-analyses
METRIC_CODE = ("model.py", "data.py", "curriculum.py", "interpretability", "analysis/suite.py")
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "attn_only")


@dataclass
class RunContext:
    """What the analysis of one run needs, fixed for all its checkpoints."""

    run_dir: Path
    label: str
    seed: int
    shape: str
    model_args: dict
    train_config: dict
    prompts: Prompts
    metrics: list[str]
    max_iters: int | None
    errors: list[dict] = field(default_factory=list)
    fingerprint: str = ""           # of the analysis settings + code (the cache key's second half)

    def info(self) -> dict:
        wb = self.train_config.get("wandb") or {}
        return {"run": self.label, "run_dir": str(self.run_dir), "seed": self.seed, "shape": self.shape,
                "model_args": self.model_args, "max_iters": self.max_iters, "metrics": self.metrics,
                "prompts": self.prompts.info(),
                "train_wandb": {k: wb.get(k) for k in ("project", "group", "name", "mode")}}


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@lru_cache(maxsize=1)
def code_version() -> dict:
    """The package version and a sha256 over the source of ``METRIC_CODE`` (sorted files)."""
    from importlib.metadata import PackageNotFoundError, version

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for entry in METRIC_CODE:
        target = root / entry
        for f in sorted(target.rglob("*.py")) if target.is_dir() else [target]:
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    try:
        pkg = version("induction-dynamics")
    except PackageNotFoundError:
        pkg = "unknown"
    return {"package": pkg, "metric_code_sha256": h.hexdigest()}


@lru_cache(maxsize=8)
def _load_data_cached(data_cfg_json: str):
    from induction_dynamics.data import load_run_data  # imported only when text is needed
    return load_run_data(json.loads(data_cfg_json))


def run_data(train_config: dict, ckpt: dict, data_dir: str | None = None):
    """The run's own data (``config['data']``), or the nanoGPT folder ``data_dir`` when one is
    named, checked against the checkpoint's vocabulary (``tokenizer_from_checkpoint``).

    A checkpoint that carries no vocabulary and names no dataset (a plain nanoGPT ckpt.pt)
    is a one-line AnalysisError: scoring it on some default text would use a foreign vocabulary.
    """
    from induction_dynamics.tokenizer import TokenizerError, tokenizer_from_checkpoint
    try:
        tok = tokenizer_from_checkpoint(ckpt)
    except TokenizerError as e:
        tok, no_vocab = None, str(e)
    data_cfg = {"name": "nanogpt", "dir": str(data_dir)} if data_dir else dict(train_config.get("data") or {})
    if not data_cfg:
        raise R.AnalysisError(no_vocab if tok is None else
                              "the checkpoint names no dataset (no config['data']); name its data folder: data_dir=...")
    try:
        data = _load_data_cached(json.dumps(data_cfg, sort_keys=True, default=str))
    except ValueError as e:  # DataError is a ValueError: missing file, unknown name, ...
        raise R.AnalysisError(f"cannot load the run's validation text ({_one_line(e)})") from e
    if tok is not None and tok.fingerprint != data.tokenizer.fingerprint:
        raise R.AnalysisError(f"the validation text's vocabulary ({data.tokenizer.kind}, {data.vocab_size} tokens) "
                              f"differs from the checkpoint's ({tok.kind}, {tok.vocab_size}): was the data changed?")
    n_model = (ckpt.get("model_args") or {}).get("vocab_size")
    if n_model is not None and n_model < data.vocab_size:
        raise R.AnalysisError(f"the data has {data.vocab_size} tokens but the model only {n_model}: "
                              "not the data this checkpoint was trained on")
    return data


def train_config_of(ckpt: dict, run_dir: Path | None) -> dict:
    """The training config saved in the checkpoint, else the run dir's config.yaml, else {};
    in today's key names (``config.upgrade_saved_config``: runs from before a rename too)."""
    train_config = ckpt.get("config") or {}
    if not train_config and run_dir is not None and (run_dir / "config.yaml").is_file():
        train_config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    return upgrade_saved_config(train_config)


def prompts_for(ckpt: dict, train_config: dict, cfg, val_tokens: torch.Tensor | None = None) -> Prompts:
    """A run's prompts, from any of its checkpoints (they share vocabulary and token counts);
    ``val_tokens``: the text windows' source when not the run's own validation split."""
    args, counts = ckpt["model_args"], ckpt.get("token_counts")
    if val_tokens is None:
        data = run_data(train_config, ckpt, cfg.get("data_dir"))
        val_tokens, counts = data.val, data.counts if counts is None else counts
    return make_prompts(cfg.suite, vocab_size=args["vocab_size"], block_size=args["block_size"],
                        token_counts=counts, val_tokens=val_tokens, seed=cfg.seed,
                        data_config=train_config.get("data"))


def checkpoint_rows(model, ckpt: dict, step: int, prompts: Prompts, metrics,
                    errors: list[dict] | None = None) -> tuple[pd.DataFrame, np.ndarray | None]:
    """(the checkpoint's rows: step, tokens_seen, metric, layer, head, value; its per-token losses).
    ``errors``: collects failing metrics instead of raising (``suite.run_suite``)."""
    rows, tokens = run_suite(model, prompts, metrics, errors=errors)
    if ckpt.get("val_loss") is not None:
        rows.append(("val_loss", -1, -1, float(ckpt["val_loss"])))
    df = pd.DataFrame(rows, columns=["metric", "layer", "head", "value"])
    df.insert(0, "step", step)
    df.insert(1, "tokens_seen", int(ckpt.get("tokens_seen", -1)))
    return df, tokens


def prepare_run(run_dir: Path, label: str, cfg) -> RunContext | None:
    """Set up one run from its first readable checkpoint; None when it has none (errors recorded)."""
    metrics = validate_metrics(cfg.suite.metrics)
    errors = []
    for step, path in R.list_checkpoints(run_dir):
        try:
            ckpt = load_checkpoint(path)
            break
        except CheckpointError as e:
            errors.append({"run": label, "step": step, "path": str(path), "kind": "checkpoint", "error": _one_line(e)})
    else:
        return RunContext(run_dir, label, -1, "", {}, {}, None, metrics, None, errors) if errors else None
    args = dict(ckpt["model_args"])
    train_config = train_config_of(ckpt, run_dir)
    prompts = prompts_for(ckpt, train_config, cfg)
    max_iters = (train_config.get("train") or {}).get("max_iters")
    ctx = RunContext(run_dir, label, int(train_config.get("seed", -1)), R.shape_key(args),
                     {k: args.get(k) for k in SHAPE_FIELDS}, train_config, prompts, metrics,
                     max_iters, errors)
    _check_cache_settings(ctx, cfg)
    R.write_json(ctx.info(), R.analysis_dir(run_dir) / "run_info.json")
    return ctx


def _check_cache_settings(ctx: RunContext, cfg) -> None:
    """Fix the run's analysis fingerprint (settings + code) and record it in ``cache/suite.json``;
    ``force=true`` discards every cached result of the run."""
    suite = OmegaConf.to_container(cfg.suite, resolve=True, enum_to_str=True)
    if "llc" not in ctx.metrics:  # SGLD settings change nothing the other metrics compute
        suite.pop("llc", None)
    settings = {"version": CACHE_VERSION, "seed": int(cfg.seed), "metrics": sorted(ctx.metrics),
                "suite": suite, "prompts": ctx.prompts.info(), "code": code_version()}
    ctx.fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    if cfg.force:
        cached = list(R.cache_dir(ctx.run_dir).glob("step_*"))
        log.info("%s: discarding %d cached files (force=true)", ctx.label, len(cached))
        for p in cached:
            p.unlink()
    meta_path = R.cache_dir(ctx.run_dir) / "suite.json"
    if (R.read_json(meta_path) or {}).get("fingerprint") != ctx.fingerprint:
        R.write_json({"fingerprint": ctx.fingerprint, **settings}, meta_path)


def checkpoint_key(path: Path, fingerprint: str) -> dict:
    """What a cached result was computed from: the checkpoint's bytes and the analysis."""
    return {"checkpoint_sha256": sha256_file(path), "checkpoint_size": path.stat().st_size,
            "fingerprint": fingerprint}


def _drop_cached(run_dir: Path, step: int) -> None:
    for p in (R.cache_path(run_dir, step), R.token_cache_path(run_dir, step), R.key_path(run_dir, step),
              R.attention_cache_path(run_dir, step)):
        p.unlink(missing_ok=True)


def pending_checkpoints(ctx: RunContext) -> list[tuple[int, Path]]:
    """Checkpoints of the run without a valid cached result. A stale result (another file under
    that name, other settings or code) is deleted here, so it can never be collected; the
    metric errors of valid cached results are put back into ``ctx.errors``."""
    pending = []
    for step, path in R.list_checkpoints(ctx.run_dir):
        cached = R.read_json(R.key_path(ctx.run_dir, step))
        try:
            key = checkpoint_key(path, ctx.fingerprint)
        except OSError:  # vanished since it was listed (a sweep that prunes): nothing to analyse
            continue
        if cached is not None and R.cache_path(ctx.run_dir, step).exists() and cached.get("key") == key:
            _replace_errors(ctx, step, cached.get("metric_errors", []))
            continue
        if cached is not None or R.cache_path(ctx.run_dir, step).exists():
            log.info("%s: step %d: cached result is stale (%s); analysing it again", ctx.label, step,
                     _why_stale(cached, key))
        _drop_cached(ctx.run_dir, step)
        pending.append((step, path))
    return pending


def _why_stale(cached: dict | None, key: dict) -> str:
    old = (cached or {}).get("key") or {}
    if not old:
        return "no key"
    if old.get("checkpoint_sha256") != key["checkpoint_sha256"]:
        return "the checkpoint file changed"
    return "the analysis settings or code changed"


def _replace_errors(ctx: RunContext, step: int, new: list[dict]) -> None:
    """This step's latest errors replace its earlier ones (a retried checkpoint)."""
    ctx.errors[:] = [e for e in ctx.errors if e["step"] != step] + new


def analyse_checkpoint(run_dir: str, label: str, step: int, path: str, prompts: Prompts, metrics: list[str],
                       expected_args: dict, fingerprint: str, device: str = "cpu",
                       threads: int | None = None) -> dict:
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
        key = checkpoint_key(path, fingerprint)
        ckpt = load_checkpoint(path, map_location=device, sha256=key["checkpoint_sha256"])  # manifest-checked
        args = {k: ckpt["model_args"].get(k) for k in SHAPE_FIELDS}
        if args != expected_args:
            raise CheckpointError(f"model shape {args} differs from the run's first checkpoint {expected_args}")
        model = model_from_checkpoint(ckpt, device)
    except Exception as e:  # a bad checkpoint must not stop the sweep; report it in one line
        return {"run": label, "step": step, "path": str(path), "ok": False, "kind": "checkpoint",
                "error": f"{type(e).__name__}: {_one_line(e)}" if not isinstance(e, CheckpointError) else _one_line(e)}
    df, tokens = checkpoint_rows(model, ckpt, step, prompts.to(device), metrics, errors=metric_errors)
    _save_attention(model, ckpt, prompts, R.attention_cache_path(run_dir, step), device, metric_errors)
    metric_errors = [{"run": label, "step": step, "path": str(path), "kind": "metric", **e} for e in metric_errors]
    if tokens is not None:
        atomic_write(R.token_cache_path(run_dir, step), lambda f: np.save(f, tokens.astype(np.float32)))
    R.write_json({"key": key, "metric_errors": metric_errors}, R.key_path(run_dir, step))
    # written last: its presence (with a matching key) marks the checkpoint as done
    atomic_write(R.cache_path(run_dir, step), lambda f: df.to_parquet(f, index=False))
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
    except Exception as e:
        errors.append({"metric": "attention_patterns", "error": f"{type(e).__name__}: {_one_line(e)}"})


def analyse_pending(contexts: list[RunContext], n_jobs: int = 1, device: str = "cpu",
                    threads: int | None = None, progress: bool = True) -> list[dict]:
    """Analyse every pending checkpoint of ``contexts``, ``n_jobs`` at a time; returns the statuses."""
    from tqdm.auto import tqdm

    tasks = [(str(c.run_dir), c.label, s, str(p), c.prompts, c.metrics, c.model_args, c.fingerprint, device)
             for c in contexts if c.prompts is not None for s, p in pending_checkpoints(c)]
    if not tasks:
        return []
    bar = tqdm(total=len(tasks), desc="analysing checkpoints", unit="ckpt", disable=not progress)
    results = []
    if n_jobs == 1:
        for t in tasks:
            results.append(analyse_checkpoint(*t, threads=threads))
            bar.update()
    else:
        from joblib import Parallel, cpu_count, delayed
        threads = threads or max(1, cpu_count() // n_jobs)
        jobs = Parallel(n_jobs=n_jobs, backend="loky", return_as="generator_unordered")
        for r in jobs(delayed(analyse_checkpoint)(*t, threads=threads) for t in tasks):
            results.append(r)
            bar.update()
    bar.close()
    by_label = {c.label: c for c in contexts}
    for r in results:
        if r["ok"]:
            for e in r["metric_errors"]:
                log.warning("%s: step %d: metric %s failed: %s", r["run"], r["step"], e["metric"], e["error"])
            _replace_errors(by_label[r["run"]], r["step"], r["metric_errors"])
        else:
            log.warning("%s: skipped checkpoint step %d: %s", r["run"], r["step"], r["error"])
            _replace_errors(by_label[r["run"]], r["step"], [{k: r[k] for k in ("run", "step", "path", "kind", "error")}])
    return results


def collect_run(run_dir: Path, label: str, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(tidy table, per-token-loss table) of a run from its cache files."""
    frames, token_rows = [], []
    for p in sorted(R.cache_dir(run_dir).glob("step_*.parquet")):
        df = pd.read_parquet(p)
        frames.append(df)
        step = int(df["step"].iloc[0])
        tok = R.token_cache_path(run_dir, step)
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
