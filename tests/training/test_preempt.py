"""Preemption: SIGTERM / SIGUSR1 to a real train.py (or a torchrun rank) at a random iteration
-> resume.pt at the iteration the signal arrived, W&B finished, exit status EXIT_REQUEUE ->
train.resume=true ends with bitwise the weights of an uninterrupted run.

Where the signal lands: the test follows W&B's journal (``wandb/train_run.journal.jsonl``, one
line per logged record; train.log_every=1 logs every iteration) and signals the process once
the journal holds the chosen iteration. ``sent`` is the last iteration the journal held just
before the signal; the resume point must be that one or the next (the one in flight), and no
iteration may have run after it (nothing computed is lost).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_distributed import bitwise, torchrun_cmd
import torch
from train_helpers import ROOT, TINY, cli_env, compose_cfg

from induction_dynamics.checkpoint import load_checkpoint
from induction_dynamics.run_dir import list_checkpoints, resume_path, wandb_state_path
from induction_dynamics.training.loop import train
from induction_dynamics.training.preempt import EXIT_REQUEUE, StopSignals

MAX_ITERS = 200
ARGS = [*TINY, f"train.max_iters={MAX_ITERS}", "train.eval_every=50", "checkpoint.every=50", "monitor.every=50",
        "train.log_every=1", "wandb.mode=offline"]
DDP = [*ARGS, "train.grad_accum=2"]


def journal_steps(run_dir: Path) -> list[int]:
    """Iterations of the train records W&B's journal holds, over every segment of the run."""
    try:
        lines = (wandb_state_path(run_dir).parent / "train_run.journal.jsonl").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            e = json.loads(line)
        except ValueError:  # the line being written
            continue
        if e["stream"] == "train":
            out.append(e["step"])
    return out


def signal_at(proc: subprocess.Popen, run_dir: Path, at_iter: int, send, log: Path) -> int:
    """Wait until the journal holds ``at_iter``, call ``send()``; returns the last iteration the
    journal held just before (the iteration in flight when the signal arrived is the next)."""
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, f"finished before the signal: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "training did not reach the iteration"
        steps = journal_steps(run_dir)
        if steps and steps[-1] >= at_iter:
            send()
            return steps[-1]
        time.sleep(0.002)


def final_weights(run_dir: Path) -> dict:
    return load_checkpoint(list_checkpoints(run_dir)[-1][1])["model"]


def check_stopped(run_dir: Path, sent: int) -> int:
    """resume.pt holds the iteration in flight at the signal and nothing ran after it; W&B finished."""
    stopped = load_checkpoint(resume_path(run_dir))["iter_num"]
    ran = journal_steps(run_dir)[-1]
    print(f"signal after iteration {sent}: resume.pt at {stopped}, last iteration run {ran}")
    assert ran == stopped, "iterations ran after the resume point: lost on resume"
    # sent + 1 is the step in flight. + 2: under DDP a rank other than 0 (which writes the
    # journal) can already be past the stop check of that step; in one process, only when the
    # test was paused between reading the journal and sending while a whole (5 ms) step ran
    assert sent <= stopped <= sent + 2 < MAX_ITERS
    assert json.loads(wandb_state_path(run_dir).read_text())["finished"] is True  # W&B run closed on disk
    assert not list(run_dir.rglob(".*.tmp"))
    return stopped


def check_resumed(run_dir: Path, ref: Path) -> None:
    assert [s for s, _ in list_checkpoints(run_dir)] == [s for s, _ in list_checkpoints(ref)]
    for (step, a), (_, b) in zip(list_checkpoints(run_dir), list_checkpoints(ref)):
        assert bitwise(load_checkpoint(a)["model"], load_checkpoint(b)["model"]), step
    assert journal_steps(run_dir) == list(range(1, MAX_ITERS + 1))  # W&B: every iteration once, over both


# ------------------------------------------------------------------ in-process

def test_stop_signals_restore_the_previous_handlers_and_forward_to_them():
    seen = []
    before = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.requested and stop.name == "SIGUSR1" and not seen  # ours, not the previous one
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        stop.forward()  # what submitit's requeue handler would receive
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_stop_signals_outside_the_main_thread_install_nothing():
    import threading
    out = []

    def body():
        with StopSignals() as stop:
            out.append((stop.requested, signal.getsignal(signal.SIGTERM)))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert out == [(False, signal.SIG_DFL)]


# ------------------------------------------------------------------ one process

@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run, in process on one thread: the thread count changes a reduction's
    order, so every subprocess here runs on one too (cli_env's OMP_NUM_THREADS=1)."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(compose_cfg([*ARGS, "wandb.mode=disabled"]), run_dir=run_dir)
    finally:
        torch.set_num_threads(threads)
    return run_dir


def test_sigterm_at_a_random_iteration_resumes_bitwise(tmp_path, reference):
    env = cli_env()
    at = random.Random().randrange(5, 150)
    run_dir = tmp_path / "run"
    log = tmp_path / "stopped.log"
    cmd = [sys.executable, str(ROOT / "train.py"), *ARGS, f"hydra.run.dir={run_dir}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            sent = signal_at(proc, run_dir, at, lambda: proc.send_signal(signal.SIGTERM), log)
            assert proc.wait(timeout=120) == EXIT_REQUEUE, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    stopped = check_stopped(run_dir, sent)
    text = log.read_text()
    assert f"stopped at iteration {stopped} by SIGTERM" in text and "Traceback" not in text

    p = subprocess.run([*cmd, "train.resume=true"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed from {resume_path(run_dir)} at iteration {stopped}" in (run_dir / "train.log").read_text()
    check_resumed(run_dir, reference)


# ------------------------------------------------------------------ torchrun, 2 processes (gloo)

def worker_pids(launcher: int) -> dict[int, int]:
    """{RANK: pid} of torchrun's worker processes (its children with RANK in their environment)."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(kv.split("=", 1) for kv in (d / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher and "RANK" in env:
            found[int(env["RANK"])] = int(d.name)
    return found


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ddp_ref") / "run"
    p = subprocess.run(torchrun_cmd([*DDP, "wandb.mode=disabled", f"hydra.run.dir={run_dir}"]), cwd=ROOT,
                       env=cli_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return run_dir


def stop_torchrun(tmp_path: Path, run_dir: Path, send) -> tuple[int, str, int]:
    """torchrun on DDP, ``send(launcher_pid, {rank: pid})`` at a random iteration; (sent, output,
    torchrun's status). The workers are looked up before: a scan of /proc takes iterations."""
    at = random.Random().randrange(5, 150)
    log = tmp_path / "stopped.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(torchrun_cmd([*DDP, f"hydra.run.dir={run_dir}"]), cwd=ROOT, env=cli_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            signal_at(proc, run_dir, 1, lambda: None, log)  # training under way: both workers exist
            workers = worker_pids(proc.pid)
            sent = signal_at(proc, run_dir, at, lambda: send(proc.pid, workers), log)
            status = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return sent, log.read_text(), status


@pytest.mark.slow  # three torchrun launches: ~40 s on two cores
def test_sigusr1_to_one_rank_stops_every_rank_at_the_same_iteration(tmp_path, ddp_reference):
    """Only rank 1 gets the signal; rank 0 (which writes resume.pt) learns it through the
    per-iteration all-reduce: both stop at one iteration, and the resumed run is bitwise the
    uninterrupted 2-process run."""
    run_dir = tmp_path / "run"
    sent, text, status = stop_torchrun(tmp_path, run_dir,
                                       lambda pid, workers: os.kill(workers[1], signal.SIGUSR1))
    stopped = check_stopped(run_dir, sent)
    assert f"stopped at iteration {stopped} by SIGUSR1" in text  # rank 1 (warnings on stdout)
    assert f"stopped at iteration {stopped} by a signal to another rank" in text  # rank 0
    assert status != 0 and f"exitcode  : {EXIT_REQUEUE}" in text  # torchrun reports its workers' status

    p = subprocess.run(torchrun_cmd([*DDP, f"hydra.run.dir={run_dir}", "train.resume=true"]), cwd=ROOT,
                       env=cli_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    check_resumed(run_dir, ddp_reference)
    assert bitwise(final_weights(run_dir), load_checkpoint(resume_path(ddp_reference))["model"])


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_its_workers_with_a_resume_point(tmp_path):
    """scancel / a preemption signals the launcher; torchrun forwards SIGTERM to its workers."""
    run_dir = tmp_path / "run"
    sent, text, status = stop_torchrun(tmp_path, run_dir, lambda pid, workers: os.kill(pid, signal.SIGTERM))
    stopped = check_stopped(run_dir, sent)
    assert text.count(f"stopped at iteration {stopped} by SIGTERM") == 2, text[-3000:]  # both ranks
    assert status != 0  # torchrun itself ends on the SIGTERM it was sent


# ------------------------------------------------------------------ submitit: the requeue chain

def test_slurm_launcher_signals_early_and_requeues():
    """conf/hydra/launcher/slurm.yaml: submitit's signal 120 s before the kill, --requeue, and
    time-limit requeues allowed (the plugin's default of 0 would end a long run at its first limit)."""
    from test_multirun import show_hydra_cfg
    lau = show_hydra_cfg("-m", "seed=0,1", "hydra/launcher=slurm")["launcher"]
    assert lau["signal_delay_s"] >= 60 and lau["max_num_timeout"] > 0
    assert lau["additional_parameters"]["requeue"] is True


def task_pids(session: int) -> list[int]:
    """pids of submitit's job processes (``python -m submitit.core._submit``) in the process
    group ``session`` (the test's sweep was started in a session of its own: no one else's)."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if (d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[2]) == session
                    and b"submitit.core._submit" in (d / "cmdline").read_bytes()):
                out.append(int(d.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


@pytest.mark.slow  # a submitit sweep whose job runs twice: ~30 s
def test_submitit_requeues_a_signalled_job_and_it_resumes_bitwise(tmp_path, reference):
    """submitit_local runs the job as SLURM would (its own job process, submitit's signal
    handlers); its preemption signal (SIGUSR2) -> resume.pt, then submitit's own handler
    requeues the job, which resumes (train.resume=true) and ends bitwise as the uninterrupted run."""
    at = random.Random().randrange(5, 150)
    sweep = tmp_path / "sweep"
    log = tmp_path / "sweep.log"
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *ARGS, "seed=0", "train.resume=true",
           "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20", f"hydra.sweep.dir={sweep}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while not (run_dirs := [p.parent for p in sweep.glob("*/config.yaml")]):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            run_dir = run_dirs[0]
            sent = signal_at(proc, run_dir, at, lambda: [os.kill(pid, signal.SIGUSR2) for pid in task_pids(proc.pid)],
                             log)
            assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = (run_dir / "train.log").read_text()
    stopped = int(text.split("stopped at iteration ")[1].split()[0])
    assert sent <= stopped <= sent + 2 and "by SIGUSR2" in text
    assert f"resumed from {resume_path(run_dir)} at iteration {stopped}" in text
    submitit_logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*.out"))
    assert "Requeued job" in submitit_logs  # submitit's handler ran after ours
    check_resumed(run_dir, reference)
