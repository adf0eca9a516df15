"""The LLC's SGLD chain loss traces over training, saved (json only; no torch, no plotting here).

The sweep's worker saves each checkpoint's traces next to its rows
(``run_dir.llc_trace_cache_path``: ``{"step", "traces", "num_burnin_steps", "init_loss",
"n_beta", "llc"}``, ``traces`` one list of per-step minibatch losses in nats per chain, burn-in
first); ``save`` gathers them into ``analysis/llc_traces.json``, ``{"steps": [{...}, ...]}`` in
step order, so the traces figure (``plots.circuit.plot_llc_traces``) is redrawn from saved
results (``plots_only=true``). They are the convergence check devinterp's authors read: a chain
should rise from L(w*) and level off within the burn-in.
"""

from __future__ import annotations

from pathlib import Path

from induction_dynamics import run_dir as layout
from induction_dynamics.files import read_json, write_json


def path(run_dir: Path) -> Path:
    return layout.analysis_dir(run_dir) / "llc_traces.json"


def save(run_dir: Path) -> dict | None:
    """Gather the cached per-checkpoint traces; without any (llc not in the suite) a stale file goes."""
    found = [read_json(p) for p in sorted(layout.cache_dir(run_dir).glob("step_*.llc.json"))]
    found = [f for f in found if f]
    if not found:
        path(run_dir).unlink(missing_ok=True)
        return None
    saved = {"steps": sorted(found, key=lambda f: f["step"])}
    write_json(saved, path(run_dir), durable=False)
    return saved


def load(run_dir: Path) -> dict | None:
    return read_json(path(run_dir))
