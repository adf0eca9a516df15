"""The analysis sweep behind ``analyze_checkpoints.py``: checkpoint history -> tidy table -> plots, W&B.

Layers (data flows one way):

- ``runs``      find run dirs, output layout, cache paths (no torch)
- ``suite``     one model -> tidy rows, from the toolkit's metrics on fixed prompts (torch)
- ``sweep``     per-run setup, per-checkpoint cache, parallel workers (torch)
- ``table``     the tidy schema and helpers to read curves out of it (no torch)
- ``phase``     phase-change detection on a curve (no torch)
- ``plots``     the six figures from saved tables (no torch)
- ``wandb_log`` the per-run W&B analysis run (no torch)
- ``pipeline``  ``analyze(cfg)``, tying them together; ``config`` its typed schema
- ``notebook``  ``analyze_checkpoint`` (one checkpoint -> rows, no file) and ``load_results``

Nothing is imported here until asked for, so ``plots_only`` can run without torch installed.
"""

__all__ = ["analyze_checkpoint", "load_results"]


def __getattr__(name):  # ``from induction_dynamics.analysis import analyze_checkpoint`` imports on use
    if name in __all__:
        from induction_dynamics.analysis import notebook
        return getattr(notebook, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
