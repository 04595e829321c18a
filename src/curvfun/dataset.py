"""Curvature over a data set: accumulation over batches, scaled Kronecker factors as lists.

* :func:`accumulate` sums a curvature function over an iterable of ``(inputs, targets)``
  batches (a ``DataLoader``), holding one batch at a time. ``reduction="sum"``: Σ over every
  sample of the data set; ``"mean"``: that sum divided by the total count (the number of
  samples, or for a loss module with ``reduction="mean"`` the count it divides by: targets ≠
  ``ignore_index`` for ``nn.CrossEntropyLoss``, output entries for ``nn.MSELoss`` /
  ``nn.BCEWithLogitsLoss``). Batches of unequal size therefore weigh by their size: the result
  is the curvature of the data set's mean loss, not the mean of per-batch means.
* :func:`kfac_lists` gives K-FAC factors per parameter in ``params`` order (``[B, A]`` for a
  weight with block A⊗B... on row-major ``vec(W)`` that is ``kron(B, A)``; ``[B]`` for a bias),
  with the reduction's scaling on B.
* :func:`scale_factor` (from :mod:`curvfun.kron_drivers`) multiplies any factor object of
  :func:`curvfun.kfac` by a scalar.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor, nn

from .kron import KronFactor
from .kron_drivers import kfac, scale_factor
from .kron_rows import KronRowsFactor
from .reduction import LOSS_MODULES, REDUCTIONS, resolve_loss
from .rows import module_of
from .tree import tree_map

__all__ = ["accumulate", "kfac_lists", "scale_factor"]


def kfac_lists(
    model: nn.Module,
    params: Mapping[str, Tensor],
    inputs: Any,
    targets: Tensor | None = None,
    loss: Any = "cross_entropy",
    fisher_type: str = "mc",
    reduction: str | None = None,
    **kwargs,
) -> list[list[Tensor]]:
    """K-FAC factors as one list per entry of ``params``, in its order (``model.parameters()``
    order for ``dict(model.named_parameters())``): ``[B, A]`` for a weight (the block
    ``kron(B, A)`` on row-major ``vec(W)``, i.e. A⊗B in the GUIDE's notation), ``[B]`` for its
    bias. B carries the reduction's scaling (see :func:`curvfun.kfac`), A is the mean over the
    layer inputs. ``kwargs`` go to :func:`curvfun.kfac` (``kfac_type``, ``n_mc_samples``, ...).
    Only ungrouped Linear / convolution layers with ``bias="separate"`` have such factors; any
    other parameter raises, naming it."""
    fs = kfac(model, params, inputs, targets, loss, fisher_type, reduction=reduction, **kwargs)
    out = []
    for k in params:
        m = module_of(k)
        f = fs.get(m)
        if isinstance(f, KronRowsFactor):
            f = f.dense()
        if not isinstance(f, KronFactor) or f.groups != 1 or f.folded:
            what = "no K-FAC factor" if f is None else type(f).__name__ + (" (grouped)" if isinstance(f, KronFactor) else "")
            raise ValueError(f"kfac_lists: parameter {k!r} ({what}) has no [B, A] Kronecker factors; "
                             f"leave it out of params (Linear / ungrouped convolutions with a separate bias only)")
        out.append([f.B] if k.rsplit(".", 1)[-1] == "bias" else [f.B, f.A])
    return out


def _batch_count(loss: Any, reduction: str, inputs: Any, targets: Tensor | None) -> int:
    """The count the batch's mean divides by (see the module docstring)."""
    if isinstance(loss, nn.CrossEntropyLoss) and loss.reduction == "mean" and targets is not None:
        return int((targets != loss.ignore_index).sum())
    if isinstance(loss, (nn.MSELoss, nn.BCEWithLogitsLoss)) and loss.reduction == "mean" and targets is not None:
        return targets.numel()
    from .capture import check_batch

    return check_batch(inputs, targets)


def accumulate(fn: Callable, model: nn.Module, params: Mapping[str, Tensor], batches: Iterable,
               *args, loss: Any = "cross_entropy", reduction: str | None = None, **kwargs) -> Any:
    """``fn(model, params, inputs, targets, *args, loss=..., reduction="sum", **kwargs)`` summed
    over the ``(inputs, targets)`` batches, then divided by the total count for the mean (see the
    module docstring). ``fn``: :func:`curvfun.fisher`, :func:`curvfun.ggn`, :func:`curvfun.hessian`,
    their ``*_vp`` products, or :func:`kfac_lists` (whose A factors are averaged over batches
    weighted by batch size, B summed: the factors of the data set, one Kronecker product).
    ``reduction=None``: the loss module's own, else ``"mean"``."""
    if isinstance(loss, LOSS_MODULES):
        resolve_loss(loss, reduction)  # validates
        red = loss.reduction
        per_batch = copy.copy(loss)
        per_batch.reduction = "sum"
    else:
        red = reduction or "mean"
        if red not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
        per_batch = loss
    total, count, n_samples = None, 0, 0
    a_sum = None
    for b, batch in enumerate(batches):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(f"accumulate: batch {b} is a {type(batch).__name__}; expected (inputs, targets) pairs")
        x, y = batch
        kw = dict(kwargs, loss=per_batch)
        if not isinstance(per_batch, nn.Module):
            kw["reduction"] = "sum"
        res = fn(model, params, x, y, *args, **kw)
        count += _batch_count(loss, red, x, y)
        if fn is kfac_lists:
            from .capture import check_batch

            N = check_batch(x, y)
            n_samples += N
            As = [[f[1] * N] if len(f) == 2 else [] for f in res]
            Bs = [[f[0]] for f in res]
            a_sum = As if a_sum is None else [[u + v for u, v in zip(p, q)] for p, q in zip(a_sum, As)]
            res = Bs
        total = res if total is None else tree_map(lambda u, v: u + v, total, res)
    if total is None:
        raise ValueError("accumulate: the iterable of batches was empty")
    if red == "mean":
        total = tree_map(lambda t: t / count, total)
    if fn is kfac_lists:
        return [[B[0], A[0] / n_samples] if A else [B[0]] for B, A in zip(total, a_sum)]
    return total
