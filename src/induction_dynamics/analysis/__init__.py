"""The analysis sweep behind ``analyze_checkpoints.py``: checkpoint history -> tidy table -> plots, W&B.

Layers (data flows one way):

- ``runs``      find run dirs, output layout, cache paths (no torch)
- ``suite``     one model -> tidy rows, from the toolkit's metrics on fixed probes (torch)
- ``sweep``     per-run setup, per-checkpoint cache, parallel workers (torch)
- ``table``     the tidy schema and helpers to read curves out of it (no torch)
- ``phase``     phase-change detection on a curve (no torch)
- ``plots``     the six figures from saved tables (no torch)
- ``wandb_log`` the per-run W&B analysis run (no torch)
- ``pipeline``  ``analyze(cfg)``, tying them together; ``config`` its typed schema

Nothing is imported here, so ``plots_only`` can run without torch installed.
"""
