"""sample.py: text from any checkpoint of a trained run, decoded with the checkpoint's vocabulary."""

import subprocess
import sys

import pytest
from analysis_helpers import REPO, make_run
from hydra import compose, initialize_config_dir
from train_helpers import cli_env

import induction_dynamics.sampling  # noqa: F401  (registers the schema)
from induction_dynamics.checkpoint import load_checkpoint
from induction_dynamics.run_dir import history_path
from induction_dynamics.sampling import sample


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("sample") / "run", 0, steps=(0, 20, 40), iters_per_step=5)


def cfg_for(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf" / "sample"), version_base="1.3"):
        return compose("sample", overrides=list(overrides))


def test_samples_are_the_prompt_continued_in_the_vocabulary(run_dir):
    vocab = load_checkpoint(history_path(run_dir, 40))["vocab"]
    texts = sample(cfg_for(f"checkpoint={run_dir}", "start=abc", "num_samples=3", "max_new_tokens=40"))
    assert len(texts) == 3
    assert all(t.startswith("abc") and len(t) == 3 + 40 for t in texts)
    assert all(set(t) <= set(vocab) for t in texts)
    assert len(set(texts)) == 3  # three draws, not one repeated
    # deterministic for a seed, different for another seed
    again = sample(cfg_for(f"checkpoint={run_dir}", "start=abc", "num_samples=3", "max_new_tokens=40"))
    other = sample(cfg_for(f"checkpoint={run_dir}", "start=abc", "num_samples=3", "max_new_tokens=40", "seed=1"))
    assert again == texts and other != texts


def test_any_step_of_the_history_and_a_prompt_file(run_dir, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("xyz")
    by_step = sample(cfg_for(f"checkpoint={run_dir}", "step=0", f"start=FILE:{prompt}", "num_samples=2",
                             "max_new_tokens=20", "top_k=null", "temperature=1.0"))
    by_file = sample(cfg_for(f"checkpoint={history_path(run_dir, 0)}", "start=xyz", "num_samples=2",
                             "max_new_tokens=20", "top_k=null", "temperature=1.0"))
    last = sample(cfg_for(f"checkpoint={run_dir}", "start=xyz", "num_samples=2", "max_new_tokens=20",
                          "top_k=null", "temperature=1.0"))
    assert by_step == by_file and all(t.startswith("xyz") for t in by_step)
    assert last != by_step  # the run dir alone means its last checkpoint, which has trained


def test_top_k_1_is_greedy(run_dir):
    texts = sample(cfg_for(f"checkpoint={run_dir}", "start=abcdefgh", "num_samples=2", "max_new_tokens=16",
                           "top_k=1"))
    assert texts[0] == texts[1]  # top_k=1 leaves one choice: both samples are the argmax path


def run_sample(*args):
    return subprocess.run([sys.executable, str(REPO / "sample.py"), *args], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=120)


def test_cli_prints_samples_and_bad_input_is_one_line(run_dir, tmp_path):
    p = run_sample(f"checkpoint={run_dir}", "start=abc", "num_samples=2", "max_new_tokens=10")
    assert p.returncode == 0, p.stderr
    texts = [t.strip("\n") for t in p.stdout.split("---------------") if t.strip()]
    assert texts == sample(cfg_for(f"checkpoint={run_dir}", "start=abc", "num_samples=2", "max_new_tokens=10"))
    bad = {"checkpoint not found": [f"checkpoint={tmp_path / 'missing.pt'}", "start=ab"],
           "'R' not in the checkpoint's 26-character vocabulary": [f"checkpoint={run_dir}", "start=ROMEO:"],
           "no checkpoint at step 7": [f"checkpoint={run_dir}", "step=7", "start=ab"],
           "file not found": [f"checkpoint={run_dir}", f"start=FILE:{tmp_path / 'none.txt'}"],
           "temperature must be positive": [f"checkpoint={run_dir}", "start=ab", "temperature=0"],
           "checkpoint": ["start=ab"]}
    for needle, args in bad.items():
        p = run_sample(*args)
        assert p.returncode == 2 and needle in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
