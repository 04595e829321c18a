"""Functions of symmetric positive semi-definite matrices by eigen-decomposition (pure).

For a symmetric PSD matrix M = Q diag(λ) Qᵀ (``torch.linalg.eigh``) and a damping δ ≥ 0,

    inverse_root(M, p, δ) = (M + δ I)^{-1/p} = Q diag((max(λ, 0) + δ)^{-1/p}) Qᵀ,

with δ = ``damping`` (``relative=False``) or δ = ``damping · λ_max(M)`` (``relative=True``, the
"ridge" of Shampoo's reference implementation, which ASDL 0.1 uses). Eigenvalues that rounding
pushed below zero are clamped to 0 before the damping is added, so the result of a PSD input is
always symmetric positive definite when δ > 0.

float64 retry. ``torch.linalg.eigh`` in float32 can fail to converge (``LinAlgError``) or return
non-finite values for badly conditioned input. :func:`sym_eigh` then repeats the decomposition in
float64 and casts the result back to the input's dtype; only if float64 also fails does it raise.

Cost: one symmetric eigen-decomposition, about 9·d³ flops for d x d (LAPACK ``syevd``), plus one
d x d x d product to form the matrix; leading batch dimensions are decomposed independently.
ASDL 0.1 computes the same root by a coupled Newton iteration (Guo & Higham 2006) with up to 100
iterations of several d x d products each, plus a power iteration for λ_max, and adds the ridge to
its statistics matrix *in place* on every call, so its accumulated statistics drift upwards by
``ε·λ_max·I`` per refresh; :func:`inverse_root` never modifies its input.

Warm start (:func:`warm_eigh`). When M changes slowly (Shampoo's statistics between refreshes),
the eigenbasis Q of the previous M is nearly one of the new M. One step of subspace iteration
refreshes it,

    Y = M Q,   r = diag(Qᵀ Y) (Rayleigh quotients),   Q ← qr(Y, columns sorted by r, descending),

and the eigenvalues are the Rayleigh quotients λ = diag(Qᵀ M Q) of the new basis, so
Q diag(λ) Qᵀ is the part of M that is diagonal in Q. If Q already is an eigenbasis of M, the step
returns it (up to column signs) with the exact eigenvalues. Each step contracts the angle between
the i-th and j-th eigendirections by λ_j/λ_i, so directions with a spectral gap converge
geometrically; within a cluster of near-equal eigenvalues the basis may stay mixed, which changes
the root only by about the cluster's spread. Cost per step: one d x d x d product and one QR
(Householder, about 8/3·d³ flops with Q formed), plus one product for the final λ; LAPACK's QR
runs at about half the time of ``eigh`` on the CPU, the products at matrix-multiply speed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "sym_eigh",
    "descending_eigh",
    "rayleigh_quotients",
    "warm_eigh",
    "EigenPower",
    "eigen_power",
    "eigen_power_from",
    "inverse_root",
    "matrix_power_sym",
]


def _check_square(M: Tensor, where: str) -> None:
    if not isinstance(M, Tensor):
        raise TypeError(f"{where}: expected a tensor, got {type(M).__name__}")
    if M.ndim < 2 or M.shape[-1] != M.shape[-2]:
        raise ValueError(f"{where}: expected a square matrix (or a batch of them), got shape {tuple(M.shape)}")
    if not M.is_floating_point():
        raise TypeError(f"{where}: expected a floating-point matrix, got {M.dtype}")


def sym_eigh(M: Tensor, symmetrize: bool = True) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric part (M + Mᵀ)/2
    (``symmetrize=False``: of the symmetric matrix whose lower triangle is M's, which is what
    ``eigh`` reads; for M symmetric by construction, e.g. a sum of Gram matrices, this saves three
    passes over M).

    Tries ``torch.linalg.eigh`` in M's dtype; when that raises or returns non-finite eigenvalues
    and the dtype is narrower than float64, it repeats in float64 and casts back. Raises
    ``ValueError`` for input with inf/NaN entries and ``torch.linalg.LinAlgError`` if float64 fails
    on finite input. Only the eigenvalues are checked for finiteness (a d-vector; eigh propagates
    non-finite input or a failed decomposition into them), so the check costs nothing next to
    the O(d³) decomposition.
    """
    _check_square(M, "sym_eigh")
    S = (M + M.transpose(-1, -2)) / 2 if symmetrize else M
    if S.dtype != torch.float64:
        try:
            lam, Q = torch.linalg.eigh(S)
            # eigh propagates NaN/inf of the input or of a failed decomposition into the eigenvalues
            if bool(torch.isfinite(lam).all()):
                return lam, Q
        except RuntimeError:  # LinAlgError is a RuntimeError
            pass
    lam, Q = torch.linalg.eigh(S.to(torch.float64))
    if not bool(torch.isfinite(lam).all()):
        if not bool(torch.isfinite(M).all()):
            raise ValueError("sym_eigh: the matrix has inf/NaN entries")
        raise torch.linalg.LinAlgError("sym_eigh: eigh returned non-finite values even in float64")
    return lam.to(M.dtype), Q.to(M.dtype)


def descending_eigh(M: Tensor, symmetrize: bool = True) -> tuple[Tensor, Tensor]:
    """:func:`sym_eigh` with the eigenvalues in *descending* order (the order :func:`warm_eigh`
    keeps, so that a QR of ``M Q`` nests the dominant subspaces)."""
    lam, Q = sym_eigh(M, symmetrize)
    return lam.flip(-1), Q.flip(-1)


def rayleigh_quotients(M: Tensor, Q: Tensor) -> Tensor:
    """``diag(Qᵀ M Q)``: the Rayleigh quotients of the columns of Q (one d x d x d product)."""
    return (Q * (M @ Q)).sum(-2)


def warm_eigh(M: Tensor, Q_prev: Tensor, iters: int = 1) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenbasis of a symmetric PSD ``M`` by ``iters`` steps of
    subspace iteration from the orthogonal ``Q_prev`` (see the module docstring):

        Y = M Q;  Q ← qr(Y[:, argsort(diag(QᵀY), descending)]);  signs so that diag(R) >= 0;
        λ = diag(Qᵀ M Q).

    ``iters = 0`` keeps the basis and refreshes the eigenvalues only. Returns ``(λ, Q)``; the
    caller checks finiteness (a failed step shows as inf/NaN in λ). Batched over leading dims.
    Cost: ``iters`` QRs and ``iters + 1`` d x d x d products.
    """
    _check_square(M, "warm_eigh")
    if not isinstance(Q_prev, Tensor) or Q_prev.shape != M.shape:
        got = tuple(Q_prev.shape) if isinstance(Q_prev, Tensor) else type(Q_prev).__name__
        raise ValueError(f"warm_eigh: Q_prev must be a tensor of M's shape {tuple(M.shape)}, got {got}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"warm_eigh: iters must be an int >= 0, got {iters!r}")
    Q = Q_prev.to(M.dtype)
    for _ in range(iters):
        Y = M @ Q
        r = (Q * Y).sum(-2)
        if not bool((r[..., :-1] >= r[..., 1:]).all()):  # usually sorted already: skip the copy
            order = r.argsort(dim=-1, descending=True)
            Y = Y.gather(-1, order.unsqueeze(-2).expand_as(Y))
        # Householder QR; R's diagonal is on the diagonal of geqrf's output (no triu copy of R)
        H, tau = torch.geqrf(Y)
        sign = torch.where(H.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(M.dtype)
        Q = torch.linalg.householder_product(H, tau) * sign.unsqueeze(-2)
    return rayleigh_quotients(M, Q), Q


class EigenPower(NamedTuple):
    """``Q diag(w) Qᵀ`` kept factored: ``Q`` ``[..., d, d]`` orthogonal, ``w`` ``[..., d]``."""

    Q: Tensor
    w: Tensor

    def matrix(self) -> Tensor:
        """The dense matrix ``Q diag(w) Qᵀ`` (one d x d x d product)."""
        return (self.Q * self.w.unsqueeze(-2)) @ self.Q.transpose(-1, -2)

    def apply(self, X: Tensor) -> Tensor:
        """``Q diag(w) Qᵀ X`` without forming the matrix (two d x d x m products)."""
        return self.Q @ (self.w.unsqueeze(-1) * (self.Q.transpose(-1, -2) @ X))


def _damping_for(lam: Tensor, damping: float, relative: bool) -> Tensor:
    if relative:
        return damping * lam.amax(-1, keepdim=True).clamp_min(0)
    return torch.full_like(lam[..., :1], float(damping))


def eigen_power(M: Tensor, exponent: float, damping: float = 0.0, relative: bool = False,
                symmetrize: bool = True, floor: float = 0.0) -> EigenPower:
    """``(M + δI)^exponent`` of a symmetric PSD ``M`` in factored form (see the module docstring
    for δ; ``symmetrize`` as in :func:`sym_eigh`; ``floor`` as in :func:`eigen_power_from`). A
    negative exponent with δ = 0 and a singular M gives ``inf`` entries (the caller decides what
    to do with a non-finite result)."""
    _check_square(M, "eigen_power")
    if not (isinstance(damping, (int, float)) and damping >= 0 and damping == damping and damping != float("inf")):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    lam, Q = sym_eigh(M, symmetrize)
    return eigen_power_from(lam, Q, exponent, damping, relative, floor)


def eigen_power_from(lam: Tensor, Q: Tensor, exponent: float, damping: float = 0.0, relative: bool = False,
                     floor: float = 0.0) -> EigenPower:
    """``Q diag((max(λ, f·λ_max) + δ)^exponent) Qᵀ`` in factored form from given eigenvalues λ and
    basis Q (e.g. :func:`warm_eigh`'s); δ as in the module docstring, with λ_max = max(λ), and
    ``floor`` f >= 0 a relative eigenvalue floor (default 0: only negative rounding is clamped)
    for eigenvalues below what the data behind M resolves (e.g. Shampoo's statistics of rounded
    gradients, :func:`curvfun.shampoo_math.resolved_floor`)."""
    if floor:
        lam = torch.maximum(lam, float(floor) * lam.amax(-1, keepdim=True).clamp_min(0))
    else:
        lam = lam.clamp_min(0)
    lam = lam + _damping_for(lam, float(damping), relative)
    return EigenPower(Q, lam.pow(exponent))


def inverse_root(M: Tensor, p: float, damping: float = 0.0, relative: bool = False) -> Tensor:
    """``(M + δI)^{-1/p}`` of a symmetric PSD matrix (batched over leading dims), by ``eigh``
    with a float64 retry; δ = ``damping`` or ``damping · λ_max(M)`` when ``relative``.

    Cost: one eigen-decomposition and one d x d x d product.
    """
    if not (isinstance(p, (int, float)) and p > 0):
        raise ValueError(f"p must be a positive number (the root's order, e.g. 4), got {p!r}")
    return eigen_power(M, -1.0 / p, damping, relative).matrix()


def matrix_power_sym(M: Tensor, exponent: float, damping: float = 0.0, relative: bool = False) -> Tensor:
    """``(M + δI)^exponent`` of a symmetric PSD matrix for any real exponent (dense)."""
    return eigen_power(M, exponent, damping, relative).matrix()
