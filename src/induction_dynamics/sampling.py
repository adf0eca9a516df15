"""``sample(cfg)``: the pure function behind ``sample.py`` (nanoGPT's sample.py, from any checkpoint).

The structured config below types ``conf/sample.yaml``; its keys and defaults are
nanoGPT's sample.py's (``start``, ``num_samples``, ``max_new_tokens``, ``temperature``,
``top_k``, ``seed``, ``device``) with ``checkpoint`` naming the file, or a run directory
(then ``step`` picks one of its history checkpoints; null: the last). The prompt is
encoded and the samples decoded with the checkpoint's own vocabulary (``data.vocab.Vocab``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore

from induction_dynamics.errors import CheckpointError, ConfigError, DataError
from induction_dynamics.run_dir import history_path, list_checkpoints


@dataclass
class SampleConfig:
    checkpoint: str = "???"          # a history checkpoint (.pt) or a run dir (with checkpoints/)
    step: Optional[int] = None       # with a run dir: the checkpoint of this step; null: the last
    start: str = "\n"                # the prompt; "FILE:prompt.txt" reads it from a file
    num_samples: int = 10
    max_new_tokens: int = 500
    temperature: float = 0.8         # 1.0: the model's distribution; < 1 sharper, > 1 flatter
    top_k: Optional[int] = 200       # keep the k likeliest tokens; null: all
    seed: int = 1337
    device: str = "cpu"              # cpu | cuda | cuda:N | auto


ConfigStore.instance().store(name="sample_schema", node=SampleConfig)


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg) -> None:
    """One-line ConfigError for a value that cannot be sampled with (before torch is imported)."""
    _need(bool(str(cfg.checkpoint).strip()) and cfg.checkpoint != "???",
          "checkpoint is required: python sample.py checkpoint=<run dir or .pt file>")
    _need(cfg.num_samples >= 1, f"num_samples must be positive, got {cfg.num_samples}")
    _need(cfg.max_new_tokens >= 0, f"max_new_tokens must be non-negative, got {cfg.max_new_tokens}")
    _need(cfg.temperature > 0, f"temperature must be positive, got {cfg.temperature}")
    _need(cfg.top_k is None or cfg.top_k >= 1, f"top_k must be positive or null, got {cfg.top_k}")
    _need(cfg.device in ("auto", "cpu") or str(cfg.device).startswith("cuda"),
          f"device={cfg.device!r} must be auto, cpu or cuda")


def read_prompt(start: str) -> str:
    """``start`` itself, or the text of the file it names as ``FILE:<path>`` (nanoGPT's convention)."""
    if not start.startswith("FILE:"):
        return start
    path = Path(start[len("FILE:"):]).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"start=FILE:{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"start=FILE:{path}: cannot read it as UTF-8 text ({type(e).__name__})") from None


def checkpoint_file(checkpoint: str, step: int | None = None) -> Path:
    """The checkpoint file named by ``checkpoint`` (a file, or a run dir and ``step``)."""
    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        _need(step is None, f"step={step} needs checkpoint=<run dir>, got the file {path}")
        return path  # load_checkpoint says so when it does not exist
    history = list_checkpoints(path)
    if not history:
        raise CheckpointError(f"no history checkpoints in {path / 'checkpoints'}")
    if step is None:
        return history[-1][1]
    if step not in dict(history):
        shown = ", ".join(str(s) for s, _ in history[:8]) + (", ..." if len(history) > 8 else "")
        raise CheckpointError(f"no checkpoint at step {step} in {path} (steps: {shown})")
    return history_path(path, step)


def sample(cfg) -> list[str]:
    """``cfg.num_samples`` texts, each the prompt followed by ``cfg.max_new_tokens`` generated tokens."""
    validate(cfg)
    prompt = read_prompt(cfg.start)
    _need(len(prompt) > 0, "start is empty: the model needs at least one token to continue")
    import torch  # here, not at the top: a bad config is reported before torch loads

    from induction_dynamics.checkpoint import load_checkpoint, model_from_checkpoint
    from induction_dynamics.data.vocab import Vocab

    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device.replace("auto", "cpu")
    _need(device == "cpu" or torch.cuda.is_available(), f"device={device} but CUDA is not available here; use device=cpu")
    ckpt = load_checkpoint(checkpoint_file(cfg.checkpoint, cfg.step), map_location=device)
    vocab = Vocab.from_checkpoint(ckpt)
    try:
        ids = torch.tensor(vocab.encode(prompt), dtype=torch.long, device=device)  # (T0,)
    except DataError as e:
        raise DataError(f"start: {e}") from None
    model = model_from_checkpoint(ckpt, device)
    torch.manual_seed(cfg.seed)
    if device.startswith("cuda"):
        torch.cuda.manual_seed(cfg.seed)
    # all samples in one batch: one forward per new token (B = num_samples)
    out = model.generate(ids.repeat(cfg.num_samples, 1), cfg.max_new_tokens, temperature=cfg.temperature,
                         top_k=cfg.top_k)  # (num_samples, T0 + max_new_tokens)
    return [vocab.decode(row) for row in out]
