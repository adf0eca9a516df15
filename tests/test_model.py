"""GPT parity: nanoGPT state dicts load unchanged and logits equal a plain re-implementation.

The reference forward pass below is written from nanoGPT's model.py with plain tensor
operations (explicit softmax attention, exact GELU, tied unembedding), independent of
model.py's modules, so a mistake in either shows up as a mismatch.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from induction_dynamics.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    save_atomic,
)
from induction_dynamics.interpretability.utils import HookManager
from induction_dynamics.model import GPT, GPTConfig


def reference_forward(sd: dict, cfg: GPTConfig, idx: torch.Tensor):
    """nanoGPT's forward pass from a state dict: (B, T) ids -> (logits (B, T, V), patterns per layer)."""
    B, T = idx.shape
    C, nh = cfg.n_embd, cfg.n_head
    hs = C // nh

    def ln(x, name):
        return F.layer_norm(x, (C,), sd[name + ".weight"], sd.get(name + ".bias"), 1e-5)

    def linear(x, name):
        y = x @ sd[name + ".weight"].T
        return y + sd[name + ".bias"] if name + ".bias" in sd else y

    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]  # (B, T, C)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    patterns = []
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        q, k, v = linear(ln(x, p + "ln_1"), p + "attn.c_attn").split(C, dim=2)
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, T)
        att = torch.softmax(att.masked_fill(~causal, float("-inf")), dim=-1)
        patterns.append(att)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + linear(y, p + "attn.c_proj")
        if not cfg.attn_only:
            h = F.gelu(linear(ln(x, p + "ln_2"), p + "mlp.c_fc"))  # exact (erf) GELU, as nn.GELU()
            x = x + linear(h, p + "mlp.c_proj")
    x = ln(x, "transformer.ln_f")
    return x @ sd["lm_head.weight"].T, patterns


def nanogpt_keys(cfg: GPTConfig) -> set[str]:
    """The parameter names of nanoGPT's GPT (karpathy/nanoGPT model.py) for this config."""
    def lin(name):
        return {name + ".weight"} | ({name + ".bias"} if cfg.bias else set())

    keys = {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"} | lin("transformer.ln_f")
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        keys |= lin(p + "ln_1") | lin(p + "attn.c_attn") | lin(p + "attn.c_proj")
        if not cfg.attn_only:
            keys |= lin(p + "ln_2") | lin(p + "mlp.c_fc") | lin(p + "mlp.c_proj")
    return keys


def random_model(cfg: GPTConfig, seed=0) -> GPT:
    """A GPT whose weights are far from init (std 0.3, LayerNorm gains around 1): a real test."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("ln_1.weight") or name.endswith("ln_2.weight")
                    or name.endswith("ln_f.weight") else 0.3 * torch.randn_like(p))
    return model.eval()


CONFIGS = [
    GPTConfig(block_size=16, vocab_size=37, n_layer=2, n_head=4, n_embd=32, bias=True),
    GPTConfig(block_size=16, vocab_size=37, n_layer=2, n_head=4, n_embd=32, bias=False),
    GPTConfig(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=32, bias=False, attn_only=True),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["bias", "nobias", "attn_only"])
def test_logits_match_reference(cfg):
    model = random_model(cfg)
    idx = torch.randint(cfg.vocab_size, (3, cfg.block_size), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(cfg.vocab_size, (3, cfg.block_size), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, loss = model(idx, targets)
        ref, _ = reference_forward(model.state_dict(), cfg, idx)
    assert logits.shape == (3, cfg.block_size, cfg.vocab_size)
    assert ref.abs().max() > 1.0  # weights far from init: logits are not trivially tiny
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, F.cross_entropy(ref.flatten(0, 1), targets.flatten()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", CONFIGS, ids=["bias", "nobias", "attn_only"])
def test_nanogpt_state_dict_round_trip(cfg, tmp_path):
    """A nanoGPT-format checkpoint (names, model_args, `_orig_mod.` prefix, old `attn.bias` mask) loads."""
    model = random_model(cfg)
    sd = model.state_dict()
    assert set(sd) == nanogpt_keys(cfg)
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()  # tied, as in nanoGPT
    # what nanoGPT's train.py writes after torch.compile, with the pre-flash causal-mask buffer
    nanogpt_sd = {"_orig_mod." + k: v.clone() for k, v in sd.items()}
    for i in range(cfg.n_layer):
        nanogpt_sd[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.ones(cfg.block_size, cfg.block_size).tril()
    fields = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
    model_args = {f: getattr(cfg, f) for f in fields}  # nanoGPT's model_args has no attn_only
    if cfg.attn_only:
        model_args["attn_only"] = True
    save_atomic({"model": nanogpt_sd, "model_args": model_args, "iter_num": 7, "best_val_loss": torch.tensor(1.5),
                 "config": {"batch_size": 12}}, tmp_path / "ckpt.pt")
    loaded = model_from_checkpoint(load_checkpoint(tmp_path / "ckpt.pt"))
    idx = torch.randint(cfg.vocab_size, (2, cfg.block_size), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())


@pytest.mark.parametrize("cfg", CONFIGS, ids=["bias", "nobias", "attn_only"])
def test_hook_pattern_path_equals_fused_path(cfg):
    """Asking for the attention pattern switches to explicit attention; nothing else changes."""
    model = random_model(cfg)
    idx = torch.randint(cfg.vocab_size, (2, cfg.block_size), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fused, _ = model(idx)
        (hooked, _), cache = HookManager(model).run_with_cache(idx, names_filter="attn.hook_pattern")
        _, ref_patterns = reference_forward(model.state_dict(), cfg, idx)
    torch.testing.assert_close(hooked, fused, atol=1e-5, rtol=1e-5)
    patterns = cache.stack("attn.hook_pattern")  # (n_layer, B, nh, T, T)
    torch.testing.assert_close(patterns, torch.stack(ref_patterns), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(patterns.sum(-1), torch.ones_like(patterns.sum(-1)))
    assert torch.all(patterns.triu(1) == 0)  # causal


@pytest.mark.parametrize("cfg", CONFIGS, ids=["bias", "nobias", "attn_only"])
def test_forward_from_a_layer_reproduces_the_forward(cfg):
    """The rest of the forward from the stream entering any block (or ln_f) gives the same logits."""
    model = random_model(cfg)
    idx = torch.randint(cfg.vocab_size, (3, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        (logits, _), cache = HookManager(model).run_with_cache(idx, names_filter=lambda n: "resid" in n)
        for l in range(cfg.n_layer + 1):
            x = cache[f"transformer.h.{l}.hook_resid_pre" if l < cfg.n_layer else f"transformer.h.{l - 1}.hook_resid_post"]
            torch.testing.assert_close(model.forward_from(l, x), logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(model.forward_from(l, x, last_only=True), logits[:, -1:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=["bias", "nobias", "attn_only"])
@pytest.mark.parametrize("explicit", [False, True], ids=["fused", "pattern hooked"])
def test_past_kv_and_last_only_match_the_full_forward(cfg, explicit):
    """A suffix forward attending to a shared prefix's keys and values (stacked copies of
    its rows) sees what the full forward sees at those positions; last_only, at the last."""
    model = random_model(cfg).double()
    gen = torch.Generator().manual_seed(7)
    prefix = torch.randint(cfg.vocab_size, (2, 5), generator=gen)  # shared by 3 copies of each row
    suffix = torch.randint(cfg.vocab_size, (6, 7), generator=gen)
    full = torch.cat([prefix.repeat(3, 1), suffix], dim=1)  # (6, 12)
    names = ["hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_z", "hook_attn_out", "hook_resid_post"]
    names += [] if cfg.attn_only else ["hook_mlp_out"]
    names += ["attn.hook_pattern"] if explicit else []
    hm = HookManager(model)
    with torch.no_grad():
        (logits, _), cache = hm.run_with_cache(full, names_filter=names)
        _, pre = hm.run_with_cache(prefix, names_filter=["attn.hook_k", "attn.hook_v"])
        past_kv = [(pre[f"transformer.h.{l}.attn.hook_k"], pre[f"transformer.h.{l}.attn.hook_v"])
                   for l in range(cfg.n_layer)]
        for last_only in (False, True):
            (out, _), got = hm.run_with_cache(suffix, names_filter=names, past_kv=past_kv, last_only=last_only)
            torch.testing.assert_close(out, logits[:, -1:] if last_only else logits[:, 5:], atol=1e-10, rtol=0)
            for name, act in got.items():
                want = cache[name]
                pos_axis = 2 if name.endswith("hook_pattern") else 1
                keep = 1 if last_only and name.startswith(f"transformer.h.{cfg.n_layer - 1}.") and not name.endswith(
                    ("hook_resid_pre", "hook_k")) else 7  # the last block after its keys: the last query only
                want = want.narrow(pos_axis, 12 - keep, keep)
                torch.testing.assert_close(act, want, atol=1e-10, rtol=0, msg=name)
    with pytest.raises(ValueError, match="exceeds the model's block size"):
        model(torch.zeros(6, cfg.block_size - 4, dtype=torch.long), past_kv=past_kv)


def test_attn_only_has_no_mlp():
    cfg = CONFIGS[2]
    model = GPT(cfg)
    names = [n for n, _ in model.named_parameters()]
    assert not any(".mlp." in n or ".ln_2." in n for n in names)
    assert "transformer.h.0.hook_mlp_out" not in model.hook_points()
    per_block = cfg.n_embd + 3 * cfg.n_embd ** 2 + cfg.n_embd ** 2  # ln_1 (no bias), c_attn, c_proj
    expected = cfg.vocab_size * cfg.n_embd + cfg.n_layer * per_block + cfg.n_embd  # wte (tied) + blocks + ln_f
    assert model.get_num_params() == expected  # nanoGPT: position embeddings not counted
    assert model.get_num_params(non_embedding=False) == expected + cfg.block_size * cfg.n_embd


def test_nanogpt_init_scales():
    """nanoGPT's init (induction heads depend on it: PyTorch's default init formed none in 8,000 iterations): N(0, 0.02), c_proj 0.02/sqrt(2L)."""
    cfg = GPTConfig(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128)
    torch.manual_seed(0)
    model = GPT(cfg)
    assert abs(model.transformer.wte.weight.std().item() - 0.02) < 0.002
    assert abs(model.transformer.wpe.weight.std().item() - 0.02) < 0.002
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.002
    assert abs(model.transformer.h[0].mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(8)) < 0.001


def test_dropout_only_in_train_mode():
    cfg = GPTConfig(block_size=16, vocab_size=37, n_layer=1, n_head=2, n_embd=32, dropout=0.5)
    model = random_model(cfg)
    idx = torch.randint(cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(model.eval()(idx)[0], model(idx)[0])
        assert not torch.equal(model.train()(idx)[0], model.eval()(idx)[0])
