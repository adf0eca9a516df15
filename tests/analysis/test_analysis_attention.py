"""Attention patterns over training: head and checkpoint choice, the figure from saved patterns,
its panels in the analysis W&B run at the training iterations, the CircuitsVis view."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from analysis_helpers import analysis_run_records, cfg_for, history, make_run

from induction_dynamics.analysis import analyze_checkpoint
from induction_dynamics.analysis import attention as A
from induction_dynamics.analysis.driver import analyze
from induction_dynamics.analysis.plots import attention as V
from induction_dynamics.analysis.table import induction_circuit
from induction_dynamics.checkpoint import load_checkpoint, model_from_checkpoint
from induction_dynamics.data.vocab import Vocab
from induction_dynamics.errors import AnalysisError
from induction_dynamics.interpretability.attention_analysis import attention_patterns
from induction_dynamics.run_dir import history_path

STEPS = (0, 10, 20, 30)


def test_figure_of_the_hand_built_circuit_shows_its_designed_heads(hand_model, tmp_path):
    rows = analyze_checkpoint(hand_model, suite="fast", data={"name": "synthetic", "synthetic_vocab_size": 32})
    rows = pd.concat([rows.assign(step=s) for s in (0, 100)], ignore_index=True)
    seq = torch.cat([torch.arange(3, 19), torch.arange(3, 19)])  # [x, x]
    patterns = attention_patterns(hand_model, seq)[:, 0].numpy()  # (L, H, T, T)
    hist = A.AttentionHistory(np.array([0, 100]), np.stack([patterns, patterns]).astype(np.float16),
                              seq.numpy(), [chr(97 + t) for t in seq.tolist()])
    paths, panels, note = V.plot_attention_over_training(rows, None, hist, tmp_path, ["png", "pdf"], 60)
    assert not note and sorted(p.name for p in paths) == ["attention_over_training.pdf", "attention_over_training.png"]
    # its designed previous-token head L0H0 and induction head L1H0, at both checkpoints
    assert [(k, p.name, s) for k, p, s in panels] == [
        ("analysis/attention/previous_token_head", "L0H0_step_000000.png", 0),
        ("analysis/attention/previous_token_head", "L0H0_step_000100.png", 100),
        ("analysis/attention/induction_head", "L1H0_step_000000.png", 0),
        ("analysis/attention/induction_head", "L1H0_step_000100.png", 100)]
    _, _, note = V.plot_attention_over_training(rows[rows["layer"] == 0], None, hist, tmp_path, ["png"], 60)
    assert "no induction circuit" in note  # one layer: no earlier layer to compose with
    assert "no saved attention patterns" in V.plot_attention_over_training(rows, None, None, tmp_path, ["png"], 60)[2]


def test_checkpoints_around_the_window():
    steps = np.arange(0, 1001, 100)
    phase = pd.DataFrame([{"metric": "induction_score_max", "detected": True, "start_step": 250.0,
                           "mid_step": 420.0, "end_step": 550.0}])
    assert V.choose_steps(steps, phase) == ([("before", 200), ("inside", 400), ("after", 600)], True)
    late = phase.assign(start_step=-5.0, end_step=2000.0)
    assert V.choose_steps(steps, late)[0] == [("before", 0), ("inside", 400), ("after", 1000)]
    assert V.choose_steps(steps, phase.assign(detected=False)) == ([("first", 0), ("middle", 500), ("last", 1000)],
                                                                    False)
    assert V.choose_steps([0, 10], None)[0] == [("first", 0), ("middle", 10)]  # one panel per step


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    run_dir = make_run(tmp_path_factory.mktemp("attn") / "run", 0, steps=STEPS, shape={"n_layer": 2},
                       iters_per_step=3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        out = analyze(cfg_for(run_dir, "plots.formats=[png,pdf]", f"plots.attention_html=[{STEPS[-1]}]"))
    return run_dir, out["results"][0]


def test_saved_patterns_are_the_models(analysed):
    run_dir, r = analysed
    hist = A.load_history(run_dir)
    assert hist.steps.tolist() == list(STEPS) and hist.patterns.shape[1:3] == (2, 2)
    ckpt = load_checkpoint(history_path(run_dir, STEPS[-1]))
    want = attention_patterns(model_from_checkpoint(ckpt), torch.as_tensor(hist.tokens))[:, 0].numpy()  # (L, H, T, T)
    np.testing.assert_allclose(hist.at(STEPS[-1]), want, atol=1e-3)  # float16 storage
    assert hist.labels == Vocab.from_checkpoint(ckpt).labels(hist.tokens)
    T = len(hist.tokens)
    assert hist.labels[: T // 2] == hist.labels[T // 2:]  # the fixed sequence is [x, x]


def test_figure_and_panels_logged_at_training_iterations(analysed, tmp_path):
    run_dir, r = analysed
    (induction, partner) = induction_circuit(r.table)
    picks, _ = V.choose_steps(STEPS, r.phase)
    plots = run_dir / "plots"
    assert {p.name for p in r.plots} >= {"attention_over_training.png", "attention_over_training.pdf"}
    for (l, h) in (induction, partner):
        for _, s in picks:
            assert (plots / V.FIGURE / f"L{l}H{h}_step_{s:06d}.png").stat().st_size > 2000
    _, recs = analysis_run_records(run_dir)
    items = history(recs)
    for key in ("analysis/attention/induction_head", "analysis/attention/previous_token_head"):
        logged = sorted(i["iter"] for i in items if key + "._type" in i or key in i)
        assert logged == [s for _, s in picks], key
    assert any("analysis/plots/attention_over_training" in k for i in items for k in i)

    # plots_only redraws the figure from the saved patterns alone, byte for byte
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("plots", "cache", "wandb"))
    analyze(cfg_for(copy, "plots_only=true", "plots.formats=[png]"))
    assert (copy / "plots" / "attention_over_training.png").read_bytes() == \
        (plots / "attention_over_training.png").read_bytes()


def test_circuitsvis_view_holds_every_head_of_the_checkpoint(analysed, tmp_path):
    run_dir, _ = analysed
    page = (run_dir / "plots" / f"attention_step_{STEPS[-1]:06d}.html").read_text()
    props = json.loads(page[page.rindex("AttentionHeads,") + len("AttentionHeads,"):].split("\n    )")[0])
    hist = A.load_history(run_dir)
    assert props["tokens"] == hist.labels
    assert props["attentionHeadNames"] == ["L0H0", "L0H1", "L1H0", "L1H1"]
    np.testing.assert_allclose(np.array(props["attention"]), hist.at(STEPS[-1]).reshape(4, *hist.patterns.shape[-2:]))
    assert "unpkg.com" not in page  # the JavaScript is inlined: the page opens offline
    other = V.run_attention_html(run_dir, STEPS[1], out=tmp_path / "v.html")
    assert other.stat().st_size > 10_000
    with pytest.raises(AnalysisError, match="no saved attention patterns at step 7"):
        V.run_attention_html(run_dir, 7)
