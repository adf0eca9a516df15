"""Attention patterns, per-head scores, and finding induction heads.

    patterns = attention_patterns(model, tokens)             # (n_layer, B, n_head, T, T)
    heads = find_induction_heads(model, threshold=0.4)        # [(layer, head, score), ...]
    scores = head_scores(model, allowed=repeat_token_ids(V))   # {'induction': (L, H), ...}
    fig = plot_head_scores(scores["induction"], title="induction score")
    fig = plot_attention_pattern(patterns[1, 0, 2], labels=list("abc..."))

The score definitions live in ``metrics`` (re-exported here) and cite their sources.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from induction_dynamics.files import save_figure
from induction_dynamics.interpretability.metrics import (  # noqa: F401  (re-exported API)
    copying_scores,
    duplicate_token_scores,
    induction_score_from_pattern,
    induction_scores,
    ov_copying_scores,
    prefix_matching_scores,
    previous_token_scores,
    repeat_token_ids,
    repeated_random_tokens,
)
from induction_dynamics.interpretability.utils import attention_patterns  # noqa: F401  (re-exported API)

SCORE_NAMES = ("induction", "prefix_matching", "previous_token", "duplicate_token", "copying", "ov_copying")


@torch.no_grad()
def head_scores(model, *, allowed: torch.Tensor | None = None, text_tokens: torch.Tensor | None = None,
                seq_len: int = 20, prefix_seq_len: int = 25, batch: int = 16,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Every per-head score at once: ``{name: (n_layer, n_head)}`` for ``SCORE_NAMES``.

    Prompts are drawn from ``allowed`` (default the whole vocabulary): ``[x, x]`` with
    ``seq_len`` distinct tokens for induction / duplicate / copying, 4 x ``prefix_seq_len``
    for prefix matching (both capped by the block size and the number of allowed tokens).
    ``text_tokens`` (real text) is used for the previous-token score; without it the
    induction prompt stands in (its tokens are random, so i-1 is still well defined).
    """
    V, block = model.config.vocab_size, model.config.block_size
    allowed = torch.arange(V) if allowed is None else allowed
    seq_len = min(seq_len, len(allowed), block // 2)
    prefix_seq_len = min(prefix_seq_len, len(allowed), block // 4)
    device = next(model.parameters()).device
    rep = repeated_random_tokens(allowed, seq_len, batch, 2, generator).to(device)
    rep4 = repeated_random_tokens(allowed, prefix_seq_len, batch, 4, generator).to(device)
    text = rep if text_tokens is None else text_tokens.to(device)
    return {
        "induction": induction_scores(model, rep, seq_len),
        "prefix_matching": prefix_matching_scores(model, rep4, prefix_seq_len),
        "previous_token": previous_token_scores(model, text),
        "duplicate_token": duplicate_token_scores(model, rep, seq_len),
        "copying": copying_scores(model, rep),
        "ov_copying": ov_copying_scores(model),
    }


def scores_dataframe(scores: dict[str, torch.Tensor]):
    """Tidy table (layer, head, metric, value) of ``head_scores``'s dict."""
    import pandas as pd

    rows = [(l, h, name, float(v)) for name, t in scores.items()
            for l, row in enumerate(t.tolist()) for h, v in enumerate(row)]
    return pd.DataFrame(rows, columns=["layer", "head", "metric", "value"])


@torch.no_grad()
def find_induction_heads(model, tokens: torch.Tensor | None = None, seq_len: int | None = None,
                         threshold: float = 0.4, allowed: torch.Tensor | None = None, batch: int = 16,
                         generator: torch.Generator | None = None) -> list[tuple[int, int, float]]:
    """Heads whose induction score is >= ``threshold``: ``[(layer, head, score), ...]``, best first.

    Without ``tokens``, draws the ``[x, x]`` prompt from ``allowed`` (default: the whole
    vocabulary) with ``seq_len`` = min(20, block_size // 2, len(allowed)) distinct tokens.
    A perfect induction head scores 1.0; a uniform one about 1/position (see metrics).
    """
    if tokens is None:
        allowed = torch.arange(model.config.vocab_size) if allowed is None else allowed
        seq_len = seq_len or min(20, model.config.block_size // 2, len(allowed))
        tokens = repeated_random_tokens(allowed, seq_len, batch, 2, generator)
        tokens = tokens.to(next(model.parameters()).device)
    elif seq_len is None:
        seq_len = tokens.shape[1] // 2
    scores = induction_scores(model, tokens, seq_len)
    found = [(l, h, float(scores[l, h])) for l in range(scores.shape[0]) for h in range(scores.shape[1])
             if scores[l, h] >= threshold]
    return sorted(found, key=lambda x: -x[2])


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)  # Agg canvas: no pyplot state, works headless
    return fig


def plot_attention_pattern(pattern: torch.Tensor, labels: Sequence[str] | None = None, title: str = "",
                           ax=None, save_path=None):
    """Heat map of one head's pattern (T, T): rows = query (destination), columns = key (source)."""
    fig = ax.figure if ax is not None else _figure((5, 4.5))
    ax = ax or fig.add_subplot(111)
    im = ax.imshow(pattern.detach().cpu().float().numpy(), cmap="Blues", vmin=0, vmax=1)
    if labels is not None and len(labels) <= 64:
        ticks = list(range(len(labels)))
        ax.set_xticks(ticks, labels, fontsize=6, rotation=90)
        ax.set_yticks(ticks, labels, fontsize=6)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    if save_path is not None:
        save_figure(fig, save_path, dpi=100, bbox_inches="tight")
    return fig


def plot_attention_heads(model, tokens: torch.Tensor, heads: Sequence[tuple[int, int]] | None = None,
                         labels: Sequence[str] | None = None, save_path=None):
    """A grid of patterns of the chosen ``(layer, head)`` pairs (default all) on one sequence."""
    if tokens.dim() == 1:
        tokens = tokens[None]
    L, H = model.config.n_layer, model.config.n_head
    heads = [(l, h) for l in range(L) for h in range(H)] if heads is None else list(heads)
    patterns = attention_patterns(model, tokens[:1])  # (L, 1, nh, T, T)
    cols = min(4, len(heads))
    rows = -(-len(heads) // cols)
    fig = _figure((3.2 * cols, 3 * rows))
    for i, (l, h) in enumerate(heads):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(patterns[l, 0, h].cpu().numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"L{l}H{h}", fontsize=9)
        if labels is not None and len(labels) <= 32:
            ax.set_xticks(range(len(labels)), labels, fontsize=5)
            ax.set_yticks(range(len(labels)), labels, fontsize=5)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    if save_path is not None:
        save_figure(fig, save_path, dpi=100)
    return fig


def plot_head_scores(scores: torch.Tensor, title: str = "", vmin: float | None = 0.0, vmax: float | None = 1.0,
                     ax=None, save_path=None):
    """Heat map of an (n_layer, n_head) score tensor with the values written in."""
    fig = ax.figure if ax is not None else _figure((1.0 + 0.8 * scores.shape[1], 0.8 + 0.6 * scores.shape[0]))
    ax = ax or fig.add_subplot(111)
    data = scores.detach().cpu().float()
    im = ax.imshow(data.numpy(), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    for l in range(data.shape[0]):
        for h in range(data.shape[1]):
            ax.text(h, l, f"{data[l, h]:.2f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(data.shape[1]))
    ax.set_yticks(range(data.shape[0]))
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    if save_path is not None:
        save_figure(fig, save_path, dpi=100, bbox_inches="tight")
    return fig
