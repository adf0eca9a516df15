"""What a full analysis writes does not change when the code is reorganised: the tidy table, the
files under analysis/ and plots/, the W&B records' keys and the phase table's columns.

tests/fixtures/pre_rename_run/reference_*.{csv,json} were written by ``analyze_checkpoints.py``
of the code before the packages were reorganised (the fixture's README says how), with the
default suite on the fixture's two checkpoints. Today's CLI runs on the same checkpoints with
the same settings; everything the reference holds must still be there, every value equal.
Outputs added since (new columns, metrics, files or W&B keys) are allowed: only what a user
already reads is pinned. One change of meaning is allowed, and checked: a normalised patching
effect is NaN now where the clean - corrupted gap it divides by is within its own noise (at
both of these early checkpoints), where it used to be a ratio of noise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
from analysis_helpers import PATCHING_EFFECTS, records, run_entry, undefined_patching_steps

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "pre_rename_run"
KEY = ["run", "seed", "step", "tokens_seen", "metric", "layer", "head"]
# the reference was computed by the same float32 operations: equal to rounding
ATOL = 1e-6


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_a_full_analysis_writes_what_it_wrote_before(tmp_path):
    reference = json.loads((FIXTURE / "reference_outputs.json").read_text())
    run = tmp_path / "fixture_run"
    (run / "checkpoints").mkdir(parents=True)
    for p in (FIXTURE / "checkpoints").glob("*.pt"):
        shutil.copy(p, run / "checkpoints" / p.name)
    proc = run_entry(f"run_dir={run}", *reference["overrides"], cwd=tmp_path, env_extra={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]

    want = pd.read_csv(FIXTURE / "reference_table.csv")
    got = pd.read_csv(run / "analysis" / "results.csv")
    assert set(reference["results_columns"]) <= set(got.columns)
    both = want.merge(got, on=KEY, how="left", suffixes=("_before", "_now"), validate="one_to_one")
    undefined = both["metric"].isin(PATCHING_EFFECTS) & both["step"].isin(undefined_patching_steps(got))
    assert undefined.any() and both.loc[undefined, "value_now"].isna().all()
    both = both[~undefined]
    missing = both[both["value_now"].isna() & both["value_before"].notna()]
    assert missing.empty, f"rows the reference has and today's table lacks:\n{missing[KEY]}"
    worst = (both["value_before"] - both["value_now"]).abs().max()
    assert worst <= ATOL, f"values moved by up to {worst:.3g}"

    assert set(reference["plots"]) <= _files(run / "plots")
    assert set(reference["analysis_files"]) <= _files(run / "analysis")
    phase = pd.read_csv(run / "analysis" / "phase_change.csv")
    # the logistic-fit diagnostics the calibrated test replaced (p_value, null, ... took their place)
    retired = {"lo", "r2", "width_steps"}
    assert set(reference["phase_change_columns"]) - retired <= set(phase.columns)
    assert {"p_value", "null", "direction", "open_ended", "p_holm"} <= set(phase.columns)

    recs = records(run / "wandb")
    history = {k for r in recs if r["type"] == "history" for k in r["history"]["item"]}
    summary = {k for r in recs if r["type"] == "summary" for k in r["summary"].get("update", {})}
    blank = tuple(f"analysis/{m}" for m in PATCHING_EFFECTS)  # undefined at every step: no point logged
    assert undefined_patching_steps(got) == set(got["step"])
    for name, now in (("wandb_history_keys", history), ("wandb_summary_keys", summary)):
        # W&B's own bookkeeping keys (_runtime, ...) are not ours to pin
        before = {k for k in reference[name] if not k.startswith("_") and not k.startswith(blank)
                  and k.rsplit("/", 1)[-1] not in retired}
        assert before <= now, f"{name} lost: {sorted(before - now)}"
