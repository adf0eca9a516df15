"""Multi-seed sweeps: `python train.py -m seed=...`
with the basic, joblib and submitit_local launchers; SLURM launcher configs compose; every
parallel worker gets cores // jobs torch threads."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from train_helpers import CONF, ROOT, TINY, cli_env, run_train, wandb_records

from induction_dynamics.checkpoint import load_checkpoint
from induction_dynamics.cli import thread_budget
from induction_dynamics.run_dir import list_checkpoints
from induction_dynamics.training.distributed import cpu_cores

SWEEP = [*TINY, "train.max_iters=6", "train.eval_every=3", "checkpoint.every=3", "monitor.every=3"]


def sweep_env():
    """No OMP_NUM_THREADS: the launcher-derived budget, not the environment, must set the threads."""
    env = cli_env(WANDB_MODE="offline")
    env.pop("OMP_NUM_THREADS")
    return env


def run_sweep(tmp_path, *args, timeout=600):
    sweep = tmp_path / "sweep"
    p = run_train(["-m", *SWEEP, *args, f"hydra.sweep.dir={sweep}"], env=sweep_env(), timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return sweep


def check_sweep(sweep: Path, seeds: list[int]) -> list[Path]:
    """One run dir per seed (readable name), different weights, identical configs but seed and name."""
    runs = sorted((p.parent for p in sweep.rglob("checkpoints")), key=lambda p: p.name)
    assert [r.name for r in runs] == [f"{i}-seed{s}" for i, s in enumerate(seeds)]
    configs = [OmegaConf.to_container(OmegaConf.load(r / "config.yaml")) for r in runs]
    assert [c["seed"] for c in configs] == seeds
    assert len({c["wandb"]["group"] for c in configs}) == 1  # seeds overlay in one W&B group
    assert [c["wandb"]["name"] for c in configs] == [f"{configs[0]['wandb']['group']}-seed{s}" for s in seeds]
    for c in configs:
        del c["seed"], c["wandb"]["name"]
    assert all(c == configs[0] for c in configs[1:])
    finals = [load_checkpoint(list_checkpoints(r)[-1][1]) for r in runs]
    assert all(f["step"] == 6 for f in finals)
    for i in range(len(finals)):
        for j in range(i + 1, len(finals)):
            a, b = finals[i]["model"], finals[j]["model"]
            assert any(not torch.equal(a[k], b[k]) for k in a), f"seeds {seeds[i]} and {seeds[j]}: same weights"
    return runs


def threads_used(run_dir: Path) -> int:
    """The torch thread count the trainer logged for this run (run_dir/train.log)."""
    m = re.search(r"(\d+) torch threads", (run_dir / "train.log").read_text())
    assert m, (run_dir / "train.log").read_text()[-2000:]
    return int(m.group(1))


# ------------------------------------------------------------------ launchers, end to end

def test_basic_launcher_one_run_dir_per_seed(tmp_path):
    sweep = run_sweep(tmp_path, "seed=0,1", "wandb.mode=offline")
    runs = check_sweep(sweep, [0, 1])
    for r in runs:  # the W&B records agree with config.yaml: the sweep's group, the seed in the name
        saved = OmegaConf.load(r / "config.yaml")
        records, history = wandb_records(r)
        run = next(x["run"] for x in records if x["type"] == "run")
        assert (run["run_group"], run["display_name"]) == (saved.wandb.group, saved.wandb.name)
        assert any("train/loss" in h for h in history)
    # jobs run one after another: each keeps torch's own default thread count
    default = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                             env=sweep_env(), capture_output=True, text=True, check=True).stdout
    assert [threads_used(r) for r in runs] == [int(default)] * 2


@pytest.mark.slow
@pytest.mark.parametrize("seeds, backend", [([0, 1, 2, 3], None), ([0, 1], "multiprocessing")])
def test_joblib_launcher_gives_each_worker_its_share_of_threads(tmp_path, seeds, backend):
    """joblib's default (loky) backend already caps its workers' threads at cores // n_jobs; the
    multiprocessing backend does not, so there the cap is train.py's alone."""
    extra = [f"hydra.launcher.backend={backend}"] if backend else []
    sweep = run_sweep(tmp_path, "seed=" + ",".join(map(str, seeds)), "hydra/launcher=joblib",
                      "hydra.launcher.n_jobs=2", *extra)
    runs = check_sweep(sweep, seeds)
    assert [threads_used(r) for r in runs] == [max(1, cpu_cores() // 2)] * len(seeds)


@pytest.mark.slow
def test_submitit_local_launcher(tmp_path):
    sweep = run_sweep(tmp_path, "seed=0,1", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20")
    runs = check_sweep(sweep, [0, 1])
    assert [threads_used(r) for r in runs] == [1, 1]  # cpus_per_task unset: 1, as SLURM allocates
    assert list((sweep / ".submitit").rglob("*_result.pkl"))  # it really went through submitit


# ------------------------------------------------------------------ thread budget (real launcher configs)

def launcher(*overrides):
    with_hydra = _compose_with_hydra(["hydra/launcher=" + overrides[0], *overrides[1:]])
    return with_hydra.hydra.launcher


def _compose_with_hydra(overrides):
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_thread_budget_from_launcher_configs(monkeypatch):
    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    cores = cpu_cores()
    assert thread_budget(None) is None  # basic launcher: one job at a time
    assert thread_budget(launcher("basic")) is None
    assert thread_budget(launcher("joblib", "hydra.launcher.n_jobs=2")) == max(1, cores // 2)
    assert thread_budget(launcher("joblib", "hydra.launcher.n_jobs=1")) == cores
    assert thread_budget(launcher("joblib", "hydra.launcher.n_jobs=-1")) == 1
    assert thread_budget(launcher("submitit_local")) == 1
    assert thread_budget(launcher("submitit_local", "hydra.launcher.cpus_per_task=3")) == 3
    assert thread_budget(launcher("slurm")) == 8  # conf/hydra/launcher/slurm.yaml
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: 2 processes on this node
    assert thread_budget(None) == max(1, cores // 2)


# ------------------------------------------------------------------ SLURM launcher configs compose

def show_hydra_cfg(*args) -> dict:
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--cfg", "hydra"], cwd=ROOT,
                       env=cli_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return OmegaConf.to_container(OmegaConf.create(p.stdout)["hydra"])


def test_slurm_launcher_config_shows_its_fields():
    """`python train.py -m seed=0,1 hydra/launcher=slurm --cfg hydra` (Hydra alone refuses -m with --cfg)."""
    h = show_hydra_cfg("-m", "seed=0,1", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                       "hydra.launcher.timeout_min=30", "hydra.launcher.cpus_per_task=4")
    lau = h["launcher"]
    assert lau["_target_"].endswith("SlurmLauncher")
    assert (lau["partition"], lau["timeout_min"], lau["cpus_per_task"]) == ("gpu", 30, 4)
    for field in ("gpus_per_node", "mem_gb", "nodes", "tasks_per_node", "qos", "account", "setup"):
        assert field in lau
    assert h["mode"] == "MULTIRUN" and h["overrides"]["task"] == ["seed=0"]  # the sweep's first job


def test_plugin_submitit_slurm_and_analysis_compose():
    lau = show_hydra_cfg("-m", "seed=range(0,20)", "hydra/launcher=submitit_slurm",
                         "hydra.launcher.gpus_per_node=1")["launcher"]
    assert lau["_target_"].endswith("SlurmLauncher") and lau["gpus_per_node"] == 1
    p = subprocess.run([sys.executable, str(ROOT / "analyze_checkpoints.py"), "run_dir=a", "hydra/launcher=slurm",
                        "hydra.launcher.gpus_per_node=0", "--cfg", "hydra"], cwd=ROOT, env=cli_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    lau = OmegaConf.create(p.stdout).hydra.launcher
    assert lau._target_.endswith("SlurmLauncher") and lau.gpus_per_node == 0 and lau.cpus_per_task == 8

