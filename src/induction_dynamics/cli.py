"""The command-line layer shared by train.py, analyze_checkpoints.py and sample.py: one-line
errors, and what only a Hydra launch knows (a launcher's thread budget, torchrun ranks' run dir).

Bad input (``errors.is_bad_input``) ends in one line on stderr and a non-zero exit, no traceback:

    if __name__ == "__main__":
        sys.exit(main_wrapper(hydra_main))

Hydra normally prints its own multi-line report for configuration errors (unknown group
option, unknown key, wrong type); here Hydra is asked to raise instead and the message is
folded into one line (``errors.one_line``). Errors of our own (``errors.InductionDynamicsError``)
already carry one-line messages. Anything else is a bug and keeps its traceback.
``HYDRA_FULL_ERROR=1`` (set by the user) shows full tracebacks for everything.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

from induction_dynamics.errors import is_bad_input, one_line

EXIT_BAD_INPUT = 2
_USER_FULL_ERROR = "INDUCTION_DYNAMICS_FULL_ERROR"  # the user's HYDRA_FULL_ERROR, before we set it


def print_error(e: BaseException) -> None:
    """'error: <one line>' on stderr in ONE write: torchrun ranks share the stream, and
    print()'s separate write of the newline let two ranks' lines run together."""
    sys.stderr.write(f"error: {one_line(e)}\n")
    sys.stderr.flush()


def one_line_errors(task):
    """Decorate a Hydra task function: known errors print one line and exit with status 2.

    Inside the task, so that Hydra's "Error executing job with overrides" preamble is never
    printed; in a multirun the sweep stops at the first failing job, as it does in Hydra.
    """
    @functools.wraps(task)
    def wrapped(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except Exception as e:
            if not is_bad_input(e) or os.environ.get(_USER_FULL_ERROR) == "1":
                raise
            print_error(e)
            raise SystemExit(EXIT_BAD_INPUT) from None
    return wrapped


def main_wrapper(entry) -> int:
    """Run a ``@hydra.main`` function; known errors -> 'error: <one line>' and exit status 2."""
    user_wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ[_USER_FULL_ERROR] = "1" if user_wants_traceback else "0"  # seen by one_line_errors
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing its multi-line report
    # A W&B service inherited from a parent process (a notebook, a test runner) outlives a killed
    # training with that run's stream still open: the resumed process's records would land in the
    # killed one's file, written only when the parent exits. Each command starts its own service.
    os.environ.pop("WANDB_SERVICE", None)
    try:
        entry()
    except Exception as e:
        if not is_bad_input(e) or user_wants_traceback:
            raise
        print_error(e)
        return EXIT_BAD_INPUT
    return 0


def multirun_show_cfg(argv: list[str]) -> list[str]:
    """Let ``-m ... --cfg hydra`` print a sweep job's config, which Hydra itself refuses.

    ``python train.py -m seed=0,1 hydra/launcher=slurm --cfg hydra`` is how a user checks a
    launcher's settings before submitting, but Hydra accepts only one of ``--multirun`` and
    ``--cfg``. This rewrites such a command line into the first job of the sweep in MULTIRUN
    mode (``seed=0 hydra.mode=MULTIRUN``), which composes the same launcher, sweep dir and
    values. Any other command line is returned unchanged.
    """
    multirun = {"-m", "--multirun"}
    show = any(a in ("-c", "--cfg") or a.startswith("--cfg=") for a in argv)
    if not show or not multirun & set(argv):
        return argv
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = [argv[0], "hydra.mode=MULTIRUN"]  # first: argparse wants the overrides before the flags
    for arg in argv[1:]:
        if arg in multirun:
            continue
        try:
            override = parser.parse_override(arg) if "=" in arg and not arg.startswith("-") else None
        except Exception:  # not an override (e.g. a value of a flag): keep it for Hydra to judge
            override = None
        if override is not None and override.is_sweep_override():
            try:
                arg = f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}"
            except Exception:  # an interval sweep (Optuna) has no first value: Hydra reports it
                pass
        out.append(arg)
    return out


# --------------------------------------------------------------------------- Hydra launchers' threads

def thread_budget(launcher=None) -> int | None:
    """Torch threads for one of several processes sharing this machine, or None (not shared).

    - torchrun: ``cores // LOCAL_WORLD_SIZE``;
    - Hydra's joblib launcher: ``cores // n_jobs`` (n_jobs=-1: every core runs a job, 1 thread);
    - Hydra's submitit launchers: ``cpus_per_task`` (unset: 1, SLURM's default allocation);
    - the basic launcher runs jobs one after another: None.
    Two full-thread torch processes on the same cores run many times slower than one.
    """
    from induction_dynamics.training.distributed import (  # torch: only a launch needs it
        cpu_cores,
        env_ranks,
    )

    cores = cpu_cores()
    _, world, _, local_world = env_ranks()
    if world > 1:
        return max(1, cores // max(1, local_world))
    target = str((launcher or {}).get("_target_", "")) if launcher is not None else ""
    if "joblib" in target.lower():
        n_jobs = launcher.get("n_jobs") or 1
        n_jobs = cores + 1 + n_jobs if n_jobs < 0 else n_jobs  # joblib: -1 = all cores, -2 = all but one
        return max(1, cores // max(1, n_jobs))
    if "submitit" in target.lower():
        return max(1, int(launcher.get("cpus_per_task") or 1))
    return None


# --------------------------------------------------------------------------- Hydra under torchrun

def hydra_overrides_for_rank() -> list[str]:
    """Command-line overrides for a torchrun rank other than 0, added before Hydra starts.

    Rank 0 alone writes Hydra's files (``.hydra/``, ``train.log``); the other ranks log
    warnings and errors to stdout. Their run directory is then rank 0's (``agree_run_dir``).
    """
    if int(os.environ.get("RANK", "0")) == 0:  # torchrun's rank (distributed.env_ranks)
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.job_logging.root.level=WARNING"]


def agree_run_dir(ctx, own_dir: str) -> str:
    """Rank 0's run directory on every rank.

    The default ``hydra.run.dir`` holds ``${now:...}``, which each rank resolves at its own
    start, possibly a second apart; rank 0's wins. A rank whose own (empty) directory
    differs removes it again. An explicit ``hydra.run.dir`` is the same on every rank anyway.
    """
    run_dir = ctx.broadcast(str(own_dir))  # ctx: distributed.DistContext
    if run_dir != str(own_dir):
        with contextlib.suppress(OSError):
            os.rmdir(own_dir)  # only ever removes an empty directory
    return run_dir
