"""HookManager and ActivationCache: selection, caching, and hooks that never leak."""

import pytest
import torch

from induction_dynamics.interpretability.utils import (
    ActivationCache,
    HookManager,
    layer_of,
    normalize_name,
)
from induction_dynamics.model import GPT, GPTConfig


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=2, n_head=2, n_embd=16)).eval()


def hooks_left(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_names_filter_by_name_list_predicate_and_tl_alias(model):
    hm = HookManager(model)
    assert hm.names("attn.hook_pattern") == ["transformer.h.0.attn.hook_pattern", "transformer.h.1.attn.hook_pattern"]
    assert set(hm.names(["transformer.h.1.hook_resid_post", "hook_embed"])) == {
        "transformer.h.1.hook_resid_post", "transformer.hook_embed"}
    assert hm.names(lambda n: n.endswith("hook_z")) == ["transformer.h.0.attn.hook_z", "transformer.h.1.attn.hook_z"]
    assert normalize_name("blocks.1.attn.hook_z") == "transformer.h.1.attn.hook_z"
    assert hm.names("blocks.1.attn.hook_z") == ["transformer.h.1.attn.hook_z"]
    assert layer_of("transformer.h.1.attn.hook_z") == 1 and layer_of("transformer.hook_embed") is None


def test_run_with_cache_is_dict_like_and_stacks(model):
    tokens = torch.randint(0, 20, (3, 10))
    (logits, _), cache = HookManager(model).run_with_cache(tokens, names_filter=["attn.hook_pattern", "hook_resid_post"])
    assert isinstance(cache, ActivationCache)
    assert set(cache) == {f"transformer.h.{l}.{n}" for l in (0, 1) for n in ("attn.hook_pattern", "hook_resid_post")}
    assert len(cache) == 4 and "transformer.h.0.hook_resid_post" in cache
    assert cache.stack("attn.hook_pattern").shape == (2, 3, 2, 10, 10)
    assert torch.equal(cache["pattern", 1], cache["blocks.1.attn.hook_pattern"])
    # the cached last residual stream is what the unembedding reads
    out = model.lm_head(model.transformer.ln_f(cache["resid_post", 1]))
    torch.testing.assert_close(out, logits)
    assert hooks_left(model) == 0
    with pytest.raises(KeyError):
        cache.stack("hook_mlp_in")


def test_hooks_edit_activations_and_are_removed(model):
    tokens = torch.randint(0, 20, (2, 8))
    hm = HookManager(model)
    clean, _ = model(tokens)
    with hm.hooks([("transformer.h.1.hook_resid_post", lambda act, hook: torch.zeros_like(act))]):
        zeroed, _ = model(tokens)
        assert hooks_left(model) == 1
    expected = model.lm_head(model.transformer.ln_f(torch.zeros(2, 8, 16)))
    torch.testing.assert_close(zeroed, expected)
    assert hooks_left(model) == 0
    torch.testing.assert_close(model(tokens)[0], clean)


def test_no_hook_leaks_after_exceptions(model):
    tokens = torch.randint(0, 20, (2, 8))
    hm = HookManager(model)

    def boom(act, hook):
        raise RuntimeError("inside a hook")

    with pytest.raises(RuntimeError, match="inside a hook"):
        hm.run_with_hooks(tokens, fwd_hooks=[("attn.hook_z", lambda a, h: a), ("transformer.h.1.hook_resid_post", boom)])
    assert hooks_left(model) == 0
    with pytest.raises(ValueError, match="user code"):
        with hm.hooks([("hook_resid_pre", lambda a, h: a)]):
            assert hooks_left(model) == 2
            raise ValueError("user code")
    assert hooks_left(model) == 0
    # a bad name after good ones: the good ones are removed too
    with pytest.raises(KeyError):
        with hm.hooks([("hook_resid_pre", lambda a, h: a), ("no_such_hook", lambda a, h: a)]):
            pass
    assert hooks_left(model) == 0
    with pytest.raises(RuntimeError):
        hm.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_z") or boom(None, None))
    assert hooks_left(model) == 0


class LinearCalls(torch.overrides.TorchFunctionMode):
    """Records the weight of every F.linear the forward runs (what it computed, not a stand-in)."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear:
            self.weights.append(args[1])
        return func(*args, **(kwargs or {}))


def test_stop_early_caches_the_same_and_computes_nothing_after(model):
    tokens = torch.randint(0, 20, (3, 10))
    hm = HookManager(model)
    with torch.no_grad(), LinearCalls() as full:
        (logits, _), cache = hm.run_with_cache(tokens, names_filter="attn.hook_pattern")
    with torch.no_grad(), LinearCalls() as early:
        out, cache_early = hm.run_with_cache(tokens, names_filter="attn.hook_pattern", stop_early=True)
    assert out is None and logits.shape == (3, 10, 20)
    assert set(cache_early) == set(cache)
    for name in cache:
        assert torch.equal(cache_early[name], cache[name])
    # the last block's qkv projection ran (its pattern needs it); its output projection, MLP and the unembedding did not
    last = model.transformer.h[1]
    ran = {id(w) for w in early.weights}
    assert id(last.attn.c_attn.weight) in ran and len(early.weights) == 5 and len(full.weights) == 9
    assert not ran & {id(last.attn.c_proj.weight), id(last.mlp.c_fc.weight), id(model.lm_head.weight)}
    assert hooks_left(model) == 0


def test_stop_early_is_ignored_while_a_hook_of_yours_is_on_the_model(model):
    tokens = torch.randint(0, 20, (3, 10))
    seen = []
    handle = model.lm_head.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    try:
        (logits, _), cache = HookManager(model).run_with_cache(tokens, names_filter="attn.hook_pattern", stop_early=True)
    finally:
        handle.remove()
    assert seen == [(3, 10, 20)] and logits.shape == (3, 10, 20) and len(cache) == 2
