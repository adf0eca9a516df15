"""Checkpoints written before the renames (live probe -> monitor, probes -> prompts) still load
with ``weights_only=True`` and analyse to the numbers the code of that time computed.

tests/fixtures/pre_rename_run/ holds two checkpoints of a tiny quickstart run and the rows its
own analysis wrote for them (``expected.csv``); its README says how they were made.
"""

from pathlib import Path

import pandas as pd
import pytest
import torch
from analysis_helpers import PATCHING_EFFECTS, undefined_patching_steps

from induction_dynamics.analysis import analyze_checkpoint
from induction_dynamics.analysis.prompts import train_config_of
from induction_dynamics.interpretability import activation_patching

FIXTURE = Path(__file__).parent / "fixtures" / "pre_rename_run"
STEPS = (100, 300)
# The analysis settings the expected table was computed with (that run's run_info.json), pinned
# here so that a later change of a default does not read as a change of a metric.
OVERRIDES = ["seed=1234", "suite.batch_size=8", "suite.text_windows=16", "suite.patching_batch=8",
             "suite.metrics=[induction,prefix_matching,previous_token,duplicate_token,copying,ov_copying,"
             "icl,icl_repeats,token_loss,induction_loss,patching,attribution_patching,logit_lens]"]
# Every metric but the patching effects runs the same float32 operations as then and agrees to
# ~1e-16; 1e-5 leaves room for another thread count's reduction order. The patching effects
# (activation and attribution patching) are ratios of logit differences, normalised by the
# clean - corrupted gap, which amplify float32 rounding: activation patching now runs as one
# forward from a shared prefix's keys and values (summed in another order than the old separate
# implementation) and moved by up to 1.6e-5; attribution patching's backward pass moved by 1.06e-5
# in a fresh install whose BLAS rounds differently. So they get 5e-5. A changed metric moves by
# far more than either.
ATOL, ATOL_PATCHING = 1e-5, 5e-5
KEY = ["step", "metric", "layer", "head"]


def checkpoint(step: int) -> Path:
    return FIXTURE / "checkpoints" / f"step_{step:06d}.pt"


@pytest.mark.parametrize("step", STEPS)
def test_old_checkpoint_loads_weights_only(step):
    ckpt = torch.load(checkpoint(step), map_location="cpu", weights_only=True)
    assert ckpt["step"] == step and "model" in ckpt
    assert "probe" in ckpt["config"]  # written before the rename: the old key
    config = train_config_of(ckpt, None)  # as the analysis reads it: today's names
    assert "probe" not in config and config["monitor"] == ckpt["config"]["probe"]


def test_old_checkpoints_analyse_to_the_old_table(monkeypatch):
    want = pd.read_csv(FIXTURE / "expected.csv")
    assert set(want["step"]) == set(STEPS) and len(want) > 90
    # At these early checkpoints the clean - corrupted gap is within its noise, so today's
    # analysis leaves the normalised patching effects undefined (NaN) ...
    today = pd.concat([analyze_checkpoint(checkpoint(s), overrides=OVERRIDES) for s in STEPS], ignore_index=True)
    assert undefined_patching_steps(today) == set(STEPS)
    assert today.loc[today["metric"].isin(PATCHING_EFFECTS), "value"].isna().all()
    # ... which the old code computed anyway: with only a vanishing gap undefined, as then, the
    # same checkpoints give the old numbers
    monkeypatch.setattr(activation_patching, "MIN_GAP_Z", 0.0)
    got = pd.concat([analyze_checkpoint(checkpoint(s), overrides=OVERRIDES) for s in STEPS], ignore_index=True)
    both = want.merge(got, on=KEY, how="left", suffixes=("_old", "_new"), validate="one_to_one")
    missing = both[both["value_new"].isna()]
    assert missing.empty, f"metrics the old table has and today's analysis lacks:\n{missing[KEY]}"
    assert (both["tokens_seen_old"] == both["tokens_seen_new"]).all()
    excess = (both["value_old"] - both["value_new"]).abs() - both["metric"].map(
        lambda m: ATOL_PATCHING if m in PATCHING_EFFECTS else ATOL)
    worst = both.loc[excess.idxmax()]
    assert excess.max() <= 0, (f"|old - new| = {abs(worst['value_old'] - worst['value_new']):.3g} "
                               f"beyond tolerance at {worst[KEY].to_dict()}")
