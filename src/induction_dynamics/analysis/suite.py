"""The per-checkpoint metric suite: one model in, tidy rows (metric, layer, head, value) out.

Every number comes from the toolkit (``induction_dynamics.interpretability``); this module
only fixes the prompt data and flattens the results. The prompts are drawn once per run from
the analysis seed (``Prompts``), so every checkpoint sees the same inputs and runs with the
same data and shape see identical prompts (comparable across seeds of a sweep):

- ``induction``: ``[x, x]`` with ``induction_seq_len`` distinct tokens per half, drawn from
  ``repeat_token_ids`` (the tokens the training text uses minus their rarest/commonest 10%,
  from the checkpoint's ``token_counts``); also used for duplicate-token, copying and induction-loss scores.
- ``prefix``: Olsson et al.'s prefix-matching prompt, ``prefix_seq_len`` tokens x 4.
- ``text``: ``text_windows`` fixed windows of ``block_size`` validation tokens (the
  checkpoint's ``config["data"]`` through ``data.load_data``): previous-token score, ICL
  score at positions (early, late), per-token losses (for the PCA plot), from one forward.
- ``text_repeats``: as many other validation windows with the run's repeat curriculum
  written in exactly as the trainer's sampler writes it (``config["data"]["repeat_*"]``;
  plain text when the run had none): the ICL score on the *training distribution*, which
  is where Olsson et al. measure it (held-out data like the training data).
- ``patching``: ``induction_patching_data`` pairs (clean / one token corrupted).
- ``llc`` (only when the ``llc`` metric is on): ``suite.llc.windows`` more validation windows
  with the run's repeat curriculum, the SGLD data of the local learning coefficient; its
  settings (``suite.llc``, n_beta resolved) are in ``info()``, hence in run_info.json, the
  W&B config and the cache fingerprint.

Metric ids (config ``suite.metrics``) and the table metrics they give: ``config.SUITE_METRICS``;
what each one means: ``table.METRICS``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from induction_dynamics.analysis.config import SUITE_METRICS
from induction_dynamics.data import BatchSampler, curriculum_args, windows
from induction_dynamics.analysis.table import pair_metric
from induction_dynamics.interpretability import activation_patching as ap
from induction_dynamics.interpretability import composition as comp
from induction_dynamics.interpretability.llc import default_n_beta, estimate_llc
from induction_dynamics.interpretability import logit_lens as ll
from induction_dynamics.interpretability import metrics as M
from induction_dynamics.interpretability.utils import HookManager

# separate generator seeds per prompt kind: adding a metric never changes another's prompt
_PROMPT_OFFSETS = {"induction": 0, "prefix": 1, "text": 2, "patching": 3, "text_repeats": 4, "llc": 5}


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

    def info(self) -> dict:
        """JSON-able description for run_info.json and the W&B config."""
        return {"n_allowed_tokens": len(self.allowed), "induction_seq_len": self.induction_seq_len,
                "induction_batch": self.induction.shape[0], "prefix_seq_len": self.prefix_seq_len,
                "text_windows": self.text.shape[0], "text_window_len": self.text.shape[1],
                "icl_early": self.icl_early, "icl_late": self.icl_late,
                "patching_batch": self.patching.clean.shape[0],
                "patching_len": self.patching.clean.shape[1], "text_repeats": self.repeats,
                **({"llc": {**self.llc, "windows": self.llc_windows.shape[0]}} if self.llc else {})}

    def to(self, device) -> Prompts:
        p = self.patching
        return Prompts(self.allowed.to(device), self.induction.to(device), self.induction_seq_len,
                       self.prefix.to(device), self.prefix_seq_len, self.text.to(device), self.icl_early,
                       self.icl_late, ap.PatchingData(p.clean.to(device), p.corrupted.to(device),
                                                      p.answer.to(device), p.corrupted_answer.to(device)),
                      self.text_repeats.to(device), self.repeats,
                      None if self.llc_windows is None else self.llc_windows.to(device), self.llc)


def validate_metrics(metrics) -> list[str]:
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in SUITE_METRICS]
    if unknown:
        raise ValueError(f"unknown suite metric(s) {unknown}; choose from {list(SUITE_METRICS)}")
    return metrics


def make_prompts(suite, *, vocab_size: int, block_size: int, token_counts, val_tokens: torch.Tensor,
                 seed: int, data_config: dict | None = None) -> Prompts:
    """Draw every prompt of a run from ``seed`` (see the module docstring for what each is).

    ``data_config``: the run's training ``config["data"]``; its ``repeat_*`` keys give the
    curriculum of the ``text_repeats`` windows (none when absent or ``repeat_frac`` is 0).
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
               "n_beta": c.n_beta if c.n_beta is not None else default_n_beta(c.batch_size),
               "num_chains": c.num_chains, "num_draws": c.num_draws, "num_burnin_steps": c.num_burnin_steps,
               "batch_size": c.batch_size, "seed": int(seed)}
    return Prompts(allowed, induction, L, prefix, P, text, int(early), int(late), patching, text_repeats, repeats,
                   llc_windows, llc)


def _repeat_windows(data_config: dict, val_tokens: torch.Tensor, T: int, n: int, allowed: torch.Tensor,
                    counts, seed: int) -> tuple[dict, torch.Tensor]:
    """(the curriculum, (n, T) validation windows with it): one batch of the trainer's own
    sampler (``data.BatchSampler``) over the validation split, with the run's repeat settings."""
    sampler = BatchSampler(val_tokens, n, T, seed, **curriculum_args(data_config), allowed_ids=allowed,
                           token_weights=counts)
    repeats = {k: sampler.repeat[k] for k in ("frac", "kind", "min_len", "max_len")}
    return repeats, sampler.sample()[0]


def _head_rows(metric: str, scores: torch.Tensor) -> list[tuple]:
    return [(metric, l, h, float(v)) for l, row in enumerate(scores.tolist()) for h, v in enumerate(row)]


def _pair_rows(family: str, scores: torch.Tensor) -> list[tuple]:
    """Rows of a (n_layer, n_head, n_layer, n_head) pair score, every sender in an earlier layer."""
    L, H = scores.shape[:2]
    return [(pair_metric(family, la, ha), lb, hb, float(scores[la, ha, lb, hb]))
            for la in range(L) for ha in range(H) for lb in range(la + 1, L) for hb in range(H)]


def _layer_rows(metric: str, values) -> list[tuple]:
    return [(metric, l, -1, float(v)) for l, v in enumerate(torch.as_tensor(values).tolist())]


def _patching_rows(model, p: Prompts) -> list[tuple]:
    """resid, attn_out, mlp_out (MLP models) and heads, from one setup forward (``patch_suite``)."""
    pd_ = p.patching
    effects = ap.patch_suite(model, pd_.clean, pd_.corrupted, pd_.answer, pd_.corrupted_answer)
    names = {"resid": "patch_resid", "attn_out": "patch_attn_out", "mlp_out": "patch_mlp_out", "heads": "patch_head"}
    return [row for part, values in effects.items()
            for row in (_head_rows if part == "heads" else _layer_rows)(names[part], values)]


def _attribution_rows(model, p: Prompts) -> list[tuple]:
    pd_ = p.patching
    with torch.enable_grad():
        return _head_rows("attribution_patch_head", ap.attribution_patch_heads(
            model, pd_.clean, pd_.corrupted, pd_.answer, pd_.corrupted_answer))


def _logit_lens_rows(model, p: Prompts) -> list[tuple]:
    lens = ll.logit_lens(model, p.patching.clean, target_position=-1, target=p.patching.answer)
    conv = ll.measure_convergence(lens)["convergence_layer"]
    return (_layer_rows("logit_lens_prob", lens.target_probs) + _layer_rows("logit_lens_rank", lens.target_ranks)
            + [("logit_lens_convergence_layer", -1, -1, float(conv))])


def _induction_loss_rows(model, p: Prompts) -> list[tuple]:
    first, second = M.repeated_sequence_loss(model, p.induction, p.induction_seq_len)
    return [("induction_loss_first", -1, -1, first), ("induction_loss_second", -1, -1, second)]


def _composition_rows(model, p: Prompts) -> list[tuple]:
    rows = []
    for kind, scores in comp.all_composition_scores(model).items():
        rows += _pair_rows(f"{kind.lower()}_composition", scores)
    c = model.config
    return rows + [("composition_baseline", -1, -1, comp.composition_baseline(c.n_embd, c.n_embd // c.n_head))]


def _llc_rows(model, p: Prompts) -> list[tuple]:
    with torch.enable_grad():  # SGLD steps on gradients (on devinterp's copy of the model)
        r = estimate_llc(model, p.llc_windows, **p.llc)
    return [("llc", -1, -1, r.mean), ("llc_std", -1, -1, r.std)]


class TextRun:
    """``prompts.text`` through the model once, however many metrics read it (previous-token
    scores, ICL score, per-token losses): every further forward of it would repeat the first.
    With ``patterns`` the forward also keeps the attention patterns (then it is the explicit-
    attention forward, which the patterns need anyway); runs on first use."""

    def __init__(self, model, tokens: torch.Tensor, patterns: bool):
        self.model, self.tokens, self.keep_patterns = model, tokens, patterns
        self._out = None

    def _run(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._out is None:
            if self.keep_patterns:
                (logits, _), cache = HookManager(self.model).run_with_cache(self.tokens, names_filter="attn.hook_pattern")
                patterns = cache.stack("attn.hook_pattern")  # (n_layer, W, nh, T, T)
            else:
                logits, patterns = self.model(self.tokens)[0], None
            self._out = M.per_token_loss(logits, self.tokens), patterns
        return self._out

    @property
    def losses(self) -> torch.Tensor:
        """(W, T-1) per-token losses, as ``metrics.per_token_losses`` gives them."""
        return self._run()[0]

    @property
    def patterns(self) -> torch.Tensor:
        return self._run()[1]


# metric id -> rows from the text forward (token_loss, which also gives the loss vectors, is run_suite's own)
TEXT_ROWS = {
    "previous_token": lambda t, p: _head_rows("previous_token_score", M.previous_token_score_from_pattern(t.patterns)),
    "icl": lambda t, p: [("icl_score", -1, -1, M.icl_score_from_losses(t.losses, p.icl_early, p.icl_late))],
}

# metric id -> rows of one model (with TEXT_ROWS and token_loss: every id of config.SUITE_METRICS)
METRIC_ROWS = {
    "induction": lambda m, p: _head_rows("induction_score", M.induction_scores(m, p.induction, p.induction_seq_len)),
    "prefix_matching": lambda m, p: _head_rows("prefix_matching_score",
                                               M.prefix_matching_scores(m, p.prefix, p.prefix_seq_len)),
    "duplicate_token": lambda m, p: _head_rows("duplicate_token_score",
                                               M.duplicate_token_scores(m, p.induction, p.induction_seq_len)),
    "copying": lambda m, p: _head_rows("copying_score", M.copying_scores(m, p.induction)),
    "ov_copying": lambda m, p: _head_rows("ov_copying_score", M.ov_copying_scores(m)),
    "icl_repeats": lambda m, p: [("icl_score_repeats", -1, -1,
                                  M.icl_score(m, p.text_repeats, p.icl_early, p.icl_late))],
    "induction_loss": _induction_loss_rows,
    "patching": _patching_rows,
    "attribution_patching": _attribution_rows,
    "logit_lens": _logit_lens_rows,
    "composition": _composition_rows,
    "llc": _llc_rows,
}


@torch.no_grad()
def run_suite(model, prompts: Prompts, metrics,
              errors: list[dict] | None = None) -> tuple[list[tuple], np.ndarray | None]:
    """Evaluate ``metrics`` on one model: ``([(metric, layer, head, value), ...], token losses)``.

    token losses: the (W * (T-1),) float32 per-token losses on the text windows, or None
    when ``token_loss`` is not in ``metrics`` (or it failed).
    A metric that raises gives no rows; with ``errors`` given, ``{"metric", "error"}`` (one
    line) is appended there and the other metrics still run. Without it the exception propagates.
    """
    rows: list[tuple] = []
    tokens = None
    metrics = validate_metrics(metrics)
    text_run = TextRun(model, prompts.text, patterns="previous_token" in metrics)
    for metric in metrics:
        try:
            if metric == "token_loss":
                losses = text_run.losses  # (W, T-1)
                rows.append(("text_loss", -1, -1, losses.mean().item()))
                tokens = losses.float().reshape(-1).cpu().numpy()
            elif metric in TEXT_ROWS:
                rows += TEXT_ROWS[metric](text_run, prompts)
            else:
                rows += METRIC_ROWS[metric](model, prompts)
        except Exception as e:
            if errors is None:
                raise
            text = str(e).strip()
            errors.append({"metric": metric,
                           "error": f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__})
    return rows, tokens
