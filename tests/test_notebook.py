"""The research notebook's API snippet runs verbatim on a small trained
nanoGPT-format checkpoint, and the ported notebook executes top to bottom (slow)."""

import os
import textwrap
from pathlib import Path

import pytest
import torch

from induction_dynamics.interpretability import activation_patching as ap

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "discovering_induction_heads.ipynb"

# The snippet exactly as the issue gives it (comments included).
SNIPPET = textwrap.dedent("""
    from induction_dynamics.model import GPT, GPTConfig
    from induction_dynamics.interpretability import activation_patching, attention_analysis, logit_lens
    from induction_dynamics.interpretability.utils import ActivationCache, HookManager

    checkpoint = torch.load(path, map_location=device)          # nanoGPT format: checkpoint['model_args'], checkpoint['model']
    model = GPT(GPTConfig(**checkpoint['model_args'])); model.load_state_dict(checkpoint['model'])
    logits, _ = model(seq)                                       # logits[0, -1, :] is the next-token prediction

    results = activation_patching.patch_layer_scan(model, clean_input=clean, corrupted_input=corrupted, show_progress=True)
    # dict keyed by block module name, e.g. "transformer.h.3" (int(name.split('.')[2]) is the layer); each value has .effect
    important = activation_patching.find_important_components(results, threshold=0.3, top_k=5)   # [(name, effect), ...]

    lens = logit_lens.logit_lens(model, clean, target_position=-1, top_k=5)
    lens.predictions_by_layer            # per layer: [(token, prob), ...] best first
    conv = logit_lens.measure_convergence(lens, threshold=0.5)   # {'convergence_layer': int, 'stability': float, ...}
    fig = logit_lens.plot_prediction_evolution(lens, num_predictions=5, save_path='x.png')
""")


def test_notebook_snippet_runs_verbatim(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the snippet saves 'x.png' in the working directory
    d = ap.induction_patching_data(trained.allowed, trained.seq_len, 1, torch.Generator().manual_seed(3))
    ns = {"torch": torch, "path": trained.checkpoint, "device": "cpu", "seq": d.clean,
          "clean": d.clean, "corrupted": d.corrupted}
    exec(compile(SNIPPET, "notebook_snippet", "exec"), ns)
    n_layer = ns["model"].config.n_layer
    torch.testing.assert_close(ns["logits"], trained.model(d.clean)[0])  # the checkpoint round-trips
    results = ns["results"]
    assert [int(name.split(".")[2]) for name in results] == list(range(n_layer))
    assert all(isinstance(r.effect, float) for r in results.values())
    assert results[f"transformer.h.{n_layer - 1}"].effect == pytest.approx(1.0, abs=1e-4)
    important = ns["important"]
    assert important and all(name in results and abs(effect) >= 0.3 for name, effect in important)
    preds = ns["lens"].predictions_by_layer
    assert len(preds) == n_layer + 1 and all(len(p) == 5 for p in preds)
    assert all(p[0][1] >= p[-1][1] for p in preds)
    # the trained model completes the repeat, and the lens's last layer says so
    assert preds[-1][0][0] == int(d.answer[0])
    assert isinstance(ns["conv"]["convergence_layer"], int) and 0.0 <= ns["conv"]["stability"] <= 1.0
    assert (tmp_path / "x.png").stat().st_size > 1000


def test_notebook_is_complete_and_uses_the_api():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    text = "\n".join(c.source for c in nb.cells)
    assert "to be implemented" not in text.lower() and "todo" not in text.lower()
    assert "NotImplementedError" not in code and "pass\n" not in code
    for api in ("patch_layer_scan", "find_important_components", "logit_lens.logit_lens", "measure_convergence",
                "plot_prediction_evolution", "find_induction_heads", "attribution_patch_heads"):
        assert api in code, api
    assert "http" not in code  # no network: the notebook trains its own model
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed without outputs


def execute_notebook(out_dir, **env) -> str:
    """Run the notebook in a kernel (figures to ``out_dir``); its text outputs, joined."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    env_before = dict(os.environ)
    os.environ.update(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), MPLBACKEND="Agg",
                      INDUCTION_NOTEBOOK_OUT=str(out_dir), **env)
    try:
        NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(out_dir)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.mark.slow
def test_notebook_executes_top_to_bottom(tmp_path):
    outputs = execute_notebook(tmp_path)
    assert "induction heads found" in outputs
    assert any(p.suffix == ".png" for p in tmp_path.iterdir())
    # no saved quickstart analysis here: section 9 draws the hand-built circuit's "history"
    assert "the hand-built circuit over 8 sharpness" in outputs
    assert (tmp_path / "over_training" / "attention_over_training.png").is_file()


@pytest.mark.slow
def test_notebook_draws_a_saved_analysis(tmp_path):
    from analysis_helpers import cfg_for, make_run

    from induction_dynamics.analysis.driver import analyze

    run_dir = make_run(tmp_path / "run", 0, steps=(0, 10, 20, 30), shape={"n_layer": 2}, iters_per_step=3)
    analyze(cfg_for(run_dir, "wandb.mode=disabled", "plots.formats=[png]"))
    out = tmp_path / "out"
    out.mkdir()
    outputs = execute_notebook(out, INDUCTION_RESULTS=str(run_dir))
    assert f"saved analysis of {run_dir}: 4 checkpoints" in outputs
    assert (out / "over_training" / "attention_over_training.png").is_file()
