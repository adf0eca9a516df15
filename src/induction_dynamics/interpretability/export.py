"""TransformerLens export: any checkpoint as a ``HookedTransformer`` with the same weights.

    from induction_dynamics.interpretability.export import to_hooked_transformer
    tl_model = to_hooked_transformer("out/run/checkpoints/step_001000.pt")
    logits, cache = tl_model.run_with_cache(tl_model.to_tokens("ROMEO: ROMEO:"))

Needs the optional extra ``pip install 'induction-dynamics[tl]'`` (TransformerLens 2.x).

The weights are copied as they are: no layer-norm folding, no centering, no value-bias
folding, so ``tl_model.blocks[l].attn.W_Q`` is exactly this model's query matrix and the
logits match ours to float rounding. Call ``tl_model.process_weights_()`` afterwards for
TransformerLens's folded form (it leaves the logits unchanged, up to a constant per
position). What differs from TransformerLens's GPT-2:

- ``act_fn="gelu"`` (nanoGPT's ``nn.GELU()`` is the exact GELU, not GPT-2's tanh form);
- ``bias=False`` models get zero biases (TransformerLens always has them);
- the tied embedding is copied into both ``W_E`` and ``W_U`` (TransformerLens does not tie);
- the checkpoint's own tokenizer comes along as a Hugging Face fast tokenizer: a character
  vocabulary as one token per character, a byte-level BPE run's as that BPE itself, so
  ``to_tokens`` / ``to_string`` / ``detect_head`` take text. GPT-2 ids without their merges
  (a nanoGPT ``.bin`` dataset) have none: feed token tensors. These models have no BOS
  token: ``default_prepend_bos`` is False, and ``prepend_bos=True`` would prepend a
  string the vocabulary does not have.
"""

from __future__ import annotations

from pathlib import Path

import torch

from induction_dynamics.checkpoint import load_checkpoint, model_from_checkpoint
from induction_dynamics.data.tokenizer import BPETokenizer, CharTokenizer, from_state
from induction_dynamics.errors import TokenizerError
from induction_dynamics.model import GPT

_MISSING = "to_hooked_transformer needs TransformerLens 2.x: pip install 'induction-dynamics[tl]'"


def _transformer_lens():
    try:
        import transformer_lens
    except ImportError as e:
        raise ImportError(_MISSING) from e
    return transformer_lens


def char_tokenizer(vocab: list[str]):
    """A Hugging Face fast tokenizer with one token per character of ``vocab`` (id = index).

    A BPE model without merges splits its input into characters and maps each to its id;
    ``Fuse`` decodes by plain concatenation (no spaces between tokens). A character outside
    ``vocab`` raises (the unknown token names the problem and has no id) instead of being
    dropped silently.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    if len(set(vocab)) != len(vocab) or any(len(ch) != 1 for ch in vocab):
        raise ValueError("a character tokenizer needs distinct one-character tokens")
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(vocab)}, merges=[],
                                unk_token="<a character outside the checkpoint's vocabulary>"))
    tok.decoder = decoders.Fuse()
    # add_bos_token=True (and a name) only stop TransformerLens from reloading the tokenizer
    # from the hub for a BOS-adding copy; without a post-processor it never adds one.
    # pad: the first character, as GPT-2 pads with a real token; right padding only fills
    # positions after a sequence's end, which causal attention never lets earlier ones see.
    return PreTrainedTokenizerFast(tokenizer_object=tok, name_or_path="characters", add_bos_token=True,
                                   pad_token=vocab[0], clean_up_tokenization_spaces=False)


def bpe_tokenizer(tokenizer_json: str):
    """A Hugging Face fast tokenizer around a byte-level BPE run's own ``tokenizers`` JSON."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    # the first token as pad, add_bos_token and a name: as char_tokenizer
    tok = Tokenizer.from_str(tokenizer_json)
    return PreTrainedTokenizerFast(tokenizer_object=tok, name_or_path="bpe", add_bos_token=True,
                                   pad_token=tok.id_to_token(0), clean_up_tokenization_spaces=False)


def _hf_tokenizer(vocab: list[str] | None, saved: dict | None):
    """The tokenizer to hand TransformerLens: ``vocab`` (characters) if given, else the
    checkpoint's saved one; None where there is none that encodes text."""
    if vocab is not None:
        # labels of longer tokens (a BPE run's) say nothing of how text splits into them
        return char_tokenizer(vocab) if all(len(t) == 1 for t in vocab) else None
    try:
        tok = from_state(saved) if saved is not None else None
    except TokenizerError:
        return None
    if isinstance(tok, CharTokenizer):
        return char_tokenizer(tok.itos)
    if isinstance(tok, BPETokenizer):
        return bpe_tokenizer(tok.json)
    return None  # GPT-2 ids: no merges here to encode text with


def _state_dict(model: GPT, n_head: int) -> dict[str, torch.Tensor]:
    """TransformerLens parameter names and shapes from nanoGPT's (nn.Linear weights are (out, in))."""
    cfg = model.config
    C, nh = cfg.n_embd, n_head
    hs = C // nh
    sd = model.state_dict()

    def bias(name: str, shape) -> torch.Tensor:
        return sd[name] if name in sd else torch.zeros(shape)

    out = {"embed.W_E": sd["transformer.wte.weight"], "pos_embed.W_pos": sd["transformer.wpe.weight"]}
    for l in range(cfg.n_layer):
        p = f"transformer.h.{l}."
        out[f"blocks.{l}.ln1.w"] = sd[p + "ln_1.weight"]
        out[f"blocks.{l}.ln1.b"] = bias(p + "ln_1.bias", C)
        w_q, w_k, w_v = sd[p + "attn.c_attn.weight"].split(C, dim=0)  # each (C_out = nh*hs, C_in)
        b_q, b_k, b_v = bias(p + "attn.c_attn.bias", 3 * C).split(C)
        for name, w, b in (("Q", w_q, b_q), ("K", w_k, b_k), ("V", w_v, b_v)):
            out[f"blocks.{l}.attn.W_{name}"] = w.T.reshape(C, nh, hs).permute(1, 0, 2)  # (nh, C, hs)
            out[f"blocks.{l}.attn.b_{name}"] = b.reshape(nh, hs)
        out[f"blocks.{l}.attn.W_O"] = sd[p + "attn.c_proj.weight"].T.reshape(nh, hs, C)  # (nh, hs, C)
        out[f"blocks.{l}.attn.b_O"] = bias(p + "attn.c_proj.bias", C)
        if not cfg.attn_only:
            out[f"blocks.{l}.ln2.w"] = sd[p + "ln_2.weight"]
            out[f"blocks.{l}.ln2.b"] = bias(p + "ln_2.bias", C)
            out[f"blocks.{l}.mlp.W_in"] = sd[p + "mlp.c_fc.weight"].T  # (C, 4C)
            out[f"blocks.{l}.mlp.b_in"] = bias(p + "mlp.c_fc.bias", 4 * C)
            out[f"blocks.{l}.mlp.W_out"] = sd[p + "mlp.c_proj.weight"].T  # (4C, C)
            out[f"blocks.{l}.mlp.b_out"] = bias(p + "mlp.c_proj.bias", C)
    out["ln_final.w"] = sd["transformer.ln_f.weight"]
    out["ln_final.b"] = bias("transformer.ln_f.bias", C)
    out["unembed.W_U"] = sd["lm_head.weight"].T  # (C, V); tied to W_E in our model
    out["unembed.b_U"] = torch.zeros(cfg.vocab_size)
    return {k: v.detach().clone() for k, v in out.items()}


def to_hooked_transformer(model_or_checkpoint, *, vocab: list[str] | None = None, device=None):
    """A TransformerLens ``HookedTransformer`` with the weights of a GPT, a checkpoint dict or file.

    ``model_or_checkpoint``: a ``GPT``, a checkpoint dict (``{"model", "model_args", ...}``,
    see ``checkpoint``) or the path of a checkpoint file (read with ``weights_only=True``).
    ``vocab`` (token id -> character) sets the tokenizer; by default the checkpoint's own
    tokenizer (characters or byte-level BPE). Without one (a bare GPT, GPT-2 ids) there is
    no tokenizer: feed token tensors. The result is in eval mode,
    on ``device`` (default: where the weights are), in the weights' dtype.
    """
    tl = _transformer_lens()
    if isinstance(model_or_checkpoint, (str, Path)):
        model_or_checkpoint = load_checkpoint(model_or_checkpoint)
    if isinstance(model_or_checkpoint, dict):
        if not {"model", "model_args"} <= model_or_checkpoint.keys():
            raise ValueError("a checkpoint dict needs 'model' and 'model_args' entries (a bare state dict "
                             "does not say the model's shape)")
        saved = model_or_checkpoint.get("tokenizer")
        if saved is None and vocab is None and model_or_checkpoint.get("vocab") is not None:
            saved = {"kind": "char", "itos": model_or_checkpoint["vocab"]}  # written before tokenizers travelled
        model = model_from_checkpoint(model_or_checkpoint)
    elif isinstance(model_or_checkpoint, GPT):
        model, saved = model_or_checkpoint, None
    else:
        raise TypeError(f"expected a GPT, a checkpoint dict or a path, got {type(model_or_checkpoint).__name__}")
    c = model.config
    if vocab is not None and len(vocab) != c.vocab_size:
        raise ValueError(f"vocab has {len(vocab)} tokens but the model's vocab_size is {c.vocab_size}")
    hf_tok = _hf_tokenizer(vocab, saved)
    # a tokenizer may be smaller than the embedding (nanoGPT rounds vocab_size up to 50,304)
    if hf_tok is not None and len(hf_tok) > c.vocab_size:
        raise ValueError(f"the tokenizer has {len(hf_tok)} tokens but the model's vocab_size is {c.vocab_size}")
    weight = model.lm_head.weight
    cfg = tl.HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.block_size, d_head=c.n_embd // c.n_head,
        n_heads=c.n_head, d_mlp=None if c.attn_only else 4 * c.n_embd, d_vocab=c.vocab_size,
        act_fn=None if c.attn_only else "gelu", attn_only=c.attn_only, normalization_type="LN", eps=1e-5,
        positional_embedding_type="standard", default_prepend_bos=False,
        device=str(device if device is not None else weight.device), dtype=weight.dtype,
    )
    hooked = tl.HookedTransformer(cfg, tokenizer=hf_tok)
    hooked.load_and_process_state_dict(_state_dict(model, c.n_head), fold_ln=False, center_writing_weights=False,
                                       center_unembed=False, fold_value_biases=False,
                                       refactor_factored_attn_matrices=False)
    return hooked.eval()
