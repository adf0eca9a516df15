"""Text <-> token ids with the vocabulary a checkpoint carries.

Every place that turns a checkpoint's token ids into text (``sample.py``, the labels of
attention-pattern figures) goes through ``Vocab.from_checkpoint``. The vocabulary itself is
the checkpoint's tokenizer (``tokenizer.tokenizer_from_checkpoint``: characters, a byte-level
BPE, or bare GPT-2 ids); a new kind of tokenizer is added in tokenizer.py and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterable

from induction_dynamics.data.tokenizer import CharTokenizer, tokenizer_from_checkpoint
from induction_dynamics.errors import CheckpointError, DataError, TokenizerError

# how a character is drawn as a plot label: whitespace made visible
_LABELS = {"\n": "\\n", " ": "␣", "\t": "\\t", "\r": "\\r"}


class Vocab:
    """A checkpoint's tokenizer: ``encode(str) -> [id, ...]``, ``decode(ids) -> str``, ``labels(ids)``.

    ``tokenizer``: a tokenizer.py tokenizer, or a character list ``itos``.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer if hasattr(tokenizer, "decode") else CharTokenizer(list(tokenizer))
        self.itos = self.tokenizer.token_strings()  # a label per id (the character itself for characters)

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> Vocab:
        """The vocabulary saved with a checkpoint; CheckpointError (one line) when it has none."""
        try:
            return cls(tokenizer_from_checkpoint(ckpt))
        except TokenizerError as e:
            raise CheckpointError(f"{e}: its tokens cannot be turned into text") from None

    @property
    def stoi(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.itos)}

    def __len__(self) -> int:
        return self.tokenizer.vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; text the vocabulary cannot encode is a DataError naming why."""
        if self.tokenizer.kind == "char":
            stoi = self.tokenizer.stoi
            missing = sorted({c for c in text if c not in stoi})
            if missing:
                shown = ", ".join(repr(c) for c in missing[:5]) + (", ..." if len(missing) > 5 else "")
                raise DataError(f"character(s) {shown} not in the checkpoint's {len(self)}-character vocabulary")
        return self.tokenizer.encode(text)  # a TokenizerError is a DataError

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(ids)

    def labels(self, ids: Iterable[int]) -> list[str]:
        """One readable label per token (whitespace made visible), for plot axes."""
        if hasattr(ids, "tolist"):
            ids = ids.reshape(-1).tolist()
        return ["".join(_LABELS.get(c, c) for c in self.itos[int(i)]) for i in ids]
