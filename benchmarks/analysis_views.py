"""What do the research views add to the analysis of one checkpoint? Side by side, one process.

    OMP_NUM_THREADS=2 python benchmarks/analysis_views.py            # quickstart shape, 48 checkpoints

On checkpoints of the quickstart's shape (2 layers x 4 heads x 64 dims, block 64, the
Shakespeare vocabulary; weights random: time does not depend on them), times (best of
--repeats, seconds):
  1. the sweep's worker per checkpoint: the metric suite (``worker.checkpoint_rows``, default
     suite) vs what the attention figure adds to it (every head's pattern on the fixed [x, x],
     written to the cache);
  2. per run: gathering those patterns and drawing the attention figure (PNG + PDF + panels),
     and that divided by the number of checkpoints;
  3. the CircuitsVis view of one checkpoint (``attention.attention_html``);
  4. ``analyze_checkpoint`` on one checkpoint (config, validation text, prompts, suite) vs the
     sweep's worker on it;
  5. per checkpoint, the default suite without ``composition``, ``composition`` alone and the
     opt-in ``llc`` alone (its SGLD settings from ``analysis/suite=llc``): what each view adds.
Run it alone: other processes on the same cores distort every figure.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pandas as pd
import torch
from analysis_speed import best_of  # noqa: E402  (benchmarks/ is the script's folder)

from induction_dynamics import run_dir as R
from induction_dynamics.analysis import analyze_checkpoint, worker
from induction_dynamics.analysis import attention as A
from induction_dynamics.analysis.notebook import analysis_config
from induction_dynamics.analysis.phase import PhaseChange
from induction_dynamics.analysis.plots import attention as V
from induction_dynamics.analysis.prompts import prompts_for
from induction_dynamics.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    save_atomic,
)
from induction_dynamics.data import load_data
from induction_dynamics.data.vocab import Vocab
from induction_dynamics.interpretability.attention_analysis import attention_patterns
from induction_dynamics.model import GPT, GPTConfig
from induction_dynamics.run_dir import history_path

SHAPE = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, dropout=0.0, bias=False, attn_only=False)
DATA = {"name": "shakespeare", "val_frac": 0.1, "repeat_frac": 1.0, "repeat_kind": "random",
        "repeat_min": 10, "repeat_max": 26}


def write_run(run_dir: Path, n_ckpt: int, every: int = 100) -> list[int]:
    data = load_data(**{k: v for k, v in DATA.items() if k in ("name", "val_frac")})
    args = {**SHAPE, "vocab_size": data.vocab_size}
    steps = [i * every for i in range(n_ckpt)]
    for i, step in enumerate(steps):
        torch.manual_seed(i)
        model = GPT(GPTConfig(**args))
        save_atomic({"model": model.state_dict(), "model_args": args, "iter_num": step, "step": step,
                     "tokens_seen": step * 2048, "vocab": data.vocab, "token_counts": data.counts.tolist(),
                     "config": {"seed": 0, "data": DATA, "train": {"max_iters": steps[-1]}}, "val_loss": None},
                    history_path(run_dir, step))
    return steps


def main() -> None:
    ap_ = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap_.add_argument("--ckpts", type=int, default=48, help="checkpoints per run (the quickstart has 48)")
    ap_.add_argument("--repeats", type=int, default=3)
    a = ap_.parse_args()
    out = {"threads": torch.get_num_threads(), "checkpoints": a.ckpts, "shape": SHAPE}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        steps = write_run(run_dir, a.ckpts)
        cfg = analysis_config("default")
        ckpt = load_checkpoint(history_path(run_dir, steps[-1]))
        prompts = prompts_for(ckpt, ckpt["config"], cfg)
        model = model_from_checkpoint(ckpt)
        seq = prompts.induction[0]
        labels = Vocab.from_checkpoint(ckpt).labels(seq)

        def patterns_for(step):
            p = attention_patterns(model, seq)[:, 0].float().numpy()
            A.write_checkpoint_patterns(R.attention_cache_path(run_dir, step), p, seq.tolist(), labels)

        suite_s = best_of(lambda: worker.checkpoint_rows(model, ckpt, steps[-1], prompts, cfg.suite.metrics), a.repeats)
        attn_s = best_of(lambda: patterns_for(steps[-1]), a.repeats)
        out["1_suite_s_per_ckpt"] = suite_s
        out["1_attention_patterns_s_per_ckpt"] = attn_s
        out["1_attention_patterns_frac_of_suite"] = attn_s / suite_s

        for s in steps:  # every checkpoint's patterns in the cache, as after a sweep
            patterns_for(s)
        table = analyze_checkpoint(ckpt).assign(step=steps[-1])
        mid = steps[len(steps) // 2]
        phase = PhaseChange("induction_score_max", True, mid_step=mid, start_step=mid - 150, end_step=mid + 150)
        phase = pd.DataFrame([phase.as_dict()])

        def figure():
            hist = A.save_history(run_dir)
            V.plot_attention_over_training(table, phase, hist, run_dir / "plots", ["png", "pdf"], 120)

        fig_s = best_of(figure, a.repeats)
        out["2_figure_s_per_run"] = fig_s
        out["2_figure_s_per_ckpt"] = fig_s / len(steps)
        hist = A.load_history(run_dir)
        out["3_circuitsvis_html_s_per_ckpt"] = best_of(
            lambda: V.attention_html(hist.at(steps[-1]), hist.labels, run_dir / "v.html"), a.repeats)
        out["3_circuitsvis_html_bytes"] = (run_dir / "v.html").stat().st_size

        path = history_path(run_dir, steps[-1])
        one = best_of(lambda: analyze_checkpoint(path), a.repeats)
        worker = best_of(lambda: worker.cache_checkpoint(str(run_dir), "run", steps[-1], str(path), prompts,
                                                          list(cfg.suite.metrics), shape_args(ckpt), "bench"), a.repeats)
        out["4_analyze_checkpoint_s"] = one
        out["4_sweep_worker_s"] = worker
        out["4_ratio"] = one / worker

        metrics = [m for m in cfg.suite.metrics if m != "composition"]
        out["5_suite_without_composition_s"] = best_of(
            lambda: worker.checkpoint_rows(model, ckpt, steps[-1], prompts, metrics), a.repeats)
        out["5_composition_s"] = best_of(
            lambda: worker.checkpoint_rows(model, ckpt, steps[-1], prompts, ["composition"]), a.repeats)
        llc_prompts = prompts_for(ckpt, ckpt["config"], analysis_config("llc"))
        out["5_llc_s"] = best_of(lambda: worker.checkpoint_rows(model, ckpt, steps[-1], llc_prompts, ["llc"]),
                                 max(1, a.repeats - 2))  # seconds per call: one or two calls tell it
    print(json.dumps(out, indent=2))


def shape_args(ckpt: dict) -> dict:
    return {k: ckpt["model_args"].get(k) for k in worker.SHAPE_FIELDS}


if __name__ == "__main__":
    main()
