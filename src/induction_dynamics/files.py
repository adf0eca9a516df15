"""Atomic file writes and content hashes: the one way the project writes a file others read.

A reader (the analysis sweep, a resumed run, a second process) never sees half a file: the
bytes go to a temporary name in the same folder, are fsynced, and the name is swapped in
with ``os.replace`` (atomic on POSIX and Windows); the folder is fsynced too so the rename
survives a power cut. A failed write leaves the old file as it was and no temporary behind,
and raises ``errors.WriteError``: ``cannot write <path>: [Errno 28] No space left on device``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from induction_dynamics.errors import RefusedFileError, WriteError
from induction_dynamics.untrusted import read_json_file


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object], durable: bool = True) -> Path:
    """Call ``write(f)`` on a temporary binary file next to ``path``, then rename it over ``path``.

    ``durable=False`` skips the fsyncs: still atomic for any reader and across a killed process
    (the page cache outlives it), not across a power cut; for small files rewritten often.
    A write the system refuses (a full disk, a quota, a read-only folder), wherever it fails
    (the folder, the temporary file, ``write``, the fsync, the rename) raises
    ``errors.WriteError`` naming ``path`` and the errno: one line for the user, and the
    previous ``path`` as it was.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; run directories and caches are meant to be shared
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        if durable and hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself durable
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        _raise_write_error(path, e)
        raise
    return path


def append_text(path: str | Path, text: str) -> Path:
    """Append ``text`` to ``path`` (a journal, one record per call): all of it, or nothing.

    A file that grows by appends cannot be renamed into place; a failed append is cut back to
    the length the file had, so no half record is left for the next append to run into.
    Failures raise ``errors.WriteError`` as ``atomic_write``'s do.
    """
    path = Path(path)
    data = text.encode("utf-8")
    try:
        with open(path, "ab") as f:
            start = f.tell()
            try:
                f.write(data)
                f.flush()
            except BaseException:
                f.truncate(start)  # only ever shrinks to what was there before this call
                raise
    except BaseException as e:
        _raise_write_error(path, e)
        raise
    return path


def _raise_write_error(path: Path, e: BaseException) -> None:
    """Raise WriteError for ``path`` when ``e`` is an OSError with an errno, or a RuntimeError
    raised while handling one (torch.save's C++ writer wraps the file's OSError that way);
    otherwise return and let ``e`` go on (a bug keeps its traceback)."""
    seen = e
    while isinstance(seen, RuntimeError) and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    if isinstance(seen, OSError) and not isinstance(seen, WriteError) and seen.errno is not None:
        raise WriteError(path, seen.errno, seen.strerror) from None


def save_figure(fig, path: str | Path, **savefig_kwargs) -> Path:
    """A matplotlib figure's ``savefig`` through ``atomic_write``, in the format of the suffix."""
    path = Path(path)
    return atomic_write(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or None, **savefig_kwargs))


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
