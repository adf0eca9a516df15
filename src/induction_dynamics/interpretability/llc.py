"""The local learning coefficient (LLC) of a checkpoint, estimated by devinterp's SGLD chains.

    result = estimate_llc(model, windows, lr=..., localization=..., n_beta=..., num_burnin_steps=...)
    result.mean, result.std, result.stderr, result.per_chain, result.traces

Hoogland et al. 2024 ("The developmental landscape of in-context learning") follow a
model's development through the LLC, singular learning theory's measure of how many
effective parameters the loss landscape has near the weights w*: developmental stages end
where the LLC curve bends, one of them where induction heads form. The estimator (Lau et
al. 2023) samples weights w near w* by SGLD on the tempered, localised posterior
``exp(-n_beta L_n(w) - gamma/2 ||w - w*||^2)`` and reports

    LLC = n_beta * (E_w[L_n(w)] - L_n(w*))

with L_n the mean next-token cross-entropy over the n tokens ``windows`` predict. ``localization``
is gamma, ``n_beta`` the inverse temperature (default n / ln n: Lau et al.'s beta* = 1 / ln n, the
formula of devinterp's ``default_nbeta`` applied to the n terms of L_n), ``lr`` the SGLD step size. For a regular model with d parameters the
expectation is d/2 whatever n_beta, as long as gamma is small next to n_beta times the
loss's curvature (otherwise the estimate measures gamma); the tests check that.

Each chain takes ``num_burnin_steps + num_draws`` SGLD steps from w* on batches of
``batch_size`` windows. Every step's minibatch loss is kept (``traces``, in nats, the loss
at the weights *before* that step's update, so entry 0 is at w*); E_w is the mean over the
``num_draws`` steps after the burn-in only. devinterp's own ``compute_llc`` averages the
burn-in too, which biases the estimate towards L_n(w*). L_n(w*) is the loss on all
``windows``. Every chain has its own seed for both the SGLD noise and its batch order, so the
chains are independent draws of the estimate: ``std`` is their sample standard deviation
(ddof=1) and ``stderr = std / sqrt(chains)`` the standard error of ``mean``.

The chains sample an eval-mode copy of the model (``_EvalOnly``): devinterp's sampler calls
``model.train()``, which would switch dropout on for the SGLD losses while L_n(w*) is measured
without it, a positive LLC even at a vanishing step size. The caller's model, its mode and
the global random state are left as they were. A chain whose loss turns NaN/Inf stops
(devinterp warns) and counts as NaN; a warning (one line) also says when a finite chain has not
flattened (``still_moving``: the mean of the last quarter of its post-burn-in trace differs from
the previous quarter's by more than ``FLAT_Z`` times the noise of such means) or the estimate is negative: the settings
need more burn-in or a smaller step (devinterp's sgld_calibration notebook).

devinterp 2.x: its ``devinterp.slt.llc.llc`` runs these chains (``sampler.sample_single_chain``
with ``SGMCMC.sgld``) but then reads them back with ``xarray.open_datatree``, which needs
xarray >= 2024.10 and so pandas >= 2.1, which TransformerLens 2.x forbids on Python < 3.12. So
the chains are driven here and their losses collected in memory, with devinterp's own sampler
and SGLD. Needs the ``[llc]`` extra; imported on use.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import random
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from induction_dynamics.interpretability.metrics import per_token_losses

_MISSING = "the llc metric needs devinterp 2.x: pip install 'induction-dynamics[llc]'"
FLAT_Z = 4.0  # noise units between the last two quarters of a trace that count as "still moving"


@dataclass
class LLCResult:
    mean: float                  # mean over the finite chains
    std: float                   # sample standard deviation across chains (ddof=1; NaN with one chain)
    per_chain: list[float]
    init_loss: float             # L_n(w*) in nats
    n_beta: float
    stderr: float = math.nan     # std / sqrt(finite chains): the standard error of ``mean``
    num_burnin_steps: int = 0
    # per chain, the minibatch loss (nats) of every SGLD step, burn-in first: burn-in + draws entries
    traces: list[list[float]] = field(default_factory=list)


def default_n_beta(n: int) -> float:
    """n / ln n (devinterp's ``default_nbeta`` of a batch of n; Lau et al. 2023's beta* = 1 / ln n)."""
    return n / math.log(n)


class _EvalOnly(nn.Module):
    """A model that stays in eval mode (dropout off) whatever ``train()`` asks: the SGLD losses
    and L_n(w*) are then losses of the same function. Gradients still flow."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.train(False)

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, idx):
        return self.model(idx)


def _loss_fn(model, input_ids: torch.Tensor) -> torch.Tensor:
    """(batch, T-1) next-token losses; our forward returns (logits, loss), not bare logits."""
    return per_token_losses(model, input_ids, logits=model(input_ids)[0])


@contextlib.contextmanager
def _own_random_state():
    """devinterp seeds the global torch, numpy and random generators: give the caller's back."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def still_moving(trace: list[float], z: float = FLAT_Z) -> bool:
    """Whether a (post-burn-in) loss trace still drifts: the mean of its last quarter differs from
    the previous quarter's by more than ``z`` times the scatter of its eighths' means about a line
    through them (batch means: SGLD losses are autocorrelated, so the steps' own spread would
    understate the noise; the line keeps a steady drift from hiding in that scatter)."""
    if len(trace) < 32:  # too short a trace to tell drift from the batch-to-batch spread
        return False
    blocks = np.array([b.mean() for b in np.array_split(np.asarray(trace, dtype=float), 8)])
    i = np.arange(8)
    resid = blocks - np.polyval(np.polyfit(i, blocks, 1), i)
    scatter = math.sqrt((resid ** 2).sum() / 6)
    diff = abs(blocks[6:].mean() - blocks[4:6].mean())
    return diff > z * scatter if scatter > 0 else diff > 0


def estimate_llc(model, windows: torch.Tensor, *, lr: float = 1e-4, localization: float = 100.0,
                 n_beta: float | None = None, num_chains: int = 4, num_draws: int = 100,
                 num_burnin_steps: int = 100, batch_size: int = 16, seed: int = 0) -> LLCResult:
    """LLC at the model's weights from SGLD on the (N, T) token ``windows`` (see the module docstring).

    The defaults are the analysis suite's (``analysis.config.LLCConfig``, where their sources are).

    Batches are drawn by devinterp's loader, shuffled once per chain and replayed
    (``epoch_mode="cycle"``), whole batches only.
    """
    try:
        from devinterp.optim import SGMCMC
        from devinterp.slt.sampler import sample_single_chain
    except ImportError as e:
        raise ImportError(_MISSING) from e
    if windows.dim() != 2 or windows.shape[0] < batch_size:
        raise ValueError(f"need (N >= batch_size={batch_size}, T) token windows, got {tuple(windows.shape)}")
    if num_draws < 1 or num_burnin_steps < 0:
        raise ValueError(f"need num_draws >= 1 and num_burnin_steps >= 0, got {num_draws}, {num_burnin_steps}")
    n_beta = default_n_beta(windows.shape[0] * (windows.shape[1] - 1)) if n_beta is None else float(n_beta)
    device = str(next(model.parameters()).device)
    frozen = _EvalOnly(copy.deepcopy(model))  # the caller's model is never touched, nor its mode
    with torch.no_grad():
        init_loss = torch.cat([_loss_fn(frozen, w).flatten() for w in windows.to(device).split(batch_size)]).mean().item()
    dataset = [{"input_ids": row} for row in windows.cpu()]
    steps = num_burnin_steps + num_draws
    per_chain, traces, notes = [], [], []
    with _own_random_state(), torch.enable_grad():
        for chain in range(num_chains):
            losses: list[float] = []
            # devinterp draws a progress bar per chain: kept off the sweep's own bar
            with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                sample_single_chain(
                    frozen, dataset, lambda m, batch: (_loss_fn(m, batch["input_ids"]), {}),
                    {name: None for name, _ in frozen.named_parameters()}, num_draws=num_draws,
                    num_burnin_steps=num_burnin_steps, sampling_method=SGMCMC.sgld,
                    sampling_method_kwargs=dict(lr=lr, nbeta=n_beta, localization=localization),
                    chain=chain, seed=seed + chain, dataloader_seed=seed + chain, device=device, batch_size=batch_size,
                    micro_callback=lambda loss, **_: losses.append(loss.float().mean().item()))
            for w in caught:  # a failed chain's warning, re-issued where it can be seen
                if not issubclass(w.category, DeprecationWarning):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            traces.append(losses)
            draws = losses[num_burnin_steps:]
            ok = len(losses) == steps and all(math.isfinite(v) for v in losses)
            per_chain.append(n_beta * (sum(draws) / num_draws - init_loss) if ok else float("nan"))
            if ok and still_moving(draws):
                notes.append(f"chain {chain} has not flattened")
    finite = [v for v in per_chain if math.isfinite(v)]
    mean = float(np.mean(finite)) if finite else math.nan
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
    stderr = std / math.sqrt(len(finite)) if len(finite) > 1 else math.nan
    if mean < 0:
        notes.append(f"the estimate is negative ({mean:.3g}): w* is not a local minimum of the sampled loss")
    if notes:
        warnings.warn(f"LLC (lr={lr:g}, localization={localization:g}, n_beta={n_beta:.4g}, "
                      f"burn-in {num_burnin_steps}): {'; '.join(notes)}; more burn-in or a smaller lr", stacklevel=2)
    return LLCResult(mean, std, per_chain, init_loss, n_beta, stderr, num_burnin_steps, traces)
