"""The phase-change curves, drawn from the saved tables only (matplotlib; no torch, no model).

Every function takes ``runs``: an ordered dict ``{run label: tidy DataFrame}`` of runs with
the same model shape (one run for a run's own plots, all seeds for a sweep's), and writes
``<out_dir>/<name>.<fmt>`` for each format (``style.save``):

- ``induction_heatmap``   heads (layer.head) x step, one panel per run
- ``induction_score_max`` max induction score vs step per seed (± its standard error), mean
                          +/- sd band across seeds, window shaded
- ``loss_icl``            validation loss and ICL scores (plain text; text with the run's
                          training repeats) vs step, ± standard error, window shaded (Olsson Fig.)
- ``patching``            patching effect per layer (± standard error for one run), and per
                          head, vs step; undefined effects (NaN) are left blank
- ``logit_lens``          logit-lens probability of the correct token per layer vs step
- ``token_loss_pca``      per-token losses of every checkpoint projected on 2 principal
                          components, a trajectory per run coloured by step (Olsson et al.)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from induction_dynamics.analysis.plots.style import (
    band,
    heatmap,
    mean_sd,
    save,
    seed_of,
    shade,
    windows,
)
from induction_dynamics.analysis.table import (
    TOKEN_LOSS_PREFIX,
    curve,
    curve_stderr,
    head_matrix,
    layer_matrix,
    model_metric,
)


def plot_induction_heatmap(runs: dict, out_dir: Path, formats, dpi) -> list[Path]:
    n = len(runs)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.8 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    im = None
    for ax, (label, df) in zip(axes, runs.items()):
        im = heatmap(ax, *head_matrix(df, "induction_score"), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(seed_of(df, label), fontsize=10)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.colorbar(im, ax=axes[:n].tolist(), label="induction score")
    fig.suptitle("Induction score per head")
    return save(fig, out_dir, "induction_heatmap", formats, dpi)


def plot_induction_max(runs: dict, phase, out_dir: Path, formats, dpi) -> list[Path]:
    fig = Figure(figsize=(6.4, 4), layout="constrained")
    ax = fig.subplots()
    curves = []
    for label, df in runs.items():
        c = curve(df, "induction_score_max")
        curves.append(c)
        line, = ax.plot(c.index, c.to_numpy(), marker="o", ms=3, lw=1, alpha=0.8, label=seed_of(df, label))
        band(ax, c.index, c.to_numpy(), curve_stderr(df, "induction_score_max"), line.get_color(), 0.15)
    spread = mean_sd(curves)
    if spread is not None:
        steps, mean, sd = spread
        ax.plot(steps, mean, color="k", lw=2, label=f"mean of {len(curves)}")
        ax.fill_between(steps, mean - sd, mean + sd, color="k", alpha=0.15, lw=0, label="± sd")
    shade(ax, windows(phase, "induction_score_max"))
    ax.set_xlabel("training step")
    ax.set_ylabel("max induction score over heads")
    ax.set_title("Induction heads form")
    ax.legend(fontsize=8)
    return save(fig, out_dir, "induction_score_max", formats, dpi)


def plot_loss_icl(runs: dict, phase, loss_metric: str, out_dir: Path, formats, dpi) -> list[Path]:
    fig = Figure(figsize=(6.4, 5.5), layout="constrained")
    ax_loss, ax_icl = fig.subplots(2, 1, sharex=True)
    for label, df in runs.items():
        name = seed_of(df, label)
        loss_name = loss_metric if not model_metric(df, loss_metric).empty else "val_loss"
        loss = model_metric(df, loss_name)
        line, = ax_loss.plot(loss.index, loss.to_numpy(), marker="o", ms=3, lw=1, label=name)
        band(ax_loss, loss.index, loss.to_numpy(), curve_stderr(df, loss_name), line.get_color())
        trainer = model_metric(df, "val_loss")
        if loss_metric != "val_loss" and not trainer.empty:  # the trainer's own estimate, where saved
            ax_loss.plot(trainer.index, trainer.to_numpy(), ls="--", lw=1, color=line.get_color(),
                         label=f"{name} (trainer val_loss)")
        icl = model_metric(df, "icl_score")
        line, = ax_icl.plot(icl.index, icl.to_numpy(), marker="o", ms=3, lw=1, label=f"{name}, plain text")
        band(ax_icl, icl.index, icl.to_numpy(), curve_stderr(df, "icl_score"), line.get_color())
        icl_rep = model_metric(df, "icl_score_repeats")
        if not icl_rep.empty:  # the training distribution: text with the run's repeat curriculum
            ax_icl.plot(icl_rep.index, icl_rep.to_numpy(), marker="s", ms=3, lw=1, ls="--",
                        color=line.get_color(), label=f"{name}, text with the training repeats")
            band(ax_icl, icl_rep.index, icl_rep.to_numpy(), curve_stderr(df, "icl_score_repeats"),
                 line.get_color(), 0.1)
    window = windows(phase, "induction_score_max")
    for ax in (ax_loss, ax_icl):
        shade(ax, window)
    ax_loss.set_ylabel("loss (nats)" if loss_metric != "val_loss" else "val_loss (nats)")
    ax_loss.set_title("Loss and in-context learning around the phase change")
    ax_icl.set_ylabel("ICL score (late - early loss; ± s.e.)")
    ax_icl.axhline(0, color="grey", lw=0.5)
    ax_icl.set_xlabel("training step")
    ax_loss.legend(fontsize=8)
    ax_icl.legend(fontsize=8)
    return save(fig, out_dir, "loss_icl", formats, dpi)


def _mean_over_runs(frames: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(frames).groupby(level=0).mean().sort_index() if frames else pd.DataFrame()


def plot_patching(runs: dict, out_dir: Path, formats, dpi) -> list[Path]:
    metrics = [m for m in ("patch_resid", "patch_attn_out", "patch_mlp_out")
               if any((df["metric"] == m).any() for df in runs.values())]
    fig = Figure(figsize=(4.2 * (len(metrics) + 1), 3.6), layout="constrained")
    axes = fig.subplots(1, len(metrics) + 1, squeeze=False).ravel()
    suffix = f" (mean of {len(runs)} runs)" if len(runs) > 1 else ""
    for ax, metric in zip(axes, metrics):
        mean = _mean_over_runs([layer_matrix(df, metric) for df in runs.values()])
        err = layer_matrix(next(iter(runs.values())), metric, "stderr") if len(runs) == 1 else None
        for layer in mean.columns:
            line, = ax.plot(mean.index, mean[layer].to_numpy(), marker="o", ms=3, lw=1, label=f"layer {layer}")
            if err is not None:
                band(ax, mean.index, mean[layer].to_numpy(), err[layer], line.get_color())
        ax.ticklabel_format(axis="y", useOffset=False)  # 1.0 stays "1.0", not "1e-5 + 1"
        ax.set_title(metric + suffix, fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("normalised patching effect")
        ax.legend(fontsize=7)
    ax = axes[-1]
    mats = [head_matrix(df, "patch_head") for df in runs.values()]
    mats = [m for m in mats if m[2].size]
    if mats:
        steps, heads, values = mats[0]
        same = [m[2] for m in mats if m[2].shape == values.shape and np.array_equal(m[0], steps)]
        im = heatmap(ax, steps, heads, np.mean(same, axis=0), cmap="RdBu_r", vmin=-1, vmax=1)
        fig.colorbar(im, ax=ax, label="effect")
    ax.set_title("patch_head" + suffix, fontsize=9)
    fig.suptitle("Activation patching on the induction task (1 = restores the clean answer)")
    return save(fig, out_dir, "patching", formats, dpi)


def plot_logit_lens(runs: dict, out_dir: Path, formats, dpi) -> list[Path]:
    fig = Figure(figsize=(6.4, 4), layout="constrained")
    ax = fig.subplots()
    mean = _mean_over_runs([layer_matrix(df, "logit_lens_prob") for df in runs.values()])
    err = layer_matrix(next(iter(runs.values())), "logit_lens_prob", "stderr") if len(runs) == 1 else None
    n_layer = int(mean.columns.max()) if len(mean.columns) else 0
    for layer in mean.columns:
        name = "embeddings" if layer == 0 else (f"after block {layer - 1}" + (" (output)" if layer == n_layer else ""))
        line, = ax.plot(mean.index, mean[layer].to_numpy(), marker="o", ms=3, lw=1, label=name)
        if err is not None:
            band(ax, mean.index, mean[layer].to_numpy(), err[layer], line.get_color())
    ax.set_xlabel("training step")
    ax.set_ylabel("p(correct next token)")
    ax.set_ylim(0, 1)
    suffix = f", mean of {len(runs)} runs" if len(runs) > 1 else ""
    ax.set_title(f"Logit lens on the induction task{suffix}")
    ax.legend(fontsize=8)
    return save(fig, out_dir, "logit_lens", formats, dpi)


def token_loss_pca(tokens: dict[str, pd.DataFrame], n_components: int = 2):
    """Joint PCA of every checkpoint's per-token-loss vector.

    Returns ``({run: (steps, coords (n_ckpt, n_components))}, explained variance ratio)``.
    PCA by SVD of the checkpoint x token matrix centred on its mean (numpy only).
    """
    blocks = {run: t.sort_values("step") for run, t in tokens.items() if len(t)}
    cols = [c for c in next(iter(blocks.values())).columns if c.startswith(TOKEN_LOSS_PREFIX)]
    raw = np.concatenate([b[cols].to_numpy(dtype=float) for b in blocks.values()])  # (n_ckpt, n_tokens)
    mu = raw.mean(0, keepdims=True)
    _, s, vt = np.linalg.svd(raw - mu, full_matrices=False)
    k = min(n_components, len(s))
    explained = (s[:k] ** 2) / max(float((s ** 2).sum()), 1e-12)
    out = {}
    for run, b in blocks.items():
        coords = (b[cols].to_numpy(dtype=float) - mu) @ vt[:k].T  # (n_ckpt, k)
        out[run] = (b["step"].to_numpy(), coords)
    return out, explained


def plot_token_loss_pca(runs: dict, tokens: dict[str, pd.DataFrame], out_dir: Path, formats, dpi) -> list[Path]:
    fig = Figure(figsize=(6.4, 5), layout="constrained")
    ax = fig.subplots()
    traj, explained = token_loss_pca({r: tokens[r] for r in runs if r in tokens})
    vmin = min(s.min() for s, _ in traj.values())
    vmax = max(s.max() for s, _ in traj.values())
    sc = None
    for run, (steps, xy) in traj.items():
        ys = xy[:, 1] if xy.shape[1] > 1 else np.zeros(len(xy))
        ax.plot(xy[:, 0], ys, color="grey", lw=0.8, alpha=0.6)
        sc = ax.scatter(xy[:, 0], ys, c=steps, cmap="viridis", vmin=vmin, vmax=vmax, s=18, zorder=3)
        ax.annotate(seed_of(runs[run], run), (xy[-1, 0], ys[-1]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    fig.colorbar(sc, ax=ax, label="training step")
    ax.set_xlabel(f"PC1 ({explained[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({explained[1]:.0%})" if len(explained) > 1 else "PC2")
    ax.set_title("Per-token losses across checkpoints (PCA)")
    return save(fig, out_dir, "token_loss_pca", formats, dpi)
