"""Shared fixtures for the interpretability tests: a hand-built induction circuit and a
tiny model trained for real (~5 s) until it completes repeated sequences."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from induction_dynamics.interpretability.metrics import repeated_random_tokens
from induction_dynamics.interpretability.toy_circuits import hand_built_induction_model
from induction_dynamics.model import GPT, GPTConfig

os.environ.setdefault("WANDB_MODE", "offline")

HAND_VOCAB, HAND_BLOCK = 32, 32


@pytest.fixture(scope="session")
def hand_model() -> GPT:
    """L0H0 previous-token head, L1H0 induction head, L0H1/L1H1 controls (see toy_circuits)."""
    return hand_built_induction_model(HAND_VOCAB, HAND_BLOCK)


# ---------------------------------------------------------------------------------------
# A tiny attention-only model trained on repeated random tokens
# ---------------------------------------------------------------------------------------

@dataclass
class Trained:
    model: GPT
    checkpoint: str  # nanoGPT-format file {'model', 'model_args'}
    seq_len: int
    allowed: torch.Tensor


TRAIN_ARGS = dict(block_size=24, vocab_size=32, n_layer=2, n_head=4, n_embd=32, dropout=0.0,
                  bias=False, attn_only=True)


def train_tiny_induction_model(iters: int = 300, seed: int = 0) -> GPT:
    """AdamW on ``[x, x]`` sequences (12 distinct tokens repeated), ~5 s on one thread.

    By ~200 iterations the second copy's loss is near 0 and two layer-0 heads score ~0.85 on
    the induction prompts. With the repeat always at the same offset they are *positional*
    heads (attend 11 back), not content-based induction heads: the notebook shows how to
    tell. For the tests that is fine: a real trained model with heads that carry the answer.
    """
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**TRAIN_ARGS))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.arange(TRAIN_ARGS["vocab_size"])
    seq_len = TRAIN_ARGS["block_size"] // 2
    for _ in range(iters):
        x = repeated_random_tokens(allowed, seq_len, 32, generator=gen)  # (32, 24)
        _, loss = model(x[:, :-1], x[:, 1:].contiguous())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Trained:
    model = train_tiny_induction_model()
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_args": dict(TRAIN_ARGS)}, path)
    return Trained(model, str(path), TRAIN_ARGS["block_size"] // 2, torch.arange(TRAIN_ARGS["vocab_size"]))
