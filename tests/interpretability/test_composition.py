"""Composition scores (Elhage et al. 2021): the hand-built circuit's designed pair, Q/K/V told
apart by rewiring it, the random-matrix baseline, TransformerLens parity, and the tidy rows."""

import math

import pandas as pd
import pytest
import torch
from analysis_helpers import analysis_run_records, cfg_for, make_run
from conftest import HAND_BLOCK, HAND_VOCAB

from induction_dynamics.analysis import registry
from induction_dynamics.analysis.config import SuiteConfig
from induction_dynamics.analysis.driver import analyze
from induction_dynamics.analysis.prompts import make_prompts
from induction_dynamics.analysis.registry import family as metric_family
from induction_dynamics.analysis.suite import rows_of, run_suite
from induction_dynamics.analysis.table import induction_circuit, make_frame, pair_table
from induction_dynamics.data import load_data
from induction_dynamics.interpretability import composition as C
from induction_dynamics.interpretability.toy_circuits import hand_built_induction_model
from induction_dynamics.model import GPT, GPTConfig

try:
    import transformer_lens  # noqa: F401

    from induction_dynamics.interpretability.export import to_hooked_transformer
except ImportError:
    to_hooked_transformer = None

PREV, IND = (0, 0), (1, 0)  # the hand-built circuit's previous-token and induction heads


def rewired(swap: str) -> GPT:
    """The hand-built circuit with the induction head reading the previous-token block through
    its query ("Q": query and key rows swapped) or its value ("V": key and value rows swapped)."""
    model = hand_built_induction_model(HAND_VOCAB, HAND_BLOCK)
    attn = model.transformer.h[1].attn
    Cd, hs = attn.n_embd, attn.n_embd // attn.n_head
    with torch.no_grad():
        w = attn.c_attn.weight  # (3C, C): q | k | v rows, head 0 in each block's first hs rows
        rows = {"Q": slice(0, hs), "K": slice(Cd, Cd + hs), "V": slice(2 * Cd, 2 * Cd + hs)}
        k, other = w[rows["K"]].clone(), w[rows[swap]].clone()
        w[rows["K"]], w[rows[swap]] = other, k
    return model


def test_designed_pair_has_the_largest_k_composition(hand_model):
    s = C.all_composition_scores(hand_model)
    k = s["K"]
    assert k[PREV + IND] == k.max()
    # L0H1 writes minus the current token into the same block (see toy_circuits), so it feeds
    # the induction head's keys exactly as much, with the opposite sign: a tie by design
    assert math.isclose(k[0, 1, 1, 0], k[PREV + IND], rel_tol=1e-5)
    # everything else is far below: the control head L1H1 reads positions, not that block
    others = [k[0, h, 1, 1].item() for h in range(2)] + [s[x][PREV + IND].item() for x in "QV"]
    assert max(others) < k[PREV + IND].item() / 10
    baseline = C.composition_baseline(hand_model.config.n_embd, hand_model.config.n_embd // 2)
    assert k[PREV + IND] > 1.5 * baseline > 1.5 * max(others)
    # nothing composes backwards or within a layer
    assert (k[1] == 0).all() and (k[0, :, 0] == 0).all()


@pytest.mark.parametrize("kind", ["Q", "V"])
def test_rewiring_moves_the_score_to_the_other_kind(kind):
    s = C.all_composition_scores(rewired(kind))
    assert s[kind][PREV + IND] == s[kind].max()
    assert s[kind][PREV + IND] > 10 * s["K"][PREV + IND]


@pytest.mark.parametrize("d_model,d_head", [(64, 16), (96, 48), (128, 8)])
def test_baseline_is_one_over_sqrt_d_model(d_model, d_head):
    """For independent Gaussian factors E||AB||^2 / (E||A||^2 E||B||^2) = 1/d_model whatever
    the rank, so the mean score is close to 1/sqrt(d_model)."""
    b = C.composition_baseline(d_model, d_head)
    assert b == pytest.approx(d_model ** -0.5, rel=0.03)
    assert C.composition_baseline(d_model, d_head, seed=1) == pytest.approx(b, rel=0.01)


def test_a_randomly_initialised_model_scores_at_the_baseline():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=4, n_head=4, n_embd=64)).eval()
    s = C.all_composition_scores(model)
    later = torch.zeros(4, 4, 4, 4, dtype=torch.bool)
    for la in range(4):
        later[la, :, la + 1:] = True
    baseline = C.composition_baseline(64, 16)
    for kind in "QKV":
        assert s[kind][later].mean().item() == pytest.approx(baseline, rel=0.1), kind


@pytest.mark.skipif(to_hooked_transformer is None, reason="the [tl] extra (transformer_lens) is not installed")
def test_equal_to_transformer_lens_all_composition_scores():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=3, n_head=4, n_embd=32))
    with torch.no_grad():  # layer-norm gains and biases away from 1 and 0, so folding them matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    tl = to_hooked_transformer(model.eval())
    tl.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=False)
    ours = C.all_composition_scores(model)
    for kind in "QKV":
        torch.testing.assert_close(ours[kind], tl.all_composition_scores(kind), atol=1e-5, rtol=0)


def test_table_rows_round_trip_and_pick_the_circuit(hand_model):
    data = load_data("synthetic", synthetic_vocab_size=HAND_VOCAB, synthetic_tokens=5_000, seed=0)
    prompts = make_prompts(SuiteConfig(), vocab_size=HAND_VOCAB, block_size=HAND_BLOCK, token_counts=data.counts,
                           val_tokens=data.val, seed=0)
    rows, _ = run_suite(hand_model, prompts, ["induction", "previous_token", "composition"])
    df = make_frame([{"run": "r", "seed": 0, "step": 10, "tokens_seen": 0, "metric": m, "layer": l, "head": h,
                      "value": v, "stderr": e} for m, l, h, v, e in rows])
    assert {metric_family(m) for m in df["metric"]} == {"induction_score", "previous_token_score", "q_composition",
                                                          "k_composition", "v_composition", "composition_baseline"}
    k = pair_table(df, "k_composition")
    assert len(k) == 4 and (k["src_layer"] < k["layer"]).all()
    scores = C.composition_scores(hand_model, "K")
    for r in k.itertuples():
        assert r.value == pytest.approx(scores[r.src_layer, r.src_head, r.layer, r.head].item())
    assert df.loc[df.metric == "k_composition/L0H0", ["layer", "head"]].values.tolist() == [[1, 0], [1, 1]]
    assert induction_circuit(df) == (IND, PREV)
    assert rows_of(registry.BY_NAME["k_composition"], torch.zeros(1, 2, 1, 2)) == []  # one layer: no pairs
    assert induction_circuit(df[df.metric != "previous_token_score"]) is None
    assert induction_circuit(pd.DataFrame(columns=df.columns)) is None


def test_sweep_tables_plots_and_wandb_carry_the_circuit(tmp_path, monkeypatch):
    """A two-layer run through analyze(): pair rows in the table, the composition plot, and the
    W&B run's per-pair curves and circuit curves read back from its offline records."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = make_run(tmp_path / "run", 0, steps=(0, 4, 8), shape={"n_layer": 2})
    analyze(cfg_for(run_dir, "plots.formats=[png]", "suite.metrics=[induction,previous_token,composition]"))
    table = pd.read_parquet(run_dir / "analysis" / "results.parquet")
    (li, hi), (lp, hp) = induction_circuit(table)
    assert li == 1 and lp == 0
    assert (run_dir / "plots" / "composition.png").stat().st_size > 10_000
    _, recs = analysis_run_records(run_dir)
    items = [r["history"]["item"] for r in recs if r["type"] == "history"]
    pair_key = f"analysis/k_composition/L{lp}H{hp}/L{li}H{hi}"
    logged = {i["iter"]: i[pair_key] for i in items if pair_key in i}
    circuit = {i["iter"]: i["analysis/circuit/k_composition"] for i in items if "analysis/circuit/k_composition" in i}
    assert sorted(logged) == sorted(circuit) == [0, 4, 8]
    expected = pair_table(table, "k_composition").query("src_layer == @lp and src_head == @hp and layer == @li "
                                                        "and head == @hi").set_index("step")["value"]
    for step, value in circuit.items():
        assert value == pytest.approx(logged[step]) and value == pytest.approx(expected[step])
    summary = {}
    for r in recs:
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    assert summary["analysis/circuit/induction_head"] == f"L{li}H{hi}"
    assert not any(k.startswith("analysis/k_composition") and k.endswith("_max") for i in items for k in i)
