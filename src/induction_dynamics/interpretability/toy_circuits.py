"""Models whose weights are set by hand, so their heads have known right answers.

    model = hand_built_induction_model()          # 2 layers x 2 heads, attention only
    # L0H0 previous-token head, L1H0 induction head (K-composition), L0H1/L1H1 controls

Use them to check a metric or a patching routine against ground truth, or to see what a
content-based induction circuit looks like next to a trained model.
"""

from __future__ import annotations

import torch

from induction_dynamics.model import GPT, GPTConfig


def hand_built_induction_model(vocab_size: int = 32, block_size: int = 32, sharpness: float = 10.0) -> GPT:
    """Layer 0 head 0 = previous-token head, layer 1 head 0 = induction head (K-composition).

    Residual stream (2V + T dims) = [token one-hot (V) | position one-hot (T) |
    "previous token" (V)], every block centred so each residual vector has mean 0 (LayerNorm then
    only rescales). Large query weights make every softmax nearly one-hot.

    - L0H0 previous-token head: query = position i shifted by one, key = position j, so it
      attends to j = i-1; it copies that token into the "previous token" block.
    - L0H1 attends to its own position and *subtracts* the current token from that block,
      so position 0 (no previous token; L0H0 can only attend to itself there) carries none.
    - L1H0 induction head: query = current token t, key = previous-token block: it attends
      to the position right after an earlier t; it copies the attended token into the
      token block, so the model also *predicts* the repeat. A query bias gives position 0
      about half a match's score: a query with no earlier occurrence rests there (an
      attention sink, like BOS) instead of spreading over everything before it.
    - L1H1 control: attends to its own position, writes nothing.
    """
    V, T = vocab_size, block_size
    if T % 2 or V < T // 2:
        raise ValueError("need an even block_size and vocab_size >= block_size / 2 (head size = V + T/2)")
    C, H = 2 * V + T, 2
    hs = C // H
    cfg = GPTConfig(block_size=T, vocab_size=V, n_layer=2, n_head=H, n_embd=C, bias=True, attn_only=True)
    model = GPT(cfg)
    tok, pos, prev = torch.arange(V), V + torch.arange(T), V + T + torch.arange(V)

    def centred_one_hot(n: int, dims: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(n, C)
        out[torch.arange(n), dims] = 1.0
        out[:, dims] -= 1.0 / len(dims)
        return out

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for ln in [b.ln_1 for b in model.transformer.h] + [model.transformer.ln_f]:
            ln.weight.fill_(1.0)
        model.transformer.wte.weight.copy_(centred_one_hot(V, tok))  # tied with lm_head
        model.transformer.wpe.weight.copy_(centred_one_hot(T, pos))
        # the LayerNorm scale at each layer's input (position 0 of layer 1 excepted)
        sigma0 = ((1 - 1 / V) + (1 - 1 / T)) ** 0.5 / C ** 0.5
        sigma1 = ((1 - 1 / V) + (1 - 1 / T) + 2) ** 0.5 / C ** 0.5  # prev block: tok[j-1] - tok[j]
        s = sharpness

        def qkv(layer):
            w = model.transformer.h[layer].attn.c_attn.weight  # (3C, C) rows: q | k | v
            return w[:C], w[C:2 * C], w[2 * C:]

        # L0H0 previous-token head: q_i[m] = pos_{m+1}(i), k_j[m] = pos_m(j) -> peak at j = i-1
        Wq, Wk, Wv = qkv(0)
        for m in range(T - 1):
            Wq[m, pos[m + 1]] = s
            Wk[m, pos[m]] = 1.0
        for m in range(V):
            Wv[m, tok[m]] = 1.0  # value = the attended position's token
        proj0 = model.transformer.h[0].attn.c_proj.weight  # (C_out, nh*hs)
        proj0[prev, torch.arange(V)] = sigma0  # undo the LayerNorm scale: unit-size copy
        # L0H1 / L1H1: attend to the own position (q_i = pos_i, k_j = pos_j)
        for layer in (0, 1):
            Wq, Wk, Wv = qkv(layer)
            for m in range(T):
                Wq[hs + m, pos[m]] = s
                Wk[hs + m, pos[m]] = 1.0
        Wv0 = qkv(0)[2]
        for m in range(V):
            Wv0[hs + m, tok[m]] = 1.0
        proj0[prev, hs + torch.arange(V)] = -sigma0  # L0H1: prev block -= current token
        # L1H0 induction head: q = current token, k = previous-token block
        Wq, Wk, Wv = qkv(1)
        for m in range(V):
            Wq[m, tok[m]] = s
            Wk[m, prev[m]] = 1.0
            Wv[m, tok[m]] = 1.0
        # attention sink: q[V] = constant (bias), k_j[V] = pos_0(j); position 0's residual is
        # smaller (empty prev block), so 0.4 here is ~0.6 of a match there
        Wk[V, pos[0]] = 1.0
        model.transformer.h[1].attn.c_attn.bias[V] = 0.4 * s / sigma1
        proj1 = model.transformer.h[1].attn.c_proj.weight
        proj1[tok, torch.arange(V)] = 3 * sigma1  # write the copied token, louder than the current one
    return model.eval()
