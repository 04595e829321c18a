"""Low-rank(+diag) K-FAC: power iteration, Sherman-Morrison / Woodbury, LowRankKron.

Every expected value is dense linear algebra (torch.linalg.eigh / inv / solve on matrices built
here from the rows), never the code under test. float64 throughout (conftest).
"""

from __future__ import annotations

import dataclasses
import math

import optree
import pytest
import torch
from hypothesis import given, strategies as st

from curvfun.lowrank import (
    LowRankKron,
    lowrank,
    lowrank_plus_diag,
    pi_damping,
    power_iteration,
    sherman_morrison_solve,
    woodbury_factor,
    woodbury_solve,
)

seeds = st.integers(0, 2**31 - 1)


@pytest.fixture(autouse=True)
def _single_thread():
    """These matrices are tiny: run them on one thread. With two, every LAPACK/BLAS call opens a
    parallel region whose barrier can stall for milliseconds on a busy machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthogonal(d: int, g: torch.Generator) -> torch.Tensor:
    """A random orthogonal matrix (eigenvectors of a random symmetric matrix)."""
    X = torch.randn(d, d, generator=g)
    return torch.linalg.eigh(X + X.T).eigenvectors


def _subspace_dist(V: torch.Tensor, W: torch.Tensor) -> float:
    """‖VVᵀ − WWᵀ‖_2 = sin of the largest principal angle between the column spans."""
    return float(torch.linalg.matrix_norm(V @ V.T - W @ W.T, ord=2))


def _dense_damping(A: torch.Tensor, B: torch.Tensor, lam: float, heuristic: str) -> tuple[float, float]:
    """The GUIDE's π-damped factored Tikhonov, from the dense factors (ground truth)."""
    s = math.sqrt(lam)
    if heuristic == "none":
        da = db = s
    else:
        ta, tb = float(torch.trace(A)) / A.shape[0], float(torch.trace(B)) / B.shape[0]
        pi = math.sqrt(ta / tb) if tb > 0 else float("inf")
        da, db = (s * pi, s / pi) if (math.isfinite(pi) and pi > 0) else (s, s)
    return max(da, 1e-7), max(db, 1e-7)


def _dense_kfac(a_rows, g_rows, a_scale, b_scale, lam, heuristic, G, gb=None):
    """(B + δ_B I)⁻¹ G (A + δ_A I)⁻¹ and (B + δ_B I)⁻¹ g_b from dense factors."""
    A = a_scale * a_rows.T @ a_rows
    B = b_scale * g_rows.T @ g_rows
    da, db = _dense_damping(A, B, lam, heuristic)
    Ad = A + da * torch.eye(A.shape[0])
    Bd = B + db * torch.eye(B.shape[0])
    W = torch.linalg.solve(Bd, G) @ torch.linalg.inv(Ad)
    b = None if gb is None else torch.linalg.solve(Bd, gb)
    return W, b, (da, db), (A, B)


# ------------------------------------------------------------------------------------------
# Sherman-Morrison / Woodbury / dense inverse
# ------------------------------------------------------------------------------------------
@given(
    seed=seeds,
    d=st.integers(1, 12),
    k=st.integers(1, 6),
    m=st.sampled_from([None, 1, 3]),
    scalar_diag=st.booleans(),
    damping=st.sampled_from([0.0, 1e-3, 0.5]),
)
def test_sherman_morrison_woodbury_match_dense_inverse(seed, d, k, m, scalar_diag, damping):
    g = _gen(seed)
    k = min(k, d)
    V = torch.randn(d, k, generator=g)
    lam = 3.0 * torch.rand(k, generator=g)
    diag = (0.2 + torch.rand((), generator=g)) if scalar_diag else 0.2 + 2 * torch.rand(d, generator=g)
    X = torch.randn(d, generator=g) if m is None else torch.randn(d, m, generator=g)
    M = torch.diag(diag * torch.ones(d)) + damping * torch.eye(d) + V @ torch.diag(lam) @ V.T
    assert float(torch.linalg.eigvalsh(M).min()) > 0  # SPD by construction
    Minv = torch.linalg.inv(M)
    expected = Minv @ X
    tol = 1e-10 * float(torch.linalg.matrix_norm(Minv, 2)) * float(torch.linalg.vector_norm(X))
    sm = sherman_morrison_solve(diag, V, lam, X, damping=damping)
    wb = woodbury_solve(diag, V, lam, X, damping=damping)
    assert sm.shape == X.shape and wb.shape == X.shape
    torch.testing.assert_close(sm, expected, rtol=0, atol=tol)
    torch.testing.assert_close(wb, expected, rtol=0, atol=tol)
    # the cached core gives the same solves and the same dense inverse
    F = woodbury_factor(diag, V, lam, damping=damping)
    torch.testing.assert_close(F.solve(X), expected, rtol=0, atol=tol)
    torch.testing.assert_close(F.to_dense(), Minv, rtol=0, atol=1e-10 * float(torch.linalg.matrix_norm(Minv, 2)))


@given(seed=seeds, d=st.integers(2, 10), k=st.integers(1, 5))
def test_solves_with_negative_eigenvalues_match_dense(seed, d, k):
    """Indefinite low-rank parts (the B side) on an SPD total, incl. the A-side diag = 0."""
    g = _gen(seed)
    k = min(k, d)
    V = _orthogonal(d, g)[:, :k]
    diag = 1.0 + torch.rand(d, generator=g)
    lam = (torch.rand(k, generator=g) * 2 - 1) * 0.9  # > −min(diag): SPD with V orthonormal
    X = torch.randn(d, 2, generator=g)
    M = torch.diag(diag) + V @ torch.diag(lam) @ V.T
    expected = torch.linalg.solve(M, X)
    torch.testing.assert_close(sherman_morrison_solve(diag, V, lam, X), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(woodbury_solve(diag, V, lam, X), expected, rtol=1e-10, atol=1e-10)
    # A side: pure low-rank plus damping
    lam_a = 2.0 * torch.rand(k, generator=g)
    Ma = 0.3 * torch.eye(d) + V @ torch.diag(lam_a) @ V.T
    torch.testing.assert_close(woodbury_solve(0.0, V, lam_a, X, damping=0.3), torch.linalg.solve(Ma, X))
    torch.testing.assert_close(sherman_morrison_solve(0.0, V, lam_a, X, damping=0.3), torch.linalg.solve(Ma, X))


# ------------------------------------------------------------------------------------------
# power iteration
# ------------------------------------------------------------------------------------------
def _gapped_matrix(seed: int, d: int, k: int, indefinite: bool, ratio: float = 0.4):
    """Symmetric M with |λ_{k+1}| / |λ_k| <= ratio; returns (M, eigenvalues sorted descending by magnitude)."""
    g = _gen(seed)
    Q = _orthogonal(d, g)
    top = 1.0 + torch.rand(k, generator=g)  # in [1, 2)
    rest = ratio * torch.rand(d - k, generator=g)  # in [0, ratio)
    vals = torch.cat([top, rest])
    if indefinite:
        vals = vals * torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0)
    M = Q @ torch.diag(vals) @ Q.T
    return 0.5 * (M + M.T)


@given(seed=seeds, d=st.integers(2, 16), k=st.integers(1, 6), indefinite=st.booleans())
def test_power_iteration_recovers_top_eigenpairs(seed, d, k, indefinite):
    """Tolerance: eigenvalues to 1e-9·|λ_1|, invariant subspace to sin∠ <= 1e-7, given a gap 0.4."""
    k = min(k, d)
    M = _gapped_matrix(seed, d, k, indefinite)
    w, Q = torch.linalg.eigh(M)  # ground truth
    order = torch.argsort(w.abs(), descending=True)[:k]
    true_vals, true_vecs = w[order], Q[:, order]
    r = power_iteration(lambda X: M @ X, d, k, iters=300, tol=1e-13, generator=_gen(seed + 1))
    assert r.eigenvalues.shape == (k,) and r.eigenvectors.shape == (d, k)
    assert r.iterations <= 300
    assert torch.all(r.eigenvalues[:-1] >= r.eigenvalues[1:])  # descending
    torch.testing.assert_close(r.eigenvalues, torch.sort(true_vals, descending=True).values, rtol=0, atol=1e-9)
    torch.testing.assert_close(r.eigenvectors.T @ r.eigenvectors, torch.eye(k), rtol=0, atol=1e-12)
    assert _subspace_dist(r.eigenvectors, true_vecs) <= 1e-7
    # each returned column is an eigenvector of its returned eigenvalue
    res = M @ r.eigenvectors - r.eigenvectors * r.eigenvalues
    assert float(res.abs().max()) <= 1e-9


@given(seed=seeds, d=st.integers(6, 24), k=st.integers(1, 4))
def test_warm_start_needs_fewer_iterations_than_cold_start(seed, d, k):
    k = min(k, d - 2)
    g = _gen(seed)
    M0 = _gapped_matrix(seed, d, k, indefinite=False, ratio=0.3)
    E = torch.randn(d, d, generator=g)
    E = (E + E.T) / torch.linalg.matrix_norm(E + E.T, 2)
    M1 = M0 + 1e-5 * E  # slightly perturbed (the next refresh's factor)
    tol = 1e-10
    prev = power_iteration(lambda X: M0 @ X, d, k, iters=500, tol=tol, generator=_gen(seed + 1))
    cold = power_iteration(lambda X: M1 @ X, d, k, iters=500, tol=tol, generator=_gen(seed + 2))
    warm = power_iteration(lambda X: M1 @ X, d, k, iters=500, tol=tol, init=prev.eigenvectors)
    assert warm.iterations < cold.iterations, (warm.iterations, cold.iterations)
    w, Q = torch.linalg.eigh(M1)
    truth = torch.sort(w, descending=True).values[:k]
    for r in (cold, warm):
        torch.testing.assert_close(r.eigenvalues, truth, rtol=0, atol=1e-8)


def test_warm_start_fewer_iterations_for_kfac_rows():
    """The K-FAC use: the next batch of rows from the same distribution, warm-started vs cold."""
    g = _gen(0)
    d, n, k = 40, 200, 3
    mix = _orthogonal(d, g) * torch.cat([torch.tensor([6.0, 4.0, 3.0]), 0.3 * torch.ones(d - 3)])
    U0 = torch.randn(n, d, generator=g) @ mix.T
    U1 = U0 + 1e-3 * torch.randn(n, d, generator=g) @ mix.T
    prev = lowrank(U0, k, scale=1 / n, iters=200, tol=1e-9, generator=_gen(1))
    cold = lowrank(U1, k, scale=1 / n, iters=200, tol=1e-9, generator=_gen(2))
    warm = lowrank(U1, k, scale=1 / n, iters=200, tol=1e-9, init=prev.eigenvectors)
    assert warm.iterations < cold.iterations
    w = torch.linalg.eigvalsh(U1.T @ U1 / n).flip(0)[:k]
    torch.testing.assert_close(warm.eigenvalues, w, rtol=1e-7, atol=0)


# ------------------------------------------------------------------------------------------
# low-rank factors
# ------------------------------------------------------------------------------------------
@given(seed=seeds, n=st.integers(1, 12), d=st.integers(1, 8))
def test_lowrank_equals_eigendecomposition_of_UtU(seed, n, d):
    g = _gen(seed)
    U = torch.randn(n, d, generator=g)
    A = 0.5 * U.T @ U
    for k in sorted({1, (d + 1) // 2, d}):
        r = lowrank(U, k, scale=0.5, iters=400, tol=1e-12, generator=_gen(seed + 1))
        assert torch.all(r.eigenvalues >= 0)
        # orthonormal even when A has rank n < k (the re-orthonormalisation refills the null space)
        torch.testing.assert_close(r.eigenvectors.T @ r.eigenvectors, torch.eye(k), rtol=0, atol=1e-12)
        ev = torch.linalg.eigvalsh(A).flip(0)  # descending
        truth = ev[:k]
        if k == d or float(ev[k - 1] - ev[k]) > 0.05:  # with a gap, the top-k are determined
            torch.testing.assert_close(r.eigenvalues, truth.clamp_min(0), rtol=0, atol=1e-8)
            torch.testing.assert_close(A @ r.eigenvectors, r.eigenvectors * r.eigenvalues, rtol=0, atol=1e-8)
    # rank = d reproduces A exactly
    r = lowrank(U, d, scale=0.5, iters=1, generator=_gen(seed + 2))
    torch.testing.assert_close(r.eigenvectors @ torch.diag(r.eigenvalues) @ r.eigenvectors.T, A, rtol=0, atol=1e-12)


@given(seed=seeds, n=st.integers(1, 8), d=st.integers(2, 8), damping=st.sampled_from([0.0, 1e-4, 1e-1]),
       dead=st.booleans())
def test_lowrank_plus_diag_stays_psd_and_keeps_ritz_values(seed, n, d, damping, dead):
    """diag(B) + VΛVᵀ + damping·I is PSD (PD for damping > 0) for every rank; positive
    eigenvalues are the exact Ritz values of B − diag(B) on span V, negative ones at most shrunk."""
    g = _gen(seed)
    U = torch.randn(n, d, generator=g) * (3 * torch.rand(d, generator=g))
    if dead:
        U[:, 0] = 0.0  # a unit with zero gradient: diag(B)_0 = 0
    B = U.T @ U
    Off = B - torch.diag(torch.diagonal(B))
    for k in range(1, d + 1):
        r = lowrank_plus_diag(U, k, iters=60, generator=_gen(seed + k), damping=damping)
        torch.testing.assert_close(r.diag, torch.diagonal(B))
        Bt = torch.diag(r.diag) + r.eigenvectors @ torch.diag(r.eigenvalues) @ r.eigenvectors.T
        lam_min = float(torch.linalg.eigvalsh(Bt + damping * torch.eye(d)).min())
        scale = float(torch.diagonal(B).max()) + 1.0
        if damping > 0:
            assert lam_min >= 0.5 * damping * (1 - 1e-6), (k, lam_min, r.shrink)
        else:
            assert lam_min >= -1e-12 * scale, (k, lam_min, r.shrink)
        assert 0 < r.shrink <= 1
        raw = torch.where(r.eigenvalues < 0, r.eigenvalues / r.shrink, r.eigenvalues)
        ritz = r.eigenvectors.T @ Off @ r.eigenvectors
        torch.testing.assert_close(ritz, torch.diag(raw), rtol=0, atol=1e-9 * scale)
        if k == d:  # full rank: the approximation is B itself
            assert r.shrink == 1.0 or (damping == 0 and abs(r.shrink - 1) < 1e-9)
            torch.testing.assert_close(Bt, B, rtol=0, atol=1e-9 * scale)


def test_lowrank_plus_diag_repairs_an_indefinite_truncation():
    """A case where the plain top-1 (by magnitude) truncation of B − diag(B) is indefinite."""
    U = torch.tensor([[3.5, 0.0, 0.5], [0.0, 2.0, -3.5], [-5.5, -2.5, -1.0]])
    B = U.T @ U
    D = torch.diag(torch.diagonal(B))
    w, Q = torch.linalg.eigh(B - D)
    i = int(torch.argmax(w.abs()))
    plain = D + w[i] * torch.outer(Q[:, i], Q[:, i])
    assert w[i] < 0 and float(torch.linalg.eigvalsh(plain).min()) < -0.1  # the truncation is indefinite
    r = lowrank_plus_diag(U, 1, iters=200, tol=1e-13, generator=_gen(0))
    torch.testing.assert_close(r.eigenvectors @ r.eigenvectors.T, torch.outer(Q[:, i], Q[:, i]))
    assert r.shrink < 1
    Bt = D + r.eigenvectors @ torch.diag(r.eigenvalues) @ r.eigenvectors.T
    ev = torch.linalg.eigvalsh(Bt)
    assert float(ev.min()) >= -1e-12  # repaired: PSD ...
    assert float(ev.min()) <= 1e-6 * float(ev.max())  # ... and t is the largest such factor (on the boundary)
    torch.testing.assert_close(r.eigenvalues, w[i:i + 1] * r.shrink)


# ------------------------------------------------------------------------------------------
# LowRankKron
# ------------------------------------------------------------------------------------------
@given(
    seed=seeds,
    n=st.integers(1, 10),
    d_in=st.integers(1, 6),
    d_out=st.integers(1, 6),
    lam=st.sampled_from([1e-3, 0.1, 1.0]),
    heuristic=st.sampled_from(["pi", "none"]),
    bias=st.booleans(),
)
def test_full_rank_lowrank_kron_equals_dense_damped_kfac(seed, n, d_in, d_out, lam, heuristic, bias):
    g = _gen(seed)
    a_rows = torch.randn(n, d_in, generator=g)
    g_rows = torch.randn(n, d_out, generator=g) * 0.1
    G = torch.randn(d_out, d_in, generator=g)
    gb = torch.randn(d_out, generator=g) if bias else None
    expected_w, expected_b, (da, db), (A, B) = _dense_kfac(a_rows, g_rows, 1 / n, 1 / n, lam, heuristic, G, gb)
    K = LowRankKron.from_rows(a_rows, g_rows, (d_in, d_out), lam, 1 / n, 1 / n, heuristic=heuristic,
                              power_iters=2, generator=_gen(seed + 1))
    assert math.isclose(K.damping_a, da, rel_tol=1e-12) and math.isclose(K.damping_b, db, rel_tol=1e-12)
    grad = {"weight": G} if gb is None else {"weight": G, "bias": gb}
    out = K.matvec(grad)
    assert set(out) == set(grad)
    torch.testing.assert_close(out["weight"], expected_w, rtol=1e-9, atol=1e-9)
    if bias:
        torch.testing.assert_close(out["bias"], expected_b, rtol=1e-9, atol=1e-9)
    # to_dense acts on the row-major vec of W and equals kron((B+δ_B)⁻¹, (A+δ_A)⁻¹)
    P = torch.kron(torch.linalg.inv(B + db * torch.eye(d_out)), torch.linalg.inv(A + da * torch.eye(d_in)))
    torch.testing.assert_close(K.to_dense(), P, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(K.to_dense() @ G.reshape(-1), expected_w.reshape(-1), rtol=1e-9, atol=1e-9)


@given(seed=seeds, n=st.integers(2, 6), c_in=st.integers(1, 3), kh=st.integers(1, 2), d_out=st.integers(1, 4))
def test_conv2d_kernel_is_flattened_and_reshaped(seed, n, c_in, kh, d_out):
    g = _gen(seed)
    d_in = c_in * kh * kh
    T = 3
    a_rows = torch.randn(n * T, d_in, generator=g)  # im2col patches
    g_rows = torch.randn(n * T, d_out, generator=g)
    Gk = torch.randn(d_out, c_in, kh, kh, generator=g)
    expected, _, _, _ = _dense_kfac(a_rows, g_rows, 1 / (n * T), 1 / n, 0.05, "pi", Gk.reshape(d_out, d_in))
    K = LowRankKron.from_rows(a_rows, g_rows, (d_in, d_out), 0.05, 1 / (n * T), 1 / n, generator=_gen(seed))
    out = K.matvec({"weight": Gk})["weight"]
    assert out.shape == Gk.shape
    torch.testing.assert_close(out.reshape(d_out, d_in), expected, rtol=1e-9, atol=1e-9)


@given(seed=seeds, d_in=st.integers(1, 5), d_out=st.integers(1, 5), k=st.integers(1, 3))
def test_fused_weight_solve_equals_two_woodbury_solves(seed, d_in, d_out, k):
    """matvec's one-pass formula against dense solves, also for diagonal-plus-low-rank on both
    sides (a LowRankKron assembled by hand from two Woodbury factors)."""
    g = _gen(seed)
    ka, kb = min(k, d_in), min(k, d_out)
    Va, Vb = torch.randn(d_in, ka, generator=g), torch.randn(d_out, kb, generator=g)
    la, lb = torch.rand(ka, generator=g), torch.rand(kb, generator=g)
    diag_a, diag_b = 0.5 + torch.rand(d_in, generator=g), 0.5 + torch.rand(d_out, generator=g)
    K = LowRankKron(la, Va, diag_b, lb, Vb, woodbury_factor(diag_a, Va, la, 0.1), woodbury_factor(diag_b, Vb, lb, 0.2),
                    0.1, 0.2)
    Ma = torch.diag(diag_a) + 0.1 * torch.eye(d_in) + Va @ torch.diag(la) @ Va.T
    Mb = torch.diag(diag_b) + 0.2 * torch.eye(d_out) + Vb @ torch.diag(lb) @ Vb.T
    G = torch.randn(d_out, d_in, generator=g)
    expected = torch.linalg.solve(Mb, G) @ torch.linalg.inv(Ma)
    torch.testing.assert_close(K.matvec({"weight": G})["weight"], expected, rtol=1e-10, atol=1e-10)


def _decaying_rows(seed: int, n: int, d: int, decay: float) -> torch.Tensor:
    g = _gen(seed)
    s = decay ** torch.arange(d, dtype=torch.float64)
    return torch.randn(n, d, generator=g) @ (_orthogonal(d, g) * s).T


def _gapped_ranks(vals: torch.Tensor, ratio: float = 0.75) -> list[int]:
    """Ranks k < d at which the top-k (by magnitude) is well separated: |μ_{k+1}| <= ratio·|μ_k|."""
    mags = torch.sort(vals.abs(), descending=True).values
    return [k for k in range(1, len(mags)) if float(mags[k]) <= ratio * float(mags[k - 1])]


@given(seed=seeds, d_in=st.integers(2, 6), d_out=st.integers(2, 6), decay=st.sampled_from([0.3, 0.5, 0.7]),
       lam=st.sampled_from([1e-2, 0.1]))
def test_error_falls_as_rank_grows(seed, d_in, d_out, decay, lam):
    """Rows with decaying spectra; dense ground truth from eigvalsh / inv.

    * A side: ‖A − Ã_k‖_F = sqrt(Σ_{j>k} λ_j²) (Eckart-Young), and with B̃ = B the preconditioner
      error ‖P_k − P‖_F (P = dense damped K-FAC inverse) is non-increasing in k: Ã_k ⪯ Ã_{k+1} ⪯ A
      gives P_k ⪰ P_{k+1} ⪰ P, and Frobenius norms of PSD matrices respect that order.
    * B side: ‖B − B̃_k‖_F = ‖Off − Off_k‖_F = sqrt(Σ_{j>k} μ_j²) over the eigenvalues μ of
      B − diag(B) sorted by magnitude: non-increasing in k.
    Checked at the ranks where the top-k is well defined (a spectral gap; the dominant subspace
    of a tie is arbitrary) and not altered by the PSD repair (shrink = 1), and at full rank (0).
    """
    n = 3 * max(d_in, d_out)
    a_rows = _decaying_rows(seed, n, d_in, decay)
    g_rows = _decaying_rows(seed + 7, n, d_out, decay)
    A, B = a_rows.T @ a_rows / n, g_rows.T @ g_rows / n
    da, db = _dense_damping(A, B, lam, "pi")
    P = torch.kron(torch.linalg.inv(B + db * torch.eye(d_out)), torch.linalg.inv(A + da * torch.eye(d_in)))
    lam_a = torch.linalg.eigvalsh(A).flip(0)
    mu_b = torch.linalg.eigvalsh(B - torch.diag(torch.diagonal(B)))
    mu_b = mu_b[torch.argsort(mu_b.abs(), descending=True)]
    scale_a, scale_b = float(lam_a[0]), float(mu_b.abs()[0]) + float(torch.diagonal(B).max())

    def build(ka, kb):
        return LowRankKron.from_rows(a_rows, g_rows, (ka, kb), lam, 1 / n, 1 / n, power_iters=300,
                                     power_tol=1e-11, generator=_gen(seed + 31 * ka + kb))

    errs_p = []
    for k in _gapped_ranks(lam_a) + [d_in]:
        K = build(k, d_out)
        At, _ = K.dense_factors(damped=False)
        expected = float(torch.sqrt((lam_a[k:] ** 2).sum()))
        assert abs(float(torch.linalg.matrix_norm(At - A)) - expected) <= 1e-6 * scale_a
        errs_p.append(float(torch.linalg.matrix_norm(K.to_dense() - P)))
    for e0, e1 in zip(errs_p, errs_p[1:]):
        assert e1 <= e0 * (1 + 1e-7) + 1e-10, errs_p
    assert errs_p[-1] <= 1e-9 * float(torch.linalg.matrix_norm(P))

    errs_b = []
    for k in _gapped_ranks(mu_b) + [d_out]:
        K = build(d_in, k)
        if K.shrink < 1:
            continue
        _, Bt = K.dense_factors(damped=False)
        expected = float(torch.sqrt((mu_b[k:] ** 2).sum()))
        errs_b.append(float(torch.linalg.matrix_norm(Bt - B)))
        assert abs(errs_b[-1] - expected) <= 1e-6 * scale_b
    for e0, e1 in zip(errs_b, errs_b[1:]):
        assert e1 <= e0 + 1e-6 * scale_b, errs_b
    assert errs_b[-1] <= 1e-9 * scale_b


def test_pi_damping_fallback_and_zero_gradients_give_no_nans():
    a_rows = torch.randn(5, 4, generator=_gen(0))
    g_rows = torch.zeros(5, 3)  # B = 0: π = ∞ → δ_A = δ_B = sqrt(λ)
    K = LowRankKron.from_rows(a_rows, g_rows, (4, 2), 0.04, 0.2, 0.2, generator=_gen(1))
    assert K.damping_a == pytest.approx(0.2) and K.damping_b == pytest.approx(0.2)
    G = torch.randn(3, 4, generator=_gen(2))
    A = 0.2 * a_rows.T @ a_rows
    expected = (G / 0.2) @ torch.linalg.inv(A + 0.2 * torch.eye(4))
    out = K.matvec({"weight": G, "bias": torch.ones(3)})
    torch.testing.assert_close(out["weight"], expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out["bias"], torch.ones(3) / 0.2)
    # λ = 0 floors both dampings at 1e-7
    assert pi_damping(1.0, 2, 1.0, 2, 0.0) == (1e-7, 1e-7)
    assert pi_damping(4.0, 1, 1.0, 1, 1.0) == pytest.approx((2.0, 0.5))
    assert pi_damping(4.0, 1, 1.0, 1, 1.0, heuristic="none") == (1.0, 1.0)


def test_warm_start_pytree_and_memory():
    g = _gen(3)
    d_in, d_out, n, k = 12, 10, 30, 3
    a_rows = _decaying_rows(3, n, d_in, 0.5)
    g_rows = _decaying_rows(4, n, d_out, 0.5)
    K0 = LowRankKron.from_rows(a_rows, g_rows, k, 0.1, 1 / n, 1 / n, power_iters=300, power_tol=1e-10, generator=g)
    a2 = a_rows + 1e-4 * torch.randn(n, d_in, generator=g)
    g2 = g_rows + 1e-4 * torch.randn(n, d_out, generator=g)
    cold = LowRankKron.from_rows(a2, g2, k, 0.1, 1 / n, 1 / n, power_iters=300, power_tol=1e-10, generator=g)
    warm = LowRankKron.from_rows(a2, g2, k, 0.1, 1 / n, 1 / n, power_iters=300, power_tol=1e-10,
                                 init=K0.warm_start())
    assert warm.iterations[0] < cold.iterations[0] and warm.iterations[1] < cold.iterations[1]
    G = torch.randn(d_out, d_in, generator=g)
    torch.testing.assert_close(warm.matvec({"weight": G})["weight"], cold.matvec({"weight": G})["weight"])
    # immutable, and an optree node in the "curvfun" namespace whose leaves are its tensors
    with pytest.raises(dataclasses.FrozenInstanceError):
        warm.damping_a = 1.0
    leaves = optree.tree_leaves(warm, namespace="curvfun")
    assert all(isinstance(t, torch.Tensor) for t in leaves)
    copy = optree.tree_map(lambda t: t.clone(), warm, namespace="curvfun")
    assert type(copy) is LowRankKron and copy.damping_b == warm.damping_b
    torch.testing.assert_close(copy.matvec({"weight": G})["weight"], warm.matvec({"weight": G})["weight"])
    # memory: O((d_in + d_out)·k) floats, counted tensor by tensor
    f, piv = 8, warm.a_inv.pivots.element_size()
    expected = f * (k + d_in * k + d_out + k + d_out * k)  # eigenpairs and diag(B)
    expected += f * (1 + d_in * k + k * k) + piv * k  # A side: 1/δ_A, D⁻¹V, LU of the core, pivots
    expected += f * (d_out + d_out * k + k * k) + piv * k  # B side: 1/(diag B + δ_B), D⁻¹V, LU, pivots
    assert warm.nbytes() == expected
    assert warm.nbytes() < f * (d_in * d_in + d_out * d_out)


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rows_raise(bad):
    a = torch.randn(4, 3)
    gr = torch.randn(4, 2)
    a_bad, g_bad = a.clone(), gr.clone()
    a_bad[1, 2] = bad
    g_bad[0, 0] = bad
    with pytest.raises(ValueError, match=r"a_rows contains 1 non-finite \(NaN or Inf\) entries.*skip this"):
        LowRankKron.from_rows(a_bad, gr, 1, 0.1, 0.25, 0.25)
    with pytest.raises(ValueError, match=r"g_rows contains 1 non-finite"):
        LowRankKron.from_rows(a, g_bad, 1, 0.1, 0.25, 0.25)
    with pytest.raises(ValueError, match=r"lowrank: U contains 1 non-finite"):
        lowrank(a_bad, 1)
    with pytest.raises(ValueError, match=r"lowrank_plus_diag: U contains 1 non-finite"):
        lowrank_plus_diag(g_bad, 1)
    with pytest.raises(ValueError, match=r"matvec\(Q\) contains"):
        power_iteration(lambda X: X * bad, 3, 1)
    with pytest.raises(ValueError, match=r"init contains"):
        power_iteration(lambda X: X, 3, 1, init=torch.full((3, 1), bad))
    with pytest.raises(ValueError, match=r"lam contains"):
        woodbury_solve(1.0, torch.ones(3, 1), torch.tensor([bad]), torch.ones(3))


def test_finite_check_is_exact_when_the_sum_overflows():
    from curvfun.lowrank import _check_finite

    big = torch.full((4,), 3e38, dtype=torch.float32)  # finite entries, sum overflows to inf
    _check_finite(big, "x", "here")  # accepted: no entry is NaN/Inf
    big[2] = float("nan")
    with pytest.raises(ValueError, match=r"here: x contains 1 non-finite"):
        _check_finite(big, "x", "here")


def test_rank_errors():
    a, gr = torch.randn(4, 3), torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"rank=3 is larger than the dimension 2; use rank <= 2"):
        LowRankKron.from_rows(a, gr, 3, 0.1, 0.25, 0.25)
    with pytest.raises(ValueError, match=r"A side, d_in=3\): rank=5 is larger than the dimension 3"):
        LowRankKron.from_rows(a, gr, (5, 1), 0.1, 0.25, 0.25)
    with pytest.raises(ValueError, match=r"rank=0 is less than 1"):
        LowRankKron.from_rows(a, gr, 0, 0.1, 0.25, 0.25)
    with pytest.raises(ValueError, match=r"lowrank: rank=4 is larger than the dimension 3"):
        lowrank(a, 4)
    with pytest.raises(ValueError, match=r"lowrank_plus_diag: rank=3 is larger than the dimension 2"):
        lowrank_plus_diag(gr, 3)
    with pytest.raises(ValueError, match=r"power_iteration: rank=-1 is less than 1"):
        power_iteration(lambda X: X, 3, -1)


def test_other_bad_input_errors():
    a, gr = torch.randn(4, 3), torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"damping=-0.1 must be finite and >= 0"):
        LowRankKron.from_rows(a, gr, 1, -0.1, 0.25, 0.25)
    with pytest.raises(ValueError, match=r"damping=nan must be finite"):
        woodbury_solve(1.0, torch.ones(3, 1), torch.ones(1), torch.ones(3), damping=float("nan"))
    with pytest.raises(ValueError, match=r"heuristic must be 'pi' or 'none'"):
        LowRankKron.from_rows(a, gr, 1, 0.1, 0.25, 0.25, heuristic="tikhonov")
    with pytest.raises(ValueError, match=r"must be 2-D \[n_rows, d\]"):
        lowrank(torch.randn(2, 3, 4), 1)
    with pytest.raises(ValueError, match=r"diag \+ damping must be positive.*increase the damping"):
        woodbury_solve(0.0, torch.ones(3, 1), torch.ones(1), torch.ones(3))
    with pytest.raises(ValueError, match=r"singular at rank-1 update 0"):
        sherman_morrison_solve(1.0, torch.tensor([[1.0], [0.0]]), torch.tensor([-1.0]), torch.ones(2))
    with pytest.raises(ValueError, match=r"singular"):
        woodbury_solve(1.0, torch.tensor([[1.0], [0.0]]), torch.tensor([-1.0]), torch.ones(2))
    K = LowRankKron.from_rows(a, gr, 1, 0.1, 0.25, 0.25)
    with pytest.raises(ValueError, match=r"does not fit the factors"):
        K.matvec({"weight": torch.randn(3, 3)})
    with pytest.raises(ValueError, match=r"unexpected keys \['scale'\]"):
        K.matvec({"weight": torch.randn(2, 3), "scale": torch.ones(1)})
