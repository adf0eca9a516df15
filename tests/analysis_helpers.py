"""Helpers for the analysis tests: tiny runs written in the trainer's checkpoint format, the
analysis config for them, and the analysis W&B run read back from its offline records.

Not a stand-in for the trainer: the checkpoints are real GPT weights, trained for a few
steps on repeated random sequences between checkpoints so that metrics move, and saved with
``checkpoint.save_atomic`` in the documented format (see checkpoint.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from hydra import compose, initialize_config_dir

import induction_dynamics.analysis.config  # noqa: F401  (registers the schema cfg_for composes)
from induction_dynamics.checkpoint import save_atomic
from induction_dynamics.data import load_data
from induction_dynamics.model import GPT, GPTConfig
from induction_dynamics.run_dir import history_path

REPO = Path(__file__).resolve().parents[1]
DATA = {"name": "synthetic", "synthetic_vocab_size": 26, "val_frac": 0.1}
SHAPE = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, dropout=0.0, bias=True, attn_only=False)


def make_run(run_dir: Path, seed: int, steps=(0, 5, 10, 15), *, shape: dict | None = None,
             group: str = "test-group", iters_per_step: int = 1, batch: int = 8, lr: float = 3e-3) -> Path:
    """Write checkpoints at ``steps`` of a tiny model trained on [x, x] sequences."""
    torch.manual_seed(seed)
    data = load_data(**DATA)
    args = {**SHAPE, **(shape or {}), "vocab_size": data.vocab_size}
    model = GPT(GPTConfig(**args))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    T = args["block_size"]
    g = torch.Generator().manual_seed(seed)
    config = {"seed": seed, "data": DATA, "model": {k: args[k] for k in SHAPE},
              "train": {"max_iters": max(steps), "batch_size": batch},
              "wandb": {"mode": "offline", "project": "induction-dynamics-tests", "group": group,
                        "name": f"tiny-seed{seed}"}}
    done = 0
    for step in steps:
        while done < step:
            for _ in range(iters_per_step):
                half = torch.stack([torch.randperm(data.vocab_size, generator=g)[: T // 2] for _ in range(batch)])
                x = half.repeat(1, 2)  # (batch, T)
                _, loss = model(x[:, :-1].contiguous(), x[:, 1:].contiguous())
                opt.zero_grad()
                loss.backward()
                opt.step()
            done += 1
        ckpt = {"model": model.state_dict(), "model_args": args, "iter_num": step, "step": step,
                "tokens_seen": step * batch * T, "vocab": data.vocab, "token_counts": data.counts.tolist(),
                "config": config, "val_loss": 3.0 - 0.01 * step}
        save_atomic(ckpt, history_path(run_dir, step))
    (run_dir / "config.yaml").write_text("seed: %d\n" % seed)
    return run_dir


def run_entry(*overrides: str, cwd: Path, env_extra: dict | None = None, pre: str = "",
              timeout: int = 600) -> subprocess.CompletedProcess:
    """Run analyze_checkpoints.py in a subprocess (``pre``: Python run before the entry point)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
           **(env_extra or {})}
    code = (f"{pre}\nimport sys, runpy\nsys.argv = ['analyze_checkpoints.py'] + {list(overrides)!r}\n"
            f"runpy.run_path({str(REPO / 'analyze_checkpoints.py')!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


# tables only (the plots have their own tests), 64 text windows: the default 2,048 make every analysis
# of a tiny model take seconds, and these tests check what the sweep writes, not the scores' precision
FAST_WINDOWS = 64
FAST = ["wandb.mode=disabled", "plots.formats=[]", f"suite.text_windows={FAST_WINDOWS}"]


def cfg_for(run_dir, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("analyze", overrides=[f"run_dir={run_dir}", *overrides])


# --------------------------------------------------------------------------- the analysis W&B run

def records(run_path):
    out = subprocess.run(["wandb", "leet", "inspect", "--json", str(run_path)], capture_output=True,
                         text=True, check=True, timeout=120).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def analysis_run_records(run_dir):
    found = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*")):
        recs = records(path)
        run = next(r["run"] for r in recs if r["type"] == "run")
        if run.get("job_type") == "analysis":
            found.append((run, recs))
    assert len(found) == 1, f"expected one analysis run in {run_dir / 'wandb'}, found {len(found)}"
    return found[0]


def history(recs):
    return [r["history"]["item"] for r in recs if r["type"] == "history"]


def check_analysis_run(run_dir, *, steps, seed, group, project):
    """The checks shared with the end-to-end test: names, keys at the training iterations."""
    run, recs = analysis_run_records(run_dir)
    assert run["run_group"] == group and run["project"] == project
    assert f"seed{seed}" in run["display_name"]
    items = history(recs)
    curves = [i for i in items if "analysis/induction_score_max" in i]
    assert sorted(i["iter"] for i in curves) == sorted(steps)
    for key in ("analysis/induction_score/L0H0", "analysis/prefix_matching_score_max", "analysis/icl_score",
                "analysis/induction_loss_second", "analysis/patch_clean_logit_diff",
                "analysis/logit_lens_convergence_layer", "analysis/logit_lens_prob/L0", "analysis/tokens_seen"):
        assert all(key in i for i in curves), key
    # a normalised patching effect is NaN where the baselines' gap is within its noise, and NaN
    # is not logged: the key is there exactly at the steps where the table has a number
    table = pd.read_parquet(Path(run_dir) / "analysis" / "results.parquet")
    for key, metric, layer, head in (("analysis/patch_resid/L0", "patch_resid", 0, -1),
                                     ("analysis/patch_head/L0H1", "patch_head", 0, 1)):
        rows = table[(table["metric"] == metric) & (table["layer"] == layer) & (table["head"] == head)]
        defined = {int(s) for s, v in zip(rows.step, rows.value) if np.isfinite(v)}
        logged = {int(i["iter"]) for i in curves if key in i}
        assert logged == defined, (key, logged, defined)
    markers = [i for i in items if "analysis/phase_window/induction_score_max" in i]
    assert sorted(i["iter"] for i in markers) == sorted(steps)
    images = {k.split(".")[0] for i in items for k in i if k.startswith("analysis/plots/")}
    assert "analysis/plots/induction_heatmap" in images
    assert any(i.get("analysis/checkpoints._type") == "table-file" and i["analysis/checkpoints.nrows"] == len(steps)
               for i in items)
    summary = {}
    for r in recs:
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    assert "analysis/phase/induction_score_max/detected" in summary
    assert summary["analysis/prompts/icl_late"] > summary["analysis/prompts/icl_early"]
    return run, items


PATCHING_EFFECTS = ("patch_resid", "patch_attn_out", "patch_mlp_out", "patch_head", "attribution_patch_head")


def undefined_patching_steps(table) -> set[int]:
    """Steps whose normalised patching effects are undefined: the clean - corrupted gap
    (``patch_baseline_gap``) is within 2 standard errors of 0, so the table holds NaN there."""
    gap = table[table["metric"] == "patch_baseline_gap"]
    return set(gap.loc[gap["value"].abs() <= 2 * gap["stderr"], "step"].tolist())
