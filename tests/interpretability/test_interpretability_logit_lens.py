"""Logit lens: the last layer is the model's own output, layer bookkeeping,
convergence on the hand-built circuit, and the plot."""

import pytest
import torch
from conftest import HAND_BLOCK, HAND_VOCAB

from induction_dynamics.interpretability import logit_lens
from induction_dynamics.interpretability.metrics import repeated_random_tokens
from induction_dynamics.model import GPT, GPTConfig


@pytest.mark.parametrize("attn_only", [False, True])
def test_last_layer_equals_model_output(attn_only):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=3, n_head=2, n_embd=16, attn_only=attn_only)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0)  # a peaked output distribution, not a flat one
    tokens = torch.randint(0, 20, (4, 12))
    with torch.no_grad():
        probs = model(tokens)[0].softmax(-1)  # (B, T, V)
    for pos in (-1, 5):
        lens = logit_lens.logit_lens(model, tokens, target_position=pos, top_k=3)
        assert lens.probs.shape == (4, 4, 20) and lens.layer_names == ["embed"] + [f"transformer.h.{l}" for l in range(3)]
        torch.testing.assert_close(lens.probs[-1], probs[:, pos], atol=1e-5, rtol=0)
        assert probs[:, pos].max() > 0.3
    # default target: the next token when there is one, else the model's own prediction
    assert torch.equal(logit_lens.logit_lens(model, tokens, target_position=5).target, tokens[:, 6])
    assert torch.equal(logit_lens.logit_lens(model, tokens).target, probs[:, -1].argmax(-1))


def test_lens_on_the_hand_built_circuit(hand_model, tmp_path):
    itos = [chr(ord("a") + i) for i in range(HAND_VOCAB)]
    tokens = repeated_random_tokens(torch.arange(HAND_VOCAB), HAND_BLOCK // 2, 2,
                                    generator=torch.Generator().manual_seed(0))[:, :-1]  # (2, 31)
    answer = tokens[:, 15]  # the last token of the first copy: what induction predicts at the end
    lens = logit_lens.logit_lens(hand_model, tokens, target_position=-1, top_k=5, itos=itos)
    assert torch.equal(lens.target, answer)  # the model's own prediction is the repeat
    assert len(lens.predictions_by_layer) == 3 and all(len(p) == 5 for p in lens.predictions_by_layer)
    for preds in lens.predictions_by_layer:
        probs = [p for _, p in preds]
        assert probs == sorted(probs, reverse=True) and all(isinstance(t, str) for t, _ in preds)
    assert lens.predictions_by_layer[-1][0][0] == itos[answer[0]]
    # before the induction head the answer is not visible; after it, it is the top token
    assert lens.target_probs[0] < 0.1 and lens.target_probs[1] < 0.1 and lens.target_probs[2] > 0.9
    assert lens.target_ranks[0] > 0 and lens.target_ranks[2] == 0
    conv = logit_lens.measure_convergence(lens, threshold=0.5)
    assert conv["convergence_layer"] == 2 and conv["converged"] and conv["convergence_name"] == "transformer.h.1"
    assert 0 < conv["stability"] <= 1 and conv["final_prediction"] == itos[answer[0]]
    assert logit_lens.measure_convergence(lens, threshold=0.999999)["convergence_layer"] == -1
    fig = logit_lens.plot_prediction_evolution(lens, num_predictions=3, save_path=tmp_path / "lens.png")
    assert (tmp_path / "lens.png").stat().st_size > 1000
    assert len(fig.axes[0].lines) == 3


def test_residuals_at_one_position_equal_the_full_stack_at_it():
    """residual_stack(position=p) runs tokens up to p, the last block for p's query alone:
    the same residuals as the full forward at p; with a hook of yours on the model, the full forward."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=3, n_head=2, n_embd=16)).eval()
    tokens = torch.randint(0, 20, (4, 12))
    names, full = logit_lens.residual_stack(model, tokens)  # (L+1, B, T, C)
    for pos in (0, 5, 11, -1):
        names_p, at = logit_lens.residual_stack(model, tokens, pos)
        assert names_p == names and at.shape == (4, 4, 16)
        torch.testing.assert_close(at, full[:, :, pos], atol=1e-5, rtol=0)
    seen = []
    handle = model.transformer.h[2].register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    try:
        _, at = logit_lens.residual_stack(model, tokens, 5)
    finally:
        handle.remove()
    assert seen == [(4, 12, 16)]  # the hook saw the whole forward, as model(tokens) shows it
    torch.testing.assert_close(at, full[:, :, 5], atol=1e-5, rtol=0)
