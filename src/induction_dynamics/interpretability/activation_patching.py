"""Activation patching (causal tracing) with batched forwards, and attribution patching.

Run the model on a *corrupted* input while replacing one component's activation with its
value on the *clean* input, and see how much of the clean behaviour comes back:

    data = induction_patching_data(allowed, seq_len=20, batch=8)
    effects = patch_heads(model, data.clean, data.corrupted, data.answer, data.corrupted_answer)
    effects                       # (n_layer, n_head); the induction head(s) near 1.0

Metric: logit difference ``logit[answer] - logit[corrupted_answer]`` at the last position,
averaged over the batch, normalised as ``(patched - corrupted) / (clean - corrupted)`` so
that the clean run scores 1 and the corrupted run 0 (Wang et al. 2022; TransformerLens's
``patching`` module). A component's effect is the fraction of the clean behaviour it
restores on its own.

Batching: one forward runs clean and corrupted side by side (baselines, default answers,
every activation needed); then each component is patched in its own slice of a stacked
batch (the receiver stacked n times), by a hook on its hook point, one forward per layer,
through the model's own forward from that layer's residual stream, not one forward per
component. Those forwards skip what the metric cannot see: the positions before the first
difference (the same in both runs; their keys and values come from the first forward)
and, in the last block, every query but the last (``patching_runs`` says how, and how
hooks of your own keep every path exact). ``batched=False`` is the plain
one-full-forward-per-component path, kept as the reference the batched one is tested
against. Attribution patching (Nanda 2023) is the first-order shortcut: all heads from one
forward and one backward pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from induction_dynamics.interpretability import patching_runs as runs
from induction_dynamics.interpretability.patching_runs import Component, logit_diff, logit_diffs  # noqa: F401  (public API)
from induction_dynamics.interpretability.utils import HookManager, has_hooks, layer_of

# ---------------------------------------------------------------------------------------
# Data and metric
# ---------------------------------------------------------------------------------------

@dataclass
class PatchingData:
    """A clean/corrupted pair of inputs (B, T) and the answers the metric compares (B,)."""

    clean: torch.Tensor
    corrupted: torch.Tensor
    answer: torch.Tensor
    corrupted_answer: torch.Tensor


def induction_patching_data(allowed: torch.Tensor, seq_len: int, batch: int,
                            generator: torch.Generator | None = None) -> PatchingData:
    """Minimal pairs for induction: the answer can only come from the earlier copy.

    clean = ``[a_0 .. a_{L-1}, a_0 .. a_{L-2}]`` (length 2L-1, L = seq_len distinct tokens
    from ``allowed``): an induction head at the last position predicts ``a_{L-1}``.
    corrupted = the same with ``a_{L-1}`` *in the first copy* replaced by a token ``c``
    that occurs nowhere else, so induction predicts ``c``. answer = a_{L-1},
    corrupted_answer = c. Only one position differs, so whatever restores the answer
    carries it from that position to the end.
    """
    if seq_len < 2 or seq_len + 1 > len(allowed):
        raise ValueError(f"seq_len must be in 2..{len(allowed) - 1} for {len(allowed)} allowed tokens")
    draws = torch.stack([allowed[torch.randperm(len(allowed), generator=generator)[:seq_len + 1]]
                         for _ in range(batch)])  # (B, L+1) distinct per row
    a, c = draws[:, :seq_len], draws[:, seq_len]
    clean = torch.cat([a, a[:, :-1]], dim=1)  # (B, 2L-1)
    corrupted = clean.clone()
    corrupted[:, seq_len - 1] = c
    return PatchingData(clean, corrupted, a[:, -1].clone(), c.clone())


def _as_answer(ans, batch: int, device) -> torch.Tensor:
    ans = torch.as_tensor(ans, device=device, dtype=torch.long)
    return ans.expand(batch) if ans.dim() == 0 else ans


def _answers_from_logits(clean_last: torch.Tensor, corr_last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    answer = clean_last.argmax(-1)
    top2 = corr_last.topk(2, dim=-1).indices  # (B, 2)
    return answer, torch.where(top2[:, 0] == answer, top2[:, 1], top2[:, 0])


@torch.no_grad()
def default_answers(model, clean: torch.Tensor, corrupted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """answer = the clean run's top prediction at the last position, corrupted_answer = the
    corrupted run's (its second choice where both agree, so the difference is never void)."""
    B = clean.shape[0]
    last = model(torch.cat([clean, corrupted]))[0][:, -1]  # (2B, V)
    return _answers_from_logits(last[:B], last[B:])


# ---------------------------------------------------------------------------------------
# The generic routine
# ---------------------------------------------------------------------------------------

MIN_GAP_Z = 2.0  # a clean - corrupted gap within this many standard errors of 0 normalises nothing


@dataclass
class PatchRun:
    """Effects plus the baselines they were normalised with, and every row's logit difference."""

    effects: torch.Tensor            # (n_components,) normalised; NaN when ``undefined``
    clean_logit_diff: float
    corrupted_logit_diff: float
    answer: torch.Tensor
    corrupted_answer: torch.Tensor
    patched_rows: torch.Tensor       # (n_components, B) the receiver's logit difference, patched
    clean_rows: torch.Tensor         # (B,) the clean run's logit difference of each row
    corrupted_rows: torch.Tensor     # (B,)
    gap_stderr: float                # standard error of clean - corrupted over the rows (NaN for one row)
    undefined: str = ""              # why the effects are NaN ("" when they are defined)


@torch.no_grad()
def run_patching(model, clean: torch.Tensor, corrupted: torch.Tensor, components: Iterable[Component],
                 answer=None, corrupted_answer=None, *, donor: str = "clean", receiver: str = "corrupted",
                 batched: bool = True, max_rows: int = 2048, show_progress: bool = False,
                 min_gap_z: float | None = None) -> PatchRun:
    """``patch`` with its baselines, answers and every row's values (see there)."""
    if {donor, receiver} - {"clean", "corrupted"}:
        raise ValueError("donor and receiver must be 'clean' or 'corrupted'")
    if clean.shape != corrupted.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} differ in shape")
    B, T = clean.shape
    hm = HookManager(model)
    components = runs.validate_components(hm, list(components), T)
    # the shortcuts change the positions a hook sees: only when no hook of the user's is there to see
    setup = runs.setup_forward(model, hm, clean, corrupted, components, batched and not has_hooks(model))
    last = setup.last_logits  # (2B, V)
    if answer is None or corrupted_answer is None:
        a, c = _answers_from_logits(last[:B], last[B:])
        answer = a if answer is None else answer
        corrupted_answer = c if corrupted_answer is None else corrupted_answer
    answer, corrupted_answer = _as_answer(answer, B, clean.device), _as_answer(corrupted_answer, B, clean.device)
    clean_rows, corr_rows = logit_diffs(last[:, None], answer, corrupted_answer)  # (B,) each
    clean_ld, corr_ld = clean_rows.mean().item(), corr_rows.mean().item()
    rows = {"clean": slice(0, B), "corrupted": slice(B, 2 * B)}
    recv_input = clean if receiver == "clean" else corrupted
    if batched:
        patched = runs.patched_logit_diffs(model, hm, setup, rows[donor], rows[receiver], recv_input, components,
                                           answer, corrupted_answer, max_rows, show_progress)
    else:
        patched = runs.one_at_a_time(model, hm, setup, rows[donor], recv_input, components, answer,
                                     corrupted_answer, show_progress)
    raw = patched.mean(-1)  # (n_components,) the metric: the batch mean
    denom = clean_ld - corr_ld
    gap_se, undefined = undefined_reason(clean_rows, corr_rows, MIN_GAP_Z if min_gap_z is None else min_gap_z)
    effects = torch.full_like(raw, float("nan")) if undefined else (raw - corr_ld) / denom
    return PatchRun(effects, clean_ld, corr_ld, answer, corrupted_answer, patched, clean_rows.cpu(),
                    corr_rows.cpu(), gap_se, undefined)



def undefined_reason(clean_rows: torch.Tensor, corrupted_rows: torch.Tensor,
                     min_gap_z: float | None = None) -> tuple[float, str]:
    """(standard error of the clean - corrupted gap over the rows, why normalised effects are
    undefined: "" when the gap stands out of its noise). One row: no standard error, only an
    exactly vanishing gap is undefined."""
    min_gap_z = MIN_GAP_Z if min_gap_z is None else min_gap_z
    gap = (clean_rows - corrupted_rows).double()
    mean = gap.mean().item()
    se = (gap.std() / len(gap) ** 0.5).item() if len(gap) > 1 else float("nan")
    if abs(mean) < 1e-12:
        return se, "the clean and corrupted runs give the same logit difference"
    if se == se and abs(mean) <= min_gap_z * se:
        return se, f"the clean - corrupted gap {mean:.3g} is within {min_gap_z:g} standard errors ({se:.2g}) of zero"
    return se, ""


def patch(model, clean: torch.Tensor, corrupted: torch.Tensor, components: Iterable[Component],
          answer=None, corrupted_answer=None, **kw) -> torch.Tensor:
    """Normalised effect of patching each component, (len(components),). The generic routine.

    donor/receiver (keywords): which run the activations come from and which receives them.
    The default (clean into corrupted, "denoising") asks what a component restores;
    ``donor="corrupted", receiver="clean"`` ("noising") asks what breaks the clean run.
    Effects are ``(patched - corrupted) / (clean - corrupted)`` either way, NaN when the
    clean and corrupted runs give the same logit difference or when their gap over the batch
    is within ``min_gap_z`` (default 2) standard errors of zero: the ratio is then a ratio of
    noise (``run_patching`` says why, in ``PatchRun.undefined``). Without answers:
    answer = the clean run's top prediction at the last position, corrupted_answer = the
    corrupted run's (its second choice where both agree). ``batched=False``: one full
    forward per component (the reference); ``max_rows`` caps the patched rows (components
    x batch) per batched forward.
    Use the model in eval mode (dropout off), as ``model_from_checkpoint`` returns it.
    """
    return run_patching(model, clean, corrupted, components, answer, corrupted_answer, **kw).effects


# ---------------------------------------------------------------------------------------
# Named variants
# ---------------------------------------------------------------------------------------

def _n_layer_head(model) -> tuple[int, int]:
    return model.config.n_layer, model.config.n_head


def patch_residual_by_layer(model, clean, corrupted, answer=None, corrupted_answer=None, *,
                            position: int | None = -1, hook: str = "resid_post", **kw) -> torch.Tensor:
    """(n_layer,) patch the residual stream leaving block l (``hook_resid_post``) at ``position``.

    Default: the last position, where the metric is read, so the curve shows after which
    block the answer has arrived there. (Patching *all* positions of a residual stream
    trivially restores everything downstream: every layer would score 1.)
    """
    L, _ = _n_layer_head(model)
    comps = [Component(f"transformer.h.{l}.hook_{hook}", None, position) for l in range(L)]
    return patch(model, clean, corrupted, comps, answer, corrupted_answer, **kw)


def patch_residual_by_position(model, clean, corrupted, answer=None, corrupted_answer=None, *,
                               hook: str = "resid_pre", **kw) -> torch.Tensor:
    """(n_layer, T) patch the residual stream entering each block at each position (TL's resid_pre grid)."""
    L, T = model.config.n_layer, clean.shape[1]
    comps = [Component(f"transformer.h.{l}.hook_{hook}", None, p) for l in range(L) for p in range(T)]
    return patch(model, clean, corrupted, comps, answer, corrupted_answer, **kw).reshape(L, T)


def patch_attn_out_by_layer(model, clean, corrupted, answer=None, corrupted_answer=None, **kw) -> torch.Tensor:
    """(n_layer,) patch each block's attention output (``hook_attn_out``) at all positions."""
    comps = [Component(f"transformer.h.{l}.hook_attn_out") for l in range(model.config.n_layer)]
    return patch(model, clean, corrupted, comps, answer, corrupted_answer, **kw)


def patch_mlp_out_by_layer(model, clean, corrupted, answer=None, corrupted_answer=None, **kw) -> torch.Tensor:
    """(n_layer,) patch each block's MLP output (``hook_mlp_out``) at all positions."""
    if model.config.attn_only:
        raise ValueError("attention-only model: there is no MLP output to patch")
    comps = [Component(f"transformer.h.{l}.hook_mlp_out") for l in range(model.config.n_layer)]
    return patch(model, clean, corrupted, comps, answer, corrupted_answer, **kw)


def patch_heads(model, clean, corrupted, answer=None, corrupted_answer=None, **kw) -> torch.Tensor:
    """(n_layer, n_head) patch each head's output (``attn.hook_z``) at all positions."""
    L, H = _n_layer_head(model)
    comps = [Component(f"transformer.h.{l}.attn.hook_z", h) for l in range(L) for h in range(H)]
    return patch(model, clean, corrupted, comps, answer, corrupted_answer, **kw).reshape(L, H)


def patch_heads_by_position(model, clean, corrupted, answer=None, corrupted_answer=None, **kw) -> torch.Tensor:
    """(n_layer, n_head, T) patch each head's output at each position separately."""
    L, H = _n_layer_head(model)
    T = clean.shape[1]
    comps = [Component(f"transformer.h.{l}.attn.hook_z", h, p) for l in range(L) for h in range(H) for p in range(T)]
    return patch(model, clean, corrupted, comps, answer, corrupted_answer, **kw).reshape(L, H, T)


def patch_suite(model, clean, corrupted, answer=None, corrupted_answer=None, *, position: int | None = -1,
                with_run: bool = False, heads: Iterable[tuple[int, int]] | None = None, **kw):
    """Every per-layer and per-head variant from one setup forward and shared batches.

    ``{"resid": (n_layer,), "attn_out": (n_layer,), "mlp_out": (n_layer,) [MLP models],
    "heads": (n_layer, n_head)}``, equal to ``patch_residual_by_layer`` (at ``position``),
    ``patch_attn_out_by_layer``, ``patch_mlp_out_by_layer`` and ``patch_heads``; cheaper than
    calling them one by one (one clean+corrupted forward instead of four). ``heads``: the
    (layer, head) pairs to patch (default: every head); the others' entries are NaN. ``with_run``:
    ``(that dict, {part: slice of the components}, the PatchRun)``, for every row's values.

    Cost (B prompts, T - p positions from the first that differs, k_l heads in layer l): one
    setup forward, then per layer one stacked forward of (k_l + 3) B rows through blocks l.. :
    ~sum_l (k_l + 3) B (T - p) (n_layer - l) 24 n_embd^2 FLOPs. The heads are the term that grows
    with n_layer x n_head (80% of the rows at GPT-2 small; docs/scaling.md).
    """
    L, H = _n_layer_head(model)
    heads = [(l, h) for l in range(L) for h in range(H)] if heads is None else [(int(l), int(h)) for l, h in heads]
    for l, h in heads:
        if not (0 <= l < L and 0 <= h < H):
            raise IndexError(f"head ({l}, {h}) is not in a model of {L} layers x {H} heads")
    parts = {"resid": [Component(f"transformer.h.{l}.hook_resid_post", None, position) for l in range(L)],
             "attn_out": [Component(f"transformer.h.{l}.hook_attn_out") for l in range(L)]}
    if not model.config.attn_only:
        parts["mlp_out"] = [Component(f"transformer.h.{l}.hook_mlp_out") for l in range(L)]
    parts["heads"] = [Component(f"transformer.h.{l}.attn.hook_z", h) for l, h in heads]
    run = run_patching(model, clean, corrupted, [c for comps in parts.values() for c in comps],
                       answer, corrupted_answer, **kw)
    out, slices, start = {}, {}, 0
    for name, comps in parts.items():
        slices[name] = slice(start, start + len(comps))
        out[name] = run.effects[slices[name]]
        start += len(comps)
    grid = torch.full((L, H), float("nan"), dtype=run.effects.dtype, device=run.effects.device)
    if heads:
        grid[tuple(torch.tensor(heads).T)] = out["heads"]
    out["heads"] = grid
    return (out, slices, run) if with_run else out


def attribution_patch_heads(model, clean, corrupted, answer=None, corrupted_answer=None, *,
                            by_position: bool = False, per_prompt: bool = False):
    """(n_layer, n_head) [or (n_layer, n_head, T)] first-order estimate of ``patch_heads``.

    Attribution patching (Nanda 2023; Syed et al. 2023): the effect of replacing a head's
    corrupted output z by its clean output is approximated by
    ``(z_clean - z_corrupted) . d metric / d z`` taken at the corrupted run, so every head
    comes from one forward (clean and corrupted side by side) and one backward pass.
    Normalised like ``patch``. Exact when the metric is linear in z; it misjudges heads
    whose effect saturates (a softmax downstream that flips). ``per_prompt``: the
    un-normalised estimate of each row's change, (B, n_layer, n_head), with the clean and
    corrupted rows' logit differences (B,) each: a tuple of three, for standard errors.

    Cost: one forward and backward of 2B x T tokens. The metric reads the last position's
    logits only, so the unembedding runs there alone (not 2B x T x vocab logits and their
    gradient: 400 MB at GPT-2 small), unless a hook of yours is on the model: it is owed the
    whole forward, as ``model(tokens)``.
    """
    B = clean.shape[0]
    store: dict[str, torch.Tensor] = {}

    def keep(z, hook):  # the graph must reach z even when the parameters are frozen
        if not z.requires_grad:
            z = z.detach().requires_grad_()
        store[hook.name] = z
        return z

    def last_position(x, hook):  # (2B, T, C) -> (2B, 1, C): what the metric's logits are made of
        return x[:, -1:]

    hooks = [("attn.hook_z", keep)] + ([] if has_hooks(model) else [("transformer.hook_ln_final", last_position)])
    with torch.enable_grad(), HookManager(model).hooks(hooks):
        logits, _ = model(torch.cat([clean, corrupted]))
        if answer is None or corrupted_answer is None:
            a, c = _answers_from_logits(logits[:B, -1].detach(), logits[B:, -1].detach())
            answer = a if answer is None else answer
            corrupted_answer = c if corrupted_answer is None else corrupted_answer
        answer, corrupted_answer = _as_answer(answer, B, clean.device), _as_answer(corrupted_answer, B, clean.device)
        clean_rows, corr_rows = logit_diffs(logits, answer, corrupted_answer).detach()  # (B,) each
        clean_ld, corr_ld = logit_diff(logits, answer, corrupted_answer)  # the two halves' means
        names = sorted(store, key=layer_of)
        grads = torch.autograd.grad(corr_ld, [store[n] for n in names])  # no .grad left on parameters
    z = torch.stack([store[n].detach() for n in names])  # (L, 2B, T, nh, hs)
    g = torch.stack(grads)[:, B:]  # d corrupted metric / d z at the corrupted run
    est = ((z[:, :B] - z[:, B:]) * g).sum(-1)  # (L, B, T, nh)
    if per_prompt:  # the metric is a batch mean, so row b's own change is B times its share
        return (B * est.sum(2)).permute(1, 0, 2), clean_rows, corr_rows
    est = est.sum(1).permute(0, 2, 1) if by_position else est.sum((1, 2))  # (L, nh, T) or (L, nh)
    if undefined_reason(clean_rows, corr_rows)[1]:  # as patch: a gap within its noise normalises nothing
        return torch.full_like(est, float("nan"))
    return est / (clean_ld - corr_ld).item()


# ---------------------------------------------------------------------------------------
# The notebook's layer scan
# ---------------------------------------------------------------------------------------

@dataclass
class LayerPatchResult:
    """Result of patching one block: ``effect`` is normalised (clean = 1, corrupted = 0)."""

    name: str
    layer: int
    effect: float
    clean_logit_diff: float
    corrupted_logit_diff: float


def patch_layer_scan(model, clean_input: torch.Tensor, corrupted_input: torch.Tensor, answer=None,
                     corrupted_answer=None, *, position: int | None = -1, show_progress: bool = False,
                     batched: bool = True) -> dict[str, LayerPatchResult]:
    """Patch the output of every block (``transformer.h.{l}``) with its clean value.

    Returns ``{"transformer.h.0": LayerPatchResult, ...}`` in layer order; see
    ``patch_residual_by_layer`` for what is patched (the block's output at ``position``,
    default the last). Without answers, answer = the clean model's top prediction at the
    last position and corrupted_answer = the corrupted model's (see ``default_answers``).
    """
    L = model.config.n_layer
    comps = [Component(f"transformer.h.{l}.hook_resid_post", None, position) for l in range(L)]
    run = run_patching(model, clean_input, corrupted_input, comps, answer, corrupted_answer,
                       batched=batched, show_progress=show_progress)
    return {f"transformer.h.{l}": LayerPatchResult(f"transformer.h.{l}", l, float(e), run.clean_logit_diff,
                                                   run.corrupted_logit_diff)
            for l, e in enumerate(run.effects.tolist())}


def find_important_components(results, threshold: float = 0.3, top_k: int | None = 5) -> list[tuple[str, float]]:
    """``[(name, effect), ...]`` with |effect| >= threshold, largest |effect| first, at most top_k.

    ``results`` is ``patch_layer_scan``'s dict (values with ``.effect``), a dict of floats,
    or an effect tensor (n_layer,) / (n_layer, n_head), named ``L{l}`` / ``L{l}H{h}``.
    """
    if isinstance(results, torch.Tensor):
        if results.dim() == 1:
            items = {f"L{l}": v for l, v in enumerate(results.tolist())}
        elif results.dim() == 2:
            items = {f"L{l}H{h}": v for l, row in enumerate(results.tolist()) for h, v in enumerate(row)}
        else:
            raise ValueError("effect tensor must be (n_layer,) or (n_layer, n_head)")
    elif isinstance(results, Mapping):
        items = {k: float(getattr(v, "effect", v)) for k, v in results.items()}
    else:
        raise TypeError("results must be a dict or a tensor of effects")
    kept = [(k, v) for k, v in items.items() if v == v and abs(v) >= threshold]  # v == v drops NaN
    kept.sort(key=lambda kv: -abs(kv[1]))
    return kept[:top_k] if top_k is not None else kept
