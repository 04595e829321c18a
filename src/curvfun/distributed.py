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
``LowRankKfacGradientMaker`` never gathers rows: on curvature steps it all-reduces the factor
statistics once and then, per power-iteration step, the products Uᵀ(U Q) of all layers in one
all-reduce (:func:`curvfun.lowrank.lowrank_kron_many`; ``power_iters + 1`` all-reduces of
O(Σ (d_in + d_out)·k) numbers, whatever the batch). The MC-sampling generator of a maker is
seeded with ``seed + rank``.

Unequal per-rank batch sizes are supported exactly. Inside a maker's ``forward_and_backward``
(:func:`sample_weighting`) every mean over ranks is weighted by the ranks' sample counts
n_r (the leading dimension of the logits): each collective carries its rank's count in one
extra element of its flat buffer (all-reduce of n_r·x_r and n_r, then division by N = Σ n_r),
so the result is the mean over the concatenated batch at no extra collective; gathered rows
are scaled by sqrt(W·n_r/N). A ``DistributedDataParallel`` model averages the gradients in
backward without weights; there the maker learns N by one all-reduce of one number per step
(category ``"batch"``) and back-propagates n_r·W/N times the loss (exactly 1 for equal batches).

Every collective goes through :func:`collective`, which counts it by category (tests assert
"no curvature collective on non-refresh steps") and turns a failure or a timeout (the process
group's ``timeout``) into a :class:`CurvfunDistributedError` naming the rank, the step and the
collective, instead of a bare backend error or a hang.
"""

from __future__ import annotations

import collections
import contextlib
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
    "all_reduce_sum_coalesced",
    "sample_weighting",
    "local_sample_count",
    "ddp_loss_scale",
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
            f"rank {rank()} of {world_size()}: collective {what!r} ({category}) failed"
            f"{'' if step is None else f' at step {step}'}: {e}. "
            f"Another rank probably died or timed out; the job stops here."
        ) from e


def _flatten(tensors: list[Tensor]) -> dict[torch.dtype, tuple[Tensor, list[int]]]:
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return {dt: (torch.cat([tensors[i].reshape(-1) for i in idx]), idx) for dt, idx in groups.items()}


#: stack of callables giving this rank's sample count (see :func:`sample_weighting`)
_SAMPLE_COUNTS: list[Callable[[], Any]] = []


@contextlib.contextmanager
def sample_weighting(count: Callable[[], int | None]):
    """Inside this context, means over ranks (:func:`all_reduce_mean_coalesced`,
    :func:`average_gradients`, :func:`all_gather_rows`) are weighted by every rank's sample count
    ``count()`` (read when the collective runs; None counts as 1), so that they are means over the
    concatenated batch also when the per-rank batches differ. Costs no extra collective: the
    count travels in one extra element of the flat buffer."""
    _SAMPLE_COUNTS.append(count)
    try:
        yield
    finally:
        _SAMPLE_COUNTS.pop()


def local_sample_count() -> float | None:
    """This rank's sample count inside :func:`sample_weighting` (None outside it)."""
    if not _SAMPLE_COUNTS:
        return None
    c = _SAMPLE_COUNTS[-1]()
    return 1.0 if c is None else float(c)


def _no_samples(step: int | None) -> CurvfunDistributedError:
    return CurvfunDistributedError(
        f"rank {rank()} of {world_size()}: no rank has a sample at step {step} (every batch is empty)"
    )


def all_reduce_sum_coalesced(tensors: list[Tensor], category: str, step: int | None = None) -> list[Tensor]:
    """The sum over ranks of each tensor: one all-reduce per dtype over a flat buffer (never
    weighted). Returns new tensors (same shapes); identity when not distributed."""
    if not is_distributed() or not tensors:
        return list(tensors)
    out: list[Tensor | None] = [None] * len(tensors)
    for dt, (buf, idx) in _flatten(tensors).items():
        collective(category, f"all_reduce[{dt}]", step, lambda b=buf: dist.all_reduce(b), buf.numel() * buf.element_size())
        _unflatten(buf, idx, tensors, out)
    return out  # type: ignore[return-value]


def _unflatten(buf: Tensor, idx: list[int], like: list[Tensor], out: list) -> None:
    i = 0
    for j in idx:
        n = like[j].numel()
        out[j] = buf[i : i + n].view_as(like[j])
        i += n


def all_reduce_mean_coalesced(tensors: list[Tensor], category: str, step: int | None = None) -> list[Tensor]:
    """The mean over ranks of each tensor: one all-reduce per dtype over a flat buffer.
    Inside :func:`sample_weighting` the mean is weighted by the ranks' sample counts n_r
    (Σ n_r·x_r / Σ n_r): the count rides as one extra element on the widest floating buffer
    (no extra collective). Returns new tensors (same shapes); identity when not distributed."""
    if not is_distributed() or not tensors:
        return list(tensors)
    out: list[Tensor | None] = [None] * len(tensors)
    ws = world_size()
    groups = _flatten(tensors)
    w = local_sample_count()
    if w is None:
        for dt, (buf, idx) in groups.items():
            collective(category, f"all_reduce[{dt}]", step, lambda b=buf: dist.all_reduce(b), buf.numel() * buf.element_size())
            buf.div_(ws)
            _unflatten(buf, idx, tensors, out)
        return out  # type: ignore[return-value]
    bad = [dt for dt in groups if not dt.is_floating_point]
    if bad:
        raise TypeError(f"a mean over ranks needs floating-point tensors, got {bad}")
    carrier = max(groups, key=lambda dt: torch.finfo(dt).bits)  # widest dtype: holds the count best
    bufs = {}
    for dt, (buf, _) in groups.items():
        buf = buf.mul_(w) if w != 0 else buf.zero_()  # 0·NaN of an empty batch's mean would be NaN
        bufs[dt] = torch.cat([buf, buf.new_full((1,), w)]) if dt == carrier else buf
    for dt, buf in bufs.items():
        collective(category, f"all_reduce[{dt}]", step, lambda b=buf: dist.all_reduce(b), buf.numel() * buf.element_size())
    total = float(bufs[carrier][-1])
    if total <= 0:
        raise _no_samples(step)
    for dt, (_, idx) in groups.items():
        buf = bufs[dt][:-1] if dt == carrier else bufs[dt]
        _unflatten(buf.div_(total), idx, tensors, out)
    return out  # type: ignore[return-value]


def ddp_loss_scale(local_count: float, device: torch.device | str, step: int | None = None) -> float:
    """W·n_r/N for this rank (one all-reduce of one number, category ``"batch"``): the factor
    by which a rank scales its mean loss before ``backward()`` under ``DistributedDataParallel``,
    whose unweighted average of the gradients then is the gradient of the concatenated batch's
    mean loss. Exactly 1.0 when every rank has the same count; 1.0 when not distributed."""
    if not is_distributed():
        return 1.0
    t = torch.tensor([float(local_count)], dtype=torch.float64, device=device)
    collective("batch", "all_reduce[sample count]", step, lambda: dist.all_reduce(t), 8)
    total = float(t[0])
    if total <= 0:
        raise _no_samples(step)
    return world_size() * float(local_count) / total


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
    """Rows ``[R_r, P]`` of every rank stacked in rank order ``[Σ R_r, P]``; identity when not
    distributed. Two all-gathers: the row counts (and sample counts), then the rows padded to
    the largest count. Inside :func:`sample_weighting` rank r's rows are scaled by
    sqrt(W·n_r/N), so that (stacked rows)ᵀ(stacked rows)/W is the sample-weighted mean over ranks
    of R_rᵀR_r (exactly 1 for equal counts)."""
    if not is_distributed():
        return rows
    ws = world_size()
    rows = rows.contiguous()
    w = local_sample_count()
    meta = torch.tensor([float(rows.shape[0]), 1.0 if w is None else w], dtype=torch.float64, device=rows.device)
    metas = [torch.empty_like(meta) for _ in range(ws)]
    collective(category, "all_gather[row counts]", step, lambda: dist.all_gather(metas, meta), 16)
    counts = [int(m[0]) for m in metas]
    weights = [float(m[1]) for m in metas]
    top = max(counts)
    padded = rows if rows.shape[0] == top else torch.cat([rows, rows.new_zeros(top - rows.shape[0], *rows.shape[1:])])
    out = [torch.empty_like(padded) for _ in range(ws)]
    collective(category, "all_gather", step, lambda: dist.all_gather(out, padded), padded.numel() * padded.element_size())
    parts = [o[:c] for o, c in zip(out, counts)]
    if w is not None:
        total = sum(weights)
        if total <= 0:
            raise _no_samples(step)
        parts = [p * math.sqrt(ws * wr / total) if wr != total / ws else p for p, wr in zip(parts, weights)]
    return torch.cat(parts, 0)


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
