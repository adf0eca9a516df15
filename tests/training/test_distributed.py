"""Data-parallel training with torchrun on CPU (gloo).

Every torchrun process gets one thread (OMP_NUM_THREADS=1). The launcher is started as
``python -m torch.distributed.run`` (what the ``torchrun`` script runs) in its own session.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import ROOT, TINY, cli_env, run_train, wandb_records

from induction_dynamics.checkpoint import load_checkpoint
from induction_dynamics.errors import ConfigError
from induction_dynamics.model import GPT, GPTConfig
from induction_dynamics.run_dir import history_path, list_checkpoints, resume_path
from induction_dynamics.training.distributed import DistContext, ddp_device

# grad_accum=2: the no_sync micro-step and the synchronised one are both exercised
DDP = [*TINY, "train.grad_accum=2"]
LONG = [*DDP, "train.max_iters=200", "train.eval_every=50", "train.log_every=50", "checkpoint.every=50",
        "monitor.every=50"]


def torchrun_cmd(args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(ROOT / "train.py"), *args]


def torchrun(args, cwd=ROOT, env=None, timeout=600, nproc=2) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(args, nproc), cwd=cwd, env=env or cli_env(), capture_output=True, text=True,
                          timeout=timeout)


def final_weights(run_dir: Path) -> dict:
    return load_checkpoint(list_checkpoints(run_dir)[-1][1])["model"]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def bitwise(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ fast: sharding and errors

def test_ranks_take_contiguous_equal_shares_of_the_global_batch():
    x = torch.arange(8 * 3).view(8, 3)  # (B=8, T=3) global batch
    for world in (1, 2, 4):
        parts = [DistContext(rank=r, world_size=world).my_rows(x) for r in range(world)]
        assert all(p.shape == (8 // world, 3) for p in parts)
        assert torch.equal(torch.cat(parts), x)  # in rank order: the one-process batch


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_ddp_on_an_unavailable_device_is_a_clear_error():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        ddp_device("cuda", 0, 2)
    with pytest.raises(ConfigError, match="cuda:LOCAL_RANK"):
        ddp_device("cuda:1", 0, 2)
    assert ddp_device("auto", 1, 2) == torch.device("cpu")  # auto on a CPU machine: gloo


def test_torchrun_batch_not_divisible_by_world_size(tmp_path):
    p = torchrun([*DDP, "train.batch_size=7", f"hydra.run.dir={tmp_path / 'run'}"], timeout=300)
    assert p.returncode != 0
    ours = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert ours and all(line == "error: train.batch_size=7 is not divisible by the 2 processes" for line in ours)
    assert not list(tmp_path.rglob("*.pt"))  # nothing written


# ------------------------------------------------------------------ fast

def test_torchrun_two_processes_write_one_run_dir(tmp_path):
    """Default hydra.run.dir (outputs/<date>/<time>, resolved by each rank): still one run dir."""
    p = torchrun([*DDP, "train.max_iters=20", "wandb.mode=offline"], cwd=tmp_path, env=cli_env(WANDB_MODE="offline"))
    assert p.returncode == 0, p.stderr[-3000:]
    runs = [d for d in (tmp_path / "outputs").glob("*/*")]
    assert len(runs) == 1, runs  # no second (or empty) run dir from rank 1
    run_dir = runs[0]
    assert sorted(x.name for x in run_dir.iterdir()) == [".hydra", "checkpoints", "config.yaml", "resume.pt",
                                                         "train.log", "wandb"]
    assert not (tmp_path / "wandb").exists()
    log = (run_dir / "train.log").read_text()
    assert "DDP over 2 processes" in log and log.count("model:") == 1  # rank 0's log only

    # one checkpoint history, single-process format: plain GPT names, no DDP `module.` prefix
    assert [s for s, _ in list_checkpoints(run_dir)] == [0, 1, 2, 4, 8, 10, 20]
    ck = load_checkpoint(history_path(run_dir, 20))
    plain = GPT(GPTConfig(**ck["model_args"])).state_dict()
    assert list(ck["model"]) == list(plain) and not any(k.startswith("module.") for k in ck["model"])
    assert ck["tokens_seen"] == 20 * 2 * 8 * 32  # iterations x grad_accum x global batch x block: one process's

    # W&B: one run, from rank 0: every logged iteration once
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    records, history = wandb_records(run_dir)
    assert sum(r["type"] == "run" for r in records) == 1
    assert [h["iter"] for h in history if "train/loss" in h] == [5, 10, 15, 20]
    assert [h["iter"] for h in history if "val/loss" in h] == [0, 10, 20]
    assert [h["iter"] for h in history if "monitor/induction_score_max" in h] == [0, 10, 20]


# ------------------------------------------------------------------ slow

@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    p = torchrun([*LONG, f"hydra.run.dir={run_dir}"])
    assert p.returncode == 0, p.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_two_processes_equal_one_process(ddp_run, tmp_path):
    """Same global batch, seed and data order: 2 processes == 1 process to 1e-5 at every checkpoint."""
    one = tmp_path / "one"
    p = run_train([*LONG, f"hydra.run.dir={one}"])
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = list_checkpoints(ddp_run), list_checkpoints(one)
    assert [s for s, _ in a] == [s for s, _ in b]
    diffs = []
    for (step, pa), (_, pb) in zip(a, b):
        ca, cb = load_checkpoint(pa), load_checkpoint(pb)
        diffs.append((step, max_diff(ca["model"], cb["model"]), bitwise(ca["model"], cb["model"])))
        assert diffs[-1][1] <= 1e-5, diffs
        if ca["val_loss"] is not None:
            assert abs(ca["val_loss"] - cb["val_loss"]) <= 1e-5
    assert diffs[0][2]  # same initial weights, bitwise
    # Not bitwise after the first step: each rank sums its half of the rows, then the halves
    # are added (all-reduce); one process sums all rows in one matmul -- a different order of
    # float additions. Printed for the record (pytest -s).
    print("2 vs 1 process, max |diff| per checkpoint:", [(s, f"{d:.2g}", eq) for s, d, eq in diffs])


@pytest.mark.slow
def test_resume_two_processes_after_kill_9_of_the_launcher(ddp_run, tmp_path):
    run_dir = tmp_path / "run"
    args = [*LONG, f"hydra.run.dir={run_dir}"]
    with open(tmp_path / "killed.log", "w") as out:
        proc = subprocess.Popen(torchrun_cmd(args), cwd=ROOT, env=cli_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 400
            while not history_path(run_dir, 50).exists():
                assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint at step 50"
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)  # the launcher only
            proc.wait()
            # its workers die with it (PR_SET_PDEATHSIG): nothing is left in its process group
            deadline = time.monotonic() + 30
            while _group_alive(proc.pid):
                assert time.monotonic() < deadline, "torchrun workers outlived their launcher"
                time.sleep(0.1)
        finally:
            if _group_alive(proc.pid):
                os.killpg(proc.pid, signal.SIGKILL)
    assert not history_path(run_dir, 200).exists(), "the run finished before the kill: nothing tested"
    killed_at = load_checkpoint(resume_path(run_dir))["iter_num"]
    # the trainer writes a step's history file, then resume.pt: a kill between the two
    # leaves the previous resume point (32 on the log schedule), which is just as valid
    assert 32 <= killed_at < 200

    p = torchrun([*args, "train.resume=true"])
    assert p.returncode == 0, p.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert re.search(rf"resumed from .*resume\.pt at iteration {killed_at}\b", log), log[-2000:]
    assert [s for s, _ in list_checkpoints(run_dir)] == [s for s, _ in list_checkpoints(ddp_run)]
    assert bitwise(final_weights(run_dir), final_weights(ddp_run))  # same 2-process run, uninterrupted


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
