"""The project's errors: one base class, and the one-line formatter every report goes through.

An ``InductionDynamicsError`` is bad input (or a file the machine cannot write: a full disk), not
a bug: its message is meant for the user and is one line (the command line prints it and exits with status 2, the analysis records it in
``errors.json``). Anything else that is raised is a bug and keeps its traceback. Imports
nothing, so a bad configuration is reported before torch is imported.
"""

from __future__ import annotations

import re


class InductionDynamicsError(Exception):
    """Bad input (a config value, a file, a checkpoint): a one-line message for the user."""


class ConfigError(InductionDynamicsError, ValueError):
    """An invalid configuration value. The message names the key."""


class DataError(InductionDynamicsError, ValueError):
    """Bad data input: a missing, empty or non-UTF-8 file, an unknown source, a refused file."""


class TokenizerError(DataError):
    """A tokenizer cannot be built or used (bad state, text it cannot encode)."""


class RefusedFileError(DataError):
    """A file is refused before or while it is parsed (``untrusted.py``): unreadable, over its
    size cap, nested too deeply, too many values, shared references, or not plain data."""


class MetaError(DataError):
    """A nanoGPT data folder is refused: its meta.pkl would import something or is not plain
    data, or a .bin file is not uint16 tokens."""


class CheckpointError(InductionDynamicsError, RuntimeError):
    """A checkpoint file is missing, truncated, corrupted or not in our format."""


class TrainingError(InductionDynamicsError, RuntimeError):
    """Training cannot go on (non-finite loss, a file it cannot write)."""


class AnalysisError(InductionDynamicsError, RuntimeError):
    """Bad input to the analysis (missing folder, no checkpoints, unknown metric, ...)."""


class WriteError(InductionDynamicsError, OSError):
    """A file could not be written (disk full, quota, read-only folder); the previous file, if
    any, is intact (``files.atomic_write``). ``cannot write <path>: [Errno N] <reason>``.
    An OSError too, so that code which tolerates a failed write (``except OSError``) still does."""

    def __init__(self, path, errno: int | None, strerror: str | None):
        super().__init__(errno, strerror)
        self.filename = str(path)

    def __str__(self) -> str:
        return f"cannot write {self.filename}: [Errno {self.errno}] {self.strerror}"

    def __reduce__(self):  # across processes (the analysis's joblib workers)
        return type(self), (self.filename, self.errno, self.strerror)


# Hydra's and OmegaConf's configuration errors are bad input too; matched by name, so that
# neither has to be imported to tell.
_FOREIGN_BAD_INPUT = {("hydra", "HydraException"), ("omegaconf", "OmegaConfBaseException")}


def is_bad_input(e: BaseException) -> bool:
    """An error whose message is meant for the user (ours, or a Hydra/OmegaConf config error)."""
    return isinstance(e, InductionDynamicsError) or any(
        (cls.__module__.split(".")[0], cls.__name__) in _FOREIGN_BAD_INPUT for cls in type(e).__mro__)


def one_line(e: BaseException) -> str:
    """``e`` as one line.

    Bad input (``is_bad_input``): its message and its cause's, multi-line listings folded in:
    Hydra's "Available options in 'model':" followed by tab-indented names becomes "available
    options in 'model': a, b, c", and its config search path is dropped. Any other error: its
    type's name (it says what broke) and the first line of its message (the lines after it
    are explanations and tracebacks).
    """
    text = str(e).strip()
    if not is_bad_input(e):
        return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
    cause = e.__cause__
    if cause is not None and str(cause).strip() and str(cause).splitlines()[0] not in text:
        text += "\n" + str(cause)
    text = text.split("Config search path")[0]
    parts: list[str] = []
    listing = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("object_type=") or line.startswith("reference_type="):
            continue
        if listing and raw.startswith(("\t", "    ")):
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line
            continue
        listing = line.endswith(":")
        parts.append(line)
    out = re.sub(r"\s+", " ", "; ".join(parts)).replace(".; ", ". ").strip()
    return out or type(e).__name__
