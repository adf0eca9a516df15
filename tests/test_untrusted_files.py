"""Hostile files a user or another process can leave where we read: a nanoGPT folder's meta.pkl and
tokenizer.json, a run directory's run_info.json and config.yaml. Each is refused in one line of
the project's error class, fast and in bounded memory.

Each file is read in a child process under an address-space limit (``RLIMIT_AS``) and a wall
clock, so a reader that allocates tens of GiB or loops for minutes fails the test instead of
taking the machine down; the child reports the reader's own time and how far its peak resident
memory rose during the read (VmHWM, reset to the resident set just before it; the process's
``ru_maxrss``, which includes the imports' peak, is reported beside it).
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from induction_dynamics.data.nanogpt import load_meta

SRC = Path(__file__).resolve().parents[1] / "src"
# importing torch maps ~565 MiB of address space (VmPeak) and ~225 MB resident: 1 GiB leaves the
# reader ~450 MiB, far below what any of these files asks for from an unbounded reader
ADDRESS_SPACE = 1 << 30
WALL_S = 30          # the child as a whole (imports included); today's readers need minutes
READ_S = 1.0         # the reader alone
GROWTH_MB = 64       # peak resident memory over the imports
OPCODES = 1 << 19    # data.nanogpt.META_MAX_OPCODES (a literal: these tests also run against older code)

CHILD = r"""
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
kind, path = sys.argv[1], sys.argv[2]
from pathlib import Path
from induction_dynamics.errors import InductionDynamicsError
if kind == "meta":
    from induction_dynamics.data.nanogpt import load_meta as read
elif kind == "tokenizer":
    from induction_dynamics.data.nanogpt import folder_tokenizer
    read = lambda p: folder_tokenizer(Path(p).parent)
elif kind == "run_info":
    from induction_dynamics.analysis.record import RunRecord
    read = lambda p: RunRecord.read(p, Path(p).parent, "run")
elif kind == "config":
    from induction_dynamics.analysis.prompts import train_config_of
    read = lambda p: train_config_of({{}}, Path(p).parent)
def vm(key):  # kB, from the kernel's own accounting of this process
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0])
try:  # "5" resets the peak resident set (VmHWM) to the current one: the reader's own peak is measured
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
before = vm("VmRSS")
t0 = time.perf_counter()
try:
    read(path)
    out = {{"error": None}}
except BaseException as e:
    out = {{"error": type(e).__name__, "ours": isinstance(e, InductionDynamicsError), "message": str(e)}}
out["seconds"] = time.perf_counter() - t0
peak = vm("VmHWM")
out.update(growth_mb=(peak - before) / 1024, peak_mb=peak / 1024,
           maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print("RESULT " + json.dumps(out))
"""


def read_in_child(kind: str, path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(SRC)), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD.format(limit=ADDRESS_SPACE), kind, str(path)],
                              capture_output=True, text=True, timeout=WALL_S, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {path.name} ({kind}) took more than {WALL_S} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"the reader died (status {proc.returncode}): {proc.stderr[-2000:]}"
    out = json.loads(lines[-1][len("RESULT "):])
    out.update(size=path.stat().st_size, wall=time.perf_counter() - t0)
    return out


# --------------------------------------------------------------------------- crafted files

def pickle_bytes(*ops: bytes) -> bytes:
    return b"\x80\x04" + b"".join(ops) + b"."


def long_binput(i: int) -> bytes:
    return b"r" + struct.pack("<I", i)


def appends(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"e"  # MARK ... APPENDS


def shared_lists(levels: int = 3, width: int = 1000) -> bytes:
    """{"itos": L3}: L1 is ``width`` ints, each L(k+1) is ``width`` references (memo GETs) to Lk:
    ~6 KB standing for 10**9 ints, within the old reader's depth limit of 4."""
    ops = [b"}", b"\x8c\x04itos", b"]", appends([b"K\x01"] * width), long_binput(0)]
    for level in range(1, levels):  # POP: only the memo keeps the level below
        ops += [b"0", b"]", appends([b"j" + struct.pack("<I", level - 1)] * width), long_binput(level)]
    ops.append(b"s")  # SETITEM: {"itos": L3}
    return pickle_bytes(*ops)


def shared_tuples(levels: int = 3, width: int = 1000) -> bytes:
    """{T3: 0} where Tk+1 is ``width`` references to Tk: hashing the key walks 10**9 tuples."""
    ops = [b"}", b"(" + b"K\x01" * width + b"t", long_binput(0)]
    for level in range(1, levels):
        ops += [b"0", b"(" + (b"j" + struct.pack("<I", level - 1)) * width + b"t", long_binput(level)]
    ops += [b"K\x00", b"s"]
    return pickle_bytes(*ops)


def colliding_int_keys(n: int = 60_000) -> bytes:
    """A dict keyed by multiples of 2**61 - 1: every key hashes to 0, building it is quadratic."""
    m = (1 << 61) - 1
    items = []
    for k in range(1, n):
        enc = pickle.encode_long(k * m)
        items.append(b"\x8a" + bytes([len(enc)]) + enc + b"K\x00")
    return pickle_bytes(b"}", b"(" + b"".join(items) + b"u")


def yaml_aliases(levels: int = 9, width: int = 9) -> str:
    lines = [f"a0: &a0 [{', '.join(['x'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def yaml_interpolations(levels: int = 9, width: int = 9) -> str:
    lines = [f"a0: [{', '.join(['x'] * width)}]"]
    lines += [f"a{i}: [{', '.join([repr('${a' + str(i - 1) + '}')] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def nested_json(depth: int) -> str:
    return '{"run": "x", "prompts": ' + "[" * depth + "]" * depth + "}"


# (kind, file name, content, what the one-line error says)
HOSTILE = {
    "meta_memo_index_2**31": ("meta", "meta.pkl", b"\x80\x02]" + long_binput(1 << 31) + b".", "memo entry"),
    "meta_memo_index_2**24": ("meta", "meta.pkl", b"\x80\x02]" + long_binput(1 << 24) + b".", "memo entry"),
    "meta_shared_lists": ("meta", "meta.pkl", shared_lists(), "two places"),
    "meta_shared_tuple_key": ("meta", "meta.pkl", shared_tuples(), "opcode TUPLE "),
    "meta_colliding_int_keys": ("meta", "meta.pkl", colliding_int_keys(), "60 bits"),
    "meta_too_many_opcodes": ("meta", "meta.pkl", pickle.dumps({"itos": list(range(OPCODES))}), "opcodes"),
    "meta_17MiB": ("meta", "meta.pkl", pickle.dumps({"itos": "x" * (17 << 20)}), "MiB"),
    "tokenizer_deep": ("tokenizer", "tokenizer.json", "[" * 200_000 + "]" * 200_000, "nests deeper"),
    "tokenizer_values": ("tokenizer", "tokenizer.json", "[" + "[]," * (3 << 20) + "[]]", "values"),
    "tokenizer_33MiB": ("tokenizer", "tokenizer.json", '{"x": "' + "x" * (33 << 20) + '"}', "MiB"),
    "run_info_deep_100000": ("run_info", "run_info.json", nested_json(100_000), "nests deeper"),
    "run_info_deep_500": ("run_info", "run_info.json", nested_json(500), "nests deeper"),
    "run_info_values": ("run_info", "run_info.json", '{"run": "x", "p": [' + "[]," * (3 << 20) + "[]]}",
                        "values"),
    "run_info_17MiB": ("run_info", "run_info.json", '{"run": "' + "x" * (17 << 20) + '"}', "MiB"),
    "config_aliases": ("config", "config.yaml", yaml_aliases(), "aliases"),
    "config_interpolations": ("config", "config.yaml", yaml_interpolations(), "interpolation"),
    "config_deep_500": ("config", "config.yaml", "a: " + "[" * 500 + "]" * 500 + "\n", "nests deeper"),
    "config_deep_5000": ("config", "config.yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n", "nesting depth"),
    "config_2MiB": ("config", "config.yaml", "a: " + "x" * (2 << 20) + "\n", "MiB"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_file_is_one_line_fast_and_small(case, tmp_path, record_property):
    kind, name, content, says = HOSTILE[case]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = read_in_child(kind, path)
    record_property("measured", out)
    print(f"{case}: {out['size']} bytes, refused in {out['seconds'] * 1000:.1f} ms, peak RSS "
          f"{out['peak_mb']:.0f} MB (+{out['growth_mb']:.1f} MB over the imports): {out.get('message')}")
    assert out["error"] is not None and out["ours"], out
    assert "\n" not in out["message"] and says in out["message"] and str(path) in out["message"], out
    assert out["seconds"] < READ_S and out["growth_mb"] < GROWTH_MB, out


# --------------------------------------------------------------------------- honest files still read

def nanogpt_meta(n: int) -> dict:
    itos = {i: chr(0x100 + i) * 3 for i in range(n)}  # distinct strings, as a BPE-ish vocabulary has
    return {"vocab_size": n, "itos": itos, "stoi": {s: i for i, s in itos.items()}}


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_nanogpt_meta_pkl_reads_in_every_protocol(protocol, tmp_path):
    meta = nanogpt_meta(65)
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(meta, protocol=protocol))
    assert load_meta(tmp_path / "meta.pkl") == meta


def test_a_65535_token_meta_pkl_is_within_the_caps(tmp_path):
    from induction_dynamics.data import nanogpt
    assert nanogpt.META_MAX_OPCODES == OPCODES
    meta = nanogpt_meta(65535)  # every id a uint16 .bin can hold
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(meta))
    t0 = time.perf_counter()
    assert load_meta(tmp_path / "meta.pkl") == meta
    assert time.perf_counter() - t0 < 2.0


def test_the_trainers_own_config_yaml_reads_back(tmp_path):
    from omegaconf import OmegaConf
    from train_helpers import TINY, compose_cfg

    from induction_dynamics.run_dir import read_config
    from induction_dynamics.training.config import to_plain
    plain = to_plain(compose_cfg(TINY))
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(plain))  # as training/setup.py writes it
    assert read_config(tmp_path) == plain
    assert read_config(tmp_path / "elsewhere") is None
