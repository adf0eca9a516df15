"""The phase change, reproduced: ``train.py experiment=quickstart`` on Shakespeare.

Trains the README's quickstart (seed 0) and its one-layer control for real, through
``train.py``, side by side on one thread each, then reads every history checkpoint back
and measures it with the toolkit's metric functions (never the training logs):

- the max induction score on ``[x, x]`` (x: distinct random tokens) goes from < 0.05 to
  > 0.3 inside the run (the window: last checkpoint < 0.05 -> first checkpoint > 0.3);
- the loss on the second copy of ``[x, x]`` is not below the first copy's before the
  window, and far below it at the end;
- the in-context-learning score (Olsson et al.: loss late in the context minus loss early,
  on real Shakespeare validation text) falls across the window by more than the one-layer
  control's over the same checkpoints. This holds for seed 0 (the seed tested) by a few
  hundredths of a nat; seeds 1 and 2 do not show it (docs/phase_change.md: the head fires on
  random characters, not on text, and at 64 characters even a perfect copier could lower the
  late loss by at most ~0.045 nats). So this assertion is a regression check on seed 0's
  deterministic run, not evidence that the ICL score shows the phase change on plain text;
- the ICL score on the *training distribution* (validation text with the quickstart's repeat
  curriculum, where Olsson et al. measure it) falls across the window by >= 0.05 nats more
  than the control's (measured: 0.14-0.16 in seeds 0-2);
- the one-layer control never reaches an induction score of 0.1 (no phase change).

Slow: 6 min 49 s alone on a 2-core machine, 6 minutes under load (docs/phase_change.md has the figures).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from induction_dynamics.checkpoint import load_checkpoint, model_from_checkpoint
from induction_dynamics.data import BatchSampler, curriculum_args, load_data
from induction_dynamics.interpretability import metrics as M
from induction_dynamics.run_dir import list_checkpoints

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PROMPT_BATCH = 64  # [x, x] sequences per induction measurement
TEXT_WINDOWS = 1024  # validation windows for the ICL score: its change is a few hundredths of a nat
ICL_CHECKPOINTS = 5  # ICL before/after the window: mean over this many checkpoints (less jitter)
ICL_MARGIN = 0.02  # nats by which the ICL change must beat the control's (seed 0 measured: 0.05)
ICL_REPEATS_MARGIN = 0.05  # the same on the training distribution (seed 0 measured: 0.138)


def _start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}",
                             "wandb.mode=disabled", "train.progress=false"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@torch.no_grad()
def curve(run_dir: Path) -> list[dict]:
    """Toolkit metrics of every history checkpoint of ``run_dir``, in step order."""
    ckpts = list_checkpoints(run_dir)
    first = load_checkpoint(ckpts[0][1])
    cfg, T = first["config"], first["model_args"]["block_size"]
    d = cfg["data"]
    data = load_data(d["name"], path=d["path"], cache_dir=d["cache_dir"], val_frac=d["val_frac"])
    allowed = M.repeat_token_ids(data.vocab_size, data.counts)
    g = torch.Generator().manual_seed(2024)  # the same prompts for every checkpoint
    L = min(32, T // 2, len(allowed))
    prompts = M.repeated_random_tokens(allowed, L, PROMPT_BATCH, generator=g)  # (B, 2L)
    starts = torch.randint(0, len(data.val) - T, (TEXT_WINDOWS,), generator=g)
    text = torch.stack([data.val[s:s + T] for s in starts.tolist()])  # (W, T) real text
    # the training distribution: the same validation split with the run's repeat curriculum,
    # one batch of the trainer's own sampler (as the analysis suite's icl_score_repeats)
    text_repeats = BatchSampler(data.val, TEXT_WINDOWS, T, 2025, **curriculum_args(d), allowed_ids=allowed,
                                token_weights=data.counts).sample()[0]  # (W, T)
    early, late = M.icl_positions(T)
    rows = []
    for step, path in ckpts:
        model = model_from_checkpoint(load_checkpoint(path))
        first_copy, second_copy = M.repeated_sequence_loss(model, prompts, L)
        rows.append(dict(step=step, induction=M.induction_scores(model, prompts, L).max().item(),
                         first=first_copy, second=second_copy, icl=M.icl_score(model, text, early, late),
                         icl_repeats=M.icl_score(model, text_repeats, early, late)))
    return rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("phase_change")
    dirs = {"quickstart": base / "quickstart", "control": base / "control"}
    procs = {"quickstart": _start(dirs["quickstart"], "experiment=quickstart", "seed=0"),
             "control": _start(dirs["control"], "experiment=quickstart_1layer", "seed=0")}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=3600)
        assert proc.returncode == 0, f"{name} run failed:\n{out[-3000:]}"
    return {name: curve(d) for name, d in dirs.items()}


def window(rows: list[dict]) -> tuple[int, int]:
    """Indices (last checkpoint with induction < 0.05 before the first > 0.3, that first one)."""
    hi = next((i for i, r in enumerate(rows) if r["induction"] > 0.3), None)
    assert hi is not None, f"max induction score never exceeded 0.3: {[round(r['induction'], 3) for r in rows]}"
    lo = max((i for i in range(hi) if rows[i]["induction"] < 0.05), default=None)
    assert lo is not None, "the induction score was never below 0.05 before it exceeded 0.3"
    return lo, hi


def test_induction_score_jumps_inside_the_run(runs):
    rows = runs["quickstart"]
    lo, hi = window(rows)
    assert rows[0]["induction"] < 0.05
    assert rows[lo]["step"] > 0, "the window must start after training has begun"
    assert rows[-1]["induction"] > 0.3


def test_second_copy_loss_drops_far_below_the_first(runs):
    rows = runs["quickstart"]
    lo, _ = window(rows)
    before, end = rows[lo], rows[-1]
    assert before["second"] > 0.9 * before["first"], f"second copy already predicted before the window: {before}"
    assert end["second"] < 0.5 * end["first"], f"second copy not predicted at the end: {end}"


def _icl_change(rows: list[dict], steps_before: list[int], steps_after: list[int], key: str = "icl") -> float:
    """Mean ICL score over the checkpoints at ``steps_after`` minus over ``steps_before``."""
    by_step = {r["step"]: r[key] for r in rows}
    mean = lambda steps: sum(by_step[s] for s in steps) / len(steps)  # noqa: E731
    return mean(steps_after) - mean(steps_before)


def test_icl_score_improves_across_the_window_more_than_in_the_control(runs):
    rows = runs["quickstart"]
    lo, hi = window(rows)
    k = ICL_CHECKPOINTS
    before = [r["step"] for r in rows[max(1, lo - k + 1): lo + 1]]  # skip step 0 (an untrained model)
    after = [r["step"] for r in rows[hi: hi + k]]
    change = _icl_change(rows, before, after)
    control = _icl_change(runs["control"], before, after)  # same steps, no induction head
    # The one-layer control's ICL score drifts too (it keeps learning n-grams), so the
    # quickstart's change only counts where it beats the control's over the same checkpoints.
    assert change < control - ICL_MARGIN, \
        f"ICL change {change:+.3f} vs the control's {control:+.3f} (steps {before} -> {after})"


def test_icl_score_on_the_training_distribution_drops_in_the_window(runs):
    """Olsson et al.'s ICL score is measured on held-out data like the training data: here the
    validation text with the quickstart's repeat curriculum. Measured for seeds 0, 1, 2 with
    4,096 windows (docs/phase_change.md): -0.138, -0.139, -0.164 nats beyond the control."""
    rows = runs["quickstart"]
    lo, hi = window(rows)
    k = ICL_CHECKPOINTS
    before = [r["step"] for r in rows[max(1, lo - k + 1): lo + 1]]
    after = [r["step"] for r in rows[hi: hi + k]]
    change = _icl_change(rows, before, after, "icl_repeats")
    control = _icl_change(runs["control"], before, after, "icl_repeats")
    assert change < control - ICL_REPEATS_MARGIN, \
        f"ICL change on the training distribution {change:+.3f} vs the control's {control:+.3f}"


def test_one_layer_control_has_no_induction_head(runs):
    control = runs["control"]
    assert control[-1]["step"] == runs["quickstart"][-1]["step"]  # same length as the quickstart
    worst = max(r["induction"] for r in control)
    assert worst < 0.1, f"one-layer control reached an induction score of {worst:.3f}"
