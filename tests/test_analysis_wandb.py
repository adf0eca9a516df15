"""The analysis W&B run, read back from its offline records with `wandb leet inspect --json`."""

import json
import subprocess

import pytest

from induction_dynamics.analysis.pipeline import analyze
from test_analysis_helpers import make_run
from test_analysis_sweep import cfg_for


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
                "analysis/induction_loss_second", "analysis/patch_resid/L0", "analysis/patch_head/L0H1",
                "analysis/logit_lens_convergence_layer", "analysis/logit_lens_prob/L0", "analysis/tokens_seen"):
        assert all(key in i for i in curves), key
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


def test_analysis_run_logged_against_training_iterations(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = make_run(tmp_path / "run", 0, steps=(0, 4, 8, 12), group="my-group")
    analyze(cfg_for(run_dir, "plots.formats=[png]"))
    check_analysis_run(run_dir, steps=[0, 4, 8, 12], seed=0, group="my-group", project="induction-dynamics-tests")


@pytest.mark.parametrize("override,group", [("wandb.group=elsewhere", "elsewhere")])
def test_group_override(tmp_path, monkeypatch, override, group):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = make_run(tmp_path / "run", 2, steps=(0, 2, 4, 6))
    analyze(cfg_for(run_dir, "plots.formats=[]", "analysis/suite=fast", override))
    run, _ = analysis_run_records(run_dir)
    assert run["run_group"] == group and run["job_type"] == "analysis"
