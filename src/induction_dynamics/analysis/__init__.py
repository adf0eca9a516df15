"""The analysis sweep behind ``analyze_checkpoints.py``: checkpoint history -> tidy table -> plots, W&B.

Modules, in the order the data flows (torch only in ``prompts``, ``suite`` and ``worker``):

- ``registry``  every metric, declared once (level, unit, expected direction, suite id)
- ``config``    the typed schema of conf/analyze.yaml
- ``prompts``   a run's fixed inputs, drawn once from the analysis seed (torch)
- ``suite``     one model -> tidy rows, a function per suite id (torch)
- ``worker``    a run's setup; one checkpoint -> its cache files, n_jobs at a time (torch)
- ``cache``     what a cached result was computed from; reading it back
- ``table``     the tidy schema and helpers to read curves out of it
- ``phase``     phase-change detection on a curve
- ``attention`` every checkpoint's attention patterns on one sequence, saved
- ``outputs``   a run's and a sweep's tables, phase changes, plots (``plots/``), report
- ``wandb_run`` the per-run W&B analysis run
- ``record``    a run's identity, saved as run_info.json
- ``driver``    ``analyze(cfg)``: a session over a folder's runs; ``watch`` follows a training
- ``notebook``  ``analyze_checkpoint`` (one checkpoint -> rows, no file) and ``load_results``

Nothing is imported here until asked for, so ``plots_only`` can run without torch installed.
"""

__all__ = ["analyze_checkpoint", "load_results"]


def __getattr__(name):  # ``from induction_dynamics.analysis import analyze_checkpoint`` imports on use
    if name in __all__:
        from induction_dynamics.analysis import notebook
        return getattr(notebook, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
