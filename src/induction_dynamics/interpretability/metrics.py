"""Metric definitions for induction heads (Olsson et al. 2022; TransformerLens conventions).

Prompt data for a character vocabulary
-------------------------------------
TransformerLens measures induction on ``[x, x]`` where ``x`` is a random token sequence.
With a ~65-character vocabulary, a random half of 50 tokens repeats letters, and even a
perfect induction head must split its attention between the earlier occurrences. So each
half here is drawn *without replacement* (every token occurs once per half, so
``seq_len <= len(allowed tokens)``), from the vocabulary minus its rarest and most common
entries, as Olsson et al. do. A perfect induction head then scores 1.0; a head that
attends uniformly scores about 1/position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from induction_dynamics.interpretability.utils import HookManager, attention_patterns


def repeat_token_ids(vocab_size: int, counts: torch.Tensor | None = None, drop_frac: float = 0.1) -> torch.Tensor:
    """Token ids for random prompts: the tokens the training text uses, minus the rarest and
    most common of them.

    ``counts`` (vocab_size,) are token frequencies in the training text (a shorter vector
    leaves the ids past its end unused: a padded embedding); ``drop_frac`` of the used
    tokens is dropped at each end (Olsson et al. exclude the most and least common tokens).
    Tokens that never occur in training are never drawn: with a 50,257-token GPT-2
    vocabulary over a small dataset, most ids are such untrained rows. Without counts every
    token is allowed.
    """
    if counts is None:
        return torch.arange(vocab_size)
    c = torch.zeros(vocab_size)
    n = min(vocab_size, len(counts))
    c[:n] = torch.as_tensor(counts[:n]).float()
    used = torch.nonzero(c > 0).flatten()  # sorted ids
    if len(used) == 0:
        return torch.arange(vocab_size)
    order = used[torch.argsort(c[used], stable=True)]  # rarest first; ties by id
    k = int(len(used) * drop_frac)
    return torch.sort(order[k: len(used) - k]).values


def repeated_random_tokens(allowed: torch.Tensor, seq_len: int, batch: int, n_repeats: int = 2,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch, n_repeats * seq_len) tokens: a random half of distinct tokens, repeated.

    Each half is a random draw *without replacement* from ``allowed``. ``n_repeats=2`` is the
    TransformerLens induction prompt ``[x, x]``; ``n_repeats=4`` with ``seq_len=25`` is Olsson
    et al.'s prefix-matching prompt.
    """
    if seq_len > len(allowed):
        raise ValueError(f"prompt seq_len {seq_len} exceeds the {len(allowed)} allowed distinct tokens")
    halves = torch.stack([allowed[torch.randperm(len(allowed), generator=generator)[:seq_len]]
                          for _ in range(batch)])
    return halves.repeat(1, n_repeats)


def induction_score_from_pattern(pattern: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Induction score per head from attention patterns (..., n_head, T, T) of ``[x, x]``.

    TransformerLens convention: mean attention on the diagonal at offset ``1 - seq_len``,
    i.e. from each token of the second copy to the token *after* its first occurrence.
    Unlike TransformerLens's BOS-prefixed prompt, only second-copy queries are averaged
    (positions seq_len .. 2*seq_len-1), so a perfect induction head scores exactly 1.0.
    Returns (..., n_head) averaged over the batch dimension if present.
    """
    stripe = pattern.diagonal(offset=1 - seq_len, dim1=-2, dim2=-1)[..., 1:seq_len + 1]  # (..., nh, seq_len)
    score = stripe.mean(-1)
    return score.mean(0) if score.dim() > 1 else score


@torch.no_grad()
def induction_scores(model, tokens: torch.Tensor, seq_len: int, per_prompt: bool = False) -> torch.Tensor:
    """(n_layer, n_head) induction score of every head on ``tokens = [x, x]`` (see above);
    ``per_prompt``: (n_layer, B, n_head), the score on each prompt (their mean is the score)."""
    patterns = attention_patterns(model, tokens)  # (n_layer, B, nh, T, T)
    if per_prompt:
        return patterns.diagonal(offset=1 - seq_len, dim1=-2, dim2=-1)[..., 1:seq_len + 1].mean(-1)
    return torch.stack([induction_score_from_pattern(p, seq_len) for p in patterns])


@torch.no_grad()
def repeated_sequence_loss(model, tokens: torch.Tensor, seq_len: int, per_prompt: bool = False):
    """Induction loss: mean loss on the first vs the second copy of ``[x, x]`` (nats).

    First copy: predictions of tokens 1 .. seq_len-1; second copy: of tokens
    seq_len+1 .. 2*seq_len-1 (the first token of the second copy is excluded: it is
    not predictable from context). An induction head drives the second toward 0.
    Returns two floats; ``per_prompt``: two (B,) tensors, each prompt's mean.
    """
    loss = per_token_losses(model, tokens)  # (B, 2L-1): loss[:, i] predicts token i+1
    first, second = loss[:, : seq_len - 1], loss[:, seq_len: 2 * seq_len - 1]
    if per_prompt:
        return first.mean(1), second.mean(1)
    return first.mean().item(), second.mean().item()


# ---------------------------------------------------------------------------------------
# Attention-pattern scores beyond induction (Olsson et al. 2022, appendix "Model analysis")
# ---------------------------------------------------------------------------------------

def _masked_attention_score(patterns: torch.Tensor, mask: torch.Tensor, per_prompt: bool = False) -> torch.Tensor:
    """Mean over queries (that have at least one target) of the attention on ``mask``'s keys.

    patterns (n_layer, B, nh, T, T); mask (B, T, T) bool, mask[b, i, j] = key j is a target
    of query i. Returns (n_layer, n_head): sum_j A[i, j] over targets, averaged over every
    (b, i) with a target. A head that puts all its attention on the targets scores 1.0.
    ``per_prompt``: (n_layer, B, n_head), each prompt's mean over its queries with a target.
    """
    m = mask.to(patterns.dtype)  # (B, T, T)
    has_target = mask.any(-1)  # (B, T)
    if not has_target.any():
        raise ValueError("no query position has a target key: is the prompt repeated?")
    on_target = (patterns * m[None, :, None]).sum(-1)  # (n_layer, B, nh, T)
    on_target = on_target * has_target[None, :, None].to(patterns.dtype)
    if per_prompt:
        return on_target.sum(3) / has_target.sum(1)[None, :, None].clamp_min(1)
    return on_target.sum((1, 3)) / has_target.sum()


def _earlier_same_token(tokens: torch.Tensor) -> torch.Tensor:
    """(B, T, T) bool: same[b, i, j] = j < i and tokens[b, j] == tokens[b, i]."""
    same = tokens[:, :, None] == tokens[:, None, :]  # (B, T, T)
    T = tokens.shape[1]
    strictly_earlier = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril(-1)
    return same & strictly_earlier


@torch.no_grad()
def prefix_matching_scores(model, tokens: torch.Tensor, seq_len: int, per_prompt: bool = False) -> torch.Tensor:
    """(n_layer, n_head) prefix-matching score (Olsson et al. 2022, appendix).

    Prompt: ``seq_len`` (25 in the paper) distinct random tokens repeated 4 times
    (``repeated_random_tokens(allowed, 25, batch, n_repeats=4)``). For every query token
    that occurred before, the score is the attention it pays to the tokens that *followed*
    its earlier occurrences (all of them, summed), averaged over those queries. A perfect
    prefix-matching head (the attention half of an induction head) scores 1.0; a head that
    attends uniformly scores about (copies seen) / position. ``per_prompt``: (n_layer, B, n_head).
    """
    if tokens.shape[1] < 2 * seq_len:
        raise ValueError(f"prefix-matching prompt must repeat its {seq_len} tokens (got length {tokens.shape[1]})")
    earlier = _earlier_same_token(tokens)  # (B, T, T): key j is an earlier occurrence of query i
    # key j+1 follows an earlier occurrence j; j+1 <= i always holds because j < i
    targets = torch.zeros_like(earlier)
    targets[:, :, 1:] = earlier[:, :, :-1]
    return _masked_attention_score(attention_patterns(model, tokens), targets, per_prompt)


@torch.no_grad()
def previous_token_scores(model, text_tokens: torch.Tensor) -> torch.Tensor:
    """(n_layer, n_head) previous-token score: mean attention from position i to i-1.

    Measured on real text (Olsson et al. 2022 use the training distribution), averaged over
    every query position i >= 1. A perfect previous-token head scores 1.0.
    """
    return previous_token_score_from_pattern(attention_patterns(model, text_tokens))


def previous_token_score_from_pattern(patterns: torch.Tensor) -> torch.Tensor:
    """(..., n_head) previous-token score from patterns (..., B, n_head, T, T), e.g. (n_layer, B, nh, T, T)."""
    stripe = patterns.diagonal(offset=-1, dim1=-2, dim2=-1)  # (..., B, nh, T-1): A[i, i-1]
    return stripe.mean((-3, -1))


@torch.no_grad()
def duplicate_token_scores(model, tokens: torch.Tensor, seq_len: int, per_prompt: bool = False) -> torch.Tensor:
    """(n_layer, n_head) duplicate-token score: attention to earlier copies of the same token.

    TransformerLens / Wang et al. (2022) convention on the repeated prompt ``[x, x]``: for
    every query that occurred before (second-copy positions), the attention it pays to its
    earlier occurrences (summed), averaged over those queries. ``seq_len`` is the half
    length; only queries from position ``seq_len`` on are counted. A perfect
    duplicate-token head scores 1.0. ``per_prompt``: (n_layer, B, n_head).
    """
    targets = _earlier_same_token(tokens)
    targets[:, :seq_len] = False  # queries of the first copy: no earlier occurrence by design
    return _masked_attention_score(attention_patterns(model, tokens), targets, per_prompt)


# ---------------------------------------------------------------------------------------
# Copying (OV circuit): empirical direct-logit effect and eigenvalue score
# ---------------------------------------------------------------------------------------

def head_weights(model, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head W_V (nh, C, hs) and W_O (nh, hs, C) of block ``layer`` (row-vector convention).

    nanoGPT packs q, k, v in ``c_attn`` (3C, C) and heads side by side; ``v_h = x @ W_V[h]``
    and the head's contribution to the residual stream is ``z_h @ W_O[h]``.
    """
    attn = model.transformer.h[layer].attn
    C, nh = attn.n_embd, attn.n_head
    hs = C // nh
    w_v = attn.c_attn.weight[2 * C:3 * C].T.reshape(C, nh, hs).permute(1, 0, 2)  # (nh, C, hs)
    w_o = attn.c_proj.weight.T.reshape(nh, hs, C)  # (nh, hs, C)
    return w_v, w_o


@torch.no_grad()
def ov_copying_scores(model) -> torch.Tensor:
    """(n_layer, n_head) OV-circuit eigenvalue copying score (Elhage et al. 2021; Olsson et al. 2022).

    For each head the full OV circuit ``W_E diag(g_1) W_V W_O diag(g_f) W_U^T`` (vocab x
    vocab: token attended to -> logits it writes) has eigenvalues l; the score is
    ``sum(l) / sum(|l|)``. Positive eigenvalues mean the head raises the logit of the token
    it attends to: a pure copying head scores 1.0, an anti-copying head -1.0. Layer-norm
    gains g_1 (the block's ln_1) and g_f (ln_f) are folded in; the normalisation itself (a
    positive scale, plus centering) is ignored, as in the attention-only framework. The
    vocab x vocab matrix has the same non-zero eigenvalues as the small (hs x hs) product
    ``W_O diag(g_f) W_U^T W_E diag(g_1) W_V``, which is what is diagonalised.
    """
    W_E = model.transformer.wte.weight  # (V, C)
    W_U = model.lm_head.weight  # (V, C)
    g_f = model.transformer.ln_f.weight  # (C,)
    # (C, C): W_U^T W_E with ln_f's gain folded in, the same for every layer: once, not per layer
    # (2 C^2 vocab FLOPs, 59 GFLOP at GPT-2 small)
    EU = (W_U * g_f).T @ W_E
    scores = []
    for layer, block in enumerate(model.transformer.h):
        w_v, w_o = head_weights(model, layer)
        g_1 = block.ln_1.weight
        small = w_o @ EU @ (g_1[:, None] * w_v)  # (nh, hs, hs)
        lam = torch.linalg.eigvals(small.double())  # (nh, hs) complex
        scores.append((lam.sum(-1).real / lam.abs().sum(-1).clamp_min(1e-30)).float())
    return torch.stack(scores)


@torch.no_grad()
def copying_scores(model, tokens: torch.Tensor, per_prompt: bool = False) -> torch.Tensor:
    """(n_layer, n_head) empirical copying score from each head's direct logit effect.

    Olsson et al. (2022, appendix) call a head *copying* when its direct effect on the
    logits raises the logits of the tokens it attends to. Per head and query position i:
    the head's output ``z_h @ W_O[h]`` is sent through the final layer norm (frozen: the
    model's own scale at i, as in direct logit attribution) and the unembedding, giving the
    logit change d_i (vocab,), centred over the vocabulary. The score at i is the
    attention-weighted raise of the attended tokens ``sum_j A[i, j] d_i[tokens[j]]``
    divided by ``max_v |d_i[v]|``; the head's score is the mean over batch and positions.
    Range [-1, 1]: 1.0 for a perfect copying head (every attended token gets the largest
    raise), -1.0 for a perfect anti-copying (copy-suppression) head, about 0 for a head
    whose output is unrelated to what it attends to. ``per_prompt``: (n_layer, B, n_head).
    The logit effects are computed one head at a time, so memory holds (B, T, vocab) and one
    layer's (n_head, hs, vocab) map, not (B, n_head, T, vocab) (GPT-2's vocabulary makes the
    latter a gigabyte). They are linear in
    the head's z: centring over C, ln_f's gain, the unembedding and centring over the vocabulary
    fold into one (hs, vocab) map per head, so each head costs 2 hs C vocab FLOPs for the map and
    2 B T hs vocab for its effects, 2 n_layer C vocab (C + B T) in all, where sending each head's
    (B, T, C) output through the (C, vocab) unembedding costs 2 n_layer n_head B T C vocab
    (1.2 TFLOP against 5.7 for GPT-2 small on 8 prompts of 64 tokens).
    """
    names = ["attn.hook_z", "attn.hook_pattern", f"transformer.h.{model.config.n_layer - 1}.hook_resid_post"]
    _, cache = HookManager(model).run_with_cache(tokens, names_filter=names)
    zs = cache.stack("attn.hook_z")  # (L, B, T, nh, hs)
    patterns = cache.stack("attn.hook_pattern")  # (L, B, nh, T, T)
    resid = cache[names[-1]]  # (B, T, C)
    scale = (resid.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()  # (B, T, 1) ln_f's scale
    ln_f = model.transformer.ln_f.weight  # (C,)
    W_U = model.lm_head.weight  # (V, C)
    B, T = tokens.shape
    attended = tokens[:, None, :].expand(B, T, T)  # attended[b, i, j] = tokens[b, j]
    scores = []
    for layer in range(zs.shape[0]):
        _, w_o = head_weights(model, layer)
        nh, hs, C = w_o.shape
        w_o = (w_o - w_o.mean(-1, keepdim=True)) * ln_f  # centred over C (frozen ln_f), and its gain
        # (nh, hs, V): z -> the head's direct logit effect times ln_f's scale, centred over the vocabulary
        to_logits = (w_o.reshape(nh * hs, C) @ W_U.T).view(nh, hs, -1)
        to_logits = to_logits - to_logits.mean(-1, keepdim=True)
        per_head = []
        for h in range(nh):
            d = (zs[layer][:, :, h] / scale) @ to_logits[h]  # (B, T, V) direct logit effect, centred
            raised = d.gather(-1, attended)  # (B, T, T): raise of the token at key j, at query i
            largest = torch.maximum(d.amax(-1), -d.amin(-1))  # max |d| without a (B, T, V) |d|
            per_head.append((patterns[layer][:, h] * raised).sum(-1) / largest.clamp_min(1e-12))  # (B, T)
        r = torch.stack(per_head, 1)  # (B, nh, T)
        scores.append(r.mean(2) if per_prompt else r.mean((0, 2)))
    return torch.stack(scores)


# ---------------------------------------------------------------------------------------
# Loss-based measures: in-context learning score and per-token losses
# ---------------------------------------------------------------------------------------

def per_token_losses(model, tokens: torch.Tensor, logits: torch.Tensor | None = None,
                     positions: list[int] | None = None) -> torch.Tensor:
    """(B, T-1) per-token loss; entry t is the loss of predicting tokens[:, t+1] from tokens[:, :t+1].

    Olsson et al. (2022) compare these vectors across checkpoints (PCA of per-token losses
    on a fixed set of examples) to see the phase change as a turn in the trajectory.
    ``logits``: the model's (B, T, vocab) logits on ``tokens`` when a forward already made
    them (then the model is not run again, and the loss keeps their gradient: the LLC's SGLD
    steps differentiate it); without them the forward runs without gradients, as every score here.
    ``positions``: entries t of the loss vector only, (B, len(positions)), from ``logits``
    (B, len(positions), vocab) made at those positions alone (a forward that unembeds a few
    positions: T / len(positions) times less of the unembedding's vocab x C work per token).
    """
    if positions is not None:
        if logits is None:
            raise ValueError("positions= needs the logits made at those positions")
        targets = tokens[:, [t + 1 for t in positions]]
        return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    if logits is None:
        with torch.no_grad():
            logits, _ = model(tokens)
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")


def icl_positions(block_size: int) -> tuple[int, int]:
    """(early, late) indices into the per-token loss vector for the ICL score.

    Olsson et al. (2022) use token 500 minus token 50 in a context of 8192; here the late
    position is the last one a block can predict (``block_size - 2``) and the early one a
    tenth of it (the paper's 50:500 ratio), at least 1.
    """
    if block_size < 4:
        raise ValueError(f"block_size {block_size} too small for an in-context-learning score")
    late = block_size - 2
    return max(1, round(late / 10)), late


@torch.no_grad()
def icl_score(model, tokens: torch.Tensor, early: int, late: int) -> float:
    """In-context-learning score (Olsson et al. 2022): loss at ``late`` minus loss at ``early``.

    Positions index the per-token loss vector (``per_token_losses``), averaged over the
    batch of real-text ``tokens``. Negative = the model predicts better later in the
    context, i.e. it uses the context; 0 = no in-context learning. No fixed perfect value:
    it is bounded below by minus the early loss.
    """
    return icl_score_from_losses(per_token_losses(model, tokens), early, late)


def icl_score_from_losses(loss: torch.Tensor, early: int, late: int) -> float:
    """The ICL score from per-token losses (B, T-1) (``per_token_losses``)."""
    if not 0 <= early < late < loss.shape[1]:
        raise ValueError(f"need 0 <= early < late < {loss.shape[1]}, got early={early}, late={late}")
    return (loss[:, late].mean() - loss[:, early].mean()).item()


def earlier_match_masks(tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where copying from earlier in the context could help: (predictive, misleading) masks.

    Both are (B, T-1) bool, aligned with ``per_token_losses`` (entry t predicts
    ``tokens[:, t+1]``). At t, look for earlier positions j < t whose last ``k`` tokens equal
    the ``k`` tokens ending at t (an induction head's prefix match, of length k). ``predictive``:
    at least one such match is followed by ``tokens[:, t+1]``, so an exact copier would be
    right; ``misleading``: matches exist but none is followed by it, so copying can only hurt.
    The share of each at the ICL score's late position bounds what an induction head can do
    to the ICL score on a given text (docs/phase_change.md).
    """
    B, T = tokens.shape
    if not 1 <= k < T - 1:
        raise ValueError(f"need 1 <= k < {T - 1}, got k={k}")
    windows = tokens.unfold(1, k, 1)  # (B, T-k+1, k): window w covers tokens w .. w+k-1
    same = (windows[:, :, None, :] == windows[:, None, :, :]).all(-1)  # (B, W, W)
    nxt = tokens[:, k:]  # (B, T-k): the token after window w
    n = nxt.shape[1]
    match = same[:, :n, :n] & torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril(-1)
    same_next = nxt[:, :, None] == nxt[:, None, :]  # (B, n, n)
    predictive = torch.zeros(B, T - 1, dtype=torch.bool, device=tokens.device)
    misleading = torch.zeros_like(predictive)
    has_match = match.any(-1)  # window w ends at t = w + k - 1
    predictive[:, k - 1:] = (match & same_next).any(-1)
    misleading[:, k - 1:] = has_match & ~predictive[:, k - 1:]
    return predictive, misleading
