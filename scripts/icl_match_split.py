"""What can an induction head do for the ICL score on this text? Split the late loss by match.

    python scripts/icl_match_split.py RUN_DIR [CONTROL_RUN_DIR] --step 6000 [--k 4]
    python scripts/icl_match_split.py RUN_DIR [CONTROL_RUN_DIR] --every 300    # the curve

The ICL score (``metrics.icl_score``) is the loss late in the context minus early. An
induction head can only change the late loss where the text repeats: at position t it
copies the token that followed an earlier occurrence of the last k tokens. This script
draws fixed plain-text windows from the run's validation split and, for the late part of
the context (the last eighth of the positions, which ends at the ICL score's late position),
splits the per-token loss by ``metrics.earlier_match_masks``:

  predictive  an earlier k-token match is followed by the true next token (copying helps)
  misleading  matches exist, none followed by it (copying hurts)
  no match    nothing to copy

and prints each group's share and mean loss, for the run and (optionally) a control
checkpoint at the same step (e.g. the one-layer model), plus the *perfect-copier bound*:
share(predictive) x loss(predictive), the most the late loss could fall if the model became
certain and right wherever copying helps and lost nothing anywhere else. With ``--every N``
it prints one line per history checkpoint at a multiple of N instead (the same windows for
every step): the predictive-position loss falls in the induction window when the head
copies on text, even where the ICL score, an average over all positions, stays flat.
Results for the quickstart and the unigram curriculum are in docs/phase_change.md.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from induction_dynamics.checkpoint import load_checkpoint, model_from_checkpoint
from induction_dynamics.data import load_data
from induction_dynamics.errors import CheckpointError, DataError
from induction_dynamics.interpretability import metrics
from induction_dynamics.run_dir import list_checkpoints


def late_split(model, tokens: torch.Tensor, k: int) -> dict:
    """Share and mean late loss of the predictive / misleading / no-match positions."""
    chunks = [tokens[i:i + 512] for i in range(0, len(tokens), 512)]  # bounded memory at long blocks
    loss = torch.cat([metrics.per_token_losses(model, c) for c in chunks])
    masks = [metrics.earlier_match_masks(c, k) for c in chunks]
    predictive, misleading = torch.cat([m[0] for m in masks]), torch.cat([m[1] for m in masks])
    n = loss.shape[1]
    late = slice(n - max(1, n // 8), n)
    groups = {"predictive": predictive, "misleading": misleading, "no match": ~(predictive | misleading)}
    out = {"late loss": loss[:, late].mean().item()}
    for name, mask in groups.items():
        m = mask[:, late]
        out[name] = {"share": m.float().mean().item(), "loss": loss[:, late][m].mean().item() if m.any() else float("nan")}
    out["share predictive at the ICL late position"] = predictive[:, -1].float().mean().item()
    out["perfect-copier bound"] = out["predictive"]["share"] * out["predictive"]["loss"]
    return out


def _load(path):
    return model_from_checkpoint(load_checkpoint(path))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("control_dir", nargs="?")
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--step", type=int, help="one checkpoint: the full split as JSON")
    when.add_argument("--every", type=int, help="every history checkpoint at a multiple of this: one line each")
    p.add_argument("--k", type=int, default=4, help="prefix length a match must share (default 4)")
    p.add_argument("--windows", type=int, default=2048)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    runs = [d for d in (args.run_dir, args.control_dir) if d]
    try:
        if args.step is not None:
            steps = [args.step]
            paths = {d: {args.step: f"{d}/checkpoints/step_{args.step:06d}.pt"} for d in runs}
        else:
            paths = {d: {s: p for s, p in list_checkpoints(d) if s % args.every == 0} for d in runs}
            steps = sorted(set.intersection(*(set(v) for v in paths.values())))
            if not steps:
                raise CheckpointError(f"no checkpoint at a multiple of {args.every} in {' and '.join(runs)}")
        first = load_checkpoint(paths[args.run_dir][steps[0]])
        d = first["config"]["data"]
        data = load_data(d["name"], path=d["path"], cache_dir=d["cache_dir"], val_frac=d["val_frac"])
        T = first["model_args"]["block_size"]
        g = torch.Generator().manual_seed(args.seed)
        starts = torch.randint(0, len(data.val) - T, (args.windows,), generator=g)
        tokens = torch.stack([data.val[s:s + T] for s in starts.tolist()])
        with torch.no_grad():
            if args.step is not None:
                result = {run: late_split(_load(paths[run][args.step]), tokens, args.k) for run in runs}
            else:
                print("step  " + "  ".join(f"{run}: predictive / misleading / no-match loss" for run in runs))
                for step in steps:
                    splits = [late_split(_load(paths[run][step]), tokens, args.k) for run in runs]
                    print(f"{step:>6d}  " + "  ".join(
                        " / ".join(f"{r[n]['loss']:.3f}" for n in ("predictive", "misleading", "no match"))
                        for r in splits), flush=True)
                return 0
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1))
    if args.control_dir:
        r, c = result[args.run_dir], result[args.control_dir]
        for name in ("predictive", "misleading", "no match"):
            print(f"{name:10s} share {r[name]['share']:.3f}: run {r[name]['loss']:.3f}, control {c[name]['loss']:.3f}, "
                  f"run - control {r[name]['loss'] - c[name]['loss']:+.3f}")
        print(f"late loss, run - control: {r['late loss'] - c['late loss']:+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
