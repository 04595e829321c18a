"""Diagonal Kronecker factors and the AdaFisher curvature, as pure functions.

AdaFisher (Gomes et al. 2024) approximates each layer's Fisher block by the Kronecker product of
the *diagonals* of the K-FAC factors, so the curvature of a weight entry is a product of two
numbers and the preconditioned gradient is an elementwise division.

Factors (curvfun's K-FAC conventions, :mod:`curvfun.kron`; ĝ the per-sample output gradients
of the requested columns with weights w_k; see :mod:`curvfun.layers` for ``a`` and ``g``):

* Linear / Conv2d (one pair per conv group):
  ``diag(A) = (1/(N·T)) Σ_{n,t} a_nt²``, ``diag(B) = (1/N) Σ_k w_k Σ_{n,t} ĝ_nt²``.
  With a bias the input is read in homogeneous coordinates ā = [a, 1], whose extra diagonal
  entry is exactly 1, so the bias block is ``diag(B) · 1`` (the same as K-FAC's separate bias
  block B). ``A`` is returned ``[G, d_in/G (+1)]``, ``B`` ``[G, d_out/G]``.
* Embedding (weight ``[V, D]``): ``A = counts/(N·T)`` ``[V]`` (token frequencies; padding_idx
  excluded), ``diag(B)`` ``[D]`` over every position (padding positions included, as K-FAC's B).
* LayerNorm / BatchNorm: each channel c is a 1x1 "linear" unit z_c = γ_c x̂_c + β_c, so
  ``A_c = (1/(N·T)) Σ_{n,t} x̂²_ntc`` (with a homogeneous 1 for β) ``[C, 1 (+1)]`` and
  ``B_c = (1/N) Σ_{n,t} ĝ²_ntc`` ``[C, 1]``.

The damped diagonal-Kronecker Fisher of a layer, elementwise in the parameter's shape:

    F̃_W[o, i] = diag(B)[o] · diag(A)[i] + λ,     F̃_b[o] = diag(B)[o] · ā_last + λ

(for Embedding ``F̃_W[v, d] = A[v] · diag(B)[d] + λ``). Cost: one pass over the layer data,
O(N·T·(d_in + d_out)) (plus im2col for Conv2d; :func:`conv2d_diag_kron` gives the Conv2d
factors from the raw inputs without im2col, O(N·C·H·W)); F̃ costs O(#parameters).

Moving averages of the factors, refreshed every ``TCov`` steps (``mode``):

* ``"corrected"`` (curvfun's default): a true convex average
  ``H ← γ·H + (1 − γ)·Ĥ``, initialised with the first estimate (``H₀ = Ĥ₀``), so the scale
  of H is the scale of the Fisher and damping λ means what it says.
* ``"paper"``: the published AdaFisher code's rule, kept for comparison:
  ``H ← 0.1γ·H + 0.01γ·MinMax(Ĥ)``, ``H`` initialised to ones before the first update, with
  ``MinMax(x) = (x − min x)/(max x − min x + 1e-6)`` over the whole layer factor (+inf read as 1,
  −inf as 0). The coefficients sum to 0.11γ, not 1: the factors settle near
  0.01γ/(1 − 0.1γ) ≈ 0.009 (γ = 0.8) whatever the curvature, and λ = 1e-3 dominates F̃.
  MinMax is scale-free but for its 1e-6, which the published code adds on its own scale: its
  B is built from the output gradients of the loss as called (a mean loss: ĝ/N) averaged over
  the N·T rows, i.e. curvfun's B / (r²·T) (r = N for a mean loss, 1 for a sum; T positions per
  sample), while its A is curvfun's. ``paper_scale = (s_A, s_B)`` of :func:`update_diag_kron`
  (the published factors are A/s_A, B/s_B) puts the 1e-6 at ``1e-6·s`` on curvfun's scale, so
  the result is the published one.

These functions keep no state; :class:`curvfun.optim.AdaFisher` holds the averages and calls
them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .layers import LayerData
from .layers.affine import matrix_as_weight
from .layers.conv import conv_pads

__all__ = [
    "EMA_MODES",
    "PAPER_MINMAX_EPS",
    "DiagKron",
    "diag_kron_factors",
    "conv2d_diag_kron",
    "min_max_normalise",
    "ema_corrected",
    "ema_paper",
    "update_diag_kron",
    "diag_kron_fisher",
]

EMA_MODES = ("corrected", "paper")
#: the epsilon of the published min-max normalisation
PAPER_MINMAX_EPS = 1e-6


class DiagKron(NamedTuple):
    """The diagonal factors of one layer (shapes in the module docstring)."""

    A: Tensor
    B: Tensor


def _weighted_sq_sum(g: Tensor, w: Tensor | None, dims: tuple[int, ...]) -> Tensor:
    """Σ_k w_k Σ_dims g² for ``g [K, ...]`` (the column dim 0 is always summed)."""
    sq = g.pow(2)
    if w is not None:
        sq = sq * w.to(g.dtype).reshape(-1, *([1] * (g.ndim - 1)))
    return sq.sum((0,) + dims)


def diag_kron_factors(data: LayerData) -> DiagKron:
    """``(diag A, diag B)`` of one layer from its captured data (module docstring).

    ``data.g`` must hold output gradients (``[K, ...]``) and ``data.weights`` their column
    weights (None means weight 1 for every column).
    """
    if data.g is None:
        raise ValueError("diagonal Kronecker factors need output gradients (a capture with fisher_type != 'none')")
    N = data.batch_size
    w = data.weights
    if data.kind == "affine":
        a, g = data.a, data.g  # [N, G, T, d_in], [K, N, G, T, d_out]
        T = a.shape[2]
        A = a.pow(2).sum((0, 2)) / (N * T)  # [G, d_in]
        if data.has_bias:
            A = torch.cat([A, torch.ones_like(A[:, :1])], 1)
        B = _weighted_sq_sum(g, w, (1, 3)) / N  # [G, d_out]
        return DiagKron(A, B)
    if data.kind == "embedding":
        ids, g = data.a, data.g  # [N, T], [K, N, T, D]
        m = data.module
        valid = ids != m.padding_idx if m.padding_idx is not None else torch.ones_like(ids, dtype=torch.bool)
        counts = torch.zeros(m.num_embeddings, dtype=g.dtype, device=g.device)
        counts.index_add_(0, ids[valid], torch.ones(int(valid.sum()), dtype=g.dtype, device=g.device))
        A = counts / (N * ids.shape[1])
        B = _weighted_sq_sum(g, w, (1, 2)) / N  # [D]
        return DiagKron(A, B)
    if data.kind == "norm":
        xhat, g = data.a, data.g  # [N, T, C], [K, N, T, C]
        T = xhat.shape[1]
        A = (xhat.pow(2).sum((0, 1)) / (N * T)).unsqueeze(1)  # [C, 1]
        if data.has_bias:
            A = torch.cat([A, torch.ones_like(A)], 1)
        B = (_weighted_sq_sum(g, w, (1, 2)) / N).unsqueeze(1)  # [C, 1]
        return DiagKron(A, B)
    raise ValueError(f"no diagonal Kronecker factors for layer kind {data.kind!r}")


def conv2d_diag_kron(
    inputs: list[Tensor], grads: list[Tensor], module: torch.nn.Conv2d, has_bias: bool, weights: Tensor | None = None
) -> DiagKron:
    """The Conv2d case of :func:`diag_kron_factors` straight from the module's inputs
    ``[N, C_in, H, W]`` and output gradients ``[K, N, C_out, H_o, W_o]`` (one entry per call),
    without im2col: ``Σ_{n,t} a²`` of the patch entry (c, i, j) is the sum of x² (zero-padded)
    over the strided window that entry sees, so it is one pass over x² summed over the batch and
    kh·kw strided sums over ``[C, H, W]``. Same result as the im2col route; cost O(N·C·H·W)
    instead of O(N·T·C·kh·kw) with a copy."""
    kh, kw = module.kernel_size
    sh, sw = module.stride
    dh, dw = module.dilation
    (ph, ph_after), (pw, pw_after) = conv_pads(module)
    if (ph, pw) != (ph_after, pw_after) or module.padding_mode != "zeros":
        raise ValueError("conv2d_diag_kron needs zero padding, equal on both sides; use diag_kron_factors")
    G = module.groups
    A_sum, T_total, N = None, 0, inputs[0].shape[0]
    for x in inputs:
        if x.ndim != 4:
            raise ValueError(f"Conv2d: expected a batched [N, C, H, W] input, got shape {tuple(x.shape)}")
        s = x.pow(2).sum(0)  # [C, H, W]
        if ph or pw:
            s = torch.nn.functional.pad(s, (pw, pw, ph, ph))
        Ho = (s.shape[1] - dh * (kh - 1) - 1) // sh + 1
        Wo = (s.shape[2] - dw * (kw - 1) - 1) // sw + 1
        cols = []
        for i in range(kh):
            for j in range(kw):
                win = s[:, i * dh : i * dh + sh * (Ho - 1) + 1 : sh, j * dw : j * dw + sw * (Wo - 1) + 1 : sw]
                cols.append(win.sum((1, 2)))
        part = torch.stack(cols, 1)  # [C, kh*kw], order (c, i, j) as weight.flatten(1)
        A_sum = part if A_sum is None else A_sum + part
        T_total += Ho * Wo
    A = A_sum.reshape(G, -1) / (N * T_total)
    if has_bias:
        A = torch.cat([A, torch.ones_like(A[:, :1])], 1)
    B = sum(_weighted_sq_sum(g, weights, (1, 3, 4)) for g in grads) / N  # [C_out]
    return DiagKron(A, B.reshape(G, -1))


def min_max_normalise(x: Tensor, eps: float = PAPER_MINMAX_EPS) -> Tensor:
    """``(x − min x)/(max x − min x + eps)`` over all entries (+inf read as 1, −inf as 0), as in
    the published AdaFisher code. Returns a new tensor."""
    x = torch.where(x == math.inf, torch.ones_like(x), x)
    x = torch.where(x == -math.inf, torch.zeros_like(x), x)
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo + eps)


def ema_corrected(old: Tensor | None, new: Tensor, gamma: float) -> Tensor:
    """``γ·old + (1 − γ)·new`` (a convex average); the first estimate is taken as it is."""
    if old is None:
        return new.clone()
    return gamma * old + (1.0 - gamma) * new


def ema_paper(old: Tensor | None, new: Tensor, gamma: float, eps: float = PAPER_MINMAX_EPS) -> Tensor:
    """The published rule ``0.1γ·old + 0.01γ·MinMax(new)``, with ``old`` = ones at the start and
    ``eps`` MinMax's (:func:`min_max_normalise`)."""
    if old is None:
        old = torch.ones_like(new)
    return (0.1 * gamma) * old + (0.01 * gamma) * min_max_normalise(new, eps)


def update_diag_kron(old: DiagKron | None, new: DiagKron, gamma: float, mode: str = "corrected",
                     paper_scale: tuple[float, float] = (1.0, 1.0)) -> DiagKron:
    """Both factors of a layer averaged by ``mode`` (``"corrected"`` or ``"paper"``).
    ``paper_scale = (s_A, s_B)`` (``"paper"`` only): the published code's factors are ``new.A / s_A``
    and ``new.B / s_B``, so its MinMax eps is ``PAPER_MINMAX_EPS · s`` here (module docstring)."""
    if mode == "corrected":
        return DiagKron(ema_corrected(None if old is None else old.A, new.A, gamma),
                        ema_corrected(None if old is None else old.B, new.B, gamma))
    if mode == "paper":
        s_A, s_B = paper_scale
        return DiagKron(ema_paper(None if old is None else old.A, new.A, gamma, PAPER_MINMAX_EPS * s_A),
                        ema_paper(None if old is None else old.B, new.B, gamma, PAPER_MINMAX_EPS * s_B))
    raise ValueError(f"unknown ema mode {mode!r}; expected one of {EMA_MODES}")


def diag_kron_fisher(
    factors: DiagKron,
    kind: str,
    weight_shape: tuple[int, ...],
    has_bias: bool,
    damping: float,
    layout: str = "",
) -> dict[str, Tensor]:
    """The damped diagonal-Kronecker Fisher ``{"weight": F̃_W, "bias": F̃_b}`` of one layer, each in
    its parameter's shape (formula in the module docstring). ``has_bias`` must match how the
    factors were built (a homogeneous entry in ``A``). ``layout``: an affine weight stored in
    another layout than its ``[G, d_out, d_in]`` matrix (``"transposed"`` convolutions, see
    :func:`curvfun.layers.affine.matrix_as_weight`)."""
    A, B = factors
    out: dict[str, Tensor] = {}
    if kind == "affine":
        d_in = A.shape[1] - (1 if has_bias else 0)
        out["weight"] = matrix_as_weight(B.unsqueeze(2) * A[:, None, :d_in], weight_shape, layout) + damping
        if has_bias:
            out["bias"] = (B * A[:, d_in:]).reshape(-1) + damping
        return out
    if kind == "embedding":
        out["weight"] = (A.unsqueeze(1) * B.unsqueeze(0)).reshape(weight_shape) + damping
        return out
    if kind == "norm":
        out["weight"] = (B[:, 0] * A[:, 0]).reshape(weight_shape) + damping
        if has_bias:
            out["bias"] = (B[:, 0] * A[:, 1]).reshape(weight_shape) + damping
        return out
    raise ValueError(f"no diagonal Kronecker Fisher for layer kind {kind!r}")
