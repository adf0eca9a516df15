"""A repeat curriculum: training windows that contain an exact repeat of earlier text.

Why: on character-level Shakespeare a small model trained on plain text forms no
induction head within a CPU budget (docs/phase_change.md). A one-character prefix is
ambiguous in English, so "attend to the token after the previous occurrence of the
current token" rarely pays off on natural text. Windows that contain an exact repeat make
that algorithm pay off, and the phase change arrives within a few thousand iterations.
The rest of each batch stays ordinary text, so the model still learns Shakespeare.

Kinds of repeat, written into a fraction ``frac`` of the rows of a (B, T+1) batch:

- ``"random"``: a segment of ``min_len..max_len`` *distinct* tokens drawn from
  ``allowed_ids``, written at a random position and immediately repeated once
  (the ``[x, x]`` of the TransformerLens induction prompt, embedded in text).
- ``"passage"``: a passage of ``min_len..max_len`` tokens of the row itself, copied to a
  random later position of the same row (Olsson et al.'s "repeated text"; it is what
  makes the head work on real text, where the in-context-learning score is measured).
- ``"mixed"``: each repeated row picks one of the two kinds with equal probability.
- ``"unigram"``: a segment of ``min_len..max_len`` tokens drawn independently, *with*
  replacement, from the text's own token frequencies ``token_weights``, written at a
  random position and immediately repeated once. Common characters (space, e, t) recur
  inside a segment as in English, so a one-character match is ambiguous and the head
  that forms has to match longer prefixes; that head also works on repeated text
  (docs/phase_change.md measures it).

All randomness comes from ``generator``, so a sampler that saves the generator state
resumes to exactly the same batches.
"""

from __future__ import annotations

import torch

from induction_dynamics.options import RepeatKind

KINDS = RepeatKind.values()


def _check(T1: int, frac: float, kind: str, min_len: int, max_len: int,
           allowed_ids: torch.Tensor | None) -> None:
    if kind not in KINDS:
        raise ValueError(f"repeat kind {kind!r} is not one of {', '.join(KINDS)}")
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"repeat fraction {frac} must lie in [0, 1]")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"repeat lengths need 1 <= min_len <= max_len, got {min_len}..{max_len}")
    if 2 * max_len > T1:
        raise ValueError(f"a repeat of up to {max_len} tokens twice does not fit a window of {T1} tokens "
                         f"(block_size + 1); lower repeat_max to {T1 // 2}")
    if kind in ("random", "mixed") and allowed_ids is not None and len(allowed_ids) < max_len:
        raise ValueError(f"repeat_max {max_len} exceeds the {len(allowed_ids)} allowed distinct tokens")


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """A uniform integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def insert_repeats(windows: torch.Tensor, generator: torch.Generator, *, frac: float,
                   kind: str = "random", min_len: int = 10, max_len: int = 26,
                   allowed_ids: torch.Tensor | None = None,
                   token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Return a copy of ``windows`` (B, T+1) in which about ``frac`` of the rows carry a repeat.

    Each row independently carries a repeat with probability ``frac``. ``allowed_ids``
    (1-D int64) are the tokens random segments are drawn from (use
    ``interpretability.metrics.repeat_token_ids``, the vocabulary without its rarest and
    most common characters); when ``None`` the distinct tokens present in ``windows`` are
    used. ``token_weights`` (V,) are the frequencies ``"unigram"`` segments are drawn from
    (the training split's token counts); when ``None`` those of ``windows``. The input
    tensor is not modified.
    """
    if windows.dim() != 2:
        raise ValueError(f"windows must be (B, T+1), got shape {tuple(windows.shape)}")
    B, T1 = windows.shape
    _check(T1, frac, kind, min_len, max_len, allowed_ids)
    out = windows.clone()
    if frac == 0.0:
        return out
    if kind == "unigram":
        return _insert_unigram(out, generator, frac, min_len, max_len, token_weights)
    if kind in ("random", "mixed"):
        pool = torch.unique(windows) if allowed_ids is None else allowed_ids.to(windows.dtype)
        if len(pool) < max_len:
            raise ValueError(f"repeat_max {max_len} exceeds the {len(pool)} distinct tokens available")
    chosen = torch.rand(B, generator=generator) < frac  # (B,) rows that get a repeat
    for b in torch.nonzero(chosen).flatten().tolist():
        row_kind = kind
        if kind == "mixed":
            row_kind = "random" if torch.rand(1, generator=generator).item() < 0.5 else "passage"
        L = _randint(min_len, max_len, generator)
        if row_kind == "random":
            start = _randint(0, T1 - 2 * L, generator)
            seg = pool[torch.randperm(len(pool), generator=generator)[:L]].to(out.device)  # (L,) distinct
            out[b, start:start + L] = seg
            out[b, start + L:start + 2 * L] = seg
        else:
            src = _randint(0, T1 - 2 * L, generator)
            dst = _randint(src + L, T1 - L, generator)  # the copy starts after the source ends
            out[b, dst:dst + L] = windows[b, src:src + L]
    return out


def _insert_unigram(out: torch.Tensor, generator: torch.Generator, frac: float, min_len: int, max_len: int,
                    token_weights: torch.Tensor | None) -> torch.Tensor:
    """The ``"unigram"`` kind, in place on ``out`` (B, T+1): per row, with probability
    ``frac``, a segment drawn from the token frequencies, written twice in a row."""
    B, T1 = out.shape
    weights = torch.bincount(out.flatten()) if token_weights is None else torch.as_tensor(token_weights)
    probs = weights.double() / weights.sum()
    for b in range(B):
        if torch.rand(1, generator=generator).item() >= frac:
            continue
        L = _randint(min_len, max_len, generator)
        start = _randint(0, T1 - 2 * L, generator)
        seg = torch.multinomial(probs, L, replacement=True, generator=generator).to(out.dtype)
        out[b, start:start + L] = seg
        out[b, start + L:start + 2 * L] = seg
    return out
