"""Training throughput on BPE tokens vs characters at the same model size, and the BPE's own cost.

    OMP_NUM_THREADS=2 python benchmarks/tokenizer_throughput.py [--iters 300] [--repeats 2] [--vocab 1024]

Both runs train the same GPT (quickstart shape unless overridden: --model model.n_embd=128 ...)
on ``data=python_code``, once with ``data.tokenizer=char`` and once with ``data.tokenizer=bpe``;
only the vocabulary differs, so the BPE run's embedding and unembedding are wider. Runs go
char, bpe, bpe, char, ... (ABBA) so a drifting machine load cancels; the median tokens/s of
each is reported, with characters/s (tokens/s times the split's characters per token), which
is what decides how much text a run of fixed length sees. The tokenizer is built first in an
empty cache: its training time (``data.source["tokenizer_train_s"]``) and the whole build.
Run it alone: another process on the same cores distorts both numbers.
"""

import argparse
import statistics
import tempfile
import time

from train_throughput import run  # the same compose-and-train of one benchmark run

from induction_dynamics.data import load_data, python_code


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--model", nargs="*", default=[], help="model overrides, e.g. model.n_embd=128")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        bpe = load_data("python_code", tokenizer="bpe", vocab_size=args.vocab, cache_dir=cache)
        build = time.perf_counter() - t0
        char = load_data("python_code", cache_dir=cache)
        corpus = python_code.load_corpus(0.1)
        chars_per_token = {"char": 1.0, "bpe": len(corpus.train_text) / len(bpe.train)}
        print(f"BPE of {bpe.vocab_size} tokens trained in {bpe.source['tokenizer_train_s']:.2f} s on "
              f"{len(corpus.train_text):,} characters ({build:.1f} s with encoding and cache writes); "
              f"{chars_per_token['bpe']:.2f} characters per token; char vocabulary {char.vocab_size}", flush=True)
        common = ["data=python_code", f"data.cache_dir={cache}", f"train.max_iters={args.iters}",
                  "train.progress=false", "wandb.mode=disabled", "monitor.enabled=false",
                  f"checkpoint.every={args.iters}", "checkpoint.schedule=linear", *args.model]
        variants = {"char": common, "bpe": common + ["data.tokenizer=bpe", f"data.vocab_size={args.vocab}"]}
        run(common[:2] + ["train.max_iters=10"] + common[3:])  # warm-up: allocator, imports
        results = {k: [] for k in variants}
        for rep in range(args.repeats):
            for name in (["char", "bpe"] if rep % 2 == 0 else ["bpe", "char"]):
                out = run(variants[name])
                results[name].append(out["tokens_per_sec"])
                print(f"{name:>4}: {out['tokens_per_sec']:,.0f} tokens/s ({out['elapsed_s']:.1f} s)", flush=True)
    tps = {k: statistics.median(v) for k, v in results.items()}
    for k in ("char", "bpe"):
        print(f"median {k:>4}: {tps[k]:,.0f} tokens/s = {tps[k] * chars_per_token[k]:,.0f} characters/s")
    print(f"BPE / char: {tps['bpe'] / tps['char']:.2f}x tokens/s, "
          f"{tps['bpe'] * chars_per_token['bpe'] / tps['char']:.2f}x characters/s")


if __name__ == "__main__":
    main()
