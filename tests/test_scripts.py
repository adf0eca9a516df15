"""scripts/icl_match_split.py on a real (tiny) run written by train.py."""

from __future__ import annotations

import json
import subprocess
import sys

from train_helpers import ROOT, TINY, cli_env, run_train

SCRIPT = ROOT / "scripts" / "icl_match_split.py"


def _split(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=120)


def test_icl_match_split_on_a_trained_run(tmp_path):
    run, control = tmp_path / "run", tmp_path / "control"
    for d, seed in ((run, 0), (control, 1)):
        res = run_train([*TINY, f"seed={seed}", f"hydra.run.dir={d}"])
        assert res.returncode == 0, res.stderr
    res = _split(str(run), str(control), "--step", "30", "--k", "1", "--windows", "256")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout[:res.stdout.rindex("}") + 1])
    r, c = out[str(run)], out[str(control)]
    # same windows for both: the shares are a property of the text, and they partition the positions
    for name in ("predictive", "misleading", "no match"):
        assert r[name]["share"] == c[name]["share"]
    assert abs(sum(r[name]["share"] for name in ("predictive", "misleading", "no match")) - 1) < 1e-6
    assert r["predictive"]["share"] > 0 and r["misleading"]["share"] > 0  # 1-token matches in random letters
    assert r["late loss"] != c["late loss"]  # two different models
    assert abs(r["perfect-copier bound"] - r["predictive"]["share"] * r["predictive"]["loss"]) < 1e-9
    assert "late loss, run - control" in res.stdout


def test_icl_match_split_missing_checkpoint_is_one_line(tmp_path):
    res = _split(str(tmp_path / "nope"), "--step", "10")
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0 and "checkpoint not found" in res.stderr
