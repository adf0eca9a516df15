"""The per-checkpoint metric suite: one model in, tidy rows (metric, layer, head, value) out.

Every number comes from the toolkit (``induction_dynamics.interpretability``); this module
only runs it on a run's fixed ``Prompts`` and lays the results out as rows. One function per
suite id (config ``suite.metrics``), registered with ``@computes``: it returns
``{metric name: value}`` for the metrics ``registry.METRICS`` says it produces, each value
shaped as the metric's level says (``registry`` module docstring); ``run_suite`` turns them
into rows. Adding a metric is one such function plus its ``registry.Metric`` entries
(``docs/extending.md``).

The text windows go through the model once however many metrics read them (``Context.text``):
the previous-token scores, the ICL score and the per-token losses share one forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from induction_dynamics.analysis import registry
from induction_dynamics.analysis.prompts import Prompts
from induction_dynamics.analysis.table import pair_metric
from induction_dynamics.errors import one_line
from induction_dynamics.interpretability import activation_patching as ap
from induction_dynamics.interpretability import composition as comp
from induction_dynamics.interpretability import logit_lens as ll
from induction_dynamics.interpretability import metrics as M
from induction_dynamics.interpretability.llc import estimate_llc
from induction_dynamics.interpretability.utils import attention_patterns

Values = dict[str, "torch.Tensor | float"]
COMPUTE: dict[str, Callable[["Context"], Values]] = {}


def computes(suite_id: str):
    """Register ``fn(context) -> {metric name: value}`` as the computation of ``suite_id``."""
    if suite_id not in registry.SUITE_IDS:
        raise KeyError(f"suite id {suite_id!r} has no metric in registry.METRICS")

    def register(fn):
        COMPUTE[suite_id] = fn
        return fn
    return register


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
                patterns, logits = attention_patterns(self.model, self.tokens, with_logits=True)
            else:
                logits, patterns = self.model(self.tokens)[0], None
            self._out = M.per_token_losses(self.model, self.tokens, logits), patterns
        return self._out

    @property
    def losses(self) -> torch.Tensor:
        """(W, T-1) per-token losses: entry t is the loss of predicting token t+1."""
        return self._run()[0]

    @property
    def patterns(self) -> torch.Tensor:
        """(n_layer, W, n_head, T, T) attention patterns."""
        return self._run()[1]


@dataclass
class Context:
    """What a computation may read: the model, the run's prompts, and the shared text forward;
    ``extras``: what a computation gives besides table values (the LLC's chain loss traces)."""

    model: torch.nn.Module
    prompts: Prompts
    metrics: tuple[str, ...]
    extras: dict = field(default_factory=dict)

    @cached_property
    def text(self) -> TextRun:
        return TextRun(self.model, self.prompts.text, patterns="previous_token" in self.metrics)


@computes("induction")
def _induction(c: Context) -> Values:
    return {"induction_score": M.induction_scores(c.model, c.prompts.induction, c.prompts.induction_seq_len)}


@computes("prefix_matching")
def _prefix_matching(c: Context) -> Values:
    return {"prefix_matching_score": M.prefix_matching_scores(c.model, c.prompts.prefix, c.prompts.prefix_seq_len)}


@computes("previous_token")
def _previous_token(c: Context) -> Values:
    return {"previous_token_score": M.previous_token_score_from_pattern(c.text.patterns)}


@computes("duplicate_token")
def _duplicate_token(c: Context) -> Values:
    return {"duplicate_token_score": M.duplicate_token_scores(c.model, c.prompts.induction,
                                                              c.prompts.induction_seq_len)}


@computes("copying")
def _copying(c: Context) -> Values:
    return {"copying_score": M.copying_scores(c.model, c.prompts.induction)}


@computes("ov_copying")
def _ov_copying(c: Context) -> Values:
    return {"ov_copying_score": M.ov_copying_scores(c.model)}


@computes("icl")
def _icl(c: Context) -> Values:
    return {"icl_score": M.icl_score_from_losses(c.text.losses, c.prompts.icl_early, c.prompts.icl_late)}


@computes("icl_repeats")
def _icl_repeats(c: Context) -> Values:
    p = c.prompts
    return {"icl_score_repeats": M.icl_score(c.model, p.text_repeats, p.icl_early, p.icl_late)}


@computes("token_loss")
def _token_loss(c: Context) -> Values:
    losses = c.text.losses  # (W, T-1)
    return {"text_loss": losses.mean().item(), "token_loss": losses}


@computes("induction_loss")
def _induction_loss(c: Context) -> Values:
    first, second = M.repeated_sequence_loss(c.model, c.prompts.induction, c.prompts.induction_seq_len)
    return {"induction_loss_first": first, "induction_loss_second": second}


@computes("patching")
def _patching(c: Context) -> Values:
    """resid, attn_out, mlp_out (MLP models) and heads, from one setup forward (``patch_suite``)."""
    p = c.prompts.patching
    effects = ap.patch_suite(c.model, p.clean, p.corrupted, p.answer, p.corrupted_answer)
    names = {"resid": "patch_resid", "attn_out": "patch_attn_out", "mlp_out": "patch_mlp_out", "heads": "patch_head"}
    return {names[part]: values for part, values in effects.items()}


@computes("attribution_patching")
def _attribution_patching(c: Context) -> Values:
    p = c.prompts.patching
    with torch.enable_grad():
        return {"attribution_patch_head": ap.attribution_patch_heads(c.model, p.clean, p.corrupted, p.answer,
                                                                     p.corrupted_answer)}


@computes("logit_lens")
def _logit_lens(c: Context) -> Values:
    p = c.prompts.patching
    lens = ll.logit_lens(c.model, p.clean, target_position=-1, target=p.answer)
    return {"logit_lens_prob": lens.target_probs, "logit_lens_rank": lens.target_ranks,
            "logit_lens_convergence_layer": float(ll.measure_convergence(lens)["convergence_layer"])}


@computes("composition")
def _composition(c: Context) -> Values:
    cfg = c.model.config
    out: Values = {f"{kind.lower()}_composition": scores for kind, scores in comp.all_composition_scores(c.model).items()}
    out["composition_baseline"] = comp.composition_baseline(cfg.n_embd, cfg.n_embd // cfg.n_head)
    return out


@computes("llc")
def _llc(c: Context) -> Values:
    r = estimate_llc(c.model, c.prompts.llc_windows, **c.prompts.llc)  # SGLD on a copy of the model
    c.extras["llc_traces"] = {"traces": r.traces, "num_burnin_steps": r.num_burnin_steps,
                              "init_loss": r.init_loss, "n_beta": r.n_beta, "llc": r.mean}
    return {"llc": r.mean, "llc_std": r.std}


# --------------------------------------------------------------------------- values -> rows

def rows_of(metric: registry.Metric, value) -> list[tuple]:
    """The tidy rows (metric, layer, head, value) of one computed value, laid out by its level."""
    if metric.level == registry.Level.model:
        return [(metric.name, -1, -1, float(value))]
    values = torch.as_tensor(value)
    if metric.level == registry.Level.layer:
        return [(metric.name, l, -1, float(v)) for l, v in enumerate(values.tolist())]
    if metric.level == registry.Level.head:
        return [(metric.name, l, h, float(v)) for l, row in enumerate(values.tolist()) for h, v in enumerate(row)]
    if metric.level == registry.Level.pair:  # every sender in an earlier layer than its receiver
        L, H = values.shape[:2]
        return [(pair_metric(metric.name, la, ha), lb, hb, float(values[la, ha, lb, hb]))
                for la in range(L) for ha in range(H) for lb in range(la + 1, L) for hb in range(H)]
    raise ValueError(f"{metric.name}: level {metric.level} has no tidy rows")


@torch.no_grad()
def run_suite(model, prompts: Prompts, metrics, errors: list[dict] | None = None,
              extras: dict | None = None) -> tuple[list[tuple], np.ndarray | None]:
    """Evaluate the suite ids ``metrics`` on one model: ``([(metric, layer, head, value), ...], token losses)``.

    token losses: the (W * (T-1),) float32 per-token losses on the text windows (the token-level
    metric), or None when ``token_loss`` is not in ``metrics`` (or it failed).
    A computation that raises gives no rows; with ``errors`` given, ``{"metric", "error"}`` (one
    line) is appended there and the others still run. Without it the exception propagates.
    ``extras``: filled with what the computations give besides rows (``Context.extras``).
    """
    metrics = tuple(str(m) for m in metrics)
    context = Context(model, prompts, metrics)
    rows: list[tuple] = []
    tokens = None
    for suite_id in metrics:
        try:
            new, token_values = [], None
            for name, value in COMPUTE[suite_id](context).items():
                metric = registry.BY_NAME[name]
                if metric.level == registry.Level.token:
                    token_values = torch.as_tensor(value).float().reshape(-1).cpu().numpy()
                else:
                    new += rows_of(metric, value)
            rows += new
            tokens = token_values if token_values is not None else tokens
        except Exception as e:
            if errors is None:
                raise
            errors.append({"metric": suite_id, "error": one_line(e)})
    if extras is not None:
        extras.update(context.extras)
    return rows, tokens
