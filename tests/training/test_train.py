"""The trainer end to end: run directory, W&B records, determinism, exact resume after kill -9."""

import logging
import math

import pytest
import torch
from train_helpers import (
    TINY,
    cli_env,
    compose_cfg,
    run_train,
    train_then_kill,
    wandb_records,
)

from induction_dynamics.checkpoint import history_steps, load_checkpoint
from induction_dynamics.errors import TrainingError
from induction_dynamics.model import GPT, GPTConfig
from induction_dynamics.run_dir import history_path, list_checkpoints, resume_path
from induction_dynamics.training.loop import get_lr, train
from induction_dynamics.training.monitor import InductionMonitor


def weights(path):
    return load_checkpoint(path)["model"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ python train.py

@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


def test_train_py_writes_run_dir_and_wandb_records(tmp_path, data_cache):
    """`python train.py` (default data: Shakespeare) with a tiny override; W&B offline, read back."""
    run_dir = tmp_path / "run"
    args = ["model.n_layer=1", "model.n_embd=32", "model.block_size=32", "train.batch_size=8",
            "train.max_iters=20", "train.eval_every=10", "train.eval_iters=2", "train.log_every=5",
            "checkpoint.every=10", "monitor.every=5", "monitor.seq_len=8", "monitor.batch_size=4", "seed=7",
            f"hydra.run.dir={run_dir}"]
    p = run_train(args, env=cli_env(INDUCTION_DYNAMICS_CACHE=str(data_cache)))
    assert p.returncode == 0, p.stderr[-3000:]

    # resolved config, with the W&B names actually used
    from omegaconf import OmegaConf
    saved = OmegaConf.load(run_dir / "config.yaml")
    expected = compose_cfg(args[:-1])
    assert saved.model == expected.model and saved.train == expected.train and saved.seed == 7
    assert (saved.wandb.group, saved.wandb.name) == ("train-shakespeare", "train-shakespeare-seed7")

    # checkpoints at exactly the scheduled steps
    steps = history_steps(20, 10, "log")
    assert [s for s, _ in list_checkpoints(run_dir)] == steps == [0, 1, 2, 4, 8, 10, 20]
    assert load_checkpoint(history_path(run_dir, 20))["config"]["wandb"]["name"] == "train-shakespeare-seed7"

    # W&B offline run inside the run dir, read back with `wandb leet inspect --json`
    records, history = wandb_records(run_dir)
    run = next(r["run"] for r in records if r["type"] == "run")
    assert (run["run_group"], run["display_name"], run["job_type"]) == ("train-shakespeare",
                                                                        "train-shakespeare-seed7", "train")
    assert run["config"]["update"]["model"]["n_layer"] == 1
    assert any(r["metric"].get("step_metric") == "iter" for r in records if r["type"] == "metric")
    assert all("iter" in h for h in history)

    def iters(key):
        return [h["iter"] for h in history if key in h]

    assert iters("train/loss") == [5, 10, 15, 20]
    assert iters("train/lr") == [5, 10, 15, 20] and iters("train/tokens_per_sec") == [5, 10, 15, 20]
    assert iters("val/loss") == [0, 10, 20] and iters("train/eval_loss") == [0, 10, 20]
    for key in ["monitor/induction_score_max", "monitor/loss_first_copy", "monitor/loss_second_copy"] + \
               [f"monitor/induction_score/L0H{h}" for h in range(4)]:
        assert iters(key) == [0, 5, 10, 15, 20], key
    first = next(h for h in history if "val/loss" in h)["val/loss"]
    assert abs(first - math.log(len(load_checkpoint(history_path(run_dir, 0))["vocab"]))) < 0.1  # untrained
    assert "Traceback" not in p.stderr and "W&B:" not in p.stderr  # no W&B warning either


# ------------------------------------------------------------------ determinism

def test_same_seed_same_weights_bitwise(tmp_path):
    a = train(compose_cfg(TINY), run_dir=tmp_path / "a")
    b = train(compose_cfg(TINY), run_dir=tmp_path / "b")
    c = train(compose_cfg(TINY + ["seed=1"]), run_dir=tmp_path / "c")
    for step in (0, 10, 30):
        assert same_weights(weights(history_path(tmp_path / "a", step)), weights(history_path(tmp_path / "b", step)))
        assert not same_weights(weights(history_path(tmp_path / "a", step)),
                                weights(history_path(tmp_path / "c", step)))
    assert a["val_loss"] == b["val_loss"] and a["monitor"] == b["monitor"]
    assert a["tokens_seen"] == 30 * 8 * 32


def test_grad_accum_matches_one_big_batch(tmp_path):
    """2 micro-batches of 4 = 1 batch of 8 (same rows: one generator), up to float rounding."""
    base = TINY + ["data.repeat_frac=0", "train.max_iters=5", "checkpoint.every=5"]
    one = train(compose_cfg(base + ["train.batch_size=8"]), run_dir=tmp_path / "one")
    two = train(compose_cfg(base + ["train.batch_size=4", "train.grad_accum=2"]), run_dir=tmp_path / "two")
    assert one["tokens_seen"] == two["tokens_seen"] == 5 * 8 * 32
    a, b = weights(history_path(tmp_path / "one", 5)), weights(history_path(tmp_path / "two", 5))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3)
    assert not same_weights(a, weights(history_path(tmp_path / "one", 0)))


def test_lr_schedule():
    lrs = [get_lr(it, 1e-3, 1e-4, 10, 100) for it in range(120)]
    assert lrs[0] == pytest.approx(1e-3 / 11) and lrs[10] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11]))  # warm-up rises
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:101]))  # cosine falls
    assert lrs[100] == pytest.approx(1e-4) and lrs[119] == 1e-4


# ------------------------------------------------------------------ resume

def test_resume_uses_saved_config_and_warns(tmp_path, caplog):
    train(compose_cfg(TINY + ["train.max_iters=10"]), run_dir=tmp_path)
    before = weights(history_path(tmp_path, 10))
    with caplog.at_level(logging.WARNING):
        out = train(compose_cfg(TINY + ["train.max_iters=10", "model.n_layer=3", "train.resume=true"]),
                    run_dir=tmp_path)
    assert "model.n_layer" in caplog.text
    assert out["iter_num"] == 10 and same_weights(weights(history_path(tmp_path, 10)), before)


def test_a_run_from_before_the_monitor_rename_resumes(tmp_path):
    """resume.pt written when the monitor was the ``probe:`` block: the run continues with its
    settings, under today's names, to the weights of an uninterrupted run."""
    common = TINY + ["optim.warmup_iters=4", "optim.lr_decay_iters=20"]  # one lr schedule, stopped at 10 or 20
    whole = train(compose_cfg(common + ["train.max_iters=20"]), run_dir=tmp_path / "whole")
    train(compose_cfg(common + ["train.max_iters=10"]), run_dir=tmp_path / "old")
    state = load_checkpoint(resume_path(tmp_path / "old"))
    config = state["config"]
    config["probe"] = config.pop("monitor")  # the saved config of a run from before the rename
    config["train"]["max_iters"] = 20
    torch.save(state, resume_path(tmp_path / "old"))

    out = train(compose_cfg(common + ["train.max_iters=10", "train.resume=true"]), run_dir=tmp_path / "old")
    assert out["iter_num"] == 20 and out["monitor"] == whole["monitor"]
    assert same_weights(weights(history_path(tmp_path / "old", 20)), weights(history_path(tmp_path / "whole", 20)))
    saved = load_checkpoint(history_path(tmp_path / "old", 20))["config"]
    assert "probe" not in saved and saved["monitor"] == config["probe"]


def test_resume_without_resume_file_starts_fresh(tmp_path, caplog):
    """A fresh run dir just starts (info); checkpoints without a resume file deserve a warning."""
    with caplog.at_level(logging.INFO):
        out = train(compose_cfg(TINY + ["train.max_iters=4", "train.resume=true"]), run_dir=tmp_path / "fresh")
    fresh = [r for r in caplog.records if "does not exist" in r.getMessage()]
    assert out["iter_num"] == 4 and [r.levelno for r in fresh] == [logging.INFO]

    caplog.clear()
    (tmp_path / "fresh" / "resume.pt").unlink()  # e.g. killed before the first resume save
    with caplog.at_level(logging.INFO):
        out = train(compose_cfg(TINY + ["train.max_iters=4", "train.resume=true"]), run_dir=tmp_path / "fresh")
    stale = [r for r in caplog.records if "does not exist" in r.getMessage()]
    assert out["iter_num"] == 4 and [r.levelno for r in stale] == [logging.WARNING]


@pytest.mark.slow  # three train.py processes: ~20 s alone, ~1 min on a busy machine
def test_resume_after_kill_9_gives_bitwise_equal_weights(tmp_path):
    """Kill the process (SIGKILL, possibly mid-save), resume, compare with an uninterrupted run."""
    args = TINY + ["train.max_iters=150", "train.eval_every=10", "checkpoint.every=25"]
    ref = run_train(args + [f"hydra.run.dir={tmp_path / 'ref'}"])
    assert ref.returncode == 0, ref.stderr[-2000:]

    run_dir = tmp_path / "killed"
    killed_at = train_then_kill(args, run_dir, after_iter=20)
    assert 20 <= killed_at < 150

    resumed = run_train(args + ["train.resume=true", f"hydra.run.dir={run_dir}"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [s for s, _ in list_checkpoints(run_dir)] == [s for s, _ in list_checkpoints(tmp_path / "ref")]
    for step, path in list_checkpoints(tmp_path / "ref"):
        assert same_weights(weights(path), weights(history_path(run_dir, step))), step
    assert same_weights(load_checkpoint(resume_path(run_dir))["model"], weights(history_path(tmp_path / "ref", 150)))
    assert not list(run_dir.rglob(".*.tmp"))


# ------------------------------------------------------------------ failures

def test_nan_loss_stops_with_clear_error_and_keeps_good_checkpoints(tmp_path):
    bad = TINY + ["optim.lr=1e6", "optim.min_lr=0", "optim.grad_clip=0", "optim.warmup_iters=0"]
    with pytest.raises(TrainingError, match="loss is nan|non-finite") as e:
        train(compose_cfg(bad), run_dir=tmp_path / "a")
    assert "\n" not in str(e.value)
    saved = list_checkpoints(tmp_path / "a")
    assert saved and saved[0][0] == 0
    for _, path in saved + [(None, resume_path(tmp_path / "a"))]:
        assert all(torch.isfinite(v).all() for v in weights(path).values())

    p = run_train(bad + [f"hydra.run.dir={tmp_path / 'b'}"])
    assert p.returncode == 2 and "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "last good checkpoints" in errors[0]


# ------------------------------------------------------------------ live monitor

def test_monitor_runs_in_eval_mode_and_restores_train_mode():
    model = GPT(GPTConfig(block_size=32, vocab_size=30, n_layer=1, n_head=2, n_embd=32, dropout=0.1))
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    monitor = InductionMonitor(30, None, seq_len=8, batch_size=4, seed=0)
    model.train()
    out = monitor(model)
    assert seen and not any(seen) and model.training
    model.eval()
    monitor(model)
    assert not model.training
    assert set(out) == {"monitor/induction_score_max", "monitor/loss_first_copy", "monitor/loss_second_copy",
                        "monitor/induction_score/L0H0", "monitor/induction_score/L0H1"}
    assert torch.equal(monitor.tokens, InductionMonitor(30, None, seq_len=8, batch_size=4, seed=0).tokens)
    assert torch.equal(monitor.tokens[:, :8], monitor.tokens[:, 8:])
    assert all(len(set(row[:8].tolist())) == 8 for row in monitor.tokens)  # distinct tokens per half


def test_monitor_sees_a_hand_built_induction_head(hand_model):
    """conftest's hand-wired previous-token + induction circuit: score ~1 on L1H0, second copy ~free."""
    out = InductionMonitor(hand_model.config.vocab_size, None, seq_len=12, batch_size=8, seed=0)(hand_model)
    assert out["monitor/induction_score/L1H0"] > 0.9 and out["monitor/induction_score_max"] > 0.9
    assert out["monitor/induction_score/L1H1"] < 0.2
    assert out["monitor/loss_second_copy"] < 0.5 * out["monitor/loss_first_copy"]


@pytest.mark.slow  # torch.compile on CPU builds C++ kernels: about a minute
def test_compile_saves_plain_state_dict(tmp_path):
    out = train(compose_cfg(TINY + ["train.max_iters=3", "train.compile=true"]), run_dir=tmp_path)
    sd = weights(history_path(tmp_path, 3))
    assert out["iter_num"] == 3 and not any(k.startswith("_orig_mod.") for k in sd)
    assert set(sd) == set(GPT(GPTConfig(**load_checkpoint(history_path(tmp_path, 3))["model_args"])).state_dict())


def test_train_loss_estimate_draws_unigram_repeats_like_training(tmp_path, caplog):
    """train/eval_loss writes the curriculum into training windows as the training batches do:
    unigram segments from the training split's token counts (not each batch's own)."""
    from induction_dynamics.data import BatchSampler, load_data
    from induction_dynamics.training.loop import EVAL_SEED
    cfg = compose_cfg(TINY + ["data.repeat_kind=unigram", "data.repeat_frac=1.0", "train.max_iters=10",
                              "data.synthetic_vocab_size=12"])
    with caplog.at_level(logging.INFO):
        train(cfg, run_dir=tmp_path / "run")
    logged = float(next(r.getMessage() for r in caplog.records if r.getMessage().startswith("iter 10:"))
                   .split("train loss ")[1])
    d = cfg.data
    data = load_data("synthetic", synthetic_vocab_size=12, synthetic_tokens=d.synthetic_tokens, seed=0)
    model = GPT(GPTConfig(**load_checkpoint(history_path(tmp_path / "run", 10))["model_args"]))
    model.load_state_dict(weights(history_path(tmp_path / "run", 10)))
    model.eval()

    def estimate(token_weights):
        sampler = BatchSampler(data.train, cfg.train.batch_size, cfg.model.block_size, EVAL_SEED,
                               repeat_frac=1.0, repeat_kind="unigram", repeat_min=d.repeat_min,
                               repeat_max=d.repeat_max, token_weights=token_weights)
        with torch.no_grad():
            return sum(model(*sampler.sample())[1].item() for _ in range(cfg.train.eval_iters)) / cfg.train.eval_iters

    assert abs(estimate(data.counts) - logged) < 1e-4
    assert abs(estimate(None) - logged) > 1e-4  # the batches' own frequencies: a different estimate
