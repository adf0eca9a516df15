"""Activation patching: sanity values for every variant, batched == one
forward per component, the hand-built circuit's heads, and attribution patching against
exact patching on a trained model."""

import pytest
import torch
from conftest import HAND_VOCAB

from induction_dynamics.interpretability import activation_patching as ap
from induction_dynamics.interpretability.utils import HookManager
from induction_dynamics.model import GPT, GPTConfig



@pytest.fixture(autouse=True)
def exact_normalisation(monkeypatch):
    """These tests compare the computational paths on random models, whose clean - corrupted gap
    is small next to its spread over the rows: the rule that leaves such effects undefined (NaN)
    is off here (only an exactly vanishing gap is undefined) and tested on its own below."""
    monkeypatch.setattr(ap, "MIN_GAP_Z", 0.0)


def variants(model):
    out = [ap.patch_heads, ap.patch_heads_by_position, ap.patch_attn_out_by_layer,
           ap.patch_residual_by_layer, ap.patch_residual_by_position]
    if not model.config.attn_only:
        out.append(ap.patch_mlp_out_by_layer)
    return out


@pytest.fixture(scope="module")
def mlp_model():
    """A 3-layer model with MLPs and larger-than-init random weights, so outputs depend on the
    input. float64: its clean-corrupted logit difference is small, and the test is about the
    algorithms being exact, not about float32 rounding (the trained model covers float32)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=24, vocab_size=32, n_layer=3, n_head=2, n_embd=32))
    with torch.no_grad():  # larger weights than nanoGPT's init: outputs that depend on the input
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model.double().eval()


def data_for(model, seq_len=12, batch=6, seed=0):
    allowed = torch.arange(model.config.vocab_size)
    return ap.induction_patching_data(allowed, seq_len, batch, torch.Generator().manual_seed(seed))


def test_induction_patching_data_is_a_minimal_pair():
    d = ap.induction_patching_data(torch.arange(20), 8, 5, torch.Generator().manual_seed(0))
    assert d.clean.shape == d.corrupted.shape == (5, 15)
    differs = (d.clean != d.corrupted)
    assert differs.sum() == 5 and differs[:, 7].all()  # only the answer token of the first copy
    assert torch.equal(d.answer, d.clean[:, 7]) and torch.equal(d.corrupted_answer, d.corrupted[:, 7])
    assert torch.equal(d.clean[:, 8:], d.clean[:, :7])  # second copy, up to the answer
    assert all(len(set(row.tolist())) == 8 for row in d.clean[:, :8])
    with pytest.raises(ValueError):
        ap.induction_patching_data(torch.arange(8), 8, 2)


@pytest.mark.parametrize("which", ["mlp", "trained"])
def test_clean_into_clean_is_one_and_corrupted_into_corrupted_is_zero(which, mlp_model, trained):
    model = mlp_model if which == "mlp" else trained.model
    d = data_for(model)
    for fn in variants(model):
        same_clean = fn(model, d.clean, d.corrupted, d.answer, d.corrupted_answer, donor="clean", receiver="clean")
        same_corr = fn(model, d.clean, d.corrupted, d.answer, d.corrupted_answer, donor="corrupted",
                       receiver="corrupted")
        torch.testing.assert_close(same_clean, torch.ones_like(same_clean), atol=1e-4, rtol=0, msg=fn.__name__)
        torch.testing.assert_close(same_corr, torch.zeros_like(same_corr), atol=1e-4, rtol=0, msg=fn.__name__)


@pytest.mark.parametrize("which", ["mlp", "trained"])
def test_batched_equals_one_forward_per_component(which, mlp_model, trained):
    model = mlp_model if which == "mlp" else trained.model
    d = data_for(model, seed=1)
    for fn in variants(model):
        fast = fn(model, d.clean, d.corrupted, d.answer, d.corrupted_answer)
        slow = fn(model, d.clean, d.corrupted, d.answer, d.corrupted_answer, batched=False)
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0, msg=fn.__name__)
        assert fast.abs().max() > 0.05  # something in this model matters
    # hook points without a residual-stream shortcut go through masked hooks; small chunks too
    comps = [ap.Component(f"transformer.h.{l}.attn.hook_{k}", h, p)
             for l in range(model.config.n_layer) for k in ("q", "k", "v", "pattern") for h in (0, 1) for p in (None, 12)]
    diff = 11  # seq_len - 1: the only position where clean and corrupted differ
    comps += [ap.Component("transformer.hook_embed", None, diff), ap.Component("blocks.0.hook_resid_pre", None, diff)]
    fast = ap.patch(model, d.clean, d.corrupted, comps, max_rows=20)
    slow = ap.patch(model, d.clean, d.corrupted, comps, batched=False)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    assert fast[-1].item() == pytest.approx(1.0, abs=1e-5)  # the only differing token, at the input: all of it


@pytest.mark.parametrize("which", ["mlp", "trained"])
def test_patch_suite_equals_the_variants(which, mlp_model, trained):
    model = mlp_model if which == "mlp" else trained.model
    d = data_for(model, seed=2)
    args = (model, d.clean, d.corrupted, d.answer, d.corrupted_answer)
    suite = ap.patch_suite(*args)
    expected = {"resid": ap.patch_residual_by_layer(*args), "attn_out": ap.patch_attn_out_by_layer(*args),
                "heads": ap.patch_heads(*args)}
    if not model.config.attn_only:
        expected["mlp_out"] = ap.patch_mlp_out_by_layer(*args)
    assert set(suite) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(suite[name], value, atol=1e-6, rtol=0, msg=name)


def test_hand_built_circuit_patching(hand_model):
    d = ap.induction_patching_data(torch.arange(HAND_VOCAB), 16, 8, torch.Generator().manual_seed(0))
    args = (hand_model, d.clean, d.corrupted, d.answer, d.corrupted_answer)
    heads = ap.patch_heads(*args)
    assert heads[1, 0] > 0.95 and heads.flatten()[[0, 1, 3]].abs().max() < 0.05  # only the induction head
    noising = ap.patch_heads(*args, donor="corrupted", receiver="clean")
    assert noising[1, 0] < 0.05 and noising.flatten()[[0, 1, 3]].min() > 0.95  # only it breaks the clean run
    by_pos = ap.patch_heads_by_position(*args)
    assert by_pos[1, 0, -1] > 0.95 and by_pos[1, 0, :-1].abs().max() < 0.05  # at the last position
    # the answer token is the only difference: restored at its position before block 0
    grid = ap.patch_residual_by_position(*args)
    assert grid[0, 15] > 0.95 and grid[0, torch.arange(31) != 15].abs().max() < 0.05
    attn = ap.patch_attn_out_by_layer(*args)
    assert attn[1] > 0.95 and abs(attn[0]) < 0.05
    with pytest.raises(ValueError, match="attention-only"):
        ap.patch_mlp_out_by_layer(*args)


def test_layer_scan_and_important_components(hand_model):
    d = ap.induction_patching_data(torch.arange(HAND_VOCAB), 16, 8, torch.Generator().manual_seed(0))
    results = ap.patch_layer_scan(hand_model, clean_input=d.clean, corrupted_input=d.corrupted)
    assert list(results) == ["transformer.h.0", "transformer.h.1"]
    assert [int(name.split(".")[2]) for name in results] == [0, 1]
    # default answers: the clean and corrupted models' own predictions, which are the true ones here
    assert results["transformer.h.1"].effect == pytest.approx(1.0, abs=1e-5)
    assert abs(results["transformer.h.0"].effect) < 0.05  # the answer reaches the last position in block 1
    assert results["transformer.h.0"].clean_logit_diff > 1 > results["transformer.h.0"].corrupted_logit_diff
    important = ap.find_important_components(results, threshold=0.3, top_k=5)
    assert [name for name, _ in important] == ["transformer.h.1"]
    effects = torch.tensor([[0.1, -0.6], [0.9, float("nan")]])
    assert ap.find_important_components(effects, threshold=0.3) == [("L1H0", pytest.approx(0.9)),
                                                                    ("L0H1", pytest.approx(-0.6))]
    assert ap.find_important_components(effects, threshold=0.0, top_k=1) == [("L1H0", pytest.approx(0.9))]


def test_default_answers_avoid_a_void_difference(trained):
    d = data_for(trained.model)
    answer, corrupted_answer = ap.default_answers(trained.model, d.clean, d.corrupted)
    assert (answer != corrupted_answer).all()
    # the trained model completes the repeat: its predictions are the true answers
    assert (answer == d.answer).float().mean() > 0.8 and (corrupted_answer == d.corrupted_answer).float().mean() > 0.8


def test_attribution_patching_agrees_with_exact_patching(trained):
    d = data_for(trained.model, seq_len=12, batch=16)
    args = (trained.model, d.clean, d.corrupted, d.answer, d.corrupted_answer)
    exact = ap.patch_heads(*args)
    approx = ap.attribution_patch_heads(*args)
    assert approx.shape == exact.shape
    assert torch.corrcoef(torch.stack([exact.flatten(), approx.flatten()]))[0, 1] > 0.9
    assert approx.flatten().argmax() == exact.flatten().argmax()  # the same most important head
    assert exact.max() > 0.5  # the trained model does have a head that carries the answer
    by_pos = ap.attribution_patch_heads(*args, by_position=True)
    torch.testing.assert_close(by_pos.sum(-1), approx, atol=1e-5, rtol=1e-5)
    assert all(p.grad is None for p in trained.model.parameters())
    frozen = GPT(trained.model.config)
    frozen.load_state_dict(trained.model.state_dict())
    frozen.eval().requires_grad_(False)
    torch.testing.assert_close(ap.attribution_patch_heads(frozen, *args[1:]), approx)


def test_bad_components_are_refused(trained):
    d = data_for(trained.model)
    with pytest.raises(KeyError):
        ap.patch(trained.model, d.clean, d.corrupted, [ap.Component("transformer.h.9.hook_resid_pre")])
    with pytest.raises(ValueError, match="head axis"):
        ap.patch(trained.model, d.clean, d.corrupted, [ap.Component("transformer.h.0.hook_resid_pre", head=0)])
    with pytest.raises(ValueError, match="shape"):
        ap.patch_heads(trained.model, d.clean, d.corrupted[:, :-1])


# ---------------------------------------------------------------------------------------
# The batched forwards (patching_runs): shared prefix, last query only, user hooks
# ---------------------------------------------------------------------------------------

def random_model(n_layer: int, attn_only: bool, seed: int = 0) -> GPT:
    """float64, weights large enough that every position's output depends on the input, and
    biases and layer-norm gains that are not 0 and 1 (the fast path folds biases by hand)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=16, vocab_size=24, n_layer=n_layer, n_head=2, n_embd=16,
                          attn_only=attn_only))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
            elif "ln" in name and name.endswith("weight"):
                p.normal_(1, 0.2)
            else:
                p.normal_(0, 0.3)
    return model.double().eval()


def pair_differing_at(positions: list[list[int]], T: int = 10, vocab: int = 24, seed: int = 0):
    """clean (B, T) random; corrupted = clean with row b changed at positions[b]."""
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (len(positions), T), generator=gen)
    corrupted = clean.clone()
    for b, where in enumerate(positions):
        for t in where:
            corrupted[b, t] = (clean[b, t] + 1 + torch.randint(0, vocab - 1, (), generator=gen)) % vocab
    return clean, corrupted


def fast_components(model, T: int) -> list[ap.Component]:
    """Every fast-path component: residual points, attn/MLP outputs, z per head and whole, at
    every position (before the first difference, last-block ones before the last, negative)."""
    positions = [None, *range(T), -1, -T]
    hooks = ["hook_resid_pre", "hook_attn_out", "hook_resid_post"]
    if not model.config.attn_only:
        hooks += ["hook_resid_mid", "hook_mlp_out"]
    comps = [ap.Component(f"transformer.h.{l}.{hook}", None, p)
             for l in range(model.config.n_layer) for hook in hooks for p in positions]
    comps += [ap.Component(f"blocks.{l}.attn.hook_z", h, p)
              for l in range(model.config.n_layer) for h in (None, 0, 1) for p in positions]
    return comps


PAIRS = {  # rows' first differing positions -> the shared prefix p
    "differs at 0 (no shared prefix)": [[0], [4], [7]],
    "first difference varies by row": [[6, 8], [3], [5, 9]],
    "one position, every row": [[4], [4], [4]],
    "only the last position": [[9], [9], [9]],
    "one row differs": [[], [2], []],
}


@pytest.mark.parametrize("n_layer,attn_only", [(1, False), (3, False), (1, True), (3, True)])
@pytest.mark.parametrize("pair", list(PAIRS))
def test_fast_path_equals_one_forward_per_component(n_layer, attn_only, pair):
    model = random_model(n_layer, attn_only)
    clean, corrupted = pair_differing_at(PAIRS[pair])
    T = clean.shape[1]
    comps = fast_components(model, T)
    # hook-path components in the same call: q/k/v/pattern/embeddings still take masked hooks
    comps += [ap.Component(f"transformer.h.{n_layer - 1}.attn.hook_{k}", 1, p)
              for k in ("q", "k", "v", "pattern") for p in (None, 5)]
    comps += [ap.Component("hook_embed", None, p) for p in (None, 2)]
    for donor, receiver in [("clean", "corrupted"), ("corrupted", "clean")]:
        kw = dict(donor=donor, receiver=receiver)
        slow = ap.run_patching(model, clean, corrupted, comps, batched=False, **kw)
        fast = ap.run_patching(model, clean, corrupted, comps, **kw)
        # the first batch of components rides in the setup forward, the rest in forwards of their own
        small = ap.run_patching(model, clean, corrupted, comps, max_rows=7, **kw)  # one component per forward
        some = ap.run_patching(model, clean, corrupted, comps, max_rows=40, **kw)  # 13 per forward
        assert abs(slow.clean_logit_diff - slow.corrupted_logit_diff) > 1e-3  # effects well defined
        for run in (fast, small, some):
            assert run.clean_logit_diff == pytest.approx(slow.clean_logit_diff, abs=1e-9)
            assert run.corrupted_logit_diff == pytest.approx(slow.corrupted_logit_diff, abs=1e-9)
            assert torch.equal(run.answer, slow.answer) and torch.equal(run.corrupted_answer, slow.corrupted_answer)
            torch.testing.assert_close(run.effects, slow.effects, atol=1e-5, rtol=0)
        assert (slow.effects - slow.effects[0]).abs().max() > 0.05  # not all the same: the test can fail


def test_fast_path_when_clean_and_corrupted_are_equal():
    model = random_model(2, False)
    clean, _ = pair_differing_at([[], []])
    comps = fast_components(model, clean.shape[1])
    answer, corrupted_answer = torch.tensor([1, 2]), torch.tensor([3, 4])
    fast = ap.run_patching(model, clean, clean, comps, answer, corrupted_answer)
    slow = ap.run_patching(model, clean, clean, comps, answer, corrupted_answer, batched=False)
    assert fast.clean_logit_diff == pytest.approx(slow.clean_logit_diff, abs=1e-9)
    assert fast.effects.isnan().all() and slow.effects.isnan().all()  # nothing to restore: no normalisation


def test_components_that_change_nothing_cost_no_forward(monkeypatch):
    model = random_model(2, False)
    clean, corrupted = pair_differing_at(PAIRS["first difference varies by row"])  # p = 3
    comps = [ap.Component("transformer.h.0.attn.hook_z", 1, 2), ap.Component("transformer.h.1.hook_resid_pre", None, 0),
             ap.Component("transformer.h.1.hook_mlp_out", None, 5)]  # before p; last block, not the last position
    calls = []
    forward_from = model.forward_from
    monkeypatch.setattr(model, "forward_from", lambda *a: calls.append(a[0]) or forward_from(*a))
    for kw in (dict(), dict(donor="corrupted", receiver="clean")):
        calls.clear()
        fast = ap.run_patching(model, clean, corrupted, comps, **kw)
        assert calls == [0, 0]  # the shared prefix, then both runs after it; no patched run
        slow = ap.run_patching(model, clean, corrupted, comps, batched=False, **kw)
        torch.testing.assert_close(fast.effects, slow.effects, atol=1e-9, rtol=0)
        assert fast.effects.tolist() == ([1.0] * 3 if kw else [0.0] * 3)  # the receiver's own value


def ablate(layer: int, head: int, position: int | None):
    """A user's hook: zero one head's output (at one position, or at all)."""
    def fn(z, hook):
        z = z.clone()
        z[:, slice(None) if position is None else position, head] = 0
        return z
    return f"transformer.h.{layer}.attn.hook_z", fn


@pytest.mark.parametrize("position", [None, 4])
def test_user_hooks_are_honoured_batched_and_unbatched(position):
    """Patching inside ``with hm.hooks(...)``: the user's ablation fires in every forward,
    batched or not, and changes the result (a position-indexed one sees every position)."""
    model = random_model(3, False)
    clean, corrupted = pair_differing_at(PAIRS["first difference varies by row"])
    comps = fast_components(model, clean.shape[1])
    comps += [ap.Component("transformer.h.2.attn.hook_q", 1), ap.Component("hook_embed", None, 5)]
    plain = ap.run_patching(model, clean, corrupted, comps)
    hm = HookManager(model)
    with hm.hooks([ablate(0, 1, position), ablate(2, 0, position)]):
        unbatched = ap.run_patching(model, clean, corrupted, comps, batched=False)
        batched = [ap.run_patching(model, clean, corrupted, comps, max_rows=r) for r in (2048, 7)]
        heads = ap.patch_heads(model, clean, corrupted), ap.patch_heads(model, clean, corrupted, batched=False)
    assert not any(hp.has_hooks() for hp in hm.hook_points.values())  # the user's hooks left with the block
    for run in batched:
        assert run.clean_logit_diff == pytest.approx(unbatched.clean_logit_diff, abs=1e-9)
        torch.testing.assert_close(run.effects, unbatched.effects, atol=1e-9, rtol=0)
    torch.testing.assert_close(heads[0], heads[1], atol=1e-9, rtol=0)
    assert abs(unbatched.clean_logit_diff - plain.clean_logit_diff) > 1e-3  # the ablation changed the model
    assert (unbatched.effects - plain.effects).abs().max() > 0.05
    assert (heads[0] - ap.patch_heads(model, clean, corrupted)).abs().max() > 0.05


def test_positions_out_of_range_are_refused(mlp_model):
    d = data_for(mlp_model)
    comps = [ap.Component("transformer.h.0.attn.hook_z", 0, d.clean.shape[1])]
    for batched in (True, False):
        with pytest.raises(IndexError):
            ap.patch(mlp_model, d.clean, d.corrupted, comps, batched=batched)


def test_inputs_longer_than_the_block_are_refused_with_a_clear_error(mlp_model):
    long = torch.zeros(2, mlp_model.config.block_size + 1, dtype=torch.long)
    corrupted = long.clone()
    corrupted[:, 3] = 1
    with pytest.raises(ValueError, match="exceeds the model's block size"):
        ap.patch_heads(mlp_model, long, corrupted)


def test_effects_are_undefined_where_the_baseline_gap_is_within_its_noise(hand_model, monkeypatch):
    monkeypatch.setattr(ap, "MIN_GAP_Z", 2.0)  # the default
    model = hand_model  # a real induction head: the corrupted copy moves the answer far
    d = data_for(model, seq_len=10, batch=8)
    good = ap.run_patching(model, d.clean, d.corrupted, [ap.Component("transformer.h.1.attn.hook_z", 0)],
                           d.answer, d.corrupted_answer)
    gap = good.clean_logit_diff - good.corrupted_logit_diff
    assert not good.undefined and abs(gap) > 2 * good.gap_stderr and good.effects.isfinite().all()
    assert good.clean_rows.shape == good.corrupted_rows.shape == (8,) and good.patched_rows.shape == (1, 8)
    assert good.patched_rows.mean().item() == pytest.approx(
        good.effects.item() * gap + good.corrupted_logit_diff, abs=1e-4)
    # an untrained model: the corrupted token changes the answer's logit by noise only
    torch.manual_seed(0)
    fresh = GPT(GPTConfig(**{**vars(model.config)})).eval()
    bad = ap.run_patching(fresh, d.clean, d.corrupted, [ap.Component("transformer.h.1.attn.hook_z", 0)],
                          d.answer, d.corrupted_answer)
    assert abs(bad.clean_logit_diff - bad.corrupted_logit_diff) <= 2 * bad.gap_stderr
    assert bad.effects.isnan().all() and "within 2 standard errors" in bad.undefined
    assert ap.attribution_patch_heads(fresh, d.clean, d.corrupted, d.answer, d.corrupted_answer).isnan().all()
    # the old rule (only an exactly vanishing gap) gives a number, and a meaningless one
    old = ap.run_patching(fresh, d.clean, d.corrupted, [ap.Component("transformer.h.1.attn.hook_z", 0)],
                          d.answer, d.corrupted_answer, min_gap_z=0)
    assert old.effects.isfinite().all()
