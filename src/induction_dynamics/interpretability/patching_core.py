"""The batched patching engine behind ``activation_patching`` (internal).

The residual stream is a sum, so patching a residual point, a block's attention or MLP
output, or one head's z is exactly "change the stream at one point, run the rest of the
model from there". For these components the setup is ``prefixed_forward``, a forward of
its own (no hooks) that exploits two facts:

- the model is causal, so at every position before ``p``, the first position where clean
  and corrupted differ in any row, every activation is the same in both runs: that prefix
  is computed once, and both runs (and every patched run) only on positions >= p, their
  queries attending to the prefix's keys and values (computed once per layer) and their
  own. Patching anything at a position < p changes nothing;
- the metric reads only the last position's logits, so the last block is computed for
  the last query only (keys and values of every position), and patching a last-block
  component at any other position changes nothing either.

Components are grouped by the stream point they change; each group is one forward of the
receiver's suffix stream stacked once per component (slice i carries component i's change)
from there on. Any other hook point (q, k, v, pattern, embeddings) is patched by a masked
hook on the stacked batch, from the hooked setup forward (``HookManager.run_with_cache``).
``batched=False`` is the plain reference: that hooked setup and one full forward with one
hook per component.
"""

from __future__ import annotations

import math
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
    """(nh, B, T, C): what each head's z difference dz (B, T, nh, hs) adds to the residual."""
    attn = model.transformer.h[layer].attn
    B, T, nh, hs = dz.shape
    w_o = attn.c_proj.weight.T.reshape(nh, hs, attn.n_embd)  # the bias cancels in a difference
    return torch.bmm(dz.permute(2, 0, 1, 3).reshape(nh, B * T, hs), w_o).view(nh, B, T, -1)


def is_fast(model, comp: Component) -> bool:
    """Whether ``comp`` is patched from ``prefixed_forward`` (else: masked hooks)."""
    return _entry(model, comp.hook) is not None and not (model.training and model.config.dropout > 0)


def needed_hook_names(model, components: list[Component]) -> list[str]:
    """What the hooked setup forward caches: each component's hook, and for a hook-path
    component in a block the stream entering that block (its masked run starts there)."""
    names = set()
    for c in components:
        names.add(c.hook)
        if not is_fast(model, c) and layer_of(c.hook) is not None:
            names.add(_stream_name(layer_of(c.hook), "pre"))
    return sorted(names)


# ---------------------------------------------------------------------------------------
# The fast path: a forward that computes the shared prefix once
# ---------------------------------------------------------------------------------------

@dataclass
class Prefixed:
    """``prefixed_forward``'s result. Rows: the clean run's B, then the corrupted run's B.

    ``acts[(layer, name)]``, name in pre/mid/post (residual streams), z, attn_out,
    mlp_out: (2B, S, ...) at positions p..T-1 (S = T - p), except the last block after its
    attention: (2B, 1, ...), the last position only. ``kv[layer]``: the prefix's keys and
    values (B, n_head, p, head_size), the same in both runs (None when p = 0).
    """

    p: int
    T: int
    kv: list
    acts: dict
    logits: torch.Tensor  # (2B, V) at the last position
    mask: torch.Tensor | None  # (S, T) additive causal mask of the suffix queries


def _ln(ln, x):
    return F.layer_norm(x, ln.weight.shape, ln.weight, ln.bias, 1e-5)


def _mlp(block, x):
    mlp = block.mlp
    h = F.gelu(F.linear(_ln(block.ln_2, x), mlp.c_fc.weight, mlp.c_fc.bias), approximate=mlp.gelu.approximate)
    return F.linear(h, mlp.c_proj.weight, mlp.c_proj.bias)


def _attend(q, k, v, mask):
    """softmax(q k^T / sqrt(hs) + mask) v for (N, nh, Tq, hs) queries and (N, nh, Tk, hs) keys."""
    N, nh, Tq, hs = q.shape
    q, k, v = q.reshape(N * nh, Tq, hs), k.reshape(N * nh, -1, hs), v.reshape(N * nh, -1, hs)
    scale = 1.0 / math.sqrt(hs)
    if mask is None:
        att = torch.bmm(q, k.transpose(1, 2)).mul_(scale)
    else:
        att = torch.baddbmm(mask, q, k.transpose(1, 2), alpha=scale)
    return torch.bmm(att.softmax(-1), v).view(N, nh, Tq, hs)


def _suffix_block(block, x, kv, mask, n: int, last_only: bool, keep: dict | None = None, layer: int = 0):
    """Block.forward on the suffix rows x (n*B, S, C), whose queries also see the shared
    prefix's keys and values ``kv`` ((B, nh, p, hs) each, or None). ``last_only``: the last
    query only, (n*B, 1, C) out. ``keep``: where to record the activations (setup)."""
    attn = block.attn
    N, S, C = x.shape
    nh, hs = attn.n_head, C // attn.n_head
    h = _ln(block.ln_1, x)
    w, b = attn.c_attn.weight, attn.c_attn.bias
    if last_only:
        q = F.linear(h[:, -1:], w[:C], None if b is None else b[:C])
        k, v = F.linear(h, w[C:], None if b is None else b[C:]).split(C, dim=2)
    else:
        q, k, v = F.linear(h, w, b).split(C, dim=2)
    q = q.reshape(N, -1, nh, hs).transpose(1, 2)
    k, v = (t.reshape(N, S, nh, hs).transpose(1, 2) for t in (k, v))  # (N, nh, S, hs)
    if kv is not None:
        k, v = (torch.cat([pre.repeat(n, 1, 1, 1), t], dim=2) for pre, t in zip(kv, (k, v)))
    z = _attend(q, k, v, None if last_only else mask).transpose(1, 2)  # (N, Tq, nh, hs)
    a = F.linear(z.reshape(N, -1, C), attn.c_proj.weight, attn.c_proj.bias)
    x = (x[:, -1:] if last_only else x) + a
    if keep is not None:
        keep[(layer, "z")], keep[(layer, "attn_out")] = z, a
    if not block.attn_only:
        if keep is not None:
            keep[(layer, "mid")] = x
        m = _mlp(block, x)
        x = x + m
        if keep is not None:
            keep[(layer, "mlp_out")] = m
    if keep is not None:
        keep[(layer, "post")] = x
    return x


def _unembed(model, x):
    return F.linear(_ln(model.transformer.ln_f, x), model.lm_head.weight, model.lm_head.bias)


@torch.no_grad()
def prefixed_forward(model, clean: torch.Tensor, corrupted: torch.Tensor) -> Prefixed:
    """Both runs' activations and last-position logits, the shared prefix computed once."""
    B, T = clean.shape
    assert T <= model.config.block_size, f"sequence length {T} > block size {model.config.block_size}"
    differs = (clean != corrupted).any(0).nonzero()
    p = min(int(differs[0]), T - 1) if len(differs) else T - 1  # the suffix holds the last position
    S = T - p
    tr, blocks = model.transformer, model.transformer.h
    last = len(blocks) - 1
    wte, wpe = tr.wte.weight, tr.wpe.weight[:T]
    x = F.embedding(torch.cat([clean[:, p:], corrupted[:, p:]]), wte) + wpe[p:]  # (2B, S, C)
    prefix = F.embedding(clean[:, :p], wte) + wpe[:p] if p else None  # (B, p, C)
    C = x.shape[-1]
    mask = torch.zeros(S, T, dtype=x.dtype, device=x.device).masked_fill_(
        torch.ones(S, T, dtype=torch.bool, device=x.device).triu_(p + 1), float("-inf"))  # query p+j sees keys <= p+j
    acts, kvs = {}, []
    for i, block in enumerate(blocks):
        kv = None
        if p:
            attn = block.attn
            nh, hs = attn.n_head, C // attn.n_head
            w, b = attn.c_attn.weight, attn.c_attn.bias
            h = _ln(block.ln_1, prefix)
            if i == last:  # nothing reads the prefix after the last block: keys and values only
                k, v = F.linear(h, w[C:], None if b is None else b[C:]).split(C, dim=2)
            else:
                q, k, v = F.linear(h, w, b).split(C, dim=2)
            kv = tuple(t.reshape(B, p, nh, hs).transpose(1, 2) for t in (k, v))
            if i < last:
                qp = q.reshape(B, p, nh, hs).transpose(1, 2)
                z = F.scaled_dot_product_attention(qp, *kv, is_causal=True).transpose(1, 2)
                prefix = prefix + F.linear(z.reshape(B, p, C), attn.c_proj.weight, attn.c_proj.bias)
                if not block.attn_only:
                    prefix = prefix + _mlp(block, prefix)
        kvs.append(kv)
        acts[(i, "pre")] = x
        x = _suffix_block(block, x, kv, mask, 2, i == last, keep=acts, layer=i)
    return Prefixed(p, T, kvs, acts, _unembed(model, x[:, -1]), mask)


def _run_tail_prefixed(model, pf: Prefixed, x: torch.Tensor, layer: int, stage: str, n: int) -> torch.Tensor:
    """Last-position logits (N, V) from suffix streams x (N = n*B, S or 1, C) at (layer, stage)."""
    blocks = model.transformer.h
    last = len(blocks) - 1
    if stage == "mid":
        x = x + _mlp(blocks[layer], x)
    if stage != "pre":
        layer += 1
    for i in range(layer, last + 1):
        x = _suffix_block(blocks[i], x, pf.kv[i], pf.mask, n, i == last)
    return _unembed(model, x[:, -1])


def _patched_streams(model, pf: Prefixed, layer: int, stage: str, comps: list[Component], local: list[int],
                     d_rows: slice, r_rows: slice) -> torch.Tensor:
    """(n*B, S_l, C): the receiver's suffix stream at (layer, stage), slice i changed by comps[i]
    at its local (suffix) position (-1 = all)."""
    acts = pf.acts
    stream = acts[(layer, stage)]
    recv = stream[r_rows]  # (B, S_l, C)
    B, S_l, C = recv.shape
    n, dev = len(comps), recv.device

    def diff(name):
        a = acts[(layer, name)]
        return a[d_rows] - a[r_rows]

    # what slice i adds: row src[i] of a table of donor-minus-receiver differences, (k, B, S_l, C)
    made: dict[str, torch.Tensor] = {}
    offsets: dict[str, int] = {}

    def row(key: str) -> int:
        if key not in offsets:
            if key == "heads":  # (nh, B, S_l, C): what each head's z difference adds
                made[key] = _head_out(model, layer, diff("z"))
            elif key == "all heads":  # z patched whole: the sum over heads
                made[key] = (made["heads"] if "heads" in made else _head_out(model, layer, diff("z"))).sum(0, keepdim=True)
            else:  # attn_out / mlp_out
                made[key] = diff(key)[None]
            offsets[key] = sum(len(t) for t in made.values()) - len(made[key])
        return offsets[key]

    src, rep = [], []
    for comp in comps:
        short = comp.hook.rsplit(".", 1)[1]
        rep.append(_entry(model, comp.hook)[2] == "replace")
        if rep[-1]:
            src.append(0)  # zeroed below, then replaced
        elif short == "hook_z":
            src.append(row("all heads") if comp.head is None else row("heads") + comp.head)
        else:
            src.append(row(short[len("hook_"):]))
    x = recv.expand(n, B, S_l, C)
    lp = torch.tensor(local, device=dev)
    at = (lp[:, None] == torch.arange(S_l, device=dev)) | (lp[:, None] < 0)  # (n, S_l): where slice i changes
    is_rep = torch.tensor(rep, device=dev)[:, None]
    if made:
        table = torch.cat(list(made.values())) if len(made) > 1 else next(iter(made.values()))
        delta = table if src == list(range(len(table))) else table[torch.tensor(src, device=dev)]
        if any(rep) or any(lo >= 0 for lo in local):  # zero outside a slice's positions and for replacements
            delta = delta * (at & ~is_rep).to(delta.dtype)[:, None, :, None]
        x = x + delta
    if any(rep):  # a residual point replaced: exactly the donor's value there
        x = torch.where((at & is_rep)[:, None, :, None], stream[d_rows], x)
    return x.reshape(n * B, S_l, C)


@torch.no_grad()
def fast_logit_diffs(model, pf: Prefixed, components: list[Component], donor: str, receiver: str, answer,
                     corrupted_answer, max_rows: int, show_progress: bool) -> torch.Tensor:
    """Raw logit difference of the receiver run with each (fast-path) component patched from the donor."""
    B, T = answer.shape[0], pf.T
    rows = {"clean": slice(0, B), "corrupted": slice(B, 2 * B)}
    d_rows, r_rows = rows[donor], rows[receiver]
    recv_ld = logit_diff(pf.logits[r_rows, None], answer, corrupted_answer)[0]
    out = torch.full((len(components),), recv_ld.item(), dtype=pf.logits.dtype)
    last = model.config.n_layer - 1
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for k, comp in enumerate(components):
        layer, stage, _ = _entry(model, comp.hook)
        one_pos = layer == last and stage != "pre"  # computed (and read) at the last position only
        local = -1
        if comp.position is not None:
            if not -T <= comp.position < T:
                raise IndexError(f"position {comp.position} out of range for sequence length {T}")
            pos = comp.position % T
            if pos < pf.p or (one_pos and pos != T - 1):
                continue  # the same in both runs, or read by nothing: the receiver's value
            local = 0 if one_pos else pos - pf.p
        groups.setdefault((layer, stage), []).append((k, local))
    per_chunk = max(1, max_rows // B)
    chunks = [(key, items[i:i + per_chunk]) for key, items in groups.items()
              for i in range(0, len(items), per_chunk)]
    for (layer, stage), items in _progress(chunks, show_progress, "patching"):
        ks = [k for k, _ in items]
        x = _patched_streams(model, pf, layer, stage, [components[k] for k in ks], [lo for _, lo in items],
                             d_rows, r_rows)
        logits = _run_tail_prefixed(model, pf, x, layer, stage, len(ks))
        out[ks] = logit_diff(logits[:, None], answer, corrupted_answer).to(out.dtype).cpu()
    return out


# ---------------------------------------------------------------------------------------
# The hook path (any hook point) and the reference
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def patched_logit_diffs(model, hm: HookManager, donor: dict, recv: dict, recv_input: torch.Tensor,
                         components: list[Component], answer, corrupted_answer, batched: bool, max_rows: int,
                         show_progress: bool) -> torch.Tensor:
    """Raw logit difference of the receiver run with each component patched from the donor.

    ``donor``/``recv``: activations of the two runs by hook name (from one cached forward).
    ``batched=False``: one full forward per component; else masked hooks on stacked batches.
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

    groups: dict[int | None, list[int]] = {}
    for k, comp in enumerate(components):
        groups.setdefault(layer_of(comp.hook), []).append(k)
    per_chunk = max(1, max_rows // B)
    chunks = [(layer, ks[i:i + per_chunk]) for layer, ks in groups.items() for i in range(0, len(ks), per_chunk)]
    for layer, chunk in _progress(chunks, show_progress, "patching"):
        logits = _run_with_masked_hooks(model, hm, donor, recv, recv_input, [components[k] for k in chunk], layer)
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
