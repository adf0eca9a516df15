"""WandbLogger against the real wandb library, offline (records read back from the .wandb log)."""

import http.server
import json
import os
import socket
import subprocess
import sys
import threading

import pytest

SCRIPT = r"""
import sys, time
from induction_dynamics.wandb_logger import WandbLogger
t = time.time()
wb = WandbLogger(mode=sys.argv[1], project="p", group="grp", name="run-seed3", job_type="train",
                 config={"seed": 3, "model": {"n_layer": 2}}, dir=sys.argv[2])
print("MODE", wb.mode, round(time.time() - t, 1), flush=True)
for i in range(3):
    wb.log({"train/loss": 1.0 / (i + 1)}, step=10 * i)
wb.log({"val/loss": float("nan"), "bad": object()}, step=30)   # unloggable value: warned, not raised
wb.summary({"final/loss": 0.25})
wb.finish()
wb.finish()  # idempotent
wb.log({"train/loss": 0.0}, step=40)  # after finish: ignored
print("DONE", flush=True)
"""


def records(run_dir):
    out = subprocess.run(["wandb", "leet", "inspect", "--json", str(run_dir / "wandb")],
                         capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def init_seconds(stdout: str) -> float:
    """Seconds the WandbLogger constructor took (printed by SCRIPT as 'MODE offline 12.3')."""
    line = next(l for l in stdout.splitlines() if l.startswith("MODE "))
    assert line.split()[1] == "offline", line
    return float(line.split()[2])


def run_logger(tmp_path, mode, env_extra=None, timeout=60):
    env = {**os.environ, "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop("WANDB_MODE", None)  # the logger's own mode argument decides
    return subprocess.run([sys.executable, "-c", SCRIPT, mode, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_offline_run_records_read_back(tmp_path):
    p = run_logger(tmp_path, "offline")
    assert p.returncode == 0, p.stderr
    assert "MODE offline" in p.stdout and "DONE" in p.stdout
    assert p.stderr.count("W&B: log failed") == 1  # warned once, not raised
    recs = records(tmp_path)
    run = next(r["run"] for r in recs if r["type"] == "run")
    assert run["run_group"] == "grp" and run["display_name"] == "run-seed3" and run["job_type"] == "train"
    assert run["config"]["update"]["seed"] == 3
    hist = [r["history"]["item"] for r in recs if r["type"] == "history"]
    assert [(h["iter"], h["train/loss"]) for h in hist if "train/loss" in h] == [(0, 1.0), (10, 0.5), (20, 1 / 3)]
    metrics = [r["metric"] for r in recs if r["type"] == "metric"]
    assert any(m.get("glob_name") == "*" and m.get("step_metric") == "iter" for m in metrics)
    # every W&B file lives in the run dir
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_disabled_writes_nothing(tmp_path):
    p = run_logger(tmp_path, "disabled")
    assert p.returncode == 0, p.stderr
    assert "MODE disabled" in p.stdout
    assert not (tmp_path / "wandb").exists()


def test_online_without_network_falls_back_offline(tmp_path):
    """Server refuses connections (no network): one warning, offline run, well under 30 s."""
    env = {"WANDB_BASE_URL": "http://127.0.0.1:1", "WANDB_API_KEY": "a" * 40}
    p = run_logger(tmp_path, "online", env)
    assert p.returncode == 0, p.stderr
    assert init_seconds(p.stdout) < 30
    assert p.stderr.count("logging offline instead") == 1
    assert any(r["type"] == "history" for r in records(tmp_path))


@pytest.mark.slow  # wandb-core then lingers ~20 s at exit retrying telemetry
def test_online_server_silent_falls_back_quickly(tmp_path):
    """A server that accepts connections but never answers (a black hole): offline in seconds."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    try:
        env = {"WANDB_BASE_URL": f"http://127.0.0.1:{srv.getsockname()[1]}", "WANDB_API_KEY": "a" * 40}
        p = run_logger(tmp_path, "online", env, timeout=90)
    finally:
        srv.close()
    assert_fell_back_offline(p, tmp_path)


def assert_fell_back_offline(p, tmp_path):
    """The run finished, went offline within 30 s with one warning, and still logged history."""
    assert p.returncode == 0, p.stderr
    assert init_seconds(p.stdout) < 30, p.stdout
    assert p.stderr.count("logging offline instead") == 1
    assert any(r["type"] == "history" for r in records(tmp_path))


class _Unavailable(http.server.BaseHTTPRequestHandler):
    def _answer(self):
        self.send_response(503)
        self.end_headers()

    do_GET = do_POST = do_HEAD = _answer

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_online_server_erroring_falls_back_within_30s(tmp_path):
    """A server that answers 503 to everything: wandb.init's own timeout, then offline (< 30 s)."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        env = {"WANDB_BASE_URL": f"http://127.0.0.1:{srv.server_address[1]}", "WANDB_API_KEY": "a" * 40}
        p = run_logger(tmp_path, "online", env, timeout=120)
    finally:
        srv.shutdown()
    assert_fell_back_offline(p, tmp_path)
