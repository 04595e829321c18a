"""Data-parallel runs of the ``curvfun`` command under ``torchrun`` (``--distributed``).

    torchrun --nproc_per_node 2 -m curvfun compare --optimizers sgd,kfac --out runs/dp
    torchrun --nproc_per_node 2 -m curvfun train --optimizer kfac --ddp

With ``--distributed`` (or, by default, whenever torchrun's ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` are set) every rank joins one process group (``env://``; backend gloo on CPU,
nccl on CUDA, ``--dist-backend`` to override; ``--dist-timeout`` seconds per collective), takes
CUDA device ``LOCAL_RANK``, builds the model from the same seed, and trains on its own disjoint
slice of every global batch (``--batch-size`` is the global batch: rank r gets rows
[r·B/W, (r+1)·B/W) of the batch a single process would draw at that step). The makers of
:mod:`curvfun.precondition` (and AdaFisher with ``dist=True``) average gradients and curvature
over the ranks, so the run follows the single-process run on the same batches; ``--ddp`` wraps
the model in ``DistributedDataParallel`` instead of letting the maker average the gradients.
Only rank 0 evaluates, prints, shows progress and writes the run folder and checkpoints; the
logged batch loss is the global batch's mean (one all-reduce of two numbers per step). The
process group is destroyed at the end.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from .config import CliError, Config

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
RENDEZVOUS_ENV = ("MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_ENV)


def _wants_cuda(cfg: Config) -> bool:
    if cfg.device == "auto":
        return torch.cuda.is_available()
    return cfg.device.startswith("cuda")


@contextlib.contextmanager
def distributed_scope(cfg: Config) -> Iterator[Optional[DistContext]]:
    """Join the process group for the duration of a command (None: a single-process run)."""
    wanted = launched_by_torchrun() if cfg.distributed is None else cfg.distributed
    if not wanted:
        if cfg.ddp:
            raise CliError("--ddp wraps the model for a distributed run: launch with torchrun (or pass --distributed)")
        yield None
        return
    if not dist.is_available():
        raise CliError("--distributed: this build of torch has no torch.distributed")
    missing = [v for v in TORCHRUN_ENV + RENDEZVOUS_ENV if v not in os.environ]
    if missing and not dist.is_initialized():
        raise CliError(
            f"--distributed needs the environment of a launcher, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: start with e.g. "
            f"`torchrun --nproc_per_node 2 -m curvfun ...` (or python -m torch.distributed.run)"
        )
    cuda = _wants_cuda(cfg)
    backend = cfg.dist_backend or ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise CliError("--dist-backend nccl needs CUDA devices; use --dist-backend gloo on CPU")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        if not torch.cuda.is_available():
            raise CliError(f"device {cfg.device!r} requested but CUDA is not available; use --device cpu")
        torch.cuda.set_device(local_rank)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    try:
        ctx = DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())
        if cfg.batch_size % ctx.world_size:
            raise CliError(
                f"batch_size {cfg.batch_size} (the global batch) is not divisible by the {ctx.world_size} ranks; "
                f"use a multiple of {ctx.world_size}"
            )
        yield ctx
        if owned:
            # leave together: a rank that tears gloo down while rank 0 still writes the run folder
            # can abort in gloo's destructor ("terminate called without an active exception")
            leave_together()
    finally:
        if owned and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a dead peer's group: nothing left to release cleanly
                pass


def leave_together(barrier=None) -> None:
    """The closing barrier of a distributed command; a failure (a peer died after its last
    collective, or the timeout ran out) becomes a :class:`CurvfunDistributedError`."""
    from .. import distributed as cfd
    cfd.collective("exit", "closing barrier", None, barrier or dist.barrier)


def is_main_rank() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def shard(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous slice of a global batch (the batch itself in one process)."""
    from .. import distributed as cfd

    if not cfd.is_distributed():
        return x, t
    r, w = cfd.rank(), cfd.world_size()
    n = x.shape[0] // w
    return x[r * n:(r + 1) * n], t[r * n:(r + 1) * n]


def global_mean(value: float, count: int, device) -> float:
    """The mean over the concatenated batch of per-rank means ``value`` of ``count`` samples
    (one all-reduce of two numbers; ``value`` itself in one process)."""
    from .. import distributed as cfd

    if not cfd.is_distributed():
        return value
    buf = torch.tensor([value * count, float(count)], dtype=torch.float64, device=device)
    cfd.collective("log", "all_reduce[batch loss]", None, lambda: dist.all_reduce(buf), 16)
    return float(buf[0] / buf[1])
