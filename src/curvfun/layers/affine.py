"""The affine family: layers whose weight acts as ``y_t = W a_t + b`` at positions t.

Linear (any leading dims), N-d convolutions (im2col patches), transposed convolutions (patches of
the stride-dilated input) and attention projections all arrange their record as

* ``a``: ``[N, G, T, d_in]`` (G groups, T positions: tokens, output pixels, repeated calls),
* ``g``: ``[K, N, G, T, d_out]`` (K output-gradient columns),

and the math below is written once for that form: the weight gradient of sample n is
``Σ_t g_nt a_ntᵀ`` per group (the ``[G, d_out, d_in]`` weight matrix), the bias gradient
``Σ_t g_nt``. :func:`weight_as_matrix` / :func:`matrix_as_weight` map between the parameter as
stored and that matrix (the identity reshape except for transposed convolutions).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "weight_as_matrix",
    "matrix_as_weight",
    "per_sample_grads",
    "per_sample_sq_norms",
    "diag_fisher",
    "prefers_materialising",
    "feature_major",
]


def weight_as_matrix(W: Tensor, groups: int, layout: str = "", lead: int = 0) -> Tensor:
    """The parameter ``W`` (after ``lead`` leading batch dims) as ``[*lead, G, d_out, d_in]``.

    ``layout=""``: ``W.reshape(G, out/G, -1)``. ``"transposed"``: a transposed convolution's
    weight ``[C_in, C_out/G, *k]`` as the weight of the equivalent convolution on the
    stride-dilated input: per group ``[C_out/G, C_in/G·k]`` with the kernel flipped."""
    lead_shape = W.shape[:lead]
    shape = W.shape[lead:]
    if layout == "":
        return W.reshape(*lead_shape, groups, shape[0] // groups, -1)
    if layout == "transposed":
        cin, cog, k = shape[0], shape[1], shape[2:]
        Wg = W.reshape(*lead_shape, groups, cin // groups, cog, *k)
        spatial = tuple(range(lead + 3, lead + 3 + len(k)))
        return Wg.flip(spatial).transpose(lead + 1, lead + 2).reshape(*lead_shape, groups, cog, -1)
    raise ValueError(f"unknown weight layout {layout!r}")


def matrix_as_weight(M: Tensor, weight_shape: tuple, layout: str = "", lead: int = 0) -> Tensor:
    """Inverse of :func:`weight_as_matrix`: ``[*lead, G, d_out, d_in]`` -> ``[*lead, *weight_shape]``."""
    lead_shape = M.shape[:lead]
    if layout == "":
        return M.reshape(*lead_shape, *weight_shape)
    if layout == "transposed":
        G = M.shape[lead]
        cin, cog, k = weight_shape[0], weight_shape[1], tuple(weight_shape[2:])
        Mg = M.reshape(*lead_shape, G, cog, cin // G, *k).transpose(lead + 1, lead + 2)
        spatial = tuple(range(lead + 3, lead + 3 + len(k)))
        return Mg.flip(spatial).reshape(*lead_shape, *weight_shape)
    raise ValueError(f"unknown weight layout {layout!r}")


def layout_permutation(weight_shape: tuple, groups: int, layout: str) -> Tensor | None:
    """Index ``perm`` with ``weight_as_matrix(W).reshape(-1) == W.reshape(-1)[perm]`` (``None``
    for the identity layout): turns a dense block in matrix order into parameter order."""
    if layout == "":
        return None
    idx = torch.arange(math.prod(weight_shape)).reshape(weight_shape)
    return weight_as_matrix(idx, groups, layout).reshape(-1)


def feature_major(y: Tensor) -> Tensor:
    """``[K, N, C, L]`` -> the same values as a ``[K, N, L, C]`` view of a ``[C, K, N, L]`` buffer
    (one copy in runs of L, so that ``reshape(K·N·L, C)`` is a view with contiguous columns)."""
    return y.permute(2, 0, 1, 3).contiguous().permute(1, 2, 3, 0)


def per_sample_grads(a: Tensor, g: Tensor, weight_shape: tuple | None, has_bias: bool, layout: str = "",
                     out: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Per-sample ``{"weight": [N, *weight_shape], "bias": [N, G·d_out]}`` from ``a`` ``[N, G, T, d]``
    and one column ``g`` ``[N, G, T, o]`` (``weight_shape=None``: bias only). Written into ``out``
    buffers when given (fresh pages cost more than the product for wide layers). O(N·G·T·d·o)."""
    N, G, T, d = a.shape
    o = g.shape[-1]
    out = out or {}
    res: dict[str, Tensor] = {}
    if weight_shape is not None:
        wbuf = out.get("weight") if layout == "" else None
        if wbuf is not None:
            dst = wbuf.view(N * G, o, d)
            if T == 1:
                torch.mul(g.reshape(N * G, o, 1), a.reshape(N * G, 1, d), out=dst)
            else:
                torch.bmm(g.reshape(N * G, T, o).transpose(1, 2), a.reshape(N * G, T, d), out=dst)
            res["weight"] = wbuf
        else:
            if T == 1:
                M = g.reshape(N * G, o, 1) * a.reshape(N * G, 1, d)
            else:
                M = torch.bmm(g.reshape(N * G, T, o).transpose(1, 2), a.reshape(N * G, T, d))
            res["weight"] = matrix_as_weight(M.reshape(N, G, o, d), weight_shape, layout, lead=1)
    if has_bias:
        b = g.sum(2).reshape(N, -1)
        res["bias"] = out["bias"].copy_(b) if "bias" in out else b
    return res


def per_sample_sq_norms(a: Tensor, g: Tensor, has_weight: bool, has_bias: bool) -> Tensor:
    """``‖∇ℓ_n‖²`` over the layer's parameters, ``[N]``, without forming per-sample gradients:
    ``‖Σ_t g_t a_tᵀ‖² = Σ_{t,t'} (a_t·a_t')(g_t·g_t')`` costs O(T²(d+o)) against O(T·d·o) for the
    formed gradient; the cheaper one is used (T = 1: ``‖g‖²‖a‖²``)."""
    N, G, T, d = a.shape
    o = g.shape[-1]
    sq = g.new_zeros(N)
    if has_weight:
        if T == 1:
            sq = (a.pow(2).sum(-1) * g.pow(2).sum(-1)).reshape(N, -1).sum(1)
        elif not prefers_materialising(T, d, o):
            sq = ((a @ a.transpose(-1, -2)) * (g @ g.transpose(-1, -2))).reshape(N, -1).sum(1)
        else:
            sq = (g.transpose(-1, -2) @ a).pow(2).reshape(N, -1).sum(1)
    if has_bias:
        sq = sq + g.sum(2).pow(2).reshape(N, -1).sum(1)
    return sq


def prefers_materialising(T: int, d: int, o: int) -> bool:
    """Whether ``‖Σ_t g_t a_tᵀ‖²`` is cheaper from the formed ``[o, d]`` gradient than from the
    T x T Gram products."""
    return T > 1 and T * (d + o) > d * o


def diag_fisher(a: Tensor, g: Tensor, weights: Tensor, N: int, weight_shape: tuple | None, has_bias: bool,
                layout: str = "") -> dict[str, Tensor]:
    """``diag F = (1/N) Σ_k w_k Σ_n (∇ℓ_nk)²`` for one affine layer.

    T = 1: ``(1/N) Σ_k w_k (g_k²)ᵀ(a²)`` per group, never forming per-sample gradients,
    O(K·N·d·o); T > 1: per column, the squared per-sample gradients, O(K·N·T·d·o)."""
    K = g.shape[0]
    w = weights.to(g.dtype)
    out: dict[str, Tensor] = {}
    if a.shape[2] == 1:
        g2 = (g[:, :, :, 0].pow(2) * w.reshape(-1, 1, 1, 1)).sum(0)  # [N, G, o]
        if weight_shape is not None:
            M = torch.einsum("ngo,ngd->god", g2, a[:, :, 0].pow(2)) / N
            out["weight"] = matrix_as_weight(M, weight_shape, layout)
        if has_bias:
            out["bias"] = g2.sum(0).reshape(-1) / N
        return out
    for k in range(K):
        for p, gp in per_sample_grads(a, g[k], weight_shape, has_bias, layout).items():
            v = w[k] * gp.pow(2).sum(0) / N
            out[p] = out[p] + v if p in out else v
    return out
