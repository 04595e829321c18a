"""K-FAC factors from a layer's captured data (:class:`~curvfun.layers.LayerData`), by family.

The conventions (A over inputs, B over output gradients, expand / reduce, separate / folded
bias, π-damping) are those of :mod:`curvfun.kron`, whose factor objects these functions return.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kron import BIAS_MODES, KFAC_TYPES, EmbeddingFactor, KronFactor, RelaidFactor
from .layers import LayerData
from .layers.data import homogeneous_inputs, positions_per_group
from .linalg import sym_gram
from .unit_wise import unit_wise_from_layer

__all__ = ["gram", "factor_rows", "kron_factors_from_layer"]


def weighted_columns(g: Tensor, w: Tensor) -> Tensor:
    """g_k·sqrt(w_k) per column k; no copy when every weight is 1 (emp, exact, one MC sample)."""
    if not torch.compiler.is_compiling() and bool((w == 1).all()):  # (compiled: multiply, no host sync)
        return g
    return g * w.sqrt().to(g.dtype).reshape(-1, *([1] * (g.ndim - 1)))


def gram(X: Tensor) -> Tensor:
    """Xᵀ X over the rows of ``[R, d]`` or ``[G, R, d]``. Tall and wide ones (one group, d ≥ 256,
    R ≥ 2d: a compute-bound GEMM, e.g. conv patches or a 1024-wide layer over 2048 tokens) by two
    column blocks (:func:`curvfun.linalg.sym_gram`: the upper block row and the lower-right block,
    mirrored; 3/4 of the GEMM work of X.T @ X, ~0.85x its time at R = 2d on this CPU)."""
    if X.ndim != 2:
        return X.transpose(1, 2) @ X
    R, d = X.shape
    if d < 256 or R < 2 * d:
        return X.T @ X
    return sym_gram(X, width=d // 2)


def factor_rows(data: LayerData, kfac_type: str = "expand", bias: str = "separate"):
    """The rows behind a Linear / Conv2d layer's factors: ``((X_A, c_A), (X_B, c_B))`` with
    A = X_Aᵀ X_A / c_A and B = X_Bᵀ X_B / c_B; X ``[R, d]`` (one group) or ``[G, R, d]``.
    Expand: X_A = the N·T inputs (folded: [a, 1]), c_A = N·T; X_B = the K·N·T weighted output
    gradients, c_B = N. Reduce: position-means of the inputs and position-sums of the output
    gradients, c_A = c_B = N. Groups zero-padded to a common T (cross-attention) count their own
    positions (c_A ``[G, 1, 1]``). No copies beyond the reshapes (and the fold's concatenation)."""
    N = data.batch_size
    g = weighted_columns(data.g, data.weights)
    a = data.a  # [N, G, T, d]
    if bias == "folded" and data.has_bias:
        a = homogeneous_inputs(data)
    Gr, T = a.shape[1], a.shape[2]
    Tg = positions_per_group(data)  # T, or [G, 1, 1] for groups zero-padded to T
    if kfac_type == "expand":
        am = a.reshape(N * T, -1) if Gr == 1 else a.transpose(0, 1).reshape(Gr, N * T, -1)
        gm = g.reshape(-1, g.shape[-1]) if Gr == 1 else g.permute(2, 0, 1, 3, 4).reshape(Gr, -1, g.shape[-1])
        return (am, N * Tg), (gm, N)
    mean = a.mean(2) if isinstance(Tg, int) else a.sum(2) / Tg.reshape(1, -1, 1)
    am = mean[:, 0] if Gr == 1 else mean.transpose(0, 1)  # [N, d] / [G, N, d]
    gs = g.sum(3)
    gm = gs.reshape(-1, g.shape[-1]) if Gr == 1 else gs.permute(2, 0, 1, 3).reshape(Gr, -1, g.shape[-1])
    return (am, N), (gm, N)


def kron_factors_from_layer(data: LayerData, kfac_type: str = "expand", bias: str = "separate"):
    """The factor object of one layer from its :class:`~curvfun.layers.LayerData`.

    Cost: Linear/Conv2d O(N·T·(d_in² + K·d_out²)); Embedding O(K·N·T·D²); norm layers O(K·N·T·C).
    """
    if kfac_type not in KFAC_TYPES:
        raise ValueError(f"unknown kfac_type {kfac_type!r}; expected one of {KFAC_TYPES}")
    if bias not in BIAS_MODES:
        raise ValueError(f"unknown bias mode {bias!r}; expected one of {BIAS_MODES}")
    if data.g is None:
        raise ValueError("K-FAC needs a capture with output gradients (fisher_type 'emp', 'mc' or 'exact')")
    m, N = data.module, data.batch_size
    g = weighted_columns(data.g, data.weights)
    if data.kind == "affine":
        (am, a_count), (gm, g_count) = factor_rows(data, kfac_type, bias)
        folded = bias == "folded" and data.has_bias and data.has_weight
        G = data.a.shape[1]
        if data.layout:
            mat_shape = (G * data.g.shape[-1], data.a.shape[-1])
            inner = KronFactor(gram(am) / a_count, gram(gm) / g_count, mat_shape, data.has_bias, folded)
            return RelaidFactor(inner, data.weight_shape, data.layout, G)
        return KronFactor(gram(am) / a_count, gram(gm) / g_count, data.weight_shape, data.has_bias, folded)
    if data.kind == "embedding":
        ids = data.a  # [N, T]
        valid = ids != m.padding_idx if m.padding_idx is not None else torch.ones_like(ids, dtype=torch.bool)
        counts = torch.zeros(m.num_embeddings, dtype=g.dtype, device=g.device)
        counts.index_add_(0, ids[valid], torch.ones(int(valid.sum()), dtype=g.dtype, device=g.device))
        A = counts / (N * ids.shape[1])
        B = gram(g.reshape(-1, g.shape[-1])) / N
        return EmbeddingFactor(A, B)
    return unit_wise_from_layer(data)  # norm layers: their exact unit-wise blocks over (γ_c, β_c)
