"""TransformerLens export: parity with our model on logits, head scores (against TL's
detect_head) and per-head patching (against TL's get_act_patch_attn_head_out_all_pos)."""

import dataclasses
import sys

import pytest
import torch
from conftest import HAND_BLOCK, HAND_VOCAB

from induction_dynamics.checkpoint import save_atomic
from induction_dynamics.data import synthetic_vocab
from induction_dynamics.interpretability import activation_patching as ap
from induction_dynamics.interpretability import metrics as M
from induction_dynamics.interpretability.export import to_hooked_transformer
from induction_dynamics.model import GPT, GPTConfig

try:
    from transformer_lens.head_detector import detect_head
    from transformer_lens.patching import get_act_patch_attn_head_out_all_pos
except ImportError:
    detect_head = get_act_patch_attn_head_out_all_pos = None
needs_tl = pytest.mark.skipif(detect_head is None, reason="the [tl] extra (transformer_lens) is not installed")


def test_without_transformer_lens_one_line_error(monkeypatch, hand_model):
    monkeypatch.setitem(sys.modules, "transformer_lens", None)  # what `import` sees when it is absent
    with pytest.raises(ImportError, match=r"pip install 'induction-dynamics\[tl\]'") as err:
        to_hooked_transformer(hand_model)
    assert "\n" not in str(err.value)


def random_model(seed=0, **kw):
    """nanoGPT init, then larger weights so that every part of the model matters to the logits."""
    torch.manual_seed(seed)
    args = dict(block_size=24, vocab_size=32, n_layer=3, n_head=2, n_embd=32) | kw
    model = GPT(GPTConfig(**args))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@needs_tl
@pytest.mark.parametrize("kw", [dict(), dict(bias=False), dict(attn_only=True), dict(attn_only=True, bias=False)])
def test_logits_match(kw):
    model = random_model(**kw)
    tl = to_hooked_transformer(model)
    x = torch.randint(32, (4, 24), generator=torch.Generator().manual_seed(1))
    ours = model(x)[0]
    assert ours.std() > 0.5  # the weights move the logits, so a wrong conversion shows
    torch.testing.assert_close(tl(x), ours, atol=1e-4, rtol=0)
    # the weights themselves, in TransformerLens's layout (no folding, no centering)
    w_q = model.transformer.h[1].attn.c_attn.weight[:32].T.reshape(32, 2, 16).permute(1, 0, 2)
    torch.testing.assert_close(tl.blocks[1].attn.W_Q, w_q, atol=0, rtol=0)


@needs_tl
def test_checkpoint_dict_and_file(tmp_path, trained):
    ckpt = torch.load(trained.checkpoint, weights_only=True)
    ckpt["vocab"] = synthetic_vocab(ckpt["model_args"]["vocab_size"])
    path = tmp_path / "step_000300.pt"
    save_atomic(ckpt, path)
    x = torch.randint(32, (2, 20), generator=torch.Generator().manual_seed(2))
    for source in (ckpt, path, str(path)):
        tl = to_hooked_transformer(source)
        torch.testing.assert_close(tl(x), trained.model(x)[0], atol=1e-4, rtol=0)
        assert tl.to_string(tl.to_tokens("abcDEF")[0]) == "abcDEF"  # the checkpoint's vocabulary
    with pytest.raises(Exception, match="outside the checkpoint's vocabulary"):
        tl.to_tokens("abcXYZ")  # X, Y, Z are not among the 32 tokens: an error, not a silent drop
    with pytest.raises(ValueError, match="vocab_size"):
        to_hooked_transformer(trained.model, vocab=list("abc"))
    with pytest.raises(ValueError, match="model_args"):
        to_hooked_transformer(trained.model.state_dict())  # a bare state dict is not a checkpoint
    with pytest.raises(TypeError, match="expected a GPT"):
        to_hooked_transformer(42)


@needs_tl
def test_a_bpe_checkpoint_exports_with_the_tokenizer_it_was_trained_with(tmp_path):
    from induction_dynamics.data.shakespeare import shakespeare_text
    from induction_dynamics.data.tokenizer import train_bpe

    text = shakespeare_text()[:200_000]
    bpe = train_bpe([text[i:i + 2000] for i in range(0, len(text), 2000)], vocab_size=300)
    # vocab_size rounded up past the tokenizer's 300, as nanoGPT rounds 50,257 to 50,304
    model = GPT(GPTConfig(block_size=32, vocab_size=320, n_layer=1, n_head=2, n_embd=16)).eval()
    path = tmp_path / "step_000000.pt"
    save_atomic({"model": model.state_dict(), "model_args": dataclasses.asdict(model.config), "tokenizer": bpe.state()}, path)
    tl = to_hooked_transformer(path)
    sample = "ROMEO: But, soft! what light"  # within the model's 32 positions
    ids = tl.to_tokens(sample)[0]
    assert ids.tolist() == bpe.encode(sample) and len(ids) < len(sample)  # merges, not characters
    assert tl.to_string(ids) == sample
    torch.testing.assert_close(tl(ids[None]), model(ids[None])[0], atol=1e-4, rtol=0)


@needs_tl
def test_head_scores_equal_detect_head(hand_model):
    """detect_head ("mul", no exclusions) on one sequence of length T scores
    sum(A * D) / sum(A), and sum(A) = T (every query row sums to 1).

    Induction on [x, x] with half length L: D marks (i, i - L + 1) for the L second-copy
    queries, so detect = L * ours / (2L) = ours / 2. Previous token: D marks (i, i - 1) for
    the T - 1 queries i >= 1, so detect = (T - 1) / T * ours. detect_head averages a list of
    sequences' scores; ours averages the batch, so both sides agree per batch too.
    """
    vocab = synthetic_vocab(HAND_VOCAB)
    tl = to_hooked_transformer(hand_model, vocab=vocab)
    gen = torch.Generator().manual_seed(0)
    L = (HAND_BLOCK - 2) // 2  # detect_head needs T < n_ctx
    rep = M.repeated_random_tokens(torch.arange(HAND_VOCAB), L, 6, generator=gen)  # (6, 2L)
    text = torch.randint(HAND_VOCAB, (6, HAND_BLOCK - 1), generator=gen)
    as_text = ["".join(vocab[i] for i in row) for row in rep.tolist()]
    ours = M.induction_scores(hand_model, rep, L)
    theirs = detect_head(tl, as_text, "induction_head")
    torch.testing.assert_close(theirs, ours / 2, atol=1e-5, rtol=0)
    assert ours[1, 0] > 0.9  # the designed induction head, so the comparison is not all zeros
    T = text.shape[1]
    ours = M.previous_token_scores(hand_model, text)
    theirs = detect_head(tl, ["".join(vocab[i] for i in row) for row in text.tolist()], "previous_token_head")
    torch.testing.assert_close(theirs, ours * (T - 1) / T, atol=1e-5, rtol=0)
    assert ours[0, 0] > 0.9


@needs_tl
@pytest.mark.parametrize("which", ["hand", "trained"])
def test_head_patching_equals_transformer_lens(which, hand_model, trained):
    model = hand_model if which == "hand" else trained.model
    V = model.config.vocab_size
    data = ap.induction_patching_data(torch.arange(V), 10, 8, torch.Generator().manual_seed(3))
    ours = ap.patch_heads(model, data.clean, data.corrupted, data.answer, data.corrupted_answer)

    tl = to_hooked_transformer(model)
    rows = torch.arange(len(data.answer))

    def logit_diff(logits):
        last = logits[:, -1]
        return (last[rows, data.answer] - last[rows, data.corrupted_answer]).mean()

    clean_logits, clean_cache = tl.run_with_cache(data.clean)
    clean_ld, corr_ld = logit_diff(clean_logits), logit_diff(tl(data.corrupted))
    theirs = get_act_patch_attn_head_out_all_pos(
        tl, data.corrupted, clean_cache, lambda logits: (logit_diff(logits) - corr_ld) / (clean_ld - corr_ld))
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    assert ours.abs().max() > 0.5  # some head carries the answer
