"""Pytree helpers on ``optree``.

Parameters are any pytree of tensors; ``dict(model.named_parameters())`` is the common
case. Every helper here is pure: it returns new tensors and never mutates its arguments.
Leaves are visited in **insertion order** of dicts (for ``dict(model.named_parameters())``:
``model.parameters()`` order), the one flat order of curvfun: :func:`ravel`, :func:`tree_leaves`
and the dense ``[P, P]`` matrices of :mod:`curvfun.curvature` agree, so
``ravel(diag)[0] == torch.diagonal(full)``.
"""

from __future__ import annotations

from typing import Any, Callable

import optree
import torch
from torch import Tensor

__all__ = [
    "tree_map",
    "tree_leaves",
    "tree_add",
    "tree_sub",
    "tree_scale",
    "tree_axpy",
    "tree_dot",
    "tree_norm",
    "tree_zeros_like",
    "tree_ones_like",
    "tree_numel",
    "ravel",
    "unravel",
]

PyTree = Any


def tree_map(fn: Callable, tree: PyTree, *rest: PyTree) -> PyTree:
    """``fn`` applied leafwise over one or more pytrees of the same structure."""
    return optree.tree_map(fn, tree, *rest)


def _flatten(tree: PyTree):
    """``optree.tree_flatten`` with dicts in insertion order (namespace ``"curvfun"``)."""
    with optree.dict_insertion_ordered(True, namespace="curvfun"):
        return optree.tree_flatten(tree, namespace="curvfun")


def tree_leaves(tree: PyTree) -> list[Tensor]:
    """The leaves in curvfun's order (dicts in insertion order)."""
    return _flatten(tree)[0]


def tree_add(x: PyTree, y: PyTree) -> PyTree:
    """x + y leafwise."""
    return optree.tree_map(torch.add, x, y)


def tree_sub(x: PyTree, y: PyTree) -> PyTree:
    """x - y leafwise."""
    return optree.tree_map(torch.sub, x, y)


def tree_scale(x: PyTree, alpha: float | Tensor) -> PyTree:
    """alpha * x leafwise."""
    return optree.tree_map(lambda t: t * alpha, x)


def tree_axpy(alpha: float | Tensor, x: PyTree, y: PyTree) -> PyTree:
    """alpha * x + y leafwise."""
    return optree.tree_map(lambda a, b: b + alpha * a, x, y)


def tree_dot(x: PyTree, y: PyTree) -> Tensor:
    """Σ_leaves ⟨x_leaf, y_leaf⟩ as a 0-dim tensor."""
    leaves_x, spec_x = optree.tree_flatten(x)
    leaves_y, spec_y = optree.tree_flatten(y)
    if spec_x != spec_y:
        raise ValueError(f"tree_dot: the two pytrees differ in structure:\n  {spec_x}\n  {spec_y}")
    if not leaves_x:
        return torch.zeros(())
    return sum((torch.vdot(a.reshape(-1), b.reshape(-1)) for a, b in zip(leaves_x, leaves_y)))


def tree_norm(x: PyTree) -> Tensor:
    """Euclidean norm of all leaves taken together."""
    return torch.sqrt(tree_dot(x, x))


def tree_zeros_like(x: PyTree) -> PyTree:
    return optree.tree_map(torch.zeros_like, x)


def tree_ones_like(x: PyTree) -> PyTree:
    return optree.tree_map(torch.ones_like, x)


def tree_numel(x: PyTree) -> int:
    """Total number of scalars in the pytree (P)."""
    return sum(t.numel() for t in optree.tree_leaves(x))


def ravel(tree: PyTree) -> tuple[Tensor, Callable[[Tensor], PyTree]]:
    """Flatten a pytree of tensors into one vector.

    Returns ``(flat, unravel_fn)`` with ``unravel_fn(flat)`` rebuilding the pytree (same
    shapes, structure, dtypes). Leaves are concatenated in curvfun's order (dicts in insertion
    order, the order of the dense matrices), each leaf in
    row-major (``Tensor.reshape(-1)``) order. Leading batch dims are not supported here; use
    :func:`unravel` with ``batch_dims`` for stacked vectors.
    """
    leaves, spec = _flatten(tree)
    shapes = [t.shape for t in leaves]
    dtypes = [t.dtype for t in leaves]
    if leaves:
        flat = torch.cat([t.reshape(-1) for t in leaves])
    else:
        flat = torch.zeros(0)

    def unravel_fn(vec: Tensor) -> PyTree:
        return unravel(vec, spec, shapes, dtypes)

    return flat, unravel_fn


def unravel(vec: Tensor, spec, shapes, dtypes=None, batch_dims: int = 0) -> PyTree:
    """Split ``vec`` (``[*batch, P]``) into leaves of ``shapes`` under ``spec``."""
    total = sum(int(torch.Size(s).numel()) for s in shapes)
    if vec.shape[-1] != total:
        raise ValueError(f"unravel: vector has {vec.shape[-1]} entries, the pytree needs {total}")
    batch = vec.shape[:batch_dims]
    out, start = [], 0
    for i, s in enumerate(shapes):
        n = int(torch.Size(s).numel())
        leaf = vec[..., start : start + n].reshape(*batch, *s)
        if dtypes is not None:
            leaf = leaf.to(dtypes[i])
        out.append(leaf)
        start += n
    return optree.tree_unflatten(spec, out)
