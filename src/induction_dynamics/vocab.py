"""Text <-> token ids with the vocabulary a checkpoint carries.

Every place that turns a checkpoint's token ids into text (``sample.py``, the labels of
attention-pattern figures) goes through ``Vocab.from_checkpoint``, so a new kind of
vocabulary saved with the checkpoint is decoded by adding it here and nowhere else.

Today a checkpoint holds ``checkpoint["vocab"]``: the list ``itos`` (token id -> character)
of a character-level run.
"""

from __future__ import annotations

from collections.abc import Iterable

from induction_dynamics.checkpoint import CheckpointError
from induction_dynamics.data import DataError

# how a character is drawn as a plot label: whitespace made visible
_LABELS = {"\n": "\\n", " ": "␣", "\t": "\\t", "\r": "\\r"}


class Vocab:
    """Character vocabulary: ``encode(str) -> [id, ...]``, ``decode(ids) -> str``, ``labels(ids)``."""

    def __init__(self, itos: list[str]):
        self.itos = list(itos)
        self.stoi = {ch: i for i, ch in enumerate(self.itos)}

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> Vocab:
        """The vocabulary saved with a checkpoint; CheckpointError (one line) when it has none."""
        itos = ckpt.get("vocab")
        if not itos:
            raise CheckpointError("the checkpoint carries no vocabulary (no 'vocab' entry): its tokens cannot be "
                                  "turned into text")
        return cls(itos)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; a character outside the vocabulary is a DataError naming it."""
        missing = sorted({c for c in text if c not in self.stoi})
        if missing:
            shown = ", ".join(repr(c) for c in missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise DataError(f"character(s) {shown} not in the checkpoint's {len(self)}-character vocabulary")
        return [self.stoi[c] for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        if hasattr(ids, "tolist"):  # a tensor or an array, any shape
            ids = ids.reshape(-1).tolist()
        return "".join(self.itos[int(i)] for i in ids)

    def labels(self, ids: Iterable[int]) -> list[str]:
        """One readable label per token (whitespace made visible), for plot axes."""
        if hasattr(ids, "tolist"):
            ids = ids.reshape(-1).tolist()
        return [_LABELS.get(t, t) for t in (self.itos[int(i)] for i in ids)]
