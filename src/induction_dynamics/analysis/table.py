"""The tidy results table: one row per (run, checkpoint, metric, layer, head). No torch here.

Columns (``COLUMNS``)::

    run          str    run directory, relative to the analysed folder ("." -> its name)
    seed         int    the training run's seed (config["seed"])
    step         int    training iteration of the checkpoint (W&B step metric "iter")
    tokens_seen  int    training tokens consumed by that step
    metric       str    e.g. "induction_score" (what each one is: ``registry.METRICS``)
    layer        int    block index; -1 for model-level metrics
    head         int    head index; -1 for layer- and model-level metrics
    value        float
    stderr       float  standard error of value over its prompts, windows or chains; NaN where
                        none applies (a score of the weights, the trainer's val_loss)

``-1`` (not NaN) marks "not indexed by layer/head" so the columns stay integers and
``groupby(["layer", "head"])`` keeps model-level rows (pandas drops NaN keys by default).
Logit-lens rows use ``layer`` = number of blocks applied before the unembedding
(0 = embeddings only, n_layer = the model's output), as ``LogitLens.target_probs`` does.

Head pairs (level ``pair``: the composition scores) put the *receiving* head in ``layer`` and
``head`` and the *sending* head, always in an earlier layer, in the metric name after a
slash: ``k_composition/L0H2`` in row (layer 1, head 3) is how much head 1.3's keys read what
head 0.2 writes (``pair_metric``; ``registry.family`` gives back ``k_composition``, and
``pair_table`` the four indices as columns). In W&B that is
``analysis/k_composition/L0H2/L1H3``: sender, then receiver.

Token-level metrics (the per-token losses of the PCA plot) do not fit this schema (they are
indexed by text position), so they live in a separate wide table: one row per (run, step),
one column per evaluated token (``TOKEN_LOSS_PREFIX`` + index).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from induction_dynamics.analysis import registry
from induction_dynamics.files import atomic_write, write_text

COLUMNS = ["run", "seed", "step", "tokens_seen", "metric", "layer", "head", "value", "stderr"]
DTYPES = {"run": "string", "seed": "int64", "step": "int64", "tokens_seen": "int64",
          "metric": "string", "layer": "int64", "head": "int64", "value": "float64", "stderr": "float64"}
TOKEN_LOSS_PREFIX = "tok_"

def pair_metric(family: str, layer: int, head: int) -> str:
    """Table metric of a pair whose sending head is (layer, head): ``k_composition/L0H2``."""
    return f"{family}/L{layer}H{head}"


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
    """A DataFrame with exactly COLUMNS in order and the schema's dtypes (a table saved before
    standard errors were kept gets NaN ones)."""
    df = pd.DataFrame(records)
    if "stderr" not in df.columns:
        df = df.assign(stderr=np.nan)
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
    if name.endswith("_max") and name[:-4] in registry.BY_NAME:
        return max_over_heads(df, name[:-4])
    return model_metric(df, name)


def curve_stderr(df: pd.DataFrame, name: str) -> pd.Series:
    """The standard error of ``curve(df, name)`` per step: a model-level metric's own; for
    ``<metric>_max``, that of the head that holds the maximum at that step."""
    if name.endswith("_max") and name[:-4] in registry.BY_NAME:
        d = df[(df["metric"] == name[:-4]) & (df["head"] >= 0)]
        top = d.loc[d.groupby("step")["value"].idxmax().dropna()]
        return top.set_index("step")["stderr"].sort_index()
    d = df[(df["metric"] == name) & (df["layer"] == -1) & (df["head"] == -1)]
    return d.groupby("step")["stderr"].mean().sort_index()


def head_matrix(df: pd.DataFrame, metric: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(steps, labels "L.H", values (n_heads, n_steps)) of a head-level metric, for heatmaps."""
    d = df[(df["metric"] == metric) & (df["head"] >= 0)]
    wide = d.pivot_table(index=["layer", "head"], columns="step", values="value", aggfunc="mean")
    labels = [f"{l}.{h}" for l, h in wide.index]
    return wide.columns.to_numpy(), labels, wide.to_numpy()


def layer_matrix(df: pd.DataFrame, metric: str, column: str = "value") -> pd.DataFrame:
    """A layer-level metric as a DataFrame: index step, one column per layer (``column``:
    "value" or "stderr"). A step whose values are all NaN stays, as NaN (a gap in the plot)."""
    d = df[(df["metric"] == metric) & (df["head"] == -1) & (df["layer"] >= 0)]
    return d.pivot_table(index="step", columns="layer", values=column, aggfunc="mean", dropna=False).sort_index()


def wandb_key(metric: str, layer: int, head: int) -> str:
    """W&B key of one table cell: analysis/<metric>[/L<layer>[H<head>]]."""
    if head >= 0:
        return f"analysis/{metric}/L{layer}H{head}"
    if layer >= 0:
        return f"analysis/{metric}/L{layer}"
    return f"analysis/{metric}"


def wide_by_step(df: pd.DataFrame) -> pd.DataFrame:
    """One row per checkpoint: step, tokens_seen, every cell as a W&B-style column, plus <metric>_max
    and, for a model-level metric with a standard error, ``analysis/<metric>_stderr``."""
    out = df.assign(key=[wandb_key(m, l, h) for m, l, h in zip(df["metric"], df["layer"], df["head"])])
    wide = out.pivot_table(index=["step", "tokens_seen"], columns="key", values="value", aggfunc="mean")
    errs = out[(out["layer"] == -1) & (out["head"] == -1) & out["stderr"].notna()]
    if not errs.empty:
        errs = errs.assign(key=errs["key"] + "_stderr")
        wide = wide.join(errs.pivot_table(index=["step", "tokens_seen"], columns="key", values="stderr",
                                          aggfunc="mean"))
    for metric in df.loc[df["head"] >= 0, "metric"].unique():
        if registry.of(metric).level == registry.Level.pair:
            continue  # a pair's sender is in its name: no max over heads
        wide[f"analysis/{metric}_max"] = max_over_heads(df, metric).reindex(wide.index.get_level_values("step")).to_numpy()
    return wide.reset_index().sort_values("step").reset_index(drop=True)
