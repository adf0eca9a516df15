"""Standard errors on every score that is a mean over samples, and text windows streamed in chunks:
the same rows as one pass, memory flat in the number of windows, error bars that are what they say."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from induction_dynamics.analysis.config import SuiteConfig
from induction_dynamics.analysis.estimate import Moments, of_samples, ratio
from induction_dynamics.analysis.prompts import make_prompts
from induction_dynamics.analysis.suite import chunk_size, run_suite
from induction_dynamics.data import load_data
from induction_dynamics.model import GPT, GPTConfig

DATA = load_data("synthetic", synthetic_vocab_size=26, synthetic_tokens=60_000, seed=0)
T = 32
TEXT = ["previous_token", "icl", "icl_repeats", "token_loss"]
SAMPLED = TEXT + ["induction", "prefix_matching", "duplicate_token", "copying", "induction_loss", "logit_lens",
                  "patching", "attribution_patching"]


def model(seed=0, n_layer=2):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=n_layer, n_head=2, n_embd=32, block_size=T, vocab_size=26, dropout=0.0)).eval()


def prompts(windows=40, seed=5, **suite):
    return make_prompts(SuiteConfig(text_windows=windows, **suite), vocab_size=26, block_size=T,
                        token_counts=DATA.counts, val_tokens=DATA.val, seed=seed,
                        data_config={"repeat_frac": 0.5, "repeat_kind": "random", "repeat_min": 4, "repeat_max": 8})


def by_cell(rows):
    return {(m, layer, head): (v, e) for m, layer, head, v, e in rows}


def test_moments_merge_chunks_into_the_one_pass_mean_and_standard_error():
    x = torch.randn(103, 3, 4, dtype=torch.float64) * 2 + 1
    whole = of_samples(x)
    parts = Moments()
    for chunk in x.split(10):
        parts.add(chunk)
    merged = Moments().add(x[:50]).merge(Moments().add(x[50:]))
    ref = x.numpy()
    for est in (parts.estimate(), merged.estimate(), whole):
        np.testing.assert_allclose(est.value.numpy(), ref.mean(0), atol=1e-12)
        np.testing.assert_allclose(est.stderr.numpy(), ref.std(0, ddof=1) / math.sqrt(103), atol=1e-12)
    assert math.isnan(float(of_samples(torch.ones(1)).stderr))  # one unit: no standard error


def test_ratio_standard_error_matches_the_spread_over_replicates():
    # numerator and denominator correlated, as a patched and an unpatched logit difference are
    g = torch.Generator().manual_seed(0)
    n, reps = 16, 4000
    den = 1.0 + 0.5 * torch.randn(reps, n, generator=g, dtype=torch.float64)
    num = 0.6 * den + 0.3 * torch.randn(reps, n, generator=g, dtype=torch.float64)
    ests = [ratio(num[r], den[r]) for r in range(reps)]
    values = torch.stack([e.value for e in ests])
    stderrs = torch.stack([e.stderr for e in ests])
    assert values.mean().item() == pytest.approx(0.6, abs=0.01)
    assert stderrs.median().item() == pytest.approx(values.std().item(), rel=0.15)


def test_streamed_windows_give_the_rows_of_one_pass():
    m, p = model(), prompts(windows=40)
    one, tokens_one = run_suite(m, p, TEXT, chunk=40)
    streamed, tokens_streamed = run_suite(m, p, TEXT, chunk=7)  # 6 chunks, the last one short
    a, b = by_cell(one), by_cell(streamed)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key][0] == pytest.approx(b[key][0], abs=1e-6), key
        assert a[key][1] == pytest.approx(b[key][1], abs=1e-6), key
    np.testing.assert_allclose(tokens_one, tokens_streamed, atol=1e-6)
    assert chunk_size(None, 512, 256, 50304, 12) == 1  # GPT-2 small's logits: 1 window a chunk
    assert chunk_size(None, 512, 256, 1024, 6) == chunk_size(None, 64, 256, 1024, 6) == 42  # the baby model's patterns
    assert chunk_size(None, 512, 64, 1024, 4) == 256  # the quickstart model's logits
    assert chunk_size(None, 16, 64, 1024, 4) == 16  # fewer windows than that: one chunk
    assert chunk_size(5, 512, 64, 1024, 4) == 5


def test_every_score_that_is_a_mean_over_samples_has_a_standard_error():
    rows, _ = run_suite(model(), prompts(), SAMPLED + ["ov_copying", "composition"])
    cells = by_cell(rows)
    weights = {"ov_copying_score", "q_composition", "k_composition", "v_composition", "composition_baseline",
               "logit_lens_convergence_layer"}
    for (metric, _, _), (value, stderr) in cells.items():
        family = metric.split("/")[0]
        if family in weights:
            assert math.isnan(stderr), metric  # of the weights (or a layer index): no sampling error
        elif family.startswith(("patch_", "attribution_")) and math.isnan(value):
            assert math.isnan(stderr), metric  # undefined effects (a random model's gap is noise)
        else:
            assert stderr >= 0 and math.isfinite(stderr), metric
    assert cells["icl_score", -1, -1][1] > 0


def test_standard_error_shrinks_as_the_square_root_of_the_windows():
    m = model()
    small = by_cell(run_suite(m, prompts(windows=64), ["icl", "token_loss"])[0])
    large = by_cell(run_suite(m, prompts(windows=1024), ["icl", "token_loss"])[0])
    for key in (("icl_score", -1, -1), ("text_loss", -1, -1)):
        assert small[key][1] / large[key][1] == pytest.approx(4.0, rel=0.25), key


def test_standard_errors_match_the_spread_across_independent_prompt_sets():
    """What a reviewer checks: draw the prompts again (another analysis seed) and see the score
    move by about its stated standard error."""
    m = model()
    runs = [by_cell(run_suite(m, prompts(windows=48, seed=s, batch_size=8), ["icl", "induction", "induction_loss"])[0])
            for s in range(40)]
    for key in (("icl_score", -1, -1), ("induction_score", 1, 0), ("induction_loss_second", -1, -1)):
        values = np.array([r[key][0] for r in runs])
        stderrs = np.array([r[key][1] for r in runs])
        assert values.std(ddof=1) / np.sqrt(np.mean(stderrs ** 2)) == pytest.approx(1.0, abs=0.35), key


PEAK = """
import resource, sys, torch
from induction_dynamics.analysis.config import SuiteConfig
from induction_dynamics.analysis.prompts import make_prompts
from induction_dynamics.analysis.suite import run_suite
from induction_dynamics.data import load_data
from induction_dynamics.model import GPT, GPTConfig
torch.set_num_threads(1)
torch.manual_seed(0)
T = 128
model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=T, vocab_size=26, dropout=0.0)).eval()
data = load_data("synthetic", synthetic_vocab_size=26, synthetic_tokens=200_000, seed=0)
p = make_prompts(SuiteConfig(text_windows=int(sys.argv[1])), vocab_size=26, block_size=T,
                 token_counts=data.counts, val_tokens=data.val, seed=0)
run_suite(model, p, ["previous_token", "icl", "icl_repeats", "token_loss"], chunk=16)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_peak_memory_is_flat_in_the_number_of_windows():
    # one pass over 512 windows would hold 512 x 2 x 4 x 128 x 128 floats of attention patterns
    # (268 MB) and their logits; streamed, only a chunk's
    peak = {}
    for windows in (64, 512):
        out = subprocess.run([sys.executable, "-c", PEAK, str(windows)], capture_output=True, text=True,
                             timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": ""})
        assert out.returncode == 0, out.stderr[-2000:]
        peak[windows] = int(out.stdout.split()[-1])  # MiB
    assert peak[512] - peak[64] < 40, peak


def test_bfloat16_text_forwards_move_the_text_scores_by_less_than_their_standard_errors():
    """The mixed-precision setting a GPU run may use (``suite.precision=bfloat16``), on a trained
    checkpoint: the text scores it changes move by less than their own noise."""
    from induction_dynamics.analysis import analyze_checkpoint

    ckpt = Path(__file__).resolve().parents[1] / "fixtures" / "pre_rename_run" / "checkpoints" / "step_000300.pt"
    kw = ["suite.metrics=[previous_token,icl,icl_repeats,token_loss]", "suite.text_windows=64"]
    full = analyze_checkpoint(ckpt, overrides=kw).set_index(["metric", "layer", "head"])
    half = analyze_checkpoint(ckpt, overrides=[*kw, "suite.precision=bfloat16"]).set_index(["metric", "layer", "head"])
    rows = full.drop(index="val_loss", level="metric")
    moved = (half.loc[rows.index, "value"] - rows["value"]).abs()
    assert (moved > 0).any()  # bfloat16 did run
    assert (moved < rows["stderr"]).all(), (moved / rows["stderr"]).max()


def assert_same_cells(cpu: dict, gpu: dict) -> None:
    """The same cells, and the same values to float tolerance (NaN where the CPU has NaN)."""
    assert cpu.keys() == gpu.keys()
    for key, (value, _) in cpu.items():
        assert gpu[key][0] == pytest.approx(value, rel=1e-3, abs=1e-4, nan_ok=True), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_suite_on_a_gpu_gives_the_cpu_rows_and_bfloat16_stays_within_the_noise():
    """device=cuda: the same rows as the CPU to float tolerance; bfloat16 autocast of the text
    windows moves each text score by less than twice its standard error."""
    metrics = SAMPLED + ["ov_copying"]
    p = prompts(windows=256)
    cpu = by_cell(run_suite(model(), p, metrics)[0])
    gpu_model, gpu_prompts = model().cuda(), p.to("cuda")
    assert_same_cells(cpu, by_cell(run_suite(gpu_model, gpu_prompts, metrics)[0]))
    half = by_cell(run_suite(gpu_model, gpu_prompts, TEXT, precision="bfloat16")[0])
    for key, (value, stderr) in half.items():
        if key in cpu and math.isfinite(cpu[key][1]) and cpu[key][1] > 0:
            assert abs(value - cpu[key][0]) < 2 * cpu[key][1] + 1e-3, key
    some = make_prompts(SuiteConfig(text_windows=16, patching_heads=1), vocab_size=26, block_size=T,
                        token_counts=DATA.counts, val_tokens=DATA.val, seed=5, n_layer=2, n_head=2)
    cpu_some = by_cell(run_suite(model(), some, ["patching"])[0])
    assert_same_cells(cpu_some, by_cell(run_suite(gpu_model, some.to("cuda"), ["patching"])[0]))  # some heads
