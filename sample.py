"""Sample from a trained model: ``python sample.py checkpoint=<run dir or .pt file> [overrides]``.

    python sample.py checkpoint=outputs/<run> start="ROMEO:" num_samples=3     # the last checkpoint
    python sample.py checkpoint=outputs/<run> step=1000 max_new_tokens=200      # any step of the history
    python sample.py checkpoint=outputs/<run> start=FILE:prompt.txt seed=7

Config: conf/sample/sample.yaml (nanoGPT sample.py's keys), typed by src/induction_dynamics/sampling.py.
Bad input (a missing checkpoint, a prompt character outside the vocabulary) prints one line
and exits with status 2; set HYDRA_FULL_ERROR=1 for the full traceback.
"""

import sys

import hydra
from omegaconf import DictConfig

from induction_dynamics.cli import main_wrapper, one_line_errors
from induction_dynamics.sampling import sample


@hydra.main(version_base="1.3", config_path="conf/sample", config_name="sample")
@one_line_errors
def hydra_main(cfg: DictConfig) -> None:
    for text in sample(cfg):
        print(text)
        print("---------------")


if __name__ == "__main__":
    sys.exit(main_wrapper(hydra_main))
