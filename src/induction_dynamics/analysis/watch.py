"""``watch=true``: follow a training that is still writing checkpoints.

Pass after pass (``Session.discover`` + ``Session.analyse``, ``watch_poll_s`` apart), each new
checkpoint is analysed as it appears and its curves go to W&B; the plots are drawn once, at
the end. The watch ends when every run's final checkpoint (its config's ``train.max_iters``)
has been analysed or has failed, or after ``watch_timeout_s``.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def finished(session) -> bool:
    """Every known run's final step has been analysed (or could not be read)."""
    ready = [s for s in session.runs.values() if s.context is not None]
    if not ready or len(ready) < len(session.run_dirs):
        return False
    for state in ready:
        ctx = state.context
        done = set(state.result.table["step"].tolist()) if state.result is not None else set()
        done |= {e["step"] for e in ctx.errors}
        if ctx.record.max_iters is None or not done or max(done) < ctx.record.max_iters:
            return False
    return True


def follow(session) -> None:
    """Analyse ``session``'s folder pass after pass until its training is done (or time is up)."""
    cfg = session.cfg
    deadline = time.monotonic() + cfg.watch_timeout_s
    while True:
        session.discover()
        session.analyse()
        if finished(session):
            return
        if time.monotonic() > deadline:
            log.warning("watch: stopped after watch_timeout_s=%s s before training finished", cfg.watch_timeout_s)
            return
        time.sleep(cfg.watch_poll_s)
