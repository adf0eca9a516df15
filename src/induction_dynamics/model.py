"""
nanoGPT's GPT (karpathy/nanoGPT, model.py) with TransformerLens-style hook points.

Parameter names and GPTConfig fields are nanoGPT's, so a nanoGPT checkpoint's
``model`` state dict loads unchanged. Additions:

- ``HookPoint`` identity modules at the places interpretability code needs
  (names follow the module tree, e.g. ``transformer.h.0.attn.hook_pattern``);
  analysis registers ordinary forward hooks on them and never monkeypatches.
- The attention pattern is only materialised when a hook on ``hook_attn_scores``
  or ``hook_pattern`` asks for it; otherwise the fused scaled-dot-product path runs.
- ``forward(idx, targets=None)`` returns logits for *every* position.
- ``GPTConfig.attn_only``: blocks without MLP (the induction-heads model family).

Hook points, per block ``i`` (prefix ``transformer.h.{i}.``)::

    hook_resid_pre    (B, T, C)   residual stream entering the block
    attn.hook_q/k/v   (B, T, nh, hs)
    attn.hook_attn_scores (B, nh, T, T)  pre-softmax, causal-masked scores
    attn.hook_pattern (B, nh, T, T)  softmax attention (after dropout is not applied)
    attn.hook_z       (B, T, nh, hs) per-head attention output before c_proj
    hook_attn_out     (B, T, C)   attention output added to the residual stream
    hook_resid_mid    (B, T, C)   residual after attention (MLP models only)
    hook_mlp_out      (B, T, C)   MLP output (MLP models only)
    hook_resid_post   (B, T, C)   residual stream leaving the block

and ``transformer.hook_embed``, ``transformer.hook_pos_embed`` (token and position
embeddings), ``transformer.hook_ln_final`` (final layer-norm output, what the
unembedding reads).
"""

import inspect
import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from induction_dynamics.gpt_config import GPTConfig  # noqa: F401 (nanoGPT's name, imported from here)


class HookPoint(nn.Identity):
    """An identity module whose only job is to carry forward hooks (TransformerLens).

    ``name`` is its module name in the model (set by ``GPT.__init__``), so a hook
    function ``fn(activation, hook)`` knows where it is.
    """

    name: str = ""

    def has_hooks(self) -> bool:
        return bool(self._forward_hooks) or bool(self._forward_pre_hooks)


class LayerNorm(nn.Module):
    """LayerNorm but with an optional bias. PyTorch doesn't support simply bias=False."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # key, query, value projections for all heads, but in a batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # output projection
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # regularization
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.hook_q = HookPoint()
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_attn_scores = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # old nanoGPT checkpoints (pre-flash) stored the causal mask as a buffer "attn.bias"
        state_dict.pop(prefix + "bias", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x, past_kv=None, last_only=False):
        """x (B, T, C) -> (B, T, C), or (B, 1, C) with ``last_only`` (the last query only).

        past_kv: (k, v) of P positions before x's, each (b, P, nh, hs) as hook_k/hook_v saw
        them, b dividing B: row r of x follows row r % b (a prefix shared by stacked copies).
        """
        B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        if last_only:  # keys and values of every position, the query of the last
            q = q[:, -1:]
        Tq = q.size(1)
        q = self.hook_q(q.view(B, Tq, nh, hs))  # (B, Tq, nh, hs)
        k = self.hook_k(k.view(B, T, nh, hs))
        v = self.hook_v(v.view(B, T, nh, hs))
        if past_kv is not None:  # (B, P + T, nh, hs): row r's prefix is row r % b of past_kv's
            b, P = past_kv[0].shape[:2]
            k, v = (torch.cat([past.expand(B // b, *past.shape), t.view(B // b, b, T, nh, hs)], dim=2).view(B, P + T, nh, hs)
                    for past, t in zip(past_kv, (k, v)))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, Tq or S, hs)
        S = k.size(2)  # key positions; query i sits at position S - Tq + i

        if self.hook_attn_scores.has_hooks() or self.hook_pattern.has_hooks() or Tq == 1:
            # explicit attention, only when someone wants to see (or edit) the pattern, or for one
            # query (one row of scores: cheaper than the fused kernel, whose result then varies with the thread count)
            causal = torch.full((Tq, S), float("-inf"), dtype=q.dtype, device=x.device).triu(S - Tq + 1)
            att = torch.baddbmm(causal, q.reshape(B * nh, Tq, hs), k.reshape(B * nh, S, hs).transpose(1, 2),
                                alpha=1.0 / math.sqrt(hs)).view(B, nh, Tq, S)  # scores, -inf above the diagonal
            att = self.hook_attn_scores(att)
            att = self.hook_pattern(F.softmax(att, dim=-1))
            att = self.attn_dropout(att)
            y = att @ v  # (B, nh, Tq, S) x (B, nh, S, hs) -> (B, nh, Tq, hs)
        else:
            # efficient attention using Flash Attention CUDA kernels / fused CPU kernels
            mask = torch.ones(Tq, S, dtype=torch.bool, device=x.device).tril(S - Tq) if 1 < Tq < S else None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0,
                                               is_causal=Tq == S and Tq > 1)
        return self.project(y.transpose(1, 2))

    def project(self, z):
        """z (B, T, nh, hs), the heads' outputs -> (B, T, C), what attention adds to the residual stream."""
        B, T, nh, hs = z.size()
        y = self.hook_z(z)  # per-head outputs before c_proj
        y = y.contiguous().view(B, T, nh * hs)  # re-assemble all head outputs side by side
        # output projection
        y = self.resid_dropout(self.c_proj(y))
        return y


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = self.c_fc(x)
        x = self.gelu(x)
        x = self.c_proj(x)
        x = self.dropout(x)
        return x


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.attn_only = config.attn_only
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        if not self.attn_only:
            self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
            self.mlp = MLP(config)
            self.hook_resid_mid = HookPoint()
            self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, x, past_kv=None, last_only=False, z=None):
        x = self.hook_resid_pre(x)
        # z given: the heads' outputs are known, only what follows them runs
        a = self.hook_attn_out(self.attn(self.ln_1(x), past_kv, last_only) if z is None else self.attn.project(z))
        x = (x[:, -1:] if last_only else x) + a  # (B, T or 1, C)
        if not self.attn_only:
            x = self.hook_resid_mid(x)
            x = x + self.hook_mlp_out(self.mlp(self.ln_2(x)))
        return self.hook_resid_post(x)


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        self.config = config

        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
            hook_embed=HookPoint(),
            hook_pos_embed=HookPoint(),
            hook_ln_final=HookPoint(),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # with weight tying when using torch.compile() some warnings get generated:
        # "UserWarning: functional_call was passed multiple values for tied weights.
        # This behavior is deprecated and will be an error in future versions"
        # not 100% sure what this is, so far seems to be harmless. TODO investigate
        self.transformer.wte.weight = self.lm_head.weight  # https://paperswithcode.com/method/weight-tying

        # init all weights (nanoGPT's scheme: with PyTorch's default init no induction head formed in 8,000 iterations)
        self.apply(self._init_weights)
        # apply special scaled init to the residual projections, per GPT-2 paper
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        for name, hp in self.hook_points().items():
            hp.name = name

    def get_num_params(self, non_embedding=True):
        """
        Return the number of parameters in the model.
        For non-embedding count (default), the position embeddings get subtracted.
        The token embeddings would too, except due to the parameter sharing these
        params are actually used as weights in the final layer, so we include them.
        """
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, past_kv=None, last_only=False):
        """idx (B, T) token ids -> (logits (B, T, vocab), loss or None).

        Unlike nanoGPT, logits are returned for every position even without targets:
        interpretability code needs them. ``targets`` of -1 are ignored in the loss.
        ``past_kv`` and ``last_only``: see ``forward_from``; idx then holds the positions
        after the P cached ones.
        """
        device = idx.device
        b, t = idx.size()
        P = 0 if past_kv is None else past_kv[0][0].size(1)
        if P + t > self.config.block_size:
            raise ValueError(f"sequence length {P + t} exceeds the model's block size {self.config.block_size}")
        pos = torch.arange(P, P + t, dtype=torch.long, device=device)  # shape (t)

        # forward the GPT model itself
        tok_emb = self.transformer.hook_embed(self.transformer.wte(idx))  # token embeddings of shape (b, t, n_embd)
        pos_emb = self.transformer.hook_pos_embed(self.transformer.wpe(pos))  # position embeddings of shape (t, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        logits = self.forward_from(0, x, past_kv, last_only)  # (b, t or 1, vocab_size)

        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def forward_from(self, layer, x, past_kv=None, last_only=False, z=None):
        """The rest of the forward from the residual stream x (B, T, C) entering block ``layer``.

        past_kv: per layer, the keys and values (b, P, nh, hs) of P positions before x's
        (what hook_k/hook_v saw on them; b divides B, see CausalSelfAttention), so x's
        positions are P..P+T-1 and attend to those too. last_only: logits (B, 1, vocab) of
        the last position only; the last block then runs its query and everything after
        for that position alone (nothing else reaches those logits). z: block ``layer``'s
        heads' outputs (B, T or 1, nh, hs) as hook_z sees them, when already known: that
        block's attention then starts at hook_z.
        """
        blocks = self.transformer.h
        for i in range(layer, len(blocks)):
            x = blocks[i](x, None if past_kv is None else past_kv[i], last_only and i == len(blocks) - 1,
                          z if i == layer else None)
        if last_only:
            x = x[:, -1:]  # (B, 1, C); already so when the last block ran
        x = self.transformer.hook_ln_final(self.transformer.ln_f(x))
        return self.lm_head(x)

    def hook_points(self) -> dict:
        """Every HookPoint by its module name, e.g. ``transformer.h.0.attn.hook_pattern``."""
        return {name: m for name, m in self.named_modules() if isinstance(m, HookPoint)}

    def crop_block_size(self, block_size):
        # model surgery to decrease the block size if necessary
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # start with all of the candidate parameters
        param_dict = {pn: p for pn, p in self.named_parameters()}
        # filter out those that do not require grad
        param_dict = {pn: p for pn, p in param_dict.items() if p.requires_grad}
        # create optim groups. Any parameters that is 2D will be weight decayed, otherwise no.
        # i.e. all weight tensors in matmuls + embeddings decay, all biases and layernorms don't.
        decay_params = [p for n, p in param_dict.items() if p.dim() >= 2]
        nodecay_params = [p for n, p in param_dict.items() if p.dim() < 2]
        optim_groups = [
            {'params': decay_params, 'weight_decay': weight_decay},
            {'params': nodecay_params, 'weight_decay': 0.0}
        ]
        # Create AdamW optimizer and use the fused version if it is available
        fused_available = 'fused' in inspect.signature(torch.optim.AdamW).parameters
        use_fused = fused_available and device_type == 'cuda'
        extra_args = dict(fused=True) if use_fused else dict()
        optimizer = torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra_args)
        return optimizer

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """
        Take a conditioning sequence of indices idx (LongTensor of shape (b,t)) and complete
        the sequence max_new_tokens times, feeding the predictions back into the model each time.
        """
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float('Inf')
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx
