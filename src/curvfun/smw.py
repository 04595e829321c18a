"""The damped empirical natural gradient through the push-through identity (pure functions).

Conventions: a batch of N samples with per-sample losses ℓ_n, U the N x P matrix whose rows are
the per-sample gradients ∇_θ ℓ_n, the objective L = s·Σ_n ℓ_n with s = 1/N (mean, the GUIDE's
convention) or s = 1 (sum), its gradient g = s·Uᵀ1 (ḡ, the mean gradient, for s = 1/N) and the
empirical Fisher F = s·UᵀU (= (1/N) Σ_n ∇ℓ_n ∇ℓ_nᵀ for the mean). The damped natural gradient is

    (F + λI)^{-1} g = (s·UᵀU + λI)^{-1} s·Uᵀ1 = Uᵀ (s·UUᵀ + λI)^{-1} s·1 = Uᵀ c,

by the push-through identity (UᵀU·s + λI)^{-1} Uᵀ = Uᵀ (s·UUᵀ + λI)^{-1}. So only the N x N Gram
matrix K = UUᵀ is formed and solved, c = (s·K + λI)^{-1} s·1 (:func:`smw_coefficients`), and Uᵀc
is one vector-Jacobian product of the per-sample losses with cotangent c,
∇_θ Σ_n c_n ℓ_n, never a P x P matrix.

The Gram matrix is a sum over parameter groups. For a Linear / Conv2d layer with captured inputs a
``[N, G, T, d_in]`` and per-sample output-gradients ĝ ``[N, G, T, d_out]`` (:mod:`curvfun.layers`)
the per-sample weight gradient is Σ_t ĝ_nt a_ntᵀ, so (:func:`layer_gram`)

    K_nm = Σ_groups Σ_{t,t'} (a_nt·a_mt')(ĝ_nt·ĝ_mt')      (+ (Σ_t ĝ_nt)·(Σ_t' ĝ_mt') for a bias),

which for T = 1 is the Hadamard product (a aᵀ) ⊙ (ĝ ĝᵀ) at O(N²(d_in + d_out)) without
materialising U; for T > 1 the cheaper of the T x T route, O(N²T²(d_in + d_out)), and the
materialised per-sample gradients, O(N·T·d_in·d_out + N²·d_in·d_out), is taken.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .linalg import cholesky_solve_psd

__all__ = ["layer_gram", "rows_gram", "smw_coefficients", "cholesky_solve_psd"]


def rows_gram(U: Tensor) -> Tensor:
    """``U Uᵀ`` of per-sample rows ``[N, ...]`` (flattened), N x N."""
    U = U.reshape(U.shape[0], -1)
    return U @ U.T


def layer_gram(a: Tensor, g: Tensor, has_bias: bool, has_weight: bool = True) -> Tensor:
    """The N x N Gram matrix of one affine layer's per-sample gradients (weight and / or bias)
    from its captured inputs ``a`` ``[N, G, T, d_in]`` and per-sample output-gradients ``g``
    ``[N, G, T, d_out]`` (see the module docstring for the formula and cost)."""
    N, Gr, T, d = a.shape
    o = g.shape[-1]
    if not has_weight:
        K = g.new_zeros(N, N)
    elif T == 1:
        a2, g2 = a.reshape(N, Gr, d).transpose(0, 1), g.reshape(N, Gr, o).transpose(0, 1)  # [G, N, d]
        K = ((a2 @ a2.transpose(1, 2)) * (g2 @ g2.transpose(1, 2))).sum(0)
    elif T * T * (d + o) <= T * d * o + N * d * o:
        af = a.transpose(0, 1).reshape(Gr, N * T, d)
        gf = g.transpose(0, 1).reshape(Gr, N * T, o)
        KA = (af @ af.transpose(1, 2)).reshape(Gr, N, T, N, T)
        KG = (gf @ gf.transpose(1, 2)).reshape(Gr, N, T, N, T)
        K = (KA * KG).sum((0, 2, 4))
    else:
        per_sample = g.transpose(-1, -2) @ a  # [N, G, o, d]
        K = rows_gram(per_sample)
    if has_bias:
        gb = g.sum(2).reshape(N, -1)
        K = K + gb @ gb.T
    return K


def smw_coefficients(K: Tensor, damping: float, scale: float) -> Tensor:
    """``c = (scale·K + λI)^{-1} scale·1``: the per-sample cotangents whose VJP ``Uᵀc`` is the
    damped empirical natural gradient ``(scale·UᵀU + λI)^{-1} scale·Uᵀ1`` (``scale`` = 1/N for a
    mean objective, 1 for a sum). Cost O(N³)."""
    if not damping > 0:
        raise ValueError(f"damping must be > 0 for the Sherman-Morrison-Woodbury solve, got {damping}")
    N = K.shape[0]
    M = scale * K + damping * torch.eye(N, dtype=K.dtype, device=K.device)
    return cholesky_solve_psd(M, torch.full((N,), scale, dtype=K.dtype, device=K.device), "damped Gram matrix")
