"""Logit lens (nostalgebraist 2020): decode the residual stream after every block.

The residual stream after the embedding and after each block is sent through the model's
own final layer norm and unembedding, as if the remaining blocks were skipped:

    lens = logit_lens(model, tokens, target_position=-1, top_k=5, itos=vocab)
    lens.target_probs          # (n_layer + 1,) probability of the target token, embedding first
    lens.predictions_by_layer  # [[(token, prob), ...] per layer], best first
    measure_convergence(lens)  # {'convergence_layer': 2, 'stability': 1.0, ...}

The last entry is exactly the model's output distribution (same ln_f, same lm_head).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from induction_dynamics.files import save_figure
from induction_dynamics.interpretability.utils import HookManager, has_hooks


@dataclass
class LogitLens:
    """Logit-lens readout at one position for a batch; layer 0 is the embedding.

    probs (n_layer+1, B, V); target (B,); target_probs / target_ranks (n_layer+1,) are
    batch means (rank 0 = top prediction) of ``target_prob_rows`` / ``target_rank_rows``
    (n_layer+1, B); ``predictions_by_layer`` lists the top-k ``(token, prob)`` of example
    ``example`` (token = string when ``itos`` was given).
    """

    layer_names: list[str]
    probs: torch.Tensor
    target: torch.Tensor
    target_position: int
    target_probs: torch.Tensor
    target_ranks: torch.Tensor
    predictions_by_layer: list[list[tuple]]
    top_k: int
    example: int = 0
    itos: Sequence[str] | None = field(default=None, repr=False)
    target_prob_rows: torch.Tensor | None = field(default=None, repr=False)
    target_rank_rows: torch.Tensor | None = field(default=None, repr=False)

    @property
    def n_layers(self) -> int:
        return len(self.layer_names)

    def token(self, idx: int):
        return self.itos[idx] if self.itos is not None else int(idx)


@torch.no_grad()
def residual_stack(model, tokens: torch.Tensor, position: int | None = None) -> tuple[list[str], torch.Tensor]:
    """(names, (n_layer+1, B, T, C)): the residual stream after the embedding and each block.

    ``position``: that position's only, (n_layer+1, B, C). The model is causal, so the forward
    then covers tokens up to ``position`` and its last block that position's query alone
    (unless a hook of yours is on the model: it sees the whole forward, as ``model(tokens)``).
    """
    L = model.config.n_layer
    names = ["transformer.h.0.hook_resid_pre"] + [f"transformer.h.{l}.hook_resid_post" for l in range(L)]
    labels = ["embed"] + [f"transformer.h.{l}" for l in range(L)]
    if position is None or has_hooks(model):
        _, cache = HookManager(model).run_with_cache(tokens, names_filter=names)
        resid = torch.stack([cache[n] for n in names])
        return labels, resid if position is None else resid[:, :, position]
    _, cache = HookManager(model).run_with_cache(tokens[:, :position % tokens.shape[1] + 1], names_filter=names,
                                                 last_only=True, stop_early=True)
    return labels, torch.stack([cache[n][:, -1] for n in names])


@torch.no_grad()
def logit_lens(model, tokens: torch.Tensor, target_position: int = -1, top_k: int = 5, target=None,
               itos: Sequence[str] | None = None, example: int = 0) -> LogitLens:
    """Decode every layer's residual stream at ``target_position`` through ln_f and lm_head.

    tokens (B, T) or (T,). ``target``: the token whose probability and rank are tracked, an
    int or (B,) ids; default the next token ``tokens[:, target_position + 1]`` when it
    exists, else the model's own final prediction. ``itos`` maps ids to strings for
    ``predictions_by_layer``.
    """
    if tokens.dim() == 1:
        tokens = tokens[None]
    B, T = tokens.shape
    pos = target_position % T
    names, x = residual_stack(model, tokens, pos)  # (n_layer+1, B, C)
    logits = model.lm_head(model.transformer.ln_f(x))  # (n_layer+1, B, V): the model's own head
    probs = logits.float().softmax(-1)
    if target is None:
        target = tokens[:, pos + 1] if pos + 1 < T else probs[-1].argmax(-1)
    target = torch.as_tensor(target, device=tokens.device, dtype=torch.long).expand(B)
    p_target = probs.gather(-1, target[None, :, None].expand(len(names), B, 1))  # (n_layer+1, B, 1)
    ranks = (probs > p_target).sum(-1)  # (n_layer+1, B): tokens strictly more likely
    k = min(top_k, probs.shape[-1])
    top = probs[:, example].topk(k, dim=-1)
    lens = LogitLens(names, probs, target, target_position, p_target[..., 0].mean(1),
                     ranks.float().mean(1), [], k, example, itos, p_target[..., 0], ranks.float())
    lens.predictions_by_layer = [[(lens.token(i), p) for i, p in zip(idx.tolist(), pr.tolist())]
                                 for idx, pr in zip(top.indices, top.values)]
    return lens


def measure_convergence(lens: LogitLens, threshold: float = 0.5) -> dict:
    """When does the lens settle on the final answer?

    ``convergence_layer``: the first layer (0 = embedding) from which the target's
    probability stays >= ``threshold`` through the last layer (-1 if it never does).
    ``stability``: fraction of layers whose top-1 prediction (of the lens's example)
    equals the final layer's. Also the final prediction and its probability.
    """
    probs = lens.target_probs.tolist()
    conv = -1
    for layer in range(len(probs) - 1, -1, -1):
        if probs[layer] < threshold:
            break
        conv = layer
    top1 = [preds[0][0] for preds in lens.predictions_by_layer]
    final, final_prob = lens.predictions_by_layer[-1][0]
    return {
        "convergence_layer": conv,
        "convergence_name": lens.layer_names[conv] if conv >= 0 else None,
        "converged": conv >= 0,
        "stability": sum(t == final for t in top1) / len(top1),
        "final_prediction": final,
        "final_prob": final_prob,
        "target_probs": probs,
    }


def plot_prediction_evolution(lens: LogitLens, num_predictions: int = 5, save_path=None, title: str | None = None):
    """Line plot: probability of the final layer's top ``num_predictions`` tokens at every layer.

    Returns a matplotlib Figure (Agg; no pyplot state, so it is safe in scripts and tests);
    writes it to ``save_path`` when given.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    probs = lens.probs[:, lens.example]  # (n_layer+1, V)
    top = probs[-1].topk(min(num_predictions, probs.shape[-1])).indices.tolist()
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    xs = range(lens.n_layers)
    for idx in top:
        ax.plot(xs, probs[:, idx].tolist(), marker="o", label=repr(lens.token(idx)))
    ax.set_xticks(list(xs), lens.layer_names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("probability")
    ax.set_title(title or f"logit lens at position {lens.target_position}")
    ax.legend(title="final top tokens", fontsize="small")
    fig.tight_layout()
    if save_path is not None:
        save_figure(fig, save_path, dpi=100)
    return fig
