"""Data-parallel curvature on ``torch.distributed`` (gloo on CPU, NCCL on GPUs; ``torchrun``).

The design of KAISA (kfac-pytorch): gradients are averaged every step (by
``DistributedDataParallel`` when the model is wrapped, else by one coalesced all-reduce here);
curvature factors are averaged with one coalesced all-reduce **only on refresh steps**;
inverses (eigen-decompositions, roots) are assigned to ranks by a cost model (greedy, largest
first) and broadcast from their owner, or computed on every rank (``"replicated"``: less
communication, more compute).

Where each maker communicates: the natural-gradient makers (K-FAC, EKFAC, diagonal, unit-wise,
layer-wise / full with EMA) all-reduce this step's per-layer curvature before the EMA; EKFAC
also its scalings (its eigh runs on every rank on the identical averaged factors); layer-wise /
full without EMA all-gather the per-sample rows (scaled by 1/sqrt(world size)). Shampoo builds
its statistics from the already averaged gradient, so they are identical on every rank without
a curvature collective (averaging per-rank G_r G_rᵀ would be another matrix); only its roots
are broadcast. ``AdaFisher(dist=True)`` all-reduces its diagonal factors on refresh steps.
``LowRankKfacGradientMaker`` raises ``NotImplementedError`` under ``torch.distributed``.
The MC-sampling generator of a maker is seeded with ``seed + rank``.

Assumption (documented, not checked every step): every rank has the same batch size, so the
mean over ranks of per-rank means is the mean over the concatenated batch.

Every collective goes through :func:`collective`, which counts it by category (tests assert
"no curvature collective on non-refresh steps") and turns a failure or a timeout (the process
group's ``timeout``) into a :class:`CurvfunDistributedError` naming the rank, the step and the
collective, instead of a bare backend error or a hang.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Callable, Iterable, Mapping

import optree
import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "CurvfunDistributedError",
    "is_distributed",
    "rank",
    "world_size",
    "COUNTS",
    "reset_counts",
    "collective",
    "all_reduce_mean_coalesced",
    "all_reduce_tree_mean",
    "assign_by_cost",
    "broadcast_from_owners",
    "check_same_structure",
    "is_ddp",
    "average_gradients",
    "all_gather_rows",
    "inverse_cost",
    "owners_for",
    "INVERSE_MODES",
]

INVERSE_MODES = ("assigned", "replicated")

#: number of collectives issued per category since the last :func:`reset_counts`
COUNTS: collections.Counter = collections.Counter()
#: bytes sent per category (payload sizes, not the backend's wire bytes)
BYTES: collections.Counter = collections.Counter()


class CurvfunDistributedError(RuntimeError):
    """A collective failed or timed out (a rank died, the network broke, ranks diverged)."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def reset_counts() -> None:
    COUNTS.clear()
    BYTES.clear()


def collective(category: str, what: str, step: int | None, fn: Callable[[], Any], nbytes: int = 0) -> Any:
    """Run one collective ``fn()``, counted under ``category``; failures become
    :class:`CurvfunDistributedError` naming rank, step and collective."""
    COUNTS[category] += 1
    BYTES[category] += int(nbytes)
    try:
        return fn()
    except Exception as e:  # gloo/NCCL raise RuntimeError (or DistBackendError) on timeout/peer loss
        raise CurvfunDistributedError(
            f"rank {rank()} of {world_size()}: collective {what!r} ({category}) failed at step {step}: {e}. "
            f"Another rank probably died or timed out; the job stops here."
        ) from e


def _flatten(tensors: list[Tensor]) -> dict[torch.dtype, tuple[Tensor, list[int]]]:
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return {dt: (torch.cat([tensors[i].reshape(-1) for i in idx]), idx) for dt, idx in groups.items()}


def all_reduce_mean_coalesced(tensors: list[Tensor], category: str, step: int | None = None) -> list[Tensor]:
    """The mean over ranks of each tensor: one all-reduce per dtype over a flat buffer.
    Returns new tensors (same shapes); identity when not distributed."""
    if not is_distributed() or not tensors:
        return list(tensors)
    out: list[Tensor | None] = [None] * len(tensors)
    ws = world_size()
    for dt, (buf, idx) in _flatten(tensors).items():
        collective(category, f"all_reduce[{dt}]", step, lambda b=buf: dist.all_reduce(b), buf.numel() * buf.element_size())
        buf.div_(ws)
        i = 0
        for j in idx:
            n = tensors[j].numel()
            out[j] = buf[i : i + n].view_as(tensors[j])
            i += n
    return out  # type: ignore[return-value]


def all_reduce_tree_mean(tree: Any, category: str, step: int | None = None) -> Any:
    """:func:`all_reduce_mean_coalesced` over every tensor of a pytree (factor objects included,
    optree namespace ``"curvfun"``)."""
    leaves, spec = optree.tree_flatten(tree, namespace="curvfun")
    idx = [i for i, l in enumerate(leaves) if isinstance(l, Tensor)]
    reduced = all_reduce_mean_coalesced([leaves[i] for i in idx], category, step)
    for i, r in zip(idx, reduced):
        leaves[i] = r
    return optree.tree_unflatten(spec, leaves)


def assign_by_cost(costs: Mapping[str, float], n_ranks: int) -> dict[str, int]:
    """Greedy longest-processing-time assignment: items by decreasing cost, each to the rank
    with the least total so far (ties: lowest rank; names break cost ties, so every rank
    computes the same assignment). Within 4/3 of the optimal makespan."""
    load = [0.0] * n_ranks
    out = {}
    for name, c in sorted(costs.items(), key=lambda kv: (-kv[1], kv[0])):
        r = min(range(n_ranks), key=lambda i: (load[i], i))
        out[name] = r
        load[r] += c
    return out


def inverse_cost(obj: Any) -> float:
    """Cost model of inverting / eigen-decomposing a factor object: d³ per (batched) square
    matrix leaf (K-FAC: d_A³ + d_B³), the element count for every other tensor leaf."""
    cost = 0.0
    for t in optree.tree_leaves(obj, namespace="curvfun"):
        if isinstance(t, Tensor):
            if t.ndim >= 2 and t.shape[-1] == t.shape[-2]:
                cost += math.prod(t.shape[:-2]) * float(t.shape[-1]) ** 3
            else:
                cost += t.numel()
    return cost


def owners_for(mode: str, costs: Mapping[str, float]) -> dict[str, int] | None:
    """The owning rank of every item under ``mode="assigned"`` when distributed
    (:func:`assign_by_cost`); None means "compute everything here" (one process or ``"replicated"``)."""
    if mode not in INVERSE_MODES:
        raise ValueError(f"unknown inverse_mode {mode!r}; expected one of {INVERSE_MODES}")
    if not is_distributed() or mode == "replicated":
        return None
    return assign_by_cost(costs, world_size())


def all_gather_rows(rows: Tensor, category: str, step: int | None = None) -> Tensor:
    """Rows ``[R, P]`` of every rank stacked in rank order ``[world·R, P]`` (same shape on every
    rank: equal per-rank batches); identity when not distributed."""
    if not is_distributed():
        return rows
    rows = rows.contiguous()
    out = [torch.empty_like(rows) for _ in range(world_size())]
    collective(category, "all_gather", step, lambda: dist.all_gather(out, rows), rows.numel() * rows.element_size())
    return torch.cat(out, 0)


def broadcast_from_owners(values: dict[str, Any], owners: Mapping[str, int], step: int | None = None) -> dict[str, Any]:
    """Every rank ends with ``values[name]`` as computed by ``owners[name]``: one
    ``broadcast_object_list`` per owning rank (coalesced per owner)."""
    if not is_distributed():
        return dict(values)
    me = rank()
    result: dict[str, Any] = {}
    for r in sorted(set(owners.values())):
        names = sorted(n for n, o in owners.items() if o == r)
        payload = [{n: values.get(n) for n in names} if me == r else None]
        nbytes = sum(
            t.numel() * t.element_size()
            for t in optree.tree_leaves(payload[0], namespace="curvfun") if isinstance(t, Tensor)
        ) if me == r else 0
        collective("inverse", f"broadcast(src={r})", step, lambda p=payload, src=r: dist.broadcast_object_list(p, src=src), nbytes)
        result.update(payload[0])
    return result


def check_same_structure(description: Any, what: str = "model structure") -> None:
    """Raise on every rank when ``description`` (e.g. parameter names and shapes) differs
    between ranks, naming the ranks that differ from rank 0."""
    if not is_distributed():
        return
    gathered: list[Any] = [None] * world_size()
    collective("setup", "all_gather_object", None, lambda: dist.all_gather_object(gathered, description))
    bad = [r for r, d in enumerate(gathered) if d != gathered[0]]
    if bad:
        raise CurvfunDistributedError(
            f"rank {rank()}: the {what} differs between ranks: ranks {bad} differ from rank 0. Every rank must "
            f"build the same model and maker."
        )


def is_ddp(model: torch.nn.Module) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


def average_gradients(params: Iterable[torch.nn.Parameter], step: int | None = None) -> None:
    """``p.grad ← mean over ranks`` for every parameter with a gradient (one coalesced all-reduce)."""
    ps = [p for p in params if p.grad is not None]
    if not ps or not is_distributed():
        return
    reduced = all_reduce_mean_coalesced([p.grad for p in ps], "grad", step)
    for p, g in zip(ps, reduced):
        p.grad.copy_(g)
