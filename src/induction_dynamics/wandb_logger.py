"""Weights & Biases, wrapped so that it can never stop training or analysis.

    wb = WandbLogger(mode="offline", project="induction-dynamics", group="default",
                     name="seed0", job_type="train", config=cfg_dict, dir=run_dir)
    wb.log({"train/loss": 2.1}, step=100)     # every record carries "iter": 100
    wb.finish()

- ``mode``: ``offline`` (default in the configs: no account, no network), ``online`` or
  ``disabled``. All files go under ``<dir>/wandb/`` (the run directory).
- Every key is plotted against the step metric (``iter``, the training iteration) through
  ``define_metric("*", step_metric="iter")``, so runs whose logging cadences differ
  (train/, val/, monitor/, analysis/) still line up on one x-axis.
- ``online`` that cannot reach the server (no network, no API key) warns once and falls
  back to ``offline``: a quick HTTP check (5 s) catches a missing network, and
  ``Settings(init_timeout=10)`` (+ W&B's own 10 s grace) bounds a server that answers but
  cannot start the run. The offline run can be uploaded later with ``wandb sync``.
- Any exception inside W&B is caught and warned about once per method; ``run`` is None
  when W&B is disabled or could not start at all.
- ``state_file`` (e.g. ``<run_dir>/wandb/train_run.json``) makes the run survive restarts: it keeps
  the W&B run id (``wandb.init(id=..., resume="allow")``, so a resumed training or a second
  analysis of the same run directory continues the same W&B run) and, per stream of records,
  the last step logged. A resumed training replays the iterations since its last resume
  point; their records were logged before, so ``log`` skips every step at or below its
  stream's last one. W&B buffers its transaction log (32 KiB blocks): a process killed with
  ``kill -9`` can leave none of its records on disk. So every record also goes to a journal
  next to the state file (``*.journal.jsonl``, appended per record), and a restarted run
  reads what the earlier segments' logs really hold (``wandb leet inspect --json``) and logs
  the journal's records they lack before going on: each step once, none missing.

``import wandb`` happens in this module only (it is slow to import and optional at run time).
"""

from __future__ import annotations

import json
import logging
import secrets
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

from induction_dynamics.errors import one_line
from induction_dynamics.files import append_text, read_json, write_json
from induction_dynamics.options import WandbMode

log = logging.getLogger(__name__)

MODES = WandbMode.values()
INIT_TIMEOUT_S = 10.0  # W&B adds a ~10 s grace period on top of this: ~20 s worst case
REACH_TIMEOUT_S = 5.0  # the quick HTTP check that skips that wait when the server cannot answer


def _server_reachable(base_url: str, timeout: float = REACH_TIMEOUT_S) -> tuple[bool, str]:
    """Does the W&B server answer HTTP at all within ``timeout``? (any status code counts).

    Catches the common offline cases in seconds (no DNS, connection refused, a firewall that
    drops packets, a server that accepts but never answers) instead of waiting for
    wandb.init's timeout. Runs in a daemon thread because a hanging DNS resolver ignores
    socket timeouts. urllib honours HTTP(S)_PROXY like wandb does.
    """
    result: list[tuple[bool, str]] = []

    def reach():
        try:
            urllib.request.urlopen(urllib.request.Request(base_url, method="HEAD"), timeout=timeout).close()
            result.append((True, ""))
        except urllib.error.HTTPError:  # the server answered (401, 404, ...): it is there
            result.append((True, ""))
        except Exception as e:  # URLError, timeout, ValueError for a malformed URL
            result.append((False, f"{base_url}: {getattr(e, 'reason', e)}"))

    t = threading.Thread(target=reach, daemon=True)
    t.start()
    t.join(timeout + 1.0)
    return result[0] if result else (False, f"{base_url}: no answer within {timeout:.0f} s")


class WandbLogger:
    """A W&B run that never raises (see module docstring)."""

    def __init__(self, *, mode: str, project: str, group: str | None, name: str, job_type: str,
                 config: dict, dir: str | Path, step_metric: str = "iter", state_file: str | Path | None = None):
        self.run = None
        self.mode = "disabled"  # the mode actually in use, after any fallback
        self.step_metric = step_metric
        self.dir = Path(dir)
        self._warned: set[str] = set()
        self.state_file = Path(state_file) if state_file is not None else None
        self.state = {"id": None, "last_step": {}}
        if mode == "disabled":
            return
        if mode not in MODES:
            self._warn("mode", f"W&B: unknown wandb.mode {mode!r} (expected one of {MODES}); W&B disabled")
            return
        try:
            import wandb
        except Exception as e:  # not installed or broken install: train without it
            self._warn("import", f"W&B: cannot import wandb ({e}); W&B disabled")
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a read-only or full run directory: train without W&B
            self._warn("dir", f"W&B: cannot write {self.dir} ({one_line(e)}); W&B disabled")
            return
        kwargs = dict(project=project, group=group, name=name, job_type=job_type,
                      config=config, dir=str(self.dir))
        if self.state_file is not None:
            saved = read_json(self.state_file, {})
            saved = saved if isinstance(saved, dict) else {}
            if isinstance(saved.get("id"), str):
                self.state = {"id": saved["id"], "last_step": dict(saved.get("last_step") or {})}
            else:  # W&B's own id alphabet: lowercase letters and digits; saved before the run starts
                self.state["id"] = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))
            kwargs.update(id=self.state["id"], resume="allow")
            self.journal = self.state_file.with_name(self.state_file.stem + ".journal.jsonl")
            if saved.get("id") != self.state["id"]:
                self.journal.unlink(missing_ok=True)  # a new W&B run: nothing of another run to recover
            # a segment that ended with finish() left every record on disk: nothing to recover
            self._recover = saved.get("id") == self.state["id"] and not saved.get("finished", False)
            self.state["finished"] = False
            self._save_state()
        if mode == "online":
            self.run = self._init_online(wandb, kwargs)
            if self.run is not None:
                self.mode = "online"
        if self.run is None:
            try:
                self.run = wandb.init(mode="offline", **kwargs, settings=wandb.Settings(reinit="create_new"))
                self.mode = "offline"
            except Exception as e:
                self._warn("init", f"W&B: could not start an offline run ({one_line(e)}); W&B disabled")
                return
        try:
            self.run.define_metric(step_metric)
            self.run.define_metric("*", step_metric=step_metric)
        except Exception as e:
            self._warn("define_metric", f"W&B: define_metric failed ({one_line(e)})")
        if self.state_file is not None and self._recover:
            self._recover_lost_records()

    def _recover_lost_records(self) -> None:
        """Log again the journal's records that no earlier segment of this run holds on disk."""
        entries = _read_journal(self.journal)
        if not entries:
            return
        current = Path(self.run.dir).parent
        segments = [d for d in sorted((self.dir / "wandb").glob(f"*run-*-{self.state['id']}"))
                    if d.is_dir() and d.resolve() != current.resolve() and any(d.glob("*.wandb"))]
        held: set[tuple[int, str]] = set()
        for seg in segments:
            try:
                out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(seg)],
                                     capture_output=True, text=True, timeout=120, check=True).stdout
            except Exception as e:  # cannot tell what is on disk: log nothing twice, warn
                self._warn("recover", f"W&B: cannot read {seg} ({one_line(e)}); records lost there stay lost")
                return
            for line in out.splitlines():
                rec = json.loads(line) if line.strip() else {}
                item = (rec.get("history") or {}).get("item") or {} if rec.get("type") == "history" else {}
                if self.step_metric in item:
                    held |= {(int(item[self.step_metric]), k) for k in item}
        lost = [e for e in entries if (e["step"], next(iter(e["record"]))) not in held]
        for e in lost:
            self.run.log({**e["record"], self.step_metric: e["step"]})
        if lost:
            log.info("W&B: logged again %d record(s) of run %s that the killed process had not written",
                     len(lost), self.state["id"])

    def _init_online(self, wandb, kwargs):
        """An online run, or None (after one warning) when the server cannot be reached."""
        try:
            base_url = wandb.setup().settings.base_url  # env (WANDB_BASE_URL) and settings files applied
        except Exception:
            base_url = "https://api.wandb.ai"
        ok, why = _server_reachable(base_url)
        if not ok:
            self._warn("online", f"W&B: cannot reach {why}; logging offline instead "
                                 f"(upload later with `wandb sync {self.dir / 'wandb'}`)")
            return None
        try:
            settings = wandb.Settings(init_timeout=INIT_TIMEOUT_S, reinit="create_new")
            return wandb.init(mode="online", **kwargs, settings=settings)
        except Exception as e:  # UsageError (no API key), CommError (timeout), ...
            self._warn("online", f"W&B: online run failed to start ({one_line(e)}); logging offline "
                                 f"instead (upload later with `wandb sync {self.dir / 'wandb'}`)")
            return None

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else self.state["id"]

    def log(self, metrics: dict, step: int, stream: str = "default") -> bool:
        """Log ``metrics`` with ``{step_metric: step}`` in the same record; False when skipped
        (no run, or ``stream`` already holds this step: see ``state_file``)."""
        if self.run is None or step <= self.state["last_step"].get(stream, -1):
            return False
        try:
            self.run.log({**metrics, self.step_metric: step})
        except Exception as e:
            self._warn("log", f"W&B: log failed ({one_line(e)}); training goes on")
            return False
        if self.state_file is not None:
            try:  # one line per record, whole or not at all (a full disk: a warning, training goes on)
                append_text(self.journal, json.dumps({"stream": stream, "step": step, "record": metrics},
                                                     default=float) + "\n")
            except OSError as e:
                self._warn("journal", f"W&B: {one_line(e)}; records a killed process had not flushed may be lost")
            self.state["last_step"][stream] = step
            self._save_state()
        return True

    def _save_state(self) -> None:
        # after each log, without fsync: a killed process leaves it behind intact, and the
        # microseconds between the record and this rename are the only window for a duplicate
        try:
            write_json(self.state, self.state_file, durable=False)
        except OSError as e:
            self._warn("state", f"W&B: {one_line(e)}")

    def last_step(self, stream: str = "default") -> int:
        """The last step logged to ``stream`` by this W&B run, over every restart (-1: none)."""
        return self.state["last_step"].get(stream, -1)

    def summary(self, values: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update(values)
        except Exception as e:
            self._warn("summary", f"W&B: summary update failed ({one_line(e)})")

    def log_image(self, key: str, path: str | Path, step: int | None = None) -> None:
        if self.run is None:
            return
        try:
            import wandb
            record = {key: wandb.Image(str(path))}
            if step is not None:
                record[self.step_metric] = step
            self.run.log(record)
        except Exception as e:
            self._warn("log_image", f"W&B: log_image failed ({one_line(e)})")

    def log_table(self, key: str, df) -> None:
        """Log a pandas DataFrame as a W&B Table."""
        if self.run is None:
            return
        try:
            import wandb
            self.run.log({key: wandb.Table(dataframe=df)})
        except Exception as e:
            self._warn("log_table", f"W&B: log_table failed ({one_line(e)})")

    def finish(self) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            run.finish()
        except Exception as e:
            self._warn("finish", f"W&B: finish failed ({one_line(e)})")
            return
        if self.state_file is not None:
            self.state["finished"] = True
            self._save_state()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.finish()
        return False


def _read_journal(path: Path) -> list[dict]:
    """The journal's complete lines (a line cut short by a kill is dropped)."""
    entries = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return entries
    for line in lines:
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and isinstance(e.get("record"), dict) and e["record"]:
            entries.append(e)
    return entries
