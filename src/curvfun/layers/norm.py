"""Affine normalisation layers: LayerNorm, BatchNorm1d/2d/3d, GroupNorm, InstanceNorm (affine).

Each arranges its record as the normalised input x̂ ``[N, T, C]`` and output gradients
``[K, N, T, C]`` (C the affine width: ``Π normalized_shape`` for LayerNorm, channels otherwise;
T the remaining positions). The weight gradient is ``Σ_t g ⊙ x̂``, the bias ``Σ_t g``.
BatchNorm uses the batch statistics in train mode (they mix the samples: per-sample quantities
are then undefined and refused upstream) and the running statistics in eval mode.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import LayerHandler

__all__ = ["NormHandler", "per_sample_grads", "per_sample_sq_norms"]


def _channels_last(y: Tensor, lead: int) -> Tensor:
    """``[*lead, C, *S]`` -> ``[*lead, Π S, C]``."""
    C = y.shape[lead]
    return y.movedim(lead, -1).reshape(*y.shape[:lead], -1, C)


def normalised(module: nn.Module, x: Tensor) -> Tensor:
    """x̂ of one call, ``[N, T, C]``."""
    if isinstance(module, nn.LayerNorm):
        xhat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        return xhat.reshape(x.shape[0], -1, math.prod(module.normalized_shape))
    if isinstance(module, nn.GroupNorm):
        return _channels_last(F.group_norm(x, module.num_groups, None, None, module.eps), 1)
    # BatchNorm / InstanceNorm: statistics over the batch (BN) or the sample (IN), channel dim 1
    per_sample = isinstance(module, nn.modules.instancenorm._InstanceNorm)
    dims = list(range(2, x.ndim)) if per_sample else [0] + list(range(2, x.ndim))
    use_batch = module.training or module.running_mean is None
    if use_batch:
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
    else:
        shape = [1, -1] + [1] * (x.ndim - 2)
        mean, var = module.running_mean.reshape(shape), module.running_var.reshape(shape)
    return _channels_last((x - mean) / torch.sqrt(var + module.eps), 1)


class NormHandler(LayerHandler):
    family = "norm"

    def reason(self, module: nn.Module) -> str | None:
        if getattr(module, "elementwise_affine", getattr(module, "affine", True)) is False:
            return f"{type(module).__name__} without affine parameters"
        return None

    def arrange(self, module: nn.Module, inputs, grads):
        a = torch.cat([normalised(module, x) for x in inputs], 1)
        if grads is None:
            return a, None
        C = a.shape[-1]
        if isinstance(module, nn.LayerNorm):
            gs = [y.reshape(y.shape[0], y.shape[1], -1, C) for y in grads]
        else:
            gs = [_channels_last(y, 2) for y in grads]
        return a, torch.cat(gs, 2)


def per_sample_grads(xhat: Tensor, g: Tensor, weight_shape: tuple | None, bias_shape: tuple | None) -> dict[str, Tensor]:
    """``{"weight": Σ_t g ⊙ x̂, "bias": Σ_t g}`` per sample from one column ``g`` ``[N, T, C]``. O(N·T·C)."""
    N = g.shape[0]
    out = {}
    if weight_shape is not None:
        out["weight"] = (g * xhat).sum(1).reshape(N, *weight_shape)
    if bias_shape is not None:
        out["bias"] = g.sum(1).reshape(N, *bias_shape)
    return out


def per_sample_sq_norms(xhat: Tensor, g: Tensor, has_weight: bool, has_bias: bool) -> Tensor:
    """``[N]`` squared norms of :func:`per_sample_grads`, O(N·T·C)."""
    sq = g.new_zeros(g.shape[0])
    if has_weight:
        sq = sq + (g * xhat).sum(1).pow(2).sum(-1)
    if has_bias:
        sq = sq + g.sum(1).pow(2).sum(-1)
    return sq
