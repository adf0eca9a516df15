"""Stop training cleanly when a scheduler asks, so that a preempted job loses (almost) nothing.

SLURM and submitit signal a job some seconds before they kill it: ``--signal=USR1@120`` in an
sbatch script sends SIGUSR1 two minutes before the time limit, submitit sends its
``SUBMITIT_PREEMPT_SIGNAL`` (SIGUSR2 by default; ``signal_delay_s`` seconds before), and a
preemption, ``scancel`` or torchrun's shutdown send SIGTERM (then SIGKILL after a grace time).
Inside ``train`` these signals only set a flag (``StopSignals``); the loop reads it once per
iteration, before the next optimizer step, and then

1. writes ``resume.pt`` at that iteration (``loop.save``: the one checkpoint writer, atomic),
2. finishes the W&B run (its records on disk; the resumed process continues the same run),
3. hands the signal to the handler that was there before (submitit's: it requeues the job),
4. and ``train.py`` exits with ``EXIT_REQUEUE``.

Under torchrun every rank agrees on the iteration through ``DistContext.any`` (one all-reduce
of a flag per iteration), so a signal that reaches one rank stops them all at the same step.
A job that SLURM restarts (``scontrol requeue``, a preemption with ``--requeue``) sees
``SLURM_RESTART_COUNT`` >= 1 and resumes its run directory (``slurm_restarted``).

No torch here: ``train.py`` reads ``EXIT_REQUEUE`` before torch is imported.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

# sysexits.h EX_TEMPFAIL: "a temporary failure, the user is invited to retry". Chosen over
# 143 (128 + SIGTERM: what a shell reports for a process the signal *killed*, i.e. nothing
# saved) and 124 (timeout(1): "the command ran out of time"): 75 says "stopped deliberately, with
# a resume point; run the same command again". Distinct from 0 (done), 1 (a bug), 2 (bad
# input, cli.EXIT_BAD_INPUT) and 128+N (killed); SLURM can requeue on it (RequeueExit=75).
EXIT_REQUEUE = 75

# SIGTERM: preemption, scancel, torchrun forwarding its own SIGTERM to the workers;
# SIGUSR1: the usual `#SBATCH --signal=USR1@N`; SIGUSR2: submitit's default preemption signal
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGUSR2") if hasattr(signal, name))


class StopSignals:
    """Context manager: while inside, STOP_SIGNALS set ``signum`` instead of killing the process.

    Handlers are installed only in the main thread (Python allows no other) and the previous
    ones are restored on exit, also when an exception leaves the block. ``forward()`` then
    hands the received signal to the previous handler when that was a Python function (a
    launcher's, e.g. submitit's requeue); the default action (terminate) is not re-raised:
    the caller exits with EXIT_REQUEUE instead.
    """

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def _handle(self, signum, frame) -> None:
        if self.signum is None:  # a second signal while stopping changes nothing
            self.signum = signum
            log.warning("%s received: stopping after this iteration with a resume point",
                        signal.Signals(signum).name)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            log.debug("not in the main thread: %s keep their handlers", [s.name for s in map(signal.Signals, self.signals)])
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        return False

    def forward(self) -> None:
        """Call the handler the received signal had before ``__enter__`` (after ``__exit__``),
        when it was a Python function: submitit's checkpoints the job and requeues it there
        (and exits the process itself)."""
        previous = self._previous.get(self.signum)
        if self.signum is not None and callable(previous):
            previous(self.signum, None)


def slurm_restarted() -> bool:
    """This SLURM job was requeued (``scontrol requeue``, or preempted with ``--requeue``):
    SLURM counts its restarts in SLURM_RESTART_COUNT (absent or 0 on the first start)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0
    except ValueError:
        return False
