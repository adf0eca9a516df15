"""Composition scores between heads (Elhage et al. 2021, "A Mathematical Framework for
Transformer Circuits"), in TransformerLens's conventions.

    scores = composition_scores(model, "K")    # (n_layer, n_head, n_layer, n_head)
    scores[0, 1, 1, 0]                         # how much L1H0's keys read what L0H1 writes
    composition_baseline(d_model, d_head)      # the same score for random matrices

A head's OV circuit ``W_OV = W_V W_O`` and QK circuit ``W_QK = W_Q W_K^T`` are
d_model x d_model maps of rank d_head (row-vector convention: ``x @ W_V @ W_O`` is what the
head writes, ``x_q @ W_QK @ x_k^T`` its attention score). An earlier head A composes with a
later head B when what A writes is what B reads:

    Q-composition  ||W_OV^A W_QK^B||_F   / (||W_OV^A||_F ||W_QK^B||_F)   (A feeds B's queries)
    K-composition  ||W_OV^A W_QK^B^T||_F / (||W_OV^A||_F ||W_QK^B||_F)   (A feeds B's keys)
    V-composition  ||W_OV^A W_OV^B||_F   / (||W_OV^A||_F ||W_OV^B||_F)   (A feeds B's values)

An induction head is K-composition with a previous-token head: its keys read the token
*before* each position, which the previous-token head wrote there. Scores lie in [0, 1];
pairs whose receiving head is not in a later layer are 0, as in TransformerLens's
``HookedTransformer.all_composition_scores``.

Layer norm: each block's ln_1 gain is folded into its W_Q, W_K, W_V, and every weight is
centred over d_model (the all-ones direction the layer norm removes, both where a head
writes and where the next one reads), as TransformerLens's default weight processing does
(``fold_ln``, ``center_writing_weights``) before it scores composition. The norms are computed from the d_head x d_head factors (never the
d_model x d_model products), in float64.
"""

from __future__ import annotations

from functools import lru_cache

import torch

KINDS = ("Q", "K", "V")


def _factors(model) -> dict[str, torch.Tensor]:
    """Per-head factors (n_layer, n_head, ...): W_Q, W_K, W_V (C, hs) with ln_1 folded in, and
    every factor centred over C (W_O (hs, C) too)."""
    out = {"Q": [], "K": [], "V": [], "O": []}
    for block in model.transformer.h:
        attn = block.attn
        C, nh = attn.n_embd, attn.n_head
        hs = C // nh
        g = block.ln_1.weight.detach().double()  # (C,)
        w = attn.c_attn.weight.detach().double()  # (3C, C): rows q | k | v, nn.Linear's (out, in)
        for name, rows in zip("QKV", w.split(C)):
            w_in = g[:, None] * rows.T  # (C, nh*hs): ln_1's gain folded in
            # the layer norm's output has mean 0 over C, so the mean over C of a reading weight
            # reads nothing: drop it (TransformerLens's fold_ln does the same)
            out[name].append((w_in - w_in.mean(0, keepdim=True)).reshape(C, nh, hs).permute(1, 0, 2))
        w_o = attn.c_proj.weight.detach().double().T.reshape(nh, hs, C)  # (nh, hs, C)
        out["O"].append(w_o - w_o.mean(-1, keepdim=True))
    return {k: torch.stack(v) for k, v in out.items()}


def _gram(x: torch.Tensor, left: bool) -> torch.Tensor:
    """X^T X for a left factor (.., C, r), X X^T for a right factor (.., r, C): both (.., r, r)."""
    return x.transpose(-2, -1) @ x if left else x @ x.transpose(-2, -1)


def _scores(ga, ga_right, gb_left, gb, m) -> torch.Tensor:
    """||A B||_F / (||A||_F ||B||_F) for A = a_left a_right ((.., C, r) times (.., r, C)) and
    B = b_left b_right, from r x r pieces only: the factors' Gram matrices (``ga`` of a_left,
    ``ga_right``, ``gb_left``, ``gb`` of b_right; ``_gram``) and ``m = a_right b_left``.

    ``||L R||_F^2 = tr(G_L G_R)`` with the factors' Gram matrices, and
    ``A B = a_left (a_right b_left) b_right``, so everything is r x r.
    """
    norm_a = (ga * ga_right).sum((-2, -1)).clamp_min(0).sqrt()
    norm_b = (gb_left * gb).sum((-2, -1)).clamp_min(0).sqrt()
    prod = ((m @ gb) * (ga @ m)).sum((-2, -1)).clamp_min(0).sqrt()
    return prod / (norm_a * norm_b).clamp_min(1e-30)


def _kind_scores(f: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """(L, H, L, H): every sending head against every head of a later layer, one sending layer
    at a time. Memory: the r x r products of one layer's H senders with the (L-1) H receivers
    at most, H (L-1) H r^2 float64 (57 MB for GPT-2 small), where broadcasting all senders
    against all receivers in one matmul would expand both factors to (L H)^2 x r x C (8 GB each)."""
    L, H, C, r = f["Q"].shape
    flat = {k: v.reshape(L * H, *v.shape[2:]) for k, v in f.items()}
    ov_l, ov_r = flat["V"], flat["O"]  # W_OV = W_V W_O
    if kind == "Q":  # W_QK = W_Q W_K^T
        b_l, b_r = flat["Q"], flat["K"].transpose(-2, -1)
    elif kind == "K":  # W_QK^T = W_K W_Q^T
        b_l, b_r = flat["K"], flat["Q"].transpose(-2, -1)
    elif kind == "V":
        b_l, b_r = ov_l, ov_r
    else:
        raise ValueError(f"composition kind must be one of {KINDS}, got {kind!r}")
    ga, ga_right = _gram(ov_l, True), _gram(ov_r, False)  # (L H, r, r)
    gb_left, gb = _gram(b_l, True), _gram(b_r, False)
    out = torch.zeros(L, H, L, H, dtype=ov_l.dtype, device=ov_l.device)  # 0 unless the receiver is in a later layer
    for la in range(L - 1):
        a = slice(la * H, (la + 1) * H)
        b = slice((la + 1) * H, L * H)
        n = b.stop - b.start
        # (H r, C) @ (C, n r): one plain matmul, then each (sender, receiver) block is r x r
        m = (ov_r[a].reshape(H * r, C) @ b_l[b].permute(1, 0, 2).reshape(C, n * r))
        m = m.reshape(H, r, n, r).transpose(1, 2)  # (H, n, r, r)
        s = _scores(ga[a, None], ga_right[a, None], gb_left[None, b], gb[None, b], m)
        out[la, :, la + 1:] = s.reshape(H, L - la - 1, H)
    return out


@torch.no_grad()
def composition_scores(model, kind: str = "K") -> torch.Tensor:
    """(n_layer, n_head, n_layer, n_head) ``kind``-composition scores, float32.

    ``scores[la, ha, lb, hb]``: head (la, ha) writing into head (lb, hb)'s queries ("Q"),
    keys ("K") or values ("V"); 0 unless la < lb. TransformerLens's
    ``all_composition_scores(kind)`` on the same (processed) weights gives the same tensor.
    """
    return _kind_scores(_factors(model), kind).float()


@torch.no_grad()
def all_composition_scores(model) -> dict[str, torch.Tensor]:
    """``{"Q": ..., "K": ..., "V": ...}`` from one pass over the weights (see composition_scores)."""
    f = _factors(model)
    return {k: _kind_scores(f, k).float() for k in KINDS}


@lru_cache(maxsize=16)  # once per model shape and process, not once per checkpoint
@torch.no_grad()
def composition_baseline(d_model: int, d_head: int, n_samples: int = 1024, seed: int = 0) -> float:
    """Mean composition score of random matrices of the same shapes (Elhage et al.'s baseline).

    Every factor (d_model x d_head or d_head x d_model) has i.i.d. standard normal entries;
    the score is scale-free, so the variance does not matter. Q-, K- and V-composition
    compose the same shapes (two rank-d_head products of independent factors), so they
    share one baseline; ``n_samples`` pairs from a fixed ``seed`` make it reproducible
    (about 0.3 % standard error at the default for d_model 64, d_head 16).
    """
    g = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(n_samples, *shape, generator=g, dtype=torch.float64)

    # the four factors drawn in this order, each reduced to its r x r pieces as soon as they can
    # be: two n_samples x d_model x d_head draws held at a time (805 MB at GPT-2 small's 768 x 64),
    # not four
    ga = _gram(draw(d_model, d_head), True)
    a_right = draw(d_head, d_model)
    ga_right = _gram(a_right, False)
    b_left = draw(d_model, d_head)
    gb_left, m = _gram(b_left, True), a_right @ b_left
    del a_right, b_left
    gb = _gram(draw(d_head, d_model), False)
    return float(_scores(ga, ga_right, gb_left, gb, m).mean())
