"""curvfun.operators against the dense autograd reference (:mod:`curvfun.testing.reference`) in
float64: every operator's ``to_dense``, block products and ``diag``; scipy's eigsh / cg / lsmr on
``to_scipy()`` against dense answers; the exact-damped K-FAC inverse against ``torch.linalg.inv``;
negative tests with their messages."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import curvfun
from curvfun.operators import (
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    KFACOperator,
    kron_exact_inverse,
)
from curvfun.testing import reference as ref, strategies as cst

LIKELIHOODS = cst.losses()
ANY_LOSS = st.one_of(cst.losses(), st.just(cst.logcosh_loss))


def _close(A, B, what=""):
    scale = max(1.0, float(B.abs().max()))
    torch.testing.assert_close(A, B, rtol=1e-7, atol=1e-9 * scale, msg=lambda m: f"{what}: {m}")


def _mlp(seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5, bias=bias), nn.Tanh(), nn.Linear(5, 3))


def _batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


# --- the model operators equal the dense reference ----------------------------------------


@given(cst.problems(loss=ANY_LOSS, max_n=3))
def test_ggn_operator_equals_reference(pb):
    op = GGNOperator(pb.model, pb.params, pb.inputs, pb.targets, pb.loss)
    _close(op.to_dense(), ref.ggn(*pb.args), "GGN")


def test_ggn_operator_without_formed_output_hessians(monkeypatch):
    """Above the size bound the output Hessian enters by one Hessian-vector product per product."""
    import curvfun.operators as ops

    monkeypatch.setattr(ops, "OUTPUT_HESSIAN_ENTRIES", 0)
    model, (x, y) = _mlp(), _batch()
    params = dict(model.named_parameters())
    for loss in ("cross_entropy", cst.logcosh_loss):
        t = y if loss == "cross_entropy" else torch.randn(6, 3)
        _close(GGNOperator(model, params, x, t, loss).to_dense(), ref.ggn(model, params, x, t, loss), "GGN by products")


class _Cube(torch.autograd.Function):
    """x³ with a backward that is not differentiable (``once_differentiable``) and a forward-mode rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * t


def test_ggn_operator_with_a_backward_that_is_not_differentiable():
    """J v as the transpose of the stored vjp would be wrong through a once_differentiable
    backward (no error): the probe product catches it and forward mode gives the right matrix."""
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(3, 4), nn.Linear(4, 2)
    model = nn.Sequential(lin1, _Lambda(_Cube.apply), lin2)
    params = dict(model.named_parameters())
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    _close(GGNOperator(model, params, x, y).to_dense(), ref.ggn(model, params, x, y), "GGN through once_differentiable")


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@given(cst.problems(loss=LIKELIHOODS, max_n=3))
def test_exact_fisher_operator_equals_reference(pb):
    op = FisherOperator(pb.model, pb.params, pb.inputs, pb.targets, pb.loss, fisher_type="exact")
    _close(op.to_dense(), ref.exact_fisher(*pb.args), "exact Fisher")


@given(cst.problems(loss=ANY_LOSS, max_n=3))
def test_empirical_fisher_operator_equals_reference(pb):
    op = EmpiricalFisherOperator(pb.model, pb.params, pb.inputs, pb.targets, pb.loss)
    _close(op.to_dense(), ref.emp_fisher(*pb.args), "empirical Fisher")


@given(cst.problems(loss=ANY_LOSS, max_n=3))
def test_hessian_operator_equals_reference(pb):
    op = HessianOperator(pb.model, pb.params, pb.inputs, pb.targets, pb.loss)
    _close(op.to_dense(), ref.hessian(*pb.args), "Hessian")


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_mc_fisher_operator_is_the_fixed_sample_fisher(loss):
    """MC Fisher with M samples drawn once = the mean over m of the empirical Fisher at the
    sampled targets y_m (the same generator state draws the same y_m); every product uses the
    same samples (the operator is one fixed matrix)."""
    model, (x, y) = _mlp(), _batch()
    if loss == "mse":
        y = torch.randn(6, 3)
    params = dict(model.named_parameters())
    lik = curvfun.get_likelihood(loss)
    ys = lik.sample(lik.canonical_output(model(x).detach()), 3, torch.Generator().manual_seed(5))
    expected = sum(ref.emp_fisher(model, params, x, ys[m], loss) for m in range(3)) / 3
    op = FisherOperator(model, params, x, y, loss, fisher_type="mc", n_mc_samples=3,
                        generator=torch.Generator().manual_seed(5))
    _close(op.to_dense(), expected, "MC Fisher")
    _close(op.to_dense(), expected, "MC Fisher, second pass")


@settings(deadline=None)
@given(pb=cst.problems(loss=ANY_LOSS, max_n=3), fisher_type=st.sampled_from(["exact", "mc", "emp"]))
def test_ggn_and_fisher_operator_diagonals_equal_their_dense_diagonals(pb, fisher_type):
    """``diag()`` from the capture (no products) is the diagonal of the dense autograd reference: the
    GGN for any loss, the exact and empirical Fisher; the MC Fisher's is that of the reference's
    empirical Fisher at the operator's own sampled targets (drawn from the same generator state)."""
    op = GGNOperator(*pb.args)
    _close(op.diag(), torch.diagonal(ref.ggn(*pb.args)), "GGN diagonal")
    lik = curvfun.get_likelihood(pb.loss)
    if fisher_type != "emp" and not lik.is_likelihood:
        return
    op = FisherOperator(*pb.args, fisher_type=fisher_type, n_mc_samples=2, generator=torch.Generator().manual_seed(3))
    if fisher_type == "mc":
        with torch.no_grad():
            out = pb.model(*pb.inputs) if isinstance(pb.inputs, tuple) else pb.model(pb.inputs)
        ys = lik.sample(lik.canonical_output(out), 2, torch.Generator().manual_seed(3))
        if hasattr(lik, "mask"):  # ignored positions stay ignored
            ys = torch.where(lik.mask(pb.targets), ys, torch.full_like(ys, lik.ignore_index))
        nll = lambda o, t: lik.nll(o, t)  # noqa: E731  (the NLL at the samples: no label smoothing)
        expected = sum(ref.emp_fisher(pb.model, pb.params, pb.inputs, ys[m], nll) for m in range(2)) / 2
    else:
        expected = (ref.exact_fisher if fisher_type == "exact" else ref.emp_fisher)(*pb.args)
    _close(op.diag(), torch.diagonal(expected), f"{fisher_type} Fisher diagonal")


def test_operator_diagonals_over_data_mean_and_sum():
    model, (x, y) = _mlp(), _batch(7)
    params = dict(model.named_parameters())
    data = [(x[:3], y[:3]), (x[3:], y[3:])]
    for reduction in ("mean", "sum"):
        for op in (GGNOperator(model, params, data=data, reduction=reduction),
                   FisherOperator(model, params, data=data, fisher_type="mc", generator=torch.Generator().manual_seed(1),
                                  reduction=reduction)):
            _close(op.diag(), torch.diagonal(op.to_dense()), f"{type(op).__name__} {reduction} diagonal")
    whole = GGNOperator(model, params, x, y)
    _close(GGNOperator(model, params, data=data).diag(), whole.diag(), "mean over batches = the whole batch")


def test_data_iterable_mean_and_sum():
    """data=[batches]: Σ_b N_b M_b / Σ N_b (mean) equals the operator of the whole batch, and
    "sum" is N times it; the MC Fisher draws the same samples on every pass."""
    model, (x, y) = _mlp(), _batch(7)
    params = dict(model.named_parameters())
    data = [(x[:3], y[:3]), (x[3:], y[3:])]
    for cls, R in [(GGNOperator, ref.ggn(model, params, x, y)), (HessianOperator, ref.hessian(model, params, x, y)),
                   (EmpiricalFisherOperator, ref.emp_fisher(model, params, x, y))]:
        _close(cls(model, params, data=data).to_dense(), R, cls.__name__)
        _close(cls(model, params, data=data, reduction="sum").to_dense(), 7 * R, cls.__name__ + " sum")
    v = torch.randn(sum(p.numel() for p in params.values()))
    for gen in (torch.Generator().manual_seed(0), None):  # the same samples on every pass
        op = FisherOperator(model, params, data=data, fisher_type="mc", generator=gen)
        _close(op @ v, op @ v, "MC Fisher over data, repeated product")


def test_products_blocks_transpose_and_dicts():
    model, (x, y) = _mlp(), _batch()
    params = {k: v for k, v in reversed(list(model.named_parameters()))}  # order = insertion order
    op = GGNOperator(model, params, x, y)
    D = ref.ggn(model, params, x, y)
    V = torch.randn(op.shape[0], 4)
    _close(op @ V, D @ V, "block product")
    _close(op.matmul(V[:, 0]), D @ V[:, 0], "vector product")
    assert op.T is op and op.shape == D.shape and op.dtype == torch.float64
    tree = op.unflatten(V[:, 1])
    assert list(tree) == list(params)
    _close(op.flatten(op.matvec(tree)), D @ V[:, 1], "dict product")
    _close(op @ V.float(), (D @ V.float().double()), "float32 input computed in float64")


def test_top_eigenvalues_of_an_operator():
    model, (x, y) = _mlp(), _batch()
    params = dict(model.named_parameters())
    op = GGNOperator(model, params, x, y)
    vals, vecs = curvfun.top_eigenvalues(op, k=3, generator=torch.Generator().manual_seed(0))
    ev = torch.linalg.eigvalsh(ref.ggn(model, params, x, y)).flip(0)[:3]
    _close(vals, ev, "top eigenvalues")
    assert list(vecs[0]) == list(params)


# --- scipy ---------------------------------------------------------------------------------


def test_scipy_eigsh_cg_lsmr_give_the_dense_answers():
    sla = pytest.importorskip("scipy.sparse.linalg")
    model, (x, y) = _mlp(), _batch()
    params = dict(model.named_parameters())
    op = GGNOperator(model, params, x, y)
    D = ref.ggn(model, params, x, y).numpy()
    lo = op.to_scipy()
    assert lo.shape == D.shape and lo.dtype == np.float64
    vals = np.sort(sla.eigsh(lo, k=3, which="LA", return_eigenvectors=False))
    np.testing.assert_allclose(vals, np.linalg.eigvalsh(D)[-3:], rtol=1e-8)
    b = np.random.default_rng(0).standard_normal(D.shape[0])
    damped = sla.aslinearoperator(lo) + 0.1 * sla.aslinearoperator(np.eye(D.shape[0]))
    sol, info = sla.cg(damped, b, rtol=1e-12, maxiter=1000)
    assert info == 0
    np.testing.assert_allclose(sol, np.linalg.solve(D + 0.1 * np.eye(D.shape[0]), b), rtol=1e-6, atol=1e-8)
    sol = sla.lsmr(lo, D @ b, atol=1e-14, btol=1e-14, maxiter=5000)[0]  # least squares: the projection
    np.testing.assert_allclose(D @ sol, D @ b, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(lo @ np.stack([b, 2 * b], 1), D @ np.stack([b, 2 * b], 1), rtol=1e-10, atol=1e-12)


# --- K-FAC ---------------------------------------------------------------------------------


class _WithScale(nn.Module):
    """A Linear network with a root-level parameter no K-FAC factor covers."""

    def __init__(self):
        super().__init__()
        self.net = _mlp()
        self.scale = nn.Parameter(torch.tensor([1.5]))

    def forward(self, x):
        return self.net(x) * self.scale


def _kfac_dense(factors, model, params):
    """Block-diagonal reference from the factors' own dense blocks, in params order."""
    P = sum(p.numel() for p in params.values())
    M = torch.zeros(P, P)
    offs, i = {}, 0
    for k, p in params.items():
        offs[k] = torch.arange(i, i + p.numel())
        i += p.numel()
    for name, f in factors.items():
        keys = [f"{name}.weight", f"{name}.bias"]
        idx = torch.cat([offs[k] for k in keys if k in params])
        M[idx.unsqueeze(1), idx] = f.to_dense(include_bias=True)
    return M, offs


@pytest.mark.parametrize("fisher_type,form", [("exact", "dense"), ("emp", "dense"), ("exact", "auto")])
def test_kfac_operator_blocks_inverse_and_diag(fisher_type, form):
    """form="auto" keeps the 5 x 5 factors of a batch of 2 as their rows (KronRowsFactor)."""
    model, (x, y) = _mlp(), _batch(2 if form == "auto" else 6)
    params = {k: v for k, v in reversed(list(model.named_parameters()))}
    factors = curvfun.kfac(model, params, x, y, fisher_type=fisher_type, form=form)
    op = KFACOperator(factors, model, params)
    M, _ = _kfac_dense(factors, model, params)
    _close(op.to_dense(), M, "K-FAC")
    _close(op.diag(), torch.diagonal(M), "K-FAC diagonal")
    inv = op.inverse(0.1)
    Mi, _ = _kfac_dense({n: f.damped_inverse(0.1) for n, f in factors.items()}, model, params)
    _close(inv.to_dense(), Mi, "π-damped inverse")
    if form == "auto":
        assert any(type(f).__name__ == "KronRowsFactor" for f in factors.values())
    exact = op.inverse(0.1, exact=True)
    _close(exact.to_dense(), torch.linalg.inv(M + 0.1 * torch.eye(M.shape[0])), "exact damped inverse")
    _close(exact.diag(), torch.diagonal(exact.to_dense()), "exact damped inverse diagonal")


class _Tokens(nn.Module):
    """Embedding → LayerNorm → Linear head over token positions: embedding, unit-wise and Kronecker factors."""

    def __init__(self):
        super().__init__()
        self.emb, self.norm, self.head = nn.Embedding(7, 4), nn.LayerNorm(4), nn.Linear(4, 3)

    def forward(self, t):
        return self.head(torch.tanh(self.norm(self.emb(t))))


@pytest.mark.parametrize("case", ["tokens", "conv_transpose"])
def test_kfac_operator_other_factor_types(case):
    """Embedding / unit-wise (LayerNorm) blocks and a transposed convolution's relaid Kronecker
    block: the operator, its diagonal and inverses equal the factors' dense blocks."""
    torch.manual_seed(0)
    if case == "tokens":
        model, x, y = _Tokens(), torch.randint(0, 7, (5, 3)), torch.randint(0, 3, (5, 3))
    else:
        model = nn.Sequential(nn.ConvTranspose2d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
        x, y = torch.randn(4, 2, 3, 3), torch.randint(0, 3, (4,))
    params = dict(model.named_parameters())
    factors = curvfun.kfac(model, params, x, y, fisher_type="exact")
    op = KFACOperator(factors, model, params)
    M, _ = _kfac_dense(factors, model, params)
    _close(op.to_dense(), M, case)
    _close(op.diag(), torch.diagonal(M), case + " diagonal")
    Mi, _ = _kfac_dense({n: f.damped_inverse(0.1) for n, f in factors.items()}, model, params)
    _close(op.inverse(0.1).to_dense(), Mi, case + " π-damped inverse")
    if case == "tokens":
        with pytest.raises(TypeError, match="no exact damped inverse for the EmbeddingFactor of 'emb'; use exact=False"):
            op.inverse(0.1, exact=True)
    else:
        exact = op.inverse(0.1, exact=True)
        _close(exact.to_dense(), torch.linalg.inv(M + 0.1 * torch.eye(M.shape[0])), case + " exact inverse")
        _close(exact.diag(), torch.diagonal(exact.to_dense()), case + " exact inverse diagonal")


@pytest.mark.parametrize("uncovered", ["identity", "zero"])
def test_kfac_operator_uncovered_parameters(uncovered):
    model, (x, y) = _WithScale(), _batch()
    params = {k: v for k, v in model.named_parameters() if k != "scale"} | {"scale": model.scale}
    with pytest.warns(UserWarning, match="no Kronecker factors for"):
        factors = curvfun.kfac(model, params, x, y, fisher_type="exact")
    op = KFACOperator(factors, model, params, uncovered=uncovered)
    D = op.to_dense()
    fill = 1.0 if uncovered == "identity" else 0.0
    assert list(params)[-1] == "scale"
    _close(D[-1], torch.cat([torch.zeros(D.shape[0] - 1), torch.tensor([fill])]), "uncovered row")
    _close(op.diag()[-1:], torch.tensor([fill]), "uncovered diagonal")
    _close(op.inverse(0.1, exact=True).to_dense()[-1, -1:], torch.tensor([fill]), "uncovered block of the inverse")
    with pytest.raises(ValueError, match=r"no K-FAC factor covers \['scale'\]"):
        KFACOperator(factors, model, params, uncovered="raise")


@pytest.mark.parametrize("case", ["linear", "no_bias", "folded", "grouped_conv"])
def test_kron_exact_inverse_equals_dense_inverse(case):
    """(A⊗B + λI)⁻¹ through the eigenbases equals the dense inverse of the damped block
    (weight block kron(B, A) on row-major vec(W); the separate bias block (B + λI)⁻¹)."""
    torch.manual_seed(0)
    if case == "grouped_conv":
        model = nn.Sequential(nn.Conv2d(4, 6, 2, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 4, 3))
        x = torch.randn(5, 4, 3, 3)
    else:
        model = _mlp(bias=case != "no_bias")
        x = torch.randn(6, 4)
    y = torch.randint(0, 3, (x.shape[0],))
    params = dict(model.named_parameters())
    bias = "folded" if case == "folded" else "separate"
    f = curvfun.kfac(model, params, x, y, fisher_type="exact", bias=bias)["0"]
    inv = kron_exact_inverse(f, 0.05)
    D = f.to_dense(include_bias=True)
    _close(inv.to_dense(include_bias=True), torch.linalg.inv(D + 0.05 * torch.eye(D.shape[0])), case)
    grad = {k.split(".")[1]: torch.randn_like(v) for k, v in params.items() if k.startswith("0.")}
    flat = torch.cat([grad[k].reshape(-1) for k in ("weight", "bias") if k in grad])
    out = inv.matvec(grad)
    _close(torch.cat([out[k].reshape(-1) for k in ("weight", "bias") if k in out]),
           torch.linalg.solve(D + 0.05 * torch.eye(D.shape[0]), flat), case + " matvec")


# --- bad input -------------------------------------------------------------------------------


def test_bad_inputs_are_refused_with_the_reason():
    model, (x, y) = _mlp(), _batch()
    params = dict(model.named_parameters())
    op = GGNOperator(model, params, x, y)
    P = op.shape[0]
    with pytest.raises(ValueError, match=rf"is {P} x {P}: x must be \[{P}\] or \[{P}, k\], got shape \(3,\)"):
        op @ torch.zeros(3)
    with pytest.raises(TypeError, match="needs a torch.Tensor, got ndarray; use .to_scipy"):
        op @ np.zeros(P)
    with pytest.raises(TypeError, match="floating-point tensor, got torch.int64"):
        op @ torch.zeros(P, dtype=torch.long)
    with pytest.raises(ValueError, match="expected a dict with the keys of params"):
        op.matvec({"0.weight": torch.zeros(5, 4)})
    with pytest.raises(ValueError, match=r"entry '0.weight' has shape \(4, 5\), the parameter \(5, 4\)"):
        op.matvec({k: torch.zeros(4, 5) if k == "0.weight" else torch.zeros_like(v) for k, v in params.items()})
    with pytest.raises(NotImplementedError, match="no cheap diagonal: use curvfun.fisher / ggn"):
        HessianOperator(model, params, x, y).diag()
    from curvfun.memory import CurvfunMemoryError, dense_limit
    with dense_limit(1000), pytest.raises(CurvfunMemoryError, match=rf"GGNOperator.to_dense\(\) needs a {P} x {P} float64 matrix .* use products"):
        op.to_dense()
    with pytest.raises(ValueError, match="unknown reduction 'avg'"):
        GGNOperator(model, params, x, y, reduction="avg")
    with pytest.raises(ValueError, match="give either inputs .* or data=an iterable"):
        GGNOperator(model, params, x, y, data=[(x, y)])
    with pytest.raises(ValueError, match="give either inputs .* or data=an iterable"):
        GGNOperator(model, params)
    with pytest.raises(ValueError, match="one-shot iterator"):
        GGNOperator(model, params, data=iter([(x, y)]))
    with pytest.raises(ValueError, match=r"data must yield \(inputs, targets\) pairs; batch 0 is a Tensor"):
        GGNOperator(model, params, data=[x]) @ torch.zeros(P)
    with pytest.raises(ValueError, match="unknown fisher_type 'full'"):
        FisherOperator(model, params, x, y, fisher_type="full")
    with pytest.raises(ValueError, match="n_mc_samples must be at least 1, got 0"):
        FisherOperator(model, params, x, y, fisher_type="mc", n_mc_samples=0)
    with pytest.raises(ValueError, match="not a parameter of Sequential"):
        HessianOperator(model, {"w": torch.zeros(2)}, x, y)
    factors = curvfun.kfac(model, params, x, y, fisher_type="exact")
    with pytest.raises(ValueError, match="unknown uncovered 'skip'"):
        KFACOperator(factors, model, params, uncovered="skip")
    with pytest.raises(ValueError, match="factor '7' is not a supported module"):
        KFACOperator({"7": factors["0"]}, model, params)
    with pytest.raises(ValueError, match="damping must be a finite number > 0"):
        kron_exact_inverse(factors["0"], 0.0)
    with pytest.raises(TypeError, match="needs a KronFactor .* got UnitWiseFactor"):
        kron_exact_inverse(curvfun.UnitWiseFactor(torch.eye(2).expand(3, 2, 2)), 0.1)
    with pytest.raises(ValueError, match="needs like= "):
        curvfun.top_eigenvalues(lambda v: v, k=1)
