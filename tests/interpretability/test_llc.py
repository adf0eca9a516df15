"""The local learning coefficient: the estimator against a model whose LLC is known, and the
opt-in metric through analyze() (rows, provenance, plot)."""

import json
import sys

import pandas as pd
import pytest
import torch
from analysis_helpers import cfg_for, make_run
from torch import nn

from induction_dynamics.analysis.driver import analyze
from induction_dynamics.interpretability.llc import default_n_beta, estimate_llc

try:
    import devinterp  # noqa: F401
except ImportError:
    devinterp = None
needs_devinterp = pytest.mark.skipif(devinterp is None, reason="the [llc] extra (devinterp) is not installed")


class Bigram(nn.Module):
    """logits[t] = W[token t]: softmax regression on the previous token, forward like our GPT's."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, idx):
        return self.w[idx], None


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
    return x, (counts / counts.sum(1, keepdim=True)).log()


@needs_devinterp
def test_llc_of_a_regular_model_is_half_its_dimension():
    """At the MLE of a softmax regression the loss is locally quadratic in V(V-1) directions
    (adding a constant to a row of W changes nothing): a regular model, LLC = V(V-1)/2.
    Full-batch SGLD at a large n_beta with weak localisation samples that Gaussian."""
    V = 4
    x, w = markov_windows(V)
    model = Bigram(w)
    r = estimate_llc(model, x, lr=1e-3, localization=1.0, n_beta=2000.0, num_chains=2, num_draws=1000,
                     batch_size=len(x))
    assert r.mean == pytest.approx(V * (V - 1) / 2, rel=0.1)
    assert r.std < 0.1 * r.mean and len(r.per_chain) == 2
    assert torch.equal(model.w.detach(), w)  # sampled on a copy: the weights are untouched
    # a model twice the size (V=6: 30 directions) has about 2.5x the LLC
    x6, w6 = markov_windows(6)
    r6 = estimate_llc(Bigram(w6), x6, lr=1e-3, localization=1.0, n_beta=2000.0, num_chains=1, num_draws=1000,
                      batch_size=len(x6))
    assert r6.mean == pytest.approx(15.0, rel=0.1)


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
                 "suite.llc.num_draws=10", "suite.llc.num_chains=2", "suite.llc.windows=32", "suite.llc.batch_size=8"]
    analyze(cfg_for(run_dir, *overrides))
    table = pd.read_parquet(run_dir / "analysis" / "results.parquet")
    llc = table[table.metric == "llc"].set_index("step")["value"]
    assert sorted(llc.index) == [0, 6, 12] and llc.notna().all()
    assert (table.loc[table.metric == "llc_std", "value"] >= 0).all()
    info = json.loads((run_dir / "analysis" / "run_info.json").read_text())["prompts"]["llc"]
    assert info == {"lr": 3e-4, "localization": 300.0, "n_beta": pytest.approx(default_n_beta(8)), "num_chains": 2,
                    "num_draws": 10, "num_burnin_steps": 0, "batch_size": 8, "seed": 1234, "windows": 32}
    assert (run_dir / "plots" / "llc.png").stat().st_size > 10_000
    # other SGLD settings are another analysis: the cache is not reused
    analyze(cfg_for(run_dir, *overrides, "suite.llc.lr=1e-3"))
    again = pd.read_parquet(run_dir / "analysis" / "results.parquet")
    assert not again[again.metric == "llc"].set_index("step")["value"].equals(llc)
