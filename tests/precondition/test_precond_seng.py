"""SengGradientMaker and curvfun.seng_math: its stated formula computed densely in float64 (per-sample
gradients by an autograd loop, the same sketch indices), training, README loop, resume, bad input."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn

from curvfun.precondition import PreconditioningConfig
from curvfun.precondition.seng import SengGradientMaker
from curvfun.seng_math import seng_direction, sketched_gram, sketched_products, truncate_positions
from digits_helper import train_digits
from maker_checks import check_resume_bit_exact, run_readme_loop


pytestmark = pytest.mark.usefixtures("one_thread")


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 5, 2)  # 3x3 -> 2x2: T = 4
        self.fc = nn.Linear(20, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def mlp():
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))


def data(N, conv, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 2, 3, 3, generator=g) if conv else torch.randn(N, 6, generator=g)
    return x, torch.randint(0, 4, (N,), generator=g)


def per_sample_matrices(model, x, t, name):
    """Per-sample gradients of [W | b] of layer ``name`` as [N, d_out, d_in + 1] (autograd loop)."""
    m = model.get_submodule(name)
    out = []
    for n in range(len(t)):
        gw, gb = torch.autograd.grad(F.cross_entropy(model(x[n:n + 1]), t[n:n + 1]), [m.weight, m.bias])
        out.append(torch.cat([gw.reshape(gw.shape[0], -1), gb[:, None]], 1))
    return torch.stack(out)


def truncated_conv_matrices(model, x, t, rank):
    """The conv layer's truncated per-sample gradients X_n V_r V_rᵀ Y_nᵀ, by hand."""
    conv = model.conv
    out = []
    for n in range(len(t)):
        z = conv(x[n:n + 1])
        loss = F.cross_entropy(model.fc(torch.tanh(z).flatten(1)), t[n:n + 1])
        X = torch.autograd.grad(loss, z)[0][0].reshape(z.shape[1], -1)  # [d_out, T]
        patches = F.unfold(x[n:n + 1], 2)[0]  # [d_in, T]
        Y = torch.cat([patches, torch.ones(1, patches.shape[1])])
        V = torch.linalg.svd(X, full_matrices=False)[2][:rank].T
        out.append(X @ V @ V.T @ Y.T)
    return torch.stack(out)


def stated_formula(M, gbar, idx_out, idx_in, lam):
    """(1/λ)(ḡ − (1/N) Uᵀ (c U_S U_Sᵀ/N + λI)^{-1} c U_S ḡ_S) with U rows vec(M_n), S = I x J."""
    N, d_out, d_in = M.shape
    I = torch.arange(d_out) if idx_out is None else idx_out
    J = torch.arange(d_in) if idx_in is None else idx_in
    c = d_out / len(I) * d_in / len(J)
    U = M.reshape(N, -1)
    cols = (I[:, None] * d_in + J[None, :]).flatten()
    US, gS = U[:, cols], gbar.flatten()[cols]
    w = torch.linalg.solve(c * US @ US.T / N + lam * torch.eye(N), c * US @ gS)
    return (gbar - (U.T @ w / N).reshape(d_out, d_in)) / lam


def layer_grad(model, name):
    m = model.get_submodule(name)
    return torch.cat([m.weight.grad.reshape(m.weight.shape[0], -1), m.bias.grad[:, None]], 1)


def step(gm, model, x, t):
    model.zero_grad()
    y = gm.setup_model_call(model, x)
    gm.setup_loss_call(F.cross_entropy, y, t)
    return gm.forward_and_backward()


@pytest.mark.parametrize("sketching_size", [3, 256])
def test_mlp_equals_stated_formula_on_curvature_and_reuse_steps(sketching_size):
    torch.manual_seed(0)
    model = mlp()
    lam = 0.2
    config = PreconditioningConfig(damping=lam, preconditioner_upd_interval=2, seed=4)
    gm = SengGradientMaker(model, config, sketching_size=sketching_size)
    (x0, t0), (x1, t1) = data(8, False), data(8, False, seed=2)
    Ms = {name: per_sample_matrices(model, x0, t0, name) for name in ("0", "2")}
    step(gm, model, x0, t0)
    for name, M in Ms.items():
        c = gm.curvature[name]
        if sketching_size >= 7:
            assert c["idx_out"] is None and c["idx_in"] is None
            # no sketch, no truncation: exactly the layer-wise damped empirical natural gradient
            U = M.reshape(len(M), -1)
            exact = torch.linalg.solve(U.T @ U / len(U) + lam * torch.eye(U.shape[1]), U.mean(0))
            assert torch.allclose(layer_grad(model, name).flatten(), exact, rtol=1e-8, atol=1e-10)
        want = stated_formula(M, M.mean(0), c["idx_out"], c["idx_in"], lam)
        assert torch.allclose(layer_grad(model, name), want, rtol=1e-8, atol=1e-10), name
    # step 1 is no curvature step: step 0's factors and sketch with step 1's gradient
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    g1 = {name: per_sample_matrices(model, x1, t1, name).mean(0) for name in Ms}
    step(gm, model, x1, t1)
    for name, M in Ms.items():
        c = gm.curvature[name]
        want = stated_formula(M, g1[name], c["idx_out"], c["idx_in"], lam)
        assert torch.allclose(layer_grad(model, name), want, rtol=1e-8, atol=1e-10), name


def test_conv_truncation_and_sketch_equal_stated_formula():
    torch.manual_seed(0)
    model = ConvNet()
    lam = 0.1
    gm = SengGradientMaker(model, PreconditioningConfig(damping=lam, seed=1), sketching_size=4, truncated_rank=2)
    x, t = data(6, True)
    Mconv = truncated_conv_matrices(model, x, t, 2)
    gbar = per_sample_matrices(model, x, t, "conv").mean(0)  # the plain mean gradient (untruncated)
    Mfc = per_sample_matrices(model, x, t, "fc")
    step(gm, model, x, t)
    c = gm.curvature["conv"]
    assert c["X"].shape == (6, 5, 2) and c["idx_out"].numel() == 4 and c["idx_in"].numel() == 4
    want = stated_formula(Mconv, gbar, c["idx_out"], c["idx_in"], lam)
    assert torch.allclose(layer_grad(model, "conv"), want, rtol=1e-8, atol=1e-10)
    c = gm.curvature["fc"]
    assert torch.allclose(layer_grad(model, "fc"), stated_formula(Mfc, Mfc.mean(0), c["idx_out"], c["idx_in"], lam),
                          rtol=1e-8, atol=1e-10)


@given(N=st.integers(2, 5), r=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_exact_final_product_differs_from_asdl_surrogate(N, r, seed):
    """Σ_n w_n X_n Y_nᵀ (curvfun) vs ASDL's (Σ √|w_n| X_n)(Σ w_n/Σ√|w_m| Y_n)ᵀ: equal only for N = 1."""
    g = torch.Generator().manual_seed(seed)
    X, Y, w = torch.randn(N, 3, r, generator=g), torch.randn(N, 4, r, generator=g), torch.randn(N, generator=g)
    G = torch.zeros(3, 4)
    exact = -seng_direction(G, X, Y, w, 1.0) * N
    assert torch.allclose(exact, torch.einsum("n,nir,njr->ij", w, X, Y), atol=1e-12)
    root = w.abs().sqrt()
    asdl = torch.einsum("n,nir->ir", root, X) @ torch.einsum("n,njr->jr", w / root.sum(), Y).T
    assert not torch.allclose(asdl, exact, atol=1e-6)
    one = torch.einsum("n,nir->ir", root[:1], X[:1]) @ torch.einsum("n,njr->jr", w[:1] / root[:1].sum(), Y[:1]).T
    assert torch.allclose(one, w[0] * X[0] @ Y[0].T, atol=1e-12)


@given(N=st.integers(1, 4), T=st.integers(1, 5), rank=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_sketched_quantities_match_column_subsets(N, T, rank, seed):
    g = torch.Generator().manual_seed(seed)
    X, Y = truncate_positions(torch.randn(N, 3, T, generator=g), torch.randn(N, 5, T, generator=g), rank)
    assert X.shape[2] == min(rank, 3, T) if rank < T else X.shape[2] == T
    I, J = torch.tensor([0, 2]), torch.tensor([1, 3, 4])
    U = torch.einsum("nir,njr->nij", X, Y).reshape(N, -1)
    cols = (I[:, None] * 5 + J[None, :]).flatten()
    c = 3 / 2 * 5 / 3
    assert torch.allclose(sketched_gram(X, Y, I, J), c * U[:, cols] @ U[:, cols].T, atol=1e-10)
    G = torch.randn(3, 5, generator=g)
    assert torch.allclose(sketched_products(X, Y, G, I, J), c * U[:, cols] @ G.flatten()[cols], atol=1e-10)


def test_trains_digits():
    """SGD lr 0.1, damping 1.0, sketching_size 32 (both layers sketched), every step."""
    acc = train_digits(
        lambda m: (torch.optim.SGD(m.parameters(), lr=0.1),
                   SengGradientMaker(m, PreconditioningConfig(damping=1.0, seed=0), sketching_size=32)),
        dtype=torch.float32,
    )
    assert acc >= 0.90, acc


def test_readme_loop():
    torch.manual_seed(0)
    x, t = data(16, True)
    ns = run_readme_loop("SengGradientMaker", ConvNet, [(x, t)] * 6)
    assert ns["gm"].step == 6 and set(ns["gm"].factor) == {"conv", "fc"}


def test_resume_is_bit_exact():
    config = PreconditioningConfig(damping=0.1, preconditioner_upd_interval=2, seed=2)
    check_resume_bit_exact(ConvNet, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                           lambda m: SengGradientMaker(m, config, sketching_size=3, truncated_rank=2),
                           [data(8, True, seed=s) for s in range(6)], 3)


def test_bad_input():
    model = mlp()
    with pytest.raises(ValueError, match="sketching_size must be a positive int"):
        SengGradientMaker(model, PreconditioningConfig(), sketching_size=0)
    with pytest.raises(ValueError, match="truncated_rank must be a positive int"):
        SengGradientMaker(model, PreconditioningConfig(), truncated_rank=1.5)
    with pytest.raises(ValueError, match="SengGradientMaker needs damping > 0"):
        SengGradientMaker(model, PreconditioningConfig(damping=0.0))
    with pytest.raises(ValueError, match="leave ema_decay=-1"):
        SengGradientMaker(model, PreconditioningConfig(ema_decay=0.5))
