"""The suite's prompts: the training-distribution text windows behind ``icl_score_repeats``, and
the heads per-head patching patches (all, or some of each layer above a stated size)."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch

from induction_dynamics.analysis.config import SuiteConfig
from induction_dynamics.analysis.prompts import ALL_HEADS_UP_TO, HEADS_PER_LAYER_ABOVE, make_prompts
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


# --------------------------------------------------------------------------- per-head patching on some heads

def patching_prompts(patching_heads, shape, seed=5):
    data = load_data("synthetic", synthetic_vocab_size=shape["vocab_size"], synthetic_tokens=5_000, seed=0)
    return make_prompts(SuiteConfig(text_windows=4, patching_heads=patching_heads), vocab_size=shape["vocab_size"],
                        block_size=shape["block_size"], token_counts=None, val_tokens=data.val, seed=seed,
                        n_layer=shape["n_layer"], n_head=shape["n_head"])


def test_patching_some_heads_gives_those_heads_rows_of_patching_every_head(trained):
    shape = asdict(trained.model.config)
    full_prompts, some_prompts = patching_prompts(None, shape), patching_prompts(2, shape)
    assert full_prompts.patching_heads is None  # 2 x 4 heads: every head by default
    assert some_prompts.info()["patching_heads"] == some_prompts.patching_heads.tolist()  # run_info records it
    full = {(m, l, h): (v, e) for m, l, h, v, e in run_suite(trained.model, full_prompts, ["patching"])[0]}
    some = {(m, l, h): (v, e) for m, l, h, v, e in run_suite(trained.model, some_prompts, ["patching"])[0]}
    patched = {(l, h) for m, l, h in some if m == "patch_head"}
    assert patched == set(some_prompts.patched_heads())
    assert sorted(l for l, _ in patched) == [0, 0, 1, 1]  # two heads of each layer
    assert set(some) < set(full)
    assert {k for k in full if k[0] != "patch_head"} <= set(some)  # every other patching row is kept
    heads = [k for k in some if k[0] == "patch_head"]
    assert all(math.isfinite(some[k][0]) and math.isfinite(some[k][1]) for k in heads)  # a defined gap: numbers
    for key in some:
        # the same patches in a smaller stacked batch: equal up to the float32 rounding of batch size
        assert some[key] == pytest.approx(full[key], rel=1e-5, abs=1e-6, nan_ok=True), key


def test_the_default_patches_some_heads_of_a_model_above_the_stated_size():
    from induction_dynamics.analysis import analyze_checkpoint

    assert 8 * 8 <= ALL_HEADS_UP_TO < 9 * 8
    val = torch.randint(26, (4_000,), generator=torch.Generator().manual_seed(0))
    n_heads = {}
    for n_layer in (8, 9):  # 64 heads: every one; 72: HEADS_PER_LAYER_ABOVE a layer
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=n_layer, n_head=8, n_embd=32, block_size=T, vocab_size=26, dropout=0.0))
        rows = analyze_checkpoint(model, overrides=("suite.metrics=[patching,attribution_patching]",), val_tokens=val)
        n_heads[n_layer] = {m: int((rows["metric"] == m).sum()) for m in ("patch_head", "attribution_patch_head")}
    assert n_heads[8] == {"patch_head": 64, "attribution_patch_head": 64}
    assert n_heads[9] == {"patch_head": 9 * HEADS_PER_LAYER_ABOVE, "attribution_patch_head": 72}


def test_patching_heads_is_checked():
    shape = dict(n_layer=2, n_head=4, vocab_size=26, block_size=T)
    with pytest.raises(ValueError, match="suite.patching_heads must be a number of heads per layer >= 1"):
        patching_prompts(0, shape)
    assert patching_prompts(4, shape).patching_heads is None  # all 4 heads of each layer
    assert torch.equal(patching_prompts(1, shape).patching_heads, patching_prompts(1, shape).patching_heads)
