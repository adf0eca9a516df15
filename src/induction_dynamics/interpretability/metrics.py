"""Metric definitions for induction heads (Olsson et al. 2022; TransformerLens conventions).

Probe data for a character vocabulary
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

from induction_dynamics.interpretability.utils import HookManager


def probe_token_ids(vocab_size: int, counts: torch.Tensor | None = None, drop_frac: float = 0.1) -> torch.Tensor:
    """Token ids for random probes: the vocabulary minus its rarest and most common entries.

    ``counts`` (vocab_size,) are token frequencies in the training text; ``drop_frac`` of the
    vocabulary is dropped at each end (Olsson et al. exclude the most and least common
    tokens). Without counts every token is allowed.
    """
    if counts is None:
        return torch.arange(vocab_size)
    order = torch.argsort(counts.float(), stable=True)  # rarest first
    k = int(vocab_size * drop_frac)
    kept = order[k: vocab_size - k]
    return torch.sort(kept).values


def repeated_random_tokens(allowed: torch.Tensor, seq_len: int, batch: int, n_repeats: int = 2,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch, n_repeats * seq_len) tokens: a random half of distinct tokens, repeated.

    Each half is a random draw *without replacement* from ``allowed``. ``n_repeats=2`` is the
    TransformerLens induction probe ``[x, x]``; ``n_repeats=4`` with ``seq_len=25`` is Olsson
    et al.'s prefix-matching probe.
    """
    if seq_len > len(allowed):
        raise ValueError(f"probe seq_len {seq_len} exceeds the {len(allowed)} allowed distinct tokens")
    halves = torch.stack([allowed[torch.randperm(len(allowed), generator=generator)[:seq_len]]
                          for _ in range(batch)])
    return halves.repeat(1, n_repeats)


def induction_score_from_pattern(pattern: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Induction score per head from attention patterns (..., n_head, T, T) of ``[x, x]``.

    TransformerLens convention: mean attention on the diagonal at offset ``1 - seq_len``,
    i.e. from each token of the second copy to the token *after* its first occurrence.
    Unlike TransformerLens's BOS-prefixed probe, only second-copy queries are averaged
    (positions seq_len .. 2*seq_len-1), so a perfect induction head scores exactly 1.0.
    Returns (..., n_head) averaged over the batch dimension if present.
    """
    stripe = pattern.diagonal(offset=1 - seq_len, dim1=-2, dim2=-1)[..., 1:seq_len + 1]  # (..., nh, seq_len)
    score = stripe.mean(-1)
    return score.mean(0) if score.dim() > 1 else score


@torch.no_grad()
def induction_scores(model, tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(n_layer, n_head) induction score of every head on ``tokens = [x, x]`` (see above)."""
    _, cache = HookManager(model).run_with_cache(tokens, names_filter="attn.hook_pattern")
    patterns = cache.stack("attn.hook_pattern")  # (n_layer, B, nh, T, T)
    return torch.stack([induction_score_from_pattern(p, seq_len) for p in patterns])


def per_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T-1) cross-entropy of predicting tokens[:, 1:] from logits[:, :-1]."""
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")


@torch.no_grad()
def repeated_sequence_loss(model, tokens: torch.Tensor, seq_len: int) -> tuple[float, float]:
    """Induction loss: mean loss on the first vs the second copy of ``[x, x]`` (nats).

    First copy: predictions of tokens 1 .. seq_len-1; second copy: of tokens
    seq_len+1 .. 2*seq_len-1 (the first token of the second copy is excluded: it is
    not predictable from context). An induction head drives the second toward 0.
    """
    logits, _ = model(tokens)
    loss = per_token_loss(logits, tokens)  # (B, 2L-1): loss[:, i] predicts token i+1
    first = loss[:, : seq_len - 1].mean().item()
    second = loss[:, seq_len: 2 * seq_len - 1].mean().item()
    return first, second
