"""One layer's record in its family's canonical form, and the per-layer quantities of every family.

:func:`layer_data` asks the registry's handler to arrange a :class:`~curvfun.capture.LayerRecord`;
the functions below dispatch on the *family* only (see :mod:`curvfun.layers.registry`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from . import affine, embedding, norm

if TYPE_CHECKING:
    from ..capture import LayerRecord

__all__ = ["LayerData", "layer_data", "homogeneous_inputs", "positions_per_group", "per_sample_layer_grads",
           "layer_batch_grads", "per_sample_layer_sq_norms", "column",
           "layer_diag_fisher", "layer_column_rows"]


@dataclass
class LayerData:
    """``kind``: the family (``"affine"``, ``"embedding"``, ``"norm"``); ``a``/``g``: its canonical
    form (ids for embeddings); ``weights``: column weights ``[K]``; ``layout``: the affine weight
    layout (``""`` or ``"transposed"``)."""

    kind: str
    module: nn.Module
    a: Tensor
    g: Tensor | None
    weights: Tensor | None
    has_bias: bool
    has_weight: bool = True  # False when params holds only the bias (the weight held fixed)
    layout: str = ""
    #: the weight's attribute on the module (``"in_proj_weight"`` for attention; ``None``: a part without one)
    weight_attr: str | None = "weight"
    #: affine groups zero-padded to a common T: the true positions per group ``[G]`` (else None)
    group_positions: Tensor | None = None
    #: the bias's attribute on the module (``None``: the layer has none)
    bias_attr: str | None = "bias"

    @property
    def batch_size(self) -> int:
        return self.a.shape[0]

    @property
    def bias_shape(self) -> tuple:
        """The bias parameter's shape (``bias_k`` of attention is ``[1, 1, E]``; ``()`` without one)."""
        b = None if self.bias_attr is None else getattr(self.module, self.bias_attr, None)
        return () if b is None else tuple(b.shape)

    @property
    def weight_shape(self) -> tuple:
        return () if self.weight_attr is None else tuple(getattr(self.module, self.weight_attr).shape)


def layer_data(rec: "LayerRecord", weights: Tensor | None = None) -> LayerData:
    """Arrange one module's record as :class:`LayerData` through its handler. Curvature is formed
    in the parameters' dtype: under autocast the records are bf16/fp16, whose Grams lose the
    precision the damped inverses need."""
    h = rec.info.handler
    a, g, positions = h.arrange_record(rec)
    dt = next((p.dtype for p in rec.module.parameters() if p.is_floating_point()), None)
    if dt is not None:
        a = a.to(dt) if a.is_floating_point() else a
        g = None if g is None else g.to(dt)
        weights = None if weights is None else weights.to(device=g.device if g is not None else a.device, dtype=dt)
    layout = h.weight_layout(rec.module) if h.family == "affine" else ""
    return LayerData(h.family, rec.module, a, g, weights, "bias" in rec.info.keys, "weight" in rec.info.keys, layout,
                     rec.info.attrs.get("weight"), positions, rec.info.attrs.get("bias"))


def homogeneous_inputs(ld: LayerData) -> Tensor:
    """The affine inputs with a ones column ``[a, 1]`` (folded bias); zero at padded positions."""
    ones = torch.ones_like(ld.a[..., :1])
    if ld.group_positions is not None:
        t = torch.arange(ld.a.shape[2], device=ld.a.device)
        ones = ones * (t[None, :] < ld.group_positions[:, None]).to(ones.dtype)[None, :, :, None]
    return torch.cat([ld.a, ones], -1)


def positions_per_group(ld: LayerData) -> Tensor | int:
    """T (an int), or the true positions per group ``[G, 1, 1]`` when groups were padded."""
    if ld.group_positions is None:
        return ld.a.shape[2]
    return ld.group_positions.to(ld.a.dtype).reshape(-1, 1, 1)


def _col0(ld: LayerData) -> Tensor:
    if ld.g is None:
        raise ValueError("per-sample gradients need a capture with output gradients (fisher_type='emp')")
    if ld.g.shape[0] != 1:
        raise ValueError("per-sample gradients need a single column (fisher_type='emp')")
    return ld.g[0]


def per_sample_layer_grads(ld: LayerData, out: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Per-sample gradients ``{"weight": [N, *W.shape], "bias": [N, *b.shape]}`` of the layer's
    parameters in ``params`` from the first column; into ``out[...]`` buffers when given."""
    g, out = _col0(ld), out or {}
    m = ld.module
    if ld.kind == "affine":  # the family's bias is [N, G·o]: as the parameter's shape
        bufs = {k: v.reshape(v.shape[0], -1) if k == "bias" else v for k, v in out.items()
                if ld.has_weight or k != "weight"}
        res = affine.per_sample_grads(ld.a, g, ld.weight_shape if ld.has_weight else None, ld.has_bias, ld.layout,
                                      bufs)
        if "bias" in res:
            res["bias"] = res["bias"].reshape(res["bias"].shape[0], *ld.bias_shape)
        return res
    if ld.kind == "embedding":
        return {"weight": embedding.per_sample_grads(ld.a, g, m.num_embeddings, m.padding_idx, out.get("weight"))}
    res = norm.per_sample_grads(ld.a, g, ld.weight_shape if ld.has_weight else None,
                                tuple(getattr(m, "bias").shape) if ld.has_bias else None)
    return {k: out[k].copy_(v) if k in out else v for k, v in res.items()}


def layer_batch_grads(ld: LayerData) -> dict[str, Tensor]:
    """``Σ_n ∇ℓ_n`` of the layer's parameters from the first column (the gradient of the *summed*
    loss when that column holds the per-sample losses' output gradients; of whatever loss the
    column's gradients are of otherwise), without per-sample tensors: the part that reaches the
    parameters through the recorded calls. Affine: Σ_{n,t} g aᵀ per group. O(N·T·d·o)."""
    g, m = _col0(ld), ld.module
    if ld.kind == "affine":  # a [N, G, T, d], g [N, G, T, o]
        out = {}
        if ld.has_weight:
            M = torch.einsum("ngto,ngtd->god", g, ld.a)
            out["weight"] = affine.matrix_as_weight(M, ld.weight_shape, ld.layout)
        if ld.has_bias:
            out["bias"] = g.sum((0, 2)).reshape(ld.bias_shape)
        return out
    if ld.kind == "embedding":  # ids [N, T], g [N, T, D]
        g = embedding.masked_grads(ld.a, g, m.padding_idx)
        W = g.new_zeros(m.num_embeddings, g.shape[-1])
        return {"weight": W.index_add_(0, ld.a.reshape(-1), g.reshape(-1, g.shape[-1]))}
    return {k: v.sum(0) for k, v in norm.per_sample_grads(
        ld.a, g, ld.weight_shape if ld.has_weight else None,
        tuple(getattr(m, "bias").shape) if ld.has_bias else None).items()}


def per_sample_layer_sq_norms(ld: LayerData) -> Tensor:
    """``‖∇_layer ℓ_n‖²`` for each n, ``[N]``, without forming per-sample gradients where cheaper."""
    g = _col0(ld)
    if ld.kind == "affine":
        return affine.per_sample_sq_norms(ld.a, g, ld.has_weight, ld.has_bias)
    if ld.kind == "embedding":
        return embedding.per_sample_sq_norms(ld.a, g, ld.module.padding_idx)
    return norm.per_sample_sq_norms(ld.a, g, ld.has_weight, ld.has_bias)


def column(ld: LayerData, k: int) -> LayerData:
    """The layer data restricted to output-gradient column ``k`` (weight not applied)."""
    return replace(ld, g=ld.g[k : k + 1], weights=None)


def layer_diag_fisher(ld: LayerData) -> dict[str, Tensor]:
    """diag F = (1/N) Σ_k w_k Σ_n (∇ℓ_nk)² per parameter of the layer (``{"weight", "bias"}``).
    Affine layers: :func:`curvfun.layers.affine.diag_fisher`; others from the per-sample
    gradients of each column."""
    if ld.g is None or ld.weights is None:
        raise ValueError("a diagonal Fisher needs output gradients and column weights")
    N = ld.batch_size
    if ld.kind == "affine":
        res = affine.diag_fisher(ld.a, ld.g, ld.weights, N, ld.weight_shape if ld.has_weight else None,
                                 ld.has_bias, ld.layout)
        if "bias" in res:
            res["bias"] = res["bias"].reshape(ld.bias_shape)
        return res
    acc: dict[str, Tensor] = {}
    for k in range(ld.g.shape[0]):
        for p, gp in per_sample_layer_grads(column(ld, k)).items():
            v = ld.weights[k] * gp.pow(2).sum(0) / N
            acc[p] = acc[p] + v if p in acc else v
    return acc


def layer_column_rows(ld: LayerData) -> Tensor:
    """Rows U ``[K·N, P_layer]`` with F_layer = UᵀU: per-sample gradients of every column,
    scaled by sqrt(w_k / N), flattened in the layer's parameter order (weight, bias)."""
    if ld.g is None or ld.weights is None:
        raise ValueError("layer rows need output gradients and column weights")
    N = ld.batch_size
    rows = []
    for k in range(ld.g.shape[0]):
        grads = per_sample_layer_grads(column(ld, k))
        r = torch.cat([grads[p].reshape(N, -1) for p in ("weight", "bias") if p in grads], 1)
        rows.append(r * (ld.weights[k].to(r.dtype) / N).sqrt())
    return torch.cat(rows, 0)
