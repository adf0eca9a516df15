"""The local learning coefficient (LLC) of a checkpoint, estimated by devinterp's SGLD chains.

    result = estimate_llc(model, windows, lr=3e-4, localization=300.0, n_beta=None)
    result.mean, result.std, result.per_chain

Hoogland et al. 2024 ("The developmental landscape of in-context learning") follow a
model's development through the LLC, singular learning theory's measure of how many
effective parameters the loss landscape has near the weights w*: developmental stages end
where the LLC curve bends, one of them where induction heads form. The estimator (Lau et
al. 2023) samples weights w near w* by SGLD on the tempered, localised posterior
``exp(-n_beta L_n(w) - gamma/2 ||w - w*||^2)`` and reports

    LLC = n_beta * (E_w[L_n(w)] - L_n(w*))

with L_n the mean next-token cross-entropy on ``windows``. ``localization`` is gamma,
``n_beta`` the inverse temperature (default ``batch_size / ln(batch_size)``, devinterp's
``default_nbeta``), ``lr`` the SGLD step size. As in devinterp's ``compute_llc``, E_w is the
mean of the minibatch losses of every SGLD step of a chain; here L_n(w*) is the loss on all
``windows``. Every chain starts at w* with its own noise seed and sees the same batches, so
the spread across chains is the noise of the estimate itself. A chain whose loss turns
NaN/Inf stops (devinterp warns) and counts as NaN; the model itself is never modified
(devinterp samples on a copy).

devinterp 2.x: its ``devinterp.slt.llc.llc`` runs exactly these chains
(``sampler.sample_single_chain`` with ``SGMCMC.sgld``) but then reads them back with
``xarray.open_datatree``, which needs xarray >= 2024.10 and so pandas >= 2.1, which
TransformerLens 2.x forbids on Python < 3.12. So the chains are driven here and their
losses collected in memory, with devinterp's own sampler and SGLD. Needs the ``[llc]``
extra; imported on use.
"""
from __future__ import annotations

import contextlib
import io
import math
import warnings
from dataclasses import dataclass

import torch

from induction_dynamics.interpretability.metrics import per_token_losses

_MISSING = "the llc metric needs devinterp 2.x: pip install 'induction-dynamics[llc]'"


@dataclass
class LLCResult:
    mean: float                  # mean over chains
    std: float                   # standard deviation across chains (the chain-to-chain spread)
    per_chain: list[float]
    init_loss: float             # L_n(w*) in nats
    n_beta: float


def default_n_beta(batch_size: int) -> float:
    """devinterp's ``default_nbeta``: batch_size / ln(batch_size)."""
    return batch_size / math.log(batch_size)


def _loss_fn(model, input_ids: torch.Tensor) -> torch.Tensor:
    """(batch, T-1) next-token losses; our forward returns (logits, loss), not bare logits."""
    return per_token_losses(model, input_ids, logits=model(input_ids)[0])


def estimate_llc(model, windows: torch.Tensor, *, lr: float = 3e-4, localization: float = 300.0,
                 n_beta: float | None = None, num_chains: int = 4, num_draws: int = 100,
                 num_burnin_steps: int = 0, batch_size: int = 16, seed: int = 0) -> LLCResult:
    """LLC at the model's weights from SGLD on the (N, T) token ``windows`` (see the module docstring).

    Each chain takes ``num_burnin_steps + num_draws`` SGLD steps on shuffled batches of
    ``batch_size`` windows (cycling through them); all steps enter the average, as in
    devinterp's ``compute_llc``.
    """
    try:
        from devinterp.optim import SGMCMC
        from devinterp.slt.sampler import sample_single_chain
    except ImportError as e:
        raise ImportError(_MISSING) from e
    if windows.dim() != 2 or windows.shape[0] < batch_size:
        raise ValueError(f"need (N >= batch_size={batch_size}, T) token windows, got {tuple(windows.shape)}")
    n_beta = default_n_beta(batch_size) if n_beta is None else float(n_beta)
    device = str(next(model.parameters()).device)
    was_training = model.training
    model.eval()  # w* as analysed (no dropout)
    with torch.no_grad():
        init_loss = _loss_fn(model, windows.to(device)).mean().item()
    dataset = [{"input_ids": row} for row in windows.cpu()]
    steps = num_burnin_steps + num_draws
    per_chain = []
    try:
        for chain in range(num_chains):
            losses: list[float] = []
            # devinterp draws a progress bar per chain: kept off the sweep's own bar
            with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                sample_single_chain(
                    model, dataset, lambda m, batch: (_loss_fn(m, batch["input_ids"]), {}),
                    {name: None for name, _ in model.named_parameters()}, num_draws=num_draws,
                    num_burnin_steps=num_burnin_steps, sampling_method=SGMCMC.sgld,
                    sampling_method_kwargs=dict(lr=lr, nbeta=n_beta, localization=localization),
                    chain=chain, seed=seed + chain, dataloader_seed=seed + chain, device=device, batch_size=batch_size,
                    micro_callback=lambda loss, **_: losses.append(loss.float().mean().item()))
            for w in caught:  # a failed chain's warning, re-issued where it can be seen
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            ok = len(losses) == steps and all(math.isfinite(v) for v in losses)
            per_chain.append(n_beta * (sum(losses) / steps - init_loss) if ok else float("nan"))
    finally:
        model.train(was_training)
    finite = [v for v in per_chain if math.isfinite(v)]
    mean = sum(finite) / len(finite) if finite else float("nan")
    std = (sum((v - mean) ** 2 for v in finite) / len(finite)) ** 0.5 if finite else float("nan")
    return LLCResult(mean, std, per_chain, init_loss, n_beta)
