"""The analysis cache key misses nothing: each input a cached number depends on, changed alone,
re-analyses the checkpoints; left alone, they come from the cache.

A run of two tiny checkpoints, analysed with the fast suite; "(2 new)" in the report means both
were analysed again, "(0 new)" that both came from the cache.
"""

import json
import pickle
import shutil

import numpy as np
import pytest
from analysis_helpers import DATA, FAST, cfg_for, make_run

from induction_dynamics import run_dir as R
from induction_dynamics.analysis import cache, prompts
from induction_dynamics.analysis.driver import analyze
from induction_dynamics.data import load_data

SUITE = (*FAST, "analysis/suite=fast")


def report(run_dir, *overrides) -> str:
    return analyze(cfg_for(run_dir, *SUITE, *overrides))["report"]


def suite_json(run_dir) -> dict:
    return json.loads((R.cache_dir(run_dir) / "suite.json").read_text())


@pytest.fixture
def run_dir(tmp_path):
    run = make_run(tmp_path / "run", 0, steps=(0, 4))
    assert "(2 new)" in report(run)
    assert "(0 new)" in report(run)  # nothing changed: served from the cache
    return run


def write_nanogpt_folder(folder, seed: int):
    """A nanoGPT folder in the run's own character vocabulary (so its checkpoints accept it),
    with ``seed``'s random validation tokens."""
    vocab = load_data(**DATA).vocab
    folder.mkdir(parents=True)
    (np.arange(4096) % len(vocab)).astype(np.uint16).tofile(folder / "train.bin")
    write_val(folder, seed)
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(vocab), "itos": dict(enumerate(vocab)),
                     "stoi": {c: i for i, c in enumerate(vocab)}}, f)
    return folder


def write_val(folder, seed: int) -> None:
    n = len(load_data(**DATA).vocab)
    np.random.default_rng(seed).integers(0, n, 2048).astype(np.uint16).tofile(folder / "val.bin")


@pytest.mark.parametrize("module", ["checkpoint.py", "training/config.py", "data/tokenizer.py",
                                    "analysis/table.py", "analysis/attention.py"])
def test_an_edit_to_any_module_of_the_package_re_analyses(run_dir, tmp_path, monkeypatch, module):
    # the hash reads a copy of the package: the copy as it is keys the same as the real one,
    # the copy with one module edited (one the computation goes through) keys apart
    same = shutil.copytree(cache.PACKAGE_ROOT, tmp_path / "same" / "induction_dynamics",
                           ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(cache, "PACKAGE_ROOT", same)
    assert "(0 new)" in report(run_dir)
    edited = shutil.copytree(same, tmp_path / "edited" / "induction_dynamics")
    with open(edited / module, "a") as f:
        f.write("\n# an edit\n")
    monkeypatch.setattr(cache, "PACKAGE_ROOT", edited)
    assert "(2 new)" in report(run_dir)
    assert suite_json(run_dir)["code"]["source_sha256"] == cache.source_sha256(edited)
    assert "(0 new)" in report(run_dir)


def test_a_new_module_in_the_package_re_analyses(run_dir, tmp_path, monkeypatch):
    copy = shutil.copytree(cache.PACKAGE_ROOT, tmp_path / "copy" / "induction_dynamics",
                           ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "analysis" / "new_metric.py").write_text("SCALE = 2\n")  # found by walking, not listed
    monkeypatch.setattr(cache, "PACKAGE_ROOT", copy)
    assert "(2 new)" in report(run_dir)


def test_other_validation_tokens_under_the_same_settings_re_analyse(tmp_path):
    run = make_run(tmp_path / "run", 0, steps=(0, 4))
    folder = write_nanogpt_folder(tmp_path / "data", seed=0)
    assert "(2 new)" in report(run, f"data_dir={folder}")
    assert "(0 new)" in report(run, f"data_dir={folder}")
    before = suite_json(run)
    # val.bin rewritten in place: same folder, same settings, same prompts' description
    write_val(folder, seed=1)
    prompts._load_data_cached.cache_clear()  # a new analysis process reads the folder afresh
    assert "(2 new)" in report(run, f"data_dir={folder}")
    after = suite_json(run)
    assert after["prompts"] == before["prompts"] and after["data_dir"] == before["data_dir"]
    assert after["prompts_sha256"] != before["prompts_sha256"]
    assert "(0 new)" in report(run, f"data_dir={folder}")


def test_the_prompts_hash_covers_every_token_tensor(tmp_path):
    run = make_run(tmp_path / "run", 0, steps=(0,))
    from induction_dynamics.analysis.worker import prepare_run
    ctx = prepare_run(run, "run", cfg_for(run, *SUITE))
    p = ctx.prompts
    digest = p.sha256()
    assert digest == prepare_run(run, "run", cfg_for(run, *SUITE)).prompts.sha256()  # the same draw
    for tensor in (p.allowed, p.induction, p.prefix, p.text, p.text_repeats, p.patching.clean,
                   p.patching.corrupted, p.patching.answer, p.patching.corrupted_answer):
        tensor.view(-1)[0] += 1
        assert p.sha256() != digest
        tensor.view(-1)[0] -= 1
        assert p.sha256() == digest


def test_data_dir_is_part_of_the_key(tmp_path):
    run = make_run(tmp_path / "run", 0, steps=(0, 4))
    a = write_nanogpt_folder(tmp_path / "a", seed=0)
    b = write_nanogpt_folder(tmp_path / "b", seed=0)  # the same bytes under another name
    assert "(2 new)" in report(run, f"data_dir={a}")
    assert "(2 new)" in report(run, f"data_dir={b}")
    assert suite_json(run)["data_dir"] == str(b)
    assert "(0 new)" in report(run, f"data_dir={b}")


def test_a_library_version_change_re_analyses(run_dir, monkeypatch):
    real = cache.library_versions()
    assert set(real) == {"python", "torch", "numpy", "devinterp"} and real["torch"] and real["numpy"]
    assert suite_json(run_dir)["libraries"] == real
    for name in ("torch", "numpy", "devinterp"):
        other = {**real, name: real[name] + ".other"}
        monkeypatch.setattr(cache, "library_versions", lambda other=other: other)
        assert "(2 new)" in report(run_dir)
        assert suite_json(run_dir)["libraries"][name] == other[name]


def test_a_library_that_is_not_installed_reads_absent(monkeypatch):
    monkeypatch.setattr(cache, "LIBRARIES", ("numpy", "surely-not-an-installed-distribution"))
    cache.library_versions.cache_clear()
    try:
        versions = cache.library_versions()
    finally:
        cache.library_versions.cache_clear()
    assert versions["surely-not-an-installed-distribution"] == "absent" and versions["numpy"] != "absent"
