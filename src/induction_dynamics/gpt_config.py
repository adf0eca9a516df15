"""nanoGPT's ``GPTConfig``, apart from ``model.py`` so that the Hydra schema (``config.ModelConfig``
extends it) composes and validates without importing torch; ``model.GPTConfig`` is this class."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2 vocab_size of 50257, padded up to nearest multiple of 64 for efficiency
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # True: bias in Linears and LayerNorms, like GPT-2. False: a bit better and faster
    attn_only: bool = False  # True: blocks without MLP (Olsson et al.'s attention-only models)
