"""How long does the interpretability toolkit take on one checkpoint?

    OMP_NUM_THREADS=1 python benchmarks/analysis_speed.py               # default model, random init
    OMP_NUM_THREADS=1 python benchmarks/analysis_speed.py --ckpt run/checkpoints/step_001000.pt

Times (best of --repeats, seconds):
  1. per-head activation patching (every head, all positions): batched vs one forward per
     head, end to end, and split into each path's clean+corrupted setup forward (every
     position, for one-at-a-time; the shared prefix once, for batched) and the rest;
  2. per-head-by-position patching, batched vs one forward per (head, position);
  3. the full metric suite the analysis sweep runs per checkpoint.
Run it alone: other processes on the same cores distort every figure.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from induction_dynamics.checkpoint import load_checkpoint, model_from_checkpoint
from induction_dynamics.errors import CheckpointError
from induction_dynamics.files import write_json
from induction_dynamics.interpretability import activation_patching as ap
from induction_dynamics.interpretability import attention_analysis as aa
from induction_dynamics.interpretability import logit_lens, metrics, patching_runs
from induction_dynamics.interpretability.utils import HookManager
from induction_dynamics.model import GPT, GPTConfig

DEFAULT_MODEL = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=65, dropout=0.0)


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, lazy init)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def load_model(path: str | None) -> tuple[GPT, str]:
    if path is None:
        torch.manual_seed(0)
        return GPT(GPTConfig(**DEFAULT_MODEL)).eval(), "default model (random init): " + str(DEFAULT_MODEL)
    ckpt = load_checkpoint(path)
    if "model_args" not in ckpt:
        raise CheckpointError(f"not a nanoGPT-format checkpoint (no 'model_args'): {path}")
    return model_from_checkpoint(ckpt), f"{path}: {ckpt['model_args']}"


def metric_suite(model, allowed, seq_len, batch, gen) -> dict[str, callable]:
    """What the sweep computes per checkpoint, one closure per item."""
    block = model.config.block_size
    rep = metrics.repeated_random_tokens(allowed, seq_len, batch, 2, gen)
    rep4 = metrics.repeated_random_tokens(allowed, min(25, len(allowed), block // 4), batch, 4, gen)
    text = torch.randint(0, model.config.vocab_size, (batch, block), generator=gen)  # stands in for text
    d = ap.induction_patching_data(allowed, seq_len, batch, gen)
    pair = (model, d.clean, d.corrupted, d.answer, d.corrupted_answer)
    early, late = metrics.icl_positions(block)
    return {
        "induction_scores": lambda: metrics.induction_scores(model, rep, seq_len),
        "prefix_matching_scores": lambda: metrics.prefix_matching_scores(model, rep4, rep4.shape[1] // 4),
        "previous_token_scores": lambda: metrics.previous_token_scores(model, text),
        "duplicate_token_scores": lambda: metrics.duplicate_token_scores(model, rep, seq_len),
        "copying_scores": lambda: metrics.copying_scores(model, rep),
        "ov_copying_scores": lambda: metrics.ov_copying_scores(model),
        "repeated_sequence_loss": lambda: metrics.repeated_sequence_loss(model, rep, seq_len),
        "per_token_losses + icl_score": lambda: (metrics.per_token_losses(model, text),
                                                 metrics.icl_score(model, text, early, late)),
        "patch_heads": lambda: ap.patch_heads(*pair),
        "patch_residual_by_layer": lambda: ap.patch_residual_by_layer(*pair),
        "patch_attn_out_by_layer": lambda: ap.patch_attn_out_by_layer(*pair),
        **({} if model.config.attn_only else {"patch_mlp_out_by_layer": lambda: ap.patch_mlp_out_by_layer(*pair)}),
        "patch_suite (the four above, one setup)": lambda: ap.patch_suite(*pair),
        "attribution_patch_heads": lambda: ap.attribution_patch_heads(*pair),
        "logit_lens": lambda: logit_lens.measure_convergence(logit_lens.logit_lens(model, d.clean)),
        "find_induction_heads": lambda: aa.find_induction_heads(model, rep, seq_len),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", help="nanoGPT-format checkpoint ({'model', 'model_args'}); default: the default model")
    p.add_argument("--batch", type=int, default=8, help="examples per patching / prompt batch (default 8)")
    p.add_argument("--seq-len", type=int, default=20, help="half length of the [x, x] prompts (default 20)")
    p.add_argument("--repeats", type=int, default=3, help="timings are the best of this many runs")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    try:
        model, desc = load_model(args.ckpt)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    V, block = model.config.vocab_size, model.config.block_size
    allowed = torch.arange(V)
    seq_len = min(args.seq_len, V - 1, (block + 1) // 2)
    gen = torch.Generator().manual_seed(0)
    d = ap.induction_patching_data(allowed, seq_len, args.batch, gen)
    pair = (model, d.clean, d.corrupted, d.answer, d.corrupted_answer)
    L, H, T = model.config.n_layer, model.config.n_head, d.clean.shape[1]
    print(f"{desc}\ntorch threads: {torch.get_num_threads()}, batch {args.batch}, sequence length {T}")

    hm = HookManager(model)
    heads = patching_runs.validate_components(
        hm, [ap.Component(f"transformer.h.{l}.attn.hook_z", h) for l in range(L) for h in range(H)], T)
    with torch.no_grad():  # each path's setup alone: every position for one-at-a-time, the shortcuts' for batched
        one_setup = best_of(lambda: patching_runs.setup_forward(model, hm, d.clean, d.corrupted, heads, False),
                            args.repeats)
        batched_setup = best_of(lambda: patching_runs.setup_forward(model, hm, d.clean, d.corrupted, heads, True),
                                args.repeats)
    batched = best_of(lambda: ap.patch_heads(*pair), args.repeats)
    one = best_of(lambda: ap.patch_heads(*pair, batched=False), args.repeats)
    by_pos_batched = best_of(lambda: ap.patch_heads_by_position(*pair), args.repeats)
    by_pos_one = best_of(lambda: ap.patch_heads_by_position(*pair, batched=False), 1)
    res = {
        "model": desc, "threads": torch.get_num_threads(), "batch": args.batch, "seq": T,
        "patch_heads": {"components": L * H, "batched_s": batched, "one_at_a_time_s": one,
                        "speedup": one / batched, "one_at_a_time_setup_s": one_setup,
                        "batched_setup_s": batched_setup},
        "patch_heads_by_position": {"components": L * H * T, "batched_s": by_pos_batched,
                                    "one_at_a_time_s": by_pos_one, "speedup": by_pos_one / by_pos_batched},
    }
    print("\nper-head patching (s)        components  batched  one-at-a-time  speedup")
    for key in ("patch_heads", "patch_heads_by_position"):
        r = res[key]
        print(f"  {key:<26} {r['components']:>10}  {r['batched_s']:7.4f}  {r['one_at_a_time_s']:13.4f}"
              f"  {r['speedup']:6.1f}x")
    print(f"  patch_heads, one at a time: hooked clean+corrupted forward {one_setup:.4f} s"
          f" + {L * H} hooked forwards {one - one_setup:.4f} s")
    print(f"  patch_heads, batched: the shared prefix once, then clean+corrupted after it {batched_setup:.4f} s"
          f"\n      + one stacked forward per layer for the {L * H} patched copies {batched - batched_setup:.4f} s")

    suite = {name: best_of(fn, args.repeats) for name, fn in metric_suite(model, allowed, seq_len, args.batch, gen).items()}
    res["metric_suite_s"] = suite
    res["metric_suite_total_s"] = sum(t for name, t in suite.items() if not name.startswith("patch_suite"))
    print("\nfull metric suite for one checkpoint (s)")
    for name, t in suite.items():
        print(f"  {name:<40} {t:8.4f}")
    print(f"  {'total (without patch_suite)':<40} {res['metric_suite_total_s']:8.4f}")
    if args.json:
        write_json(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
