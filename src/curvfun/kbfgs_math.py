"""K-BFGS (Goldfarb, Ren & Bahamou 2020, "Practical quasi-Newton methods for training deep neural
networks") for one Linear / Conv2d layer, as pure functions.

The layer's Hessian block is approximated by A ⊗ B (row-major vec(W): ``kron(B, A)``) with
A = (1/(N·T)) Σ_{n,t} a_nt a_ntᵀ the second moment of the layer inputs (the GUIDE's K-FAC A) and B
a curvature of the loss with respect to the layer's pre-activations z. K-BFGS keeps the inverses
H_a ≈ (A + δ_A I)^{-1} and H_g ≈ (B + δ_B I)^{-1} and preconditions

    G_W ← H_g G_W H_a,        g_b ← H_g g_b        (:func:`kbfgs_precondition`).

Both inverses are updated by the BFGS inverse formula (:func:`bfgs_inverse_update`)

    H⁺ = (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ,     ρ = 1/(sᵀy),

which makes H⁺ y = s (the secant equation) and keeps H⁺ positive definite when sᵀy > 0. Cost O(d²).

* A side ("Hessian-action" BFGS, :func:`hessian_action_pair`): A is known, so the pair is exact:
  s = H_a ā (ā = (1/(N·T)) Σ a_nt, the mean input) and y = (A + δ_A I) s. H_a starts at the exact
  damped inverse.
* B side: B is not known; its pair comes from the change of the layer between two evaluations on
  the same mini-batch, s = z̄⁺ − z̄ (mean pre-activation over samples and positions) and
  y = ḡ⁺ − ḡ with ḡ = (1/N) Σ_{n,t} ∂ℓ_n/∂z_nt (output-gradients of the per-sample losses summed over
  positions, averaged over samples). Since that y need not satisfy sᵀy > 0, it is damped twice
  (:func:`powell_lm_damping`): Powell's damping on s for H (with μ₁, default 0.2)

      if sᵀy < μ₁ yᵀHy:  θ = (1 − μ₁) yᵀHy / (yᵀHy − sᵀy),   s ← θ s + (1 − θ) H y

  (then sᵀy = μ₁ yᵀHy > 0), followed by Levenberg-Marquardt damping on H⁻¹, y ← y + μ₂ s (μ₂ = δ_B).
  H_g starts at the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bfgs_inverse_update", "powell_lm_damping", "hessian_action_pair", "kbfgs_precondition"]


def bfgs_inverse_update(H: Tensor, s: Tensor, y: Tensor) -> Tensor:
    """The BFGS update of an inverse-Hessian approximation ``H`` with the pair (s, y) (see the
    module docstring); returns a new symmetric matrix. Requires sᵀy > 0."""
    if H.ndim != 2 or H.shape[0] != H.shape[1] or s.shape != (H.shape[0],) or y.shape != s.shape:
        raise ValueError(
            f"bfgs_inverse_update: H must be d x d and s, y vectors of length d; got H {tuple(H.shape)}, "
            f"s {tuple(s.shape)}, y {tuple(y.shape)}"
        )
    sty = torch.dot(s, y)
    if not bool(sty > 0):
        raise ValueError(f"bfgs_inverse_update needs sᵀy > 0 (curvature condition), got {float(sty)}; damp the pair first")
    rho = 1.0 / sty
    Hy = H @ y
    yHy = torch.dot(y, Hy)
    # (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ = H − ρ (Hy sᵀ + s (Hy)ᵀ) + (ρ² yᵀHy + ρ) s sᵀ
    out = H - rho * (torch.outer(Hy, s) + torch.outer(s, Hy)) + (rho * rho * yHy + rho) * torch.outer(s, s)
    return (out + out.T) / 2


def powell_lm_damping(H: Tensor, s: Tensor, y: Tensor, mu1: float, mu2: float) -> tuple[Tensor, Tensor]:
    """Powell's damping of s for the inverse approximation H, then Levenberg-Marquardt damping
    y ← y + μ₂ s (see the module docstring); returns new ``(s, y)``."""
    if not 0 < mu1 < 1:
        raise ValueError(f"mu1 must be in (0, 1), got {mu1}")
    if not mu2 > 0:
        raise ValueError(f"mu2 (the Levenberg-Marquardt damping) must be > 0, got {mu2}")
    Hy = H @ y
    yHy = torch.dot(y, Hy)
    sty = torch.dot(s, y)
    if bool(sty < mu1 * yHy):
        theta = (1 - mu1) * yHy / (yHy - sty)
        s = theta * s + (1 - theta) * Hy
    return s, y + mu2 * s


def hessian_action_pair(H_a: Tensor, A_times: "callable | Tensor", a_mean: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """The A-side pair s = H_a ā, y = (A + δ_A I) s. ``A_times`` is A (a matrix) or a function
    ``v -> A v`` (e.g. the mini-batch product (1/(N·T)) aᵀ(a v), which never forms A)."""
    s = H_a @ a_mean
    As = A_times @ s if isinstance(A_times, Tensor) else A_times(s)
    return s, As + damping * s


def kbfgs_precondition(H_g: Tensor, H_a: Tensor, G_w: Tensor, g_b: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """``(H_g G_W H_a, H_g g_b)``; ``G_W`` is the weight gradient as a ``[d_out, d_in]`` matrix."""
    return H_g @ G_w @ H_a, None if g_b is None else H_g @ g_b
