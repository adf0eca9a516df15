"""Structured configs for ``train.py`` (Hydra ConfigStore) and their validation.

The dataclasses give every key a type and a default; ``conf/config.yaml`` composes them
with the YAML groups under ``conf/`` (``model/``, ``data/``, ``optim/``, ``checkpoint/``,
``monitor/``, ``wandb/``, ``experiment/``). A typo in a key or a value of the wrong type is
rejected by OmegaConf when the config is composed (option strings are the Enums of
``options.py``, so a bad value is rejected there too); ``validate`` then checks what types
cannot (divisibility, positive intervals, monitor vs block size, data file present) and
raises ``ConfigError`` with a one-line message *before* any work starts.

Key names follow nanoGPT's ``train.py`` where one exists (``n_layer``, ``block_size``,
``max_iters``, ``eval_iters``, ``warmup_iters``, ``lr_decay_iters``, ``min_lr``, ``grad_clip``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from induction_dynamics.errors import ConfigError
from induction_dynamics.gpt_config import GPTConfig
from induction_dynamics.options import (
    CheckpointSchedule,
    DataName,
    RepeatKind,
    Tokenizer,
    WandbMode,
)


@dataclass
class ModelConfig(GPTConfig):
    """``model.GPTConfig``'s fields, with this project's CPU-sized defaults (the fields are
    declared once, there). vocab_size None: the data's; larger pads the embedding (nanoGPT
    rounds GPT-2's 50257 up to 50304)."""
    block_size: int = 64
    vocab_size: Optional[int] = None
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    bias: bool = False  # nanoGPT train.py's default: a bit better and faster


@dataclass
class DataConfig:
    name: DataName = DataName.shakespeare
    path: Optional[str] = None  # data=text_file: a UTF-8 text file
    dir: Optional[str] = None  # data=nanogpt: a folder with nanoGPT's train.bin, val.bin (and meta.pkl)
    tokenizer: Tokenizer = Tokenizer.char
    vocab_size: Optional[int] = None  # tokenizer=bpe: number of BPE tokens (e.g. 512 - 4096)
    cache_dir: Optional[str] = None  # token-array cache; None: $INDUCTION_DYNAMICS_CACHE or ~/.cache
    val_frac: float = 0.1
    # repeat curriculum (curriculum.insert_repeats): a fraction of training windows carry a repeat
    repeat_frac: float = 0.0
    repeat_kind: RepeatKind = RepeatKind.random
    repeat_min: int = 10
    repeat_max: int = 26
    synthetic_vocab_size: int = 26
    synthetic_tokens: int = 200_000


@dataclass
class TrainConfig:
    max_iters: int = 3000
    batch_size: int = 32  # sequences per micro-step (the global batch, before any DDP split)
    grad_accum: int = 1  # micro-steps per optimizer step
    eval_every: int = 250
    eval_iters: int = 20  # batches per split at each evaluation
    log_every: int = 10
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: bool = False  # torch.compile the model (checkpoints still hold plain names)
    resume: bool = False  # continue from <run dir>/resume.pt
    progress: bool = True  # tqdm bar with loss and tokens/s


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: Optional[int] = None  # None: max_iters (nanoGPT sets them equal)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class CheckpointConfig:
    every: int = 250
    schedule: CheckpointSchedule = CheckpointSchedule.log


@dataclass
class MonitorConfig:
    enabled: bool = True
    every: int = 100
    seq_len: int = 20  # length of each half of [x, x]; 2*seq_len must fit the block
    batch_size: int = 16
    seed: int = 1234  # the monitor's tokens are fixed for the whole run (and across seeds)


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.offline
    project: str = "induction-dynamics"
    group: Optional[str] = None  # None: the experiment or sweep name
    name: Optional[str] = None  # None: <group>-seed<seed>; the seed is always in the name


@dataclass
class Config:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def register_configs() -> None:
    """Make ``base_config`` (the schema that conf/config.yaml extends) known to Hydra."""
    ConfigStore.instance().store(name="base_config", node=Config)


register_configs()


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: DictConfig | Any) -> None:
    """Raise ConfigError (one line) for the first invalid value; cheap, touches no data."""
    m, d, t, o, c, mon = cfg.model, cfg.data, cfg.train, cfg.optim, cfg.checkpoint, cfg.monitor
    _need(m.n_layer >= 1 and m.n_head >= 1 and m.n_embd >= 1,
          f"model.n_layer, model.n_head and model.n_embd must be positive, got {m.n_layer}, {m.n_head}, {m.n_embd}")
    _need(m.n_embd % m.n_head == 0,
          f"model.n_embd={m.n_embd} is not divisible by model.n_head={m.n_head}")
    _need(m.block_size >= 2, f"model.block_size must be at least 2, got {m.block_size}")
    _need(0.0 <= m.dropout < 1.0, f"model.dropout must lie in [0, 1), got {m.dropout}")

    if d.name == "text_file":
        _need(bool(d.path), "data=text_file needs data.path=<a UTF-8 text file>")
        _need(Path(d.path).expanduser().is_file(), f"data file not found: data.path={d.path}")
    if d.name == "nanogpt":
        _need(bool(d.dir) and Path(d.dir).expanduser().is_dir(),
              f"data=nanogpt needs data.dir=<folder with train.bin and val.bin>, got {d.dir}")
    if d.tokenizer == "bpe":
        _need(d.name not in ("nanogpt", "synthetic"), f"data.tokenizer=bpe tokenizes text; data={d.name} is tokens")
        _need(d.vocab_size is not None and 257 <= d.vocab_size <= 65535,
              f"data.tokenizer=bpe needs 257 <= data.vocab_size <= 65535, got {d.vocab_size}")
    _need(m.vocab_size is None or m.vocab_size > 0, f"model.vocab_size must be positive, got {m.vocab_size}")
    _need(0.0 < d.val_frac < 1.0, f"data.val_frac must lie strictly between 0 and 1, got {d.val_frac}")
    _need(0.0 <= d.repeat_frac <= 1.0, f"data.repeat_frac must lie in [0, 1], got {d.repeat_frac}")
    if d.repeat_frac > 0:
        _need(1 <= d.repeat_min <= d.repeat_max,
              f"data.repeat_min/repeat_max need 1 <= min <= max, got {d.repeat_min}, {d.repeat_max}")
        _need(2 * d.repeat_max <= m.block_size + 1,
              f"data.repeat_max={d.repeat_max} twice does not fit model.block_size={m.block_size} + 1")

    for key, value in (("train.max_iters", t.max_iters), ("train.batch_size", t.batch_size),
                       ("train.grad_accum", t.grad_accum), ("train.eval_every", t.eval_every),
                       ("train.eval_iters", t.eval_iters), ("train.log_every", t.log_every),
                       ("checkpoint.every", c.every), ("monitor.every", mon.every),
                       ("monitor.seq_len", mon.seq_len), ("monitor.batch_size", mon.batch_size)):
        _need(value > 0, f"{key} must be positive, got {value}")
    _need(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
          f"train.device={t.device!r} must be auto, cpu or cuda")

    _need(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
    _need(0 <= o.min_lr <= o.lr, f"optim.min_lr must lie in [0, optim.lr={o.lr}], got {o.min_lr}")
    _need(o.warmup_iters >= 0, f"optim.warmup_iters must be non-negative, got {o.warmup_iters}")
    if o.lr_decay_iters is not None:
        _need(o.lr_decay_iters > o.warmup_iters,
              f"optim.lr_decay_iters={o.lr_decay_iters} must exceed optim.warmup_iters={o.warmup_iters}")
    _need(o.weight_decay >= 0, f"optim.weight_decay must be non-negative, got {o.weight_decay}")
    _need(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, f"optim.beta1/beta2 must lie in [0, 1), got {o.beta1}, {o.beta2}")
    _need(o.grad_clip >= 0, f"optim.grad_clip must be non-negative (0 disables it), got {o.grad_clip}")

    _need(mon.seq_len >= 2, f"monitor.seq_len must be at least 2, got {mon.seq_len}")
    _need(2 * mon.seq_len <= m.block_size,
          f"model.block_size={m.block_size} is shorter than the monitor's repeated sequence "
          f"(2 * monitor.seq_len = {2 * mon.seq_len}); lower monitor.seq_len or raise model.block_size")


def validate_tokens(cfg, n_allowed: int, data_vocab_size: int | None = None) -> None:
    """Checks that need the vocabulary: distinct tokens for the monitor and for random repeats,
    and a model.vocab_size (if set) that holds the data's vocabulary."""
    if data_vocab_size is not None and cfg.model.vocab_size is not None:
        _need(cfg.model.vocab_size >= data_vocab_size,
              f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's {data_vocab_size} tokens")
    if cfg.monitor.enabled:
        _need(cfg.monitor.seq_len <= n_allowed,
              f"monitor.seq_len={cfg.monitor.seq_len} exceeds the {n_allowed} distinct repeat tokens of this vocabulary")
    d = cfg.data
    if d.repeat_frac > 0 and d.repeat_kind in ("random", "mixed"):
        _need(d.repeat_max <= n_allowed,
              f"data.repeat_max={d.repeat_max} exceeds the {n_allowed} distinct tokens random repeats draw from")


# Top-level keys renamed since runs were first written (old -> new): the live induction probe
# became the monitor, so that "probe" is not read as a linear probe. A saved run's config is
# mapped on reading (``upgrade_saved_config``); the command line gets a one-line pointer.
RENAMED_KEYS = {"probe": "monitor"}


def upgrade_saved_config(saved: dict) -> dict:
    """A saved run's config (resume.pt, a checkpoint's ``config``, config.yaml) with today's key
    names, so that runs written before a rename still resume and analyse. A copy; order kept."""
    out = {}
    for key, value in saved.items():
        new = RENAMED_KEYS.get(key)
        if new is None:
            out[key] = value
        elif new not in saved:  # holding both, the new key wins
            out[new] = value
    return out


def check_renamed_overrides(args) -> None:
    """Raise ConfigError naming the new key for a command-line override of a renamed key
    (``probe.every=50`` -> ``monitor.every=50``, ``probe=off`` -> ``monitor=off``); Hydra alone
    would report an unknown key or group without saying what it is called now."""
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        prefix = arg[:len(arg) - len(arg.lstrip("+~"))]  # +key=, ++key=, ~key=
        key, value = arg[len(prefix):].split("=", 1)
        head, sep, rest = key.partition(".")
        if head in RENAMED_KEYS:
            new = f"{prefix}{RENAMED_KEYS[head]}{sep}{rest}={value}"
            raise ConfigError(f"{arg}: '{head}' is now called '{RENAMED_KEYS[head]}'; use {new}")


def run_names(cfg, experiment: str | None = None, sweep: str | None = None) -> tuple[str, str]:
    """W&B (group, name). group: wandb.group, else the experiment, else the sweep, else
    ``train-<data>``, so that the seeds of one experiment or sweep overlay in one group;
    name: wandb.name (else the group) with ``-seed<seed>`` appended unless already in it."""
    group = cfg.wandb.group or experiment or (f"sweep-{sweep}" if sweep else None) or f"train-{cfg.data.name}"
    name = cfg.wandb.name or group
    if f"seed{cfg.seed}" not in name:
        name = f"{name}-seed{cfg.seed}"
    return group, name


def to_plain(cfg) -> dict:
    """The resolved config as a plain dict (what checkpoints and W&B store)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True, enum_to_str=True)


def default_config() -> DictConfig:
    """The schema's defaults as a typed DictConfig (struct mode: unknown keys are rejected)."""
    return OmegaConf.structured(Config)
