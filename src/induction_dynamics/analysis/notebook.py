"""The analysis from a notebook: one checkpoint -> its tidy rows; a saved sweep -> its table.

    from induction_dynamics.analysis import analyze_checkpoint, load_results
    rows = analyze_checkpoint("outputs/quickstart/checkpoints/step_002000.pt", suite="fast")
    table = load_results("outputs/quickstart")          # what analyze_checkpoints.py saved

``analyze_checkpoint`` runs the sweep's own code on one checkpoint (``prompts.prompts_for``,
``worker.checkpoint_rows``, with the config ``analyze_checkpoints.py`` would compose), so
its rows equal the ones the sweep writes for that checkpoint; it writes no file.
``load_results`` reads only Parquet: importing this module loads no torch.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import induction_dynamics.analysis.config  # noqa: F401  (registers the schema)
from induction_dynamics import run_dir as layout
from induction_dynamics.analysis.table import make_frame
from induction_dynamics.errors import AnalysisError

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"  # the repository's conf/ (as for the CLI)


def analysis_config(suite="default", overrides=()):
    """The config ``analyze_checkpoints.py analysis/suite=<suite> <overrides>`` runs with.

    ``suite``: a suite name (``conf/analysis/suite/<name>.yaml``) or a suite config (a
    mapping, ``SuiteConfig`` or DictConfig) merged over the default suite.
    """
    if not (CONF_DIR / "analyze.yaml").is_file():
        raise AnalysisError(f"the analysis configs are not at {CONF_DIR} (run from a checkout of the repository)")
    name = suite if isinstance(suite, str) else "default"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("analyze", overrides=[f"analysis/suite={name}", *overrides])
    if not isinstance(suite, str):
        suite = asdict(suite) if hasattr(suite, "__dataclass_fields__") else suite
        cfg.suite = OmegaConf.merge(cfg.suite, suite)
    return cfg


def analyze_checkpoint(path_or_model, suite="default", *, overrides=(), data: dict | None = None,
                       val_tokens=None, device: str = "cpu", run: str | None = None) -> pd.DataFrame:
    """The tidy rows (``table.COLUMNS``) of one checkpoint, as the sweep computes them; no file written.

    ``path_or_model``: a checkpoint file, a checkpoint dict, or a ``GPT``. A checkpoint brings
    its vocabulary, token counts and training config (whose validation split gives the text
    windows); a bare model has none of them, so it needs ``data`` (a data config, as in
    ``train.py``'s ``data.*``, e.g. ``{"name": "synthetic", "synthetic_vocab_size": 32}``) or
    ``val_tokens`` (a 1-D tensor of token ids) for the text windows. ``overrides``: analysis
    overrides as on the command line (``"seed=7"``, ``"suite.text_windows=4"``).
    ``run``: the label in the ``run`` column (default: the run dir's name, as the sweep's).
    """
    # torch and the model, here only: load_results and analysis_config never need them
    from induction_dynamics.analysis.prompts import prompts_for, train_config_of
    from induction_dynamics.analysis.worker import checkpoint_rows, run_options
    from induction_dynamics.checkpoint import load_checkpoint, model_from_checkpoint
    from induction_dynamics.model import GPT

    cfg = analysis_config(suite, overrides)
    metrics = [str(m) for m in cfg.suite.metrics]
    run_dir = step = None
    if isinstance(path_or_model, GPT):
        model = path_or_model.to(device).eval()
        ckpt = {"model_args": asdict(model.config)}
        train_config = {"data": dict(data)} if data is not None else {}
        if val_tokens is None and data is None:
            raise ValueError("a model without its checkpoint needs data= (a data config, e.g. "
                             "{'name': 'synthetic'}) or val_tokens= (token ids) for the text windows")
    else:
        if isinstance(path_or_model, dict):
            ckpt = path_or_model
        else:
            path = Path(path_or_model).expanduser()
            ckpt = load_checkpoint(path, map_location=device)
            step = layout.step_of(path)
            run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
        model = model_from_checkpoint(ckpt, device)
        # the weights are in the model now: without its state dict the checkpoint is metadata (a
        # GPT-2-sized state dict is half a gigabyte the suite never reads); a dict passed in is not changed
        ckpt = {k: v for k, v in ckpt.items() if k != "model"}
        train_config = train_config_of(ckpt, run_dir)
        if data is not None:
            train_config = {**train_config, "data": dict(data)}
    if step is None:
        step = int(ckpt.get("step", ckpt.get("iter_num", -1)))
    prompts = prompts_for(ckpt, train_config, cfg, val_tokens=val_tokens)
    df, _ = checkpoint_rows(model, ckpt, step, prompts.to(device), metrics, options=run_options(cfg.suite))
    label = run or (run_dir.resolve().name if run_dir is not None else "model")
    table = make_frame(df.assign(run=label, seed=int(train_config.get("seed", -1))))
    return table.sort_values(["step", "metric", "layer", "head"], kind="stable").reset_index(drop=True)


def load_results(run_dir) -> pd.DataFrame:
    """The tidy table ``analyze_checkpoints.py`` saved for a run dir or a sweep folder.

    A sweep folder analysed as a whole has its combined table; otherwise the tables of the
    runs under it are joined (``run`` = the run's path under the folder, as in the sweep's).
    """
    root = Path(run_dir).expanduser()
    saved = layout.analysis_dir(root) / "results.parquet"
    if saved.is_file():
        return make_frame(pd.read_parquet(saved))
    tables = [pd.read_parquet(p).assign(run=layout.run_label(d, root))
              for d in layout.find_runs(root) if (p := layout.analysis_dir(d) / "results.parquet").is_file()]
    if not tables:
        raise AnalysisError(f"no saved analysis under {root}: run python analyze_checkpoints.py run_dir={root} first")
    return make_frame(pd.concat(tables, ignore_index=True))
