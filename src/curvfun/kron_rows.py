"""K-FAC in data space: a Kronecker side kept as its rows and inverted by Woodbury.

A K-FAC factor of a Linear layer is a Gram matrix of R rows, M = XᵀX/c (A: the N·T inputs, B:
the K·N·T output gradients; see :func:`curvfun.kron.factor_rows`). When R < d — a 784- or
4096-wide layer at batch 128 — M has rank R and its damped inverse needs no d x d work:

    (M + δI)⁻¹ = (I − Yᵀ (δI + Y Yᵀ)⁻¹ Y)/δ,      Y = X/√c  [R, d]   (Woodbury)

so a side costs one R x R Gram and Cholesky (O(R²d + R³)) to refresh instead of O(d³), and
applying it to a gradient G [o, d] costs O(o·d·R) instead of O(o·d²). The result is the same
matrix as the dense route (exact, not an approximation; equal to float rounding, see the tests).

:class:`KronRowsFactor` holds each side either dense ([d, d]) or as rows ([R, d]) — the rows form
when 2R ≤ d (:func:`prefer_rows`), where both refresh and apply are cheaper — with the same
``matvec`` / ``to_dense`` / ``damped_inverse`` as :class:`~curvfun.kron.KronFactor` and the same
π-damping (traces from the rows: tr M = ‖Y‖²_F). One group only (Linear; Conv2d with
``groups=1`` has R = N·pixels rows, far more than its d, so it stays dense).

Not for running averages: an EMA of Gram matrices is not a Gram matrix of averaged rows, so the
natural-gradient makers use this form only without EMA (``ema_decay=-1``, ASDL's default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from .kron import KronFactor, KronInverse, _layer_dense, _register
from .kron_math import gram, factor_rows, kron_factors_from_layer
from .layers import LayerData
from .linalg import damped_cholesky_inverse, damping_from_traces, woodbury_core

__all__ = ["KronRowsFactor", "KronRowsInverse", "prefer_rows", "kron_rows_from_layer", "woodbury_core",
           "gradient_from_rows", "preconditioned_gradient_from_rows", "rows_gradient_pays"]


def prefer_rows(rows: int, dim: int) -> bool:
    """Whether a side of ``rows`` rows and width ``dim`` is cheaper as rows: 2R ≤ d (then the
    Woodbury apply, 2·o·d·R, is at most the dense apply o·d², and the refresh O(R²d) ≪ O(d³))."""
    return 2 * rows <= dim


def _two_sided(grad: Mapping[str, Tensor], left, right, folded: bool) -> dict[str, Tensor]:
    """``{"weight": left(right(G_W)), "bias": left(g_b)}`` on one group (folded: on [G_W g_b]); a
    bias without its weight (frozen) gets left(g_b), as in :func:`curvfun.kron._apply`."""
    if grad.get("weight") is None:
        return {"bias": left(grad["bias"].reshape(-1, 1)).reshape(grad["bias"].shape)}
    W = grad["weight"]
    Wm = W.reshape(W.shape[0], -1)
    if folded:
        Wm = torch.cat([Wm, grad["bias"].reshape(-1, 1)], 1)
    X = left(right(Wm))
    if folded:
        return {"weight": X[:, :-1].reshape(W.shape), "bias": X[:, -1].reshape(grad["bias"].shape)}
    out = {"weight": X.reshape(W.shape)}
    if grad.get("bias") is not None:
        out["bias"] = left(grad["bias"].reshape(-1, 1)).reshape(grad["bias"].shape)
    return out


def _side_dense(M: Tensor, rows: bool) -> Tensor:
    return M.T @ M if rows else M


def _side_trace(M: Tensor, rows: bool) -> Tensor:
    return M.square().sum() if rows else M.diagonal().sum()


@dataclass(frozen=True)
class KronRowsFactor:
    """K-FAC factors with each side dense ``[d, d]`` or as rows ``Y`` ``[R, d]`` (M = YᵀY, the
    1/c scaling already applied). Immutable, an optree node (namespace "curvfun")."""

    A: Tensor
    B: Tensor
    a_rows: bool = False
    b_rows: bool = False
    weight_shape: tuple = ()
    has_bias: bool = False
    folded: bool = False

    _tensor_fields = ("A", "B")
    _static_fields = ("a_rows", "b_rows", "weight_shape", "has_bias", "folded")

    def dense(self) -> KronFactor:
        """The same factors as a :class:`~curvfun.kron.KronFactor` (forms YᵀY: O(R·d²))."""
        return KronFactor(_side_dense(self.A, self.a_rows), _side_dense(self.B, self.b_rows),
                          self.weight_shape, self.has_bias, self.folded)

    def matvec(self, grad: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{"weight": B G_W A, "bias": B g_b}``, rows sides applied as Yᵀ(Y·): O(o·d·R) each."""
        A, B = self.A, self.B
        right = (lambda G: (G @ A.T) @ A) if self.a_rows else (lambda G: G @ A)
        left = (lambda G: B.T @ (B @ G)) if self.b_rows else (lambda G: B @ G)
        return _two_sided(grad, left, right, self.folded)

    def to_dense(self, include_bias: bool = False) -> Tensor:
        return self.dense().to_dense(include_bias)

    def damping(self, damping: float, heuristic: str = "pi") -> tuple[Tensor, Tensor]:
        """π-damping (:func:`curvfun.kron.damping_from_traces`) from the traces of the two sides."""
        return damping_from_traces(_side_trace(self.A, self.a_rows), self.A.shape[-1],
                                   _side_trace(self.B, self.b_rows), self.B.shape[-1], damping, heuristic)

    def damped_inverse(self, damping: float, heuristic: str = "pi") -> "KronRowsInverse":
        """(B+δ_B I)⁻¹ · (A+δ_A I)⁻¹: Woodbury cores for rows sides, Cholesky inverses for dense
        sides. O(R²d + R³) per rows side, O(d³) per dense side. A rows side's R x R Gram Y Yᵀ is
        formed once, for its trace (tr YᵀY = tr YYᵀ, the π-damping) and for its core."""
        gram_A = self.A @ self.A.T if self.a_rows else None
        gram_B = self.B @ self.B.T if self.b_rows else None
        trace = lambda M, gram: (M if gram is None else gram).diagonal().sum()  # noqa: E731
        dA, dB = damping_from_traces(trace(self.A, gram_A), self.A.shape[-1], trace(self.B, gram_B),
                                     self.B.shape[-1], damping, heuristic)
        A, kA = self._side_inverse(self.A, gram_A, dA, "input factor A")
        B, kB = self._side_inverse(self.B, gram_B, dB, "output factor B")
        return KronRowsInverse(A, B, kA, kB, dA, dB, self.a_rows, self.b_rows,
                               self.weight_shape, self.has_bias, self.folded)

    @staticmethod
    def _side_inverse(M: Tensor, gram: Tensor | None, delta: Tensor, what: str) -> tuple[Tensor, Tensor | None]:
        if gram is not None:  # a rows side
            return M, woodbury_core(M, delta, gram)
        return damped_cholesky_inverse(M, delta, what), None


_register(KronRowsFactor)


@dataclass(frozen=True)
class KronRowsInverse:
    """Damped inverse of a :class:`KronRowsFactor`: ``matvec`` is (B+δ_B)⁻¹ G (A+δ_A)⁻¹.

    Dense side: ``A`` is (A+δ_A I)⁻¹ and ``A_core`` None. Rows side: ``A`` is Y, ``A_core`` the
    Woodbury core K = (δ_A I + YYᵀ)⁻¹Y (:func:`woodbury_core`), and
    (A+δ_A I)⁻¹ G = (G − Yᵀ(K G))/δ_A."""

    A: Tensor
    B: Tensor
    A_core: Tensor | None
    B_core: Tensor | None
    delta_A: Tensor
    delta_B: Tensor
    a_rows: bool = False
    b_rows: bool = False
    weight_shape: tuple = ()
    has_bias: bool = False
    folded: bool = False

    _tensor_fields = ("A", "B", "A_core", "B_core", "delta_A", "delta_B")
    _static_fields = ("a_rows", "b_rows", "weight_shape", "has_bias", "folded")

    def matvec(self, grad: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Cost per rows side 2·o·d·R (two GEMMs through the R rows), per dense side o·d²."""
        return _two_sided(grad, self._left, self._right, self.folded)

    def _right(self, G: Tensor) -> Tensor:
        """G (A+δ_A I)⁻¹."""
        out = self._right_undamped(G)
        return out / self.delta_A if self.a_rows else out

    def _left(self, G: Tensor) -> Tensor:
        """(B+δ_B I)⁻¹ G."""
        out = self._left_undamped(G)
        return out / self.delta_B if self.b_rows else out

    def _right_undamped(self, G: Tensor) -> Tensor:
        """Dense side: G (A+δ_A I)⁻¹; rows side: G − (G Yᵀ) K = δ_A · G (A+δ_A I)⁻¹ (one GEMM and
        one fused multiply-add GEMM)."""
        if not self.a_rows:
            return G @ self.A
        return torch.addmm(G, G @ self.A.T, self.A_core, alpha=-1)

    def _left_undamped(self, G: Tensor) -> Tensor:
        """Dense side: (B+δ_B I)⁻¹ G; rows side: G − Yᵀ(K G) = δ_B · (B+δ_B I)⁻¹ G."""
        if not self.b_rows:
            return self.B @ G
        return torch.addmm(G, self.B.T, self.B_core @ G, alpha=-1)

    def _left_undamped_t(self, H: Tensor) -> Tensor:
        """:meth:`_left_undamped` of Hᵀ, transposed: H (B+δ_B I)⁻¹ (dense side), H − (H Kᵀ) Y (rows
        side), for H ``[n, o]`` stored row-major (no transposed copy of H)."""
        if not self.b_rows:
            return H @ self.B
        return torch.addmm(H, H @ self.B_core.T, self.B, alpha=-1)

    def _scale(self) -> tuple[Tensor | float, Tensor | float]:
        """The 1/δ factors the undamped applications leave out (1 for dense sides)."""
        return (1 / self.delta_A if self.a_rows else 1.0), (1 / self.delta_B if self.b_rows else 1.0)

    def _dense_side(self, M: Tensor, core: Tensor | None, delta: Tensor, rows: bool) -> Tensor:
        if not rows:
            return M
        eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
        return (eye - M.T @ core) / delta

    def to_dense(self, include_bias: bool = False) -> Tensor:
        A = self._dense_side(self.A, self.A_core, self.delta_A, self.a_rows)
        B = self._dense_side(self.B, self.B_core, self.delta_B, self.b_rows)
        return _layer_dense(B.unsqueeze(0), A.unsqueeze(0), self.folded, self.has_bias, include_bias)


_register(KronRowsInverse)


def kron_rows_from_layer(data: LayerData, kfac_type: str = "expand", bias: str = "separate",
                         prefer=prefer_rows) -> KronRowsFactor | KronFactor:
    """A Linear / Conv2d layer's K-FAC factors with each side as rows where ``prefer(R, d)`` says
    so (default :func:`prefer_rows`), else dense; a plain :class:`~curvfun.kron.KronFactor` when no
    side is (or the layer has groups). Same matrices as :func:`curvfun.kron.kron_factors_from_layer`.
    Cost: O(R·d) per rows side (a scaled copy), O(R·d²) per dense side."""
    if data.kind != "affine":
        raise ValueError(f"K-FAC rows exist for affine layers (Linear, convolutions) only, got a {data.kind} layer")
    (am, ca), (gm, cb) = factor_rows(data, kfac_type, bias)
    if am.ndim != 2:  # grouped convolution: block-diagonal over groups, always dense
        return kron_factors_from_layer(data, kfac_type, bias)
    a_rows, b_rows = prefer(am.shape[0], am.shape[1]), prefer(gm.shape[0], gm.shape[1])
    A = am * (1.0 / ca) ** 0.5 if a_rows else gram(am) / ca
    B = gm * (1.0 / cb) ** 0.5 if b_rows else gram(gm) / cb
    folded = bias == "folded" and data.has_bias
    if not (a_rows or b_rows):
        return KronFactor(A, B, data.weight_shape, data.has_bias, folded)
    return KronRowsFactor(A, B, a_rows, b_rows, data.weight_shape, data.has_bias, folded)


# --- the preconditioned gradient straight from the layer's rows ---------------------------------


def gradient_from_rows(a: Tensor, g: Tensor, has_bias: bool, folded: bool, weight_shape) -> dict[str, Tensor]:
    """A Linear layer's gradient from its rows: G_W = gᵀ a, g_b = Σ g (a ``[R, d]`` inputs, g
    ``[R, o]`` output gradients of the loss; folded: a carries the trailing ones column). O(o·d·R)."""
    G = g.T @ a
    if folded:
        return {"weight": G[:, :-1].reshape(weight_shape), "bias": G[:, -1].contiguous()}
    out = {"weight": G.reshape(weight_shape)}
    if has_bias:
        out["bias"] = g.sum(0)
    return out


def preconditioned_gradient_from_rows(inv, a: Tensor, g: Tensor) -> dict[str, Tensor] | None:
    """(B+δ_B)⁻¹ (gᵀa) (A+δ_A)⁻¹ as ((B+δ_B)⁻¹ gᵀ)(a (A+δ_A)⁻¹), never forming gᵀa first.

    ``inv``: a :class:`KronRowsInverse` or a one-group :class:`~curvfun.kron.KronInverse`; a, g as in
    :func:`gradient_from_rows` (R rows). Cost: the A side on R vectors + the B side on R vectors +
    o·d·R for the product, against o·d·R for gᵀa plus the sides on o resp. d vectors when the
    gradient is formed first — cheaper when R < min(o, d) (see :func:`rows_gradient_pays`).
    None for other inverse types."""
    if isinstance(inv, KronRowsInverse):
        # [R, o]: the B side on the rows of g as they are stored, ((B+δ_B)⁻¹gᵀ)ᵀ up to δ_B
        gl = inv._left_undamped_t(g)
        ar = inv._right_undamped(a)  # [R, d]
        sa, sb = inv._scale()
        folded, has_bias, shape = inv.folded, inv.has_bias, inv.weight_shape
    elif isinstance(inv, KronInverse) and inv.A_inv.ndim == 2:
        gl, ar, sa, sb = g @ inv.B_inv, a @ inv.A_inv, 1.0, 1.0  # B_inv symmetric: (B_inv gᵀ)ᵀ
        folded, has_bias, shape = inv.folded, inv.has_bias, inv.weight_shape
    else:
        return None
    W = (gl * (sa * sb)).T @ ar  # the 1/δ scalings on the small [R, o] factor
    if folded:
        return {"weight": W[:, :-1].reshape(shape), "bias": W[:, -1].contiguous()}
    out = {"weight": W.reshape(shape)}
    if has_bias:
        out["bias"] = gl.sum(0) * sb
    return out


def rows_gradient_pays(rows: int, d_in: int, d_out: int, rows_a: int | None, rows_b: int | None) -> bool:
    """Whether :func:`preconditioned_gradient_from_rows` is cheaper than preconditioning the formed
    gradient, for a gradient of ``rows`` rows and sides given as rows (``rows_a``/``rows_b``: their
    row counts) or dense (None). Per vector a side costs 2·d·R as rows, d² dense; the test is
    rows·(c_A + c_B) < d_out·c_A + d_in·c_B."""
    c_a = 2 * d_in * rows_a if rows_a is not None else d_in * d_in
    c_b = 2 * d_out * rows_b if rows_b is not None else d_out * d_out
    return rows * (c_a + c_b) < d_out * c_a + d_in * c_b
