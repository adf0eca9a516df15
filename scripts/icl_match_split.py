"""What can an induction head do for the ICL score on this text? Split the late loss by match.

    python scripts/icl_match_split.py RUN_DIR [CONTROL_RUN_DIR] --step 6000 [--k 4]

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
certain and right wherever copying helps and lost nothing anywhere else.
Results for the quickstart and the unigram curriculum are in docs/phase_change.md.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from induction_dynamics.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from induction_dynamics.data import DataError, load_data
from induction_dynamics.interpretability import metrics


def late_split(model, tokens: torch.Tensor, k: int) -> dict:
    """Share and mean late loss of the predictive / misleading / no-match positions."""
    loss = torch.cat([metrics.per_token_losses(model, tokens[i:i + 512]) for i in range(0, len(tokens), 512)])
    predictive, misleading = metrics.earlier_match_masks(tokens, k)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("control_dir", nargs="?")
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--k", type=int, default=4, help="prefix length a match must share (default 4)")
    p.add_argument("--windows", type=int, default=2048)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    try:
        ckpts = {d: load_checkpoint(f"{d}/checkpoints/step_{args.step:06d}.pt") for d in filter(None, [args.run_dir, args.control_dir])}
        d = next(iter(ckpts.values()))["config"]["data"]
        data = load_data(d["name"], path=d["path"], cache_dir=d["cache_dir"], val_frac=d["val_frac"])
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    T = next(iter(ckpts.values()))["model_args"]["block_size"]
    g = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, len(data.val) - T, (args.windows,), generator=g)
    tokens = torch.stack([data.val[s:s + T] for s in starts.tolist()])
    with torch.no_grad():
        result = {run: late_split(model_from_checkpoint(c), tokens, args.k) for run, c in ckpts.items()}
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
