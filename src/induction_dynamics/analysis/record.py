"""One analysed run's identity (``RunRecord``), from the sweep to ``analysis/run_info.json``. No torch here.

The record is made once, when a run is set up for analysis (``worker.prepare_run``), and is
what every later stage reads: the run's tables carry its label and seed, plots group runs by
its shape, the W&B analysis run takes its project, group and name from it, and
``plots_only=true`` reads it back from run_info.json.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from induction_dynamics.files import write_json
from induction_dynamics.untrusted import read_json_file


def shape_key(model_args: dict) -> str:
    """A short label of a model shape, e.g. ``L2H4D64T64V65`` (+ ``-attn`` for attention-only)."""
    key = "L{n_layer}H{n_head}D{n_embd}T{block_size}V{vocab_size}".format(**model_args)
    return key + ("-attn" if model_args.get("attn_only") else "")


@dataclass
class RunRecord:
    run: str                        # label: the run's path under the analysed folder (its name for one run)
    run_dir: str
    seed: int = -1                  # the training run's seed (its config), -1 when unknown
    shape: str = "unknown"          # shape_key of the model
    model_args: dict = field(default_factory=dict)
    max_iters: int | None = None    # the training run's last iteration (when a watch is done)
    metrics: list[str] = field(default_factory=list)     # suite ids analysed
    prompts: dict = field(default_factory=dict)          # what the prompts are (Prompts.info)
    train_wandb: dict = field(default_factory=dict)      # the training run's W&B project, group, name, mode

    def to_json(self) -> dict:
        return asdict(self)

    def write(self, path: str | Path) -> None:
        write_json(self.to_json(), path)

    @classmethod
    def read(cls, path: str | Path, run_dir: Path, label: str) -> RunRecord | None:
        """The record saved in run_info.json (None: none saved); its label is today's (the folder
        may have moved). A file written before the analysis inputs were called prompts has them
        under ``probes``. A file that is there but refused by ``untrusted.read_json_file`` (not
        JSON, over its size, values or depth bounds) is a one-line RefusedFileError: the record is
        written atomically, so such a file was put there by something else."""
        if not Path(path).is_file():
            return None
        saved = read_json_file(path, "run_info.json")
        if not isinstance(saved, dict) or not saved.get("run"):
            return None
        known = {k: saved[k] for k in cls.__dataclass_fields__ if k in saved}
        if "prompts" not in known and isinstance(saved.get("probes"), dict):
            known["prompts"] = saved["probes"]
        return cls(**{**known, "run": label, "run_dir": str(run_dir)})


class OfRun:
    """``run_dir`` and ``label`` of a dataclass that holds a ``record`` (a run being analysed, or its result)."""

    record: RunRecord

    @property
    def run_dir(self) -> Path:
        return Path(self.record.run_dir)

    @property
    def label(self) -> str:
        return self.record.run
