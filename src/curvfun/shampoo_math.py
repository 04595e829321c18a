"""Shampoo (Gupta, Koren & Singer 2018) for matrix-shaped gradients, as pure functions.

For a parameter whose gradient is read as a matrix G (d_out x d_in; a conv kernel
``[out, in, kh, kw]`` is read as ``[out, in·kh·kw]``, see :func:`as_matrix`), Shampoo keeps

    L ← L + G Gᵀ        (d_out x d_out),        R ← R + Gᵀ G        (d_in x d_in)

(or the moving averages L ← (1-β) L + β G Gᵀ, :func:`update_statistic`) and preconditions

    G̃ = (L + δ_L I)^{-1/4} G (R + δ_R I)^{-1/4},

the inverse 4th roots coming from :func:`curvfun.roots.eigen_power` (eigh, float64 retry). With ``block_size = b > 0``
the matrix is cut into tiles of at most b x b (:func:`block_slices`, row-major order) and each
tile has its own L and R (Anil et al. 2020's blocking); ``b <= 0`` means one tile.

Costs per d_out x d_in tile: statistics O(d_out² d_in + d_out d_in²); roots one eigen-
decomposition per factor, O(d_out³ + d_in³); preconditioning the same as the statistics.

A root Q diag(w) Qᵀ of a d x d factor is applied to the d x n side of a tile either as a dense
matrix (formed once per refresh, 2d³ flops, then 2d²n per step) or in factored form
Q (w ⊙ (Qᵀ X)) (4d²n per step, nothing to form). Over a refresh interval of k steps the factored
form is cheaper iff k·n < d (:func:`prefer_factored`): e.g. the 4096-wide right factor of a
10 x 4096 head, or any factor wider than the other side at interval 1.

**From the rows.** A Linear layer's gradient is G = gᵀa, with a ``[R, d_in]`` its inputs and g
``[R, d_out]`` the loss's gradients at its outputs (R = batch x positions rows). When R is small
against the widths, every product above can be taken through the R-dimensional side instead of
forming G (``*_rows`` functions below; tiles are the column blocks of g and a):

    G Gᵀ = gᵀ (a aᵀ) g,    Gᵀ G = aᵀ (g gᵀ) a,    L^{-1/4} G R^{-1/4} = (L^{-1/4} gᵀ)(a R^{-1/4}),

costing O(R(d_out² + d_in²) + R²(d_out + d_in)) instead of O(d_out d_in (d_out + d_in)): at the
MLP's 512 x 784 layer and batch 128 about a third (:func:`rows_pay` decides per layer).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .roots import EigenPower, eigen_power

__all__ = [
    "as_matrix",
    "block_slices",
    "split_blocks",
    "merge_blocks",
    "gram_statistics",
    "update_statistic",
    "update_statistics",
    "prefer_factored",
    "apply_root",
    "precondition_matrix",
    "shampoo_roots",
    "RESOLVED_DAMPING",
    "resolved_floor",
    "needs_float64",
    "row_tiles",
    "row_tiles_with_grams",
    "centered_rows",
    "apply_rotated",
    "update_statistics_from_rows",
    "rotate_rows",
    "precondition_rows",
    "rows_pay",
]


def as_matrix(grad: Tensor) -> Tensor:
    """A gradient of ndim >= 2 as a matrix ``[shape[0], prod(shape[1:])]`` (a view when possible)."""
    if grad.ndim < 2:
        raise ValueError(f"Shampoo preconditions tensors with ndim >= 2, got shape {tuple(grad.shape)}")
    return grad.reshape(grad.shape[0], -1)


def _ranges(d: int, b: int) -> list[slice]:
    if b <= 0 or d <= b:
        return [slice(0, d)]
    return [slice(i, min(i + b, d)) for i in range(0, d, b)]


def block_slices(shape: Sequence[int], block_size: int) -> list[tuple[slice, slice]]:
    """The tiles of a ``shape = (m, n)`` matrix, row-major: rows and columns cut into runs of
    ``block_size`` (the last run shorter); one tile when ``block_size <= 0``."""
    m, n = shape
    return [(r, c) for r in _ranges(m, block_size) for c in _ranges(n, block_size)]


def split_blocks(G: Tensor, block_size: int) -> list[Tensor]:
    """The tiles of the matrix ``G`` (views), in :func:`block_slices` order."""
    return [G[r, c] for r, c in block_slices(G.shape, block_size)]


def merge_blocks(tiles: Sequence[Tensor], shape: Sequence[int], block_size: int) -> Tensor:
    """Inverse of :func:`split_blocks`: a new ``shape`` matrix assembled from ``tiles``."""
    slices = block_slices(shape, block_size)
    if len(tiles) != len(slices):
        raise ValueError(f"expected {len(slices)} tiles for shape {tuple(shape)} and block_size {block_size}, got {len(tiles)}")
    out = tiles[0].new_empty(tuple(shape))
    for (r, c), t in zip(slices, tiles):
        out[r, c] = t
    return out


def gram_statistics(G: Tensor) -> tuple[Tensor, Tensor]:
    """``(G Gᵀ, Gᵀ G)`` of one tile."""
    return G @ G.T, G.T @ G


def update_statistic(old: Tensor, new: Tensor, ema_decay: float) -> Tensor:
    """``old + new`` when ``ema_decay == -1`` (accumulate, Shampoo's default), else the moving
    average ``(1 - ema_decay)·old + ema_decay·new``."""
    if ema_decay == -1:
        return old + new
    return old.mul(1.0 - ema_decay).add_(new, alpha=ema_decay)


def update_statistics(L: Tensor, R: Tensor, G: Tensor, ema_decay: float) -> tuple[Tensor, Tensor]:
    """:func:`update_statistic` of both factors of one tile with ``G Gᵀ`` and ``Gᵀ G`` fused into
    one ``addmm`` each (no separate Gram matrix and sum): ``(a·L + b·G Gᵀ, a·R + b·Gᵀ G)`` with
    (a, b) = (1, 1) when ``ema_decay == -1``, else (1 - ema_decay, ema_decay). New tensors; the
    inputs are not modified."""
    a, b = (1.0, 1.0) if ema_decay == -1 else (1.0 - ema_decay, float(ema_decay))
    return torch.addmm(L, G, G.T, beta=a, alpha=b), torch.addmm(R, G.T, G, beta=a, alpha=b)


def prefer_factored(d: int, n: int, interval: int) -> bool:
    """Whether a root of a d x d factor, applied to a d x n side for ``interval`` steps per
    refresh, is cheaper kept factored (4·interval·d²n flops) than formed (2d³ + 2·interval·d²n):
    ``interval · n < d``."""
    return interval * n < d


def apply_root(root: Tensor | Sequence[Tensor], X: Tensor, side: str) -> Tensor:
    """``root @ X`` (``side="left"``) or ``X @ root`` (``"right"``) for a dense root matrix, or for a
    factored root ``[Q, w]`` (root = Q diag(w) Qᵀ) without forming it: ``Q (w ⊙ (Qᵀ X))`` /
    ``((X Q) ⊙ w) Qᵀ``."""
    if isinstance(root, Tensor):
        return root @ X if side == "left" else X @ root
    Q, w = root
    if side == "left":
        return Q @ (w.unsqueeze(-1) * (Q.T @ X))
    return ((X @ Q) * w) @ Q.T


def shampoo_roots(L: Tensor, R: Tensor, damping: float, relative: bool = True, p: float = 4,
                  symmetrize: bool = True, floor: float = 0.0) -> tuple[EigenPower, EigenPower]:
    """``(L + δ_L I)^{-1/p}`` and ``(R + δ_R I)^{-1/p}`` in factored form (:class:`~curvfun.roots.EigenPower`;
    ``.matrix()`` is the dense root) with δ = ``damping`` (absolute) or ``damping · λ_max`` of each
    factor (``relative``, as ASDL / the reference implementation). ``symmetrize=False`` reads only
    the lower triangles (for statistics symmetric by construction; see :func:`~curvfun.roots.sym_eigh`);
    ``floor``: relative eigenvalue floor (:func:`resolved_floor`, :func:`~curvfun.roots.eigen_power_from`)."""
    return (eigen_power(L, -1.0 / p, damping, relative, symmetrize, floor),
            eigen_power(R, -1.0 / p, damping, relative, symmetrize, floor))


#: relative damping δ/λ_max below which Shampoo's statistics of gradients narrower than float64 are
#: kept, decomposed and applied in float64 (:func:`needs_float64`)
RESOLVED_DAMPING = 1e-4


def needs_float64(grad_dtype: torch.dtype, relative_damping: float) -> bool:
    """Whether Shampoo on gradients of ``grad_dtype`` must run in float64 at damping δ = ε·λ_max.

    The damped factor's condition number is up to (1 + ε)/ε, and the float32 statistics L = Σ G Gᵀ
    and their ``eigh`` carry absolute eigenvalue errors of a few units of float32 rounding times
    λ_max, so eigenvalues below about 1e-5·λ_max are noise and their inverse 4th roots (weighted
    as heavily as the top ones in L^{-1/4} G R^{-1/4}) blow up. Below ε = :data:`RESOLVED_DAMPING`
    the statistics, roots and preconditioning therefore run in float64 (the result is cast back).
    Never for float64 gradients. A d x d factor costs about 2x in float64 on the CPU."""
    return grad_dtype != torch.float64 and relative_damping < RESOLVED_DAMPING


def resolved_floor(grad_dtype: torch.dtype) -> float:
    """Relative eigenvalue floor f = min((300·u)², :data:`RESOLVED_DAMPING`) for float64 statistics of
    gradients rounded to ``grad_dtype`` (u its ``torch.finfo().eps``; float32: f ≈ 1.3e-9; float64: f ≈ 4e-27,
    no effect next to any damping). Eigenvalues below f·λ_max are raised to f·λ_max.

    Why: a gradient from a forward and backward pass in that dtype carries relative errors of a
    few u per entry, spread over all directions, so directions the exact gradient lacks (its rank
    is at most the batch size) come back with singular values σ up to a small multiple of u·σ_max.
    At tiny damping each would be weighted σ/√(σ² + δ) ≈ σ/√δ in L^{-1/4} G R^{-1/4} (up to 0.1
    each for float32 at δ = 1e-12·λ_max); with the floor, σ/√(f·λ_max) ≤ a few u/300. Directions
    with σ² well above f·λ_max are unchanged (to O(f·λ_max/σ²)). The constant 300 is measured: on
    a 784-512-512-10 MLP at damping 1e-12 the first step's distance to the float64 model's is
    1e-3 at 30, 3e-4 at 300 and 1000, and grows again above (real directions get floored)."""
    u = torch.finfo(grad_dtype).eps
    return min((300.0 * u) ** 2, RESOLVED_DAMPING)


def precondition_matrix(G: Tensor, L_root: Tensor | Sequence[Tensor], R_root: Tensor | Sequence[Tensor]) -> Tensor:
    """``L_root @ G @ R_root``; each root dense or factored ``[Q, w]`` (:func:`apply_root`)."""
    m, n = G.shape
    if m <= n:  # the same flops either way; order only matters for memory traffic
        return apply_root(R_root, apply_root(L_root, G, "left"), "right")
    return apply_root(L_root, apply_root(R_root, G, "right"), "left")


def centered_rows(g: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """Other rows of the same gradient, G = g'ᵀa' = gᵀa, without the common offsets: with column
    means ν of g and μ of a over the R rows, g' = [g − 1νᵀ; √R νᵀ] and a' = [a − 1μᵀ; √R μᵀ]
    (R + 1 rows; the cross terms vanish as the centred rows sum to zero). The Grams a'a'ᵀ and
    g'g'ᵀ then carry no R x R block of ‖μ‖² or ‖ν‖², which would otherwise cancel in (aaᵀ)g when
    Σ_r g_r ≈ 0 (a Linear before BatchNorm, inputs with a large mean) and cost float32 digits.
    O(R(d_out + d_in))."""
    R = g.shape[0]
    nu, mu = g.mean(0, keepdim=True), a.mean(0, keepdim=True)
    root = float(R) ** 0.5
    return torch.cat([g - nu, nu * root]), torch.cat([a - mu, mu * root])


def row_tiles(g: Tensor, a: Tensor, block_size: int) -> list[tuple[Tensor, Tensor]]:
    """The rows of each tile of G = gᵀa (g ``[R, d_out]``, a ``[R, d_in]``) in :func:`block_slices`
    order: tile (r, c) of G is ``g[:, r]ᵀ a[:, c]``."""
    return [(g[:, r], a[:, c]) for r, c in block_slices((g.shape[1], a.shape[1]), block_size)]


def row_tiles_with_grams(g: Tensor, a: Tensor, block_size: int) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """:func:`row_tiles` with each tile's R x R Grams: ``[(g_r, a_c, a_c a_cᵀ, g_r g_rᵀ)]``, each
    Gram formed once per row / column block (shared by the tiles of that block). O(R²(d_out + d_in))."""
    aa: dict[int, Tensor] = {}
    gg: dict[int, Tensor] = {}
    tiles = []
    for r, c in block_slices((g.shape[1], a.shape[1]), block_size):
        g_r, a_c = g[:, r], a[:, c]
        if c.start not in aa:
            aa[c.start] = a_c @ a_c.T
        if r.start not in gg:
            gg[r.start] = g_r @ g_r.T
        tiles.append((g_r, a_c, aa[c.start], gg[r.start]))
    return tiles


def update_statistics_from_rows(
    L: Tensor, R: Tensor, g: Tensor, a: Tensor, ema_decay: float,
    aa: Tensor | None = None, gg: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`update_statistics` for the tile G = gᵀa without forming it: ``(α·L + β·gᵀ(a aᵀ)g,
    α·R + β·aᵀ(g gᵀ)a)``; ``aa = a aᵀ`` and ``gg = g gᵀ`` (R x R) may be passed when already
    computed (they are shared by the tiles of one row / column block). Cost O(R(d_out² + d_in²) +
    R²(d_out + d_in)) against O(d_out d_in (d_out + d_in)). New tensors."""
    alpha, beta = (1.0, 1.0) if ema_decay == -1 else (1.0 - ema_decay, float(ema_decay))
    aa = a @ a.T if aa is None else aa
    gg = g @ g.T if gg is None else gg
    return (torch.addmm(L, g.T, aa @ g, beta=alpha, alpha=beta),
            torch.addmm(R, a.T, gg @ a, beta=alpha, alpha=beta))


def rotate_rows(g: Tensor, a: Tensor, Q_L: Tensor, Q_R: Tensor, aa: Tensor, gg: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradient G = gᵀa rotated into orthogonal bases, G' = Q_Lᵀ G Q_R = U V, as its factors
    U = Q_Lᵀ gᵀ ``[d_out, R]`` and V = a Q_R ``[R, d_in]``, with the squared row and column norms
    of G' without forming it: rowsq = diag(U (a aᵀ) Uᵀ) and colsq = diag(Vᵀ (g gᵀ) V) (as Q_R Q_Rᵀ =
    I and Q_L Q_Lᵀ = I). Returns ``(U, V, rowsq, colsq)``; the norms are clamped at 0 (they are
    non-negative; the clamp only removes rounding)."""
    U, V = Q_L.T @ g.T, a @ Q_R
    rowsq = (U @ aa).mul_(U).sum(1).clamp_min_(0)
    colsq = (gg @ V).mul_(V).sum(0).clamp_min_(0)
    return U, V, rowsq, colsq


def precondition_rows(g: Tensor, a: Tensor, L_root: Tensor | Sequence[Tensor], R_root: Tensor | Sequence[Tensor]) -> Tensor:
    """``L_root (gᵀa) R_root`` as ``(L_root gᵀ)(a R_root)``, each root dense or factored ``[Q, w]``
    (:func:`apply_root`): the sides act on R vectors instead of d_in resp. d_out."""
    return apply_root(L_root, g.T, "left") @ apply_root(R_root, a, "right")


def apply_rotated(Gr: Tensor | tuple[Tensor, Tensor], L_root: Sequence[Tensor], R_root: Sequence[Tensor]) -> Tensor:
    """L^{-1/4} G R^{-1/4} = Q_L (w_L ⊙ G' ⊙ w_R) Q_Rᵀ from the rotated gradient G' = Q_Lᵀ G Q_R and
    factored roots ``[Q, w]``; G' given formed (consumed: scaled in place) or as its factors
    (U, V) = (Q_Lᵀgᵀ, a Q_R) of :func:`rotate_rows` (consumed likewise), then
    (Q_L (w_L ⊙ U)) ((V ⊙ w_R) Q_Rᵀ)."""
    (Q_L, w_L), (Q_R, w_R) = L_root, R_root
    if isinstance(Gr, Tensor):
        return Q_L @ (Gr.mul_(w_L.unsqueeze(-1)).mul_(w_R) @ Q_R.T)
    U, V = Gr
    return (Q_L @ U.mul_(w_L.unsqueeze(-1))) @ (V.mul_(w_R) @ Q_R.T)


def rows_pay(rows: int, d_out: int, d_in: int, block_size: int) -> bool:
    """Whether a d_out x d_in gradient from ``rows`` rows is cheaper to take through its rows, per
    step with the statistics updated: Σ over tiles (b_r x b_c) of 2R(b_r² + b_c²) + 2R²(b_r + b_c)
    (statistics and the root applications on R vectors, plus the Gram products) against
    2 b_r b_c (b_r + b_c) (the same on the formed tile); both pay R·b_r·b_c for gᵀa once. Never
    for an empty batch (no rows: nothing to centre, the formed gradient is zero)."""
    if rows < 1:
        return False
    rows_cost = dense_cost = 0
    for r, c in block_slices((d_out, d_in), block_size):
        br, bc = r.stop - r.start, c.stop - c.start
        rows_cost += 2 * rows * (br * br + bc * bc) + 2 * rows * rows * (br + bc)
        dense_cost += 2 * br * bc * (br + bc)
    return rows_cost < dense_cost
