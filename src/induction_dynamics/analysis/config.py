"""Typed schema of ``conf/analyze.yaml`` (Hydra structured config): typos and wrong types fail early.

The values live in ``conf/analyze.yaml`` and ``conf/analysis/suite/*.yaml``; the defaults
here are the same (a test composes the YAML and compares), so the schema can be read alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from induction_dynamics.analysis.registry import DEFAULT_SUITE, SuiteMetric
from induction_dynamics.options import Precision, WandbMode


@dataclass
class LLCConfig:
    """SGLD settings of the local learning coefficient (interpretability.llc.estimate_llc), chosen
    as devinterp's authors choose them (its sgld_calibration and diagnostics notebooks: the step and
    localisation where the chains' loss traces rise, level off and stay flat, the estimate not
    measuring gamma) on a quickstart-size checkpoint (107 k parameters, 256 windows of 64 tokens):
    at lr 1e-4 a chain levels off ~0.3 nats above L(w*) within ~100 steps; gamma 1 still drifts
    after 300 steps, gamma 1000 gives a tenth of the estimate (it measures gamma)."""

    lr: float = 1.0e-4                # SGLD step size epsilon: 3e-6 has not levelled off in 300 steps
    localization: float = 100.0       # gamma: small next to n_beta x the loss's curvature (Lau et al. 2023)
    n_beta: Optional[float] = None    # null: n / ln n, n = tokens predicted in the windows (Lau et al. 2023)
    num_chains: int = 4               # devinterp's sample() default; independent seeds: sd / sqrt(4) = stderr
    num_draws: int = 100              # SGLD steps per chain averaged, after the burn-in
    num_burnin_steps: int = 100       # the traces level off within ~100 steps at this lr
    batch_size: int = 16              # windows per SGLD step
    windows: int = 256                # validation windows with the run's repeat curriculum


@dataclass
class SuiteConfig:
    metrics: list[SuiteMetric] = field(default_factory=lambda: [SuiteMetric(s) for s in DEFAULT_SUITE])
    batch_size: int = 8               # sequences per random-token prompt
    induction_seq_len: Optional[int] = None  # null: min(32, block_size // 2, allowed tokens)
    prefix_seq_len: Optional[int] = None     # null: min(25, block_size // 4, allowed tokens)
    text_windows: int = 2048          # fixed validation windows of real text (block_size tokens)
    chunk_windows: Optional[int] = None  # windows per forward; null: by the model's size (suite.chunk_size)
    precision: Precision = Precision.float32  # the text windows' forwards; bfloat16: autocast
    icl_positions: Optional[list[int]] = None  # [early, late]; null: metrics.icl_positions(block_size)
    patching_batch: int = 8
    patching_heads: Optional[int] = None  # heads per layer patched one by one; null: all up to 64 in the model, else 4
    llc: LLCConfig = field(default_factory=LLCConfig)  # used when "llc" is in metrics


@dataclass
class PhaseMetric:
    min_change: Optional[float] = None  # smallest amplitude that counts; null: the registry's
    skip_initial_frac: float = 0.0  # test only after this fraction of the step range (early transients)


@dataclass
class PhaseConfig:
    metrics: dict[str, PhaseMetric] = field(default_factory=lambda: {
        "induction_score_max": PhaseMetric(),
        "icl_score": PhaseMetric(None, 0.15),
        "icl_score_repeats": PhaseMetric(None, 0.15)})
    alpha: float = 0.02               # p-value threshold (false positives <= 5 %, walks 7 %: docs/phase_change.md)
    n_sim: int = 500                  # bootstrap curves per test (at most; fewer when p is large)
    loss_metric: str = "text_loss"    # the loss curve checked for a bump inside the window
    bump_snr: float = 2.0             # a bump counts above this many x the loss's own jitter
    control: Optional[str] = None     # the label of a run without induction heads (a one-layer model)
                                      # in the same sweep: its loss bump in each window is subtracted


@dataclass
class PlotsConfig:
    formats: list[str] = field(default_factory=lambda: ["png", "pdf"])
    dpi: int = 120
    attention_html: list[int] = field(default_factory=list)  # steps viewed with CircuitsVis (HTML)


@dataclass
class AnalyzeWandbConfig:
    mode: WandbMode = WandbMode.offline
    project: Optional[str] = None     # null: the training run's project (checkpoint config)
    group: Optional[str] = None       # null: the training run's group


@dataclass
class AnalyzeConfig:
    run_dir: str = "???"
    data_dir: Optional[str] = None    # a nanoGPT data folder, for checkpoints that do not name their data
    plots_only: bool = False
    watch: bool = False
    watch_poll_s: float = 15.0
    watch_timeout_s: float = 7200.0
    n_jobs: int = 1
    threads: Optional[int] = None     # torch threads per process; null: torch's default (n_jobs=1)
    device: str = "cpu"
    force: bool = False
    seed: int = 1234
    csv: bool = True
    suite: SuiteConfig = field(default_factory=SuiteConfig)
    phase: PhaseConfig = field(default_factory=PhaseConfig)
    plots: PlotsConfig = field(default_factory=PlotsConfig)
    wandb: AnalyzeWandbConfig = field(default_factory=AnalyzeWandbConfig)


def register() -> None:
    # ${default_suite:llc} in a suite's YAML: the registry's default suite ids, then the ones named
    OmegaConf.register_new_resolver("default_suite", lambda *extra: [*DEFAULT_SUITE, *extra], replace=True)
    cs = ConfigStore.instance()
    cs.store(name="analyze_schema", node=AnalyzeConfig)
    cs.store(group="analysis/suite", name="suite_schema", node=SuiteConfig, package="suite")


register()
