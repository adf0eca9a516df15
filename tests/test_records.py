"""Records that stay trustworthy: one W&B run per training and per analysis, a cache keyed by
what it computed from, checkpoints checked against the sha256 recorded when they were written,
and one-line errors for bad analysis input. W&B runs offline for real; records are read back
with `wandb leet inspect --json`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pandas as pd
import pytest
from analysis_helpers import FAST, cfg_for, make_run, run_entry
from train_helpers import TINY, compose_cfg, run_train, train_then_kill

from induction_dynamics import run_dir as R
from induction_dynamics.analysis import suite as suite_mod
from induction_dynamics.analysis.driver import analyze
from induction_dynamics.checkpoint import load_checkpoint
from induction_dynamics.errors import CheckpointError
from induction_dynamics.files import sha256_file
from induction_dynamics.run_dir import history_path, list_checkpoints, read_manifest
from induction_dynamics.training.loop import train


def leet(path) -> list[dict]:
    out = subprocess.run(["wandb", "leet", "inspect", "--json", str(path)], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def wandb_runs(run_dir, job_type: str) -> dict[str, list[dict]]:
    """{W&B run id: history items, over every offline segment of that run} for ``job_type``.
    Every transaction log under ``wandb/`` is read, wherever W&B put it."""
    found: dict[str, list[dict]] = {}
    for path in sorted((run_dir / "wandb").rglob("*.wandb")):
        recs = leet(path)
        run = next((r["run"] for r in recs if r["type"] == "run"), None)
        if run is None:  # W&B buffers its log: a segment killed early may hold no record at all
            continue
        if run.get("job_type") == job_type:
            found.setdefault(run["run_id"], []).extend(r["history"]["item"] for r in recs if r["type"] == "history")
    return found


def wandb_listing(run_dir) -> str:
    """What W&B left under ``wandb/`` (for a failure message)."""
    return "; ".join(f"{p.relative_to(run_dir)} ({p.stat().st_size} B)"
                     for p in sorted((run_dir / "wandb").rglob("*")) if p.is_file() and not p.is_symlink())


def iters(history, key) -> list[int]:
    return sorted(h["iter"] for h in history if key in h)


# ------------------------------------------------------------------ one W&B run per training run

def test_kill_9_then_resume_continues_the_same_wandb_run(tmp_path):
    run_dir = tmp_path / "run"
    args = [a for a in TINY if not a.startswith("wandb.mode")] + [
        "wandb.mode=offline", "train.max_iters=120", "train.eval_every=10", "checkpoint.every=20"]
    # a W&B service in this process, as a notebook has, which train.py's processes inherit
    train(compose_cfg(args[:-3] + ["train.max_iters=1"]), run_dir=tmp_path / "notebook")
    assert "WANDB_SERVICE" in os.environ
    killed_at = train_then_kill(args, run_dir, after_iter=30, pause=0.03)
    assert killed_at < 120

    resumed = run_train(args + ["train.resume=true", f"hydra.run.dir={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2  # the killed segment and the resumed one
    runs = wandb_runs(run_dir, "train")
    assert len(runs) == 1, (f"expected one W&B run id, got {sorted(runs)}; W&B left: {wandb_listing(run_dir)}; "
                            f"resumed stderr: {resumed.stderr[-1500:]}")
    (run_id, history), = runs.items()
    assert json.loads((run_dir / "wandb" / "train_run.json").read_text())["id"] == run_id
    # every step once: none duplicated by the replay since resume.pt, none missing
    assert iters(history, "train/loss") == list(range(5, 121, 5))
    assert iters(history, "train/grad_norm") == list(range(5, 121, 5))
    assert iters(history, "val/loss") == list(range(0, 121, 10))
    assert iters(history, "monitor/induction_score_max") == list(range(0, 121, 10))
    assert all(h["train/grad_norm"] > 0 for h in history if "train/grad_norm" in h)


def test_a_fresh_start_in_the_same_folder_is_a_new_wandb_run(tmp_path):
    cfg = [a for a in TINY if not a.startswith("wandb.mode")] + ["wandb.mode=offline", "train.max_iters=10"]
    first = train(compose_cfg(cfg), run_dir=tmp_path / "run")
    (tmp_path / "run" / "resume.pt").unlink()
    again = train(compose_cfg(cfg + ["train.resume=true"]), run_dir=tmp_path / "run")  # starts at iteration 0
    assert first["wandb_run_id"] and again["wandb_run_id"] and first["wandb_run_id"] != again["wandb_run_id"]


# ------------------------------------------------------------------ one W&B run per analysis

def test_analysing_again_updates_the_same_analysis_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = make_run(tmp_path / "run", 0, steps=(0, 4, 8))
    analyze(cfg_for(run_dir, "plots.formats=[png]", "analysis/suite=fast"))
    more = make_run(tmp_path / "more", 0, steps=(0, 4, 8, 12))  # the same training, one checkpoint further
    shutil.copy(history_path(more, 12), history_path(run_dir, 12))
    analyze(cfg_for(run_dir, "plots.formats=[png]", "analysis/suite=fast"))
    analyze(cfg_for(run_dir, "plots.formats=[png]", "analysis/suite=fast", "plots_only=true"))
    runs = wandb_runs(run_dir, "analysis")
    assert len(runs) == 1, f"expected one analysis run, got {sorted(runs)}"
    (history,) = runs.values()
    assert iters(history, "analysis/induction_score_max") == [0, 4, 8, 12]  # each checkpoint once
    assert iters(history, "analysis/phase_window/induction_score_max") == [0, 4, 8, 12]
    assert sum("analysis/plots/induction_heatmap" in k for h in history for k in h) >= 3  # once per pass

    analyze(cfg_for(run_dir, "plots.formats=[]", "analysis/suite=fast", "force=true"))  # recompute all: new run
    assert len(wandb_runs(run_dir, "analysis")) == 2


# ------------------------------------------------------------------ the cache knows what it computed

def _keys(run_dir):
    return {s: json.loads(R.key_path(run_dir, s).read_text()) for s, _ in list_checkpoints(run_dir)}


def test_a_checkpoint_replaced_under_the_same_name_is_analysed_again(tmp_path):
    run_dir = make_run(tmp_path / "run", 0, steps=(0, 4, 8))
    analyze(cfg_for(run_dir, *FAST, "analysis/suite=fast"))
    before = pd.read_parquet(R.analysis_dir(run_dir) / "results.parquet")
    other = make_run(tmp_path / "other", 1, steps=(0, 4, 8))  # other weights, same file names
    shutil.copy(history_path(other, 8), history_path(run_dir, 8))
    out = analyze(cfg_for(run_dir, *FAST, "analysis/suite=fast"))
    assert "(1 new)" in out["report"]
    after = pd.read_parquet(R.analysis_dir(run_dir) / "results.parquet")
    assert _keys(run_dir)[8]["key"]["checkpoint_sha256"] == sha256_file(history_path(run_dir, 8))

    def score(df, step):
        return df[(df.step == step) & (df.metric == "induction_score")].value.to_numpy()

    assert (score(after, 0) == score(before, 0)).all()  # untouched checkpoints come from the cache
    assert not (score(after, 8) == score(before, 8)).all()


def test_a_failing_metric_is_a_metric_error_and_the_others_are_kept(tmp_path, monkeypatch):
    run_dir = make_run(tmp_path / "run", 0, steps=(0, 4))

    def broken(context):
        raise RuntimeError("shapes do not match\nsecond line of detail")

    monkeypatch.setitem(suite_mod.COMPUTE, "copying", broken)
    out = analyze(cfg_for(run_dir, *FAST, "suite.metrics=[induction,copying,icl]"))
    errors = json.loads((R.analysis_dir(run_dir) / "errors.json").read_text())
    assert sorted(e["step"] for e in errors) == [0, 4]
    assert all(e["kind"] == "metric" and e["metric"] == "copying" and e["error"] ==
               "RuntimeError: shapes do not match" for e in errors)
    table = pd.read_parquet(R.analysis_dir(run_dir) / "results.parquet")
    assert {"induction_score", "icl_score"} <= set(table.metric) and "copying_score" not in set(table.metric)
    assert "2 metric(s) failed" in out["report"]
    # cached with its error: the next pass reports it again without recomputing
    out = analyze(cfg_for(run_dir, *FAST, "suite.metrics=[induction,copying,icl]"))
    assert "(0 new)" in out["report"] and len(json.loads((R.analysis_dir(run_dir) / "errors.json").read_text())) == 2


# ------------------------------------------------------------------ checkpoint integrity

def test_manifest_records_each_checkpoint_and_the_analysis_refuses_a_mismatch(tmp_path):
    run_dir = tmp_path / "run"
    train(compose_cfg(TINY + ["train.max_iters=20", "checkpoint.every=10"]), run_dir=run_dir)
    manifest = read_manifest(run_dir)
    steps = [s for s, _ in list_checkpoints(run_dir)]
    assert sorted(manifest) == sorted(p.name for _, p in list_checkpoints(run_dir))
    for step, path in list_checkpoints(run_dir):
        assert manifest[path.name] == {"sha256": sha256_file(path), "size": path.stat().st_size}

    # the weights of step 10 written over step 20: a loadable file, but not the one the run wrote
    shutil.copy(history_path(run_dir, 10), history_path(run_dir, 20))
    with pytest.raises(CheckpointError, match="does not match the sha256 recorded") as e:
        load_checkpoint(history_path(run_dir, 20))
    assert "\n" not in str(e.value)
    analyze(cfg_for(run_dir, *FAST, "analysis/suite=fast"))
    errors = json.loads((R.analysis_dir(run_dir) / "errors.json").read_text())
    assert [(e["step"], e["kind"]) for e in errors] == [(20, "checkpoint")]
    assert "does not match the sha256" in errors[0]["error"]
    table = pd.read_parquet(R.analysis_dir(run_dir) / "results.parquet")
    assert sorted(table.step.unique()) == [s for s in steps if s != 20]


# ------------------------------------------------------------------ one-line errors

def _corrupt_run(root):
    make_run(root, 0, steps=(0,))
    history_path(root, 0).write_bytes(b"not a checkpoint")
    return root


BAD = [
    ("unknown key", lambda t: ["run_dir=x", "no_such_key=1"], "no_such_key"),
    ("wrong type", lambda t: ["run_dir=x", "n_jobs=many"], "n_jobs"),
    ("missing run_dir", lambda t: [], "run_dir"),
    ("run_dir not found", lambda t: [f"run_dir={t / 'nowhere'}"], "not found"),
    ("no checkpoints", lambda t: [f"run_dir={(t / 'empty' / 'checkpoints').mkdir(parents=True) or t / 'empty'}"],
     "no checkpoints"),
    ("unknown metric", lambda t: [f"run_dir={make_run(t / 'a', 0, steps=(0,))}", "suite.metrics=[bogus]"], "bogus"),
    ("unknown suite", lambda t: ["run_dir=x", "analysis/suite=nope"], "nope"),
    ("bad wandb mode", lambda t: [f"run_dir={make_run(t / 'b', 0, steps=(0,))}", "wandb.mode=sideways"], "sideways"),
    ("n_jobs < 1", lambda t: [f"run_dir={make_run(t / 'c', 0, steps=(0,))}", "n_jobs=0"], "n_jobs"),
    ("unreadable checkpoints only", lambda t: [f"run_dir={_corrupt_run(t / 'd')}", "wandb.mode=disabled",
                                               "plots.formats=[]"], "could be read"),
]


@pytest.mark.parametrize("what,args,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_analysis_input_is_one_line(tmp_path, what, args, needle):
    p = run_entry(*args(tmp_path), cwd=tmp_path)
    assert p.returncode == 2, (what, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    lines = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and needle in lines[0], p.stderr[-2000:]
