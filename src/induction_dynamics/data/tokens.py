"""A run's token streams (``TokenData``) and how text becomes tokens: characters or a byte-level BPE.

``tokenize`` turns the two splits of a text into token id streams; a BPE is trained on the
training split only (``tokenizer.train_bpe``). Where the text comes from: ``sources.py``;
the cache that keeps the result: ``cache.py``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from induction_dynamics.data.tokenizer import BPETokenizer, CharTokenizer, train_bpe
from induction_dynamics.errors import DataError

log = logging.getLogger(__name__)


@dataclass(eq=False)  # tensors have no single truth value: compare fields yourself
class TokenData:
    train: torch.Tensor | np.ndarray  # (N,) token ids: int64 tensor, or a uint16 memmap (data=nanogpt)
    val: torch.Tensor | np.ndarray    # (M,) token ids
    tokenizer: CharTokenizer | BPETokenizer | object  # tokenizer.py's interface
    counts: torch.Tensor              # (V,) int64 frequency of each token in train
    source: dict = field(default_factory=dict)  # provenance: source and tokenizer sha256, ...

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @cached_property
    def vocab(self) -> list[str]:
        """One label per token id (the character itself for a character vocabulary)."""
        return self.tokenizer.token_strings()

    @property
    def stoi(self) -> dict[str, int]:
        return self.tokenizer.stoi

    def encode(self, s: str) -> torch.Tensor:
        """(n,) int64 token ids; text the vocabulary cannot encode is a TokenizerError."""
        return torch.tensor(self.tokenizer.encode(s), dtype=torch.long)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def checkpoint_entries(self) -> dict:
        """What every checkpoint stores about the data (plain types: weights_only-loadable)."""
        return {"vocab": None if self.tokenizer.kind == "gpt2" else list(self.vocab),
                "tokenizer": self.tokenizer.state(), "token_counts": self.counts.tolist(),
                "data_source": dict(self.source)}


def from_tokens(tokens: torch.Tensor, vocab: list[str], val_frac: float) -> TokenData:
    n_train = int(len(tokens) * (1 - val_frac))  # nanoGPT: first 90% train, last 10% val
    train, val = tokens[:n_train], tokens[n_train:]
    counts = torch.bincount(train, minlength=len(vocab))
    return TokenData(train=train, val=val, tokenizer=CharTokenizer(vocab), counts=counts)


def _char_ids(text: str, vocab: list[str]) -> torch.Tensor:
    # vocab is sorted by code point, so a character's id is its rank among the vocab's code points
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)          # (N,)
    tokens = np.searchsorted(np.array([ord(c) for c in vocab], dtype=np.uint32), codes)
    return torch.from_numpy(tokens.astype(np.int64))


def chunks(text: str, size: int = 1 << 16) -> list[str]:
    """``text`` cut after a newline about every ``size`` characters (the pieces join back to it)."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def _bpe_ids(tok: BPETokenizer, text: str) -> torch.Tensor:
    ids = [np.asarray(c, dtype=np.int64) for c in tok.encode_batch(chunks(text))]
    return torch.from_numpy(np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64))


def tokenize(train_text: str, val_text: str, tokenizer: str, vocab_size, meta: dict) -> TokenData:
    """Token streams of the two splits; a BPE is trained on ``train_text`` only."""
    if tokenizer == "bpe":
        t0 = time.perf_counter()
        tok = train_bpe(chunks(train_text), vocab_size)
        meta["tokenizer_train_s"] = round(time.perf_counter() - t0, 3)
        log.info("trained a %d-token byte-level BPE on %d characters in %.1f s", tok.vocab_size, len(train_text),
                 meta["tokenizer_train_s"])
        train, val = _bpe_ids(tok, train_text), _bpe_ids(tok, val_text)
    else:
        chars = sorted(set(train_text) | set(val_text))
        if len(chars) > np.iinfo(np.uint16).max:
            raise DataError(f"the text has {len(chars)} distinct characters; uint16 token files hold at most 65535")
        tok = CharTokenizer(chars)
        train, val = _char_ids(train_text, chars), _char_ids(val_text, chars)
    meta["tokenizer"] = tok.kind
    return TokenData(train=train, val=val, tokenizer=tok, counts=torch.bincount(train, minlength=tok.vocab_size))
