"""The batched patching engine behind ``activation_patching`` (internal).

The residual stream is a sum, so patching a residual point, a block's attention or MLP
output, or one head's z is exactly "change the stream at one point, run the rest of the
model from there". Components are grouped by that point; each group is one forward of
the receiver's cached stream stacked once per component (slice i carries component i's
change), and the last block is computed for the last query only, since the metric reads
nothing else. Any other hook point (q, k, v, pattern, embeddings) is patched by a masked
hook on the stacked batch. ``batched=False`` is the plain reference: one full forward with
one hook per component.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from induction_dynamics.interpretability.utils import HookManager, layer_of, normalize_name


def logit_diff(logits: torch.Tensor, answer: torch.Tensor, corrupted_answer: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``logits[:, -1, answer] - logits[:, -1, corrupted_answer]``.

    logits (N, T, V) where N is a multiple of len(answer) (stacked copies of the batch);
    returns (N // B,) one value per copy.
    """
    B = answer.shape[0]
    last = logits[:, -1].reshape(-1, B, logits.shape[-1])  # (n, B, V)
    idx = torch.arange(B, device=logits.device)
    return (last[:, idx, answer] - last[:, idx, corrupted_answer]).mean(-1)


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


def validate_components(hm: HookManager, components: list[Component]) -> list[Component]:
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


def needed_hook_names(model, components: list[Component]) -> list[str]:
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
def patched_logit_diffs(model, hm: HookManager, donor: dict, recv: dict, recv_input: torch.Tensor,
                         components: list[Component], answer, corrupted_answer, batched: bool, max_rows: int,
                         show_progress: bool) -> torch.Tensor:
    """Raw logit difference of the receiver run with each component patched from the donor.

    ``donor``/``recv``: activations of the two runs by hook name (from one cached forward).
    """
    B = recv_input.shape[0]
    out = torch.empty(len(components), dtype=next(iter(recv.values())).dtype)  # the model's dtype
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
