"""Seconds per checkpoint and peak memory of the default analysis suite, by model size and number
of text windows, against the FLOPs its forwards must do.

    python benchmarks/analysis_scaling.py --sizes quickstart baby gpt2 --windows 64 512 2048   # the full grid
    python benchmarks/analysis_scaling.py --sizes gpt2 --windows 512 --json gpt2.json
    python benchmarks/analysis_scaling.py --device cuda --precision bfloat16   # on a GPU

Each case runs in a fresh subprocess: one randomly initialised checkpoint (bias on, dropout 0,
nanoGPT's init) of the size, 200 k validation tokens of a uniform random stream over the
vocabulary, ``analyze_checkpoint(model, "default", overrides=("suite.text_windows=N",))``. The
subprocess reports its wall time and peak RSS (``ru_maxrss``: the model, the imports and the
suite's largest moment) and, in a second pass, the FLOPs the suite ran
(``torch.utils.flop_counter``: matmuls and attention, forward and backward; the composition
baseline, cached after the first pass, is not in it). The floor is those FLOPs at the machine's
own dense matmul rate (a 2048 x 2048 float32 matmul, timed in the same process afterwards, same
threads): ``time / floor`` says how far the suite is from doing nothing but its necessary
arithmetic. ``--json``: every case's figures, written atomically. Run it alone: two full-thread
PyTorch processes on 2 cores slow each other ~25x, and only the RSS figures survive sharing.

Sizes: ``quickstart`` 2 x 4 x 64, vocab 1,024, block 64; ``baby`` 6 x 6 x 384, vocab 1,024,
block 256 (experiment=baby_shakespeare's shape); ``gpt2`` 12 x 12 x 768, vocab 50,304, block
256 (GPT-2 small). On a CPU GPT-2 small's windows stop at ``--max-gpt2-windows`` (512: one case
is ~30 min on 2 cores with the FLOP pass; 2,048 ~4x that); the skipped cases are listed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from induction_dynamics.files import write_json

SIZES = {
    "quickstart": dict(n_layer=2, n_head=4, n_embd=64, vocab_size=1024, block_size=64),
    "baby": dict(n_layer=6, n_head=6, n_embd=384, vocab_size=1024, block_size=256),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, block_size=256),
}

CASE = r"""
import json, resource, sys, time
import torch
from torch.utils.flop_counter import FlopCounterMode
from induction_dynamics.analysis import analyze_checkpoint
from induction_dynamics.model import GPT, GPTConfig

shape, windows, device, precision, count = json.loads(sys.argv[1])
torch.manual_seed(0)
model = GPT(GPTConfig(**shape, dropout=0.0, bias=True)).eval()
val = torch.randint(shape["vocab_size"], (200_000,), generator=torch.Generator().manual_seed(1))
overrides = (f"suite.text_windows={windows}", f"device={device}", f"suite.precision={precision}")
run = lambda: analyze_checkpoint(model, "default", overrides=overrides, val_tokens=val, device=device)
t0 = time.perf_counter()
rows = run()
if device.startswith("cuda"):
    torch.cuda.synchronize()
seconds = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB
flops = float("nan")
if count:
    with FlopCounterMode(display=False) as counter:
        run()
    flops = counter.get_total_flops()
a = torch.randn(2048, 2048, device=device)
(a @ a).sum().item()
t1 = time.perf_counter()
for _ in range(5):
    b = a @ a
b.sum().item()
rate = 5 * 2 * 2048 ** 3 / (time.perf_counter() - t1)
print(json.dumps({"seconds": seconds, "peak_rss_mib": rss, "flops": flops, "matmul_flops_per_s": rate,
                  "rows": len(rows), "nan_rows": int(rows["value"].isna().sum()),
                  "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None}))
"""


def run_case(size: str, windows: int, device: str, precision: str, count: bool, timeout: int) -> dict:
    args = json.dumps([SIZES[size], windows, device, precision, count])
    t0 = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-c", CASE, args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"size": size, "windows": windows, "error": f"timed out after {timeout} s (--timeout)"}
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
        return {"size": size, "windows": windows, "error": last[:200]}
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {"size": size, "windows": windows, "wall_s": time.perf_counter() - t0, **res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--windows", nargs="+", type=int, default=[64, 512, 2048])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-flops", action="store_true", help="skip the second, FLOP-counting pass")
    ap.add_argument("--max-gpt2-windows", type=int, default=512,
                    help="GPT-2 small's windows are capped here on a CPU (2,048 take ~2 h a case on 2 cores)")
    ap.add_argument("--timeout", type=int, default=4 * 3600, help="seconds per case")
    ap.add_argument("--json", help="write every case's figures here (JSON)")
    a = ap.parse_args()
    results = []
    print("| size | windows | s / checkpoint | peak RSS (MiB) | GFLOP | floor (s) | time / floor | NaN rows |")
    print("|---|---|---|---|---|---|---|---|")
    for size in a.sizes:
        for windows in a.windows:
            if size == "gpt2" and a.device == "cpu" and windows > a.max_gpt2_windows:
                print(f"| {size} | {windows} | skipped (--max-gpt2-windows {a.max_gpt2_windows}) | | | | | |", flush=True)
                continue
            r = run_case(size, windows, a.device, a.precision, not a.no_flops, a.timeout)
            results.append(r)
            if "error" in r:
                print(f"| {size} | {windows} | error: {r['error']} | | | | | |", flush=True)
                continue
            r["floor_s"] = r["flops"] / r["matmul_flops_per_s"]
            print(f"| {size} | {windows} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} | {r['flops'] / 1e9:,.0f} | "
                  f"{r['floor_s']:.3g} | {r['seconds'] / r['floor_s']:.1f}x | {r['nan_rows']} |", flush=True)
            if a.json:  # after every case: a long grid stopped half-way keeps what it measured
                write_json({"device": a.device, "precision": a.precision, "torch": torch_version(),
                            "cpu_count": os.cpu_count(), "threads_env": os.environ.get("OMP_NUM_THREADS"),
                            "cases": results}, a.json)


def torch_version() -> str:
    from importlib.metadata import version
    return version("torch")


if __name__ == "__main__":
    main()
