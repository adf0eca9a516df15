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

Batching: every component of a call is patched in its own slice of one big batch (the
receiver input stacked n times), not one forward per component; components are grouped
by layer, and a group starts from the receiver's cached residual stream at its first
layer instead of recomputing earlier blocks. ``batched=False`` is the plain
one-forward-per-component path (kept to check the batched one against it).
Attribution patching (Nanda 2023) is the first-order shortcut: all heads from one forward
and one backward pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from induction_dynamics.interpretability.utils import HookManager, layer_of, normalize_name


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


def logit_diff(logits: torch.Tensor, answer: torch.Tensor, corrupted_answer: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``logits[:, -1, answer] - logits[:, -1, corrupted_answer]``.

    logits (N, T, V) where N is a multiple of len(answer) (stacked copies of the batch);
    returns (N // B,) one value per copy.
    """
    B = answer.shape[0]
    last = logits[:, -1].reshape(-1, B, logits.shape[-1])  # (n, B, V)
    idx = torch.arange(B, device=logits.device)
    return (last[:, idx, answer] - last[:, idx, corrupted_answer]).mean(-1)


@torch.no_grad()
def default_answers(model, clean: torch.Tensor, corrupted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """answer = the clean run's top prediction at the last position, corrupted_answer = the
    corrupted run's (its second choice where both agree, so the difference is never void)."""
    clean_last = model(clean)[0][:, -1]  # (B, V)
    corr_last = model(corrupted)[0][:, -1]
    answer = clean_last.argmax(-1)
    top2 = corr_last.topk(2, dim=-1).indices  # (B, 2)
    corrupted_answer = torch.where(top2[:, 0] == answer, top2[:, 1], top2[:, 0])
    return answer, corrupted_answer


# ---------------------------------------------------------------------------------------
# The generic routine
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Component:
    """One thing to patch: a hook point, optionally one head and/or one position.

    ``hook`` is a hook name (``transformer.h.1.attn.hook_z``; TransformerLens spellings
    accepted). ``head`` needs a hook with a head axis (q, k, v, z, pattern, scores).
    ``position`` is a (query) position, negative counts from the end; None = all.
    """

    hook: str
    head: int | None = None
    position: int | None = None


_HEAD_AXES = {"attn.hook_q": 2, "attn.hook_k": 2, "attn.hook_v": 2, "attn.hook_z": 2,
              "attn.hook_pattern": 1, "attn.hook_attn_scores": 1}


def _axes(hook: str) -> tuple[int, int | None]:
    """(position axis, head axis or None) of a hook point's activation (batch axis 0)."""
    for suffix, head_axis in _HEAD_AXES.items():
        if hook.endswith(suffix):
            return (1 if head_axis == 2 else 2), head_axis
    return 1, None


def _mask(components: list[Component], shape: torch.Size, device) -> torch.Tensor:
    """(n, 1, *shape[1:]) bool, True where slice k takes the donor activation of component k."""
    pos_axis, head_axis = _axes(components[0].hook)
    mask = torch.zeros(len(components), *shape[1:], dtype=torch.bool, device=device)
    for k, comp in enumerate(components):
        index = [k] + [slice(None)] * (len(shape) - 1)
        if comp.position is not None:
            index[pos_axis] = comp.position
        if comp.head is not None:
            index[head_axis] = comp.head
        mask[tuple(index)] = True
    return mask.unsqueeze(1)


def _forward_from(model, x: torch.Tensor, start: int) -> torch.Tensor:
    """Logits at the last position, (N, 1, V), running blocks ``start..`` on resid_pre ``x``.

    The tail of ``GPT.forward`` (hooks fire as usual); only the last position is unembedded
    because the metric reads nothing else.
    """
    for block in model.transformer.h[start:]:
        x = block(x)
    x = model.transformer.hook_ln_final(model.transformer.ln_f(x))
    return model.lm_head(x[:, -1:])


def _validate(model, components: list[Component]) -> list[Component]:
    points = HookManager(model).hook_points
    out = []
    for comp in components:
        name = normalize_name(comp.hook)
        if name not in points:
            raise KeyError(f"no hook point {comp.hook!r}; see HookManager(model).names()")
        if name.endswith("hook_pos_embed"):
            raise ValueError("hook_pos_embed is the same for every input; nothing to patch")
        if comp.head is not None and _axes(name)[1] is None:
            raise ValueError(f"{name} has no head axis; patch it without head=")
        out.append(Component(name, comp.head, comp.position))
    return out


@torch.no_grad()
def _patched_logit_diffs(model, donor: torch.Tensor, receiver: torch.Tensor, components: list[Component],
                         answer, corrupted_answer, batched: bool, max_rows: int, show_progress: bool) -> torch.Tensor:
    """Raw (unnormalised) logit difference of the receiver run with each component patched."""
    B = receiver.shape[0]
    names = sorted({c.hook for c in components})
    layers = [layer_of(c.hook) for c in components]
    starts = sorted({l for l in layers if l is not None})
    hm = HookManager(model)
    _, donor_cache = hm.run_with_cache(donor, names_filter=names)
    out = torch.empty(len(components))
    if not batched:
        iterator = range(len(components))
        for k in _progress(iterator, show_progress, "patching"):
            comp = components[k]
            pos_axis, head_axis = _axes(comp.hook)

            def patch_one(act, hook, comp=comp, pos_axis=pos_axis, head_axis=head_axis):
                act = act.clone()
                index = [slice(None)] * act.dim()
                if comp.position is not None:
                    index[pos_axis] = comp.position
                if comp.head is not None:
                    index[head_axis] = comp.head
                act[tuple(index)] = donor_cache[hook.name][tuple(index)]
                return act

            logits, _ = hm.run_with_hooks(receiver, fwd_hooks=[(comp.hook, patch_one)])
            out[k] = logit_diff(logits, answer, corrupted_answer)[0]
        return out

    # residual stream entering each block, so a group of layer-l components starts at block l
    _, recv_cache = hm.run_with_cache(receiver, names_filter=[f"transformer.h.{l}.hook_resid_pre" for l in starts])
    order = sorted(range(len(components)), key=lambda k: (-1 if layers[k] is None else layers[k]))
    per_chunk = max(1, max_rows // B)
    chunks = [order[i:i + per_chunk] for i in range(0, len(order), per_chunk)]
    for chunk in _progress(chunks, show_progress, "patching"):
        n = len(chunk)
        comps = [components[k] for k in chunk]
        hooks = []
        for name in sorted({c.hook for c in comps}):
            own = [c if c.hook == name else None for c in comps]  # slice k patches only its own

            def patch_many(act, hook, own=own, cache={}):
                if "mask" not in cache:
                    cols = [c or Component(hook.name, None, None) for c in own]
                    mask = _mask(cols, act.shape, act.device)
                    mask[[k for k, c in enumerate(own) if c is None]] = False
                    cache["mask"] = mask
                view = act.reshape(n, B, *act.shape[1:])
                return torch.where(cache["mask"], donor_cache[hook.name][None], view).reshape(act.shape)

            hooks.append((name, patch_many))
        first = [layers[k] for k in chunk]
        with hm.hooks(hooks):
            if any(l is None for l in first):  # embedding hooks: run the whole model
                logits = model(receiver.repeat(n, 1))[0]
            else:
                start = min(first)
                x = recv_cache[f"transformer.h.{start}.hook_resid_pre"]  # (B, T, C)
                logits = _forward_from(model, x.repeat(n, 1, 1), start)
        out[chunk] = logit_diff(logits, answer, corrupted_answer).cpu()
    return out


def _progress(iterable, show: bool, desc: str):
    if not show:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc)


@torch.no_grad()
def baseline_logit_diffs(model, clean, corrupted, answer, corrupted_answer) -> tuple[float, float]:
    """(clean, corrupted) logit differences of the unpatched runs."""
    clean_ld = logit_diff(model(clean)[0], answer, corrupted_answer)[0].item()
    corr_ld = logit_diff(model(corrupted)[0], answer, corrupted_answer)[0].item()
    return clean_ld, corr_ld


def patch(model, clean: torch.Tensor, corrupted: torch.Tensor, components: Iterable[Component],
          answer=None, corrupted_answer=None, *, donor: str = "clean", receiver: str = "corrupted",
          batched: bool = True, max_rows: int = 4096, show_progress: bool = False) -> torch.Tensor:
    """Normalised effect of patching each component, (len(components),).

    donor/receiver: which run the activations come from and which run receives them.
    The default (clean into corrupted, "denoising") asks what a component restores;
    ``donor="corrupted", receiver="clean"`` ("noising") asks what breaks the clean run.
    Effects are ``(patched - corrupted) / (clean - corrupted)`` in both cases (NaN when the
    clean and corrupted runs give the same logit difference). ``max_rows`` caps the rows
    of one batched forward (components x batch).
    """
    runs = {"clean": clean, "corrupted": corrupted}
    if donor not in runs or receiver not in runs:
        raise ValueError("donor and receiver must be 'clean' or 'corrupted'")
    if clean.shape != corrupted.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} differ in shape")
    components = _validate(model, list(components))
    if answer is None or corrupted_answer is None:
        a, c = default_answers(model, clean, corrupted)
        answer = a if answer is None else answer
        corrupted_answer = c if corrupted_answer is None else corrupted_answer
    B, device = clean.shape[0], clean.device
    answer, corrupted_answer = _as_answer(answer, B, device), _as_answer(corrupted_answer, B, device)
    clean_ld, corr_ld = baseline_logit_diffs(model, clean, corrupted, answer, corrupted_answer)
    raw = _patched_logit_diffs(model, runs[donor], runs[receiver], components, answer, corrupted_answer,
                               batched, max_rows, show_progress)
    denom = clean_ld - corr_ld
    if abs(denom) < 1e-12:
        return torch.full_like(raw, float("nan"))
    return (raw - corr_ld) / denom


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


def attribution_patch_heads(model, clean, corrupted, answer=None, corrupted_answer=None, *,
                            by_position: bool = False) -> torch.Tensor:
    """(n_layer, n_head) [or (n_layer, n_head, T)] first-order estimate of ``patch_heads``.

    Attribution patching (Nanda 2023; Syed et al. 2023): the effect of replacing a head's
    corrupted output z by its clean output is approximated by
    ``(z_clean - z_corrupted) . d metric / d z`` at the corrupted run, so all heads come
    from one clean forward (no grad), one corrupted forward and one backward. Normalised
    like ``patch``. Exact for heads whose effect is linear; it misjudges heads whose effect
    saturates (large softmax changes downstream).
    """
    if answer is None or corrupted_answer is None:
        a, c = default_answers(model, clean, corrupted)
        answer = a if answer is None else answer
        corrupted_answer = c if corrupted_answer is None else corrupted_answer
    B, device = clean.shape[0], clean.device
    answer, corrupted_answer = _as_answer(answer, B, device), _as_answer(corrupted_answer, B, device)
    hm = HookManager(model)
    with torch.no_grad():
        clean_logits, clean_cache = hm.run_with_cache(clean, names_filter="attn.hook_z")
    z_clean = clean_cache.stack("attn.hook_z")  # (L, B, T, nh, hs)
    with torch.enable_grad():
        corr_logits, corr_cache = hm.run_with_cache(corrupted, names_filter="attn.hook_z", detach=False)
        names = sorted(corr_cache, key=layer_of)
        metric = logit_diff(corr_logits[0] if isinstance(corr_logits, tuple) else corr_logits,
                            answer, corrupted_answer)[0]
        grads = torch.autograd.grad(metric, [corr_cache[n] for n in names])  # no .grad on params
    z_corr = torch.stack([corr_cache[n].detach() for n in names])
    est = ((z_clean - z_corr) * torch.stack(grads)).sum(-1)  # (L, B, T, nh)
    est = est.sum(1).permute(0, 2, 1) if by_position else est.sum((1, 2))  # (L, nh, T) or (L, nh)
    clean_ld = logit_diff(clean_logits[0], answer, corrupted_answer)[0]
    denom = (clean_ld - metric.detach()).item()
    if abs(denom) < 1e-12:
        return torch.full_like(est, float("nan"))
    return est.detach() / denom


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

    Returns ``{"transformer.h.0": LayerPatchResult, ...}``; see ``patch_residual_by_layer``
    for what is patched (the block's output at ``position``, default the last). Without
    answers, answer = the clean model's top prediction at the last position and
    corrupted_answer = the corrupted model's (see ``default_answers``).
    """
    if answer is None or corrupted_answer is None:
        a, c = default_answers(model, clean_input, corrupted_input)
        answer = a if answer is None else answer
        corrupted_answer = c if corrupted_answer is None else corrupted_answer
    B, device = clean_input.shape[0], clean_input.device
    answer, corrupted_answer = _as_answer(answer, B, device), _as_answer(corrupted_answer, B, device)
    effects = patch_residual_by_layer(model, clean_input, corrupted_input, answer, corrupted_answer,
                                      position=position, show_progress=show_progress, batched=batched)
    clean_ld, corr_ld = baseline_logit_diffs(model, clean_input, corrupted_input, answer, corrupted_answer)
    return {f"transformer.h.{l}": LayerPatchResult(f"transformer.h.{l}", l, float(e), clean_ld, corr_ld)
            for l, e in enumerate(effects.tolist())}


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
