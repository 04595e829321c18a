"""``nn.Linear`` on inputs with any leading dims: each leading position is a position t of the
affine family (K-FAC-expand over tokens)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .registry import LayerHandler

__all__ = ["LinearHandler", "tokens_as_positions"]


def tokens_as_positions(inputs: list[Tensor], grads: list[Tensor] | None) -> tuple[Tensor, Tensor | None]:
    """``[N, *, d]`` inputs and ``[K, N, *, o]`` gradients of every call as ``[N, 1, T, d]`` and
    ``[K, N, 1, T, o]`` (calls concatenated along T)."""
    a = _cat([x.reshape(x.shape[0], -1, x.shape[-1]) for x in inputs], 1).unsqueeze(1)
    if grads is None:
        return a, None
    g = _cat([y.reshape(y.shape[0], y.shape[1], -1, y.shape[-1]) for y in grads], 2).unsqueeze(2)
    return a, g


def _cat(ts: list[Tensor], dim: int) -> Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim)


class LinearHandler(LayerHandler):
    """``y = x Wᵀ + b`` on the last dim; groups 1."""

    family = "affine"

    def arrange(self, module: nn.Module, inputs, grads):
        for x in inputs:
            if x.ndim < 2:
                raise ValueError(f"Linear: expected a batched [N, ..., {module.in_features}] input, got shape "
                                 f"{tuple(x.shape)}")
        return tokens_as_positions(inputs, grads)

    def groups(self, module: nn.Module) -> int:
        return 1
