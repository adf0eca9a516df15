"""The per-checkpoint metric suite: one model in, tidy rows (metric, layer, head, value, stderr) out.

Every number comes from the toolkit (``induction_dynamics.interpretability``); this module
only runs it on a run's fixed ``Prompts`` and lays the results out as rows. One function per
suite id (config ``suite.metrics``), registered with ``@computes``: it returns
``{metric name: value}`` for the metrics ``registry.METRICS`` says it produces, each value
shaped as the metric's level says (``registry`` module docstring), as an ``Estimate`` (mean
and standard error over its sampling units: prompts, windows, chains) where it is a mean over
samples, bare where it is not (scores of the weights); ``run_suite`` turns them into rows.
Adding a metric is one such function plus its ``registry.Metric`` entries (``docs/extending.md``).

The text windows are streamed through the model once however many metrics read them
(``Context.text``, a ``TextPass``): the previous-token scores, the ICL score and the per-token
losses accumulate chunk by chunk, so memory does not grow with the number of windows.

What each computation costs (FLOPs and memory as formulas in the model's shape and the suite's
settings): docs/scaling.md, "Analysis cost per checkpoint", and the docstrings of ``TextPass``,
``activation_patching.patch_suite`` (per-head patching, the one cost that grows with
n_layer x n_head x positions, hence ``suite.patching_heads``) and ``attribution_patch_heads``,
``metrics.copying_scores`` and ``composition._kind_scores``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from induction_dynamics.analysis import registry
from induction_dynamics.analysis.estimate import Estimate, Moments, of_samples, ratio
from induction_dynamics.analysis.prompts import Prompts
from induction_dynamics.analysis.table import pair_metric
from induction_dynamics.errors import one_line
from induction_dynamics.interpretability import activation_patching as ap
from induction_dynamics.interpretability import composition as comp
from induction_dynamics.interpretability import logit_lens as ll
from induction_dynamics.interpretability import metrics as M
from induction_dynamics.interpretability.llc import estimate_llc
from induction_dynamics.interpretability.utils import HookManager, layer_of

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


class TextPass:
    """A set of text windows streamed through the model in chunks, every metric that reads them
    accumulated as it goes (``estimate.Moments``): memory holds one chunk's activations and
    logits, never the whole set's. Per window (the sampling unit): its loss at the late minus
    the early ICL position, with ``every_loss`` its mean loss, and, with ``patterns``, each head's
    previous-token score, reduced from the attention pattern inside the forward so no pattern
    outlives its layer. With ``keep_losses`` every window's per-token losses are kept (the PCA
    plot's input, W x (T-1) numbers). Without ``every_loss`` or ``keep_losses`` the unembedding
    runs for the two ICL positions alone (a hook on ``hook_ln_final`` keeps those): it is
    2 C vocab of the forward's ~2 (12 n_layer C^2 + C vocab) FLOPs per token, a third at GPT-2
    small, and its (b, T, vocab) logits the chunk's largest tensor.

    Cost per pass: W windows of T tokens, about 2 W T (12 n_layer C^2 + 2 n_layer T C + C vocab)
    FLOPs (``chunk_size`` windows per forward); memory: one chunk's logits (chunk x T x vocab
    floats, and as many for the cross-entropy's log-softmax) and one layer's attention pattern
    (chunk x n_head x T x T with ``patterns``), whatever W is.
    """

    def __init__(self, model, windows: torch.Tensor, chunk: int, icl: tuple[int, int], *,
                 patterns: bool = False, every_loss: bool = True, keep_losses: bool = False,
                 precision: str = "float32"):
        self.loss, self.icl, self.previous_token = Moments(), Moments(), Moments()
        self.token_losses = None
        early, late = icl
        every_loss = every_loss or keep_losses
        kept = []
        scores: dict[int, torch.Tensor] = {}

        def previous_token(pattern, hook):  # (b, nh, T, T) -> (b, nh): mean of A[i, i-1]
            scores[layer_of(hook.name)] = pattern.diagonal(offset=-1, dim1=-2, dim2=-1).float().mean(-1)

        def icl_only(x, hook):  # (b, T, C) -> (b, 2, C): what the unembedding reads, at the ICL positions
            return x[:, [early, late]]

        hooks = [("attn.hook_pattern", previous_token)] if patterns else []
        if not every_loss:
            hooks.append(("transformer.hook_ln_final", icl_only))
        autocast = (torch.autocast(windows.device.type, dtype=torch.bfloat16) if precision == "bfloat16"
                    else contextlib.nullcontext())
        with HookManager(model).hooks(hooks):
            for chunk_windows in windows.split(chunk):
                scores.clear()
                with autocast:
                    logits, _ = model(chunk_windows)
                if every_loss:
                    losses = M.per_token_losses(model, chunk_windows, logits.float())  # (b, T-1)
                    self.loss.add(losses.mean(1))
                    self.icl.add(losses[:, late] - losses[:, early])
                else:
                    at = M.per_token_losses(model, chunk_windows, logits.float(), positions=[early, late])  # (b, 2)
                    self.icl.add(at[:, 1] - at[:, 0])
                del logits
                if patterns:
                    self.previous_token.add(torch.stack([scores[l] for l in sorted(scores)], 1))  # (b, L, nh)
                if keep_losses:
                    kept.append(losses.float().cpu())
        if keep_losses:
            self.token_losses = torch.cat(kept)  # (W, T-1)


def chunk_size(requested: int | None, n_windows: int, T: int, vocab: int, n_head: int) -> int:
    """Windows per forward: ``requested``, else as many as keep one chunk's logits (T x vocab per
    window) and one layer's attention pattern (n_head x T x T) under 2^24 floats each (64 MiB):
    GPT-2 small at block 256 gets 1 window a chunk, the baby model (6 heads, block 256) 42, the
    quickstart model (block 64) 256. A forward holds several tensors of those sizes at once (the
    scores, their softmax and the pattern; the logits and their log-softmax): the baby model's
    text pass peaks ~9 MB a window of the chunk above the weights, so the budget is what keeps
    the peak the same from 64 windows to thousands (at 2^25 the baby model's chunk grew from 64
    to 85 windows between 64 and 512 windows, and its peak by 28%). On a GPU with memory to
    spare, ``suite.chunk_windows`` sets larger chunks."""
    if requested:
        return max(1, int(requested))
    budget = 1 << 24
    return max(1, min(n_windows, budget // (T * vocab), budget // (n_head * T * T)))


@dataclass
class Context:
    """What a computation may read: the model, the run's prompts, and the streamed text passes;
    ``extras``: what a computation gives besides table values (the LLC's chain loss traces)."""

    model: torch.nn.Module
    prompts: Prompts
    metrics: tuple[str, ...]
    chunk: int | None = None   # windows per forward (``chunk_size``)
    precision: str = "float32"  # of the text windows' forwards
    notes: list[dict] = field(default_factory=list)  # what a computation says about its numbers
    extras: dict = field(default_factory=dict)

    def _pass(self, windows: torch.Tensor, **kw) -> TextPass:
        cfg = self.model.config
        n = chunk_size(self.chunk, len(windows), windows.shape[1], cfg.vocab_size, cfg.n_head)
        return TextPass(self.model, windows, n, (self.prompts.icl_early, self.prompts.icl_late),
                        precision=self.precision, **kw)

    @cached_property
    def text(self) -> TextPass:
        """``prompts.text`` once, for every metric that reads it (previous-token, ICL, token losses)."""
        losses = "token_loss" in self.metrics
        return self._pass(self.prompts.text, patterns="previous_token" in self.metrics, every_loss=losses,
                          keep_losses=losses)

    @cached_property
    def text_repeats(self) -> TextPass:
        """``prompts.text_repeats``, for the ICL score alone: unembedded at its two positions."""
        return self._pass(self.prompts.text_repeats, every_loss=False)


def per_prompt(values: torch.Tensor) -> Estimate:
    """A score computed on each prompt, (n_layer, B, n_head) or (B,): its mean and standard error."""
    return of_samples(values.transpose(0, 1) if values.dim() == 3 else values)


@computes("induction")
def _induction(c: Context) -> Values:
    p = c.prompts
    return {"induction_score": per_prompt(M.induction_scores(c.model, p.induction, p.induction_seq_len, True))}


@computes("prefix_matching")
def _prefix_matching(c: Context) -> Values:
    p = c.prompts
    return {"prefix_matching_score": per_prompt(M.prefix_matching_scores(c.model, p.prefix, p.prefix_seq_len, True))}


@computes("previous_token")
def _previous_token(c: Context) -> Values:
    return {"previous_token_score": c.text.previous_token.estimate()}


@computes("duplicate_token")
def _duplicate_token(c: Context) -> Values:
    p = c.prompts
    return {"duplicate_token_score": per_prompt(M.duplicate_token_scores(c.model, p.induction, p.induction_seq_len,
                                                                         True))}


@computes("copying")
def _copying(c: Context) -> Values:
    return {"copying_score": per_prompt(M.copying_scores(c.model, c.prompts.induction, per_prompt=True))}


@computes("ov_copying")
def _ov_copying(c: Context) -> Values:
    return {"ov_copying_score": M.ov_copying_scores(c.model)}  # of the weights: no sampling error


@computes("icl")
def _icl(c: Context) -> Values:
    return {"icl_score": c.text.icl.estimate()}


@computes("icl_repeats")
def _icl_repeats(c: Context) -> Values:
    return {"icl_score_repeats": c.text_repeats.icl.estimate()}


@computes("token_loss")
def _token_loss(c: Context) -> Values:
    return {"text_loss": c.text.loss.estimate(), "token_loss": c.text.token_losses}


@computes("induction_loss")
def _induction_loss(c: Context) -> Values:
    first, second = M.repeated_sequence_loss(c.model, c.prompts.induction, c.prompts.induction_seq_len, True)
    return {"induction_loss_first": per_prompt(first), "induction_loss_second": per_prompt(second)}


def _normalised(rows: torch.Tensor, run) -> Estimate:
    """Normalised patching effects (n_components,) with their delta-method standard errors over
    the prompts; NaN where ``run.undefined`` (the clean - corrupted gap is within its noise)."""
    est = ratio((rows - run.corrupted_rows).transpose(0, 1), run.clean_rows - run.corrupted_rows)
    if run.undefined:
        return Estimate(torch.full_like(est.value, math.nan), torch.full_like(est.value, math.nan))
    return Estimate(est.value, est.stderr)


def _baselines(run) -> Values:
    return {"patch_clean_logit_diff": of_samples(run.clean_rows),
            "patch_corrupted_logit_diff": of_samples(run.corrupted_rows),
            "patch_baseline_gap": of_samples(run.clean_rows - run.corrupted_rows)}


@computes("patching")
def _patching(c: Context) -> Values:
    """resid, attn_out, mlp_out (MLP models) and heads, from one setup forward (``patch_suite``),
    and the clean and corrupted baselines they are normalised with. The heads: those of
    ``prompts.patching_heads`` (``suite.patching_heads``; its cost model: ``patch_suite``), rows
    for those alone; each is what patching every head gives for it."""
    p = c.prompts.patching
    heads = c.prompts.patched_heads()
    effects, parts, run = ap.patch_suite(c.model, p.clean, p.corrupted, p.answer, p.corrupted_answer, with_run=True,
                                         heads=heads)
    names = {"resid": "patch_resid", "attn_out": "patch_attn_out", "mlp_out": "patch_mlp_out", "heads": "patch_head"}
    out = _baselines(run)
    for part, where in parts.items():
        e = _normalised(run.patched_rows[where], run)
        if part == "heads" and heads is not None:  # (n_heads patched,) into the (n_layer, n_head) grid
            index = tuple(torch.tensor(heads).T)
            grid = [torch.full(effects["heads"].shape, math.nan, dtype=t.dtype, device=t.device)
                    for t in (e.value, e.stderr)]
            grid[0][index], grid[1][index] = e.value, e.stderr
            out[names[part]] = SomeHeads(Estimate(*grid), heads)
            continue
        shape = effects[part].shape
        out[names[part]] = Estimate(e.value.reshape(shape), e.stderr.reshape(shape))
    if run.undefined:
        c.notes.append({"metric": "patching", "note": f"normalised effects undefined (NaN): {run.undefined}"})
    return out


@computes("attribution_patching")
def _attribution_patching(c: Context) -> Values:
    p = c.prompts.patching
    with torch.enable_grad():
        rows, clean, corrupted = ap.attribution_patch_heads(c.model, p.clean, p.corrupted, p.answer,
                                                            p.corrupted_answer, per_prompt=True)
    est = ratio(rows, clean - corrupted)  # (B, L, nh) over (B,): the same normalisation as patching
    if ap.undefined_reason(clean, corrupted)[1]:
        est = Estimate(torch.full_like(est.value, math.nan), torch.full_like(est.value, math.nan))
    return {"attribution_patch_head": est}


@computes("logit_lens")
def _logit_lens(c: Context) -> Values:
    p = c.prompts.patching
    lens = ll.logit_lens(c.model, p.clean, target_position=-1, target=p.answer)
    return {"logit_lens_prob": of_samples(lens.target_prob_rows.transpose(0, 1)),
            "logit_lens_rank": of_samples(lens.target_rank_rows.transpose(0, 1)),
            "logit_lens_convergence_layer": float(ll.measure_convergence(lens)["convergence_layer"])}


@computes("composition")
def _composition(c: Context) -> Values:  # of the weights: no sampling error
    cfg = c.model.config
    out: Values = {f"{kind.lower()}_composition": scores for kind, scores in comp.all_composition_scores(c.model).items()}
    out["composition_baseline"] = comp.composition_baseline(cfg.n_embd, cfg.n_embd // cfg.n_head)
    return out


@computes("llc")
def _llc(c: Context) -> Values:
    r = estimate_llc(c.model, c.prompts.llc_windows, **c.prompts.llc)  # SGLD on a copy of the model
    c.extras["llc_traces"] = {"traces": r.traces, "num_burnin_steps": r.num_burnin_steps,
                              "init_loss": r.init_loss, "n_beta": r.n_beta, "llc": r.mean}
    return {"llc": Estimate(r.mean, r.stderr), "llc_std": r.std}


# --------------------------------------------------------------------------- values -> rows

@dataclass
class SomeHeads:
    """A head-level value computed for some heads only: rows for those (layer, head) alone."""

    value: Estimate | torch.Tensor   # (n_layer, n_head); the other heads' entries are never read
    heads: list[tuple[int, int]]


def rows_of(metric: registry.Metric, value) -> list[tuple]:
    """The tidy rows (metric, layer, head, value, stderr) of one computed value, laid out by its
    level; an ``Estimate`` brings its standard error, a bare value has none (NaN)."""
    if isinstance(value, SomeHeads):
        kept = set(value.heads)
        return [r for r in rows_of(metric, value.value) if (r[1], r[2]) in kept]
    if isinstance(value, Estimate):
        value, stderr = value.value, value.stderr
    else:
        stderr = math.nan
    if metric.level == registry.Level.model:
        return [(metric.name, -1, -1, float(value), float(stderr))]
    values = torch.as_tensor(value).cpu()
    errs = torch.as_tensor(stderr, dtype=torch.float64).cpu().expand(values.shape)
    if metric.level == registry.Level.layer:
        return [(metric.name, l, -1, float(v), float(e)) for l, (v, e) in enumerate(zip(values.tolist(), errs.tolist()))]
    if metric.level == registry.Level.head:
        return [(metric.name, l, h, float(v), float(e)) for l, (row, erow) in enumerate(zip(values.tolist(), errs.tolist()))
                for h, (v, e) in enumerate(zip(row, erow))]
    if metric.level == registry.Level.pair:  # every sender in an earlier layer than its receiver
        L, H = values.shape[:2]
        return [(pair_metric(metric.name, la, ha), lb, hb, float(values[la, ha, lb, hb]), float(errs[la, ha, lb, hb]))
                for la in range(L) for ha in range(H) for lb in range(la + 1, L) for hb in range(H)]
    raise ValueError(f"{metric.name}: level {metric.level} has no tidy rows")


@torch.no_grad()
def run_suite(model, prompts: Prompts, metrics, errors: list[dict] | None = None,
              chunk: int | None = None, precision: str = "float32",
              extras: dict | None = None) -> tuple[list[tuple], np.ndarray | None]:
    """Evaluate the suite ids ``metrics`` on one model:
    ``([(metric, layer, head, value, stderr), ...], token losses)``.

    token losses: the (W * (T-1),) float32 per-token losses on the text windows (the token-level
    metric), or None when ``token_loss`` is not in ``metrics`` (or it failed). ``chunk``: text
    windows per forward (``chunk_size``; None: by the model's size); ``precision``: "bfloat16"
    runs the text windows' forwards under autocast (every other computation stays float32).
    A computation that raises gives no rows; with ``errors`` given, ``{"metric", "error"}`` (one
    line) is appended there and the others still run. Without it the exception propagates. A
    computation that has something to say about its numbers (normalised effects left undefined)
    appends ``{"metric", "note"}`` there too. ``extras``: filled with what the computations give
    besides rows (``Context.extras``).
    """
    metrics = tuple(str(m) for m in metrics)
    context = Context(model, prompts, metrics, chunk, str(precision))
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
    if errors is not None:
        errors += context.notes
    if extras is not None:
        extras.update(context.extras)
    return rows, tokens
