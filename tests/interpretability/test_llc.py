"""The local learning coefficient: the estimator against models whose LLC is known in closed form,
its bookkeeping (burn-in, spread, the caller's model), and the opt-in metric through analyze()
(rows, provenance, traces, plots)."""

import json
import math
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from analysis_helpers import cfg_for, make_run
from torch import nn

from induction_dynamics.analysis.driver import analyze
from induction_dynamics.interpretability.llc import default_n_beta, estimate_llc, still_moving
from induction_dynamics.model import GPT, GPTConfig

try:
    import devinterp  # noqa: F401
except ImportError:
    devinterp = None
needs_devinterp = pytest.mark.skipif(devinterp is None, reason="the [llc] extra (devinterp) is not installed")


class Bigram(nn.Module):
    """logits[t] = [W[token t], 0]: softmax regression on the previous token with the last logit
    pinned, so no two weights give the same model; forward like our GPT's."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.clone())  # (V, V-1)

    def forward(self, idx):
        logits = self.w[idx]
        return torch.cat([logits, torch.zeros_like(logits[..., :1])], -1), None


def markov_windows(V: int, N: int = 64, T: int = 33, seed: int = 0):
    """(N, T) tokens of a random Markov chain over V tokens, and the maximum-likelihood W for them."""
    g = torch.Generator().manual_seed(seed)
    P = torch.rand(V, V, generator=g) + 0.5
    P /= P.sum(1, keepdim=True)
    x = torch.empty(N, T, dtype=torch.long)
    x[:, 0] = torch.randint(V, (N,), generator=g)
    for t in range(1, T):
        x[:, t] = torch.multinomial(P[x[:, t - 1]], 1, generator=g)[:, 0]
    counts = torch.zeros(V, V).index_put_((x[:, :-1].reshape(-1), x[:, 1:].reshape(-1)), torch.ones(N * (T - 1)),
                                          accumulate=True)
    log_p = (counts / counts.sum(1, keepdim=True)).log()
    return x, log_p[:, :-1] - log_p[:, -1:]  # the MLE in the pinned-logit parameters


def n_over_log_n(x: torch.Tensor) -> float:
    """Lau et al.'s inverse temperature n_beta = n / ln n, n the number of predicted tokens."""
    n = x.shape[0] * (x.shape[1] - 1)
    return n / math.log(n)


@needs_devinterp
@pytest.mark.parametrize("V", [4, 6])
def test_llc_of_a_regular_model_is_half_its_dimension(V):
    """At the MLE of the pinned softmax regression the loss is locally quadratic with a positive
    definite Hessian in all d = V(V-1) directions: a regular model, LLC = d/2 (Watanabe), whatever
    n_beta. Full-batch SGLD without localisation, 300 steps of burn-in (the slowest direction
    relaxes in ~100 at this step size). Measured (4 chains, seeds 0-3): V=4 5.71, chain sd 0.62
    (true 6: -4.8 %); V=6 14.84, sd 1.61 (true 15: -1.0 %). The chain sd is ~11 %, so the mean of 4
    has a standard error of ~5.5 %: 15 % is ~2.7 standard errors, and the sd bound 20 % twice the
    measured spread."""
    x, w = markov_windows(V)
    model = Bigram(w)
    d = V * (V - 1)
    r = estimate_llc(model, x, lr=3e-3, localization=0.0, n_beta=n_over_log_n(x), num_chains=4, num_draws=1000,
                     num_burnin_steps=300, batch_size=len(x))
    assert r.mean == pytest.approx(d / 2, rel=0.15)
    assert r.std < 0.2 * r.mean and len(r.per_chain) == 4
    assert torch.equal(model.w.detach(), w)  # sampled on a copy: the weights are untouched


@needs_devinterp
def test_llc_ignores_n_beta_on_a_regular_model_and_localisation_biases_it_down():
    """The same regular model at a 4x smaller inverse temperature still gives d/2; a localisation
    strong next to n_beta times the curvature shrinks the sampled ball and with it the estimate
    (the failure of n_beta = 5.8 under gamma = 300 on a transformer). Measured: 5.61 at n_beta / 4
    (2 chains, true 6), 0.08 under gamma 300."""
    V = 4
    x, w = markov_windows(V)
    kw = dict(lr=3e-3, num_chains=2, num_draws=1000, num_burnin_steps=300, batch_size=len(x))
    cool = estimate_llc(Bigram(w), x, localization=0.0, n_beta=n_over_log_n(x) / 4, **kw)
    assert cool.mean == pytest.approx(6.0, rel=0.2)
    pinned = estimate_llc(Bigram(w), x, localization=300.0, n_beta=n_over_log_n(x) / 4, **kw)
    assert pinned.mean < 0.5 * cool.mean


def tiny_gpt(dropout: float) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=11, dropout=dropout,
                         bias=False, attn_only=False))


def successor_windows(N: int, T: int = 16, V: int = 11) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randint(V, (N, 1), generator=g) + torch.arange(T)) % V  # x[t+1] = x[t] + 1


def trained(model: GPT, x: torch.Tensor, steps: int = 60) -> GPT:
    """A few Adam steps: a model whose outputs are far from uniform, so dropout changes its loss."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        _, loss = model(x[:, :-1].contiguous(), x[:, 1:].contiguous())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@needs_devinterp
def test_llc_vanishes_at_a_vanishing_step_size_with_dropout():
    """At lr 1e-12 the chains do not move: the mean sampled loss is L(w*) to float rounding, so
    LLC / n_beta (nats) must be ~0. The bound 1e-5 nats is 10x float32's rounding of a ~1-nat mean
    over 16 x 15 tokens; sampling in train mode (dropout 0.2 on) put it at ~0.1 nats. The draws
    (8 = 2 passes over the 4 batches) see every window equally often, so minibatch noise cancels."""
    x = successor_windows(32)
    model = trained(tiny_gpt(dropout=0.2), x).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = estimate_llc(model, x, lr=1e-12, localization=0.0, n_beta=100.0, num_chains=2, num_draws=8,
                     num_burnin_steps=4, batch_size=8)
    assert abs(r.mean) / r.n_beta < 1e-5
    # the caller's model: its weights and its mode (train) as they were
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert r.init_loss == pytest.approx(model.eval()(x[:, :-1].contiguous(), x[:, 1:].contiguous())[1].item(), rel=1e-5)


@needs_devinterp
def test_burn_in_is_kept_in_the_traces_and_left_out_of_the_mean():
    x = successor_windows(32)
    model = trained(tiny_gpt(dropout=0.0), x)
    r = estimate_llc(model, x, lr=1e-3, localization=1.0, n_beta=50.0, num_chains=3, num_draws=12,
                     num_burnin_steps=5, batch_size=8)
    assert len(r.traces) == 3 and all(len(t) == 5 + 12 for t in r.traces)
    assert r.num_burnin_steps == 5
    for llc, t in zip(r.per_chain, r.traces):
        assert llc == pytest.approx(r.n_beta * (np.mean(t[5:]) - r.init_loss), rel=1e-9, abs=1e-9)
        assert llc != pytest.approx(r.n_beta * (np.mean(t) - r.init_loss), rel=1e-6)
    # the spread: the sample standard deviation across chains, and its standard error
    assert r.std == pytest.approx(np.std(r.per_chain, ddof=1))
    assert r.stderr == pytest.approx(r.std / math.sqrt(3))
    assert r.mean == pytest.approx(np.mean(r.per_chain))
    # each chain has its own noise and batch order: no two traces agree past w*
    assert len({round(t[3], 9) for t in r.traces}) == 3


def test_a_drifting_trace_is_flagged():
    rng = np.random.default_rng(0)
    flat = 1.0 + 0.01 * rng.standard_normal(400)
    assert not still_moving(flat.tolist())
    assert still_moving((flat + np.linspace(0, 0.2, 400)).tolist())
    assert not still_moving([1.0, 2.0, 3.0])  # too short to tell
    # a stationary but slowly mixing chain (full-batch SGLD: AR(1), correlation time ~50 steps)
    ar = np.zeros(1000)
    for t in range(1, 1000):
        ar[t] = 0.98 * ar[t - 1] + 0.01 * rng.standard_normal()
    assert not still_moving(ar.tolist())


@needs_devinterp
def test_a_negative_estimate_warns():
    """Started off the minimum the chain runs downhill: a negative LLC, and a warning that says so."""
    x = successor_windows(32)
    model = tiny_gpt(dropout=0.0)  # untrained: far from any minimum
    with pytest.warns(UserWarning, match="negative"):
        r = estimate_llc(model, x, lr=1e-2, localization=0.0, n_beta=200.0, num_chains=1, num_draws=20,
                         num_burnin_steps=0, batch_size=32)
    assert r.mean < 0 and math.isnan(r.std)


def test_without_devinterp_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "devinterp", None)
    monkeypatch.setitem(sys.modules, "devinterp.optim", None)
    x, w = markov_windows(3)
    with pytest.raises(ImportError, match=r"pip install 'induction-dynamics\[llc\]'") as err:
        estimate_llc(Bigram(w), x)
    assert "\n" not in str(err.value)


@needs_devinterp
def test_too_few_windows_for_a_batch():
    x, w = markov_windows(3)
    with pytest.raises(ValueError, match="batch_size=16"):
        estimate_llc(Bigram(w), x[:4], batch_size=16)


@needs_devinterp
def test_llc_metric_through_the_sweep(tmp_path):
    run_dir = make_run(tmp_path / "run", 0, steps=(0, 6, 12))
    overrides = ["wandb.mode=disabled", "plots.formats=[png]", "suite.metrics=[induction,llc]",
                 "suite.llc.num_draws=10", "suite.llc.num_burnin_steps=5", "suite.llc.num_chains=2",
                 "suite.llc.windows=32", "suite.llc.batch_size=8"]
    analyze(cfg_for(run_dir, *overrides))
    table = pd.read_parquet(run_dir / "analysis" / "results.parquet")
    llc = table[table.metric == "llc"].set_index("step")["value"]
    assert sorted(llc.index) == [0, 6, 12] and llc.notna().all()
    assert (table.loc[table.metric == "llc_std", "value"] >= 0).all()
    info = json.loads((run_dir / "analysis" / "run_info.json").read_text())["prompts"]["llc"]
    n_tokens = 32 * 31  # 32 windows of block_size 32: 31 predicted tokens each
    assert info == {"lr": 1e-4, "localization": 100.0, "n_beta": pytest.approx(default_n_beta(n_tokens)),
                    "num_chains": 2, "num_draws": 10, "num_burnin_steps": 5, "batch_size": 8, "seed": 1234,
                    "windows": 32}
    # every checkpoint's chain traces, burn-in included, saved per run and drawn
    saved = json.loads((run_dir / "analysis" / "llc_traces.json").read_text())["steps"]
    assert [s["step"] for s in saved] == [0, 6, 12]
    for s in saved:
        assert len(s["traces"]) == 2 and all(len(t) == 15 for t in s["traces"]) and s["num_burnin_steps"] == 5
        assert s["llc"] == pytest.approx(llc[s["step"]])
        assert s["llc"] == pytest.approx(np.mean([s["n_beta"] * (np.mean(t[5:]) - s["init_loss"])
                                                  for t in s["traces"]]))
    assert (run_dir / "plots" / "llc.png").stat().st_size > 10_000
    assert (run_dir / "plots" / "llc_traces.png").stat().st_size > 10_000
    # other SGLD settings are another analysis: the cache is not reused
    analyze(cfg_for(run_dir, *overrides, "suite.llc.lr=1e-3"))
    again = pd.read_parquet(run_dir / "analysis" / "results.parquet")
    assert not again[again.metric == "llc"].set_index("step")["value"].equals(llc)
    # the llc turned off: no traces left behind to be mistaken for this analysis's
    analyze(cfg_for(run_dir, *overrides[:2], "suite.metrics=[induction]"))
    assert not (run_dir / "analysis" / "llc_traces.json").exists()
