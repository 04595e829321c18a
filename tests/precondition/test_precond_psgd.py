"""KronPsgdGradientMaker, PsgdGradientMaker and curvfun.psgd_math: one factor update against a
hand-computed float64 reference (autograd Hessian-vector product, explicit inverses), training,
README loop, resume, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, strategies as st
from torch import nn

from curvfun.precondition import PreconditioningConfig
from curvfun.precondition.psgd import KronPsgdGradientMaker, PsgdGradientMaker
from curvfun.psgd_math import psgd_full_precondition, psgd_full_update, psgd_precondition, psgd_update
from digits_helper import train_digits
from maker_checks import check_resume_bit_exact, run_readme_loop


pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 2)  # 4x4 -> 3x3
        self.norm = nn.LayerNorm(27)  # not preconditioned (plain gradient)
        self.fc1 = nn.Linear(27, 4)
        self.fc2 = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.fc2(torch.tanh(self.fc1(self.norm(h))))


def batches(n, N=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(N, 2, 4, 4, generator=g), torch.randint(0, 3, (N,), generator=g)) for _ in range(n)]


def autograd_hvp(model, x, t, v: dict) -> dict:
    """H·v of the mean cross-entropy by reverse-over-reverse autograd (the maker uses
    forward-over-reverse torch.func)."""
    params = dict(model.named_parameters())
    g = torch.autograd.grad(F.cross_entropy(model(x), t), list(params.values()), create_graph=True)
    vs = [v.get(k, torch.zeros_like(p)) for k, p in params.items()]
    return dict(zip(params, torch.autograd.grad(g, list(params.values()), vs)))


def reference_update(Ql, Qr, dX, dG, mu):
    """Li's rule with explicit inverses: balance, A = Q_l dG Q_rᵀ, B = Q_l⁻ᵀ dX Q_r⁻¹, triu gradients."""
    rho = (Ql.diagonal().max() / Qr.diagonal().max()).sqrt()
    Ql, Qr = Ql / rho, Qr * rho
    A = Ql @ dG @ Qr.T
    B = torch.linalg.inv(Ql).T @ dX @ torch.linalg.inv(Qr)
    gl, gr = torch.triu(A @ A.T - B @ B.T), torch.triu(A.T @ A - B.T @ B)
    return Ql - mu / gl.abs().max() * gl @ Ql, Qr - mu / gr.abs().max() * gr @ Qr


def as_matrix(w, b):
    W = w.reshape(w.shape[0], -1)
    return W if b is None else torch.cat([W, b[:, None]], 1)


def step(gm, model, x, t):
    model.zero_grad()
    y = gm.setup_model_call(model, x)
    gm.setup_loss_call(F.cross_entropy, y, t)
    return gm.forward_and_backward()


def test_one_update_equals_hand_computed_reference():
    torch.manual_seed(0)
    model = Net()
    mu = 0.3
    gm = KronPsgdGradientMaker(model, PreconditioningConfig(seed=3), precond_lr=mu, init_scale=0.7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (x0, t0), (x1, t1) = batches(2)
    step(gm, model, x0, t0)
    opt.step()
    before = copy.deepcopy(gm.factors)  # non-trivial triangular factors after one update
    params = dict(model.named_parameters())
    plain = dict(zip(params, torch.autograd.grad(F.cross_entropy(model(x1), t1), list(params.values()))))
    layers = {"conv": ("conv.weight", "conv.bias"), "fc1": ("fc1.weight", "fc1.bias"), "fc2": ("fc2.weight", None)}
    step(gm, model, x1, t1)
    assert set(gm.factors) == set(layers) and not gm.pairs_fresh
    # the probe v on the preconditioned weights and biases, zero elsewhere
    v = {}
    for name, (kw, kb) in layers.items():
        dX = gm.pairs[name][0]
        v[kw] = dX[:, : params[kw][0].numel()].reshape(params[kw].shape)
        if kb:
            v[kb] = dX[:, -1]
    hv = autograd_hvp(model, x1, t1, v)
    for name, (kw, kb) in layers.items():
        dX, dG = gm.pairs[name]
        assert torch.allclose(dG, as_matrix(hv[kw], hv[kb] if kb else None), rtol=1e-10, atol=1e-12)
        Ql, Qr = reference_update(*before[name], dX, dG, mu)
        assert torch.allclose(gm.factors[name][0], Ql, rtol=1e-10, atol=1e-13)
        assert torch.allclose(gm.factors[name][1], Qr, rtol=1e-10, atol=1e-13)
        assert torch.equal(torch.triu(Ql), Ql)  # stays upper triangular
        want = Ql.T @ Ql @ as_matrix(plain[kw], plain[kb] if kb else None) @ Qr.T @ Qr
        assert torch.allclose(as_matrix(params[kw].grad, params[kb].grad if kb else None), want, rtol=1e-9, atol=1e-12)
    for k in ("norm.weight", "norm.bias"):
        assert torch.allclose(params[k].grad, plain[k], rtol=1e-12, atol=1e-15)


@given(m=st.integers(1, 4), n=st.integers(1, 4), seed=st.integers(0, 2**16))
@example(m=2, n=1, seed=125)  # Q_r = [[-0.29]]: a negative diagonal (the balancing ρ was NaN)
def test_psgd_update_is_pure_and_reduces_criterion_for_small_steps(m, n, seed):
    """The update leaves its inputs alone and, for a small step, lowers tr(P dG dGᵀ) + tr(P⁻¹ dX dXᵀ)
    (the criterion of the pair, with P = Q_rᵀQ_r ⊗ Q_lᵀQ_l)."""
    g = torch.Generator().manual_seed(seed)
    Ql = torch.triu(torch.randn(m, m, generator=g)) + 2 * torch.eye(m)
    Qr = torch.triu(torch.randn(n, n, generator=g)) + 2 * torch.eye(n)
    dX, dG = torch.randn(m, n, generator=g), torch.randn(m, n, generator=g)
    keep = [Ql.clone(), Qr.clone()]

    def crit(Ql, Qr):
        P = torch.kron(Qr.T @ Qr, Ql.T @ Ql)  # column-major vec
        gx, gg = dX.T.flatten(), dG.T.flatten()
        return gg @ P @ gg + gx @ torch.linalg.solve(P, gx)

    new = psgd_update(Ql, Qr, dX, dG, 1e-4)
    assert torch.equal(Ql, keep[0]) and torch.equal(Qr, keep[1])
    assert crit(*new) <= crit(Ql, Qr) + 1e-12
    G = torch.randn(m, n, generator=g)
    P = torch.kron(Qr.T @ Qr, Ql.T @ Ql)
    assert torch.allclose(psgd_precondition(Ql, Qr, G).T.flatten(), P @ G.T.flatten(), atol=1e-10)


def test_trains_digits():
    """SGD lr 0.05 with the defaults precond_lr=0.01, init_scale=1 (an HVP every step)."""
    acc = train_digits(
        lambda m: (torch.optim.SGD(m.parameters(), lr=0.05), KronPsgdGradientMaker(m, PreconditioningConfig(seed=0))),
        dtype=torch.float32,
    )
    assert acc >= 0.90, acc


def test_readme_loop():
    torch.manual_seed(0)
    x, t = batches(1, N=16)[0]
    ns = run_readme_loop("KronPsgdGradientMaker", Net, [(x, t)] * 8)
    gm = ns["gm"]
    assert gm.step == 8 and not torch.equal(gm.factors["fc1"][0], torch.eye(4))


def test_resume_is_bit_exact():
    config = PreconditioningConfig(seed=5, preconditioner_upd_interval=2, curvature_upd_interval=1)
    # saved between two factor refreshes
    check_resume_bit_exact(Net, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                           lambda m: KronPsgdGradientMaker(m, config, precond_lr=0.1), batches(6), 3)


def test_bad_input():
    model = Net()
    with pytest.raises(ValueError, match=r"precond_lr must be in \(0, 1\]"):
        KronPsgdGradientMaker(model, PreconditioningConfig(), precond_lr=0.0)
    with pytest.raises(ValueError, match=r"precond_lr must be in \(0, 1\]"):
        KronPsgdGradientMaker(model, PreconditioningConfig(), precond_lr=2)
    with pytest.raises(ValueError, match="init_scale must be a finite number > 0"):
        KronPsgdGradientMaker(model, PreconditioningConfig(), init_scale=-1.0)
    with pytest.raises(ValueError, match="psgd_update: dX"):
        psgd_update(torch.eye(2), torch.eye(3), torch.ones(3, 2), torch.ones(3, 2), 0.1)


# ==============================================================================================
# full-matrix PSGD
# ==============================================================================================


def flat_of(d: dict, keys) -> torch.Tensor:
    return torch.cat([d[k].reshape(-1) for k in keys])


FULL_KEYS = ["conv.weight", "conv.bias", "fc1.weight", "fc1.bias", "fc2.weight"]


def test_full_maker_equals_dense_formula():
    """Two steps in float64: the probe pair is (v, H v) with H v by reverse-over-reverse autograd, Q
    follows a = Q dg, b = Q⁻ᵀ dx (explicit inverse), Q − μ/max|∇|·∇Q, and the gradient is QᵀQ g."""
    torch.manual_seed(0)
    model = Net().double()
    mu = 0.2
    gm = PsgdGradientMaker(model, PreconditioningConfig(seed=4), precond_lr=mu, init_scale=0.8)
    assert gm.num_params == sum(dict(model.named_parameters())[k].numel() for k in FULL_KEYS)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    Q = 0.8 * torch.eye(gm.num_params, dtype=torch.float64)
    for x, t in batches(2):
        x = x.double()
        params = dict(model.named_parameters())
        plain = dict(zip(params, torch.autograd.grad(F.cross_entropy(model(x), t), list(params.values()))))
        step(gm, model, x, t)
        dx, dg = gm.pairs["all"]
        sizes = [params[k].numel() for k in FULL_KEYS]
        v = {k: c.reshape(params[k].shape) for k, c in zip(FULL_KEYS, torch.split(dx, sizes))}
        assert torch.allclose(dg, flat_of(autograd_hvp(model, x, t, v), FULL_KEYS), rtol=1e-10, atol=1e-12)
        a, b = Q @ dg, torch.linalg.inv(Q).T @ dx
        grad = torch.triu(torch.outer(a, a) - torch.outer(b, b))
        Q = Q - mu / grad.abs().max() * grad @ Q
        assert torch.allclose(gm.Q, Q, rtol=1e-10, atol=1e-13)
        assert torch.allclose(flat_of({k: p.grad for k, p in params.items()}, FULL_KEYS),
                              Q.T @ Q @ flat_of(plain, FULL_KEYS), rtol=1e-9, atol=1e-12)
        for k in ("norm.weight", "norm.bias"):  # not preconditioned
            assert torch.allclose(params[k].grad, plain[k], rtol=1e-12, atol=1e-15)
        opt.step()
    assert not torch.equal(torch.triu(gm.Q), gm.Q * 0) and torch.equal(torch.triu(gm.Q), gm.Q)


@given(n=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_full_update_is_pure_and_reduces_criterion_for_small_steps(n, seed):
    """For a small step the update lowers dgᵀ P dg + dxᵀ P⁻¹ dx, P = QᵀQ; the inputs stay."""
    g = torch.Generator().manual_seed(seed)
    Q = (torch.triu(torch.randn(n, n, generator=g, dtype=torch.float64)) + 2 * torch.eye(n, dtype=torch.float64))
    dx, dg = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    keep = Q.clone()

    def crit(Q):
        P = Q.T @ Q
        return dg @ P @ dg + dx @ torch.linalg.solve(P, dx)

    new = psgd_full_update(Q, dx, dg, 1e-4)
    assert torch.equal(Q, keep) and torch.equal(torch.triu(new), new)
    assert crit(new) <= crit(Q) + 1e-12
    v = torch.randn(n, generator=g, dtype=torch.float64)
    assert torch.allclose(psgd_full_precondition(Q, v), Q.T @ Q @ v, atol=1e-12)


def test_full_trains_digits():
    """The loss falls on a small learnable task (digits, MLP 64-8-10, P = 610)."""
    def make(m):
        gm = PsgdGradientMaker(m, PreconditioningConfig(seed=0), precond_lr=0.1)
        return torch.optim.SGD(m.parameters(), lr=0.3), gm

    from digits_helper import digits_data

    x, y, _, _ = digits_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10)).to(x.dtype)
    opt, gm = make(model)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        idx = torch.randint(0, len(x), (64,), generator=g)
        opt.zero_grad()
        _, loss = step(gm, model, x[idx], y[idx])
        opt.step()
        losses.append(float(loss))
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10, (losses[:10], losses[-10:])


def test_full_resume_is_bit_exact():
    config = PreconditioningConfig(seed=5, preconditioner_upd_interval=2, curvature_upd_interval=1)
    check_resume_bit_exact(Net, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                           lambda m: PsgdGradientMaker(m, config, precond_lr=0.1), batches(6), 3)


def test_full_guard_and_bad_input():
    model = Net()
    with pytest.raises(ValueError, match=r"PsgdGradientMaker: the model has 151 parameters to precondition, "
                                          r"more than max_params=100; the dense factor Q needs 151² = 22,801"):
        PsgdGradientMaker(model, max_params=100)
    with pytest.raises(ValueError, match="max_params must be a positive int"):
        PsgdGradientMaker(model, max_params=0)
    with pytest.raises(ValueError, match=r"precond_lr must be in \(0, 1\]"):
        PsgdGradientMaker(model, precond_lr=1.5)
    with pytest.raises(ValueError, match="psgd_full_update: Q"):
        psgd_full_update(torch.eye(3), torch.ones(2), torch.ones(2), 0.1)
    from curvfun.memory import CurvfunMemoryError, dense_limit

    with dense_limit(1000), pytest.raises(CurvfunMemoryError, match="PsgdGradientMaker's dense factor Q needs a "
                                                                   "151 x 151"):
        PsgdGradientMaker(model)
    # ASDL's positional signature (model, config, precond_lr, init_scale, use_functorch); config optional
    gm = PsgdGradientMaker(model, None, 0.05, 2.0, True)
    assert gm.precond_lr == 0.05 and torch.equal(gm.Q, 2.0 * torch.eye(151))
