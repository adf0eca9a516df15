"""Token streams for training and analysis: sources, tokenizers, the token cache, batches.

    data = load_run_data(cfg.data)            # TokenData: train/val token ids, tokenizer, counts
    sampler = BatchSampler(data.train, batch_size=32, block_size=64, seed=0, **curriculum_args(cfg.data))
    x, y = sampler.sample()                   # (B, T) inputs and next-token targets

Modules, in the order the tokens flow: ``sources`` (where the text comes from: ``shakespeare``,
``python_code``, ``nanogpt``, a text file, random tokens) -> ``tokens`` (text -> token ids with a
``tokenizer``) -> ``cache`` (built once, verified on every read) -> ``sampler`` (random windows,
the repeat ``curriculum`` written in). ``vocab`` turns a checkpoint's token ids back into text.
Imports nothing from training or analysis.
"""

from induction_dynamics.data.sampler import BatchSampler, curriculum_args, windows
from induction_dynamics.data.shakespeare import (
           convert_play,
           play_files,
           shakespeare_text,
)
from induction_dynamics.data.sources import load_data, load_run_data, synthetic_vocab
from induction_dynamics.data.tokens import TokenData

__all__ = ["BatchSampler", "TokenData", "convert_play", "curriculum_args", "load_data", "load_run_data",
           "play_files", "shakespeare_text", "synthetic_vocab", "windows"]
