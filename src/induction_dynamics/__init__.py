"""induction-dynamics: watch induction heads form during training."""

__version__ = "0.1.0"
