"""The analysis W&B run, read back from its offline records with `wandb leet inspect --json`."""

import pytest
from analysis_helpers import analysis_run_records, cfg_for, check_analysis_run, make_run

from induction_dynamics.analysis.driver import analyze


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
