"""Low-rank and low-rank-plus-diagonal K-FAC factors, as pure functions.

The low-rank K-FAC of the seed ``001`` approximates, per layer,

* the input factor   A = a_scale · UᵀU   (U = a_rows, ``[n, d_in]``)   by   Ã = V_A Λ_A V_Aᵀ   (rank k),
* the output factor  B = b_scale · GᵀG   (G = g_rows, ``[n, d_out]``)  by   B̃ = diag(B) + V_B Λ_B V_Bᵀ,

where the low-rank parts come from block power iteration driven by the captured rows, so that no
d x d matrix is ever formed, and inverts the damped factors by Sherman-Morrison / Woodbury. The
preconditioned weight gradient is (B̃ + δ_B I)⁻¹ G_W (Ã + δ_A I)⁻¹ at O(d_out · d_in · k).

Everything here is pure: functions take tensors and return new ones; the objects
(:class:`WoodburyFactor`, :class:`LowRankKron`) are immutable and registered as optree pytree
nodes in the ``"curvfun"`` namespace (``optree.tree_map(f, obj, namespace="curvfun")``).

Costs below use n = number of rows, d = dimension, k = rank, m = number of right-hand sides.

Negative eigenvalues (B side). B - diag(B) has zero diagonal, hence zero trace, hence is indefinite
whenever it is non-zero. Block power iteration finds the k eigenpairs of largest *magnitude* (the
best rank-k approximation in Frobenius / spectral norm, Eckart-Young), both signs kept. A truncation
that drops positive eigenvalues can leave diag(B) + VΛVᵀ indefinite, so :func:`lowrank_plus_diag`
checks positive semi-definiteness exactly through a k x k eigenproblem and, only if needed, scales
the *negative* eigenvalues by the largest factor t ∈ (0, 1) that keeps the approximation plus half
the damping positive semi-definite, so approximation + damping is positive definite (see
:func:`lowrank_plus_diag`). When the truncation is already PSD (always at
full rank, where it equals B) nothing is changed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import optree
import torch
from torch import Tensor

from .linalg import damping_from_traces

__all__ = [
    "PowerIterationResult",
    "power_iteration",
    "LowRank",
    "lowrank",
    "LowRankPlusDiag",
    "lowrank_plus_diag",
    "sherman_morrison_solve",
    "woodbury_solve",
    "woodbury_factor",
    "WoodburyFactor",
    "pi_damping",
    "LowRankInit",
    "LowRankKron",
    "LowRankRows",
    "lowrank_kron_many",
]

PYTREE_NAMESPACE = "curvfun"



# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------
def _check_rank(rank: Any, dim: int, where: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        try:
            ok = int(rank) == rank
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{where}: rank must be an integer, got {rank!r}.")
        rank = int(rank)
    if rank < 1:
        raise ValueError(f"{where}: rank={rank} is less than 1; ask for at least one eigenpair (rank >= 1).")
    if rank > dim:
        raise ValueError(
            f"{where}: rank={rank} is larger than the dimension {dim}; use rank <= {dim} "
            f"(rank = {dim} already reproduces the dense factor exactly)."
        )
    return rank


def _check_finite(t: Tensor, name: str, where: str, hint: str = "") -> None:
    # A finite sum proves every entry finite (NaN and ±Inf propagate); only an overflowing or
    # non-finite sum needs the entrywise test. One reduction, no temporary mask.
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(
            f"{where}: {name} contains {bad} non-finite (NaN or Inf) entries; the curvature built "
            f"from it would be NaN. {hint or 'Pass finite values.'}"
        )


_ROWS_HINT = (
    "Check the captured layer inputs / output-gradients (e.g. lower the learning rate, clip the "
    "loss or gradients) or skip this curvature refresh."
)


def _check_rows(U: Any, name: str, where: str) -> Tensor:
    if not isinstance(U, Tensor):
        raise ValueError(f"{where}: {name} must be a torch.Tensor of shape [n_rows, d], got {type(U).__name__}.")
    if U.dim() != 2:
        raise ValueError(
            f"{where}: {name} must be 2-D [n_rows, d], got shape {tuple(U.shape)}; flatten the batch "
            "(and spatial/sequence) dimensions into rows first."
        )
    if not U.is_floating_point():
        raise ValueError(f"{where}: {name} must be a floating-point tensor, got dtype {U.dtype}.")
    _check_finite(U, name, where, _ROWS_HINT)
    return U


def _check_nonneg(x: Any, name: str, where: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {name} must be a non-negative real number, got {x!r}.") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{where}: {name}={v} must be finite and >= 0; pass a non-negative {name}.")
    return v


def _gram_schmidt(Z: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Orthonormal basis of span(Z) (``[d, k]``, k <= d) by classical Gram-Schmidt with one
    re-orthogonalisation per column ("twice is enough", orthogonal to working precision).

    A column that is (numerically) dependent on the previous ones, e.g. when Z has rank < k,
    is replaced by a random direction orthogonalised the same way, so the result always has k
    orthonormal columns. O(d · k²) in 2k matrix-vector products.
    """
    d, k = Z.shape
    Q = torch.empty_like(Z)
    eps = torch.finfo(Z.dtype).eps
    ref = float(torch.linalg.vector_norm(Z, dim=0).max()) if k else 0.0
    for j in range(k):
        v = Z[:, j]
        thresh = 10.0 * math.sqrt(d) * eps * ref
        nv = 0.0
        for _attempt in range(3):
            for _ in range(2):
                if j:
                    P = Q[:, :j]
                    v = v - P @ (P.mT @ v)
            nv = float(torch.linalg.vector_norm(v))
            if nv > thresh and nv > 0:
                break
            # dependent column: try a random direction instead (threshold relative to it now)
            v = torch.randn(d, generator=generator, dtype=Z.dtype, device=Z.device)
            thresh = 10.0 * math.sqrt(d) * eps * float(torch.linalg.vector_norm(v))
        Q[:, j] = v / nv
    return Q


def _orthonormalize(Z: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Orthonormal basis of span(Z) (``[d, k]``, k <= d): the re-orthonormalisation step.

    Fast path, two passes of scaled SVQB (Stathopoulos & Wu 2002): scale the columns to unit
    norm, G = ZᵀZ = S diag(σ) Sᵀ (k x k), Z ← Z S diag(σ)^{-1/2}; orthogonal to working precision
    when cond(G) is moderate, which holds in power iteration because the Ritz-rotated block
    M V ≈ V diag(λ) has nearly orthogonal columns. Falls back to :func:`_gram_schmidt` when G is
    ill-conditioned or a column vanishes (rank-deficient operators). O(d · k²), a handful of
    matrix products (LAPACK's Householder QR, with its many small parallel regions, is avoided).
    """
    d, k = Z.shape
    eps = torch.finfo(Z.dtype).eps
    norms = torch.linalg.vector_norm(Z, dim=0)
    if not bool(norms.min() > 10.0 * math.sqrt(d) * eps * norms.max()):
        return _gram_schmidt(Z, generator)
    Q = Z / norms
    for _ in range(2):
        G = Q.mT @ Q
        sig, S = torch.linalg.eigh(0.5 * (G + G.mT))
        if not bool(sig[0] > 100.0 * k * eps * sig[-1]):
            return _gram_schmidt(Z, generator)
        Q = Q @ (S * sig.rsqrt())
    return Q


# --------------------------------------------------------------------------------------------
# power iteration
# --------------------------------------------------------------------------------------------
class PowerIterationResult(NamedTuple):
    """Ritz pairs of a symmetric operator.

    ``eigenvalues`` ``[k]`` in descending order, ``eigenvectors`` ``[dim, k]`` with orthonormal
    columns (column j belongs to eigenvalue j), ``iterations`` = number of ``matvec`` calls made.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    iterations: int


def power_iteration(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    rank: int,
    iters: int = 20,
    init: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    tol: Optional[float] = None,
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[torch.device, str]] = None,
) -> PowerIterationResult:
    """Top-k eigenpairs (by magnitude) of a symmetric operator by block power iteration.

    Subspace iteration with Rayleigh-Ritz: starting from Q₀ (orthonormal ``[dim, k]``), each
    iteration computes Z = M Q, the Ritz pairs of the k x k projection T = QᵀZ = S diag(w) Sᵀ
    (vectors Q S, values w), and the next basis Q ← orth(Z S), an orthonormal basis of span(Z S)
    (two passes of scaled SVQB, or Gram-Schmidt with re-orthogonalisation when that is
    ill-conditioned; the same span as the thin-QR factor). The span converges to the dominant
    k-dimensional invariant subspace at rate |λ_{k+1}| / |λ_k| per iteration; the returned pairs are
    the Ritz pairs of the last basis, sorted by descending eigenvalue (for an indefinite operator
    these are the k largest in magnitude, in descending signed order).

    Args:
        matvec: X ↦ M X for X ``[dim, k]`` (M symmetric); called once per iteration.
        init: previous eigenvectors ``[dim, r]`` to warm-start from (e.g. the last refresh's
            vectors). The first ``min(r, rank)`` columns are used; missing columns are drawn at
            random. Without it the start is Gaussian (seeded by ``generator``).
        tol: early stopping. Stop once every Ritz residual satisfies
            ‖M v_j − w_j v_j‖ ≤ tol · max_j |w_j|; each returned w_j is then within that bound of an
            exact eigenvalue, and each vector's angle to the true eigenspace is at most
            residual / gap. ``None`` runs exactly ``iters`` iterations.

    Returns:
        :class:`PowerIterationResult` ``(eigenvalues, eigenvectors, iterations)``.

    Cost: ``iterations`` matvecs plus O(dim · k² + k³) per iteration (re-orthonormalisation,
    Ritz rotation, residual); memory O(dim · k).
    """
    return _drive(_power_iteration_steps(dim, rank, iters, init, generator, tol, dtype, device), matvec)


def _drive(steps, matvec: Callable[[Tensor], Tensor]):
    """Run a stepping generator (yields X, receives ``matvec(X)``) to its return value."""
    X = next(steps)
    while True:
        try:
            X = steps.send(matvec(X))
        except StopIteration as stop:
            return stop.value


def _power_iteration_steps(dim, rank, iters=20, init=None, generator=None, tol=None, dtype=None, device=None):
    """:func:`power_iteration` as a generator: yields the basis Q ``[dim, k]``, receives M Q, and
    returns the :class:`PowerIterationResult`. Lets a caller advance several power iterations in
    lockstep (one coalesced reduction of all their products per step, see
    :func:`lowrank_kron_many`)."""
    where = "power_iteration"
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"{where}: dim must be a positive integer, got {dim!r}.")
    rank = _check_rank(rank, dim, where)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"{where}: iters={iters!r} must be an integer >= 1.")
    if tol is not None:
        tol = _check_nonneg(tol, "tol", where)
    if init is not None:
        if not isinstance(init, Tensor):
            init = torch.as_tensor(init)
        if init.dim() == 1:
            init = init[:, None]
        if init.dim() != 2 or init.shape[0] != dim:
            raise ValueError(
                f"{where}: init must have shape [dim={dim}, r], got {tuple(init.shape)}; pass the "
                "eigenvectors of the previous refresh of the same factor."
            )
        _check_finite(init, "init", where, "Warm-start from finite vectors, or pass init=None.")
        dtype = dtype or (init.dtype if init.is_floating_point() else None)
        device = device if device is not None else init.device
    dtype = dtype or torch.get_default_dtype()
    cols = [] if init is None else [init[:, :rank].to(dtype=dtype, device=device)]
    missing = rank - (0 if init is None else cols[0].shape[1])
    if missing > 0:
        cols.append(torch.randn(dim, missing, generator=generator, dtype=dtype, device=device))
    Q = _orthonormalize(torch.cat(cols, dim=1), generator)

    w = V = None
    it = 0
    for it in range(1, iters + 1):
        Z = yield Q
        if not isinstance(Z, Tensor) or Z.shape != Q.shape:
            raise ValueError(
                f"{where}: matvec must map a [{dim}, {rank}] tensor to the same shape, got "
                f"{getattr(Z, 'shape', type(Z))}."
            )
        T = Q.mT @ Z  # NaN/Inf in Z reaches T: checking the k x k matrix is enough
        _check_finite(T, "matvec(Q)", where, "The operator produced NaN/Inf; check its inputs.")
        w, S = torch.linalg.eigh(0.5 * (T + T.mT))  # ascending
        w, S = w.flip(0), S.flip(1)
        V = Q @ S
        ZS = Z @ S  # = M V
        if tol is not None:
            res = torch.linalg.vector_norm(ZS - V * w, dim=0).max()
            if bool(res <= tol * w.abs().max()):
                break
        if it < iters:
            Q = _orthonormalize(ZS, generator)
    return PowerIterationResult(w, V, it)


# --------------------------------------------------------------------------------------------
# low-rank (A side) and low-rank plus diagonal (B side)
# --------------------------------------------------------------------------------------------
class LowRank(NamedTuple):
    """Ã = V diag(λ) Vᵀ: ``eigenvalues`` ``[k]`` descending and >= 0, ``eigenvectors`` ``[d, k]``."""

    eigenvalues: Tensor
    eigenvectors: Tensor
    iterations: int


def lowrank(
    U: Tensor,
    rank: int,
    scale: float = 1.0,
    iters: int = 20,
    init: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    tol: Optional[float] = None,
) -> LowRank:
    """Rank-k approximation V Λ Vᵀ of A = scale · UᵀU without forming the d x d matrix.

    U: ``[n, d]`` captured rows (e.g. layer inputs), so A = scale · Σ_rows u uᵀ (scale = 1/N for
    the mean). The operator is X ↦ scale · Uᵀ(U X), O(n · d · k) per iteration, driven by
    :func:`power_iteration`. A is PSD, so the eigenvalues are clipped at 0 (round-off only).
    With rank = d (and one iteration) the result is the exact eigendecomposition of A.

    Cost: iterations · O(n · d · k + d · k²); memory O(d · k).
    """
    where = "lowrank"
    U = _check_rows(U, "U", where)
    _, d = U.shape
    rank = _check_rank(rank, d, where)
    scale = _check_nonneg(scale, "scale", where)

    def mv(X: Tensor) -> Tensor:
        return (U.mT @ (U @ X)) * scale

    r = power_iteration(mv, d, rank, iters, init, generator, tol, dtype=U.dtype, device=U.device)
    return LowRank(r.eigenvalues.clamp_min(0), r.eigenvectors, r.iterations)


class LowRankPlusDiag(NamedTuple):
    """B̃ = diag(``diag``) + V diag(λ) Vᵀ.

    ``diag`` ``[d]`` = diag(B); ``eigenvalues`` ``[k]`` descending (may be negative), after the
    PSD repair; ``eigenvectors`` ``[d, k]``; ``iterations``; ``shrink`` = factor t applied to the
    negative eigenvalues (1.0 when no repair was needed).
    """

    diag: Tensor
    eigenvalues: Tensor
    eigenvectors: Tensor
    iterations: int
    shrink: float


def _shrink_negative(dvec: Tensor, V: Tensor, lam: Tensor) -> tuple[Tensor, float]:
    """Scale the negative entries of ``lam`` by the largest t ∈ (0, 1] keeping diag(dvec) + VΛVᵀ ⪰ 0.

    With D = diag(dvec) ≻ 0, write VΛVᵀ = W₊W₊ᵀ − W₋W₋ᵀ (W± = V± |Λ±|^{1/2}, the columns with
    λ > 0 / λ < 0; columns with λ = 0 play no part). Then
    D + V(Λ₊ + tΛ₋)Vᵀ = D^{1/2}(C − t·Y₋Y₋ᵀ)D^{1/2}, C = I + Y₊Y₊ᵀ, Y± = D^{-1/2}W±,
    which is PSD iff t·μ <= 1 with μ = λ_max(Y₋ᵀC⁻¹Y₋) and, by the push-through identity,
    Y₋ᵀC⁻¹Y₋ = Y₋ᵀY₋ − (Y₊ᵀY₋)ᵀ(I + Y₊ᵀY₊)⁻¹(Y₊ᵀY₋), a k x k computation.
    Returns (λ, 1) unchanged if μ <= 1, else the negative entries times t = 1/μ.
    Cost O(d · k² + k³).
    """
    neg = lam < 0
    if not bool(neg.any()):
        return lam, 1.0
    pos = lam > 0
    Y = V * dvec.rsqrt()[:, None]
    Ym = Y[:, neg] * (-lam[neg]).sqrt()
    M = Ym.mT @ Ym
    if bool(pos.any()):
        Yp = Y[:, pos] * lam[pos].sqrt()
        C = torch.eye(int(pos.sum()), dtype=lam.dtype, device=lam.device) + Yp.mT @ Yp
        c, F = torch.linalg.eigh(0.5 * (C + C.mT))  # C ⪰ I
        Z = (F.mT @ (Yp.mT @ Ym)) * c.clamp_min(1.0).rsqrt()[:, None]  # C^{-1/2} Y₊ᵀY₋ (rotated)
        M = M - Z.mT @ Z
    mu = float(torch.linalg.eigvalsh(0.5 * (M + M.mT)).max())
    if mu <= 1.0:
        return lam, 1.0
    t = 1.0 / mu
    return torch.where(neg, lam * t, lam), t


def lowrank_plus_diag(
    U: Tensor,
    rank: int,
    scale: float = 1.0,
    iters: int = 20,
    init: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    tol: Optional[float] = None,
    damping: float = 0.0,
) -> LowRankPlusDiag:
    """B ≈ diag(B) + V Λ Vᵀ for B = scale · UᵀU, with V, Λ from the off-diagonal part B − diag(B).

    diag(B) = scale · Σ_rows U² (O(n · d)). The off-diagonal operator
    X ↦ scale · Uᵀ(U X) − diag(B) ⊙ X costs O(n · d · k) per :func:`power_iteration` step; it is
    indefinite (zero diagonal, zero trace), and power iteration returns its k eigenpairs of
    largest magnitude, both signs kept (the best rank-k approximation of B − diag(B)).

    Negative eigenvalues: a truncated spectrum can make diag(B) + VΛVᵀ indefinite (the dropped
    positive eigenvalues may be what kept B PSD). The truncation is checked exactly by a k x k
    eigenproblem (``_shrink_negative``) against D' = diag(B) + δ'I with
    δ' = max(damping / 2, eps · max diag(B)); if diag(B) + δ'I + VΛVᵀ is not PSD, only the
    negative eigenvalues are scaled by t = 1/μ < 1, the largest factor that makes it PSD, and t is
    returned as ``shrink``. Guarantee: B̃ + δI ⪰ (δ − δ')I ≻ 0 for every δ > δ', in particular
    for δ = ``damping`` > 0 (with ``damping=0``: B̃ ⪰ −eps · max diag(B) · I, PSD to round-off).
    Positive eigenvalues are never changed, and a truncation that is already PSD (e.g. rank = d,
    where B̃ = B) is left exactly as is.

    Cost: iterations · O(n · d · k + d · k²) + O(d · k² + k³); memory O(d · k).
    """
    where = "lowrank_plus_diag"
    U = _check_rows(U, "U", where)
    _, d = U.shape
    rank = _check_rank(rank, d, where)
    scale = _check_nonneg(scale, "scale", where)
    damping = _check_nonneg(damping, "damping", where)
    diag = (U * U).sum(0) * scale

    def mv(X: Tensor) -> Tensor:
        return (U.mT @ (U @ X)) * scale - diag[:, None] * X

    r = power_iteration(mv, d, rank, iters, init, generator, tol, dtype=U.dtype, device=U.device)
    return _plus_diag_result(diag, r, damping)


def _plus_diag_result(diag: Tensor, r: PowerIterationResult, damping: float) -> LowRankPlusDiag:
    """The PSD repair of :func:`lowrank_plus_diag` applied to the off-diagonal Ritz pairs ``r``."""
    dmax = float(diag.max())
    floor = max(0.5 * damping, torch.finfo(diag.dtype).eps * dmax, torch.finfo(diag.dtype).tiny)
    lam, t = _shrink_negative(diag + floor, r.eigenvectors, r.eigenvalues)
    return LowRankPlusDiag(diag, lam, r.eigenvectors, r.iterations, t)


# --------------------------------------------------------------------------------------------
# inverses of diagonal plus low rank
# --------------------------------------------------------------------------------------------
def _prep_dlr(diag: Any, V: Tensor, lam: Tensor, damping: Any, where: str) -> tuple[Tensor, Tensor, Tensor]:
    """Validate (diag, V, lam, damping) and return (inv_diag, V, lam); inv_diag is 0-dim or [d]."""
    if not isinstance(V, Tensor) or V.dim() != 2:
        raise ValueError(f"{where}: V must be a [d, k] tensor, got {getattr(V, 'shape', type(V))}.")
    d, k = V.shape
    lam = torch.as_tensor(lam, dtype=V.dtype, device=V.device)
    if lam.shape != (k,):
        raise ValueError(f"{where}: lam must have shape [k={k}] to match V {tuple(V.shape)}, got {tuple(lam.shape)}.")
    damping = _check_nonneg(damping, "damping", where)
    diag = torch.as_tensor(diag, dtype=V.dtype, device=V.device)
    if diag.dim() not in (0, 1) or (diag.dim() == 1 and diag.shape[0] != d):
        raise ValueError(f"{where}: diag must be a scalar or a [d={d}] tensor, got shape {tuple(diag.shape)}.")
    for name, t in (("diag", diag), ("V", V), ("lam", lam)):
        _check_finite(t, name, where)
    D = diag + damping
    if not bool((D > 0).all()):
        raise ValueError(
            f"{where}: diag + damping must be positive everywhere (min is {float(D.min()):.3g}); "
            "increase the damping (a pure low-rank matrix needs damping > 0 to be invertible)."
        )
    return 1.0 / D, V, lam


def _scale_rows(inv_diag: Tensor, X: Tensor) -> Tensor:
    """diag(inv_diag) X for X [d] or [d, m]; inv_diag 0-dim or [d]."""
    if inv_diag.dim() == 1 and X.dim() == 2:
        return X * inv_diag[:, None]
    return X * inv_diag


def _check_rhs(X: Tensor, d: int, where: str) -> Tensor:
    if not isinstance(X, Tensor) or X.dim() not in (1, 2) or X.shape[0] != d:
        raise ValueError(f"{where}: X must have shape [d={d}] or [d={d}, m], got {getattr(X, 'shape', type(X))}.")
    return X


def sherman_morrison_solve(diag: Any, V: Tensor, lam: Tensor, X: Tensor, damping: float = 0.0) -> Tensor:
    """(diag(d) + δI + V diag(λ) Vᵀ)⁻¹ X by recursive rank-1 Sherman-Morrison updates.

    With M₀ = D = diag(d) + δI and M_j = M_{j−1} + λ_j v_j v_jᵀ,
    M_j⁻¹ = M_{j−1}⁻¹ − c_j u_j u_jᵀ,  u_j = M_{j−1}⁻¹ v_j,  c_j = λ_j / (1 + λ_j v_jᵀ u_j),
    so M_k⁻¹ = D⁻¹ − Σ_j c_j u_j u_jᵀ, where u_j = D⁻¹v_j − Σ_{i<j} c_i u_i (u_iᵀ v_j).
    ``diag`` is a scalar or ``[d]``; X is ``[d]`` or ``[d, m]``.

    Cost: O(d · k²) for the k rank-1 updates plus O(d · k · m) to apply; no d x d matrix.
    Raises ValueError if an update is singular (1 + λ_j v_jᵀu_j = 0).
    """
    where = "sherman_morrison_solve"
    inv_diag, V, lam = _prep_dlr(diag, V, lam, damping, where)
    d, k = V.shape
    X = _check_rhs(X, d, where)
    Us = torch.empty(d, k, dtype=V.dtype, device=V.device)
    c = torch.empty(k, dtype=V.dtype, device=V.device)
    eps = torch.finfo(V.dtype).eps
    for j in range(k):
        v = V[:, j]
        u = _scale_rows(inv_diag, v)
        if j > 0:
            u = u - Us[:, :j] @ (c[:j] * (Us[:, :j].mT @ v))
        q = lam[j] * (v @ u)
        den = 1.0 + q
        if not bool(den.abs() > 16 * eps * (1.0 + q.abs())):
            raise ValueError(
                f"{where}: the matrix is singular at rank-1 update {j} (1 + λ vᵀM⁻¹v = {float(den):.3g}); "
                "increase the damping or check the signs of lam."
            )
        Us[:, j] = u
        c[j] = lam[j] / den
    Y = _scale_rows(inv_diag, X)
    if X.dim() == 1:
        return Y - Us @ (c * (Us.mT @ X))
    return Y - Us @ (c[:, None] * (Us.mT @ X))


def _register(cls, names: Sequence[str], aux: Sequence[str] = ()):
    def flatten(obj):
        return [getattr(obj, n) for n in names], tuple(getattr(obj, a) for a in aux), list(names)

    def unflatten(meta, children):
        return cls(**dict(zip(names, children)), **dict(zip(aux, meta)))

    optree.register_pytree_node(cls, flatten, unflatten, namespace=PYTREE_NAMESPACE)
    return cls


def _nbytes(tensors: Sequence[Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


@dataclass(frozen=True, eq=False)
class WoodburyFactor:
    """Cached inverse of M = D + V diag(λ) Vᵀ, D = diag(d) + δI (from :func:`woodbury_factor`).

    Woodbury (push-through form, valid for λ of any sign, including 0):
    M⁻¹ = D⁻¹ − D⁻¹V K⁻¹ diag(λ) VᵀD⁻¹ = D⁻¹(I − V K⁻¹ diag(λ) (D⁻¹V)ᵀ), with the k x k core K = I + diag(λ) VᵀD⁻¹V kept as an
    LU factorisation. ``solve`` costs O(d · k · m) for m right-hand sides.
    Fields: ``inv_diag`` (0-dim or ``[d]``), ``V`` ``[d, k]``, ``lam`` ``[k]``,
    ``DinvV`` = D⁻¹V, ``lu``/``pivots`` of K.
    """

    inv_diag: Tensor
    V: Tensor
    lam: Tensor
    DinvV: Tensor
    lu: Tensor
    pivots: Tensor

    @property
    def dim(self) -> int:
        return self.V.shape[0]

    def solve(self, X: Tensor) -> Tensor:
        """M⁻¹ X for X ``[d]`` or ``[d, m]``. Cost O(d · k · m + k² · m).

        Computed as D⁻¹(X − V Z) with Z = K⁻¹ diag(λ) (D⁻¹V)ᵀ X: two thin matrix products and
        one (scalar D) or two (diagonal D) passes over X.
        """
        X = _check_rhs(X, self.dim, "WoodburyFactor.solve")
        vec = X.dim() == 1
        X2 = X[:, None] if vec else X
        if self.V.shape[1] == 0:
            Y = _scale_rows(self.inv_diag, X2)
        else:
            T = (self.DinvV.mT @ X2) * self.lam[:, None]
            Z = torch.linalg.lu_solve(self.lu, self.pivots, T)
            if self.inv_diag.dim() == 0:
                c = float(self.inv_diag)
                Y = torch.addmm(X2, self.V, Z, beta=c, alpha=-c)
            else:
                Y = torch.addmm(X2, self.V, Z, alpha=-1.0).mul_(self.inv_diag[:, None])
        return Y[:, 0] if vec else Y

    def to_dense(self) -> Tensor:
        """The dense d x d inverse M⁻¹ (tests only; O(d²) memory)."""
        I = torch.eye(self.dim, dtype=self.V.dtype, device=self.V.device)
        return self.solve(I)

    def nbytes(self) -> int:
        return _nbytes([self.inv_diag, self.V, self.lam, self.DinvV, self.lu, self.pivots])


_register(WoodburyFactor, ["inv_diag", "V", "lam", "DinvV", "lu", "pivots"])


def woodbury_factor(diag: Any, V: Tensor, lam: Tensor, damping: float = 0.0) -> WoodburyFactor:
    """Factor M = diag(d) + δI + V diag(λ) Vᵀ once for repeated solves (see :class:`WoodburyFactor`).

    ``diag``: scalar or ``[d]`` (A side: 0, so M = δ_A I + VΛVᵀ); ``damping`` δ >= 0 with
    diag + δ > 0. Cost O(d · k² + k³); memory O(d · k). Raises ValueError if M is singular.
    """
    where = "woodbury_factor"
    inv_diag, V, lam = _prep_dlr(diag, V, lam, damping, where)
    d, k = V.shape
    DinvV = _scale_rows(inv_diag, V)
    K = torch.eye(k, dtype=V.dtype, device=V.device) + lam[:, None] * (V.mT @ DinvV)
    lu, pivots, info = torch.linalg.lu_factor_ex(K)
    if int(info) != 0 or not bool(torch.isfinite(lu).all()):
        raise ValueError(
            f"{where}: the matrix diag + damping·I + V diag(lam) Vᵀ is singular (the k x k Woodbury "
            "core has a zero pivot); increase the damping or check the signs of lam."
        )
    return WoodburyFactor(inv_diag, V, lam, DinvV, lu, pivots)


def woodbury_solve(diag: Any, V: Tensor, lam: Tensor, X: Tensor, damping: float = 0.0) -> Tensor:
    """(diag(d) + δI + V diag(λ) Vᵀ)⁻¹ X by the Woodbury identity with a k x k core.

    Same matrix and arguments as :func:`sherman_morrison_solve`. Cost O(d · k² + k³) to build the
    core plus O(d · k · m) to apply; use :func:`woodbury_factor` to cache the core across solves.
    """
    return woodbury_factor(diag, V, lam, damping).solve(X)


# --------------------------------------------------------------------------------------------
# damping
# --------------------------------------------------------------------------------------------
def pi_damping(trace_a: float, dim_a: int, trace_b: float, dim_b: int, damping: float, heuristic: str = "pi") -> tuple[float, float]:
    """Factored Tikhonov damping (δ_A, δ_B) for (A + δ_A I) ⊗ (B + δ_B I) (Martens & Grosse 2015).

    ``heuristic="pi"``: π = sqrt((tr A / dim A) / (tr B / dim B)), δ_A = sqrt(λ)·π,
    δ_B = sqrt(λ)/π, falling back to δ_A = δ_B = sqrt(λ) when π is 0 or not finite.
    ``heuristic="none"``: δ_A = δ_B = sqrt(λ). Both are floored at 1e-7 (a low-rank factor is
    singular without damping). O(1).
    """
    where = "pi_damping"
    lam = _check_nonneg(damping, "damping", where)
    if heuristic not in ("pi", "none"):
        raise ValueError(f"{where}: heuristic must be 'pi' or 'none', got {heuristic!r}.")
    as_t = lambda v: torch.tensor(float(v), dtype=torch.float64)  # noqa: E731
    da, db = damping_from_traces(as_t(trace_a), dim_a, as_t(trace_b), dim_b, lam, heuristic)
    return float(da), float(db)


# --------------------------------------------------------------------------------------------
# the factor object
# --------------------------------------------------------------------------------------------
class LowRankInit(NamedTuple):
    """Eigenvectors of a previous refresh, to pass as ``init`` to :meth:`LowRankKron.from_rows`."""

    a: Optional[Tensor]
    b: Optional[Tensor]


@dataclass(frozen=True, eq=False)
class LowRankKron:
    """Low-rank K-FAC block of one layer: (Ã + δ_A I) ⊗ (B̃ + δ_B I) and its inverse.

    Ã = V_A diag(λ_A) V_Aᵀ (``[d_in, d_in]``, never formed), B̃ = diag(b_diag) + V_B diag(λ_B) V_Bᵀ
    (``[d_out, d_out]``, never formed). Build with :meth:`from_rows`. Immutable; an optree pytree
    node in the ``"curvfun"`` namespace (tensor fields are children, dampings/iterations metadata).

    Fields besides the factors: ``a_inv`` / ``b_inv`` (:class:`WoodburyFactor` of the damped
    factors), ``damping_a`` / ``damping_b`` (δ_A, δ_B), ``iterations`` (power iterations used on
    the A and B sides) and ``shrink`` (the factor applied to B's negative off-diagonal eigenvalues
    to keep B̃ + δ_B I positive definite; 1.0 = untouched, see :func:`lowrank_plus_diag`).
    """

    a_eigenvalues: Tensor
    a_eigenvectors: Tensor
    b_diag: Tensor
    b_eigenvalues: Tensor
    b_eigenvectors: Tensor
    a_inv: WoodburyFactor
    b_inv: WoodburyFactor
    damping_a: float
    damping_b: float
    iterations: tuple = (0, 0)
    shrink: float = 1.0

    @property
    def d_in(self) -> int:
        return self.a_eigenvectors.shape[0]

    @property
    def d_out(self) -> int:
        return self.b_eigenvectors.shape[0]

    @classmethod
    def from_rows(
        cls,
        a_rows: Tensor,
        g_rows: Tensor,
        rank: Union[int, tuple[int, int]],
        damping: float,
        a_scale: float,
        b_scale: float,
        heuristic: str = "pi",
        power_iters: int = 20,
        init: Union[None, LowRankInit, tuple, "LowRankKron"] = None,
        generator: Optional[torch.Generator] = None,
        power_tol: Optional[float] = None,
    ) -> "LowRankKron":
        """Build from captured rows: A = a_scale · a_rowsᵀa_rows, B = b_scale · g_rowsᵀg_rows.

        a_rows ``[n_a, d_in]`` (layer inputs; for Conv2d the im2col patches, d_in = in·kh·kw),
        g_rows ``[n_b, d_out]`` (output-gradients). The scales carry the GUIDE's normalisation:
        a_scale = 1/N and b_scale = 1/N for Linear on N samples; a_scale = 1/(N·T), b_scale = 1/N
        for Conv2d / sequences with T positions.

        ``rank``: k for both sides or ``(k_A, k_B)``. ``damping`` λ >= 0 is split by
        :func:`pi_damping` using the traces of the *exact* factors, tr A = a_scale·‖a_rows‖²_F and
        tr B = b_scale·‖g_rows‖²_F (O(n·d), independent of the rank, so that the full-rank factor
        equals dense damped K-FAC). Ã from :func:`lowrank`, B̃ from :func:`lowrank_plus_diag`
        with ``damping=δ_B`` (so B̃ + δ_B I ≻ 0 is guaranteed), both inverted by
        :func:`woodbury_factor`. ``init``: the previous refresh's :meth:`warm_start` (or the
        previous :class:`LowRankKron`); ``power_tol`` is :func:`power_iteration`'s ``tol``.

        Cost: iterations · O((n_a·d_in + n_b·d_out) · k) + O((d_in + d_out) · k² + k³);
        memory O((d_in + d_out) · k).
        """
        where = "LowRankKron.from_rows"
        a_rows = _check_rows(a_rows, "a_rows", where)
        g_rows = _check_rows(g_rows, "g_rows", where)
        if a_rows.dtype != g_rows.dtype or a_rows.device != g_rows.device:
            raise ValueError(
                f"{where}: a_rows ({a_rows.dtype}, {a_rows.device}) and g_rows ({g_rows.dtype}, "
                f"{g_rows.device}) must share dtype and device."
            )
        d_in, d_out = a_rows.shape[1], g_rows.shape[1]
        if isinstance(rank, (tuple, list)):
            if len(rank) != 2:
                raise ValueError(f"{where}: rank must be an int or a pair (rank_a, rank_b), got {rank!r}.")
            rank_a, rank_b = rank
        else:
            rank_a = rank_b = rank
        rank_a = _check_rank(rank_a, d_in, f"{where} (A side, d_in={d_in})")
        rank_b = _check_rank(rank_b, d_out, f"{where} (B side, d_out={d_out})")
        a_scale = _check_nonneg(a_scale, "a_scale", where)
        b_scale = _check_nonneg(b_scale, "b_scale", where)
        if heuristic not in ("pi", "none"):
            raise ValueError(f"{where}: heuristic must be 'pi' or 'none', got {heuristic!r}.")
        lam = _check_nonneg(damping, "damping", where)
        if isinstance(init, LowRankKron):
            init = init.warm_start()
        item = LowRankRows(a_rows, g_rows, (rank_a, rank_b), lam, a_scale, b_scale, heuristic=heuristic,
                           power_iters=power_iters, init=None if init is None else LowRankInit(*init),
                           power_tol=power_tol)
        out = lowrank_kron_many([item], generator=generator)[0]
        if isinstance(out, Exception):
            raise out
        return out

    def matvec(self, grad: Mapping[str, Tensor]) -> dict:
        """Precondition ``{"weight": G, "bias": g_b}`` (bias optional).

        weight ↦ (B̃ + δ_B I)⁻¹ G (Ã + δ_A I)⁻¹, bias ↦ (B̃ + δ_B I)⁻¹ g_b. G is ``[d_out, d_in]``
        or a Conv2d kernel ``[d_out, c_in, kh, kw]`` (flattened to ``[d_out, c_in·kh·kw]`` and
        reshaped back). Cost O(d_out · d_in · k); no d x d matrix.
        """
        where = "LowRankKron.matvec"
        if not isinstance(grad, Mapping) or "weight" not in grad:
            raise ValueError(f"{where}: grad must be a mapping with a 'weight' entry (and optionally 'bias').")
        extra = set(grad) - {"weight", "bias"}
        if extra:
            raise ValueError(f"{where}: unexpected keys {sorted(extra)}; only 'weight' and 'bias' are preconditioned here.")
        W = grad["weight"]
        if W.dim() < 2 or W.shape[0] != self.d_out or W[0].numel() != self.d_in:
            raise ValueError(
                f"{where}: weight gradient of shape {tuple(W.shape)} does not fit the factors "
                f"(expected [d_out={self.d_out}, ...] with d_in={self.d_in} entries per output)."
            )
        H = self._weight_solve(W.reshape(self.d_out, self.d_in))
        out = {"weight": H.reshape(W.shape)}
        if grad.get("bias") is not None:
            gb = grad["bias"]
            if gb.shape != (self.d_out,):
                raise ValueError(f"{where}: bias gradient must have shape [d_out={self.d_out}], got {tuple(gb.shape)}.")
            out["bias"] = self.b_inv.solve(gb)
        elif "bias" in grad:
            out["bias"] = None
        return out

    def _weight_solve(self, G: Tensor) -> Tensor:
        """(B̃ + δ_B I)⁻¹ G (Ã + δ_A I)⁻¹ in one pass over G plus two thin products.

        With M_B⁻¹ = D_B⁻¹(I − V_B K_B⁻¹Λ_B R_Bᵀ) and M_A⁻¹ = D_A⁻¹(I − V_A K_A⁻¹Λ_A R_Aᵀ)
        (R = D⁻¹V, K the Woodbury cores; see :class:`WoodburyFactor`):
        Z_B = K_B⁻¹Λ_B R_BᵀG, H = D_B⁻¹(G − V_B Z_B), W = H R_A Λ_A K_A⁻ᵀ, and
        H M_A⁻¹ = D_B⁻¹ (G − [V_B, D_B W] [Z_B; V_Aᵀ]) D_A⁻¹, where H R_A is formed from G R_A
        without forming H. Cost O(d_out · d_in · (k_A + k_B)).
        """
        a, b = self.a_inv, self.b_inv
        # B side, left: Z_B = K_B⁻¹ Λ_B (D_B⁻¹V_B)ᵀ G                                  [k_B, d_in]
        Zb = torch.linalg.lu_solve(b.lu, b.pivots, (b.DinvV.mT @ G) * b.lam[:, None])
        # (H R_A) = D_B⁻¹ (G R_A − V_B (Z_B R_A))                                        [d_out, k_A]
        HR = _scale_rows(b.inv_diag, G @ a.DinvV - b.V @ (Zb @ a.DinvV))
        # W = (H R_A) Λ_A K_A⁻ᵀ, i.e. Wᵀ = K_A⁻¹ Λ_A (H R_A)ᵀ                                [d_out, k_A]
        Wt = torch.linalg.lu_solve(a.lu, a.pivots, HR.mT * a.lam[:, None])
        left = torch.cat([b.V, _scale_rows(b.inv_diag.reciprocal(), Wt.mT)], 1)  # [V_B, D_B W]
        right = torch.cat([Zb, a.V.mT], 0)
        out = torch.addmm(G, left, right, alpha=-1.0)
        if a.inv_diag.dim() == 0:
            rows = b.inv_diag * a.inv_diag
            return out.mul_(rows[:, None] if rows.dim() else rows)
        return _scale_rows(b.inv_diag, out).mul_(a.inv_diag[None, :])

    def dense_factors(self, damped: bool = True) -> tuple[Tensor, Tensor]:
        """(Ã, B̃) as dense matrices, plus δ_A I, δ_B I if ``damped`` (tests only; O(d²) memory)."""
        A = (self.a_eigenvectors * self.a_eigenvalues) @ self.a_eigenvectors.mT
        B = torch.diag(self.b_diag) + (self.b_eigenvectors * self.b_eigenvalues) @ self.b_eigenvectors.mT
        if damped:
            A = A + self.damping_a * torch.eye(self.d_in, dtype=A.dtype, device=A.device)
            B = B + self.damping_b * torch.eye(self.d_out, dtype=B.dtype, device=B.device)
        return A, B

    def to_dense(self) -> Tensor:
        """kron((B̃+δ_B I)⁻¹, (Ã+δ_A I)⁻¹): the preconditioner on the row-major vec of W
        (vec(W)[i·d_in + j] = W[i, j]), ``[d_out·d_in, d_out·d_in]``. Tests only."""
        A, B = self.dense_factors(damped=True)
        return torch.kron(torch.linalg.inv(B), torch.linalg.inv(A))

    def warm_start(self) -> LowRankInit:
        """The eigenvectors to pass as ``init`` at the next refresh."""
        return LowRankInit(self.a_eigenvectors, self.b_eigenvectors)

    def nbytes(self) -> int:
        """Bytes held by the tensors of this object (shared storage counted once): O((d_in+d_out)·k)."""
        return _nbytes(
            [self.a_eigenvalues, self.a_eigenvectors, self.b_diag, self.b_eigenvalues, self.b_eigenvectors]
            + [getattr(f, n) for f in (self.a_inv, self.b_inv) for n in ("inv_diag", "V", "lam", "DinvV", "lu", "pivots")]
        )


_register(
    LowRankKron,
    ["a_eigenvalues", "a_eigenvectors", "b_diag", "b_eigenvalues", "b_eigenvectors", "a_inv", "b_inv"],
    ["damping_a", "damping_b", "iterations", "shrink"],
)


# --------------------------------------------------------------------------------------------
# several layers at once, rows possibly spread over processes
# --------------------------------------------------------------------------------------------
class LowRankRows(NamedTuple):
    """One layer's input to :func:`lowrank_kron_many`: this process's rows and their scaling.

    A = (a_scale / Σ a_count) · Σ a_rowsᵀa_rows and B = (b_scale / Σ b_count) · Σ g_rowsᵀg_rows,
    the sums over processes (one process: the local rows); a count of None divides by nothing.
    E.g. Linear/Conv2d on N samples with T positions: a_count = N·T, b_count = N, scales 1.
    """

    a_rows: Tensor
    g_rows: Tensor
    rank: tuple
    damping: float
    a_scale: float = 1.0
    b_scale: float = 1.0
    a_count: Optional[float] = None
    b_count: Optional[float] = None
    heuristic: str = "pi"
    power_iters: int = 20
    init: Optional[LowRankInit] = None
    power_tol: Optional[float] = None


def lowrank_kron_many(
    items: Sequence[LowRankRows],
    reduce: Optional[Callable[[list], list]] = None,
    generator: Optional[torch.Generator] = None,
) -> list:
    """:meth:`LowRankKron.from_rows` for several layers, whose rows may be split over processes.

    ``reduce(tensors) -> tensors`` sums a list of tensors over the processes (None: one process).
    Everything the factors need is such a sum, so the result equals :meth:`LowRankKron.from_rows`
    on the rows of all processes stacked (up to summation order), on every process alike:

    1. one ``reduce`` of the statistics: ‖a_rows‖², ‖g_rows‖², diag(GᵀG) ``[d_out]`` and the
       counts, per layer (traces, π-damping, diag(B));
    2. one ``reduce`` per power-iteration step for all layers and both sides together (the
       iterations run in lockstep): the products a_rowsᵀ(a_rows Q) ``[d_in, k_A]`` and
       g_rowsᵀ(g_rows Q) ``[d_out, k_B]``; the k x k Ritz steps and the re-orthonormalisation
       then run identically everywhere.

    So ``power_iters + 1`` reductions of O(Σ_layers (d_in + d_out)·k) numbers, independent of the
    number of rows; the O(n·d·k) products are split over the processes. Random draws (the start
    without ``init``, the rank-deficient fallback) come from ``generator``, which must be in the
    same state on every process. Decisions (failure, early stop) depend on reduced values only,
    so all processes make the same reductions.

    Returns one entry per item: the :class:`LowRankKron`, or the ``ValueError`` / ``RuntimeError``
    that building it raised (non-finite rows, a singular core ...), so that one bad layer does not
    stop the others. Inputs are not validated here (:meth:`LowRankKron.from_rows` does).
    """
    red = (lambda ts: list(ts)) if reduce is None else reduce
    out: list = [None] * len(items)
    stats: list = []
    for it in items:
        a, g = it.a_rows, it.g_rows
        stats += [torch.linalg.vector_norm(a) ** 2, torch.linalg.vector_norm(g) ** 2, (g * g).sum(0)]
        stats += [torch.tensor(float(c), dtype=a.dtype, device=a.device) for c in (it.a_count, it.b_count) if c is not None]
    stats = red(stats) if stats else []

    prep: dict = {}  # item -> (a_scale, b_scale, δ_A, δ_B, diag(B))
    i = 0
    for j, it in enumerate(items):
        sa, sg, gdiag = stats[i : i + 3]
        i += 3
        scales = [it.a_scale, it.b_scale]
        for s, c in enumerate((it.a_count, it.b_count)):
            if c is not None:
                total = float(stats[i])
                i += 1
                scales[s] = scales[s] / total if total > 0 else float("nan")
        try:
            tr_a, tr_b = scales[0] * float(sa), scales[1] * float(sg)
            if not (math.isfinite(tr_a) and math.isfinite(tr_b)):
                raise ValueError(
                    f"lowrank_kron_many: the traces of the factors are not finite (tr A = {tr_a}, tr B = {tr_b}): "
                    f"the rows hold NaN/Inf entries or there are no rows. {_ROWS_HINT}"
                )
            da, db = pi_damping(tr_a, it.a_rows.shape[1], tr_b, it.g_rows.shape[1], it.damping, it.heuristic)
            prep[j] = (scales[0], scales[1], da, db, gdiag * scales[1])
        except (ValueError, RuntimeError) as e:
            out[j] = e

    def fail(j: int, e: Exception) -> None:
        out[j] = e
        for side in "ab":
            active.pop((j, side), None)

    active: dict = {}  # (item, side) -> [stepping generator, current basis]
    for j in prep:
        it = items[j]
        init = it.init if it.init is not None else (None, None)
        try:
            for side, U, rank, x0 in (("a", it.a_rows, it.rank[0], init[0]), ("b", it.g_rows, it.rank[1], init[1])):
                st = _power_iteration_steps(U.shape[1], rank, it.power_iters, x0, generator, it.power_tol,
                                            dtype=U.dtype, device=U.device)
                active[(j, side)] = [st, next(st)]
        except (ValueError, RuntimeError) as e:
            fail(j, e)

    ritz: dict = {}
    while active:
        keys = list(active)
        local = []
        for j, side in keys:
            U = items[j].a_rows if side == "a" else items[j].g_rows
            local.append((U.mT @ (U @ active[(j, side)][1])) * prep[j][0 if side == "a" else 1])
        for (j, side), Z in zip(keys, red(local)):
            if (j, side) not in active:  # its layer failed on the other side in this round
                continue
            st, X = active[(j, side)]
            if side == "b":
                Z = Z - prep[j][4][:, None] * X
            try:
                active[(j, side)][1] = st.send(Z)
            except StopIteration as stop:
                ritz[(j, side)] = stop.value
                del active[(j, side)]
            except (ValueError, RuntimeError) as e:
                fail(j, e)

    for j, (_, _, da, db, diag) in prep.items():
        if out[j] is not None:
            continue
        try:
            ra, rb = ritz[(j, "a")], ritz[(j, "b")]
            A = LowRank(ra.eigenvalues.clamp_min(0), ra.eigenvectors, ra.iterations)
            B = _plus_diag_result(diag, rb, db)
            a_inv = woodbury_factor(0.0, A.eigenvectors, A.eigenvalues, damping=da)
            b_inv = woodbury_factor(B.diag, B.eigenvectors, B.eigenvalues, damping=db)
            out[j] = LowRankKron(
                A.eigenvalues, A.eigenvectors, B.diag, B.eigenvalues, B.eigenvectors, a_inv, b_inv,
                da, db, (A.iterations, B.iterations), B.shrink,
            )
        except (ValueError, RuntimeError) as e:
            out[j] = e
    return out
