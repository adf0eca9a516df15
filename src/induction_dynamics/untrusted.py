"""Bounded reading of files someone else wrote: a nanoGPT folder's meta.pkl and tokenizer.json,
a run directory's JSON files and config.yaml. No torch here.

Each reader caps the work a file can ask for before the file's objects are built, so a hostile
file is refused in one line (``RefusedFileError``, or the caller's class) in well under a
second and bounded memory, instead of asking for tens of GiB or minutes of CPU:

- size: at most ``max_bytes`` are ever read (one byte more tells that the file is over);
- values: a count of the values the file can build (pickle opcodes, JSON's commas and
  brackets, YAML events), checked before the objects are built;
- depth: checked before (YAML's events) or right after (pickle, JSON) parsing, with an
  iterative walk, so no reader and no later consumer recurses past ``max_depth``;
- sharing: a pickle or YAML document can refer to one list many times (memo GETs, aliases),
  so a few KB can stand for 1000**4 nested lists; the walk visits each container once and
  refuses one reached twice (a file nanoGPT or the trainer writes is always a tree).
"""

from __future__ import annotations

import io
import json
import pickle
import pickletools
from pathlib import Path

import yaml

from induction_dynamics.errors import RefusedFileError

MIB = 1 << 20
JSON_MAX_BYTES = 16 * MIB      # run_info.json, manifest.json, ...: KBs; a 100k-checkpoint manifest ~12 MiB
JSON_MAX_VALUES = 1 << 21      # 2 M values: ~200 MB of Python objects at worst (~100 B each)
MAX_DEPTH = 64                 # our files nest <= 6 levels; Python's json recurses until ~1000


def read_capped(path: str | Path, max_bytes: int, what: str) -> bytes:
    """The file's bytes; a file over ``max_bytes`` is refused without reading more than that."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)  # not stat(): a FIFO or a file still growing has no honest size
    except OSError as e:
        raise RefusedFileError(f"cannot read {path}: {e.strerror}") from None
    if len(raw) > max_bytes:
        raise RefusedFileError(f"refusing {path}: over the {max_bytes / MIB:g} MiB a {what} may have")
    return raw


def check_tree(obj, what: str, *, max_depth: int, max_nodes: int, leaf_ok=None) -> None:
    """Walk ``obj`` (dicts and lists) without recursion; refuse depth > ``max_depth``, more than
    ``max_nodes`` values, a container reached twice (shared or containing itself), and any leaf or
    dict key ``leaf_ok`` rejects (``leaf_ok`` None: every leaf is fine, as JSON's are)."""
    seen: set[int] = set()
    stack = [(obj, 0)]
    n = 0
    while stack:
        node, depth = stack.pop()
        n += 1
        if n > max_nodes:
            raise RefusedFileError(f"refusing {what}: holds more than {max_nodes} values")
        if isinstance(node, (dict, list)):
            if depth >= max_depth:
                raise RefusedFileError(f"refusing {what}: nests deeper than {max_depth} levels")
            if id(node) in seen:
                raise RefusedFileError(f"refusing {what}: refers to one list or dict from two places (or from "
                                       "inside itself); expected a tree of plain data")
            seen.add(id(node))
            if isinstance(node, dict):
                for k in node:
                    if leaf_ok is not None and not leaf_ok(k):
                        raise RefusedFileError(f"refusing {what}: has a dict key of type {type(k).__name__}")
                stack.extend((v, depth + 1) for v in node.values())
            else:
                stack.extend((v, depth + 1) for v in node)
        elif leaf_ok is not None and not leaf_ok(node):
            raise RefusedFileError(f"refusing {what}: holds a {type(node).__name__}; only plain dicts, lists, strings "
                                   "and ints are read")


# --------------------------------------------------------------------------- JSON

def loads_json(raw: bytes | str, what: str, *, max_depth: int = MAX_DEPTH, max_values: int = JSON_MAX_VALUES):
    """Parse JSON text whose values and depth are bounded (the size is the caller's cap).

    Every value but a container's first is preceded by a comma, and a dict's key by its value's
    colon, so ``2 * (commas + brackets) + 1`` bounds the values: counted at C speed before
    json builds anything. Nesting past Python's recursion limit is json's RecursionError,
    caught; nesting under it is refused by the walk."""
    b = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    bound = 2 * (b.count(b",") + b.count(b"[") + b.count(b"{")) + 1
    if bound > max_values:
        raise RefusedFileError(f"refusing {what}: may hold up to {bound} values, over the {max_values} allowed")
    try:
        obj = json.loads(raw)
    except RecursionError:
        raise RefusedFileError(f"refusing {what}: nests deeper than {max_depth} levels") from None
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise RefusedFileError(f"refusing {what}: not JSON ({str(e).splitlines()[0]})") from None
    check_tree(obj, what, max_depth=max_depth, max_nodes=max_values)
    return obj


def read_json_file(path: str | Path, what: str | None = None, max_bytes: int = JSON_MAX_BYTES):
    """A JSON file read with every bound above; RefusedFileError (one line) for a missing,
    oversized, too deep, too large or malformed file."""
    path = Path(path)
    return loads_json(read_capped(path, max_bytes, what or "JSON file"), str(path))


# --------------------------------------------------------------------------- pickle

# The opcodes that build ints, strings, lists and dicts, and the bookkeeping around them
# (framing, marks, the memo), each with what the scan checks of it. Anything else (globals,
# REDUCE/BUILD/NEWOBJ, persistent ids, tuples and sets, whose hashing walks shared structure,
# bytes, floats) is refused unread.
_PLAIN_OPCODES = {
    **dict.fromkeys(("PROTO", "STOP", "MARK", "POP", "POP_MARK", "DUP", "INT", "BININT", "BININT1",
                     "BININT2", "EMPTY_LIST", "LIST", "APPEND", "APPENDS", "EMPTY_DICT", "DICT", "SETITEM",
                     "SETITEMS"), "plain"),
    **dict.fromkeys(("LONG", "LONG1", "LONG4"), "long"),
    **dict.fromkeys(("UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"), "str"),
    **dict.fromkeys(("PUT", "BINPUT", "LONG_BINPUT"), "put"),
    **dict.fromkeys(("GET", "BINGET", "LONG_BINGET"), "get"),
    "MEMOIZE": "memoize", "FRAME": "frame",
}


def scan_pickle(raw: bytes, what: str, max_opcodes: int) -> None:
    """Refuse a pickle before anything is unpickled: more than ``max_opcodes`` opcodes, one that
    is not plain data, a FRAME longer than what is left, a memo index that is not below the
    opcodes read so far (the unpickler sizes its memo to the index: LONG_BINPUT 2**31 alone asks
    for 16 GiB), or a GET of an index no PUT set. ~0.5 us an opcode."""
    memo: dict[int, str | None] = {}  # index -> the string stored there (to name a global)
    prev = last = None  # the last two strings pushed: what a STACK_GLOBAL would load
    n = 0
    try:
        for n, (op, arg, pos) in enumerate(pickletools.genops(raw), 1):
            role = _PLAIN_OPCODES.get(op.name)
            if n > max_opcodes:
                raise RefusedFileError(f"refusing {what}: more than {max_opcodes} pickle opcodes")
            if role == "plain":
                prev = last = None
            elif role == "str":
                prev, last = last, arg
            elif role == "get":
                if arg not in memo:
                    raise RefusedFileError(f"refusing {what}: reads memo entry {arg}, which nothing stored")
                prev, last = last, memo[arg]
            elif role == "put" or role == "memoize":
                idx = len(memo) if role == "memoize" else arg
                if not 0 <= idx < n:
                    raise RefusedFileError(f"refusing {what}: stores memo entry {idx} after {n} opcodes")
                memo[idx] = last
            elif role == "long":
                if abs(arg) >= 1 << 60:
                    # an int hashes to itself mod 2**61 - 1: ints below 2**60 never collide, bigger
                    # ones can be picked to hash alike, and a dict keyed by them is quadratic to build
                    raise RefusedFileError(f"refusing {what}: an integer of more than 60 bits at byte {pos}")
                prev = last = None
            elif role == "frame":
                if arg > len(raw) - pos:
                    raise RefusedFileError(f"refusing {what}: a {arg}-byte frame at byte {pos}, past its end")
            else:
                wants = {"GLOBAL": str(arg).replace(" ", "."), "INST": str(arg).replace(" ", "."),
                         "STACK_GLOBAL": f"{prev}.{last}"}.get(op.name)
                raise RefusedFileError(f"refusing {what}: " + (f"asks to load {wants}" if wants else
                                       f"pickle opcode {op.name} at byte {pos}")
                                       + "; only plain dicts, lists, strings and ints are read")
    except RefusedFileError:
        raise
    except Exception as e:  # genops: truncated data, unknown opcode, bad argument
        raise RefusedFileError(f"refusing {what}: not a readable pickle ({type(e).__name__}: {e})") from None
    if n == 0:
        raise RefusedFileError(f"refusing {what}: empty")


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Second line of defence after ``scan_pickle``: every global and persistent id is refused."""

    def find_class(self, module, name):
        raise RefusedFileError(f"asks to load {module}.{name}; only plain dicts, lists, strings and ints are read")

    def persistent_load(self, pid):
        raise RefusedFileError("refers to a persistent object; only plain dicts, lists, strings and ints are read")


def _int_or_str(v) -> bool:
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def loads_plain_pickle(raw: bytes, what: str, *, max_opcodes: int, max_depth: int, max_nodes: int):
    """A pickle of plain dicts, lists, strings and ints, built only after ``scan_pickle`` passed,
    then walked by ``check_tree``; no code from the file runs and nothing unbounded is built."""
    scan_pickle(raw, what, max_opcodes)
    try:
        obj = _NoGlobalsUnpickler(io.BytesIO(raw)).load()
    except RefusedFileError as e:  # _NoGlobalsUnpickler's, which knows no file name
        raise RefusedFileError(f"refusing {what}: {e}") from None
    except Exception as e:  # a stack underflow, an unhashable key, ...
        raise RefusedFileError(f"refusing {what}: not a readable pickle ({type(e).__name__})") from None
    check_tree(obj, what, max_depth=max_depth, max_nodes=max_nodes, leaf_ok=_int_or_str)
    return obj


# --------------------------------------------------------------------------- YAML

YAML_MAX_EVENTS = 1 << 13     # a resolved training config is ~300 events; OmegaConf takes ~0.1 ms each


def check_yaml(text: str, what: str, *, max_depth: int = MAX_DEPTH, max_events: int = YAML_MAX_EVENTS) -> None:
    """Refuse a YAML document before it is composed: more than ``max_events`` parser events,
    nesting past ``max_depth``, an anchor or alias (one node standing for many: the YAML
    billion laughs), an OmegaConf interpolation (``${...}``: a saved config is resolved, and
    resolving one can expand without bound or read environment variables), or a top level that
    is not a mapping. The parser's events come one at a time (libyaml's when installed): no
    recursion, nothing built."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    depth = 0
    try:
        for n, ev in enumerate(yaml.parse(text, Loader=loader), 1):
            if n > max_events:
                raise RefusedFileError(f"refusing {what}: has more than {max_events} YAML events")
            if isinstance(ev, yaml.AliasEvent) or getattr(ev, "anchor", None) is not None:
                raise RefusedFileError(f"refusing {what}: uses YAML anchors or aliases; a saved config has none")
            if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                if depth == 0 and isinstance(ev, yaml.SequenceStartEvent):
                    raise RefusedFileError(f"refusing {what}: a YAML list, not a mapping of settings")
                depth += 1
                if depth > max_depth:
                    raise RefusedFileError(f"refusing {what}: nests deeper than {max_depth} levels")
            elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
            elif isinstance(ev, yaml.ScalarEvent) and "${" in ev.value:
                raise RefusedFileError(f"refusing {what}: holds an interpolation ({ev.value[:40]!r}); a saved config "
                                       "is resolved")
    except yaml.YAMLError as e:
        reason = "; ".join(line.strip() for line in str(e).splitlines() if not line.startswith(" "))
        raise RefusedFileError(f"refusing {what}: not YAML ({reason})") from None
