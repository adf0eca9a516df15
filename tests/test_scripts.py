"""scripts/icl_match_split.py on a real (tiny) run written by train.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from train_helpers import ROOT, TINY, cli_env, run_train

SCRIPT = ROOT / "scripts" / "icl_match_split.py"


def _split(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs (seeds 0 and 1), checkpoints at 0, 1, 2, 4, 8, 10, 16, 20, 30."""
    root = tmp_path_factory.mktemp("split")
    run, control = root / "run", root / "control"
    for d, seed in ((run, 0), (control, 1)):
        res = run_train([*TINY, f"seed={seed}", f"hydra.run.dir={d}"])
        assert res.returncode == 0, res.stderr
    return run, control


def test_icl_match_split_on_a_trained_run(runs):
    run, control = runs
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


def test_icl_match_split_curve_has_one_line_per_shared_step(runs):
    run, control = runs
    res = _split(str(run), str(control), "--every", "10", "--k", "1", "--windows", "64")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert [int(line.split()[0]) for line in lines[1:]] == [0, 10, 20, 30]
    first, last = ([float(v) for v in line.split()[1:] if v != "/"] for line in (lines[1], lines[-1]))
    assert len(first) == 6  # three groups x (run, control)
    assert sum(last[:3]) < sum(first[:3])  # training lowers the run's loss in every group together
