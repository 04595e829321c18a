"""Kronecker-factored curvature (K-FAC), its damped inverses, eigen-decompositions and EKFAC.

Conventions (GUIDE, fixed). For a layer with weight W (d_out x d_in) and per-sample output
gradients ĝ (for the columns of the requested ``fisher_type``, weights w_k):

* A = (1/(N·T)) Σ_{n,t} a_nt a_ntᵀ (inputs), B = (1/N) Σ_k w_k Σ_{n,t} ĝ_nt ĝ_ntᵀ (K-FAC-expand;
  T = sequence positions / conv output pixels / repeated calls; T = 1 for a plain Linear);
* K-FAC-reduce (Eschenhagen et al. 2023): â_n = (1/T) Σ_t a_nt, ĝ_n = Σ_t ĝ_nt,
  A = (1/N) Σ_n â_n â_nᵀ, B = (1/N) Σ_k w_k Σ_n ĝ_n ĝ_nᵀ;
* the weight block is A ⊗ B in column-major vec order; curvfun uses **row-major** vec(W)
  (``W.flatten()``), where the block is ``torch.kron(B, A)``; the bias is its own block B
  (``bias="separate"``, default), so the preconditioned gradient is B⁻¹ G_W A⁻¹ and B⁻¹ g_b;
  ``bias="folded"`` uses homogeneous inputs ā = [a, 1] and one block for [W b];
* Conv2d: im2col over kernel/stride/padding/dilation, one (A, B) pair per group
  (block-diagonal over groups); weight ``[out, in/groups, kh, kw]`` read as
  ``[out, in/groups·kh·kw]``;
* Embedding (weight ``[V, D]``, rows indexed by tokens): A = diag(token counts)/(N·T) (a
  vector), B over D, block ``kron(diag(A), B)`` on row-major vec(W); always expand;
* LayerNorm / BatchNorm: unit-wise blocks: per channel c the exact 2x2 Fisher block over
  (γ_c, β_c) (1x1 without bias); ``diag()`` gives their diagonals.

Damping (``heuristic="pi"``, default): π = sqrt((tr A/dim A)/(tr B/dim B)), δ_A = sqrt(λ)·π,
δ_B = sqrt(λ)/π, each at least 1e-7, falling back to δ_A = δ_B = sqrt(λ) when π is 0 or not
finite; ``heuristic="none"``: δ_A = δ_B = sqrt(λ). Inverses by Cholesky, retried in float64
when the factor's dtype fails; a factor that is not positive definite even then raises
:class:`NotPositiveDefiniteError`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

import optree
import torch
from torch import Tensor

from .layers import LayerData
from .layers.data import homogeneous_inputs
from .linalg import (
    MIN_DAMPING,
    NotPositiveDefiniteError,
    check_damping,
    damped_cholesky_inverse,
    pi_damping,
)
from .layers.affine import layout_permutation, matrix_as_weight, weight_as_matrix

__all__ = [
    "KronFactor",
    "KronInverse",
    "KronEigen",
    "EKFACFactor",
    "EmbeddingFactor",
    "UnitWiseFactor",
    "DiagFactor",
    "NotPositiveDefiniteError",
    "pi_damping",
    "damped_cholesky_inverse",
    "KFAC_TYPES",
    "BIAS_MODES",
]

KFAC_TYPES = ("expand", "reduce")
BIAS_MODES = ("separate", "folded")


def _register(cls):
    fields = cls._tensor_fields
    static = cls._static_fields

    def flatten(obj):
        return tuple(getattr(obj, f) for f in fields), tuple(getattr(obj, f) for f in static), fields

    def unflatten(meta, children):
        return cls(**dict(zip(fields, children)), **dict(zip(static, meta)))

    optree.register_pytree_node(cls, flatten, unflatten, namespace="curvfun")
    return cls


# --- pure helpers ---------------------------------------------------------------------


def _groups(X: Tensor) -> Tensor:
    return X if X.ndim == 3 else X.unsqueeze(0)


def _weight_matrix(G: Tensor, groups: int) -> Tensor:
    """``[out, ...]`` -> ``[groups, out/groups, rest]``."""
    return G.reshape(groups, G.shape[0] // groups, -1)


def _apply(grad: Mapping[str, Tensor], left: Tensor, right: Tensor, folded: bool) -> dict[str, Tensor]:
    """left_g · G_g · right_g per group, for {"weight", "bias"} (folded: on [W b]); a bias without
    its weight (frozen) gets left_g · g_b, the separate bias block, in either mode."""
    G = left.shape[0]
    if grad.get("weight") is None:  # bias only (the weight is frozen): its own block B
        b = grad["bias"]
        return {"bias": (left @ b.reshape(G, -1, 1)).reshape(b.shape)}
    W = grad["weight"]
    Wm = _weight_matrix(W, G)
    out: dict[str, Tensor] = {}
    if folded:
        b = grad["bias"].reshape(G, -1, 1)
        aug = left @ torch.cat([Wm, b], -1) @ right
        out["weight"] = aug[..., :-1].reshape(W.shape)
        out["bias"] = aug[..., -1].reshape(grad["bias"].shape)
        return out
    out["weight"] = (left @ Wm @ right).reshape(W.shape)
    if "bias" in grad and grad["bias"] is not None:
        b = grad["bias"]
        out["bias"] = (left @ b.reshape(G, -1, 1)).reshape(b.shape)
    return out


def _layer_dense(left: Tensor, right: Tensor, folded: bool, has_bias: bool, include_bias: bool) -> Tensor:
    """Dense matrix of G ↦ left G right on [vec_r(W); b] (params order), block-diag over groups."""
    G, o, _ = left.shape
    d = right.shape[-1]
    if folded:
        din = d - 1
        blocks = [torch.kron(left[g].contiguous(), right[g].contiguous()) for g in range(G)]  # over row-major [W_g b_g]
        M = torch.block_diag(*blocks)
        # permute augmented order (g, o, i) with i = din meaning bias -> [vec_r(W); b]
        idx_w = [(g * o + r) * d + i for g in range(G) for r in range(o) for i in range(din)]
        idx_b = [(g * o + r) * d + din for g in range(G) for r in range(o)]
        perm = torch.tensor(idx_w + idx_b)
        return M[perm][:, perm]
    Mw = torch.block_diag(*[torch.kron(left[g].contiguous(), right[g].contiguous()) for g in range(G)])
    if not (include_bias and has_bias):
        return Mw
    return torch.block_diag(Mw, torch.block_diag(*[left[g] for g in range(G)]))


# --- factor objects -------------------------------------------------------------------


@dataclass(frozen=True)
class KronFactor:
    """K-FAC factors of an affine layer (Linear, convolution, ...): ``A`` (input side) and ``B`` (output side),
    ``[d, d]`` or ``[groups, d, d]``. Immutable and an optree node (namespace "curvfun")."""

    A: Tensor
    B: Tensor
    weight_shape: tuple = ()
    has_bias: bool = False
    folded: bool = False

    _tensor_fields = ("A", "B")
    _static_fields = ("weight_shape", "has_bias", "folded")

    @property
    def groups(self) -> int:
        return 1 if self.A.ndim == 2 else self.A.shape[0]

    def matvec(self, grad: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{"weight": B G_W A, "bias": B g_b}`` (folded: B [G_W g_b] A). O(d_out·d_in·(d_in+d_out))."""
        return _apply(grad, _groups(self.B), _groups(self.A), self.folded)

    def to_dense(self, include_bias: bool = False) -> Tensor:
        """``kron(B, A)`` on row-major vec(W) (= A ⊗ B in column-major vec), block-diagonal over
        groups; ``include_bias=True`` appends the bias block B (params order [vec_r(W); b]).
        Folded: the whole [W b] block, in the order [vec_r(W); b]."""
        return _layer_dense(_groups(self.B), _groups(self.A), self.folded, self.has_bias, include_bias)

    def damping(self, damping: float, heuristic: str = "pi") -> tuple[Tensor, Tensor]:
        return pi_damping(_groups(self.A), _groups(self.B), damping, heuristic)

    def damped_inverse(self, damping: float, heuristic: str = "pi") -> "KronInverse":
        """(B+δ_B I)^{-1} · (A+δ_A I)^{-1} as a factor object with the same ``matvec``."""
        dA, dB = self.damping(damping, heuristic)
        Ai = damped_cholesky_inverse(_groups(self.A), dA, "input factor A")
        Bi = damped_cholesky_inverse(_groups(self.B), dB, "output factor B")
        shape = self.A.shape
        return KronInverse(Ai.reshape(shape), Bi.reshape(self.B.shape), self.weight_shape, self.has_bias, self.folded)

    def eigh(self) -> "KronEigen":
        """Eigen-decompositions A = Q_A Λ_A Q_Aᵀ, B = Q_B Λ_B Q_Bᵀ (float64 retry)."""
        lA, QA = _eigh(self.A)
        lB, QB = _eigh(self.B)
        return KronEigen(QA, lA, QB, lB, self.weight_shape, self.has_bias, self.folded)

    def ekfac(self, data: LayerData) -> "EKFACFactor":
        """EKFAC (George et al. 2018): keep K-FAC's eigenbasis Q_B ⊗ Q_A, replace the
        eigenvalues by the second moments of the per-sample gradients in that basis,
        S = (1/N) Σ_k w_k Σ_n (Q_Bᵀ G_nk Q_A)², which is the Frobenius-closest diagonal in
        that basis to the Fisher block. Cost O(K·N·T·d·(d_in+d_out)) plus the eigh."""
        return _ekfac_from(self.eigh(), data)


def _eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    try:
        return torch.linalg.eigh(M)
    except RuntimeError:
        lam, Q = torch.linalg.eigh(M.to(torch.float64))
        return lam.to(M.dtype), Q.to(M.dtype)


_register(KronFactor)


@dataclass(frozen=True)
class KronInverse:
    """Damped inverse factors: ``matvec`` is (B+δ_B)^{-1} G (A+δ_A)^{-1}."""

    A_inv: Tensor
    B_inv: Tensor
    weight_shape: tuple = ()
    has_bias: bool = False
    folded: bool = False

    _tensor_fields = ("A_inv", "B_inv")
    _static_fields = ("weight_shape", "has_bias", "folded")

    def matvec(self, grad: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return _apply(grad, _groups(self.B_inv), _groups(self.A_inv), self.folded)

    def to_dense(self, include_bias: bool = False) -> Tensor:
        return _layer_dense(_groups(self.B_inv), _groups(self.A_inv), self.folded, self.has_bias, include_bias)


_register(KronInverse)


@dataclass(frozen=True)
class KronEigen:
    """K-FAC in its eigenbasis: A = Q_A diag(λ_A) Q_Aᵀ, B = Q_B diag(λ_B) Q_Bᵀ; the
    eigenvalues of kron(B, A) are ``outer(λ_B, λ_A)`` (row-major, see :meth:`eigenvalues`)."""

    QA: Tensor
    lamA: Tensor
    QB: Tensor
    lamB: Tensor
    weight_shape: tuple = ()
    has_bias: bool = False
    folded: bool = False

    _tensor_fields = ("QA", "lamA", "QB", "lamB")
    _static_fields = ("weight_shape", "has_bias", "folded")

    def eigenvalues(self) -> Tensor:
        """Eigenvalues of kron(B, A) per group ``[G, d_out·d_in]``: λ_B[o]·λ_A[i] at o·d_in + i."""
        lB, lA = self.lamB.reshape(-1, self.lamB.shape[-1]), self.lamA.reshape(-1, self.lamA.shape[-1])
        return (lB.unsqueeze(-1) * lA.unsqueeze(-2)).reshape(lB.shape[0], -1)

    def _mats(self):
        QA, QB = _groups(self.QA), _groups(self.QB)
        A = QA @ torch.diag_embed(self.lamA.reshape(QA.shape[:-1])) @ QA.transpose(-1, -2)
        B = QB @ torch.diag_embed(self.lamB.reshape(QB.shape[:-1])) @ QB.transpose(-1, -2)
        return A, B

    def matvec(self, grad):
        A, B = self._mats()
        return _apply(grad, B, A, self.folded)

    def to_dense(self, include_bias: bool = False) -> Tensor:
        A, B = self._mats()
        return _layer_dense(B, A, self.folded, self.has_bias, include_bias)


_register(KronEigen)


@dataclass(frozen=True)
class EKFACFactor:
    """Eigenvalue-corrected K-FAC: F ≈ (Q_B ⊗ Q_A) diag(S) (Q_B ⊗ Q_A)ᵀ with scalings
    ``S`` ``[G, d_out, d_in]``; the bias (separate) uses Q_B with scalings ``s_bias`` ``[G, d_out]``."""

    QA: Tensor
    QB: Tensor
    S: Tensor
    s_bias: Tensor | None = None
    weight_shape: tuple = ()
    has_bias: bool = False
    folded: bool = False
    inverse: bool = False
    delta: float = 0.0

    _tensor_fields = ("QA", "QB", "S", "s_bias")
    _static_fields = ("weight_shape", "has_bias", "folded", "inverse", "delta")

    def _scale(self, s: Tensor) -> Tensor:
        return 1.0 / (s + self.delta) if self.inverse else s

    def matvec(self, grad: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Q_B [(Q_Bᵀ G Q_A) ⊙ S] Q_Aᵀ (divided by S + λ for the damped inverse)."""
        QA, QB = _groups(self.QA), _groups(self.QB)
        G = QA.shape[0]
        out = {}
        if self.has_bias and not self.folded and grad.get("bias") is not None:
            b = grad["bias"].reshape(G, -1, 1)
            rb = QB.transpose(-1, -2) @ b
            out["bias"] = (QB @ (rb * self._scale(self.s_bias).unsqueeze(-1))).reshape(grad["bias"].shape)
        if grad.get("weight") is None:  # the weight is frozen: the bias block alone
            return out
        W = grad["weight"]
        Wm = _weight_matrix(W, G)
        if self.folded:
            Wm = torch.cat([Wm, grad["bias"].reshape(G, -1, 1)], -1)
        rot = QB.transpose(-1, -2) @ Wm @ QA
        res = QB @ (rot * self._scale(self.S)) @ QA.transpose(-1, -2)
        if self.folded:
            out["weight"] = res[..., :-1].reshape(W.shape)
            out["bias"] = res[..., -1].reshape(grad["bias"].shape)
            return out
        out["weight"] = res.reshape(W.shape)
        return out

    def damped_inverse(self, damping: float) -> "EKFACFactor":
        """(Q diag(S) Qᵀ + λI)^{-1} = Q diag(1/(S+λ)) Qᵀ: exact inverse of the damped EKFAC."""
        check_damping(damping)
        if self.inverse:
            raise ValueError("this EKFAC factor is already an inverse")
        return replace(self, inverse=True, delta=max(float(damping), MIN_DAMPING))

    def to_dense(self, include_bias: bool = False) -> Tensor:
        QA, QB = _groups(self.QA), _groups(self.QB)
        G = QA.shape[0]
        blocks = []
        for g in range(G):
            Q = torch.kron(QB[g].contiguous(), QA[g].contiguous())
            blocks.append(Q @ torch.diag(self._scale(self.S[g]).reshape(-1)) @ Q.T)
        M = torch.block_diag(*blocks)
        if self.folded:
            o, d = QB.shape[-1], QA.shape[-1]
            din = d - 1
            idx_w = [(g * o + r) * d + i for g in range(G) for r in range(o) for i in range(din)]
            idx_b = [(g * o + r) * d + din for g in range(G) for r in range(o)]
            perm = torch.tensor(idx_w + idx_b)
            return M[perm][:, perm]
        if include_bias and self.has_bias:
            Mb = torch.block_diag(*[QB[g] @ torch.diag(self._scale(self.s_bias[g])) @ QB[g].T for g in range(G)])
            M = torch.block_diag(M, Mb)
        return M


_register(EKFACFactor)


def _ekfac_from(eig: KronEigen, data: LayerData) -> EKFACFactor:
    if data.g is None:
        raise ValueError("EKFAC needs a capture with output gradients")
    QA, QB = _groups(eig.QA), _groups(eig.QB)
    a = data.a  # [N, G, T, d]
    if eig.folded:
        a = homogeneous_inputs(data)
    ra = a @ QA  # [N, G, T, d]
    rg = data.g @ QB  # [K, N, G, T, o]
    K, N = rg.shape[:2]
    w = data.weights.to(rg.dtype)
    S = torch.zeros(QA.shape[0], QB.shape[-1], QA.shape[-1], dtype=rg.dtype, device=rg.device)
    for k in range(K):
        Gn = rg[k].transpose(-1, -2) @ ra  # [N, G, o, d]
        S += w[k] * Gn.pow(2).sum(0)
    S = S / N
    s_bias = None
    if data.has_bias and not eig.folded:
        gb = rg.sum(3)  # [K, N, G, o]
        s_bias = (w.reshape(-1, 1, 1, 1) * gb.pow(2)).sum((0, 1)) / N
    return EKFACFactor(eig.QA, eig.QB, S, s_bias, eig.weight_shape, eig.has_bias, eig.folded)


@dataclass(frozen=True)
class EmbeddingFactor:
    """Embedding (weight ``[V, D]``): A = token frequencies ``[V]`` (diagonal), B ``[D, D]``;
    block ``kron(diag(A), B)`` on row-major vec(W); ``matvec``: diag(A) G B."""

    A: Tensor
    B: Tensor
    inverse: bool = False

    _tensor_fields = ("A", "B")
    _static_fields = ("inverse",)

    def matvec(self, grad: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {"weight": self.A.unsqueeze(-1) * grad["weight"] @ self.B}

    def to_dense(self, include_bias: bool = False) -> Tensor:
        return torch.kron(torch.diag(self.A), self.B.contiguous())

    def damped_inverse(self, damping: float, heuristic: str = "pi") -> "EmbeddingFactor":
        dA, dB = pi_damping(self.A, self.B, damping, heuristic, a_diag=True)
        return EmbeddingFactor(1.0 / (self.A + dA), damped_cholesky_inverse(self.B, dB, "output factor B"), True)


_register(EmbeddingFactor)


@dataclass(frozen=True)
class UnitWiseFactor:
    """Per-unit blocks ``[C, p, p]``: for each output unit c the exact curvature block over the
    unit's parameters ``[W[c].reshape(-1); b[c]]`` (its d fan-in weights, then its bias).

    Affine layers (Linear, convolutions, attention projections): W[c] is the unit's row (``[d_in]``,
    or ``[C_in/groups, *kernel]`` read row-major), d = its numel; a transposed convolution's factor
    is on its weight matrix, wrapped in a :class:`RelaidFactor`. Norm layers: d = 1 (γ_c, β_c). p = d + 1, or d without a
    bias (``has_bias``), or 1 when only the bias is trainable (``has_weight=False``).
    ``bias_shape``: the bias's shape where it is not ``(C,)`` (a LayerNorm over several dims).
    ``to_dense`` is in the parameter order ``[vec_row-major(W); b]``. ``matvec`` and
    ``damped_inverse`` cost O(C·p²) and O(C·p³)."""

    blocks: Tensor
    weight_shape: tuple = ()
    has_bias: bool = True
    has_weight: bool = True
    bias_shape: tuple | None = None

    _tensor_fields = ("blocks",)
    _static_fields = ("weight_shape", "has_bias", "has_weight", "bias_shape")

    @property
    def fan_in(self) -> int:
        """d: the number of weight entries per unit (0 when the weight is not trainable)."""
        return self.blocks.shape[-1] - int(self.has_bias) if self.has_weight else 0

    def _stack(self, grad) -> Tensor:
        """``{"weight", "bias"}`` -> ``[C, p]``: W reshaped to ``[C, d]``, the bias as last column."""
        C = self.blocks.shape[0]
        parts = [grad["weight"].reshape(C, -1)] if self.has_weight else []
        if self.has_bias:
            parts.append(grad["bias"].reshape(C, 1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)

    def _unstack(self, v: Tensor, grad) -> dict:
        """The inverse of :meth:`_stack` (shapes taken from ``grad``)."""
        d = self.fan_in
        out = {}
        if self.has_weight:
            out["weight"] = v[:, :d].reshape(grad["weight"].shape)
        if self.has_bias:
            out["bias"] = v[:, d].reshape(grad["bias"].shape)
        return out

    def matvec(self, grad):
        return self._unstack((self.blocks @ self._stack(grad).unsqueeze(-1)).squeeze(-1), grad)

    def damped_inverse(self, damping: float, heuristic: str = "none") -> "UnitWiseFactor":
        """(block_c + λI)^{-1} per unit (plain Tikhonov: unit-wise blocks have no π)."""
        check_damping(damping)
        inv = damped_cholesky_inverse(self.blocks, max(float(damping), MIN_DAMPING), "unit-wise block")
        return replace(self, blocks=inv)

    def _dense_index(self) -> Tensor:
        """``[C, p]``: where each unit's parameters sit in ``[vec_row-major(W); b]``."""
        C, d = self.blocks.shape[0], self.fan_in
        c = torch.arange(C, device=self.blocks.device).unsqueeze(1)
        cols = [c * d + torch.arange(d, device=c.device)] if d else []
        if self.has_bias:
            cols.append(C * d + c)
        return torch.cat(cols, 1)

    def to_dense(self, include_bias: bool = True) -> Tensor:
        """The block-diagonal-by-units matrix ``[C·p, C·p]`` in the order ``[vec_row-major(W); b]``
        (``include_bias=False``: its weight part ``[C·d, C·d]``)."""
        C, p, _ = self.blocks.shape
        idx = self._dense_index()
        M = self.blocks.new_zeros(C * p, C * p)
        M[idx.unsqueeze(2), idx.unsqueeze(1)] = self.blocks
        if include_bias or not self.has_bias:
            return M
        return M[: C * self.fan_in, : C * self.fan_in]

    def diag(self) -> "DiagFactor":
        dg = torch.diagonal(self.blocks, dim1=-2, dim2=-1).clone()  # [C, p]
        d = self.fan_in
        out = {}
        if self.has_weight:
            out["weight"] = dg[:, :d].reshape(self.weight_shape)
        if self.has_bias:
            out["bias"] = dg[:, d].reshape(self.bias_shape or (dg.shape[0],))
        return DiagFactor(out)


_register(UnitWiseFactor)


@dataclass(frozen=True)
class DiagFactor:
    """A diagonal block: ``values`` like the layer's parameters; ``matvec`` is elementwise."""

    values: dict
    inverse: bool = False

    _tensor_fields = ("values",)
    _static_fields = ("inverse",)

    def matvec(self, grad):
        return {k: grad[k] * v for k, v in self.values.items() if k in grad}

    def damped_inverse(self, damping: float, heuristic: str = "none") -> "DiagFactor":
        check_damping(damping)
        lam = max(float(damping), MIN_DAMPING)
        return DiagFactor({k: 1.0 / (v + lam) for k, v in self.values.items()}, True)

    def to_dense(self, include_bias: bool = True) -> Tensor:
        return torch.diag(torch.cat([v.reshape(-1) for v in self.values.values()]))


_register(DiagFactor)


@dataclass(frozen=True)
class RelaidFactor:
    """A factor of an affine layer whose weight is stored in another layout than its
    ``[G·d_out, d_in]`` matrix (a transposed convolution: see
    :func:`curvfun.layers.affine.weight_as_matrix`). ``inner`` is the factor on the matrix; this
    wrapper maps gradients in and out (a permutation, no arithmetic) and delegates the rest."""

    inner: Any
    weight_shape: tuple = ()
    layout: str = ""
    groups: int = 1

    _tensor_fields = ("inner",)
    _static_fields = ("weight_shape", "layout", "groups")

    def _wrap(self, inner: Any) -> "RelaidFactor":
        return replace(self, inner=inner)

    def matvec(self, grad: Mapping[str, Tensor]) -> dict[str, Tensor]:
        g = dict(grad)
        if g.get("weight") is not None:
            M = weight_as_matrix(g["weight"], self.groups, self.layout)
            g["weight"] = M.reshape(-1, M.shape[-1])
        out = self.inner.matvec(g)
        if "weight" in out:
            o = out["weight"].shape[0] // self.groups
            out["weight"] = matrix_as_weight(out["weight"].reshape(self.groups, o, -1), self.weight_shape, self.layout)
        return out

    def to_dense(self, include_bias: bool = False) -> Tensor:
        """The inner dense block in the parameters' own order ``[vec_r(W); b]``."""
        M = self.inner.to_dense(include_bias)
        perm = layout_permutation(self.weight_shape, self.groups, self.layout)
        order = torch.arange(M.shape[0])
        order[: perm.numel()] = torch.argsort(perm)
        return M[order][:, order]

    def damped_inverse(self, *args, **kwargs) -> "RelaidFactor":
        return self._wrap(self.inner.damped_inverse(*args, **kwargs))

    def damping(self, *args, **kwargs):
        return self.inner.damping(*args, **kwargs)

    def eigh(self) -> "RelaidFactor":
        return self._wrap(self.inner.eigh())

    def ekfac(self, data: LayerData) -> "RelaidFactor":
        return self._wrap(self.inner.ekfac(data))

    def __getattr__(self, name: str) -> Any:  # A, B, A_inv, ... of the inner factor
        if name.startswith("_") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


_register(RelaidFactor)




_MOVED = {"kfac": "kron_drivers", "ekfac": "kron_drivers", "_layer_data_of": "kron_drivers",
          "kron_factors_from_layer": "kron_math", "factor_rows": "kron_math"}


def __getattr__(name: str) -> Any:
    """The factor constructors and drivers live in :mod:`curvfun.kron_math` and
    :mod:`curvfun.kron_drivers`; their old names here still resolve."""
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"curvfun.{_MOVED[name]}"), name)
    raise AttributeError(f"module 'curvfun.kron' has no attribute {name!r}")
