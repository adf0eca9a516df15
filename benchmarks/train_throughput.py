"""Throughput of the default training config with the checkpoint history and live monitor on vs off.

    OMP_NUM_THREADS=2 python benchmarks/train_throughput.py [--iters 1000] [--repeats 2]

"on"  = the default config: history checkpoints (every 250 + log-spaced 1, 2, 4, ...) and the
        induction monitor every 100 iterations.
"off" = the same run with the monitor disabled and history checkpoints only at 0 and the last
        step. Both keep evaluation and the resume file at each evaluation (nanoGPT's
        train.py also writes its ckpt.pt at every eval), so the difference is the price of
        watching induction form. Runs go on, off, off, on, ... (ABBA) so that a drifting
        machine load cancels; the median tokens/s of each is reported. Target: overhead <= 5%.
        The script also reports the time spent in the monitor and in checkpoint writes measured
        inside each run, which a busy machine distorts far less.
Run it alone: another process on the same cores distorts both numbers.
"""

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from induction_dynamics.training.loop import train

CONF = Path(__file__).resolve().parents[1] / "conf"


def run(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with tempfile.TemporaryDirectory() as d:
        out = train(cfg, run_dir=d)
        out["n_checkpoints"] = len(out["checkpoints"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--wandb", default="disabled", help="wandb.mode for both variants (offline adds a process)")
    args = ap.parse_args()
    common = [f"train.max_iters={args.iters}", "train.progress=false", f"wandb.mode={args.wandb}"]
    variants = {"on": common, "off": common + ["monitor.enabled=false", f"checkpoint.every={args.iters}",
                                               "checkpoint.schedule=linear"]}
    run(common[:1] + ["train.max_iters=20"] + common[1:])  # warm-up: data cache, allocator
    results = {k: [] for k in variants}
    for rep in range(args.repeats):
        for name in (["on", "off"] if rep % 2 == 0 else ["off", "on"]):  # ABBA: load drift cancels
            overrides = variants[name]
            out = run(overrides)
            results[name].append(out)
            ts = out["timing_s"]
            print(f"{name:>3}: {out['tokens_per_sec']:,.0f} tokens/s, {out['elapsed_s']:.1f} s "
                  f"(eval {ts['eval']:.2f} s, monitor {ts['monitor']:.2f} s, checkpoint writes {ts['checkpoint']:.2f} s), "
                  f"{out['n_checkpoints']} history checkpoints", flush=True)
    tps = {k: statistics.median(r["tokens_per_sec"] for r in v) for k, v in results.items()}
    overhead = 100 * (tps["off"] / tps["on"] - 1)
    print(f"\ndefault config, {args.iters} iterations, {torch.get_num_threads()} torch threads, "
          f"median of {args.repeats}:")
    print(f"  checkpoints + monitor on : {tps['on']:,.0f} tokens/s")
    print(f"  checkpoints + monitor off: {tps['off']:,.0f} tokens/s")
    print(f"  overhead: {overhead:+.1f}% of the training time (target <= 5%)")
    # the same from time measured inside each run: insensitive to load changing between runs
    extra = {k: statistics.median(r["timing_s"]["monitor"] + r["timing_s"]["checkpoint"] for r in v)
             for k, v in results.items()}
    base = statistics.median(r["elapsed_s"] for r in results["on"]) - (extra["on"] - extra["off"])
    print(f"  monitor + checkpoint writes: {extra['on']:.2f} s on, {extra['off']:.2f} s off -> "
          f"{100 * (extra['on'] - extra['off']) / base:+.1f}% measured inside the runs")


if __name__ == "__main__":
    main()
