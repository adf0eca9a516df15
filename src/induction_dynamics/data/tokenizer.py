"""Tokenizers: characters, byte-level BPE (Hugging Face ``tokenizers``), or bare GPT-2 ids.

Every tokenizer has the same small interface: ``vocab_size``, ``encode(str) -> list[int]``,
``decode(ids) -> str``, ``token_strings()`` (one readable label per id, for plots and the
logit lens), ``state()`` (plain dicts and strings: what a checkpoint stores) and
``fingerprint`` (sha256 of the state). A checkpoint carries its tokenizer's state, so
``tokenizer_from_checkpoint(ckpt)`` decodes its tokens without the training data.

- ``CharTokenizer``: nanoGPT's ``shakespeare_char`` vocabulary, id -> character (itos).
- ``BPETokenizer``: a byte-level BPE trained offline by ``train_bpe`` on the training text
  only (GPT-2's byte-to-unicode alphabet and pre-tokenizer regex, no special tokens), so
  ``decode(encode(text)) == text`` for any text.
- ``GPT2Ids``: nanoGPT's prepared GPT-2 datasets without their tokenizer (tiktoken's merges
  are a download, and nothing here touches the network): tokens are known by id only and
  decode to ``<id>`` labels; encoding text is impossible and says so.
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property, lru_cache

from induction_dynamics.errors import TokenizerError, one_line

GPT2_VOCAB_SIZE = 50257  # nanoGPT's openwebtext / shakespeare prepare.py: tiktoken's "gpt2"
BPE_MIN_VOCAB, BPE_MAX_VOCAB = 257, 65535  # above the 256 byte tokens; ids must fit uint16 files
TOKENIZER_JSON_MAX_BYTES = 32 << 20  # a 65,535-token BPE's tokenizer.json is ~3 MB, GPT-2's 1.4 MB


def _fingerprint(state: dict) -> str:
    return hashlib.sha256(json.dumps(state, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class CharTokenizer:
    """One token per character; ``itos[i]`` is the character of id ``i``."""

    kind = "char"

    def __init__(self, itos: list[str]):
        self.itos = list(itos)
        self.stoi = {ch: i for i, ch in enumerate(self.itos)}

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise TokenizerError(f"character {e.args[0]!r} is not in the {self.vocab_size}-character "
                                 "vocabulary") from None

    def decode(self, ids) -> str:
        return "".join(self.itos[int(i)] for i in _id_list(ids))

    def token_strings(self) -> list[str]:
        return list(self.itos)

    def state(self) -> dict:
        return {"kind": self.kind, "itos": list(self.itos)}

    @cached_property
    def fingerprint(self) -> str:
        return _fingerprint(self.state())


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's ``bytes_to_unicode`` inverted: the printable stand-in character -> its byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class BPETokenizer:
    """A trained byte-level BPE (a ``tokenizers.Tokenizer``), stored as its JSON."""

    kind = "bpe"

    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer  # imported here: char-only runs never need it
        try:
            self._tok = Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # the Rust side raises its own exception type
            raise TokenizerError(f"not a Hugging Face tokenizer JSON ({one_line(e)})") from None
        self.json = tokenizer_json

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids) -> str:
        return self._tok.decode(_id_list(ids), skip_special_tokens=False)

    def token_strings(self) -> list[str]:
        """Each token's bytes as text; a token that is part of a UTF-8 character shows ``\\xNN``."""
        bd = _byte_decoder()
        out = []
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            raw = bytes(bd[c] for c in piece) if all(c in bd for c in piece) else piece.encode()
            out.append(raw.decode("utf-8", errors="backslashreplace"))
        return out

    def state(self) -> dict:
        return {"kind": self.kind, "json": self.json}

    @cached_property
    def fingerprint(self) -> str:
        return _fingerprint(self.state())


class GPT2Ids:
    """GPT-2 token ids with no merges at hand: ids decode to ``<id>`` labels only."""

    kind = "gpt2"

    def __init__(self, vocab_size: int = GPT2_VOCAB_SIZE):
        self._vocab_size = int(vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        raise TokenizerError("GPT-2 token ids without GPT-2's merges (a download) cannot encode text; "
                             "put a tokenizer.json (Hugging Face format) next to train.bin")

    def decode(self, ids) -> str:
        return "".join(f"<{int(i)}>" for i in _id_list(ids))

    def token_strings(self) -> list[str]:
        return [f"<{i}>" for i in range(self._vocab_size)]

    def state(self) -> dict:
        return {"kind": self.kind, "vocab_size": self._vocab_size}

    @cached_property
    def fingerprint(self) -> str:
        return _fingerprint(self.state())


Tokenizer = CharTokenizer | BPETokenizer | GPT2Ids


def _id_list(ids) -> list[int]:
    if hasattr(ids, "flatten"):  # torch tensor or numpy array
        ids = ids.flatten().tolist()
    return [int(i) for i in ids]


def from_state(state) -> Tokenizer:
    """The tokenizer a ``state()`` dict describes; a malformed one is a one-line TokenizerError."""
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind == "char" and isinstance(state.get("itos"), list) and all(isinstance(c, str) for c in state["itos"]):
        return CharTokenizer(state["itos"])
    if kind == "bpe" and isinstance(state.get("json"), str):
        return BPETokenizer(state["json"])
    if kind == "gpt2" and isinstance(state.get("vocab_size"), int):
        return GPT2Ids(state["vocab_size"])
    raise TokenizerError(f"not a tokenizer state (kind {kind!r}); expected char, bpe or gpt2")


def tokenizer_from_checkpoint(ckpt: dict) -> Tokenizer:
    """The vocabulary a checkpoint was trained with: its ``tokenizer`` entry, else its ``vocab``
    list (character checkpoints written before tokenizers travelled with them).

    A checkpoint with neither (a plain nanoGPT ``ckpt.pt``) is a one-line TokenizerError:
    its vocabulary lives in the data folder, which the caller must name.
    """
    if ckpt.get("tokenizer") is not None:
        return from_state(ckpt["tokenizer"])
    vocab = ckpt.get("vocab")
    if isinstance(vocab, list) and vocab and all(isinstance(c, str) for c in vocab):
        return CharTokenizer(vocab)
    raise TokenizerError("the checkpoint carries no vocabulary (a plain nanoGPT checkpoint?); name its data "
                         "folder, e.g. data_dir=<folder with train.bin, val.bin and meta.pkl>")


def train_bpe(text_chunks, vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE of ``vocab_size`` tokens on ``text_chunks`` (an iterable of str).

    GPT-2's scheme: the text is split by GPT-2's pre-tokenizer regex and mapped to bytes
    (256 base tokens, so every text encodes, and decodes back exactly), then the most
    frequent adjacent pairs are merged until the vocabulary is full. No special tokens.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    if not BPE_MIN_VOCAB <= vocab_size <= BPE_MAX_VOCAB:
        raise TokenizerError(f"a byte-level BPE needs {BPE_MIN_VOCAB} <= vocab_size <= {BPE_MAX_VOCAB}, got {vocab_size}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(text_chunks, trainer)
    return BPETokenizer(tok.to_str())
