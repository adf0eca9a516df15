"""Training: ``train(cfg)`` writes a run directory with a checkpoint history (trainer -> checkpoint files).

Modules: ``config`` (train.py's typed schema and its checks), ``setup`` (a run's state: data,
model, optimizer, resume, W&B), ``loop`` (the named steps and ``train``), ``monitor`` (the live
induction score), ``distributed`` (DDP under torchrun, threads for parallel jobs). Imports
the model, the data and the toolkit's scores; never the analysis.
"""
