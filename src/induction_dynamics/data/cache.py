"""The token cache: a source's token arrays, tokenizer and provenance, built once, verified on every read.

nanoGPT's prepare.py layout, one folder per source, split and tokenizer under the data cache
directory: ``train.bin`` / ``val.bin`` (uint16), the BPE's ``tokenizer.json``, and ``meta.json``
(vocabulary, sha256 of every file, source hash) written last, so that its presence with
matching hashes marks a complete build. Later runs load the arrays in milliseconds; a file
truncated or altered since it was written fails its hash and the folder is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from induction_dynamics.data.tokenizer import TOKENIZER_JSON_MAX_BYTES, BPETokenizer, CharTokenizer
from induction_dynamics.data.tokens import TokenData, tokenize
from induction_dynamics.files import write_bytes
from induction_dynamics.untrusted import read_capped, read_json_file

CACHE_ENV = "INDUCTION_DYNAMICS_CACHE"
# Bump when the conversion or the cache layout changes: old caches then rebuild.
FORMAT_VERSION = 1


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else $INDUCTION_DYNAMICS_CACHE, else ~/.cache/induction-dynamics."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "induction-dynamics"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_cache(folder: Path, source_hash: str, val_frac: float) -> TokenData | None:
    """The cached TokenData if ``folder`` holds a complete, uncorrupted build of this source."""
    try:
        meta = read_json_file(folder / "meta.json")  # a RefusedFileError is a ValueError: rebuilt
        if not isinstance(meta, dict):
            return None
        if (meta.get("format_version") != FORMAT_VERSION or meta.get("source_sha256") != source_hash
                or meta.get("val_frac") != val_frac):
            return None
        arrays = []
        for split in ("train", "val"):
            raw = (folder / f"{split}.bin").read_bytes()
            if sha256_bytes(raw) != meta[f"{split}_sha256"]:   # truncated or altered since written
                return None
            arrays.append(torch.from_numpy(np.frombuffer(raw, dtype=np.uint16).astype(np.int64)))
        if meta.get("tokenizer", "char") == "bpe":
            raw = read_capped(folder / "tokenizer.json", TOKENIZER_JSON_MAX_BYTES, "tokenizer.json")
            if sha256_bytes(raw) != meta["tokenizer_file_sha256"]:
                return None
            tok = BPETokenizer(raw.decode("utf-8"))
        else:
            tok = CharTokenizer(list(meta["vocab"]))
    except (OSError, ValueError, KeyError, TypeError):  # a TokenizerError is a ValueError
        return None
    train, val = arrays
    return TokenData(train=train, val=val, tokenizer=tok, counts=torch.bincount(train, minlength=tok.vocab_size),
                     source=_provenance(meta, tok))


def _provenance(meta: dict, tok) -> dict:
    keep = ("source", "source_sha256", "val_frac", "train_files", "val_files", "tokenizer_train_s")
    return {**{k: meta[k] for k in keep if k in meta}, "tokenizer": tok.kind, "tokenizer_sha256": tok.fingerprint}


def _write_cache(folder: Path, data: TokenData, text: str, meta: dict) -> None:
    """nanoGPT's prepare.py output: train.bin / val.bin (uint16), the BPE's tokenizer.json,
    plus meta.json written last."""
    blobs = {split: getattr(data, split).numpy().astype(np.uint16).tobytes() for split in ("train", "val")}
    for split, raw in blobs.items():
        write_bytes(folder / f"{split}.bin", raw)
    if meta["source"] == "shakespeare":  # the converted text, for people who want to read it
        write_bytes(folder / "input.txt", text.encode("utf-8"))
    if data.tokenizer.kind == "bpe":
        raw = data.tokenizer.json.encode("utf-8")
        write_bytes(folder / "tokenizer.json", raw)
        meta["tokenizer_file_sha256"] = sha256_bytes(raw)
    meta.update(text_sha256=sha256_bytes(text.encode("utf-8")), n_chars=len(text), vocab_size=data.vocab_size,
                train_tokens=len(data.train), val_tokens=len(data.val), train_sha256=sha256_bytes(blobs["train"]),
                val_sha256=sha256_bytes(blobs["val"]))
    if data.tokenizer.kind == "char":
        meta["vocab"] = data.vocab
    # meta.json last: its presence (with matching hashes) is what marks the build complete.
    write_bytes(folder / "meta.json", (json.dumps(meta, indent=1) + "\n").encode("utf-8"))


def cached(name: str, key: str, source_hash: str, get_splits, val_frac: float, cache_dir,
           tokenizer: str = "char", vocab_size=None, extra_meta=None) -> TokenData:
    """Load the token arrays for ``key`` from the cache, or build and store them.
    ``get_splits()``: (train text, val text)."""
    tag = "" if tokenizer == "char" else f"-{tokenizer}{vocab_size}"
    folder = cache_root(cache_dir) / f"{name}-{sha256_bytes(key.encode())[:12]}-val{val_frac:g}{tag}"
    data = _read_cache(folder, source_hash, val_frac)
    if data is None:
        train_text, val_text = get_splits()
        meta = {"format_version": FORMAT_VERSION, "source": name, "source_sha256": source_hash,
                "val_frac": val_frac, **(extra_meta or {})}
        data = tokenize(train_text, val_text, tokenizer, vocab_size, meta)
        data.source = _provenance(meta, data.tokenizer)
        try:
            _write_cache(folder, data, train_text + val_text, meta)
        except OSError as e:  # a read-only cache is no reason to stop: we have the data
            warnings.warn(f"could not write the data cache in {folder}: {e}", stacklevel=3)
    return data
