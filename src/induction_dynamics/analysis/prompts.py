"""The fixed inputs of a run's analysis (``Prompts``), drawn once per run from the analysis seed.

Every checkpoint of a run sees the same inputs, and runs with the same data and shape see
identical prompts (comparable across the seeds of a sweep):

- ``induction``: ``[x, x]`` with ``induction_seq_len`` distinct tokens per half, drawn from
  ``repeat_token_ids`` (the tokens the training text uses minus their rarest/commonest 10%,
  from the checkpoint's ``token_counts``); also used for duplicate-token, copying and induction-loss scores.
- ``prefix``: Olsson et al.'s prefix-matching prompt, ``prefix_seq_len`` tokens x 4.
- ``text``: ``text_windows`` fixed windows of ``block_size`` validation tokens (the
  checkpoint's ``config["data"]`` through ``data.load_run_data``): previous-token score, ICL
  score at positions (early, late), per-token losses (for the PCA plot), from one forward.
- ``text_repeats``: as many other validation windows with the run's repeat curriculum
  written in exactly as the trainer's sampler writes it (``config["data"]["repeat_*"]``;
  plain text when the run had none): the ICL score on the *training distribution*, which
  is where Olsson et al. measure it (held-out data like the training data).
- ``patching``: ``induction_patching_data`` pairs (clean / one token corrupted), and
  ``patching_heads``: the heads patched one by one (``suite.patching_heads`` per layer, drawn
  here; every head of a model of at most ``ALL_HEADS_UP_TO`` heads by default, else
  ``HEADS_PER_LAYER_ABOVE`` a layer: per-head patching's cost grows with n_layer x n_head).
- ``llc`` (only when the ``llc`` metric is on): ``suite.llc.windows`` more validation windows
  with the run's repeat curriculum, the SGLD data of the local learning coefficient; its
  settings (``suite.llc``, n_beta resolved) are in ``info()``, hence in run_info.json, the
  W&B config and the cache fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields, is_dataclass
from functools import lru_cache
from pathlib import Path

import torch

from induction_dynamics.data import (
    BatchSampler,
    curriculum_args,
    load_run_data,
    windows,
)
from induction_dynamics.data.tokenizer import tokenizer_from_checkpoint
from induction_dynamics.errors import AnalysisError, DataError, TokenizerError, one_line
from induction_dynamics.interpretability import activation_patching as ap
from induction_dynamics.interpretability import metrics as M
from induction_dynamics.interpretability.llc import default_n_beta
from induction_dynamics.run_dir import read_config as read_run_config
from induction_dynamics.training.config import upgrade_saved_config

# separate generator seeds per prompt kind: adding a metric never changes another's prompt
_PROMPT_OFFSETS = {"induction": 0, "prefix": 1, "text": 2, "patching": 3, "text_repeats": 4, "llc": 5,
                   "patching_heads": 6}
# suite.patching_heads=null: every head patched one by one up to this many heads in the model
# (n_layer x n_head; the baby model's 36 among them), else this many per layer (GPT-2 small: 48
# of its 144 heads, half of the patching metric's forwards; activation_patching.patch_suite)
ALL_HEADS_UP_TO = 64
HEADS_PER_LAYER_ABOVE = 4


@dataclass
class Prompts:
    """The fixed inputs of one run's analysis (CPU tensors; moved to the device once per worker)."""

    allowed: torch.Tensor          # (n_allowed,) token ids random prompts draw from
    induction: torch.Tensor        # (B, 2 * induction_seq_len)
    induction_seq_len: int
    prefix: torch.Tensor           # (B, 4 * prefix_seq_len)
    prefix_seq_len: int
    text: torch.Tensor             # (W, block_size) validation windows
    icl_early: int                 # indices into the (T-1,) per-token loss vector
    icl_late: int
    patching: ap.PatchingData      # clean/corrupted (P, 2L-1), answers (P,)
    text_repeats: torch.Tensor     # (W, block_size) validation windows with the training curriculum
    repeats: dict                  # the curriculum written into text_repeats (frac 0: none)
    llc_windows: torch.Tensor | None = None  # (N, block_size) SGLD data, as text_repeats; None: no llc
    llc: dict | None = None        # estimate_llc's keyword arguments (n_beta resolved, seed fixed)
    patching_heads: torch.Tensor | None = None  # (n_layer, k) heads patched one by one per layer; None: all

    def patched_heads(self) -> list[tuple[int, int]] | None:
        """The (layer, head) pairs per-head patching patches; None: every head."""
        if self.patching_heads is None:
            return None
        return [(l, h) for l, row in enumerate(self.patching_heads.tolist()) for h in row]

    def info(self) -> dict:
        """JSON-able description for run_info.json and the W&B config."""
        return {"n_allowed_tokens": len(self.allowed), "induction_seq_len": self.induction_seq_len,
                "induction_batch": self.induction.shape[0], "prefix_seq_len": self.prefix_seq_len,
                "text_windows": self.text.shape[0], "text_window_len": self.text.shape[1],
                "icl_early": self.icl_early, "icl_late": self.icl_late,
                "patching_batch": self.patching.clean.shape[0],
                "patching_len": self.patching.clean.shape[1], "text_repeats": self.repeats,
                "patching_heads": "all" if self.patching_heads is None else self.patching_heads.tolist(),
                **({"llc": {**self.llc, "windows": self.llc_windows.shape[0]}} if self.llc else {})}

    def sha256(self) -> str:
        """sha256 of every field, each tensor by dtype, shape and values: the tokens the metrics
        actually see (validation windows included), so other text under the same settings keys
        the cache apart. Walks the dataclass fields: a field added later is covered too."""
        h = hashlib.sha256()

        def add(name, value):
            if isinstance(value, torch.Tensor):
                t = value.detach().cpu().contiguous()
                h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype, as raw bytes
            elif is_dataclass(value):
                for f in fields(value):
                    add(f"{name}.{f.name}", getattr(value, f.name))
            else:
                h.update(f"{name} {json.dumps(value, sort_keys=True, default=str)}\n".encode())

        add("prompts", self)
        return h.hexdigest()

    def to(self, device) -> Prompts:
        p = self.patching
        return Prompts(self.allowed.to(device), self.induction.to(device), self.induction_seq_len,
                       self.prefix.to(device), self.prefix_seq_len, self.text.to(device), self.icl_early,
                       self.icl_late, ap.PatchingData(p.clean.to(device), p.corrupted.to(device),
                                                      p.answer.to(device), p.corrupted_answer.to(device)),
                       self.text_repeats.to(device), self.repeats,
                       None if self.llc_windows is None else self.llc_windows.to(device), self.llc,
                       self.patching_heads)


def make_prompts(suite, *, vocab_size: int, block_size: int, token_counts, val_tokens: torch.Tensor,
                 seed: int, data_config: dict | None = None, n_layer: int | None = None,
                 n_head: int | None = None) -> Prompts:
    """Draw every prompt of a run from ``seed`` (see the module docstring for what each is).

    ``data_config``: the run's training ``config["data"]``; its ``repeat_*`` keys give the
    curriculum of the ``text_repeats`` windows (none when absent or ``repeat_frac`` is 0).
    ``n_layer``, ``n_head``: the model's, for the heads per-head patching patches
    (``suite.patching_heads``); without them every head is patched.
    """
    counts = None if token_counts is None else torch.as_tensor(token_counts)
    allowed = M.repeat_token_ids(vocab_size, counts)

    def gen(kind):
        return torch.Generator().manual_seed(int(seed) * 1000 + _PROMPT_OFFSETS[kind])

    L = suite.induction_seq_len or min(32, block_size // 2, len(allowed))
    P = suite.prefix_seq_len or min(25, block_size // 4, len(allowed))
    if 2 * L > block_size or L > len(allowed) or L < 2:
        raise ValueError(f"induction_seq_len {L} must be 2..min(block_size/2={block_size // 2}, "
                         f"allowed tokens={len(allowed)})")
    if 4 * P > block_size or P > len(allowed) or P < 2:
        raise ValueError(f"prefix_seq_len {P} must be 2..min(block_size/4={block_size // 4}, "
                         f"allowed tokens={len(allowed)})")
    induction = M.repeated_random_tokens(allowed, L, suite.batch_size, 2, gen("induction"))
    prefix = M.repeated_random_tokens(allowed, P, suite.batch_size, 4, gen("prefix"))

    T = block_size
    if len(val_tokens) < T + 1:
        raise ValueError(f"the validation split has {len(val_tokens)} tokens, fewer than block_size+1={T + 1}")
    starts = torch.randint(len(val_tokens) - T, (suite.text_windows,), generator=gen("text"))
    text = windows(val_tokens, starts, T)  # (W, T)
    early, late = suite.icl_positions if suite.icl_positions else M.icl_positions(T)
    if not 0 <= early < late < T - 1:
        raise ValueError(f"icl_positions must satisfy 0 <= early < late < {T - 1}, got [{early}, {late}]")

    Lp = min(L, len(allowed) - 1, (T + 1) // 2)  # clean prompt 2L-1 tokens plus one spare token
    patching = ap.induction_patching_data(allowed, Lp, suite.patching_batch, gen("patching"))
    repeats, text_repeats = _repeat_windows(data_config or {}, val_tokens, T, suite.text_windows, allowed, counts,
                                            int(seed) * 1000 + _PROMPT_OFFSETS["text_repeats"])
    llc_windows = llc = None
    if "llc" in suite.metrics:  # SGLD data from the training distribution, like text_repeats
        c = suite.llc
        _, llc_windows = _repeat_windows(data_config or {}, val_tokens, T, c.windows, allowed, counts,
                                         int(seed) * 1000 + _PROMPT_OFFSETS["llc"])
        llc = {"lr": c.lr, "localization": c.localization,
               "n_beta": c.n_beta if c.n_beta is not None else default_n_beta(len(llc_windows) * (T - 1)),
               "num_chains": c.num_chains, "num_draws": c.num_draws, "num_burnin_steps": c.num_burnin_steps,
               "batch_size": c.batch_size, "seed": int(seed)}
    heads = patching_heads(suite.patching_heads, n_layer, n_head, gen("patching_heads"))
    return Prompts(allowed, induction, L, prefix, P, text, int(early), int(late), patching, text_repeats, repeats,
                   llc_windows, llc, heads)


def patching_heads(requested: int | None, n_layer: int | None, n_head: int | None,
                   generator: torch.Generator) -> torch.Tensor | None:
    """(n_layer, k) sorted head ids per layer, k = ``requested`` (``suite.patching_heads``) or, when
    None, ``HEADS_PER_LAYER_ABOVE`` for a model of more than ``ALL_HEADS_UP_TO`` heads; None when
    that is every head (k >= n_head, or the model's shape is not given and none was requested)."""
    if requested is not None and int(requested) < 1:
        raise ValueError(f"suite.patching_heads must be a number of heads per layer >= 1 (or null), got {requested}")
    if n_layer is None or n_head is None:
        if requested is not None:
            raise ValueError("suite.patching_heads needs the model's n_layer and n_head to draw the heads")
        return None
    k = int(requested) if requested is not None else (HEADS_PER_LAYER_ABOVE if n_layer * n_head > ALL_HEADS_UP_TO
                                                      else n_head)
    if k >= n_head:
        return None
    return torch.stack([torch.randperm(n_head, generator=generator)[:k].sort().values for _ in range(n_layer)])


def _repeat_windows(data_config: dict, val_tokens: torch.Tensor, T: int, n: int, allowed: torch.Tensor,
                    counts, seed: int) -> tuple[dict, torch.Tensor]:
    """(the curriculum, (n, T) validation windows with it): one batch of the trainer's own
    sampler (``data.BatchSampler``) over the validation split, with the run's repeat settings."""
    sampler = BatchSampler(val_tokens, n, T, seed, **curriculum_args(data_config), allowed_ids=allowed,
                           token_weights=counts)
    repeats = {k: sampler.repeat[k] for k in ("frac", "kind", "min_len", "max_len")}
    return repeats, sampler.sample()[0]


# --------------------------------------------------------------------------- a run's own data

@lru_cache(maxsize=8)
def _load_data_cached(data_cfg_json: str):
    return load_run_data(json.loads(data_cfg_json))


def run_data(train_config: dict, ckpt: dict, data_dir: str | None = None):
    """The run's own data (``config['data']``), or the nanoGPT folder ``data_dir`` when one is
    named, checked against the checkpoint's vocabulary (``tokenizer_from_checkpoint``).

    A checkpoint that carries no vocabulary and names no dataset (a plain nanoGPT ckpt.pt)
    is a one-line AnalysisError: scoring it on some default text would use a foreign vocabulary.
    """
    try:
        tok = tokenizer_from_checkpoint(ckpt)
    except TokenizerError as e:
        tok, no_vocab = None, str(e)
    data_cfg = {"name": "nanogpt", "dir": str(data_dir)} if data_dir else dict(train_config.get("data") or {})
    if not data_cfg:
        raise AnalysisError(no_vocab if tok is None else
                            "the checkpoint names no dataset (no config['data']); name its data folder: data_dir=...")
    try:
        data = _load_data_cached(json.dumps(data_cfg, sort_keys=True, default=str))
    except DataError as e:  # missing file, unknown name, a refused meta.pkl, ...
        raise AnalysisError(f"cannot load the run's validation text ({one_line(e)})") from e
    if tok is not None and tok.fingerprint != data.tokenizer.fingerprint:
        raise AnalysisError(f"the validation text's vocabulary ({data.tokenizer.kind}, {data.vocab_size} tokens) "
                            f"differs from the checkpoint's ({tok.kind}, {tok.vocab_size}): was the data changed?")
    n_model = (ckpt.get("model_args") or {}).get("vocab_size")
    if n_model is not None and n_model < data.vocab_size:
        raise AnalysisError(f"the data has {data.vocab_size} tokens but the model only {n_model}: "
                            "not the data this checkpoint was trained on")
    return data


def train_config_of(ckpt: dict, run_dir: Path | None) -> dict:
    """The training config saved in the checkpoint, else the run dir's config.yaml, else {};
    in today's key names (``training.config.upgrade_saved_config``: runs from before a rename too)."""
    train_config = ckpt.get("config") or {}
    if not train_config and run_dir is not None:
        train_config = read_run_config(run_dir) or {}
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
                        data_config=train_config.get("data"), n_layer=args.get("n_layer"), n_head=args.get("n_head"))
