"""The linear algebra shared by every curvature object and maker, written once.

* :func:`psd_cholesky`: Cholesky of a symmetric positive definite matrix (batched), half
  precision computed in float32, retried in float64; failure is :class:`NotPositiveDefiniteError`
  (a ``torch.linalg.LinAlgError``, never a ``ValueError``: argument errors are not swallowed by
  code that catches numerical failures).
* :func:`damped_cholesky_inverse`, :func:`cholesky_solve_psd`: ``(M + δI)⁻¹`` and ``M⁻¹ rhs`` on it.
* :func:`sym_gram`: ``RᵀR`` from the upper block triangle of its products, mirrored.
* :func:`woodbury_core`: ``(δI + Y Yᵀ)⁻¹ Y``, the push-through core of a factor held as rows.
* :func:`damping_from_traces`, :func:`pi_damping`: the π-damped factored Tikhonov of the GUIDE.
* :func:`ema`: one moving average, ``decay`` the weight of the new value.
* :func:`check_damping`: one validation of a damping value.
"""

from __future__ import annotations

import math
from typing import Any

import optree
import torch
from torch import Tensor

__all__ = [
    "MIN_DAMPING", "NO_EMA", "NotPositiveDefiniteError", "check_damping", "psd_cholesky", "damped_cholesky_inverse",
    "cholesky_solve_psd", "sym_gram", "woodbury_core", "damping_from_traces", "pi_damping", "ema",
]

#: floor of every damping a factor gets (a low-rank factor is singular without it)
MIN_DAMPING = 1e-7
#: ``decay`` value meaning "no moving average" (ASDL's ``ema_decay=-1``)
NO_EMA = -1


class NotPositiveDefiniteError(torch.linalg.LinAlgError):
    """A (damped) matrix has no Cholesky factorisation, even in float64."""


def check_damping(value: Any, name: str = "damping", positive: bool = False) -> float:
    """``value`` as a float when it is a finite real number ``>= 0`` (``> 0`` with ``positive``),
    else a ``ValueError`` / ``TypeError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return v


def psd_cholesky(M: Tensor, what: str = "matrix", delta: Tensor | float | None = None) -> Tensor:
    """Lower Cholesky factor of the symmetric positive definite ``M + δI`` (batched over leading
    dims; ``delta`` a number or one per batch entry, added in the working dtype so that a small δ
    survives the float64 retry), symmetrised first. Computed in M's dtype (float32 for half
    precision), retried in float64; returned in the dtype that succeeded. O(d³)."""
    first = M.dtype if torch.finfo(M.dtype).bits >= 32 else torch.float32
    for dtype in dict.fromkeys((first, torch.float64)):
        Md = M.to(dtype)
        Md = (Md + Md.transpose(-1, -2)) / 2
        if delta is not None:
            eye = torch.eye(M.shape[-1], dtype=dtype, device=M.device)
            Md = Md + torch.as_tensor(delta, dtype=dtype, device=M.device)[..., None, None] * eye
        L, info = torch.linalg.cholesky_ex(Md)
        # a NaN / Inf anywhere in row i of L reaches L_ii: the diagonal tells, in one host sync
        if bool((info == 0).all() & torch.isfinite(L.diagonal(dim1=-2, dim2=-1)).all()):
            return L
    raise NotPositiveDefiniteError(
        f"the damped {what} is not positive definite (or not finite) even in float64; "
        f"increase the damping or check the captured data for NaN/Inf"
    )


def damped_cholesky_inverse(M: Tensor, delta: Tensor | float, what: str = "factor") -> Tensor:
    """``(M + δI)⁻¹`` (batched; ``delta`` a number or one per batch entry) by :func:`psd_cholesky`
    and ``torch.cholesky_inverse`` (LAPACK potri: exactly symmetric; 0.6-0.8x the time of a
    triangular solve plus ``L⁻ᵀL⁻¹`` for d = 256..2048 on this CPU with torch 2.13); returned in
    M's dtype. O(d³)."""
    return torch.cholesky_inverse(psd_cholesky(M, what, delta)).to(M.dtype)


def cholesky_solve_psd(M: Tensor, rhs: Tensor, what: str = "matrix") -> Tensor:
    """``M⁻¹ rhs`` for symmetric positive definite ``M`` (``rhs`` a vector or a matrix), returned in
    M's dtype. O(d³ + d²k)."""
    L = psd_cholesky(M, what)
    r = rhs.to(L.dtype)
    vec = r.ndim == 1
    x = torch.cholesky_solve(r.unsqueeze(-1) if vec else r, L)
    return (x.squeeze(-1) if vec else x).to(M.dtype)


def sym_gram(R: Tensor, width: int = 256) -> Tensor:
    """RᵀR for ``R`` ``[M, P]``, exactly symmetric: column blocks of about ``width`` (at most 8),
    the products of the upper block triangle only, mirrored: (b+1)/(2b) of the GEMM work."""
    P = R.shape[1]
    b = min(8, P // width)
    if b < 2:
        M = R.T @ R
        return (M + M.T) / 2
    edges = [round(i * P / b) for i in range(b + 1)]
    M = R.new_empty(P, P)
    for i in range(b):
        rows_i = slice(edges[i], edges[i + 1])
        M[rows_i, edges[i]:] = R[:, rows_i].T @ R[:, edges[i]:]
        Mii = M[rows_i, rows_i]
        M[rows_i, rows_i] = (Mii + Mii.T) / 2
    for i in range(b - 1):
        rows_i = slice(edges[i], edges[i + 1])
        M[edges[i + 1]:, rows_i] = M[rows_i, edges[i + 1]:].T
    return M


def woodbury_core(Y: Tensor, delta: Tensor | float, gram: Tensor | None = None) -> Tensor:
    """``K = (δI + Y Yᵀ)⁻¹ Y`` ``[R, d]`` for rows ``Y`` ``[R, d]`` (``gram``: Y Yᵀ when already
    formed). Then ``(YᵀY + δI)⁻¹ G = (G − Yᵀ(K G))/δ``: two GEMMs through the R rows. O(R²d + R³)."""
    gram = Y @ Y.T if gram is None else gram
    return damped_cholesky_inverse(gram, delta, "R x R Woodbury core of a factor") @ Y


def damping_from_traces(trace_a: Tensor, dim_a: int, trace_b: Tensor, dim_b: int, damping: float,
                        heuristic: str = "pi") -> tuple[Tensor, Tensor]:
    """(δ_A, δ_B) of π-damped factored Tikhonov from the factors' traces (tensors, any batch
    shape): π = sqrt((tr A/dim A)/(tr B/dim B)), δ_A = sqrt(λ)·π, δ_B = sqrt(λ)/π; δ_A = δ_B =
    sqrt(λ) when π is 0 or not finite or ``heuristic="none"``; each at least :data:`MIN_DAMPING`. O(1)."""
    if heuristic not in ("pi", "none"):
        raise ValueError(f"unknown damping heuristic {heuristic!r}; expected 'pi' or 'none'")
    root = math.sqrt(check_damping(damping))
    if heuristic == "none":
        pi = torch.ones_like(trace_b)
    else:
        pi = torch.sqrt((trace_a / dim_a) / (trace_b / dim_b))
        pi = torch.where(torch.isfinite(pi) & (pi > 0), pi, torch.ones_like(pi))
    return (root * pi).clamp_min(MIN_DAMPING), (root / pi).clamp_min(MIN_DAMPING)


def pi_damping(A: Tensor, B: Tensor, damping: float, heuristic: str = "pi", a_diag: bool = False):
    """(δ_A, δ_B) for factors A, B (batched over a leading group dim; ``a_diag``: A given as its
    diagonal): :func:`damping_from_traces` of their traces."""
    trA = A.sum(-1) if a_diag else torch.diagonal(A, dim1=-2, dim2=-1).sum(-1)
    trB = torch.diagonal(B, dim1=-2, dim2=-1).sum(-1)
    return damping_from_traces(trA, A.shape[-1], trB, B.shape[-1], damping, heuristic)


def ema(old: Any, new: Any, decay: float, without: str = "replace") -> Any:
    """``(1 − decay)·old + decay·new`` leafwise over tensors or factor objects (``decay`` is the
    weight of the new value, in (0, 1]). ``old`` None returns ``new``; ``decay`` = :data:`NO_EMA`
    (-1, no moving average) returns ``new`` (``without="replace"``: curvature of the latest batch)
    or ``old + new`` (``without="accumulate"``: a running sum, Shampoo's statistics). In place on
    ``old``'s tensors."""
    if without not in ("replace", "accumulate"):
        raise ValueError(f"without must be 'replace' or 'accumulate', got {without!r}")
    if old is None:
        return new
    if decay == NO_EMA:
        if without == "replace":
            return new
        return optree.tree_map(lambda o, n: o.add_(n), old, new, namespace="curvfun")
    return optree.tree_map(lambda o, n: o.mul(1 - decay).add_(n, alpha=decay), old, new, namespace="curvfun")
