"""Unit-wise curvature blocks (ASDL's ``SHAPE_UNIT_WISE``): per output unit, the exact block over
the unit's own parameters.

Unit c of an affine layer (Linear, Conv1d/2d/3d, attention projections: the registry's
``"affine"`` family) owns its fan-in row ``W[c].reshape(-1)`` (d = C_in/groups·Π kernel entries;
d = d_in for a Linear) and its bias ``b[c]``; for a transposed convolution the row of its weight
matrix (:func:`curvfun.layers.affine.weight_as_matrix`). Unit c of a norm layer (LayerNorm,
BatchNorm, GroupNorm, InstanceNorm: the ``"norm"`` family) owns (γ_c, β_c). With the per-sample,
per-column gradient of unit c

* affine (``a`` ``[N, G, T, d]``, ``g`` ``[K, N, G, T, o]``, unit c = (group, j)):
  u_kn,c = Σ_t g[k, n, group, t, j] · [a[n, group, t, :], 1];
* norm (x̂ ``[N, T, C]``): u_kn,c = Σ_t g[k, n, t, c] · [x̂[n, t, c], 1];

the block is ``block_c = (1/N) Σ_{k,n} w_k u_kn,c u_kn,cᵀ`` (p x p, p = d + 1; the last entry
dropped without a trainable bias, the first d without a trainable weight): exactly the sub-block
of the dense Fisher / GGN (of the chosen ``fisher_type``) over the unit's parameters, for any N
and T. Returned as a :class:`~curvfun.kron.UnitWiseFactor`.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor, nn

from .capture import ModuleInfo, supported_modules
from .kron import RelaidFactor, UnitWiseFactor
from .layers import LayerData
from .layers.affine import weight_as_matrix

__all__ = ["UNIT_WISE_KINDS", "unit_wise_from_layer", "unit_wise_modules", "unit_wise_from_dense"]

_WEIGHT_KINDS = ("affine",)  # a fan-in row per unit
_NORM_KINDS = ("norm",)  # one (γ_c, β_c) pair per unit
#: layer families (:data:`curvfun.layers.FAMILIES`) that have unit-wise blocks
UNIT_WISE_KINDS = _WEIGHT_KINDS + _NORM_KINDS


def _unit_rows(ld: LayerData, k: int) -> Tensor:
    """The per-sample gradients of every unit for output-gradient column k, ``[C, N, p]``
    (unit-major, so that each unit's Gram is one contiguous GEMM). Linear / Conv2d: one product
    of g with the inputs extended by a ones column (the bias), O(N·C·T·p); memory C·N·p."""
    g = ld.g[k]
    if ld.kind in _WEIGHT_KINDS:
        a = ld.a  # [N, G, T, d]
        if not ld.has_weight:  # the bias alone
            a = torch.ones_like(a[..., :1])
        elif ld.has_bias:
            a = torch.cat([a, torch.ones_like(a[..., :1])], -1)
        N, G, T, p = a.shape
        if T == 1:  # [G, o, N, 1] * [G, 1, N, p], written unit-major
            U = a.new_empty(G, g.shape[-1], N, p)
            torch.mul(g[:, :, 0].permute(1, 2, 0).unsqueeze(-1), a[:, :, 0].transpose(0, 1).unsqueeze(1), out=U)
        else:  # Σ_t g_t [a_t; 1]ᵀ per sample and group: [N, G, o, p]
            U = (g.transpose(-1, -2) @ a).permute(1, 2, 0, 3)
        return U.reshape(-1, N, p)
    if ld.kind in _NORM_KINDS:  # a = x̂, g: [N, T, C]
        parts = [(g * ld.a).sum(1)] if ld.has_weight else []
        if ld.has_bias:
            parts.append(g.sum(1))
        return torch.stack(parts, -1).transpose(0, 1)
    raise ValueError(
        f"no unit-wise blocks for a {type(ld.module).__name__} (layer family {ld.kind!r}); they exist for "
        f"the families {UNIT_WISE_KINDS} (Linear, convolutions, attention projections, norm layers)"
    )


def unit_wise_from_layer(ld: LayerData) -> UnitWiseFactor | RelaidFactor:
    """The unit-wise blocks ``[C, p, p]`` of one layer from its captured data (see the module
    docstring): ``block_c = (1/N) Σ_k w_k Σ_n u_kn,c u_kn,cᵀ``, one output-gradient column at a
    time. Cost O(K·N·C·(T·d + d²)) (affine: C = G·o output units), memory O(N·C·p). A weight
    stored in another layout than its matrix (transposed convolutions) gets the factor on the
    matrix wrapped in a :class:`~curvfun.kron.RelaidFactor`."""
    if ld.g is None or ld.weights is None:
        raise ValueError("unit-wise blocks need a capture with output gradients and column weights "
                         "(fisher_type 'emp', 'mc' or 'exact')")
    N = ld.batch_size
    blocks = None
    for k in range(ld.g.shape[0]):
        U = _unit_rows(ld, k)  # [C, N, p]
        B = U.transpose(1, 2) @ U  # [C, p, p]
        w = ld.weights[k]
        if bool(w != 1):
            B = B * w
        blocks = B if blocks is None else blocks.add_(B)
    G = ld.a.shape[1] if ld.kind in _WEIGHT_KINDS else 1
    bias_shape = ld.bias_shape if ld.kind in _WEIGHT_KINDS and ld.has_bias else None
    return _as_factor(blocks / N, ld.kind, ld.weight_shape, ld.has_bias, ld.has_weight, ld.layout, G, bias_shape)


def _as_factor(blocks: Tensor, family: str, weight_shape: tuple, has_bias: bool, has_weight: bool,
               layout: str = "", groups: int = 1, bias_shape: tuple | None = None) -> UnitWiseFactor | RelaidFactor:
    if family in _NORM_KINDS:  # γ and β have one shape (several dims for a LayerNorm)
        return UnitWiseFactor(blocks, weight_shape, has_bias, has_weight, weight_shape)
    if bias_shape is not None and len(bias_shape) == 1:
        bias_shape = None  # the usual [C]
    if not layout:
        return UnitWiseFactor(blocks, weight_shape, has_bias, has_weight, bias_shape)
    C = blocks.shape[0]
    inner = UnitWiseFactor(blocks, (C, math.prod(weight_shape) // C), has_bias, has_weight)
    return RelaidFactor(inner, weight_shape, layout, groups)


def unit_wise_modules(model: nn.Module, params: Mapping[str, Tensor]) -> dict[str, ModuleInfo]:
    """The modules owning entries of ``params``, each checked to have unit-wise blocks; a
    ``ValueError`` names every module that has none (with its parameters)."""
    infos, unsupported = supported_modules(model, params)
    bad = dict(unsupported)
    bad.update({n: (type(i.module).__name__, sorted(i.keys.values())) for n, i in infos.items()
                if i.kind not in UNIT_WISE_KINDS})
    if bad:
        names = ", ".join(f"{n or '<root>'} ({cls}: {keys})" for n, (cls, keys) in bad.items())
        raise ValueError(
            f"shape='unit' has unit-wise blocks for affine layers (Linear, convolutions, attention projections) and "
            f"norm layers only; not for: {names}. Exclude their parameters from params, or use shape='block'."
        )
    return infos


def unit_wise_from_dense(M: Tensor, params: Mapping[str, Tensor], infos: Mapping[str, ModuleInfo]) -> dict:
    """The unit-wise blocks of a dense ``[P, P]`` curvature (indexed in the order of ``params``,
    each leaf row-major): ``{module name: factor}`` picking, for every unit c, the rows and columns
    of its fan-in row of the weight matrix and of ``b[c]``, as :func:`unit_wise_from_layer` lays
    them out. O(Σ C·p²) gathers."""
    offsets, i = {}, 0
    for key, p in params.items():
        offsets[key] = i
        i += p.numel()
    out = {}
    for name, info in infos.items():
        m, h = info.module, info.handler
        layout, G, weight_shape = "", 1, ()
        if "weight" in info.attrs:
            W = getattr(m, info.attrs["weight"])
            weight_shape = tuple(W.shape)
            flat = torch.arange(W.numel()).reshape(W.shape)  # each weight entry's index, as units x fan-in
            if info.kind in _WEIGHT_KINDS:
                layout, G = h.weight_layout(m), h.groups(m)
                rows = weight_as_matrix(flat, G, layout)
                rows = rows.reshape(-1, rows.shape[-1])
            else:
                rows = flat.reshape(-1, 1)
        else:  # a part holding only a bias (attention's in_proj_bias, bias_k): one unit per entry
            rows = torch.zeros(getattr(m, info.attrs["bias"]).numel(), 0, dtype=torch.long)
        cols = [offsets[info.keys["weight"]] + rows] if "weight" in info.keys else []
        if "bias" in info.keys:
            cols.append(offsets[info.keys["bias"]] + torch.arange(rows.shape[0]).unsqueeze(1))
        idx = torch.cat(cols, 1).to(M.device)  # [C, p]
        bias_shape = tuple(getattr(m, info.attrs["bias"]).shape) if "bias" in info.keys else None
        out[name] = _as_factor(M[idx.unsqueeze(2), idx.unsqueeze(1)], info.kind, weight_shape,
                               "bias" in info.keys, "weight" in info.keys, layout, G,
                               bias_shape if info.kind in _WEIGHT_KINDS else None)
    return out
