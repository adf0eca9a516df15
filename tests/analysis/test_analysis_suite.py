"""The suite's prompts: the training-distribution text windows behind ``icl_score_repeats``."""

from __future__ import annotations

import pytest
import torch

from induction_dynamics.analysis.config import SuiteConfig
from induction_dynamics.analysis.prompts import make_prompts
from induction_dynamics.analysis.suite import run_suite
from induction_dynamics.data import load_data
from induction_dynamics.interpretability import metrics as M
from induction_dynamics.model import GPT, GPTConfig

DATA = load_data("synthetic", synthetic_vocab_size=26, synthetic_tokens=20_000, seed=0)
T = 32


def prompts(data_config=None, seed=5, windows=64):
    return make_prompts(SuiteConfig(text_windows=windows), vocab_size=26, block_size=T, token_counts=DATA.counts,
                        val_tokens=DATA.val, seed=seed, data_config=data_config)


def is_val_substring(row: torch.Tensor) -> bool:
    starts = (DATA.val[:len(DATA.val) - T + 1] == row[0]).nonzero().flatten()
    return any(torch.equal(DATA.val[s:s + T], row) for s in starts.tolist())


def longest_copy(row: torch.Tensor) -> tuple[int, int, int]:
    """(m, s, d): the longest run of m tokens with row[s:s+m] == row[s+d:s+d+m], d >= 1."""
    n, best = len(row), (0, 0, 0)
    for d in range(1, n):
        run = 0
        for i in range(n - d):
            run = run + 1 if row[i] == row[i + d] else 0
            if run > best[0]:
                best = (run, i - run + 1, d)
    return best


def test_without_a_curriculum_the_repeat_windows_are_plain_validation_text():
    p = prompts(None)
    assert p.repeats["frac"] == 0.0 and p.info()["text_repeats"] == p.repeats
    assert p.text_repeats.shape == (64, T)
    assert all(is_val_substring(row) for row in p.text_repeats)
    assert not torch.equal(p.text_repeats, p.text)  # other windows than the plain-text prompt


@pytest.mark.parametrize("kind", ["random", "unigram"])
def test_repeat_windows_carry_the_runs_curriculum(kind):
    cfg = {"repeat_frac": 1.0, "repeat_kind": kind, "repeat_min": 6, "repeat_max": 10}
    p = prompts(cfg)
    assert p.repeats == {"frac": 1.0, "kind": kind, "min_len": 6, "max_len": 10}
    # every window holds [x, x] with 6 <= |x| <= 10: a copy at distance |x| of >= 5 tokens (the
    # last one may be cut with the window's final token, as in training); plain synthetic text
    # almost never has a copy of 4
    copies = [longest_copy(row) for row in p.text_repeats]
    assert min(m for m, _, _ in copies) >= 5 and all(6 <= d <= 10 for _, _, d in copies)
    assert max(longest_copy(row)[0] for row in prompts(None).text_repeats) <= 3
    assert torch.equal(prompts(cfg).text_repeats, p.text_repeats)  # fixed by the analysis seed
    assert not torch.equal(prompts(cfg, seed=6).text_repeats, p.text_repeats)


def test_icl_score_repeats_is_the_icl_score_on_the_repeat_windows():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=T, vocab_size=26, dropout=0.0)).eval()
    p = prompts({"repeat_frac": 1.0, "repeat_kind": "random", "repeat_min": 6, "repeat_max": 10})
    rows, _ = run_suite(model, p, ["icl", "icl_repeats"])
    values = {m: v for m, _, _, v, _ in rows}
    # streamed: per-window differences summed in float64, vs the float32 means of one pass
    assert values["icl_score_repeats"] == pytest.approx(M.icl_score(model, p.text_repeats, p.icl_early, p.icl_late),
                                                        abs=1e-6)
    assert values["icl_score"] == pytest.approx(M.icl_score(model, p.text, p.icl_early, p.icl_late), abs=1e-6)
    assert values["icl_score_repeats"] != values["icl_score"]


@pytest.mark.parametrize("metrics", [["previous_token", "icl", "token_loss"], ["icl", "token_loss"]])
def test_the_text_metrics_share_one_forward_and_equal_their_own_functions(metrics):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=T, vocab_size=26, dropout=0.0)).eval()
    p = prompts()
    batches = []
    handle = model.register_forward_pre_hook(lambda module, args: batches.append(tuple(args[0].shape)))
    try:
        rows, tokens = run_suite(model, p, metrics)
    finally:
        handle.remove()
    assert batches == [tuple(p.text.shape)]  # one forward of the text windows for all of them
    losses = M.per_token_losses(model, p.text)
    values = {(m, layer, head): v for m, layer, head, v, _ in rows}
    assert values["icl_score", -1, -1] == pytest.approx(M.icl_score(model, p.text, p.icl_early, p.icl_late), abs=1e-5)
    assert values["text_loss", -1, -1] == pytest.approx(losses.mean().item(), abs=1e-5)
    assert tokens == pytest.approx(losses.reshape(-1).numpy(), abs=1e-5)
    if "previous_token" in metrics:
        prev = M.previous_token_scores(model, p.text)
        assert {k: v for k, v in values.items() if k[0] == "previous_token_score"} == pytest.approx(
            {("previous_token_score", l, h): prev[l, h].item() for l in range(2) for h in range(2)}, abs=1e-6)
