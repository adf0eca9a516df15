"""Interpretability toolkit: hooks and caches, head scores, activation patching, logit lens.

    from induction_dynamics.interpretability import activation_patching, attention_analysis, logit_lens
    from induction_dynamics.interpretability.utils import ActivationCache, HookManager

Modules: ``utils`` (HookManager, ActivationCache), ``metrics`` (score definitions with
their sources), ``attention_analysis`` (patterns, head scores, plots),
``activation_patching`` (batched patching, attribution patching), ``logit_lens``,
``export`` (``to_hooked_transformer``: a TransformerLens model with the same weights; needs
the ``[tl]`` extra, imported on use).
"""

from induction_dynamics.interpretability import (  # noqa: F401
    activation_patching,
    attention_analysis,
    logit_lens,
    metrics,
    utils,
)
from induction_dynamics.interpretability.utils import ActivationCache, HookManager  # noqa: F401
