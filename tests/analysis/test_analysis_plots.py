"""The plots: written as PNG and PDF, readable, and regenerated from saved tables without torch."""

import json
import shutil
import time

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from analysis_helpers import cfg_for, make_run, run_entry
from PIL import Image

from induction_dynamics.analysis.driver import analyze
from induction_dynamics.analysis.plots import PLOT_NAMES, make_plots


@pytest.fixture(scope="module")
def plotted(tmp_path_factory):
    root = tmp_path_factory.mktemp("plots") / "sweep"
    for seed in (0, 1):
        make_run(root / f"s{seed}", seed, steps=(0, 3, 6, 9, 12), shape={"n_layer": 2})  # 2: head pairs
    analyze(cfg_for(root, "wandb.mode=disabled"))
    return root


def _plot_dirs(root):
    return [root / "plots", root / "s0" / "plots", root / "s1" / "plots"]


def test_every_plot_is_written_as_png_and_pdf_and_readable(plotted):
    for d in _plot_dirs(plotted):
        for name in PLOT_NAMES:
            png, pdf = d / f"{name}.png", d / f"{name}.pdf"
            img = mpimg.imread(png)  # (H, W, 4) floats
            assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, png
            assert float(np.std(img[..., :3])) > 0.01, f"{png} is blank"
            with Image.open(png) as im:
                im.verify()
            head = pdf.read_bytes()[:5]
            assert head == b"%PDF-" and pdf.stat().st_size > 2_000, pdf


def test_plots_only_runs_without_torch_in_seconds(plotted, tmp_path):
    root = tmp_path / "sweep"
    shutil.copytree(plotted, root, ignore=shutil.ignore_patterns("plots"))
    modules_file = tmp_path / "modules.json"
    # torch made unimportable: any `import torch` (ours or a library's) raises ImportError
    pre = ("import sys, json, atexit\nsys.modules['torch'] = None\n"
           f"atexit.register(lambda: open({str(modules_file)!r}, 'w').write(json.dumps(sorted(sys.modules))))")
    t0 = time.monotonic()
    proc = run_entry(f"run_dir={root}", "plots_only=true", cwd=tmp_path, pre=pre)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "plots regenerated for 2 run(s)" in proc.stdout
    for d in _plot_dirs(root):
        for name in PLOT_NAMES:
            for ext in ("png", "pdf"):
                assert (d / f"{name}.{ext}").stat().st_size > 0
    loaded = json.loads(modules_file.read_text())
    assert not [m for m in loaded if m.startswith("torch.")]
    assert "induction_dynamics.model" not in loaded and "induction_dynamics.analysis.suite" not in loaded
    assert elapsed < 90, f"plots_only took {elapsed:.0f} s"  # ~10 s alone on 2 cores; CI is shared
    # the phase tables are recomputed from the saved tables, identically
    assert pd.read_csv(root / "analysis" / "phase_change.csv").equals(
        pd.read_csv(plotted / "analysis" / "phase_change.csv"))


def test_plots_of_a_partial_metric_set_say_what_is_missing(plotted, tmp_path):
    table = pd.read_parquet(plotted / "s0" / "analysis" / "results.parquet")
    fast = table[table["metric"].isin(["induction_score", "icl_score", "text_loss"])]
    paths, skipped = make_plots({"s0": fast}, {}, None, tmp_path, formats=["png"])
    assert sorted(p.stem for p in paths) == ["induction_heatmap", "induction_score_max", "loss_icl"]
    assert len(skipped) == 4 and any("patching" in s for s in skipped)
    assert any(s.startswith("composition: no composition_baseline") for s in skipped)
