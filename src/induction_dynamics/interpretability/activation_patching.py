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
import torch.nn.functional as F

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


def _validate(hm: HookManager, components: list[Component]) -> list[Component]:
    points = hm.hook_points
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


# The fast path. The residual stream is a sum, so patching a residual point, a block's
# attention/MLP output or a head's z is exactly "change the residual stream at one point
# and run the rest of the model from there". ``_entry`` says where that point is.
_STREAM = {"pre": "hook_resid_pre", "mid": "hook_resid_mid", "post": "hook_resid_post"}


def _entry(model, name: str) -> tuple[int, str, str] | None:
    """(layer, stage, kind): the residual point a patch of ``name`` changes; None = use hooks.

    stage "pre"/"mid"/"post" = before the block / after its attention / after the block;
    kind "replace" (the hook *is* that residual point) or "add" (a term added to it).
    """
    layer = layer_of(name)
    if layer is None:
        return None
    short = name.split(f"h.{layer}.", 1)[1]
    after_attn = "post" if model.config.attn_only else "mid"
    for stage, hook in _STREAM.items():
        if short == hook:
            return layer, stage, "replace"
    if short in ("hook_attn_out", "attn.hook_z"):
        return layer, after_attn, "add"
    if short == "hook_mlp_out":
        return layer, "post", "add"
    return None


def _stream_name(layer: int, stage: str) -> str:
    return f"transformer.h.{layer}.{_STREAM[stage]}"


def _last_query_block(block, x: torch.Tensor) -> torch.Tensor:
    """Block.forward for the last query position only: (N, T, C) -> (N, 1, C).

    The metric reads only the last position, and after the last attention layer nothing
    else is needed: keys and values come from every position, the rest from the last.
    """
    attn = block.attn
    N, T, C = x.shape
    nh, hs = attn.n_head, C // attn.n_head
    h = block.ln_1(x)
    w, b = attn.c_attn.weight, attn.c_attn.bias
    q = F.linear(h[:, -1:], w[:C], None if b is None else b[:C]).view(N, 1, nh, hs).transpose(1, 2)
    kv = F.linear(h, w[C:], None if b is None else b[C:])  # (N, T, 2C)
    k, v = (t.view(N, T, nh, hs).transpose(1, 2) for t in kv.split(C, dim=2))  # (N, nh, T, hs)
    y = F.scaled_dot_product_attention(q, k, v)  # the last query sees every key: no mask
    x = x[:, -1:] + attn.c_proj(y.transpose(1, 2).reshape(N, 1, C))
    if not block.attn_only:
        x = x + block.mlp(block.ln_2(x))
    return x


def _run_tail(model, x: torch.Tensor, layer: int, stage: str, shortcut: bool = True) -> torch.Tensor:
    """Last-position logits (N, 1, V) from the residual stream ``x`` (N, T, C) at (layer, stage).

    The tail of ``GPT.forward``, skipping what the last position's logits cannot depend on
    (``shortcut=False`` runs the last block whole, so hooks inside it fire).
    """
    blocks = model.transformer.h
    last = len(blocks) - 1
    if stage == "mid":  # finish block `layer`: its MLP is per-position
        block = blocks[layer]
        if layer == last:
            x = x[:, -1:]
        x = x + block.mlp(block.ln_2(x))
    if stage in ("mid", "post"):
        layer += 1
    for i in range(layer, last + 1):
        x = _last_query_block(blocks[i], x) if i == last and shortcut else blocks[i](x)
    return model.lm_head(model.transformer.ln_f(x[:, -1:]))


def _head_out(model, layer: int, dz: torch.Tensor) -> torch.Tensor:
    """(B, T, nh, C): what each head's z difference dz (B, T, nh, hs) adds to the residual."""
    attn = model.transformer.h[layer].attn
    C, nh = attn.n_embd, attn.n_head
    w_o = attn.c_proj.weight.T.reshape(nh, C // nh, C)  # (nh, hs, C); the bias cancels in a difference
    return torch.einsum("bthd,hdc->bthc", dz, w_o)


def _needed_names(model, components: list[Component]) -> list[str]:
    names = set()
    for c in components:
        entry = _entry(model, c.hook)
        names.add(c.hook)
        if entry is not None:
            names.add(_stream_name(entry[0], entry[1]))
        elif layer_of(c.hook) is not None:
            names.add(_stream_name(layer_of(c.hook), "pre"))
    return sorted(names)


@torch.no_grad()
def _patched_logit_diffs(model, hm: HookManager, donor: dict, recv: dict, recv_input: torch.Tensor,
                         components: list[Component], answer, corrupted_answer, batched: bool, max_rows: int,
                         show_progress: bool) -> torch.Tensor:
    """Raw logit difference of the receiver run with each component patched from the donor.

    ``donor``/``recv``: activations of the two runs by hook name (from one cached forward).
    """
    B = recv_input.shape[0]
    out = torch.empty(len(components))
    if not batched:  # the plain reference: a full forward per component, one hook
        for k in _progress(range(len(components)), show_progress, "patching"):
            comp = components[k]
            pos_axis, head_axis = _axes(comp.hook)
            index = [slice(None)] * donor[comp.hook].dim()
            if comp.position is not None:
                index[pos_axis] = comp.position
            if comp.head is not None:
                index[head_axis] = comp.head
            index = tuple(index)

            def patch_one(act, hook, index=index):
                act = act.clone()
                act[index] = donor[hook.name][index]
                return act

            logits, _ = hm.run_with_hooks(recv_input, fwd_hooks=[(comp.hook, patch_one)])
            out[k] = logit_diff(logits, answer, corrupted_answer)[0]
        return out

    groups: dict[tuple, list[int]] = {}
    for k, comp in enumerate(components):
        entry = _entry(model, comp.hook)
        key = ("stream",) + entry[:2] if entry else ("hooks", layer_of(comp.hook))
        groups.setdefault(key, []).append(k)
    per_chunk = max(1, max_rows // B)
    chunks = [(key, ks[i:i + per_chunk]) for key, ks in groups.items() for i in range(0, len(ks), per_chunk)]
    head_deltas: dict[int, torch.Tensor] = {}
    for key, chunk in _progress(chunks, show_progress, "patching"):
        comps = [components[k] for k in chunk]
        if key[0] == "stream":
            _, layer, stage = key
            x = recv[_stream_name(layer, stage)].repeat(len(chunk), 1, 1).view(len(chunk), B, *recv_input.shape[1:], -1)
            for i, comp in enumerate(comps):
                pos = slice(None) if comp.position is None else comp.position
                if _entry(model, comp.hook)[2] == "replace":
                    x[i, :, pos] = donor[comp.hook][:, pos]
                elif comp.hook.endswith("attn.hook_z"):
                    if layer not in head_deltas:
                        head_deltas[layer] = _head_out(model, layer, donor[comp.hook] - recv[comp.hook])
                    d = head_deltas[layer]  # (B, T, nh, C)
                    x[i, :, pos] += d[:, pos, comp.head] if comp.head is not None else d[:, pos].sum(-2)
                else:
                    x[i, :, pos] += (donor[comp.hook] - recv[comp.hook])[:, pos]
            logits = _run_tail(model, x.flatten(0, 1), layer, stage)
        else:  # any other hook point: stack the receiver, patch slice i in a hook, run on
            logits = _run_with_masked_hooks(model, hm, donor, recv, recv_input, comps, key[1])
        out[chunk] = logit_diff(logits, answer, corrupted_answer).cpu()
    return out


def _run_with_masked_hooks(model, hm, donor, recv, recv_input, comps: list[Component], layer) -> torch.Tensor:
    n, B = len(comps), recv_input.shape[0]
    hooks = []
    for name in sorted({c.hook for c in comps}):
        own = [c if c.hook == name else None for c in comps]  # slice i patches only its own

        def patch_many(act, hook, own=own):
            mask = _mask([c or Component(hook.name) for c in own], act.shape, act.device)
            mask[[i for i, c in enumerate(own) if c is None]] = False
            view = act.reshape(n, B, *act.shape[1:])
            return torch.where(mask, donor[hook.name][None], view).reshape(act.shape)

        hooks.append((name, patch_many))
    with hm.hooks(hooks):
        if layer is None:  # embedding hooks: the whole model
            return model(recv_input.repeat(n, 1))[0]
        x = recv[_stream_name(layer, "pre")]
        return _run_tail(model, x.repeat(n, 1, 1), layer, "pre", shortcut=False)


def _progress(iterable, show: bool, desc: str):
    if not show:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc)


@dataclass
class PatchRun:
    """Effects plus the baselines they were normalised with."""

    effects: torch.Tensor
    clean_logit_diff: float
    corrupted_logit_diff: float
    answer: torch.Tensor
    corrupted_answer: torch.Tensor


@torch.no_grad()
def run_patching(model, clean: torch.Tensor, corrupted: torch.Tensor, components: Iterable[Component],
                 answer=None, corrupted_answer=None, *, donor: str = "clean", receiver: str = "corrupted",
                 batched: bool = True, max_rows: int = 2048, show_progress: bool = False) -> PatchRun:
    """``patch`` with its baselines and answers (see there)."""
    runs = ("clean", "corrupted")
    if donor not in runs or receiver not in runs:
        raise ValueError("donor and receiver must be 'clean' or 'corrupted'")
    if clean.shape != corrupted.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} differ in shape")
    hm = HookManager(model)
    components = _validate(hm, list(components))
    B = clean.shape[0]
    # one forward for both runs: baselines, default answers, and every activation needed
    (logits, _), cache = hm.run_with_cache(torch.cat([clean, corrupted]),
                                                           names_filter=_needed_names(model, components))
    halves = {"clean": {k: v[:B] for k, v in cache.items()}, "corrupted": {k: v[B:] for k, v in cache.items()}}
    if answer is None or corrupted_answer is None:
        a, c = _answers_from_logits(logits[:B, -1], logits[B:, -1])
        answer = a if answer is None else answer
        corrupted_answer = c if corrupted_answer is None else corrupted_answer
    answer, corrupted_answer = _as_answer(answer, B, clean.device), _as_answer(corrupted_answer, B, clean.device)
    clean_ld, corr_ld = logit_diff(logits, answer, corrupted_answer).tolist()
    recv_input = clean if receiver == "clean" else corrupted
    raw = _patched_logit_diffs(model, hm, halves[donor], halves[receiver], recv_input, components, answer,
                               corrupted_answer, batched, max_rows, show_progress)
    denom = clean_ld - corr_ld
    effects = torch.full_like(raw, float("nan")) if abs(denom) < 1e-12 else (raw - corr_ld) / denom
    return PatchRun(effects, clean_ld, corr_ld, answer, corrupted_answer)


def patch(model, clean: torch.Tensor, corrupted: torch.Tensor, components: Iterable[Component],
          answer=None, corrupted_answer=None, **kw) -> torch.Tensor:
    """Normalised effect of patching each component, (len(components),). The generic routine.

    donor/receiver (keywords): which run the activations come from and which receives them.
    The default (clean into corrupted, "denoising") asks what a component restores;
    ``donor="corrupted", receiver="clean"`` ("noising") asks what breaks the clean run.
    Effects are ``(patched - corrupted) / (clean - corrupted)`` either way (NaN when the
    clean and corrupted runs give the same logit difference). Without answers:
    answer = the clean run's top prediction at the last position, corrupted_answer = the
    corrupted run's (its second choice where both agree). ``batched=False``: one full
    forward per component (the reference); ``max_rows`` caps rows per batched forward.
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


def attribution_patch_heads(model, clean, corrupted, answer=None, corrupted_answer=None, *,
                            by_position: bool = False) -> torch.Tensor:
    """(n_layer, n_head) [or (n_layer, n_head, T)] first-order estimate of ``patch_heads``.

    Attribution patching (Nanda 2023; Syed et al. 2023): the effect of replacing a head's
    corrupted output z by its clean output is approximated by
    ``(z_clean - z_corrupted) . d metric / d z`` taken at the corrupted run, so every head
    comes from one forward (clean and corrupted side by side) and one backward pass.
    Normalised like ``patch``. Exact when the metric is linear in z; it misjudges heads
    whose effect saturates (a softmax downstream that flips).
    """
    B = clean.shape[0]
    with torch.enable_grad():
        (logits, _), cache = HookManager(model).run_with_cache(torch.cat([clean, corrupted]),
                                                               names_filter="attn.hook_z", detach=False)
        if answer is None or corrupted_answer is None:
            a, c = _answers_from_logits(logits[:B, -1].detach(), logits[B:, -1].detach())
            answer = a if answer is None else answer
            corrupted_answer = c if corrupted_answer is None else corrupted_answer
        answer, corrupted_answer = _as_answer(answer, B, clean.device), _as_answer(corrupted_answer, B, clean.device)
        clean_ld, corr_ld = logit_diff(logits, answer, corrupted_answer)  # the two halves
        names = sorted(cache, key=layer_of)
        grads = torch.autograd.grad(corr_ld, [cache[n] for n in names])  # no .grad left on parameters
    z = torch.stack([cache[n].detach() for n in names])  # (L, 2B, T, nh, hs)
    g = torch.stack(grads)[:, B:]  # d corrupted metric / d z at the corrupted run
    est = ((z[:, :B] - z[:, B:]) * g).sum(-1)  # (L, B, T, nh)
    est = est.sum(1).permute(0, 2, 1) if by_position else est.sum((1, 2))  # (L, nh, T) or (L, nh)
    denom = (clean_ld - corr_ld).item()
    if abs(denom) < 1e-12:
        return torch.full_like(est, float("nan"))
    return est / denom


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
