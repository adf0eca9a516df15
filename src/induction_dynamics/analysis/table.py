"""The tidy results table: one row per (run, checkpoint, metric, layer, head). No torch here.

Columns (``COLUMNS``)::

    run          str    run directory, relative to the analysed folder ("." -> its name)
    seed         int    the training run's seed (config["seed"])
    step         int    training iteration of the checkpoint (W&B step metric "iter")
    tokens_seen  int    training tokens consumed by that step
    metric       str    e.g. "induction_score" (see METRICS below)
    layer        int    block index; -1 for model-level metrics
    head         int    head index; -1 for layer- and model-level metrics
    value        float

``-1`` (not NaN) marks "not indexed by layer/head" so the columns stay integers and
``groupby(["layer", "head"])`` keeps model-level rows (pandas drops NaN keys by default).
Logit-lens rows use ``layer`` = number of blocks applied before the unembedding
(0 = embeddings only, n_layer = the model's output), as ``LogitLens.target_probs`` does.

Head pairs (level ``pair``: the composition scores) put the *receiving* head in ``layer`` and
``head`` and the *sending* head, always in an earlier layer, in the metric name after a
slash: ``k_composition/L0H2`` in row (layer 1, head 3) is how much head 1.3's keys read what
head 0.2 writes (``pair_metric``; ``metric_family`` gives back ``k_composition``, and
``pair_table`` the four indices as columns). In W&B that is
``analysis/k_composition/L0H2/L1H3``: sender, then receiver.

Per-token losses (for the PCA of plot 6) do not fit this schema (they are indexed by
text position), so they live in a separate wide table: one row per (run, step), one
column per evaluated token (``TOKEN_LOSS_PREFIX`` + index).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from induction_dynamics.files import atomic_write, write_text

COLUMNS = ["run", "seed", "step", "tokens_seen", "metric", "layer", "head", "value"]
DTYPES = {"run": "string", "seed": "int64", "step": "int64", "tokens_seen": "int64",
          "metric": "string", "layer": "int64", "head": "int64", "value": "float64"}
TOKEN_LOSS_PREFIX = "tok_"

# metric name (for pairs: family) in the table -> (level, what it is). Level: head | layer | model | pair.
METRICS = {
    "induction_score": ("head", "attention from [x, x]'s 2nd copy to the token after the 1st occurrence (1 = perfect)"),
    "prefix_matching_score": ("head", "attention to the token after the previous occurrence, 25 tokens x4 (Olsson)"),
    "previous_token_score": ("head", "attention to the previous token on real text (1 = perfect)"),
    "duplicate_token_score": ("head", "attention to the previous occurrence of the same token"),
    "copying_score": ("head", "empirical direct logit effect of the head on the attended token"),
    "ov_copying_score": ("head", "sum(eig)/sum|eig| of W_U W_OV W_E (Olsson; 1 = pure copying)"),
    "icl_score": ("model", "loss at a late position minus loss at an early one (negative = in-context learning)"),
    "icl_score_repeats": ("model", "icl_score on the training distribution: validation windows with the run's "
                                   "repeat curriculum (= plain text for a run without one)"),
    "text_loss": ("model", "mean next-token loss on the fixed validation windows (nats)"),
    "val_loss": ("model", "the trainer's validation loss saved in the checkpoint (nats)"),
    "induction_loss_first": ("model", "loss on the 1st copy of [x, x] (nats)"),
    "induction_loss_second": ("model", "loss on the 2nd copy of [x, x] (nats; -> 0 with induction)"),
    "patch_resid": ("layer", "patching effect of the clean residual stream after block l"),
    "patch_attn_out": ("layer", "patching effect of block l's clean attention output"),
    "patch_mlp_out": ("layer", "patching effect of block l's clean MLP output"),
    "patch_head": ("head", "patching effect of one head's clean output (hook_z)"),
    "attribution_patch_head": ("head", "gradient (attribution-patching) estimate of patch_head"),
    "logit_lens_prob": ("layer", "probability of the correct next token read after l blocks (0 = embeddings)"),
    "logit_lens_rank": ("layer", "rank of the correct next token read after l blocks"),
    "logit_lens_convergence_layer": ("model", "first layer from which the lens's prediction stays right"),
    "q_composition": ("pair", "||W_OV^A W_QK^B||_F / (||W_OV^A|| ||W_QK^B||): A feeds B's queries (Elhage et al.)"),
    "k_composition": ("pair", "||W_OV^A W_QK^B^T||_F / (||W_OV^A|| ||W_QK^B||): A feeds B's keys (induction)"),
    "v_composition": ("pair", "||W_OV^A W_OV^B||_F / (||W_OV^A|| ||W_OV^B||): A feeds B's values"),
    "composition_baseline": ("model", "the composition score of random matrices of the same shapes"),
    "llc": ("model", "local learning coefficient, mean over SGLD chains (Hoogland et al. 2024; run_info: settings)"),
    "llc_std": ("model", "standard deviation of the llc across SGLD chains"),
}


def pair_metric(family: str, layer: int, head: int) -> str:
    """Table metric of a pair whose sending head is (layer, head): ``k_composition/L0H2``."""
    return f"{family}/L{layer}H{head}"


def metric_family(metric: str) -> str:
    """The METRICS key of a table metric (``k_composition/L0H2`` -> ``k_composition``)."""
    return metric.split("/", 1)[0]


def pair_table(df: pd.DataFrame, family: str) -> pd.DataFrame:
    """A pair metric's rows with the sending head as columns: step, src_layer, src_head, layer, head, value."""
    d = df[df["metric"].str.startswith(family + "/")]
    src = d["metric"].str.extract(r"/L(\d+)H(\d+)$").astype("int64")
    return pd.DataFrame({"step": d["step"].to_numpy(), "src_layer": src[0].to_numpy(), "src_head": src[1].to_numpy(),
                         "layer": d["layer"].to_numpy(), "head": d["head"].to_numpy(), "value": d["value"].to_numpy()})


def induction_circuit(df: pd.DataFrame) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """((layer, head) of the induction head, (layer, head) of its previous-token partner).

    The induction head: the highest ``induction_score`` at the last checkpoint among heads
    that have an earlier layer to compose with (layer >= 1); its partner: the highest
    ``previous_token_score`` at that checkpoint among the heads of earlier layers. None when
    the table lacks either score or the model has one layer.
    """
    last = df[df["step"] == df["step"].max()]
    ind = last[(last["metric"] == "induction_score") & (last["layer"] >= 1)]
    prev = last[last["metric"] == "previous_token_score"]
    if ind.empty or prev.empty:
        return None
    top = ind.loc[ind["value"].idxmax()]
    prev = prev[prev["layer"] < top["layer"]]
    partner = prev.loc[prev["value"].idxmax()]
    return (int(top["layer"]), int(top["head"])), (int(partner["layer"]), int(partner["head"]))


def circuit_composition(df: pd.DataFrame) -> dict[str, pd.Series] | None:
    """{"K", "Q", "V": composition of ``induction_circuit``'s pair (previous-token head into
    induction head) by step}, or None when there is no pair or no composition rows."""
    circuit = induction_circuit(df)
    if circuit is None:
        return None
    (li, hi), (lp, hp) = circuit
    out = {}
    for kind in "KQV":
        t = pair_table(df, f"{kind.lower()}_composition")
        t = t[(t["src_layer"] == lp) & (t["src_head"] == hp) & (t["layer"] == li) & (t["head"] == hi)]
        out[kind] = t.groupby("step")["value"].mean().sort_index()
    return out if not out["K"].empty else None


def make_frame(records: list[dict] | pd.DataFrame) -> pd.DataFrame:
    """A DataFrame with exactly COLUMNS in order and the schema's dtypes."""
    df = pd.DataFrame(records)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"results table lacks columns {missing}")
    return df[COLUMNS].astype(DTYPES).reset_index(drop=True)


def write_atomic(df: pd.DataFrame, path: str | Path, csv: bool = False) -> None:
    """Write Parquet (and CSV next to it) via a temporary name + rename: no half-written file."""
    path = Path(path)
    atomic_write(path, lambda f: df.to_parquet(f, index=False))
    if csv:
        write_text(path.with_suffix(".csv"), df.to_csv(index=False))


def model_metric(df: pd.DataFrame, metric: str) -> pd.Series:
    """A model-level metric as a Series indexed by step (empty if absent)."""
    d = df[(df["metric"] == metric) & (df["layer"] == -1) & (df["head"] == -1)]
    return d.groupby("step")["value"].mean().sort_index()


def max_over_heads(df: pd.DataFrame, metric: str) -> pd.Series:
    """max over (layer, head) of a head-level metric, per step (e.g. the max induction score)."""
    d = df[(df["metric"] == metric) & (df["head"] >= 0)]
    return d.groupby("step")["value"].max().sort_index()


def curve(df: pd.DataFrame, name: str) -> pd.Series:
    """A named curve per step: ``<metric>_max`` = max over heads, otherwise a model-level metric."""
    if name.endswith("_max") and name[:-4] in METRICS:
        return max_over_heads(df, name[:-4])
    return model_metric(df, name)


def head_matrix(df: pd.DataFrame, metric: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(steps, labels "L.H", values (n_heads, n_steps)) of a head-level metric, for heatmaps."""
    d = df[(df["metric"] == metric) & (df["head"] >= 0)]
    wide = d.pivot_table(index=["layer", "head"], columns="step", values="value", aggfunc="mean")
    labels = [f"{l}.{h}" for l, h in wide.index]
    return wide.columns.to_numpy(), labels, wide.to_numpy()


def layer_matrix(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """A layer-level metric as a DataFrame: index step, one column per layer."""
    d = df[(df["metric"] == metric) & (df["head"] == -1) & (df["layer"] >= 0)]
    return d.pivot_table(index="step", columns="layer", values="value", aggfunc="mean").sort_index()


def wandb_key(metric: str, layer: int, head: int) -> str:
    """W&B key of one table cell: analysis/<metric>[/L<layer>[H<head>]]."""
    if head >= 0:
        return f"analysis/{metric}/L{layer}H{head}"
    if layer >= 0:
        return f"analysis/{metric}/L{layer}"
    return f"analysis/{metric}"


def wide_by_step(df: pd.DataFrame) -> pd.DataFrame:
    """One row per checkpoint: step, tokens_seen, every cell as a W&B-style column, plus <metric>_max."""
    out = df.assign(key=[wandb_key(m, l, h) for m, l, h in zip(df["metric"], df["layer"], df["head"])])
    wide = out.pivot_table(index=["step", "tokens_seen"], columns="key", values="value", aggfunc="mean")
    for metric in df.loc[df["head"] >= 0, "metric"].unique():
        if METRICS.get(metric_family(metric), ("head",))[0] == "pair":
            continue  # a pair's sender is in its name: no max over heads
        wide[f"analysis/{metric}_max"] = max_over_heads(df, metric).reindex(wide.index.get_level_values("step")).to_numpy()
    return wide.reset_index().sort_values("step").reset_index(drop=True)
