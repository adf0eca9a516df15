"""The live induction monitor: watch induction heads form while the model trains.

Every ``monitor.every`` iterations the trainer runs the model on a fixed batch of repeated
random tokens ``[x, x]`` (``x``: ``seq_len`` *distinct* tokens drawn from the vocabulary
minus its rarest and most common characters, see ``interpretability.metrics``) and logs:

- ``monitor/induction_score/L{l}H{h}``: TransformerLens's induction score of each head, the
  mean attention from each token of the second copy to the token after its first
  occurrence (the diagonal at offset ``1 - seq_len``). A perfect induction head scores 1.0,
  a head attending uniformly about 1/position.
- ``monitor/induction_score_max``: the largest of them (the curve that jumps at the phase change).
- ``monitor/loss_first_copy`` / ``monitor/loss_second_copy``: mean next-token loss (nats) on the
  first and second copy. The first stays near ln(#tokens); an induction head drives the
  second toward 0 (Olsson et al. 2022, "in-context learning" on repeated tokens).

The monitor's tokens come from their own generator, so they are identical at every
measurement of a run, across seeds and after a resume, and the monitor never touches the
training RNG.
"""

from __future__ import annotations

import torch

from induction_dynamics.interpretability.metrics import (
    induction_scores,
    repeat_token_ids,
    repeated_random_tokens,
    repeated_sequence_loss,
)


class InductionMonitor:
    """Fixed ``[x, x]`` batch plus the metrics above, as a dict of W&B keys."""

    def __init__(self, vocab_size: int, counts: torch.Tensor | None, seq_len: int, batch_size: int,
                 seed: int = 1234, device: str | torch.device = "cpu"):
        self.seq_len = seq_len
        self.allowed = repeat_token_ids(vocab_size, counts)  # (n_allowed,)
        g = torch.Generator().manual_seed(seed)
        self.tokens = repeated_random_tokens(self.allowed, seq_len, batch_size, generator=g).to(device)  # (B, 2*seq_len)

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        """Metrics of ``model`` on the fixed batch; eval mode while measuring, previous mode after."""
        was_training = model.training
        model.eval()  # no dropout: the monitor measures the model, not a noisy sample of it
        try:
            scores = induction_scores(model, self.tokens, self.seq_len).float().cpu()  # (n_layer, n_head)
            first, second = repeated_sequence_loss(model, self.tokens, self.seq_len)
        finally:
            model.train(was_training)
        out = {"monitor/induction_score_max": scores.max().item(),
               "monitor/loss_first_copy": first,
               "monitor/loss_second_copy": second}
        for layer in range(scores.shape[0]):
            for head in range(scores.shape[1]):
                out[f"monitor/induction_score/L{layer}H{head}"] = scores[layer, head].item()
        return out
