"""Tokenized data: byte-level BPE, nanoGPT's .bin folders, the standard-library corpus, any vocabulary
in the analysis, and a meta.pkl that must never run code."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from analysis_helpers import FAST_WINDOWS, run_entry
from hydra import compose, initialize_config_dir
from train_helpers import CONF, TINY, compose_cfg

import induction_dynamics.analysis.config  # noqa: F401  (registers the schema)
from induction_dynamics.analysis.driver import analyze
from induction_dynamics.checkpoint import load_checkpoint, save_atomic
from induction_dynamics.data import load_data, python_code, shakespeare_text
from induction_dynamics.data.tokenizer import tokenizer_from_checkpoint, train_bpe
from induction_dynamics.data.tokens import chunks as _chunks
from induction_dynamics.errors import (
    AnalysisError,
    ConfigError,
    DataError,
    TokenizerError,
)
from induction_dynamics.run_dir import history_path, list_checkpoints
from induction_dynamics.training.loop import train

TEXT = shakespeare_text()[:120_000]
# the tiny trainer run, on real data instead of synthetic tokens
NANO = [o for o in TINY if not o.startswith("data")] + ["data=nanogpt", "train.max_iters=20"]


def analyse(run_dir, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("analyze", overrides=[f"run_dir={run_dir}", "analysis/suite=fast", "wandb.mode=disabled",
                                            "plots.formats=[png]", *overrides])
    return analyze(cfg)


def write_nanogpt_char(folder: Path, text: str = TEXT) -> dict:
    """data/shakespeare_char/prepare.py, line for line (the text is ours: no download)."""
    folder.mkdir(parents=True)
    chars = sorted(list(set(text)))
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    n = len(text)
    train_ids = np.array([stoi[c] for c in text[:int(n * 0.9)]], dtype=np.uint16)
    val_ids = np.array([stoi[c] for c in text[int(n * 0.9):]], dtype=np.uint16)
    train_ids.tofile(folder / "train.bin")
    val_ids.tofile(folder / "val.bin")
    meta = {"vocab_size": len(chars), "itos": itos, "stoi": stoi}
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    return meta


def write_nanogpt_bpe(folder: Path, text: str = TEXT) -> np.ndarray:
    """data/shakespeare/prepare.py: uint16 token ids in train.bin / val.bin and no meta.pkl.
    Its GPT-2 merges are a download, so the ids come from a local BPE (all < 50,257 too)."""
    folder.mkdir(parents=True)
    tok = train_bpe(_chunks(text), 600)
    n = len(text)
    ids = [np.array(tok.encode(part), dtype=np.uint16) for part in (text[:int(n * 0.9)], text[int(n * 0.9):])]
    ids[0].tofile(folder / "train.bin")
    ids[1].tofile(folder / "val.bin")
    return ids[0]


# ----------------------------------------------------------------------------- BPE

def test_bpe_round_trip_on_the_validation_text_trained_on_train_only(tmp_path):
    data = load_data("python_code", tokenizer="bpe", vocab_size=512, cache_dir=tmp_path)
    corpus = python_code.load_corpus(0.1)
    assert data.vocab_size == 512 and data.tokenizer.kind == "bpe"
    assert data.decode(data.val) == corpus.val_text  # encode -> decode is the identity
    assert data.decode(data.train[:5000]) == corpus.train_text[:len(data.decode(data.train[:5000]))]
    # the merges come from the training split alone: retraining on it gives the same tokenizer
    assert train_bpe(_chunks(corpus.train_text), 512).json == data.tokenizer.json
    assert len(data.train) < 0.5 * len(corpus.train_text)  # merges do compress (code: ~2.7 chars/token)
    # cached next to the token files, fingerprinted in meta.json and in the data's provenance
    folder = next(tmp_path.glob("python_code-*-bpe512"))
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["tokenizer"] == "bpe" and (folder / "tokenizer.json").read_text() == data.tokenizer.json
    assert data.source["tokenizer_sha256"] == data.tokenizer.fingerprint
    assert data.source["source_sha256"] == corpus.fingerprint == meta["source_sha256"]
    again = load_data("python_code", tokenizer="bpe", vocab_size=512, cache_dir=tmp_path)
    assert torch.equal(again.train, data.train) and again.tokenizer.fingerprint == data.tokenizer.fingerprint


def test_bpe_round_trip_on_any_unicode_and_labels(tmp_path):
    f = tmp_path / "t.txt"
    body = "naïve café — 東京 🙂\r\n\ttabs  and   spaces\n" * 200
    f.write_text(body + "def f(x):\n    return x  # ünïcode in the val split: 🐍\n" * 40, encoding="utf-8")
    data = load_data("text_file", path=f, tokenizer="bpe", vocab_size=300, cache_dir=tmp_path / "c")
    text = f.read_bytes().decode("utf-8")  # read_text would turn \r\n into \n
    assert "\r\n" in text and data.decode(torch.cat([data.train, data.val])) == text
    assert data.decode(data.val) == text[int(len(text) * 0.9):]
    labels = data.vocab
    assert len(labels) == 300 and {"a", " ", "\t", "\r"} <= set(labels)  # single bytes read as themselves
    assert "\\x" in "".join(labels[:256])  # a lone UTF-8 continuation byte shows as \xNN


def test_bpe_and_vocab_size_are_validated(tmp_path):
    with pytest.raises(DataError, match="vocab_size"):
        load_data("shakespeare", tokenizer="bpe", cache_dir=tmp_path)
    with pytest.raises(DataError, match="257"):
        load_data("shakespeare", tokenizer="bpe", vocab_size=100, cache_dir=tmp_path)
    with pytest.raises(DataError, match="tokens already"):
        load_data("synthetic", tokenizer="bpe", vocab_size=512)
    from induction_dynamics.training.config import validate
    with pytest.raises(ConfigError, match="data.vocab_size"):
        validate(compose_cfg(["data.tokenizer=bpe"]))
    with pytest.raises(ConfigError, match="data.dir"):
        validate(compose_cfg(["data=nanogpt"]))


# ----------------------------------------------------------------------------- python_code

def test_python_code_is_the_stdlib_split_by_file():
    corpus = python_code.load_corpus(0.1)
    files = corpus.train_files + corpus.val_files
    assert not set(corpus.train_files) & set(corpus.val_files)
    assert corpus.train_files == sorted(corpus.train_files) and corpus.val_files == sorted(corpus.val_files)
    assert 300 < len(files) and 0.05 < len(corpus.val_files) / len(files) < 0.2
    assert "os.py" in files and "collections/__init__.py" in files
    for left_out in ("idlelib/", "test/", "site-packages/"):
        assert not any(f.startswith(left_out) or f"/{left_out}" in f for f in files), left_out
    assert not any(Path(f).name.startswith("test_") for f in files)
    assert "pydoc_data/topics.py" not in files and "encodings/cp1252.py" not in files  # generated
    root = python_code.stdlib_root()
    assert corpus.val_text == python_code.FILE_SEP.join((root / f).read_text(encoding="utf-8")
                                                       for f in corpus.val_files)
    assert python_code.load_corpus(0.1).fingerprint == corpus.fingerprint


# ----------------------------------------------------------------------------- nanoGPT folders

class Payload:
    """What a hostile meta.pkl carries: unpickling it with pickle.load creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_a_meta_pkl_that_carries_code_is_refused_and_never_runs(tmp_path):
    folder = tmp_path / "evil"
    meta = write_nanogpt_char(folder)
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(Payload(proof)))  # the payload is real: a plain unpickler runs it
    assert proof.exists()
    marker = tmp_path / "marker"
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({**meta, "extra": Payload(marker)}, f)
    with pytest.raises(DataError) as e:
        load_data("nanogpt", data_dir=folder)
    assert "builtins.exec" in str(e.value) and "\n" not in str(e.value)
    cfg = compose_cfg(NANO + [f"data.dir={folder}"])
    with pytest.raises(DataError, match="refusing"):
        train(cfg, run_dir=tmp_path / "run")
    assert not marker.exists() and not list_checkpoints(tmp_path / "run")
    # plain data that is not a character vocabulary is refused too
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 3, "itos": {0: "a", 1: "b"}, "stoi": {}}, f)
    with pytest.raises(DataError, match="every id"):
        load_data("nanogpt", data_dir=folder)
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({**meta, "dtype": np.dtype("uint16")}, f)  # numpy objects need an import
    with pytest.raises(DataError, match="numpy"):
        load_data("nanogpt", data_dir=folder)


def test_nanogpt_char_folder_trains_and_is_analysed(tmp_path):
    folder = tmp_path / "shakespeare_char"
    meta = write_nanogpt_char(folder)
    data = load_data("nanogpt", data_dir=folder)
    assert isinstance(data.train, np.memmap) and isinstance(data.val, np.memmap)  # never read whole
    assert data.vocab == [meta["itos"][i] for i in range(meta["vocab_size"])]
    assert data.decode(data.val) == TEXT[int(len(TEXT) * 0.9):]
    run = tmp_path / "run"
    out = train(compose_cfg(NANO + [f"data.dir={folder}"]), run_dir=run)
    assert out["iter_num"] == 20 and out["val_loss"] < np.log(meta["vocab_size"]) + 0.5
    ckpt = load_checkpoint(list_checkpoints(run)[-1][1])
    tok = tokenizer_from_checkpoint(ckpt)
    assert tok.kind == "char" and tok.decode(data.val[:200]) == TEXT[int(len(TEXT) * 0.9):][:200]
    assert ckpt["data_source"]["source"] == "nanogpt" and ckpt["model_args"]["vocab_size"] == meta["vocab_size"]
    res = analyse(run)
    table = res["results"][0].table
    assert {"induction_score", "icl_score", "text_loss"} <= set(table["metric"])
    assert (table.loc[table.metric == "text_loss", "value"] < np.log(meta["vocab_size"]) + 1).all()


def test_nanogpt_gpt2_folder_pads_the_vocabulary_and_prompts_only_used_tokens(tmp_path):
    folder = tmp_path / "shakespeare"
    train_ids = write_nanogpt_bpe(folder)
    data = load_data("nanogpt", data_dir=folder)
    assert data.vocab_size == 50257 and data.tokenizer.kind == "gpt2"
    assert data.decode([464, 3290]) == "<464><3290>"
    with pytest.raises(DataError, match="tokenizer.json"):
        data.encode("hello")
    run = tmp_path / "run"
    train(compose_cfg(NANO + [f"data.dir={folder}", "model.vocab_size=50304"]), run_dir=run)
    ckpt = load_checkpoint(history_path(run, 20))
    assert ckpt["model_args"]["vocab_size"] == 50304 and ckpt["vocab"] is None
    assert tokenizer_from_checkpoint(ckpt).vocab_size == 50257
    res = analyse(run, f"suite.text_windows={FAST_WINDOWS}")  # the padded 50,304-token unembedding at 2,048 windows takes minutes
    allowed = set(range(50304))
    info = res["results"][0].record.prompts
    used = set(np.unique(train_ids).tolist())
    assert info["n_allowed_tokens"] <= len(used) < len(allowed)
    table = res["results"][0].table
    assert table.loc[table.metric == "induction_score", "value"].notna().all()
    with pytest.raises(ConfigError, match="smaller than the data"):
        train(compose_cfg(NANO + [f"data.dir={folder}", "model.vocab_size=1000"]), run_dir=tmp_path / "small")


def test_a_bpe_checkpoint_decodes_without_the_training_data(tmp_path):
    f = tmp_path / "plays.txt"
    f.write_text(TEXT, encoding="utf-8")
    cache = tmp_path / "cache"
    cfg = compose_cfg([o for o in TINY if not o.startswith("data")] + [
        "data=text_file", f"data.path={f}", f"data.cache_dir={cache}", "data.tokenizer=bpe", "data.vocab_size=400",
        "train.max_iters=10"])
    train(cfg, run_dir=tmp_path / "run")
    data = load_data("text_file", path=f, cache_dir=cache, tokenizer="bpe", vocab_size=400)
    ckpt = load_checkpoint(history_path(tmp_path / "run", 10))
    for p in [*cache.rglob("*"), f]:
        if p.is_file():
            p.unlink()
    tok = tokenizer_from_checkpoint(ckpt)
    assert tok.kind == "bpe" and tok.fingerprint == ckpt["data_source"]["tokenizer_sha256"]
    sample = TEXT[:500]
    assert tok.decode(tok.encode(sample)) == sample and tok.encode(sample) == data.tokenizer.encode(sample)
    assert ckpt["vocab"] == data.vocab and len(ckpt["token_counts"]) == 400


def test_a_foreign_checkpoint_with_no_dataset_is_a_one_line_error(tmp_path):
    """A plain nanoGPT ckpt.pt (no vocabulary, no data config) must not be scored on some default text."""
    folder = tmp_path / "shakespeare_char"
    meta = write_nanogpt_char(folder)
    run = tmp_path / "run"
    train(compose_cfg(NANO + [f"data.dir={folder}"]), run_dir=run)
    ours = load_checkpoint(history_path(run, 20))
    foreign = tmp_path / "nanogpt_out"
    nanogpt_ckpt = {"model": ours["model"], "optimizer": {}, "iter_num": 20, "best_val_loss": 2.0,
                    "model_args": {k: ours["model_args"][k] for k in
                                   ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")},
                    "config": {"dataset": "shakespeare_char", "batch_size": 8, "learning_rate": 1e-3}}
    save_atomic(nanogpt_ckpt, history_path(foreign, 20))
    with pytest.raises(TokenizerError, match="no vocabulary"):
        tokenizer_from_checkpoint(nanogpt_ckpt)
    proc = run_entry(f"run_dir={foreign}", "wandb.mode=disabled", "analysis/suite=fast", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert "no vocabulary" in err and "data_dir=" in err and len(err.splitlines()) == 1, err
    assert not (foreign / "analysis" / "results.parquet").exists()
    # naming the folder makes it analysable, with the folder's vocabulary
    res = analyse(foreign, f"data_dir={folder}")
    assert res["results"][0].record.model_args["vocab_size"] == meta["vocab_size"]
    # a folder with another vocabulary than the checkpoint's is refused
    other = tmp_path / "other"
    write_nanogpt_char(other, TEXT.upper())
    with pytest.raises(AnalysisError, match="vocabulary"):
        analyse(run, f"data_dir={other}", "force=true")
    assert os.path.exists(folder / "meta.pkl")


def test_natural_text_is_natural_data_and_its_control_differs_by_one_layer():
    exp, ctl = compose_cfg(["experiment=natural_text"]), compose_cfg(["experiment=natural_text_1layer"])
    assert (exp.data.name, exp.data.tokenizer, exp.data.repeat_frac) == ("python_code", "bpe", 0.0)
    assert exp.model.attn_only and (exp.model.n_layer, ctl.model.n_layer) == (2, 1)
    assert {k: v for k, v in exp.model.items() if k != "n_layer"} == {k: v for k, v in ctl.model.items() if k != "n_layer"}
    assert exp.optim == ctl.optim and exp.train == ctl.train and exp.data == ctl.data
