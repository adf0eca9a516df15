"""The metric registry: every number the analysis writes, declared once. No torch here.

A metric is one ``Metric``: its table name, its level (how its rows are laid out), its unit,
the direction it is expected to move while induction heads form, what it means, and the suite
id (config ``suite.metrics``) of the computation that produces it (``suite.py``, one function
per id). Everything else is derived from this list: the config's allowed suite ids
(``SuiteMetric``), the table's metric list (``table.py``), the W&B keys (``table.wandb_key``),
the phase detector's expected direction and smallest change (``phase.py``), and the metric
list of ``docs/metrics.md`` (``markdown_table``; a test keeps the page equal to it).

Levels, i.e. what a computation returns for a metric and the rows it becomes:

    head   (n_layer, n_head)                  a row per head
    layer  (n,)                               a row per layer (logit lens: blocks applied, 0 = embeddings)
    model  a number                           one row, layer = head = -1
    pair   (n_layer, n_head, n_layer, n_head) a row per sending head and receiving head in a later
                                              layer: metric "<name>/L<l>H<h>" (the sender) at the
                                              receiver's (layer, head)
    token  (windows * positions,)             per-token values: the wide token-loss table, not the
                                              tidy one (one column per evaluated token)
"""

from __future__ import annotations

from dataclasses import dataclass

from induction_dynamics.options import Option


class Level(Option):
    head = "head"
    layer = "layer"
    model = "model"
    pair = "pair"
    token = "token"


class Direction(Option):
    """How a metric moves while induction heads form (Olsson et al. 2022): the phase detector
    calls a change in the other direction what it is, not the phase change."""
    rise = "rise"
    fall = "fall"
    none = "none"


@dataclass(frozen=True)
class Metric:
    name: str
    level: Level
    suite: str | None          # the suite id that computes it; None: read from the checkpoint
    unit: str
    description: str
    direction: Direction = Direction.none
    min_change: float = 0.0    # the smallest phase-change amplitude that counts, in ``unit``


H, L, M, P, T = Level.head, Level.layer, Level.model, Level.pair, Level.token
RISE, FALL = Direction.rise, Direction.fall

METRICS: tuple[Metric, ...] = (
    Metric("induction_score", H, "induction", "attention",
           "attention from [x, x]'s 2nd copy to the token after the 1st occurrence (1 = perfect)", RISE, 0.1),
    Metric("prefix_matching_score", H, "prefix_matching", "attention",
           "attention to the token after the previous occurrence, 25 tokens x4 (Olsson)", RISE, 0.1),
    Metric("previous_token_score", H, "previous_token", "attention",
           "attention to the previous token on real text (1 = perfect)", RISE, 0.1),
    Metric("duplicate_token_score", H, "duplicate_token", "attention",
           "attention to the previous occurrence of the same token"),
    Metric("copying_score", H, "copying", "fraction",
           "empirical direct logit effect of the head on the attended token"),
    Metric("ov_copying_score", H, "ov_copying", "fraction",
           "sum(eig)/sum|eig| of W_U W_OV W_E (Olsson; 1 = pure copying)"),
    Metric("icl_score", M, "icl", "nats",
           "loss at a late position minus loss at an early one (negative = in-context learning)", FALL, 0.1),
    Metric("icl_score_repeats", M, "icl_repeats", "nats",
           "icl_score on the training distribution: validation windows with the run's "
           "repeat curriculum (= plain text for a run without one)", FALL, 0.1),
    Metric("text_loss", M, "token_loss", "nats", "mean next-token loss on the fixed validation windows (nats)"),
    Metric("token_loss", T, "token_loss", "nats",
           "next-token loss of every evaluated token of the validation windows (the PCA plot's input)"),
    Metric("val_loss", M, None, "nats", "the trainer's validation loss saved in the checkpoint (nats)"),
    Metric("induction_loss_first", M, "induction_loss", "nats", "loss on the 1st copy of [x, x] (nats)"),
    Metric("induction_loss_second", M, "induction_loss", "nats",
           "loss on the 2nd copy of [x, x] (nats; -> 0 with induction)", FALL, 0.1),
    Metric("patch_resid", L, "patching", "fraction", "patching effect of the clean residual stream after block l"),
    Metric("patch_attn_out", L, "patching", "fraction", "patching effect of block l's clean attention output"),
    Metric("patch_mlp_out", L, "patching", "fraction", "patching effect of block l's clean MLP output"),
    Metric("patch_head", H, "patching", "fraction", "patching effect of one head's clean output (hook_z)"),
    Metric("patch_clean_logit_diff", M, "patching", "logits",
           "the clean run's logit difference (answer - corrupted answer): the 1 of the normalised effects"),
    Metric("patch_corrupted_logit_diff", M, "patching", "logits",
           "the corrupted run's logit difference: the 0 of the normalised effects"),
    Metric("patch_baseline_gap", M, "patching", "logits",
           "clean - corrupted logit difference; within 2 standard errors of 0 the effects are NaN"),
    Metric("attribution_patch_head", H, "attribution_patching", "fraction",
           "gradient (attribution-patching) estimate of patch_head"),
    Metric("logit_lens_prob", L, "logit_lens", "probability",
           "probability of the correct next token read after l blocks (0 = embeddings)"),
    Metric("logit_lens_rank", L, "logit_lens", "rank", "rank of the correct next token read after l blocks"),
    Metric("logit_lens_convergence_layer", M, "logit_lens", "layer",
           "first layer from which the lens's prediction stays right"),
    Metric("q_composition", P, "composition", "fraction",
           "||W_OV^A W_QK^B||_F / (||W_OV^A|| ||W_QK^B||): A feeds B's queries (Elhage et al.)"),
    Metric("k_composition", P, "composition", "fraction",
           "||W_OV^A W_QK^B^T||_F / (||W_OV^A|| ||W_QK^B||): A feeds B's keys (induction)", RISE),
    Metric("v_composition", P, "composition", "fraction",
           "||W_OV^A W_OV^B||_F / (||W_OV^A|| ||W_OV^B||): A feeds B's values"),
    Metric("composition_baseline", M, "composition", "fraction",
           "the composition score of random matrices of the same shapes"),
    Metric("llc", M, "llc", "nats",
           "local learning coefficient, mean over SGLD chains (Hoogland et al. 2024; run_info: settings)", RISE),
    Metric("llc_std", M, "llc", "nats", "standard deviation of the llc across SGLD chains"),
)

# suite ids left out of the default suite, and why: their cost
OPT_IN = {"llc": "~16 s per quickstart checkpoint on 2 idle CPU cores"}

BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}
SUITE_IDS: tuple[str, ...] = tuple(dict.fromkeys(m.suite for m in METRICS if m.suite is not None))
DEFAULT_SUITE: list[str] = [s for s in SUITE_IDS if s not in OPT_IN]
# the allowed values of ``suite.metrics``: OmegaConf rejects any other when the config is composed
SuiteMetric = Option("SuiteMetric", [(s, s) for s in SUITE_IDS])


def produced_by(suite_id: str) -> list[Metric]:
    return [m for m in METRICS if m.suite == suite_id]


def family(metric: str) -> str:
    """The registered name of a table metric (a pair's ``k_composition/L0H2`` -> ``k_composition``)."""
    return metric.split("/", 1)[0]


def of(metric: str) -> Metric:
    """The declaration of a table metric or a curve: ``induction_score_max`` (the max over heads)
    is ``induction_score``'s, a pair's ``k_composition/L0H2`` is ``k_composition``'s."""
    name = family(metric)
    if name not in BY_NAME and name.endswith("_max") and name[:-4] in BY_NAME:
        name = name[:-4]
    return BY_NAME[name]


PAGE = """# Analysis metrics

Every metric the analysis writes, as `src/induction_dynamics/analysis/registry.py` declares it
(this page is generated: `python -m induction_dynamics.analysis.registry > docs/metrics.md`; a
test keeps it equal). The table's `metric` column holds the name and `stderr` its standard error
over prompts, text windows or SGLD chains (NaN for a score of the weights); `suite id` is what
`suite.metrics=[...]` names to compute it (`analysis/suite=llc` adds the opt-in LLC); the level
says how its rows are laid out: `head` a row per (layer, head), `layer` a row per layer (the
logit lens: per number of blocks applied, 0 = the embeddings), `model` one row with
layer = head = -1, `pair` a row per receiving head with the sending head in the name
(`k_composition/L0H2` at layer 1, head 3), `token` the per-token losses in
`analysis/token_losses.parquet`. "Expected while heads form" is the direction the phase detector
takes as the phase change (Olsson et al. 2022); a change the other way is reported as such.
W&B keys: `analysis/<metric>[/L<layer>[H<head>]]`, and `analysis/<metric>_max` for the max over heads.

"""


def markdown_table() -> str:
    """The metric list of docs/metrics.md, from the declarations."""
    lines = ["| metric | level | unit | suite id | expected while heads form | what it is |",
             "|---|---|---|---|---|---|"]
    for m in METRICS:
        suite = f"`{m.suite}`" + (" (opt-in)" if m.suite in OPT_IN else "") if m.suite else "(checkpoint)"
        lines.append(f"| `{m.name}` | {m.level} | {m.unit} | {suite} | {m.direction} | {m.description} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # docs/metrics.md
    print(PAGE + markdown_table(), end="")
