"""Attention analysis: patterns, finding the hand-built induction head, score tables, plots."""

import torch
from conftest import HAND_BLOCK, HAND_VOCAB

from induction_dynamics.interpretability import attention_analysis as aa


def test_patterns_are_causal_distributions(hand_model):
    tokens = torch.randint(0, HAND_VOCAB, (3, 20))
    p = aa.attention_patterns(hand_model, tokens)
    assert p.shape == (2, 3, 2, 20, 20)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 3, 2, 20))
    assert p.triu(1).abs().max() == 0
    assert aa.attention_patterns(hand_model, tokens[0], layers=[1]).shape == (1, 1, 2, 20, 20)


def test_find_induction_heads_and_score_table(hand_model, tmp_path):
    g = torch.Generator().manual_seed(0)
    heads = aa.find_induction_heads(hand_model, threshold=0.4, generator=g)
    assert [(l, h) for l, h, _ in heads] == [(1, 0)] and heads[0][2] > 0.9
    scores = aa.head_scores(hand_model, seq_len=HAND_BLOCK // 2, prefix_seq_len=HAND_BLOCK // 4, generator=g)
    assert set(scores) == set(aa.SCORE_NAMES)
    assert all(t.shape == (2, 2) for t in scores.values())
    assert scores["previous_token"][0, 0] > 0.9 and scores["prefix_matching"][1, 0] > 0.9
    df = aa.scores_dataframe(scores)
    assert list(df.columns) == ["layer", "head", "metric", "value"] and len(df) == 4 * len(aa.SCORE_NAMES)
    best = df[df.metric == "induction"].sort_values("value").iloc[-1]
    assert (best["layer"], best["head"]) == (1, 0)
    fig = aa.plot_head_scores(scores["induction"], title="induction", save_path=tmp_path / "scores.png")
    assert (tmp_path / "scores.png").stat().st_size > 1000 and fig.axes
    tokens = torch.arange(HAND_BLOCK // 2).repeat(2)
    labels = [chr(ord("a") + int(t)) for t in tokens]
    aa.plot_attention_pattern(aa.attention_patterns(hand_model, tokens)[1, 0, 0], labels=labels,
                              title="L1H0", save_path=tmp_path / "pattern.png")
    fig = aa.plot_attention_heads(hand_model, tokens, labels=labels, save_path=tmp_path / "heads.png")
    assert len([ax for ax in fig.axes if ax.get_title()]) == 4
    assert (tmp_path / "pattern.png").exists() and (tmp_path / "heads.png").exists()
