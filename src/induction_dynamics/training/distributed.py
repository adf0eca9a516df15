"""Data-parallel training under ``torchrun`` (PyTorch DDP), and CPU threads for parallel workers.

    torchrun --standalone --nproc_per_node=8 train.py experiment=...     # one run, 8 GPUs

torchrun starts one process per GPU and tells each who it is through the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR/PORT``).
``setup`` reads it, initialises the process group (``nccl`` on GPU, ``gloo`` on CPU) and
returns a ``DistContext``; without torchrun it returns the single-process context and
touches nothing, so ``python train.py`` never needs a process group.

How the batch is sharded (what makes N processes train like one; docs/scaling.md):
every rank builds the *same* ``BatchSampler`` (same seed, same state) and draws the same
global micro-batch of ``train.batch_size`` rows at every micro-step; rank ``r`` keeps the
contiguous rows ``[r*b, (r+1)*b)`` with ``b = batch_size / world_size`` (``my_rows``). Each
rank's loss is the mean over its ``b*T`` tokens; DDP averages the gradients over ranks,
which is the mean over all ``batch_size*T`` tokens, i.e. one process's gradient. So
``train.batch_size`` and ``train.grad_accum`` mean the same thing for any number of
processes (the global batch per optimizer step is ``grad_accum * batch_size`` sequences),
nothing is divided behind the user's back, and the data order, the RNG streams and the
resume file are those of a one-process run. Gradients are only all-reduced on the last
micro-step of an optimizer step (``no_sync`` on the others), as in nanoGPT.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from induction_dynamics.errors import ConfigError


def env_ranks() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) from torchrun's environment; (0, 1, 0, 1) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")), local_world


def under_torchrun() -> bool:
    return env_ranks()[1] > 1


@dataclass
class DistContext:
    """Who this process is in a data-parallel run; the default is the single process."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # set under torchrun (cuda:LOCAL_RANK or cpu); None: train.device decides
    # gloo group for small CPU-side agreements (``any``): under nccl a flag on the GPU would make
    # every iteration wait for the GPU; None: the default group (already gloo on CPU)
    cpu_group: object = None

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, the resume file, config.yaml and W&B records."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def my_rows(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch: (B, ...) -> (B / world_size, ...)."""
        per = x.shape[0] // self.world_size
        return x[self.rank * per:(self.rank + 1) * per]

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP around ``model`` (it broadcasts rank 0's weights: every rank starts equal)."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def sync_grads(self, model: torch.nn.Module, sync: bool):
        """Context for one micro-step's backward: gradients are all-reduced only when ``sync``."""
        if self.enabled and not sync:
            return model.no_sync()
        return contextlib.nullcontext()

    def mean(self, value: float) -> float:
        """The mean of a Python float over all ranks (the same value on every rank)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)  # sum
        return t.item() / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank (one all-reduce of a CPU int)."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.cpu_group)
        return bool(t.item())

    def broadcast(self, obj):
        """Rank 0's ``obj`` (any picklable value) on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def check_same(self, value, what: str) -> None:
        """Raise ConfigError on every rank if ``value`` differs from rank 0's."""
        if not self.enabled:
            return
        differ = self.mean(float(self.broadcast(value) != value)) > 0
        if differ:
            raise ConfigError(what)

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)


def ddp_device(name: str, local_rank: int, local_world: int) -> torch.device:
    """The device of this rank for ``train.device=name``: cuda:LOCAL_RANK (auto/cuda) or cpu."""
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda:"):
        raise ConfigError(f"train.device={name}: under torchrun each process uses cuda:LOCAL_RANK; "
                          "set train.device=cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES")
    if not torch.cuda.is_available():
        if name == "auto":
            return torch.device("cpu")
        raise ConfigError("train.device=cuda under torchrun, but CUDA is not available here; "
                          "use train.device=cpu (gloo) or run on a GPU node")
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise ConfigError(f"torchrun started {local_world} processes on this node but only {n} GPU(s) are "
                          f"visible; use --nproc_per_node={n} or train.device=cpu")
    return torch.device(f"cuda:{local_rank}")


def setup(device_name: str = "auto") -> DistContext:
    """Join torchrun's process group (nccl on GPU, gloo on CPU); without torchrun: one process."""
    rank, world, local_rank, local_world = env_ranks()
    if world == 1:
        return DistContext()
    if not torch.distributed.is_available():
        raise ConfigError("torchrun started several processes, but this PyTorch build has no torch.distributed")
    device = ddp_device(device_name, local_rank, local_world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _die_with_launcher()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                             rank=rank, world_size=world)
    cpu_group = torch.distributed.new_group(backend="gloo") if device.type == "cuda" else None
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, cpu_group=cpu_group)


def cleanup(ctx: DistContext) -> None:
    if ctx.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _die_with_launcher() -> None:
    """Linux: SIGKILL this worker when its torchrun launcher dies (even by ``kill -9``).

    Without this, workers orphaned by ``kill -9`` of torchrun go on training and writing the
    run directory while the user resumes it in a new launch (measured: they do).
    prctl(PR_SET_PDEATHSIG); a no-op on other systems.
    """
    import signal
    import sys
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before prctl took effect: we are already an orphan
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- threads

def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask: a SLURM allocation, taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def set_worker_threads(budget: int | None) -> int:
    """Cap torch's intra-op threads at ``budget`` (None: leave them); return the count in use.

    Never raises the count above torch's own default (OMP_NUM_THREADS, the affinity mask).
    The budget of a Hydra launcher's job: ``cli.thread_budget``.
    """
    if budget is not None and budget < torch.get_num_threads():
        torch.set_num_threads(budget)
    return torch.get_num_threads()
