"""Factor algebra (damped inverses, π-damping, eigen-decompositions), invariances and bad
input of curvfun's Kronecker factors (issue 3).

Expected values are built here from the factors' A and B with plain ``torch.kron`` /
``torch.linalg`` (dense matrices in the documented ``[vec_r(W); b]`` order, block-diagonal
over groups), or from the GUIDE's π-damping formula written out, never from the code under
test. Invariance tests compare two runs of ``curvfun.kfac`` on models that compute the same
function (shuffled params, excluded modules, in-place vs out-of-place). float64; tolerances
are stated per test (1e-9 relative for products of inverses with condition number < 1e5).
"""

from __future__ import annotations

import dataclasses
import math

import optree
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import curvfun
from curvfun.kron import KronFactor, pi_damping
from curvfun.testing import checks, reference as ref, strategies as cst
from model_init import generator as _gen, init_float64 as _init

RTOL, ATOL = 1e-8, 1e-10


def close(actual, expected, what, rtol=RTOL, atol=ATOL):
    checks.assert_close(actual, expected, rtol=rtol, atol=atol, what=what)




# --------------------------------------------------------------------------------------
# random factors
# --------------------------------------------------------------------------------------
def _psd(g, G, d, scale, rank_deficient):
    """``[G, d, d]`` symmetric PSD, eigenvalues scale·U(0.1, 10) (some 0 when rank_deficient)."""
    Q, _ = torch.linalg.qr(torch.randn(G, d, d, generator=g))
    lam = scale * (0.1 + 9.9 * torch.rand(G, d, generator=g))
    if rank_deficient and d > 1:
        lam[:, : d // 2] = 0
    M = Q @ torch.diag_embed(lam) @ Q.transpose(1, 2)
    return (M + M.transpose(1, 2)) / 2


@st.composite
def kron_factors(draw):
    """A KronFactor with drawn groups, sizes, bias / folded, scales 1e-2..1e2 of A and B
    (independently) and possibly rank-deficient factors (as K-FAC factors of small batches)."""
    G, din, dout = draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    has_bias = draw(st.booleans())
    folded = has_bias and draw(st.booleans())
    g = _gen(draw(cst.seeds()))
    sA, sB = 10.0 ** draw(st.integers(-2, 2)), 10.0 ** draw(st.integers(-2, 2))
    rd = draw(st.booleans())
    A = _psd(g, G, din + folded, sA, rd)
    B = _psd(g, G, dout, sB, rd)
    if G == 1:
        A, B = A[0], B[0]
    return KronFactor(A, B, (G * dout, din), has_bias, folded)


def _grp(M):
    return M if M.ndim == 3 else M[None]


def folded_perm(G, o, din):
    """Index map from the augmented row-major order (g, r, i), i = din meaning the bias, to
    [vec_r(W); b]."""
    d = din + 1
    w = [(g * o + r) * d + i for g in range(G) for r in range(o) for i in range(din)]
    b = [(g * o + r) * d + din for g in range(G) for r in range(o)]
    return torch.tensor(w + b)


def dense_of(f, A, B):
    """Dense matrix of a (weight, bias) Kronecker operator with factors A (input), B (output)
    over [vec_r(W); b], built from torch.kron: block-diagonal over groups, the bias block B
    (separate), or the augmented [W b] block permuted (folded)."""
    A, B = _grp(A), _grp(B)
    G, o = B.shape[0], B.shape[-1]
    Mw = torch.block_diag(*[torch.kron(B[g], A[g]) for g in range(G)])
    if f.folded:
        p = folded_perm(G, o, A.shape[-1] - 1)
        return Mw[p][:, p]
    if f.has_bias:
        return torch.block_diag(Mw, torch.block_diag(*B))
    return Mw


def random_grad(f, g):
    W = torch.randn(f.weight_shape, generator=g)
    out = {"weight": W}
    if f.has_bias:
        out["bias"] = torch.randn(f.weight_shape[0], generator=g)
    return out


def vec(grad):
    return torch.cat([grad["weight"].reshape(-1)] + ([grad["bias"].reshape(-1)] if "bias" in grad else []))


def expected_pi_damping(A, B, lam, heuristic="pi", a_diag=False):
    """The GUIDE: π = sqrt((tr A/dim A)/(tr B/dim B)), δ_A = √λ·π, δ_B = √λ/π, each ≥ 1e-7; π
    replaced by 1 when it is 0 or not finite; heuristic "none": δ_A = δ_B = √λ (≥ 1e-7)."""
    root = math.sqrt(lam)
    if heuristic == "none":
        return max(root, 1e-7), max(root, 1e-7)
    trA = float(A.sum()) if a_diag else float(torch.trace(A))
    dimA = A.shape[-1]
    trB, dimB = float(torch.trace(B)), B.shape[-1]
    with torch.no_grad():
        try:
            pi = math.sqrt((trA / dimA) / (trB / dimB))
        except (ZeroDivisionError, ValueError):
            pi = float("nan")
    if not math.isfinite(pi) or pi == 0:
        pi = 1.0
    return max(root * pi, 1e-7), max(root / pi, 1e-7)


# --------------------------------------------------------------------------------------
# dense forms, damped inverses, eigen-decomposition
# --------------------------------------------------------------------------------------
@given(f=kron_factors(), seed=cst.seeds())
def test_to_dense_and_matvec_match_kron(f, seed):
    """to_dense() is kron(B, A) on row-major vec(W) (block-diagonal over groups; with the bias
    block B, or the whole folded block), and matvec(grad) equals it times [vec_r(G_W); g_b]."""
    D = dense_of(f, f.A, f.B)
    close(f.to_dense(include_bias=True), D, "to_dense(include_bias=True)")
    Pw = math.prod(f.weight_shape)
    if not f.folded:
        close(f.to_dense(), D[:Pw, :Pw], "to_dense() (weight block)")
    grad = random_grad(f, _gen(seed))
    close(vec(f.matvec(grad)), D @ vec(grad), "matvec")


@given(f=kron_factors(), lam=st.sampled_from([1e-3, 1e-2, 0.1, 1.0]), heuristic=st.sampled_from(["pi", "none"]),
       seed=cst.seeds())
def test_damped_inverse_is_the_inverse_of_the_damped_factor(f, lam, heuristic, seed):
    """(δ_A, δ_B) = factor.damping(λ) follow the GUIDE formula (per group); to_dense() of
    damped_inverse(λ) times the dense kron(B + δ_B I, A + δ_A I) (and bias block B + δ_B I,
    or the folded block) is the identity; matvec of the inverse equals the dense inverse
    applied to vec(grad)."""
    dA, dB = f.damping(lam, heuristic)
    A, B = _grp(f.A), _grp(f.B)
    G = A.shape[0]
    assert dA.shape == dB.shape == (G,)
    for g in range(G):
        eA, eB = expected_pi_damping(A[g], B[g], lam, heuristic)
        close(dA[g], torch.tensor(eA), "δ_A")
        close(dB[g], torch.tensor(eB), "δ_B")
    eyeA, eyeB = torch.eye(A.shape[-1]), torch.eye(B.shape[-1])
    Ad = A + dA[:, None, None] * eyeA
    Bd = B + dB[:, None, None] * eyeB
    Dd = dense_of(f, Ad, Bd)
    inv = f.damped_inverse(lam, heuristic)
    Di = inv.to_dense(include_bias=True)
    close(Di @ Dd, torch.eye(Dd.shape[0]), "inverse · damped factor", rtol=1e-9, atol=1e-9)
    grad = random_grad(f, _gen(seed))
    close(vec(inv.matvec(grad)), torch.linalg.solve(Dd, vec(grad)), "inverse matvec", rtol=1e-8, atol=1e-9)


@given(f=kron_factors())
def test_eigenvalues_of_kron_are_outer_products(f):
    """eig(kron(B, A)) = {λ_B[o]·λ_A[i]}: eigh().eigenvalues() equals outer(eigvalsh(B),
    eigvalsh(A)) at o·d_in + i (per group) and, sorted, eigvalsh of the dense kron; the
    eigenvectors kron(Q_B, Q_A) diagonalise it and the eigen form reconstructs to_dense()."""
    e = f.eigh()
    lam = e.eigenvalues()
    A, B = _grp(f.A), _grp(f.B)
    QA, QB = _grp(e.QA), _grp(e.QB)
    for g in range(A.shape[0]):
        K = torch.kron(B[g], A[g])
        expected = torch.outer(torch.linalg.eigvalsh(B[g]), torch.linalg.eigvalsh(A[g])).reshape(-1)
        close(lam[g], expected, "eigenvalues = outer(λ_B, λ_A)")
        close(lam[g].sort().values, torch.linalg.eigvalsh(K), "sorted eigenvalues of kron(B, A)")
        Q = torch.kron(QB[g], QA[g])
        close(K @ Q, Q * lam[g], "kron(Q_B, Q_A) are eigenvectors")
    close(e.to_dense(include_bias=True), f.to_dense(include_bias=True), "eigen form reconstructs")


@given(A=st.lists(st.sampled_from([0.0, 1e-3, 1.0, 5.0]), min_size=1, max_size=4),
       B=st.lists(st.sampled_from([0.0, 1e-3, 1.0, 5.0]), min_size=1, max_size=4),
       lam=st.sampled_from([0.0, 1e-20, 1e-14, 1e-4, 1.0, 100.0]), heuristic=st.sampled_from(["pi", "none"]))
def test_pi_damping_formula_fallback_and_floor(A, B, lam, heuristic):
    """π-damping on diagonal factors covering π = 0 (tr A = 0), π = ∞ (tr B = 0), π = NaN
    (both 0), the 1e-7 floor (λ = 0, tiny λ, or √λ/π below 1e-7) and heuristic="none"."""
    Am, Bm = torch.diag(torch.tensor(A)), torch.diag(torch.tensor(B))
    eA, eB = expected_pi_damping(Am, Bm, lam, heuristic)
    dA, dB = pi_damping(Am, Bm, lam, heuristic)
    close(dA, torch.tensor(eA), "δ_A")
    close(dB, torch.tensor(eB), "δ_B")
    f = KronFactor(Am, Bm, (len(B), len(A)), False, False)
    fa, fb = f.damping(lam, heuristic)
    close(fa.reshape(()), torch.tensor(eA), "KronFactor.damping δ_A")
    close(fb.reshape(()), torch.tensor(eB), "KronFactor.damping δ_B")


def test_pi_damping_cases_by_hand():
    """Hand-computed: tr A/dim A = 4, tr B/dim B = 1 → π = 2, λ = 0.01: δ_A = 0.2, δ_B = 0.05;
    A = 0 → π falls back to 1; λ = 1e-16 → both at the 1e-7 floor; π = 2e8 → δ_B floored."""
    A, B = torch.diag(torch.tensor([2.0, 6.0])), torch.eye(3)
    dA, dB = pi_damping(A, B, 0.01)
    close(dA, torch.tensor(0.2), "δ_A")
    close(dB, torch.tensor(0.05), "δ_B")
    dA, dB = pi_damping(torch.zeros(2, 2), B, 0.01)
    close(dA, torch.tensor(0.1), "fallback δ_A")
    close(dB, torch.tensor(0.1), "fallback δ_B")
    dA, dB = pi_damping(A, torch.zeros(3, 3), 0.01)
    close(dA, torch.tensor(0.1), "fallback δ_A (π = ∞)")
    dA, dB = pi_damping(A, B, 1e-16)
    close(dA, torch.tensor(2e-8).clamp_min(1e-7), "floor δ_A")
    close(dB, torch.tensor(1e-7), "floor δ_B")
    dA, dB = pi_damping(4e16 * torch.eye(2), B, 1e-4)
    close(dA, torch.tensor(2e8 * 1e-2), "large π δ_A")
    close(dB, torch.tensor(1e-7), "large π: δ_B floored")


@given(V=st.integers(1, 5), D=st.integers(1, 3), lam=st.sampled_from([1e-3, 0.1, 1.0]), seed=cst.seeds())
def test_embedding_damped_inverse(V, D, lam, seed):
    """EmbeddingFactor: A is the diagonal of token frequencies (tr A = Σ A, dim A = V)."""
    g = _gen(seed)
    A = torch.rand(V, generator=g) * (torch.rand(V, generator=g) > 0.3)
    B = _psd(g, 1, D, 1.0, False)[0]
    f = curvfun.EmbeddingFactor(A, B)
    close(f.to_dense(), torch.kron(torch.diag(A), B), "embedding to_dense")
    eA, eB = expected_pi_damping(A, B, lam, a_diag=True)
    Dd = torch.kron(torch.diag(A + eA), B + eB * torch.eye(D))
    inv = f.damped_inverse(lam)
    close(inv.to_dense() @ Dd, torch.eye(V * D), "embedding inverse · damped", rtol=1e-9, atol=1e-9)
    grad = {"weight": torch.randn(V, D, generator=g)}
    close(inv.matvec(grad)["weight"].reshape(-1), torch.linalg.solve(Dd, grad["weight"].reshape(-1)),
          "embedding inverse matvec", rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("kind", ["kron", "embedding"])
def test_to_dense_does_not_depend_on_memory_layout(kind):
    X = torch.randn(3, 3, generator=_gen(0))
    A = X @ X.T + torch.eye(3)
    B = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    Bt = B.T.contiguous().T  # the same symmetric matrix, stored column-major
    if kind == "kron":
        f = KronFactor(A, Bt, (2, 3), True, False)
        expected = torch.block_diag(torch.kron(B, A), B)
        close(f.to_dense(include_bias=True), expected, "to_dense with a column-major B")
    else:
        f = curvfun.EmbeddingFactor(torch.tensor([1.0, 2.0, 0.5]), Bt)
        close(f.to_dense(), torch.kron(torch.diag(f.A), B), "embedding to_dense with a column-major B")


@given(C=st.integers(1, 4), p=st.integers(1, 2), lam=st.sampled_from([1e-3, 0.1, 1.0]), seed=cst.seeds())
def test_unitwise_and_diag_damped_inverse(C, p, lam, seed):
    """Unit-wise blocks and diagonal factors: plain Tikhonov (block_c + λI)^{-1}."""
    g = _gen(seed)
    blocks = _psd(g, C, p, 1.0, False)
    f = curvfun.UnitWiseFactor(blocks, (C,), p == 2)
    D = f.to_dense()
    inv = f.damped_inverse(lam)
    close(inv.to_dense() @ (D + lam * torch.eye(C * p)), torch.eye(C * p), "unit-wise inverse", rtol=1e-9, atol=1e-9)
    d = f.diag()
    close(d.damped_inverse(lam).to_dense() @ (d.to_dense() + lam * torch.eye(C * p)), torch.eye(C * p), "diag inverse")


@given(data=st.data())
def test_ekfac_damped_inverse_inverts_damped_ekfac(data):
    """EKFAC: damped_inverse(λ).to_dense() · (to_dense() + λI) = I (Q is orthogonal)."""
    case = data.draw(cst.mlps(min_out=2))
    x, y = data.draw(cst.batches(case, "cross_entropy", max_n=3))
    lam = data.draw(st.sampled_from([1e-3, 0.1, 1.0]))
    model = case.model
    ek = curvfun.ekfac(model, dict(model.named_parameters()), x, y, fisher_type="exact")
    for name, e in ek.items():
        D = e.to_dense(include_bias=True)
        close(e.damped_inverse(lam).to_dense(include_bias=True) @ (D + lam * torch.eye(D.shape[0])),
              torch.eye(D.shape[0]), f"{name}: EKFAC inverse", rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------
# damping errors
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-1.0, -1e-12, float("nan"), float("inf")])
def test_negative_or_non_finite_damping_raises(bad):
    f = KronFactor(torch.eye(2), torch.eye(3), (3, 2), True, False)
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        f.damped_inverse(bad)
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        curvfun.EmbeddingFactor(torch.ones(2), torch.eye(2)).damped_inverse(bad)
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        curvfun.UnitWiseFactor(torch.eye(2).expand(3, 2, 2).clone(), (3,), True).damped_inverse(bad)


def test_unknown_damping_heuristic_raises():
    f = KronFactor(torch.eye(2), torch.eye(3), (3, 2), False, False)
    with pytest.raises(ValueError, match="unknown damping heuristic 'tikhonov'"):
        f.damped_inverse(0.1, heuristic="tikhonov")


@pytest.mark.parametrize("which", ["A", "B"])
@pytest.mark.parametrize("how", ["negative", "nan", "inf"])
def test_factor_not_pd_after_damping_raises(which, how):
    """Indefinite (eigenvalue −5, damping 1e-2) or non-finite factors: NotPositiveDefiniteError
    naming the factor, even after the float64 retry."""
    bad = {"negative": -5 * torch.eye(2), "nan": torch.full((2, 2), float("nan")),
           "inf": torch.tensor([[float("inf"), 0.0], [0.0, 1.0]])}[how]
    A, B = (bad, torch.eye(2)) if which == "A" else (torch.eye(2), bad)
    f = KronFactor(A, B, (2, 2), False, False)
    side = "input factor A" if which == "A" else "output factor B"
    with pytest.raises(curvfun.NotPositiveDefiniteError, match=f"damped {side} is not positive definite"):
        f.damped_inverse(1e-4, heuristic="none")
    assert issubclass(curvfun.NotPositiveDefiniteError, torch.linalg.LinAlgError)
    assert not issubclass(curvfun.NotPositiveDefiniteError, ValueError)  # argument errors are never caught as it


def test_float32_factor_falls_back_to_float64_cholesky():
    """A float32 factor whose damped Cholesky fails in float32 (1e3·[[1, 1], [1, 1]] + 1e-7·I:
    the 1e-7 is lost in float32) is inverted in float64 and returned as float32 (relative
    1e-5 of the float64 inverse; the matrix has condition number 2e10)."""
    A = 1e3 * torch.ones(2, 2, dtype=torch.float32)
    B = torch.eye(3, dtype=torch.float32)
    assert int(torch.linalg.cholesky_ex(A + 1e-7 * torch.eye(2, dtype=torch.float32))[1]) != 0
    inv = KronFactor(A, B, (3, 2), False, False).damped_inverse(0.0, heuristic="none")
    assert inv.A_inv.dtype == torch.float32
    expected = torch.linalg.inv(A.double() + 1e-7 * torch.eye(2, dtype=torch.float64))
    close(inv.A_inv.double(), expected, "float64 fallback inverse", rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# factor objects: immutable pytrees
# --------------------------------------------------------------------------------------
@given(f=kron_factors())
def test_factor_objects_are_immutable_optree_nodes(f):
    leaves, spec = optree.tree_flatten(f, namespace="curvfun")
    assert len(leaves) == 2 and leaves[0] is f.A and leaves[1] is f.B
    doubled = optree.tree_map(lambda t: 2 * t, f, namespace="curvfun")
    assert type(doubled) is KronFactor and doubled.folded == f.folded and doubled.has_bias == f.has_bias
    close(doubled.to_dense(include_bias=True), dense_of(f, 2 * f.A, 2 * f.B), "tree_map(2·) of a factor")
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.A = f.B


# --------------------------------------------------------------------------------------
# invariances
# --------------------------------------------------------------------------------------
def _leaves(f):
    return optree.tree_leaves(f, namespace="curvfun")


def assert_same_factors(a, b, what, keys=None):
    keys = list(b) if keys is None else keys
    assert set(a) == set(keys), f"{what}: modules {sorted(a)} != {sorted(keys)}"
    for k in keys:
        assert type(a[k]) is type(b[k]), f"{what}: {k}"
        la, lb = _leaves(a[k]), _leaves(b[k])
        assert len(la) == len(lb)
        for x, y in zip(la, lb):
            close(x, y, f"{what}: {k}")


@pytest.mark.parametrize("fisher_type", ["exact", "emp", "mc"])
@given(data=st.data())
def test_factors_do_not_depend_on_params_order(fisher_type, data):
    """The same params in a shuffled insertion order give the same factors (MC: with the
    same generator seed)."""
    case = data.draw(cst.models(min_out=2))
    x, y = data.draw(cst.batches(case, "cross_entropy", max_n=3))
    model = case.model
    names = [n for n, _ in model.named_parameters()]
    order = data.draw(st.permutations(names))
    p1 = {n: p for n, p in model.named_parameters()}
    p2 = {n: p1[n] for n in order}
    seed = data.draw(cst.seeds())
    bias = data.draw(st.sampled_from(["separate", "folded"]))
    kw = dict(fisher_type=fisher_type, bias=bias, on_unsupported="ignore")
    a = curvfun.kfac(model, p1, x, y, generator=_gen(seed), **kw)
    b = curvfun.kfac(model, p2, x, y, generator=_gen(seed), **kw)
    assert_same_factors(b, a, "shuffled params")


def _module_of(name):
    return name.rsplit(".", 1)[0] if "." in name else ""


@given(data=st.data())
def test_excluded_modules_are_absent_and_others_unchanged(data):
    """params restricted to a drawn subset: modules with no parameter in params get no factor;
    every other supported module gets the same A, B (separate bias) as with all params, and
    its unit-wise blocks restricted to the parameters present."""
    case = data.draw(cst.models(min_out=2))
    x, y = data.draw(cst.batches(case, "cross_entropy", max_n=3))
    model = case.model
    full = dict(model.named_parameters())
    sub = data.draw(cst.params_of(model, subset=True, shuffle=True, new_values=False))
    kw = dict(fisher_type="exact", on_unsupported="ignore")
    a = curvfun.kfac(model, full, x, y, **kw)
    b = curvfun.kfac(model, sub, x, y, **kw)
    kept = {_module_of(n) for n in sub}
    assert set(b) == {m for m in a if m in kept}
    for m, f in b.items():
        if isinstance(f, curvfun.UnitWiseFactor):  # the full blocks restricted to the parameters present
            roles = [r for r, on in (("weight", a[m].has_weight), ("bias", a[m].has_bias)) if on]
            keep = [i for i, r in enumerate(roles) if f"{m}.{r}" in sub]
            close(f.blocks, a[m].blocks[:, keep][:, :, keep], f"{m}: unit blocks over {[roles[i] for i in keep]}")
        else:
            close(f.A, a[m].A, f"{m}: A")
            close(f.B, a[m].B, f"{m}: B")
        assert getattr(f, "has_bias", True) == (f"{m}.bias" in sub) or isinstance(f, curvfun.EmbeddingFactor)


class MLP(nn.Module):
    """Linear → ReLU → Linear → ReLU → Linear with residual ``out += h`` in the middle (d → d)."""

    def __init__(self, d, C, inplace):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, C)
        self.act = nn.ReLU(inplace=inplace)
        self.inplace = inplace

    def forward(self, x):
        h = self.act(self.fc1(x))
        out = self.fc2(h)
        if self.inplace:
            out += h
        else:
            out = out + h
        return self.fc3(self.act(out))


class ConvBlock(nn.Module):
    """ResNet-style ``conv → BN → ReLU → conv → BN; out += identity; ReLU`` then a head."""

    def __init__(self, c, C, inplace):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=inplace)
        self.head = nn.Linear(c * 9, C)
        self.inplace = inplace

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.inplace:
            out += x
        else:
            out = out + x
        return self.head(self.relu(out).flatten(1))


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@settings(max_examples=max(3, settings.default.max_examples // 2))
@given(d=st.integers(1, 2), C=st.integers(2, 3), n=st.integers(1, 3), seed=cst.seeds())
def test_inplace_activations_and_inplace_residuals_change_nothing(kind, d, C, n, seed):
    """``nn.ReLU(inplace=True)`` and ``out += identity`` residuals give the same K-FAC
    (exact or MC / separate, and empirical / folded), EKFAC and per-sample gradients as the same
    model written out of place, and leave no hook on the model."""
    g = _gen(seed)
    if kind == "mlp":
        a, b = MLP(d, C, True), MLP(d, C, False)
        x = torch.randn(n, d, generator=g)
    else:
        a, b = ConvBlock(d, C, True), ConvBlock(d, C, False)
        x = torch.randn(n, d, 3, 3, generator=g)
    _init(a, seed)
    b.to(torch.float64).load_state_dict(a.state_dict())
    if kind == "conv":
        with torch.no_grad():
            for m in a.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_var.uniform_(0.5, 1.5, generator=g)
                    m.running_mean.normal_(generator=g)
        b.load_state_dict(a.state_dict())
        a.eval(), b.eval()
    y = torch.randint(0, C, (n,), generator=g)
    torch.testing.assert_close(a(x.clone()), b(x))
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    # exact Fisher for the MLP; for the conv block the MC Fisher with the same generator seed
    # (one column: the exact one's batched backward is slow for BatchNorm + conv on CPU)
    first = dict(fisher_type="exact") if kind == "mlp" else dict(fisher_type="mc")
    for fn, kw in ((curvfun.kfac, first), (curvfun.kfac, dict(fisher_type="emp", bias="folded")),
                   (curvfun.ekfac, dict(fisher_type="emp"))):
        fa = fn(a, pa, x.clone(), y, generator=_gen(seed), **kw)
        fb = fn(b, pb, x, y, generator=_gen(seed), **kw)
        assert_same_factors(fa, fb, f"{fn.__name__}({kw}) in-place vs out-of-place")
    checks.assert_close_trees(curvfun.per_sample_grads(a, pa, x.clone(), y), curvfun.per_sample_grads(b, pb, x, y),
                              rtol=RTOL, atol=ATOL, what="per-sample grads in-place vs out-of-place")
    checks.assert_close_trees(curvfun.per_sample_grads(a, pa, x.clone(), y), ref.per_sample_grads(b, pb, x, y),
                              rtol=RTOL, atol=ATOL, what="per-sample grads vs reference")
    assert all(not m._forward_hooks for m in a.modules()), "a hook was left on the model"


class ModifiesLayerInput(nn.Module):
    """``h += fc(h)``: modifies the input of ``fc`` in place after fc used it (autograd rejects
    this too when fc's weight requires grad)."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(x)
        h += self.fc(h)
        return self.head(h)


def test_modifying_a_layer_input_in_place_is_a_clear_error():
    model = _init(ModifiesLayerInput(), 0)
    x, y = torch.randn(4, 3, generator=_gen(0)), torch.tensor([0, 1, 0, 1])
    with pytest.raises(RuntimeError, match="the input of module 'fc' was modified in place"):
        curvfun.kfac(model, dict(model.named_parameters()), x, y, fisher_type="exact")
    assert not model.fc._forward_hooks


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------
def _small():
    model = _init(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), 0)
    return model, dict(model.named_parameters()), torch.randn(3, 3, generator=_gen(0)), torch.tensor([0, 1, 1])


@pytest.mark.parametrize("fn", [curvfun.kfac, curvfun.ekfac])
@pytest.mark.parametrize("kw, match", [
    (dict(kfac_type="expanded"), r"unknown kfac_type 'expanded'; expected one of \('expand', 'reduce'\)"),
    (dict(bias="fold"), r"unknown bias mode 'fold'; expected one of \('separate', 'folded'\)"),
    (dict(fisher_type="ggn"), r"unknown fisher_type 'ggn'; expected one of \('exact', 'mc', 'emp'\)"),
    (dict(fisher_type="emp", targets=None), r"fisher_type='emp' needs the data targets"),
    (dict(fisher_type="mc", n_mc_samples=0), r"n_mc_samples must be at least 1, got 0"),
])
def test_bad_arguments_raise_with_a_clear_message(fn, kw, match):
    model, params, x, y = _small()
    args = dict(targets=y)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        fn(model, params, x, **args)


def test_kron_factors_from_layer_validates_its_modes():
    from curvfun.capture import capture
    from curvfun.kron_math import kron_factors_from_layer
    from curvfun.layers import layer_data

    model, params, x, y = _small()
    cap = capture(model, params, x, y, fisher_type="emp")
    data = layer_data(cap.layers["0"], cap.weights)
    with pytest.raises(ValueError, match="unknown kfac_type 'bogus'"):
        kron_factors_from_layer(data, kfac_type="bogus")
    with pytest.raises(ValueError, match="unknown bias mode 'bogus'"):
        kron_factors_from_layer(data, bias="bogus")
