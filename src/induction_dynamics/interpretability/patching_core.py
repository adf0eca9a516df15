"""The batched patching engine behind ``activation_patching`` (internal).

The residual stream is a sum, so patching a residual point, a block's attention or MLP
output, or one head's z is exactly "change the stream at one point, run the rest of the
model from there". For these components the setup is ``prefixed_forward``, a forward of
its own (no hooks) built on two facts:

- the model is causal, so at every position before ``p``, the first position where clean
  and corrupted differ in any row, every activation is the same in both runs: that prefix
  is computed once, and both runs (and every patched run) only on positions >= p, their
  queries attending to the prefix's keys and values (computed once per layer) and their
  own. Patching anything at a position < p changes nothing;
- the metric reads only the last position's logits, so the last block is computed for
  the last query only (its keys and values folded into that query, never formed), and
  patching a last-block component at any other position changes nothing either.

Each component's copy of the receiver (slice i carries component i's change) joins the
stacked batch at the stream point it changes, and the first batch of them (``max_rows``)
rides in the setup forward itself; further batches start from the setup's cached streams.
Any other hook point (q, k, v, pattern, embeddings) is patched by a masked hook on the
stacked batch, from the hooked setup forward (``HookManager.run_with_cache``).
``batched=False`` is the plain reference: that hooked setup and one full forward with one
hook per component.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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
    N, _, C = x.shape
    z = _last_query_z(block.attn, block.ln_1(x), None)  # (N, 1, nh, hs)
    x = x[:, -1:] + block.attn.c_proj(z.reshape(N, 1, C))
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
    attention: (2B, 1, ...), the last position only. ``kv[layer]`` (layers before the last):
    the prefix's keys and values (B, n_head, p, head_size), the same in both runs;
    ``last_prefix``: the prefix's ln_1(x) in the last block (B, p, C). None when p = 0.
    """

    p: int
    T: int
    B: int
    kv: list
    acts: dict
    causal: torch.Tensor  # (T, T) additive causal mask (0 on and below the diagonal, -inf above)
    last_prefix: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (2B, V) at the last position
    # patching plan: chunks of [(point, component index, item)]; the first chunk rides in the setup:
    # all_logits = the 2B baseline rows' logits, then that chunk's patched rows'
    chunks: list = field(default_factory=list)
    rows: tuple = ()  # (donor rows, receiver rows) among the 2B
    all_logits: torch.Tensor | None = None


def _ln(ln, x):
    return F.layer_norm(x, ln.weight.shape, ln.weight, ln.bias, 1e-5)


def _mlp(block, x):
    mlp = block.mlp
    h = F.linear(_ln(block.ln_2, x), mlp.c_fc.weight, mlp.c_fc.bias)
    torch.ops.aten.gelu_(h, approximate=mlp.gelu.approximate)  # nn.GELU in place: no second hidden-size buffer
    return F.linear(h, mlp.c_proj.weight, mlp.c_proj.bias)


def _unembed(model, x):
    return F.linear(_ln(model.transformer.ln_f, x), model.lm_head.weight, model.lm_head.bias)


def _heads(t, N: int, nh: int):
    """(N*T, C) or (N, T, C) -> (N, nh, T, hs)."""
    return t.reshape(N, -1, nh, t.shape[-1] // nh).transpose(1, 2)


def _attend(q, k, v, mask):
    """softmax(q k^T / sqrt(hs) + mask) v for (N, nh, Tq, hs) queries and (N, nh, Tk, hs) keys
    -> (N, Tq, nh, hs), the layout of hook_z."""
    N, nh, Tq, hs = q.shape
    q, k, v = q.reshape(N * nh, Tq, hs), k.reshape(N * nh, -1, hs), v.reshape(N * nh, -1, hs)
    att = torch.baddbmm(mask, q, k.transpose(1, 2), alpha=1.0 / math.sqrt(hs))
    return torch.bmm(att.softmax(-1), v).view(N, nh, Tq, hs).transpose(1, 2)


def _with_prefix(kv, k, v):
    """Suffix keys and values (N, nh, S, hs) preceded by the shared prefix's (B, nh, p, hs)."""
    if kv is None:
        return k, v
    (N, nh, S, hs), (B, _, p, _) = k.shape, kv[0].shape
    out = []
    for pre, t in zip(kv, (k, v)):
        both = t.new_empty(N // B, B, nh, p + S, hs)
        both[..., :p, :] = pre  # broadcast over the stacked copies
        both.view(N, nh, p + S, hs)[..., p:, :] = t
        out.append(both.view(N, nh, p + S, hs))
    return out


def _last_query_z(attn, h, prefix):
    """The heads' output z (N, 1, nh, hs) at the last query of suffix rows h = ln_1(x)
    (N, S, C) that follow the shared ``prefix``'s ln_1(x) (B, p, C; or None).

    Only the last query is needed, so no key or value is formed: q . (W_k h_s + b_k) =
    (W_k^T q) . h_s + q . b_k and sum_s a_s (W_v h_s + b_v) = W_v (sum_s a_s h_s) + b_v
    (the weights sum to 1; exact up to float rounding).
    """
    N, S, C = h.shape
    nh, hs = attn.n_head, C // attn.n_head
    w, b = attn.c_attn.weight, attn.c_attn.bias
    q = F.linear(h[:, -1], w[:C], None if b is None else b[:C]).view(N, nh, hs)
    qk = torch.bmm(q.transpose(0, 1), w[C:2 * C].view(nh, hs, C)).transpose(0, 1)  # (N, nh, C)
    if prefix is not None:  # every position's ln_1(x), (N, T, C)
        B, p, _ = prefix.shape
        full = h.new_empty(N // B, B, p + S, C)
        full[:, :, :p] = prefix  # broadcast over the stacked copies
        full = full.view(N, p + S, C)
        full[:, p:] = h
        h = full
    scores = torch.bmm(qk, h.transpose(1, 2))  # (N, nh, T)
    if b is not None:
        scores = scores + (q * b[C:2 * C].view(nh, hs)).sum(-1, keepdim=True)
    att = scores.mul_(1.0 / math.sqrt(hs)).softmax(-1)
    z = torch.bmm(torch.bmm(att, h).transpose(0, 1), w[2 * C:].view(nh, hs, C).transpose(1, 2)).transpose(0, 1)
    if b is not None:
        z = z + b[2 * C:].view(nh, hs)
    return z.reshape(N, 1, nh, hs)


def _first_difference(clean: torch.Tensor, corrupted: torch.Tensor) -> int:
    """p: the first position where any row differs, at most T - 1 (the suffix holds the last position)."""
    differs = (clean != corrupted).any(0).nonzero()
    return min(int(differs[0]), clean.shape[1] - 1) if len(differs) else clean.shape[1] - 1


_KIND = {"hook_z": "z", "hook_attn_out": "attn_out", "hook_mlp_out": "mlp_out"}
_POINTS = ("pre", "mid", "post")


def _plan(model, components: list[Component], p: int, T: int, B: int, max_rows: int) -> list[list[tuple]]:
    """Chunks (at most max_rows // B components each) of (point, index, (kind, head, local position))
    in model order, for the components that change anything; the others keep the receiver's value."""
    last = model.config.n_layer - 1
    todo = []
    for k, comp in enumerate(components):
        layer, stage, kind = _entry(model, comp.hook)
        one_pos = layer == last and stage != "pre"  # computed (and read) at the last position only
        local = -1
        if comp.position is not None:
            if not -T <= comp.position < T:
                raise IndexError(f"position {comp.position} out of range for sequence length {T}")
            pos = comp.position % T
            if pos < p or (one_pos and pos != T - 1):
                continue  # the same in both runs, or read by nothing: the receiver's value
            local = 0 if one_pos else pos - p
        kind = kind if kind == "replace" else _KIND[comp.hook.rsplit(".", 1)[1]]
        todo.append(((layer, _POINTS.index(stage)), k, (kind, comp.head, local)))
    todo.sort(key=lambda t: t[0])  # model order (stable: components keep theirs within a point)
    per_chunk = max(1, max_rows // B)
    return [todo[i:i + per_chunk] for i in range(0, len(todo), per_chunk)]


def _groups(chunk: list[tuple]) -> list[tuple]:
    """[((layer, stage), [item, ...]), ...]: a chunk's items by the stream point they change."""
    groups = []
    for (layer, order), _, item in chunk:
        point = (layer, _POINTS[order])
        if not groups or groups[-1][0] != point:
            groups.append((point, []))
        groups[-1][1].append(item)
    return groups


def _forward(model, pf: Prefixed, groups: list[tuple], x: torch.Tensor | None = None) -> torch.Tensor:
    """A stacked forward over suffix rows; returns the last-position logits of every row, (N, V).

    ``x`` given: the setup. x is the flat matrix of embeddings, the prefix's B*p rows then the
    2B baseline rows of S positions; it computes and records ``pf.kv`` and ``pf.acts``.
    ``x`` None: patched rows only, from the first group's point. Either way each group's
    patched rows (``_patched_streams``) join the batch at their stream point.
    """
    blocks = model.transformer.h
    last, B, S, p = len(blocks) - 1, pf.B, pf.T - pf.p, pf.p
    setup = x is not None
    P = B * p if setup else 0  # prefix rows in x (before the last block's attention)
    acts, g = pf.acts, 0

    def join(x, layer, stage):
        nonlocal g
        while g < len(groups) and groups[g][0] == (layer, stage):
            new = _patched_streams(model, pf, layer, stage, groups[g][1])
            if layer < last or stage == "pre":
                new = new.reshape(-1, new.shape[-1])  # flat, like x
            x = new if x is None else torch.cat([x, new])
            g += 1
        return x

    def keep(t):  # the 2B baseline rows, of flat rows (R, C) or of last-position rows (Ns, 1, C)
        return t[:2 * B] if t.dim() == 3 else t[P:P + 2 * B * S].view(2 * B, S, -1)

    for i in range(0 if setup else groups[0][0][0], last + 1):
        block = blocks[i]
        attn, nh = block.attn, block.attn.n_head
        if setup:
            acts[(i, "pre")] = keep(x)
        x = join(x, i, "pre")
        if x is not None:  # the attention half of the block
            C = x.shape[-1]
            Ns = (x.shape[0] - P) // S  # suffix rows
            h = _ln(block.ln_1, x)
            w, b = attn.c_attn.weight, attn.c_attn.bias
            if i == last:
                if setup:  # what the last block needs of the prefix: its ln_1(x), for keys and values
                    pf.last_prefix = h[:P].view(B, p, C) if p else None
                z = _last_query_z(attn, h[P:].view(Ns, S, C), pf.last_prefix)  # (Ns, 1, nh, hs)
                a = F.linear(z.reshape(Ns, 1, C), attn.c_proj.weight, attn.c_proj.bias)
                x = x[P:].view(Ns, S, C)[:, -1:] + a
            else:
                q, k, v = F.linear(h, w, b).split(C, dim=-1)
                if setup:
                    pf.kv.append((_heads(k[:P], B, nh), _heads(v[:P], B, nh)) if p else None)
                kv = pf.kv[i]
                z = _attend(_heads(q[P:], Ns, nh), *_with_prefix(kv, _heads(k[P:], Ns, nh), _heads(v[P:], Ns, nh)),
                            pf.causal[p:])  # (Ns, S, nh, hs)
                zf = z.reshape(Ns * S, C)
                if P:  # the prefix's own attention, causal among its positions
                    zp = _attend(_heads(q[:P], B, nh), *kv, pf.causal[:p, :p])
                    zf = torch.cat([zp.reshape(P, C), zf])
                a = F.linear(zf, attn.c_proj.weight, attn.c_proj.bias)
                x = x + a
            if setup:
                acts[(i, "z")], acts[(i, "attn_out")] = z[:2 * B], keep(a)
        if not block.attn_only:
            if setup:
                acts[(i, "mid")] = keep(x)
            x = join(x, i, "mid")
            if x is not None:
                m = _mlp(block, x)
                if setup:
                    acts[(i, "mlp_out")] = keep(m)
                x = x + m
        if setup:
            acts[(i, "post")] = keep(x)
        x = join(x, i, "post")
    return _unembed(model, x[:, -1])


def _causal(T: int, like: torch.Tensor) -> torch.Tensor:
    """(T, T) additive causal mask: 0 on and below the diagonal, -inf above."""
    return torch.zeros(T, T, dtype=like.dtype, device=like.device).masked_fill_(
        torch.ones(T, T, dtype=torch.bool, device=like.device).triu_(1), float("-inf"))


@torch.no_grad()
def prefixed_forward(model, clean: torch.Tensor, corrupted: torch.Tensor, components: list[Component] = (),
                     donor: str = "clean", receiver: str = "corrupted", max_rows: int = 2048) -> Prefixed:
    """Both runs' activations and last-position logits, the shared prefix computed once; the
    first chunk of ``components`` (fast-path ones) is patched in the same forward.

    p = the first position where any row of clean and corrupted differs (at most T - 1).
    Per-position work runs on one flat matrix of rows: the prefix's B*p, then the suffix's
    2B*S (clean rows, then corrupted), then the patched rows as they join.
    """
    B, T = clean.shape
    if T > model.config.block_size:
        raise ValueError(f"sequence length {T} exceeds the model's block size {model.config.block_size}")
    p = _first_difference(clean, corrupted)
    S = T - p
    tr = model.transformer
    pos = torch.arange(T, device=clean.device)
    tokens = torch.cat([clean[:, :p].reshape(-1), clean[:, p:].reshape(-1), corrupted[:, p:].reshape(-1)])
    x = F.embedding(tokens, tr.wte.weight) + F.embedding(torch.cat([pos[:p].repeat(B), pos[p:].repeat(2 * B)]),
                                                         tr.wpe.weight)  # (B*p + 2B*S, C)
    rows = {"clean": slice(0, B), "corrupted": slice(B, 2 * B)}
    pf = Prefixed(p, T, B, [], {}, _causal(T, x), rows=(rows[donor], rows[receiver]))
    pf.chunks = _plan(model, list(components), p, T, B, max_rows)
    pf.all_logits = _forward(model, pf, _groups(pf.chunks[0]) if pf.chunks else [], x)
    pf.logits = pf.all_logits[:2 * B]
    return pf


def _patched_streams(model, pf: Prefixed, layer: int, stage: str, items: list[tuple]) -> torch.Tensor:
    """(n*B, S_l, C): the receiver's suffix stream at (layer, stage), slice i changed by items[i]
    = (kind, head, local position (-1 = all)), kind "replace" or the term it changes: "z",
    "attn_out", "mlp_out"."""
    acts, (d_rows, r_rows) = pf.acts, pf.rows
    stream = acts[(layer, stage)]
    recv = stream[r_rows]  # (B, S_l, C)
    B, S_l, C = recv.shape
    n, dev = len(items), recv.device

    def diff(name):
        a = acts[(layer, name)]
        return a[d_rows] - a[r_rows]

    # what slice i adds: row src[i] of a table of donor-minus-receiver differences (k, B, S_l, C)
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

    src = [0 if kind == "replace" else row(("all heads" if head is None else "heads") if kind == "z" else kind)
           + (head or 0) * (kind == "z") for kind, head, _ in items]
    rep = [kind == "replace" for kind, _, _ in items]
    local = [lo for _, _, lo in items]
    at = None
    if any(rep) or any(lo >= 0 for lo in local):
        lp = torch.tensor(local, device=dev)
        at = (lp[:, None] == torch.arange(S_l, device=dev)) | (lp[:, None] < 0)  # (n, S_l): where slice i changes
        is_rep = torch.tensor(rep, device=dev)[:, None]
    x = recv.expand(n, B, S_l, C)
    if made:
        table = torch.cat(list(made.values())) if len(made) > 1 else next(iter(made.values()))
        delta = table if src == list(range(len(table))) else table[torch.tensor(src, device=dev)]
        if at is not None:  # zero outside a slice's positions, and for replacements
            delta = delta * (at & ~is_rep).to(delta.dtype)[:, None, :, None]
        x = x + delta
    if any(rep):  # a residual point replaced: exactly the donor's value there
        x = torch.where((at & is_rep)[:, None, :, None], stream[d_rows], x)
    return x.reshape(n * B, S_l, C)


@torch.no_grad()
def fast_logit_diffs(model, pf: Prefixed, components: list[Component], answer, corrupted_answer,
                     show_progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw logit difference of the receiver run with each of ``components`` (the ones
    ``prefixed_forward`` planned) patched from the donor, and the (clean, corrupted) baselines."""
    lds = logit_diff(pf.all_logits[:, None], answer, corrupted_answer)  # baselines, then the first chunk
    recv = pf.rows[1].start // pf.B  # 0: clean, 1: corrupted
    out = lds[recv:recv + 1].repeat(len(components))  # what changes nothing keeps the receiver's value
    for i in _progress(range(len(pf.chunks)), show_progress, "patching"):
        ks = torch.tensor([k for _, k, _ in pf.chunks[i]], device=lds.device)
        out[ks] = lds[2:] if i == 0 else logit_diff(_forward(model, pf, _groups(pf.chunks[i]))[:, None], answer,
                                                    corrupted_answer)
    return out.cpu(), lds[:2].cpu()


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
        # the last block for the last query only, unless the hooks are in it
        return _run_tail(model, x.repeat(n, 1, 1), layer, "pre", shortcut=layer < model.config.n_layer - 1)


def _progress(iterable, show: bool, desc: str):
    if not show:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc)
