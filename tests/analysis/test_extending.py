"""docs/extending.md's worked example runs: adding a metric is one registry entry and one function,
and the metric then reaches the table with no other change. docs/metrics.md is the registry's."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

from induction_dynamics.analysis import registry

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = REPO / "tests" / "fixtures" / "pre_rename_run" / "checkpoints" / "step_000300.pt"


def _blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, re.S)


def test_adding_a_metric_touches_two_places_and_reaches_the_table(tmp_path):
    entry, function = _blocks((REPO / "docs" / "extending.md").read_text())
    pkg = tmp_path / "src" / "induction_dynamics"
    shutil.copytree(REPO / "src" / "induction_dynamics", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "conf", tmp_path / "conf")  # the analysis composes its config from the checkout's conf/
    reg = pkg / "analysis" / "registry.py"
    text = reg.read_text()
    start = "METRICS: tuple[Metric, ...] = (\n"
    assert start in text
    reg.write_text(text.replace(start, start + entry))               # the one registry entry
    suite = pkg / "analysis" / "suite.py"
    suite.write_text(suite.read_text() + "\n\n" + function)           # the one function
    changed = [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()
               and p.read_bytes() != (REPO / p.relative_to(tmp_path)).read_bytes()]
    assert sorted(changed) == ["src/induction_dynamics/analysis/registry.py", "src/induction_dynamics/analysis/suite.py"]

    code = f"""
import json, math
from induction_dynamics.analysis import analyze_checkpoint, registry
assert "prediction_entropy" in registry.SUITE_IDS and "prediction_entropy" in registry.DEFAULT_SUITE
assert registry.of("prediction_entropy").direction == "fall"
rows = analyze_checkpoint({str(CHECKPOINT)!r}, overrides=["suite.metrics=[induction,prediction_entropy]",
                                                         "suite.text_windows=4"])
got = rows[rows["metric"] == "prediction_entropy"]
print(json.dumps({{"cells": sorted(set(zip(got["layer"].tolist(), got["head"].tolist()))),
                  "value": float(got["value"].iloc[0]), "stderr": float(got["stderr"].iloc[0]),
                  "metrics": sorted(set(rows["metric"]))}}))
"""
    env = {"PYTHONPATH": str(tmp_path / "src"), "PATH": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["metrics"] == ["induction_score", "prediction_entropy", "val_loss"]
    assert out["cells"] == [[-1, -1]]  # a model-level metric: one row
    assert 0 < out["value"] < math.log(70)  # below a uniform guess over the fixture's 70 tokens
    assert 0 < out["stderr"] < out["value"]


def test_docs_metric_list_is_the_registry():
    page = (REPO / "docs" / "metrics.md").read_text()
    assert page == registry.PAGE + registry.markdown_table(), \
        "docs/metrics.md is stale: python -m induction_dynamics.analysis.registry > docs/metrics.md"
