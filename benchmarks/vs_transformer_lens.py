"""The toolkit against TransformerLens on the same weights, side by side in one process.

    python benchmarks/vs_transformer_lens.py --ckpt outputs/quickstart/checkpoints/step_004000.pt
    python benchmarks/vs_transformer_lens.py --run outputs/quickstart      # its last checkpoint

Needs the ``[tl]`` extra. The model goes to TransformerLens through
``export.to_hooked_transformer`` (unfolded weights: same logits), and both sides get the
inputs the analysis sweep gives that checkpoint (``prompts.prompts_for`` with the default
analysis settings: the run's own validation text). Each side's best of --repeats rounds, a
round timing one call of ours and one of TransformerLens's in turn; in order:

  logits          model(text windows)                 vs  HookedTransformer(text windows)
  induction       metrics.induction_scores            vs  run_with_cache(patterns) + the same score
  previous-token  metrics.previous_token_scores       vs  run_with_cache(patterns) + the same score
  per-head patching  activation_patching.patch_heads  vs  clean run_with_cache + corrupted run +
                  transformer_lens.patching.get_act_patch_attn_head_out_all_pos (same metric)
  logit lens      logit_lens.logit_lens               vs  run_with_cache(residuals) + ln_final + unembed

Both sides compute what the analysis needs and no more, each with its own library's means:
ours stops the forward at the last attention pattern (``run_with_cache(stop_early=True)``)
and runs the logit lens's last block for the target position's query alone; TransformerLens's
``stop_at_layer`` stops only between blocks, and the last layer's pattern needs that block.
Each pair is checked to agree (max |difference| printed) before it is timed. Run it alone
(``flock`` on a shared machine): another process on the same cores distorts every figure.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens's patching loop draws a progress bar

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from induction_dynamics.analysis.config import AnalyzeConfig  # noqa: E402
from induction_dynamics.analysis.prompts import prompts_for, train_config_of  # noqa: E402
from induction_dynamics.checkpoint import load_checkpoint, model_from_checkpoint
from induction_dynamics.files import write_json  # noqa: E402
from induction_dynamics.interpretability import activation_patching as ap  # noqa: E402
from induction_dynamics.interpretability import logit_lens as ll  # noqa: E402
from induction_dynamics.interpretability import metrics as M  # noqa: E402
from induction_dynamics.run_dir import list_checkpoints  # noqa: E402


def best_of_interleaved(ours, theirs, repeats: int) -> tuple[float, float]:
    """Best time of each over ``repeats`` rounds that run one call of each in turn, so a drift in
    the machine's speed (other tenants, clock) reaches both sides alike."""
    ours(), theirs()  # warm-up (allocator, lazy init)
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((ours, theirs)):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]


def tl_side(tl, prompts):
    """The five analyses done with TransformerLens, each returning what ours returns."""
    from importlib.metadata import version

    from transformer_lens.patching import get_act_patch_attn_head_out_all_pos

    p, d = prompts, prompts.patching
    L = tl.cfg.n_layers
    rows = torch.arange(len(d.answer))

    def patterns(tokens):
        _, cache = tl.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
        return torch.stack([cache["pattern", l] for l in range(L)])  # (L, B, nh, T, T)

    def induction():
        return torch.stack([M.induction_score_from_pattern(a, p.induction_seq_len) for a in patterns(p.induction)])

    def previous_token():
        return patterns(p.text).diagonal(offset=-1, dim1=-2, dim2=-1).mean((1, 3))

    def logit_diff(logits):
        last = logits[:, -1]
        return (last[rows, d.answer] - last[rows, d.corrupted_answer]).mean()

    def patch_heads():
        clean_logits, clean_cache = tl.run_with_cache(d.clean)
        clean_ld, corr_ld = logit_diff(clean_logits), logit_diff(tl(d.corrupted))
        return get_act_patch_attn_head_out_all_pos(
            tl, d.corrupted, clean_cache, lambda logits: (logit_diff(logits) - corr_ld) / (clean_ld - corr_ld))

    def logit_lens():
        _, cache = tl.run_with_cache(d.clean, names_filter=lambda n: n.endswith(("hook_resid_pre", "hook_resid_post")))
        resid = cache.accumulated_resid(pos_slice=-1)  # (L+1, B, C): embedding, then after each block
        probs = tl.unembed(tl.ln_final(resid[:, :, None]))[:, :, 0].softmax(-1)  # (L+1, B, V)
        target = probs.gather(-1, d.answer[None, :, None].expand(L + 1, -1, 1))
        return target[..., 0].mean(1)

    return {"logits": lambda: tl(p.text), "induction": induction, "previous-token": previous_token,
            "per-head patching": patch_heads, "logit lens": logit_lens}, version("transformer-lens")


def our_side(model, prompts):
    p, d = prompts, prompts.patching
    return {
        "logits": lambda: model(p.text)[0],
        "induction": lambda: M.induction_scores(model, p.induction, p.induction_seq_len),
        "previous-token": lambda: M.previous_token_scores(model, p.text),
        "per-head patching": lambda: ap.patch_heads(model, d.clean, d.corrupted, d.answer, d.corrupted_answer),
        "logit lens": lambda: ll.logit_lens(model, d.clean, target_position=-1, target=d.answer).target_probs,
    }


def main(argv=None) -> int:
    ap_ = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap_.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a checkpoint file of a training run")
    src.add_argument("--run", help="a training run directory: its last checkpoint")
    ap_.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap_.add_argument("--repeats", type=int, default=50, help="timings are the best of this many rounds")
    ap_.add_argument("--json", help="also write the figures to this JSON file")
    args = ap_.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = args.ckpt or str(list_checkpoints(args.run)[-1][1])
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt)
    try:
        from induction_dynamics.interpretability.export import to_hooked_transformer
        tl = to_hooked_transformer(model)
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    margs = ckpt["model_args"]
    prompts = prompts_for(ckpt, train_config_of(ckpt, Path(path).parent.parent), OmegaConf.structured(AnalyzeConfig))
    theirs, tl_version = tl_side(tl, prompts)
    ours = our_side(model, prompts)
    print(f"{path}: {margs}\nTransformerLens {tl_version}, torch {torch.__version__}, {args.threads} threads, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), best of {args.repeats}")
    print(f"inputs: text {tuple(prompts.text.shape)}, induction {tuple(prompts.induction.shape)}, "
          f"patching {tuple(prompts.patching.clean.shape)}\n")
    res = {"checkpoint": path, "model_args": margs, "transformer_lens": tl_version, "torch": torch.__version__,
           "threads": args.threads, "repeats": args.repeats, "items": {}}
    print(f"{'':<18} {'ours (ms)':>10} {'TL (ms)':>10} {'ratio':>7}  max |ours - TL|")
    with torch.no_grad():
        for name in ours:
            diff = (ours[name]().float() - theirs[name]().float()).abs().max().item()
            t_ours, t_tl = best_of_interleaved(ours[name], theirs[name], args.repeats)
            res["items"][name] = {"ours_s": t_ours, "tl_s": t_tl, "ratio": t_tl / t_ours, "max_abs_diff": diff}
            print(f"{name:<18} {1e3 * t_ours:10.2f} {1e3 * t_tl:10.2f} {t_tl / t_ours:6.1f}x  {diff:.1e}")
    t_ours = sum(r["ours_s"] for r in res["items"].values())
    t_tl = sum(r["tl_s"] for r in res["items"].values())
    res["set"] = {"ours_s": t_ours, "tl_s": t_tl, "ratio": t_tl / t_ours}
    print(f"{'the set of five':<18} {1e3 * t_ours:10.2f} {1e3 * t_tl:10.2f} {t_tl / t_ours:6.1f}x")
    if args.json:
        write_json(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
