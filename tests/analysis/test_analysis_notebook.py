"""analyze_checkpoint / load_results: one checkpoint's rows in a notebook equal the sweep's, no file written."""

import shutil

import pandas as pd
import pytest
import torch
from analysis_helpers import DATA, FAST, FAST_WINDOWS, cfg_for, make_run

from induction_dynamics.analysis import analyze_checkpoint, load_results
from induction_dynamics.analysis.driver import analyze
from induction_dynamics.analysis.table import COLUMNS
from induction_dynamics.checkpoint import load_checkpoint, model_from_checkpoint
from induction_dynamics.data import load_data
from induction_dynamics.errors import AnalysisError
from induction_dynamics.run_dir import history_path


def files_under(*roots):
    return {p: p.stat().st_mtime_ns for root in roots for p in root.rglob("*")}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("nb") / "sweep"
    for seed in (0, 1):
        make_run(root / f"seed{seed}", seed, steps=(0, 4, 8))
    return root


def test_rows_equal_the_sweeps_and_no_file_is_written(sweep, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = files_under(sweep, tmp_path)
    windows = [f"suite.text_windows={FAST_WINDOWS}"]  # as the sweep below (FAST)
    rows = {s: analyze_checkpoint(history_path(sweep / "seed1", s), overrides=windows) for s in (0, 8)}
    fast = analyze_checkpoint(history_path(sweep / "seed1", 8), suite="fast", overrides=["seed=7"])
    assert files_under(sweep, tmp_path) == before  # nothing written, nothing touched

    analysed = tmp_path / "analysed"
    shutil.copytree(sweep, analysed)
    analyze(cfg_for(analysed / "seed1", *FAST))
    saved = load_results(analysed / "seed1")
    assert list(saved.columns) == COLUMNS and set(saved["step"]) == {0, 4, 8}
    for s, got in rows.items():
        want = saved[saved["step"] == s].reset_index(drop=True)
        assert len(want) > 20
        pd.testing.assert_frame_equal(got, want)
    assert set(fast["metric"]) == {"induction_score", "previous_token_score", "icl_score", "icl_score_repeats",
                                   "text_loss", "induction_loss_first", "induction_loss_second", "val_loss"}
    # another prompt seed: other prompts, other values
    base = rows[8][rows[8]["metric"] == "induction_score"]["value"].to_numpy()
    assert not (fast[fast["metric"] == "induction_score"]["value"].to_numpy() == base).all()


def test_a_bare_model_needs_text_and_gives_the_checkpoints_head_scores(sweep):
    ckpt = load_checkpoint(history_path(sweep / "seed0", 8))
    model = model_from_checkpoint(ckpt)
    with pytest.raises(ValueError, match="needs data="):
        analyze_checkpoint(model, suite="fast")
    from_model = analyze_checkpoint(model, suite="fast", data=DATA)
    from_dict = analyze_checkpoint(ckpt, suite="fast")
    assert set(from_model["run"]) == {"model"} and set(from_model["step"]) == {-1}
    # token counts differ (a bare model has none), so random prompts draw from other tokens; the
    # text metrics see the same validation windows and agree exactly
    for metric in ("previous_token_score", "icl_score", "text_loss"):
        a = from_model[from_model["metric"] == metric]["value"].to_numpy()
        b = from_dict[from_dict["metric"] == metric]["value"].to_numpy()
        assert a.tolist() == b.tolist(), metric
    val = load_data(**DATA).val
    with_tokens = analyze_checkpoint(model, suite="fast", val_tokens=val)
    # data= also gives the training text's token counts (the prompts' tokens); bare token ids do
    # not, so only the text metrics must agree
    text = with_tokens["metric"].isin(["previous_token_score", "icl_score", "text_loss"])
    pd.testing.assert_frame_equal(with_tokens[text].reset_index(drop=True),
                                  from_model[from_model["metric"].isin(["previous_token_score", "icl_score",
                                                                        "text_loss"])].reset_index(drop=True))


def test_load_results_of_a_sweep(sweep, tmp_path):
    root = tmp_path / "sweep"
    shutil.copytree(sweep, root)
    with pytest.raises(AnalysisError, match="no saved analysis"):
        load_results(root)
    for seed in (0, 1):  # analysed run by run: the folder has no combined table, its runs' are joined
        analyze(cfg_for(root / f"seed{seed}", *FAST, "analysis/suite=fast"))
    joined = load_results(root)
    assert sorted(joined["run"].unique()) == ["seed0", "seed1"] and set(joined["seed"]) == {0, 1}
    analyze(cfg_for(root, *FAST, "analysis/suite=fast"))  # the whole sweep: its combined table
    combined = load_results(root)
    pd.testing.assert_frame_equal(combined.sort_values(COLUMNS).reset_index(drop=True),
                                  joined.sort_values(COLUMNS).reset_index(drop=True))
    assert torch.equal(torch.tensor(sorted(combined["step"].unique())), torch.tensor([0, 4, 8]))
