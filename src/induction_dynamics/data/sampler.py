"""Training batches: random windows of a token stream, with the repeat curriculum written in.

``BatchSampler`` is nanoGPT's ``get_batch`` with a private generator: its state is the whole
data position, so a resumed run draws exactly the batches it would have drawn.
"""

from __future__ import annotations

import numpy as np
import torch

from induction_dynamics.data.curriculum import insert_repeats
from induction_dynamics.errors import DataError


def windows(tokens, starts, length: int) -> torch.Tensor:
    """(len(starts), length) int64 windows of a token stream, a tensor or a uint16 memmap
    (only the windows are read from it)."""
    idx = torch.as_tensor(starts, dtype=torch.long)[:, None] + torch.arange(length)  # (B, length)
    if isinstance(tokens, torch.Tensor):
        return tokens[idx].long()
    return torch.from_numpy(np.asarray(tokens[idx.numpy()], dtype=np.int64))


CURRICULUM_KEYS = ("repeat_frac", "repeat_kind", "repeat_min", "repeat_max")


def curriculum_args(data_cfg) -> dict:
    """``BatchSampler``'s repeat keyword arguments from a run's data config (``cfg.data``, or
    a checkpoint's ``config["data"]``); keys the config lacks keep the sampler's defaults
    (no curriculum), so the trainer and the analysis draw repeats the same way."""
    return {k: data_cfg[k] for k in CURRICULUM_KEYS if k in data_cfg and data_cfg[k] is not None}


class BatchSampler:
    """Random windows of a token stream, nanoGPT's ``get_batch`` with a private generator.

    Each ``sample()`` draws ``batch_size`` start offsets uniformly, takes windows of
    ``block_size + 1`` tokens, optionally writes repeats into a fraction ``repeat_frac`` of
    them (``curriculum.insert_repeats``), and returns inputs and next-token targets.
    Every random number comes from ``self.generator``: its state (``state_dict``) is the
    whole data position, so a resumed run draws exactly the batches it would have drawn.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, block_size: int, seed: int,
                 repeat_frac: float = 0.0, repeat_kind: str = "random", repeat_min: int = 10,
                 repeat_max: int = 26, allowed_ids: torch.Tensor | None = None,
                 token_weights: torch.Tensor | None = None):
        if data.ndim != 1:
            raise DataError(f"the token stream must be 1-D, got shape {tuple(data.shape)}")
        if batch_size < 1 or block_size < 1:
            raise DataError(f"batch_size and block_size must be positive, got {batch_size}, {block_size}")
        if len(data) < block_size + 1:
            raise DataError(f"the token stream has {len(data)} tokens, fewer than block_size + 1 = {block_size + 1}")
        if not 0.0 <= repeat_frac <= 1.0:
            raise DataError(f"repeat_frac must lie in [0, 1], got {repeat_frac}")
        self.data = data.long() if isinstance(data, torch.Tensor) else data  # a memmap stays one
        self.batch_size, self.block_size, self.seed = batch_size, block_size, seed
        self.repeat = dict(frac=float(repeat_frac), kind=repeat_kind, min_len=repeat_min, max_len=repeat_max,
                           allowed_ids=allowed_ids, token_weights=token_weights)
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: (batch_size, block_size) int64, y[:, t] = the token after x[:, t]."""
        ix = torch.randint(len(self.data) - self.block_size, (self.batch_size,), generator=self.generator)
        w = windows(self.data, ix, self.block_size + 1)  # (B, T+1)
        if self.repeat["frac"] > 0:
            w = insert_repeats(w, self.generator, **self.repeat)
        self.batches_drawn += 1
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def state_dict(self) -> dict:
        """Tensors and ints only: safe for ``torch.load(weights_only=True)``."""
        return {"generator": self.generator.get_state(), "seed": self.seed,
                "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        g = state.get("generator") if isinstance(state, dict) else None
        if not isinstance(g, torch.Tensor) or g.dtype != torch.uint8:
            raise DataError("not a BatchSampler state: expected a dict with a uint8 'generator' tensor")
        self.generator.set_state(g.clone())
        self.batches_drawn = int(state.get("batches_drawn", 0))
