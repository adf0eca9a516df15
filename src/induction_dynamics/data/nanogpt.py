"""nanoGPT's prepared datasets: ``train.bin`` / ``val.bin`` of uint16 tokens, optional ``meta.pkl``.

A folder as nanoGPT's ``data/<name>/prepare.py`` leaves it::

    train.bin   uint16 token ids, the training split   (np.memmap: never read whole)
    val.bin     uint16 token ids, the validation split
    meta.pkl    character sets only: {"vocab_size": int, "itos": {id: str}, "stoi": {str: id}}

Without ``meta.pkl`` the tokens are GPT-2's (``tokenizer.GPT2_VOCAB_SIZE`` = 50,257 ids), or
those of a ``tokenizer.json`` (Hugging Face format) beside the .bin files, which is what this
project's own BPE cache holds. ``meta.pkl`` is a pickle: its opcodes are checked before
anything is unpickled (``untrusted.py``: plain-data opcodes only, memo indices and opcode count
bounded), it is built by an unpickler that imports nothing, and the result must be a tree of
plain dicts, lists, strings and ints; anything else is refused in one line, no code from the
file runs, and no file can ask for more than bounded time and memory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from induction_dynamics.data.tokenizer import (
    GPT2_VOCAB_SIZE,
    TOKENIZER_JSON_MAX_BYTES,
    BPETokenizer,
    CharTokenizer,
    GPT2Ids,
)
from induction_dynamics.errors import MetaError, RefusedFileError, TokenizerError
from induction_dynamics.untrusted import loads_json, loads_plain_pickle, read_capped

COUNT_EXACT_MAX = 1 << 26   # train.bin up to 64 M tokens is counted whole (~0.2 s)
COUNT_CHUNKS, COUNT_CHUNK = 64, 1 << 20  # larger ones: 64 evenly spaced 1 M-token chunks
FINGERPRINT_BYTES = 1 << 20


# A char meta.pkl is ~1 KB. A BPE-ish one, {id: str} and {str: id} over all 65,535 ids a uint16
# .bin can hold, is 1.5 MB and 328 k opcodes (protocol 4/5, nanoGPT's default; 459 k in protocol
# 0); longer strings add bytes, not opcodes. 16 MiB and 512 k opcodes hold that with room, and
# the scan, pure Python at ~1 us an opcode on a loaded core, stops within ~0.5 s.
META_MAX_BYTES = 16 << 20
META_MAX_OPCODES = 1 << 19
META_MAX_DEPTH = 5               # {"itos": {id: str}} is 2; nanoGPT's variants stay within 5


def load_meta(path: str | Path) -> dict:
    """nanoGPT's meta.pkl as a plain dict, read without running any code from the file and with
    bounded work (``untrusted.loads_plain_pickle``: size, opcodes, memo, depth, sharing)."""
    path = Path(path)
    try:
        raw = read_capped(path, META_MAX_BYTES, "meta.pkl")
        meta = loads_plain_pickle(raw, str(path), max_opcodes=META_MAX_OPCODES, max_depth=META_MAX_DEPTH,
                                  max_nodes=META_MAX_OPCODES)
    except RefusedFileError as e:
        raise MetaError(str(e)) from None
    if not isinstance(meta, dict):
        raise MetaError(f"refusing {path}: expected a dict of plain dicts, lists, strings and ints")
    return meta


def char_tokenizer_from_meta(meta: dict, path) -> CharTokenizer:
    """nanoGPT's ``itos`` ({id: char}) as a CharTokenizer; ids must be 0 .. vocab_size-1."""
    itos, n = meta.get("itos"), meta.get("vocab_size")
    if not isinstance(itos, dict) or not isinstance(n, int):
        raise MetaError(f"{path}: a character meta.pkl needs 'vocab_size' (int) and 'itos' ({{id: char}})")
    # the length first: set(range(n)) of a hostile vocab_size would not fit in memory
    if len(itos) != n or set(itos) != set(range(n)) or not all(isinstance(c, str) for c in itos.values()):
        raise MetaError(f"{path}: 'itos' must map every id 0..{n - 1} to a string")
    return CharTokenizer([itos[i] for i in range(n)])


def folder_tokenizer(folder: Path):
    """The folder's vocabulary: meta.pkl (characters), else tokenizer.json, else GPT-2's ids."""
    if (folder / "meta.pkl").is_file():
        return char_tokenizer_from_meta(load_meta(folder / "meta.pkl"), folder / "meta.pkl")
    if (folder / "tokenizer.json").is_file():
        path = folder / "tokenizer.json"
        try:  # bounded before the Rust parser sees it: size, values, depth
            raw = read_capped(path, TOKENIZER_JSON_MAX_BYTES, "tokenizer.json")
            loads_json(raw, str(path))
            return BPETokenizer(raw.decode("utf-8"))
        except RefusedFileError as e:
            raise MetaError(str(e)) from None
        except (UnicodeDecodeError, TokenizerError) as e:
            raise MetaError(f"cannot use {folder / 'tokenizer.json'}: {e}") from None
    return GPT2Ids(GPT2_VOCAB_SIZE)


def open_bin(path: Path) -> np.memmap:
    """A uint16 token file as a read-only memmap; a missing / empty / odd-sized file is one line."""
    if not path.is_file():
        raise MetaError(f"{path.name} not found in {path.parent} (nanoGPT's prepare.py writes train.bin and val.bin)")
    size = path.stat().st_size
    if size < 4 or size % 2:
        raise MetaError(f"{path} is not a uint16 token file ({size} bytes)")
    return np.memmap(path, dtype=np.uint16, mode="r")


def token_counts(tokens: np.ndarray, vocab_size: int) -> tuple[torch.Tensor, bool]:
    """((vocab_size,) int64 counts, sampled?): exact up to COUNT_EXACT_MAX tokens, else from
    COUNT_CHUNKS evenly spaced chunks, so a 9 B-token train.bin is never read whole."""
    n = len(tokens)
    if n <= COUNT_EXACT_MAX:
        parts, sampled = [tokens], False
    else:
        starts = np.linspace(0, n - COUNT_CHUNK, COUNT_CHUNKS).astype(np.int64)
        parts, sampled = [tokens[s:s + COUNT_CHUNK] for s in starts], True
    counts = np.zeros(max(vocab_size, 1), dtype=np.int64)
    for p in parts:
        c = np.bincount(np.asarray(p), minlength=vocab_size)
        if len(c) > vocab_size:
            raise MetaError(f"train.bin holds token id {len(c) - 1}, outside the {vocab_size}-token vocabulary")
        counts += c
    return torch.from_numpy(counts), sampled


def source_fingerprint(folder: Path) -> str:
    """sha256 of the vocabulary files and of each .bin's size, first and last MiB: the same
    for every copy of the folder, and cheap (a 9 B-token train.bin is not read whole)."""
    h = hashlib.sha256(b"nanogpt v1\n")
    for name in ("train.bin", "val.bin", "meta.pkl", "tokenizer.json"):
        p = folder / name
        if not p.is_file():
            continue
        size = p.stat().st_size
        h.update(f"{name} {size}\n".encode())
        with open(p, "rb") as f:
            if name.endswith(".bin") and size > 2 * FINGERPRINT_BYTES:
                h.update(f.read(FINGERPRINT_BYTES))
                f.seek(size - FINGERPRINT_BYTES)
            h.update(f.read())
    return h.hexdigest()
