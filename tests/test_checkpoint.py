"""Checkpoint files: history schedule, atomic writes, safe loading, and what the trainer writes."""

import os
import pickle

import pytest
import torch
from train_helpers import TINY, compose_cfg

from induction_dynamics.checkpoint import (
    history_steps,
    load_checkpoint,
    model_from_checkpoint,
    save_atomic,
)
from induction_dynamics.errors import CheckpointError
from induction_dynamics.run_dir import history_path, list_checkpoints, resume_path
from induction_dynamics.training.loop import train


def test_history_steps():
    assert history_steps(1000, 250) == [0, 250, 500, 750, 1000]
    assert history_steps(1100, 250) == [0, 250, 500, 750, 1000, 1100]  # the last step always
    assert history_steps(1000, 250, "log") == [0, 1, 2, 4, 8, 16, 32, 64, 128, 250, 500, 750, 1000]
    assert history_steps(5, 250, "log") == [0, 1, 2, 4, 5]
    with pytest.raises(ValueError):
        history_steps(100, 0)
    with pytest.raises(ValueError):
        history_steps(100, 10, "exp")


class Exploding:
    """Pickling fails half-way through a save (as a kill or a full disk would)."""

    def __reduce__(self):
        raise OSError("disk full")


def test_failed_save_keeps_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "checkpoints" / "step_000010.pt"
    save_atomic({"model": {"w": torch.ones(3)}}, path)
    with pytest.raises(OSError):
        save_atomic({"model": {"w": torch.zeros(1000)}, "bad": Exploding()}, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["step_000010.pt"]
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_truncated_or_foreign_files_are_refused_in_one_line(tmp_path):
    good = tmp_path / "good.pt"
    save_atomic({"model": {"w": torch.randn(1000)}}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(cut)
    assert "\n" not in str(e.value)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(2)}, other)
    with pytest.raises(CheckpointError, match="no 'model' entry"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": Payload(str(marker))}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()
    # the same payload as a plain pickle (not a torch zip file)
    path.write_bytes(pickle.dumps({"model": Payload(str(marker))}))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.fixture(scope="module")
def default_model_run(tmp_path_factory):
    """The default model config (2 layers x 4 heads x 64, block 64), two iterations."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose_cfg(["data=synthetic", "data.repeat_max=20", "train.max_iters=2", "train.eval_iters=1",
                       "train.progress=false", "wandb.mode=disabled"])
    return run_dir, cfg, train(cfg, run_dir=run_dir)


def test_history_checkpoint_format_and_size(default_model_run):
    run_dir, cfg, result = default_model_run
    steps = [s for s, _ in list_checkpoints(run_dir)]
    assert steps == history_steps(2, cfg.checkpoint.every, cfg.checkpoint.schedule) == [0, 1, 2]
    for step, path in list_checkpoints(run_dir):
        ckpt = load_checkpoint(path)  # weights_only=True
        assert {"model", "model_args", "iter_num", "step", "tokens_seen", "vocab", "token_counts", "config",
                "val_loss"} <= set(ckpt)
        assert "optimizer" not in ckpt and "rng" not in ckpt
        assert ckpt["step"] == ckpt["iter_num"] == step
        assert ckpt["tokens_seen"] == step * cfg.train.batch_size * cfg.model.block_size
        assert ckpt["model_args"]["n_layer"] == 2 and ckpt["model_args"]["vocab_size"] == len(ckpt["vocab"])
        assert ckpt["config"]["model"] == dict(cfg.model)
        model = model_from_checkpoint(ckpt)
        # parameter bytes, each tensor once (wte and lm_head are tied, as nanoGPT saves them)
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        size = path.stat().st_size
        assert param_bytes <= size <= 1.05 * param_bytes, (size, param_bytes)
    last = load_checkpoint(history_path(run_dir, 2))
    assert last["val_loss"] == pytest.approx(result["val_loss"])


def test_resume_file_holds_optimizer_rng_and_data_position(default_model_run):
    run_dir, cfg, _ = default_model_run
    state = load_checkpoint(resume_path(run_dir))
    assert state["iter_num"] == 2
    assert len(state["optimizer"]["state"]) > 0
    assert {"torch", "numpy", "python"} <= set(state["rng"])
    assert state["sampler"]["batches_drawn"] == 2 and state["sampler"]["generator"].dtype == torch.uint8
    assert (run_dir / "config.yaml").is_file()


def test_tiny_run_checkpoints_follow_the_schedule(tmp_path):
    cfg = compose_cfg(TINY + ["checkpoint.every=7", "checkpoint.schedule=linear"])
    train(cfg, run_dir=tmp_path)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [0, 7, 14, 21, 28, 30]
