"""Kronecker-factored preconditioned SGD (Li 2018, "Preconditioned stochastic gradient descent",
arXiv:1512.04202), as pure functions.

For a matrix parameter (d_out x d_in; a Linear / Conv2d weight read as ``[out, in·kh·kw]`` with the
bias appended as a last column, so d_in counts it) the preconditioner is

    P = (Q_rᵀ Q_r) ⊗ (Q_lᵀ Q_l),   P·G = Q_lᵀ Q_l G Q_rᵀ Q_r          (:func:`psgd_precondition`)

with upper-triangular Q_l (d_out x d_out) and Q_r (d_in x d_in), Q = Q_r ⊗ Q_l, acting on
column-major vec. It is fitted to pairs (dX, dG) of a parameter perturbation and the matching
gradient perturbation (here dG = H·dX, a Hessian-vector product) by minimising
E[dGᵀ P dG + dXᵀ P⁻¹ dX], whose minimiser over all P satisfies P E[dG dGᵀ] P = E[dX dXᵀ]; with
dG = H dX and dX ~ N(0, I) that is P = |H|⁻¹ (here restricted to the Kronecker form). One step of the relative (Lie-group) gradient descent on Q (:func:`psgd_update`):

1. balance the two factors, ρ = sqrt(max diag Q_l / max diag Q_r), Q_l ← Q_l/ρ, Q_r ← ρ·Q_r
   (P is unchanged);
2. A = Q_l dG Q_rᵀ  (= Q·dG)   and   B = Q_l⁻ᵀ dX Q_r⁻¹  (= Q⁻ᵀ·dX);
3. ∇_l = triu(A Aᵀ − B Bᵀ),   ∇_r = triu(Aᵀ A − Bᵀ B);
4. Q_l ← Q_l − μ/(max|∇_l| + tiny) · ∇_l Q_l,   Q_r ← Q_r − μ/(max|∇_r| + tiny) · ∇_r Q_r,

with μ = ``step`` (the preconditioner learning rate, normalised so that it is a fraction of the
largest change). Cost: O(d_out² d_in + d_out d_in²) (two triangular solves, four products).

Difference from ASDL 0.1 (``asdl/precondition/psgd.py``, ``_update_precond_dense_dense``): ASDL
computes B as Q_l⁻¹ dX Q_r⁻ᵀ — its port of Li's code to ``torch.linalg.solve_triangular`` dropped
the ``transpose=True`` of the original ``torch.triangular_solve`` calls — which is Q⁻¹·dX rather
than Q⁻ᵀ·dX; the two agree only while Q_l and Q_r are diagonal. This module follows Li's
definition (B = Q⁻ᵀ dX).

Full-matrix PSGD (:func:`psgd_full_update`, :func:`psgd_full_precondition`) fits one dense
upper-triangular Q (P x P over the flattened parameters) to a pair of vectors (dx, dg) with the
same criterion: a = Q dg, b = Q⁻ᵀ dx, ∇ = triu(a aᵀ − b bᵀ), Q ← Q − μ/(max|∇| + tiny) · ∇ Q;
the preconditioned gradient is Qᵀ Q g. Cost O(P²) time and memory: the triangular solve, and ∇ Q
from the rank-two structure of ∇, row i of triu(a aᵀ) Q being a_i Σ_{j≥i} a_j Q[j, :] (suffix
sums), instead of the O(P³) product. ASDL 0.1's ``PsgdGradientMaker`` applies the same rule (its b
is Q⁻ᵀ dx, as in Li's code) with the O(P³) product.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["psgd_balance", "psgd_update", "psgd_precondition", "psgd_full_update", "psgd_full_precondition"]

TINY = 1.2e-38


def psgd_balance(Ql: Tensor, Qr: Tensor) -> tuple[Tensor, Tensor]:
    """Rescale ``(Q_l/ρ, ρ·Q_r)`` with ρ = sqrt(max |diag Q_l| / max |diag Q_r|); P is unchanged (a
    triangular Q may have negative diagonal entries: ρ stays real)."""
    rho = torch.sqrt(torch.diagonal(Ql).abs().max() / torch.diagonal(Qr).abs().max())
    return Ql / rho, Qr * rho


def psgd_update(Ql: Tensor, Qr: Tensor, dX: Tensor, dG: Tensor, step: float, tiny: float = TINY) -> tuple[Tensor, Tensor]:
    """One PSGD update of the Kronecker factors from a pair (dX, dG) (see the module docstring);
    returns new ``(Q_l, Q_r)``, the inputs are not modified."""
    if dX.shape != dG.shape or dX.shape != (Ql.shape[0], Qr.shape[0]):
        raise ValueError(
            f"psgd_update: dX {tuple(dX.shape)} and dG {tuple(dG.shape)} must both be "
            f"(d_out, d_in) = ({Ql.shape[0]}, {Qr.shape[0]})"
        )
    Ql, Qr = psgd_balance(Ql, Qr)
    A = Ql @ dG @ Qr.T
    B = torch.linalg.solve_triangular(Ql.T, dX, upper=False)  # Q_l^{-T} dX
    B = torch.linalg.solve_triangular(Qr, B, upper=True, left=False)  # ... Q_r^{-1}
    grad_l = torch.triu(A @ A.T - B @ B.T)
    grad_r = torch.triu(A.T @ A - B.T @ B)
    mu_l = step / (grad_l.abs().max() + tiny)
    mu_r = step / (grad_r.abs().max() + tiny)
    return Ql - mu_l * (grad_l @ Ql), Qr - mu_r * (grad_r @ Qr)


def psgd_precondition(Ql: Tensor, Qr: Tensor, G: Tensor) -> Tensor:
    """``Q_lᵀ Q_l G Q_rᵀ Q_r``."""
    return torch.linalg.multi_dot([Ql.T, Ql, G, Qr.T, Qr])


def psgd_full_update(Q: Tensor, dx: Tensor, dg: Tensor, step: float, tiny: float = TINY) -> Tensor:
    """One full-matrix PSGD update of the upper-triangular Q (P x P) from a pair of vectors
    (dx, dg) of length P (see the module docstring); returns a new Q, the inputs are not modified."""
    if Q.ndim != 2 or Q.shape[0] != Q.shape[1] or dx.shape != (Q.shape[0],) or dg.shape != dx.shape:
        raise ValueError(
            f"psgd_full_update: Q {tuple(Q.shape)} must be square (P x P) and dx {tuple(dx.shape)}, "
            f"dg {tuple(dg.shape)} vectors of length P"
        )
    a = Q @ dg
    b = torch.linalg.solve_triangular(Q.T, dx.unsqueeze(1), upper=False).squeeze(1)  # Q^{-T} dx
    # a aᵀ − b bᵀ is symmetric: the largest |entry| of its upper triangle is its largest |entry|
    scale = torch.addr(torch.outer(a, a), b, b, alpha=-1).abs_().amax()
    # ∇Q without forming ∇: row i of triu(v vᵀ) Q is v_i Σ_{j≥i} v_j Q[j, :]; the suffix sums run
    # along the contiguous dimension of Qᵀ (a cumulative sum down the rows of Q is several times slower)
    Qt = Q.T.contiguous()
    Sa = (Qt * a).flip(1).cumsum(1).flip(1).mul_(a)
    Sb = (Qt * b).flip(1).cumsum(1).flip(1).mul_(b)
    return Q - step / (scale + tiny) * Sa.sub_(Sb).T.contiguous()


def psgd_full_precondition(Q: Tensor, g: Tensor) -> Tensor:
    """``Qᵀ Q g`` for a vector g."""
    return Q.T @ (Q @ g)
