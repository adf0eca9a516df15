"""Atomic file writes and content hashes: the one way the project writes a file others read.

A reader (the analysis sweep, a resumed run, a second process) never sees half a file: the
bytes go to a temporary name in the same folder, are fsynced, and the name is swapped in
with ``os.replace`` (atomic on POSIX and Windows); the folder is fsynced too so the rename
survives a power cut. A failed write leaves the old file as it was and no temporary behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from induction_dynamics.errors import RefusedFileError
from induction_dynamics.untrusted import read_json_file


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object], durable: bool = True) -> Path:
    """Call ``write(f)`` on a temporary binary file next to ``path``, then rename it over ``path``.

    ``durable=False`` skips the fsyncs: still atomic for any reader and across a killed process
    (the page cache outlives it), not across a power cut; for small files rewritten often.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; run directories and caches are meant to be shared
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable and hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def write_bytes(path: str | Path, data: bytes, durable: bool = True) -> Path:
    return atomic_write(path, lambda f: f.write(data), durable)


def write_text(path: str | Path, text: str, durable: bool = True) -> Path:
    return write_bytes(path, text.encode("utf-8"), durable)


def write_json(obj, path: str | Path, durable: bool = True) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n", durable)


def read_json(path: str | Path, default=None):
    """The JSON in ``path``, or ``default`` when it is missing, unreadable or refused by the bounds
    of ``untrusted.read_json_file`` (size, values, depth): a stale cache key or a damaged
    manifest reads as none, and no file can make the reader allocate or recurse without bound."""
    try:
        return read_json_file(path)
    except RefusedFileError:
        return default


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (checkpoints can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
