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

    def forward(self, x):
        B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = self.hook_q(q.view(B, T, nh, hs))  # (B, T, nh, hs)
        k = self.hook_k(k.view(B, T, nh, hs))
        v = self.hook_v(v.view(B, T, nh, hs))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs)

        if self.hook_attn_scores.has_hooks() or self.hook_pattern.has_hooks():
            # explicit attention, only when someone wants to see (or edit) the pattern
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, T)
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = self.hook_attn_scores(att.masked_fill(~mask, float("-inf")))
            att = self.hook_pattern(F.softmax(att, dim=-1))
            att = self.attn_dropout(att)
            y = att @ v  # (B, nh, T, T) x (B, nh, T, hs) -> (B, nh, T, hs)
        else:
            # efficient attention using Flash Attention CUDA kernels / fused CPU kernels
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0, is_causal=True
            )
        y = self.hook_z(y.transpose(1, 2))  # (B, T, nh, hs): per-head outputs before c_proj
        y = y.contiguous().view(B, T, C)  # re-assemble all head outputs side by side
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

    def forward(self, x):
        x = self.hook_resid_pre(x)
        x = x + self.hook_attn_out(self.attn(self.ln_1(x)))
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

        # init all weights (nanoGPT's scheme; SCIENCE_NOTES: induction heads depend on it)
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

    def forward(self, idx, targets=None):
        """idx (B, T) token ids -> (logits (B, T, vocab), loss or None).

        Unlike nanoGPT, logits are returned for every position even without targets:
        interpretability code needs them. ``targets`` of -1 are ignored in the loss.
        """
        device = idx.device
        b, t = idx.size()
        assert t <= self.config.block_size, f"Cannot forward sequence of length {t}, block size is only {self.config.block_size}"
        pos = torch.arange(0, t, dtype=torch.long, device=device)  # shape (t)

        # forward the GPT model itself
        tok_emb = self.transformer.hook_embed(self.transformer.wte(idx))  # token embeddings of shape (b, t, n_embd)
        pos_emb = self.transformer.hook_pos_embed(self.transformer.wpe(pos))  # position embeddings of shape (t, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.hook_ln_final(self.transformer.ln_f(x))
        logits = self.lm_head(x)  # (b, t, vocab_size)

        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

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
