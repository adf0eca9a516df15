"""Configuration: composed defaults, the documented keys, and one-line errors for bad input."""

import re
import subprocess

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError
from train_helpers import TINY, compose_cfg, run_train

from induction_dynamics.checkpoint import save_atomic
from induction_dynamics.errors import ConfigError
from induction_dynamics.run_dir import resume_path
from induction_dynamics.training.config import (
    check_renamed_overrides,
    default_config,
    run_names,
    upgrade_saved_config,
    validate,
)
from induction_dynamics.training.loop import train

# the key names the issue fixes (documentation and users' scripts rely on them)
DOCUMENTED = ["seed", "model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "model.dropout",
              "model.bias", "model.attn_only", "data.name", "data.path", "data.cache_dir", "data.val_frac",
              "data.repeat_frac", "data.repeat_kind", "data.repeat_min", "data.repeat_max",
              "data.synthetic_vocab_size", "train.max_iters", "train.batch_size", "train.grad_accum",
              "train.eval_every", "train.eval_iters", "train.device", "train.compile", "train.resume", "optim.lr",
              "optim.min_lr", "optim.warmup_iters", "optim.lr_decay_iters", "optim.weight_decay", "optim.beta1",
              "optim.beta2", "optim.grad_clip", "checkpoint.every", "checkpoint.schedule", "monitor.every",
              "monitor.seq_len", "monitor.batch_size", "wandb.mode", "wandb.project", "wandb.group", "wandb.name"]


def test_default_config_is_small_cpu_model_on_shakespeare():
    cfg = compose_cfg()
    absent = object()
    assert [k for k in DOCUMENTED if OmegaConf.select(cfg, k, default=absent) is absent] == []
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (2, 4, 64, 64)
    assert cfg.data.name == "shakespeare" and cfg.wandb.mode == "offline" and cfg.monitor.enabled
    assert (cfg.train.batch_size, cfg.optim.lr) == (32, 1e-3)
    validate(cfg)


def test_baby_shakespeare_is_nanogpt_shakespeare_char():
    cfg = compose_cfg(["model=baby_shakespeare"])
    m, t, o = cfg.model, cfg.train, cfg.optim
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout, m.bias) == (6, 6, 384, 256, 0.2, False)
    assert (t.batch_size, t.max_iters, t.eval_every, t.eval_iters, t.grad_accum) == (64, 5000, 250, 200, 1)
    assert (o.lr, o.min_lr, o.warmup_iters, o.lr_decay_iters, o.beta2) == (1e-3, 1e-4, 100, 5000, 0.99)
    # a command-line value still wins over the group's recipe
    assert compose_cfg(["model=baby_shakespeare", "optim.lr=3e-4"]).optim.lr == 3e-4
    validate(cfg)


def test_experiment_and_groups_compose():
    cfg = compose_cfg(["experiment=synthetic_attn_only"])
    assert cfg.model.attn_only and cfg.data.name == "synthetic" and cfg.data.repeat_frac == 1.0
    validate(cfg)
    quick, text = compose_cfg(["experiment=quickstart"]), compose_cfg(["experiment=quickstart_text"])
    assert (text.data.repeat_kind, text.train.max_iters, text.wandb.group) == ("unigram", 6000, "quickstart_text")
    assert quick.data.repeat_kind == "random"
    # everything else is the quickstart's recipe
    for key in ("model", "optim", "checkpoint", "monitor"):
        assert text[key] == quick[key], key
    assert (text.data.repeat_frac, text.train.batch_size) == (quick.data.repeat_frac, quick.train.batch_size)
    validate(text)
    assert compose_cfg(["monitor=off"]).monitor.enabled is False
    assert compose_cfg(["wandb=disabled"]).wandb.mode == "disabled"


def test_typed_schema_rejects_typos_and_wrong_types():
    with pytest.raises(Exception) as e:
        compose_cfg(["model.n_layers=3"])
    assert isinstance(e.value.__cause__, ConfigKeyError) or "n_layers" in str(e.value)
    with pytest.raises(Exception) as e:
        compose_cfg(["model.n_layer=abc"])
    assert isinstance(e.value.__cause__, ValidationError) or "n_layer" in str(e.value)


BAD = {  # override -> words the one-line message must contain
    "model.n_embd=65": "not divisible",
    "train.eval_every=0": "train.eval_every must be positive",
    "checkpoint.every=-5": "checkpoint.every must be positive",
    "monitor.every=0": "monitor.every must be positive",
    "train.log_every=0": "train.log_every must be positive",
    "monitor.seq_len=40": "shorter than the monitor",
    "model.block_size=16": "shorter than the monitor",
    "optim.min_lr=1": "optim.min_lr",
    "data.repeat_frac=0.5 data.repeat_max=40": "does not fit",
}


@pytest.mark.parametrize("override", list(BAD))
def test_validate_rejects(override):
    cfg = compose_cfg(override.split())
    with pytest.raises(ConfigError, match=BAD[override]) as e:
        validate(cfg)
    assert "\n" not in str(e.value)


def assert_one_line_error(p, *words):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr
    for w in words:
        assert w in lines[0], lines[0]


CLI_BAD = [  # the list: each exits non-zero with one line, before any work
    (["model.n_embd=65", "model.n_head=4"], ["n_embd=65", "not divisible", "n_head=4"]),
    (["train.eval_every=0"], ["train.eval_every", "positive"]),
    (["checkpoint.every=0"], ["checkpoint.every", "positive"]),
    (["monitor.every=-1"], ["monitor.every", "positive"]),
    (["monitor.seq_len=40"], ["block_size=64", "monitor.seq_len"]),
    (["data=text_file", "data.path=/no/such/file.txt"], ["not found", "/no/such/file.txt"]),
    (["model=gpt5"], ["model/gpt5", "baby_shakespeare", "small"]),  # unknown group option
    (["experiment=nope"], ["experiment/nope"]),
    (["model.n_layers=3"], ["n_layers"]),  # unknown key (typo)
    (["train.max_iters=lots"], ["max_iters", "lots"]),  # wrong type
    # option strings are Enums: the allowed values come from options.py, in the message
    (["data.repeat_kind=bogus"], ["repeat_kind", "bogus", "random, passage, mixed, unigram"]),
    (["wandb.mode=sideways"], ["sideways", "online, offline, disabled"]),
    (["checkpoint.schedule=weekly"], ["weekly", "linear, log"]),
    # renamed keys: the old name points at the new one
    (["probe.every=50"], ["probe.every=50", "'monitor'", "use monitor.every=50"]),
    (["probe=off"], ["probe=off", "use monitor=off"]),
]


@pytest.mark.parametrize("args,words", CLI_BAD, ids=[" ".join(a) for a, _ in CLI_BAD])
def test_cli_bad_config_one_line(tmp_path, args, words):
    p = run_train([*args, f"hydra.run.dir={tmp_path / 'run'}"], timeout=120)
    assert_one_line_error(p, *words)
    assert not (tmp_path / "run" / "checkpoints").exists()  # no work done


def test_cli_refuses_malicious_resume_file_without_running_it(tmp_path):
    """A resume.pt carrying a pickle payload: one-line refusal, the payload never runs."""
    run_dir = tmp_path / "run"
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (subprocess.call, (["touch", str(marker)],))

    save_atomic({"model": {}, "optimizer": Payload()}, resume_path(run_dir))
    p = run_train([*TINY, "train.resume=true", f"hydra.run.dir={run_dir}"], timeout=120)
    assert_one_line_error(p, "cannot read checkpoint", "resume.pt")
    assert not marker.exists()
    # the same file through the pure function
    with pytest.raises(Exception, match="cannot read checkpoint"):
        train(compose_cfg(TINY + ["train.resume=true"]), run_dir=run_dir)
    assert not marker.exists()


def test_renamed_keys_on_the_command_line_and_in_saved_configs():
    for arg, new in [("probe.seq_len=8", "monitor.seq_len=8"), ("+probe.x=1", "+monitor.x=1"),
                     ("probe=off", "monitor=off"), ("probe.every=5,10", "monitor.every=5,10")]:
        with pytest.raises(ConfigError, match=f"use {re.escape(new)}$"):
            check_renamed_overrides(["-m", "seed=0", arg])
    check_renamed_overrides(["monitor.every=5", "monitor=off", "--cfg", "job", "hydra.job.name=probe"])

    old = {"seed": 0, "probe": {"enabled": True, "every": 7}, "wandb": {"mode": "offline"}}
    new = upgrade_saved_config(old)
    assert list(new) == ["seed", "monitor", "wandb"] and new["monitor"] == {"enabled": True, "every": 7}
    assert "probe" in old  # the caller's dict is left as it was
    assert upgrade_saved_config(new) == new
    assert upgrade_saved_config({"probe": {"every": 1}, "monitor": {"every": 2}}) == {"monitor": {"every": 2}}
    merged = OmegaConf.merge(default_config(), new)  # the schema takes the mapped config
    assert merged.monitor.every == 7


def test_run_names_carry_the_seed_and_the_group():
    cfg = compose_cfg(["seed=3"])
    assert run_names(cfg) == ("train-shakespeare", "train-shakespeare-seed3")
    assert run_names(cfg, experiment="quickstart") == ("quickstart", "quickstart-seed3")
    assert run_names(cfg, sweep="2025-01-01_12-00-00")[0] == "sweep-2025-01-01_12-00-00"
    cfg = compose_cfg(["seed=3", "wandb.group=g", "wandb.name=mine"])
    assert run_names(cfg, experiment="quickstart") == ("g", "mine-seed3")


def test_existing_run_dir_is_not_overwritten(tmp_path):
    cfg = compose_cfg(TINY + ["train.max_iters=2"])
    train(cfg, run_dir=tmp_path)
    before = (tmp_path / "checkpoints" / "step_000002.pt").read_bytes()
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(cfg, run_dir=tmp_path)
    assert (tmp_path / "checkpoints" / "step_000002.pt").read_bytes() == before


def test_model_config_is_gptconfig_with_cpu_defaults():
    """One declaration of the model's fields: the Hydra schema extends nanoGPT's GPTConfig."""
    from dataclasses import fields

    from induction_dynamics.model import GPTConfig
    from induction_dynamics.training.config import ModelConfig

    assert issubclass(ModelConfig, GPTConfig)
    assert [f.name for f in fields(ModelConfig)] == [f.name for f in fields(GPTConfig)]
    assert set(compose_cfg([]).model) == {f.name for f in fields(GPTConfig)}
