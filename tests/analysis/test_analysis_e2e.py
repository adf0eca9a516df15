"""Slow end to end: train a tiny model with train.py (2 seeds), analyse the sweep, check everything."""

import os
import shutil
import subprocess
import sys

import matplotlib.image as mpimg
import pandas as pd
import pytest
from analysis_helpers import REPO, check_analysis_run, records, run_entry

from induction_dynamics.analysis import registry
from induction_dynamics.analysis.plots import PLOT_NAMES

pytestmark = pytest.mark.slow

STEPS = [0, 10, 20, 30]
N_LAYER, N_HEAD = 1, 4
TRAIN = ["experiment=synthetic_attn_only", "train.max_iters=30", "checkpoint.every=10",
         "checkpoint.schedule=linear", "train.eval_every=10", f"model.n_layer={N_LAYER}", "model.n_embd=32",
         f"model.n_head={N_HEAD}"]


@pytest.fixture(scope="module")
def trained_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    sweep = tmp / "sweep"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "-m", "seed=0,1", *TRAIN,
                           f"hydra.sweep.dir={sweep}"], cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.parent for p in sweep.rglob("checkpoints"))
    assert len(runs) == 2
    return tmp, sweep, runs


def training_run(run_dir):
    for path in sorted((run_dir / "wandb").glob("offline-run-*")):
        recs = records(path)
        run = next(r["run"] for r in recs if r["type"] == "run")
        if run.get("job_type") != "analysis":
            return run
    raise AssertionError(f"no training W&B run in {run_dir}")


def test_train_then_analyse_the_sweep(trained_sweep):
    tmp, sweep, runs = trained_sweep
    proc = run_entry(f"run_dir={sweep}", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "phase change (median [95 % bootstrap interval] across runs):" in proc.stdout
    assert "induction_score_max" in proc.stdout and "icl_score" in proc.stdout

    table = pd.read_parquet(sweep / "analysis" / "results.parquet")
    assert table["run"].nunique() == 2 and set(table["seed"]) == {0, 1}
    # attention-only model: no MLP to patch; one layer: no head pairs to compose; llc is opt-in
    levels = {m.name: m.level for m in registry.METRICS if m.level not in ("pair", "token")}
    expected = set(levels) - {"patch_mlp_out", "llc", "llc_std"}
    for (run, step), g in table.groupby(["run", "step"]):
        assert set(g["metric"]) == expected, (run, step)
        for metric in expected:
            level = levels[metric]
            cells = set(zip(g.loc[g.metric == metric, "layer"], g.loc[g.metric == metric, "head"]))
            if level == "head":
                assert cells == {(l, h) for l in range(N_LAYER) for h in range(N_HEAD)}, metric
            elif metric.startswith("logit_lens_") and level == "layer":
                assert cells == {(l, -1) for l in range(N_LAYER + 1)}, metric
            elif level == "layer":
                assert cells == {(l, -1) for l in range(N_LAYER)}, metric
    for run in table["run"].unique():
        assert sorted(table.loc[table.run == run, "step"].unique()) == STEPS
    assert (table.loc[table.metric == "val_loss", "value"] > 0).all()

    phase = pd.read_csv(sweep / "analysis" / "phase_change.csv")
    assert len(phase) == 6 and set(phase["metric"]) == {"induction_score_max", "icl_score", "icl_score_repeats"}
    summary = pd.read_csv(sweep / "analysis" / "phase_change_summary.csv")
    assert list(summary["n_runs"]) == [2, 2, 2]

    for d in [sweep / "plots"] + [r / "plots" for r in runs]:
        for name in set(PLOT_NAMES) - {"composition"}:  # one layer: no head pair
            assert mpimg.imread(d / f"{name}.png").size > 0
            assert (d / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"

    for run_dir in runs:
        train_run = training_run(run_dir)
        seed = int(pd.read_parquet(run_dir / "analysis" / "results.parquet")["seed"].iloc[0])
        check_analysis_run(run_dir, steps=STEPS, seed=seed, group=train_run["run_group"],
                           project=train_run["project"])


def test_one_job_per_run_dir_with_submitit_local(trained_sweep, tmp_path):
    tmp, _, runs = trained_sweep
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(runs[0], a, ignore=shutil.ignore_patterns("analysis", "plots", "wandb"))
    shutil.copytree(runs[1], b, ignore=shutil.ignore_patterns("analysis", "plots", "wandb"))
    proc = run_entry("-m", f"run_dir={a},{b}", "hydra/launcher=submitit_local", "threads=1",
                     "wandb.mode=disabled", "plots.formats=[png]", f"hydra.sweep.dir={tmp_path / 'jobs'}",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = sorted((tmp_path / "jobs" / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2  # two separate jobs
    for run_dir in (a, b):
        table = pd.read_parquet(run_dir / "analysis" / "results.parquet")
        assert sorted(table["step"].unique()) == STEPS
        assert (run_dir / "plots" / "induction_heatmap.png").is_file()
