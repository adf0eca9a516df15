"""The forwards behind ``activation_patching``: every patch is a hook on the model's own hook points.

One setup forward runs clean and corrupted side by side (``HookManager.run_with_cache``:
baselines, default answers, every activation a patch reads). Then, for each layer, the
receiver run is stacked once per component and ``GPT.forward_from`` runs it from the
residual stream entering that layer, with a hook on each patched hook point that gives
slice i the donor's activation where component i says (its head, its position, or all).
Two shortcuts keep that cheap, both inside the model's own forward:

- the model is causal, so before ``p``, the first position where clean and corrupted
  differ in any row, every activation is the same in both runs: the patched runs compute
  positions p..T-1 only, attending to the prefix's keys and values from the setup
  (``past_kv``), and patching anything at a position < p changes nothing;
- the metric reads the last position's logits only (``last_only``): the last block runs
  its query and what follows for the last position alone, and patching there at any
  other position changes nothing either.

Hooks of your own on the model (``with hm.hooks(...)``, or any forward hook on one of its
modules) fire in every forward here. A hook may index positions, so while one is
registered the shortcuts are off and every forward covers all T positions, as
``model(tokens)`` does; the batch axis holds stacked copies of the B examples either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from induction_dynamics.interpretability.utils import (
    HookManager,
    layer_of,
    normalize_name,
)


def logit_diffs(logits: torch.Tensor, answer: torch.Tensor, corrupted_answer: torch.Tensor) -> torch.Tensor:
    """``logits[:, -1, answer] - logits[:, -1, corrupted_answer]`` of every row, (N // B, B).

    logits (N, T, V) where N is a multiple of B = len(answer) (stacked copies of the batch).
    """
    B = answer.shape[0]
    last = logits[:, -1].reshape(-1, B, logits.shape[-1])  # (n, B, V)
    idx = torch.arange(B, device=logits.device)
    return last[:, idx, answer] - last[:, idx, corrupted_answer]


def logit_diff(logits: torch.Tensor, answer: torch.Tensor, corrupted_answer: torch.Tensor) -> torch.Tensor:
    """The patching metric: the mean over the batch of ``logit_diffs``, (N // B,) one value per copy."""
    return logit_diffs(logits, answer, corrupted_answer).mean(-1)


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


def validate_components(hm: HookManager, components: list[Component], T: int) -> list[Component]:
    """Components with module names; a clear error for what cannot be patched."""
    out = []
    for comp in components:
        name = normalize_name(comp.hook)
        if name not in hm.hook_points:
            raise KeyError(f"no hook point {comp.hook!r}; see HookManager(model).names()")
        if name.endswith("hook_pos_embed"):
            raise ValueError("hook_pos_embed is the same for every input; nothing to patch")
        if comp.head is not None and _axes(name)[1] is None:
            raise ValueError(f"{name} has no head axis; patch it without head=")
        if comp.position is not None and not -T <= comp.position < T:
            raise IndexError(f"position {comp.position} out of range for sequence length {T}")
        out.append(Component(name, comp.head, comp.position))
    return out


_AFTER_HEADS = ("attn.hook_z", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")


def _start(model, name: str, shortcuts: bool) -> tuple[int | None, bool]:
    """(block, from z): where a patched run of ``name`` starts. Block None: from the tokens
    (``hook_embed``); n_layer: only the unembedding (``hook_ln_final``). From z (a shortcut):
    the block's heads' outputs are the receiver's, so its attention starts at hook_z."""
    if name.endswith("hook_embed"):
        return None, False
    layer = layer_of(name)
    if layer is None:
        return model.config.n_layer, False
    return layer, shortcuts and name.endswith(_AFTER_HEADS)


def _stream_into(model, layer: int) -> str:
    """The hook point holding the residual stream that enters block ``layer`` (n_layer: ln_f)."""
    L = model.config.n_layer
    return f"transformer.h.{layer}.hook_resid_pre" if layer < L else f"transformer.h.{L - 1}.hook_resid_post"


def first_difference(clean: torch.Tensor, corrupted: torch.Tensor) -> int:
    """p: the first position where any row differs, at most T - 1 (a patched run keeps the last)."""
    differs = (clean != corrupted).any(0).nonzero()
    return min(int(differs[0]), clean.shape[1] - 1) if len(differs) else clean.shape[1] - 1


@dataclass
class Setup:
    """The clean+corrupted forward: rows 0..B-1 clean, B..2B-1 corrupted."""

    last_logits: torch.Tensor  # (2B, V)
    cache: dict                # activations (2B, ...) by hook name, at the positions the patched runs compute
    p: int                     # patched runs compute positions p..T-1 (0: all)
    past_kv: list | None       # per layer, the prefix's (k, v), each (B, p, nh, hs); None when p = 0
    last_only: bool            # patched runs compute the last block for the last query only


@torch.no_grad()
def setup_forward(model, hm: HookManager, clean: torch.Tensor, corrupted: torch.Tensor,
                  components: list[Component], shortcuts: bool) -> Setup:
    """Both runs side by side, caching each component's hook point and the streams its run starts from.

    With ``shortcuts``: the shared prefix first (its keys and values), then both runs from
    p on, the last block for the last query only, as the patched runs will compute them."""
    starts = {_start(model, c.hook, shortcuts) for c in components}
    names = {c.hook for c in components} | {_stream_into(model, l) for l, _ in starts if l is not None}
    names |= {f"transformer.h.{l}.attn.hook_z" for l, from_z in starts if from_z}
    p = first_difference(clean, corrupted) if shortcuts else 0
    past_kv = None
    if p:  # the same in both runs before p
        _, pre = hm.run_with_cache(clean[:, :p], names_filter=["attn.hook_k", "attn.hook_v"], stop_early=True)
        past_kv = [(pre[f"transformer.h.{l}.attn.hook_k"], pre[f"transformer.h.{l}.attn.hook_v"])
                   for l in range(model.config.n_layer)]
    (logits, _), cache = hm.run_with_cache(torch.cat([clean, corrupted])[:, p:], names_filter=sorted(names),
                                           past_kv=past_kv, last_only=shortcuts)
    return Setup(logits[:, -1], dict(cache), p, past_kv, shortcuts)


def _positions_seen(model, name: str, T: int, s: Setup) -> range:
    """The positions a patched run computes at hook point ``name`` (see ``GPT.forward_from``)."""
    last = model.config.n_layer - 1
    kv_side = name.endswith(("hook_resid_pre", "attn.hook_k", "attn.hook_v"))  # every position, in the last block too
    if s.last_only and (name.endswith("hook_ln_final") or (layer_of(name) == last and not kv_side)):
        return range(T - 1, T)
    return range(s.p, T)


def _patch_hook(slices: list[Component | None], donor: torch.Tensor, B: int, T: int):
    """A hook giving stacked slice i (of len(slices) copies of B rows) the donor's activation
    where slices[i] says (None: its own). The activation covers the last n of T positions."""

    def patch(act, hook):
        pos_axis, head_axis = _axes(hook.name)
        n_pos = act.shape[pos_axis]
        mask = torch.zeros(len(slices), *act.shape[1:], dtype=torch.bool, device=act.device)
        for i, c in enumerate(slices):
            if c is None:
                continue
            index = [i] + [slice(None)] * (act.dim() - 1)
            if c.position is not None:
                index[pos_axis] = c.position % T - (T - n_pos)
            if c.head is not None:
                index[head_axis] = c.head
            mask[tuple(index)] = True
        d = donor.narrow(pos_axis, donor.shape[pos_axis] - n_pos, n_pos)  # (B, ...) at the positions computed
        view = act.view(len(slices), B, *act.shape[1:])
        return torch.where(mask[:, None], d[None], view).view(act.shape)

    return patch


@torch.no_grad()
def patched_logit_diffs(model, hm: HookManager, s: Setup, donor: slice, receiver: slice, recv_input: torch.Tensor,
                        components: list[Component], answer, corrupted_answer, max_rows: int,
                        show_progress: bool) -> torch.Tensor:
    """Raw logit difference of every row of the receiver run with each component patched from the
    donor, (n_components, B): stacked, max_rows // B components per forward (see the module docstring)."""
    B, T = recv_input.shape
    recv_ld = logit_diffs(s.last_logits[receiver, None], answer, corrupted_answer)  # (1, B)
    out = recv_ld.cpu().repeat(len(components), 1)  # what changes nothing keeps the receiver's value
    by_start: dict[tuple, list[int]] = {}
    for k, c in enumerate(components):
        seen = _positions_seen(model, c.hook, T, s)
        if c.position is None or c.position % T in seen:
            by_start.setdefault(_start(model, c.hook, s.last_only), []).append(k)
    per_chunk = max(1, max_rows // B)
    order = sorted(by_start, key=lambda st: (-1 if st[0] is None else st[0], st[1]))
    chunks = [(st, by_start[st][i:i + per_chunk]) for st in order for i in range(0, len(by_start[st]), per_chunk)]
    for (start, from_z), ks in _progress(chunks, show_progress, "patching"):
        n = len(ks)
        hooks = [(name, _patch_hook([components[k] if components[k].hook == name else None for k in ks],
                                    s.cache[name][donor], B, T))
                 for name in sorted({components[k].hook for k in ks})]
        with hm.hooks(hooks):
            if start is None:
                logits, _ = model(recv_input[:, s.p:].repeat(n, 1), past_kv=s.past_kv, last_only=s.last_only)
            else:
                x = s.cache[_stream_into(model, start)][receiver]  # (B, T - p, C)
                z = s.cache[f"transformer.h.{start}.attn.hook_z"][receiver].repeat(n, 1, 1, 1) if from_z else None
                logits = model.forward_from(start, x.repeat(n, 1, 1), s.past_kv, s.last_only, z)
        out[ks] = logit_diffs(logits, answer, corrupted_answer).cpu()
    return out


@torch.no_grad()
def one_at_a_time(model, hm: HookManager, s: Setup, donor: slice, recv_input: torch.Tensor,
                  components: list[Component], answer, corrupted_answer, show_progress: bool) -> torch.Tensor:
    """The plain reference: one full forward per component, its one patch hook; (n_components, B)."""
    out = torch.empty(len(components), recv_input.shape[0], dtype=s.last_logits.dtype)
    T = recv_input.shape[1]
    for k in _progress(range(len(components)), show_progress, "patching"):
        c = components[k]
        hook = _patch_hook([c], s.cache[c.hook][donor], recv_input.shape[0], T)
        logits, _ = hm.run_with_hooks(recv_input, fwd_hooks=[(c.hook, hook)])
        out[k] = logit_diffs(logits, answer, corrupted_answer)[0]
    return out


def _progress(iterable, show: bool, desc: str):
    if not show:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc)
