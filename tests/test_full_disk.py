"""A full disk loses nothing: every kind of file the project writes either appears whole or the
previous one stays as it was, and the failure is one line naming the file and the errno.

Failures are injected where the system would report them: ``os.replace`` (the rename that
publishes a file) or the file's ``write`` raising OSError(ENOSPC), inside files.py's one write
path; a real kernel refusal in a real train.py (RLIMIT_FSIZE: EFBIG); a read-only folder.
"""

from __future__ import annotations

import errno
import io
import os
import resource
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from analysis_helpers import FAST, cfg_for, make_run
from train_helpers import ROOT, TINY, cli_env, compose_cfg

from induction_dynamics import files
from induction_dynamics import run_dir as layout
from induction_dynamics.checkpoint import load_checkpoint, save_atomic
from induction_dynamics.errors import WriteError, one_line
from induction_dynamics.files import sha256_file
from induction_dynamics.training.loop import train
from induction_dynamics.wandb_logger import WandbLogger

ENOSPC = f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}"


class _FullFile(io.RawIOBase):
    """A file on a disk that fills up after ``room`` more bytes."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def writable(self):
        return True

    def write(self, b):
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)

    def fileno(self):
        return self.f.fileno()

    def close(self):
        self.f.close()
        super().close()


def fail_writes(monkeypatch, name: str, how: str) -> None:
    """Writes of files called ``name`` fail with ENOSPC: at the rename (``replace``) or after
    100 bytes of data (``write``); every other file is written as usual."""
    real_replace, real_fdopen = os.replace, os.fdopen

    def replace(src, dst, *a, **k):
        if how == "replace" and Path(dst).name == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst, *a, **k)

    def fdopen(fd, mode="r", *a, **k):
        f = real_fdopen(fd, mode, *a, **k)
        target = os.readlink(f"/proc/self/fd/{fd}")
        if how == "write" and Path(target).name.startswith(f".{name}."):
            return io.BufferedWriter(_FullFile(f, 100))
        return f

    monkeypatch.setattr(files.os, "replace", replace)
    monkeypatch.setattr(files.os, "fdopen", fdopen)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ each kind of write

def _figure():
    from matplotlib.figure import Figure
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    return fig


def _wandb_state(path: Path):
    """W&B's id file is W&B's business: a failed write warns, and W&B goes on."""
    logger = WandbLogger(mode="disabled", project="p", group=None, name="n", job_type="train", config={},
                         dir=path.parent, state_file=path)
    logger._save_state()


KINDS = {  # file name -> (write it, given its path)
    "step_000010.pt": lambda p: save_atomic({"model": {"w": torch.randn(1000)}}, p),
    "resume.pt": lambda p: save_atomic({"model": {"w": torch.randn(1000)}, "optimizer": {}}, p),
    "manifest.json": lambda p: layout.record_checkpoint(p.parent / "step_000000.pt"),
    "train.bin": lambda p: files.write_bytes(p, os.urandom(5000)),  # token cache (data/cache.py)
    "tokenizer.json": lambda p: files.write_text(p, '{"model": "x"}' * 100),
    "step_000010.parquet": lambda p: files.atomic_write(p, lambda f: pd.DataFrame({"v": range(500)}).to_parquet(f)),
    "step_000010.tokens.npy": lambda p: files.atomic_write(p, lambda f: __import__("numpy").save(f, torch.rand(500).numpy())),
    "results.csv": lambda p: files.write_text(p, pd.DataFrame({"v": range(500)}).to_csv()),
    "curves.png": lambda p: files.save_figure(_figure(), p),
}


@pytest.mark.parametrize("how", ["replace", "write"])
@pytest.mark.parametrize("name", list(KINDS))
def test_a_failed_write_leaves_the_previous_file_and_says_so_in_one_line(tmp_path, monkeypatch, name, how):
    path = tmp_path / "run" / "checkpoints" / name
    save_atomic({"model": {}}, path.parent / "step_000000.pt")  # what the manifest records
    KINDS[name](path)  # the previous version
    before = snapshot(tmp_path)
    fail_writes(monkeypatch, name, how)
    with pytest.raises(WriteError) as e:
        KINDS[name](path)
    assert one_line(e.value) == f"cannot write {path}: {ENOSPC}"
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert snapshot(tmp_path) == before  # the previous file, byte for byte, and no temporary left


def test_the_wandb_id_file_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    path = tmp_path / "wandb" / "train_run.json"
    _wandb_state(path)
    before = path.read_bytes()
    fail_writes(monkeypatch, path.name, "replace")
    _wandb_state(path)  # no exception: W&B never stops training
    assert path.read_bytes() == before
    assert f"cannot write {path}: {ENOSPC}" in caplog.text


def test_a_failed_journal_append_leaves_no_half_record(tmp_path, monkeypatch):
    path = tmp_path / "train_run.journal.jsonl"
    files.append_text(path, '{"step": 1}\n')
    real_open = open

    def full_open(p, mode="r", *a, **k):
        f = real_open(p, mode, *a, **k)
        if Path(p) == path and "a" in mode:
            write = f.write

            def half(b):  # the disk fills mid-record: a part of it lands, then ENOSPC
                write(b[:5])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            f.write = half
        return f

    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(WriteError, match=f"cannot write {path}"):
        files.append_text(path, '{"step": 2}\n')
    monkeypatch.undo()
    assert path.read_text() == '{"step": 1}\n'


def test_a_read_only_folder_is_one_line_too(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod does not stop root's writes (the patched ENOSPC tests cover it)")
    folder = tmp_path / "ro"
    files.write_text(folder / "a.txt", "old")
    folder.chmod(0o555)
    try:
        with pytest.raises(WriteError, match=rf"cannot write {folder / 'a.txt'}: \[Errno {errno.EACCES}\]"):
            files.write_text(folder / "a.txt", "new")
    finally:
        folder.chmod(0o755)
    assert (folder / "a.txt").read_text() == "old"


# ------------------------------------------------------------------ training stops resumable

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    train(compose_cfg(TINY), run_dir=run_dir)
    return run_dir


@pytest.mark.parametrize("name", ["step_000020.pt", "manifest.json", "resume.pt"])
def test_training_on_a_full_disk_stops_with_the_last_resume_point_intact(tmp_path, monkeypatch, uninterrupted,
                                                                        name):
    """The save at iteration 20 fails (history checkpoint, its manifest entry or resume.pt):
    one line, resume.pt still holds iteration 10, and train.resume=true ends bitwise as the
    uninterrupted run."""
    run_dir = tmp_path / "run"
    real = files.os.replace

    def replace(src, dst, *a, **k):  # the disk fills at iteration 20
        if Path(dst).name == name and (name == "step_000020.pt" or layout.history_path(run_dir, 20).exists()):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(WriteError) as e:
        train(compose_cfg(TINY), run_dir=run_dir)
    target = run_dir / ("checkpoints/" if name != "resume.pt" else "") / name
    assert one_line(e.value) == f"cannot write {target}: {ENOSPC}"
    monkeypatch.undo()
    assert load_checkpoint(layout.resume_path(run_dir))["iter_num"] == 10
    assert not list(run_dir.rglob(".*.tmp"))
    for step, path in layout.list_checkpoints(run_dir):  # the manifest matches what is on disk
        if step <= 10:
            load_checkpoint(path)

    out = train(compose_cfg(TINY + ["train.resume=true"]), run_dir=run_dir)
    assert out["iter_num"] == 30
    a, b = load_checkpoint(layout.history_path(run_dir, 30))["model"], \
        load_checkpoint(layout.history_path(uninterrupted, 30))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_py_on_a_file_size_limit_prints_one_line_and_resumes(tmp_path, uninterrupted):
    """A real refusal from the kernel (RLIMIT_FSIZE: EFBIG). resume.pt at iteration 0 (no AdamW
    state yet) fits the limit; at iteration 10 it does not: one line, resume.pt of iteration 0
    intact, and the run resumes once there is room."""
    run_dir = tmp_path / "run"
    limit = 150_000  # checkpoints (~70 kB) and the first resume.pt fit; resume.pt with AdamW's moments does not

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    # the reference trained in this process: the same number of threads gives the same reductions
    threads_env = cli_env(OMP_NUM_THREADS=str(torch.get_num_threads()))
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, f"hydra.run.dir={run_dir}"]
    p = subprocess.run(cmd, cwd=ROOT, env=threads_env, capture_output=True, text=True, timeout=300,
                       preexec_fn=small_files)
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.splitlines() == [f"error: cannot write {run_dir / 'resume.pt'}: "
                                     f"[Errno {errno.EFBIG}] {os.strerror(errno.EFBIG)}"]
    assert load_checkpoint(layout.resume_path(run_dir))["iter_num"] == 0 and not list(run_dir.rglob(".*.tmp"))
    p = subprocess.run([*cmd, "train.resume=true"], cwd=ROOT, env=threads_env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = load_checkpoint(layout.history_path(run_dir, 30))["model"], \
        load_checkpoint(layout.history_path(uninterrupted, 30))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ the analysis keeps what it computed

def test_the_analysis_on_a_full_disk_keeps_the_finished_checkpoints(tmp_path, monkeypatch):
    from induction_dynamics.analysis.driver import analyze
    run_dir = tmp_path / "run"
    make_run(run_dir, seed=0)  # steps 0, 5, 10, 15
    fail_writes(monkeypatch, "step_000010.parquet", "write")
    with pytest.raises(WriteError) as e:
        analyze(cfg_for(run_dir, *FAST))
    assert one_line(e.value) == f"cannot write {layout.cache_path(run_dir, 10)}: {ENOSPC}"
    done = sorted(p.name for p in layout.cache_dir(run_dir).glob("step_*.parquet"))
    assert done == ["step_000000.parquet", "step_000005.parquet"]
    kept = {n: sha256_file(layout.cache_dir(run_dir) / n) for n in done}
    monkeypatch.undo()
    out = analyze(cfg_for(run_dir, *FAST))  # the next pass computes only what is missing
    assert sorted(out["results"][0].table["step"].unique()) == [0, 5, 10, 15]
    assert {n: sha256_file(layout.cache_dir(run_dir) / n) for n in done} == kept
