"""Head scores on a hand-built induction circuit, the score definitions on
ideal attention patterns, and parity of the copying scores with brute-force versions."""

import pytest
import torch
from conftest import HAND_BLOCK, HAND_VOCAB

from induction_dynamics.interpretability import metrics as M
from induction_dynamics.model import GPT, GPTConfig

PREV, IND = (0, 0), (1, 0)  # the hand-built previous-token and induction heads


def others(scores: torch.Tensor, head: tuple[int, int]) -> torch.Tensor:
    mask = torch.ones_like(scores, dtype=torch.bool)
    mask[head] = False
    return scores[mask]


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    allowed = torch.arange(HAND_VOCAB)
    return {
        "rep": M.repeated_random_tokens(allowed, HAND_BLOCK // 2, 8, 2, g),  # [x, x], 16 distinct
        "rep4": M.repeated_random_tokens(allowed, HAND_BLOCK // 4, 8, 4, g),  # 8 distinct x 4
        "text": torch.randint(0, HAND_VOCAB, (8, HAND_BLOCK), generator=g),  # stands in for text
    }


def test_hand_built_heads_score_as_designed(hand_model, prompts):
    L = HAND_BLOCK // 2
    ind = M.induction_scores(hand_model, prompts["rep"], L)
    assert ind[IND] >= 0.9 and others(ind, IND).max() <= 0.1
    pm = M.prefix_matching_scores(hand_model, prompts["rep4"], HAND_BLOCK // 4)
    assert pm[IND] >= 0.9 and others(pm, IND).max() <= 0.1
    prev = M.previous_token_scores(hand_model, prompts["text"])
    assert prev[PREV] >= 0.9 and others(prev, PREV).max() <= 0.1
    # no head of this circuit attends to earlier copies of the *same* token
    assert M.duplicate_token_scores(hand_model, prompts["rep"], L).max() <= 0.1
    # the induction head copies what it attends to; nothing else writes to the logits
    cp = M.copying_scores(hand_model, prompts["rep"])
    assert cp[IND] >= 0.9 and others(cp, IND).abs().max() <= 0.1
    ov = M.ov_copying_scores(hand_model)
    assert ov[IND] >= 0.9 and others(ov, IND).abs().max() <= 0.1
    first, second = M.repeated_sequence_loss(hand_model, prompts["rep"], L)
    assert second < 0.1 < 2.0 < first


def test_anti_copying_head_scores_negative(hand_model, prompts):
    flipped = GPT(hand_model.config)
    flipped.load_state_dict(hand_model.state_dict())
    with torch.no_grad():
        flipped.transformer.h[1].attn.c_proj.weight.neg_()  # the head now suppresses what it attends to
    assert M.copying_scores(flipped.eval(), prompts["rep"])[IND] <= -0.9
    assert M.ov_copying_scores(flipped)[IND] <= -0.9


def test_scores_from_ideal_and_uniform_patterns():
    L, T = 5, 10
    tokens = torch.arange(L).repeat(1, 2)  # (1, 10) = [x, x]
    ideal = torch.zeros(1, 1, T, T)
    for i in range(T):
        ideal[0, 0, i, i - L + 1 if i >= L else 0] = 1.0
    assert M.induction_score_from_pattern(ideal, L).item() == pytest.approx(1.0)
    uniform = torch.ones(T, T).tril()
    uniform = (uniform / uniform.sum(-1, keepdim=True))[None, None]
    expected = sum(1 / (i + 1) for i in range(L, T)) / L
    assert M.induction_score_from_pattern(uniform, L).item() == pytest.approx(expected)
    # duplicate-token and prefix-matching targets on the same prompt
    dup = M._earlier_same_token(tokens)
    assert dup.sum() == L and all(dup[0, i, i - L] for i in range(L, T))
    patterns = uniform[None]  # (n_layer=1, B=1, nh=1, T, T)
    assert M._masked_attention_score(patterns, dup).item() == pytest.approx(expected)


def test_ov_copying_matches_full_vocab_eigenvalues():
    torch.manual_seed(1)
    model = GPT(GPTConfig(block_size=8, vocab_size=12, n_layer=2, n_head=2, n_embd=8)).eval()
    with torch.no_grad():
        for ln in (model.transformer.h[1].ln_1, model.transformer.ln_f):
            ln.weight.uniform_(0.5, 1.5)
    fast = M.ov_copying_scores(model)
    W_E, W_U = model.transformer.wte.weight.double(), model.lm_head.weight.double()
    for layer in range(2):
        w_v, w_o = M.head_weights(model, layer)
        g1 = model.transformer.h[layer].ln_1.weight.double()
        gf = model.transformer.ln_f.weight.double()
        for h in range(2):
            full = W_E @ torch.diag(g1) @ w_v[h].double() @ w_o[h].double() @ torch.diag(gf) @ W_U.T  # (V, V)
            lam = torch.linalg.eigvals(full)
            assert fast[layer, h].item() == pytest.approx((lam.sum().real / lam.abs().sum()).item(), abs=1e-4)


def test_copying_direct_effect_matches_a_head_ablation_readout():
    """The per-head W_O slice: the head's output equals c_proj applied to z with other heads zeroed."""
    torch.manual_seed(2)
    model = GPT(GPTConfig(block_size=8, vocab_size=12, n_layer=1, n_head=2, n_embd=8, bias=False)).eval()
    tokens = torch.randint(0, 12, (2, 8))
    from induction_dynamics.interpretability.utils import HookManager

    _, cache = HookManager(model).run_with_cache(tokens, names_filter="attn.hook_z")
    z = cache["transformer.h.0.attn.hook_z"]  # (B, T, nh, hs)
    _, w_o = M.head_weights(model, 0)
    for h in range(2):
        only = torch.zeros_like(z)
        only[:, :, h] = z[:, :, h]
        via_proj = model.transformer.h[0].attn.c_proj(only.flatten(-2))
        torch.testing.assert_close(z[:, :, h] @ w_o[h], via_proj)


def test_loss_measures(hand_model, prompts):
    tokens = prompts["rep"]
    losses = M.per_token_losses(hand_model, tokens)
    assert losses.shape == (8, HAND_BLOCK - 1)
    _, mean_loss = hand_model(tokens[:, :-1], tokens[:, 1:].contiguous())
    assert losses.mean().item() == pytest.approx(mean_loss.item(), rel=1e-5)
    early, late = M.icl_positions(HAND_BLOCK)
    assert (early, late) == (3, 30)
    # late sits in the second copy, where the induction head predicts: strongly negative
    assert M.icl_score(hand_model, tokens, early, late) < -2.0
    with pytest.raises(ValueError):
        M.icl_score(hand_model, tokens, 5, 5)
    with pytest.raises(ValueError):
        M.prefix_matching_scores(hand_model, tokens[:, :10], 8)


def test_hand_built_model_sizes():
    from induction_dynamics.interpretability.toy_circuits import (
        hand_built_induction_model,
    )

    small = hand_built_induction_model(vocab_size=12, block_size=16)
    tokens = M.repeated_random_tokens(torch.arange(12), 8, 4, generator=torch.Generator().manual_seed(0))
    assert M.induction_scores(small, tokens, 8)[IND] >= 0.9
    with pytest.raises(ValueError):
        hand_built_induction_model(vocab_size=8, block_size=32)


def _earlier_match_masks_by_loops(tokens, k):
    """The definition, spelled out: loop over every position and every earlier one."""
    B, T = tokens.shape
    predictive = torch.zeros(B, T - 1, dtype=torch.bool)
    misleading = torch.zeros(B, T - 1, dtype=torch.bool)
    for b in range(B):
        for t in range(k - 1, T - 1):
            js = [j for j in range(k - 1, t) if torch.equal(tokens[b, j - k + 1:j + 1], tokens[b, t - k + 1:t + 1])]
            if any(tokens[b, j + 1] == tokens[b, t + 1] for j in js):
                predictive[b, t] = True
            elif js:
                misleading[b, t] = True
    return predictive, misleading


@pytest.mark.parametrize("k", [1, 2, 3])
def test_earlier_match_masks_match_the_loop_definition(k):
    g = torch.Generator().manual_seed(k)
    tokens = torch.randint(0, 3, (6, 24), generator=g)  # 3 symbols: many matches of every length
    predictive, misleading = M.earlier_match_masks(tokens, k)
    expected = _earlier_match_masks_by_loops(tokens, k)
    assert predictive.any() and misleading.any()
    assert torch.equal(predictive, expected[0]) and torch.equal(misleading, expected[1])
    assert not (predictive & misleading).any()


def test_earlier_match_masks_on_a_hand_example():
    # "a b c d a b c d a b c e": from the second "a b c" (t=6) on, every 3-token suffix was seen
    # before with the same next token, until the third "a b c" (t=10): earlier ones -> d, truth e.
    a, b, c, d, e = range(5)
    tokens = torch.tensor([[a, b, c, d, a, b, c, d, a, b, c, e]])
    predictive, misleading = M.earlier_match_masks(tokens, 3)
    assert predictive[0].nonzero().flatten().tolist() == [6, 7, 8, 9]
    assert misleading[0].nonzero().flatten().tolist() == [10]
    with pytest.raises(ValueError, match="1 <= k"):
        M.earlier_match_masks(tokens, 0)
