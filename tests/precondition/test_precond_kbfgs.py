"""KronBfgsGradientMaker and curvfun.kbfgs_math: one update of H_a and H_g against a hand-computed
float64 reference (manual forward, explicit matrix form of BFGS), training, README loop, resume,
bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn

from curvfun.kbfgs_math import bfgs_inverse_update, powell_lm_damping
from curvfun.precondition import PreconditioningConfig
from curvfun.precondition.kbfgs import KronBfgsGradientMaker
from digits_helper import train_digits
from maker_checks import check_resume_bit_exact, run_readme_loop


pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 2)  # 3x3 -> 2x2: T = 4 positions
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def manual(p, x, t):
    """Loss, per-layer inputs as rows [N·T, d_in], pre-activations z and dL/dz, written out by hand."""
    z1 = F.conv2d(x, p["conv.weight"], p["conv.bias"])  # [N, 3, 2, 2]
    if not z1.requires_grad:  # parameters without grad: still differentiate with respect to z
        z1.requires_grad_()
    h = torch.tanh(z1).flatten(1)
    z2 = h @ p["fc.weight"].T + p["fc.bias"]
    loss = F.cross_entropy(z2, t)
    g1, g2 = torch.autograd.grad(loss, [z1, z2], retain_graph=True)
    N = x.shape[0]
    rows1 = F.unfold(x, 2).transpose(1, 2).reshape(N * 4, -1)  # patches in weight.flatten(1) order
    return loss, {
        "conv": dict(rows=rows1, z=z1.detach().permute(0, 2, 3, 1).reshape(-1, 3), g=g1.permute(0, 2, 3, 1).reshape(-1, 3), T=4),
        "fc": dict(rows=h.detach(), z=z2.detach(), g=g2, T=1),
    }


def bfgs_matrix_form(H, s, y):
    rho = 1 / (s @ y)
    I = torch.eye(len(s))
    return (I - rho * torch.outer(s, y)) @ H @ (I - rho * torch.outer(y, s)) + rho * torch.outer(s, s)


def powell_lm_by_hand(H, s, y, mu1, mu2):
    yHy, sty = y @ H @ y, s @ y
    theta = (1 - mu1) * yHy / (yHy - sty) if sty < mu1 * yHy else 1.0
    s = theta * s + (1 - theta) * (H @ y)
    return s, y + mu2 * s


def data(n, N=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(N, 2, 3, 3, generator=g), torch.randint(0, 3, (N,), generator=g)) for _ in range(n)]


def step(gm, model, x, t, **kw):
    model.zero_grad()
    y = gm.setup_model_call(model, x)
    gm.setup_loss_call(F.cross_entropy, y, t, **kw)
    return gm.forward_and_backward()


def test_one_update_equals_hand_computed_reference():
    torch.manual_seed(0)
    model = Net()
    lam, beta, mu1 = 0.05, 0.5, 0.2
    gm = KronBfgsGradientMaker(model, PreconditioningConfig(damping=lam, ema_decay=beta), mu1=mu1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    (x0, t0), (x1, t1) = data(2)
    theta0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    _, L0 = manual(theta0, x0, t0)
    step(gm, model, x0, t0)
    assert gm.H_g == {}  # no B pair yet: the gradient stays plain on the first step
    H_a0 = {}
    for name, d in L0.items():
        rows, T = d["rows"], d["T"]
        A0 = rows.T @ rows / rows.shape[0]
        H_a0[name] = torch.linalg.inv(A0 + math.sqrt(lam / T) * torch.eye(len(A0)))
        # the first BFGS step with the exact pair (s, (A + δ)s) leaves the exact inverse unchanged
        assert torch.allclose(gm.H_a[name], H_a0[name], rtol=1e-9, atol=1e-12), name
    opt.step()
    theta1 = {k: p.detach().clone().requires_grad_() for k, p in model.named_parameters()}
    _, before = manual(theta0, x1, t1)  # the snapshot θ0 on the new mini-batch
    loss1, after = manual(theta1, x1, t1)
    plain = dict(zip(theta1, torch.autograd.grad(loss1, list(theta1.values()))))
    _, loss = step(gm, model, x1, t1)
    assert torch.allclose(loss, loss1, rtol=1e-12)
    for name, d in after.items():
        T = d["T"]
        dA, dB = math.sqrt(lam / T), math.sqrt(lam * T)
        # A side: EMA, then one Hessian-action BFGS step
        rows = d["rows"]
        A1 = (1 - beta) * (L0[name]["rows"].T @ L0[name]["rows"] / L0[name]["rows"].shape[0]) + beta * rows.T @ rows / rows.shape[0]
        s_a = H_a0[name] @ rows.mean(0)
        y_a = (A1 + dA * torch.eye(len(A1))) @ s_a
        H_a = bfgs_matrix_form(H_a0[name], s_a, y_a)
        assert torch.allclose(gm.A[name], A1, rtol=1e-10, atol=1e-13)
        assert torch.allclose(gm.H_a[name], H_a, rtol=1e-9, atol=1e-11), name
        # B side: mean pre-activation change and mean per-sample output-gradient change (mean loss: Σ dL/dz)
        s = d["z"].mean(0) - before[name]["z"].mean(0)
        y = d["g"].sum(0) - before[name]["g"].sum(0)
        s, y = powell_lm_by_hand(torch.eye(3), s, y, mu1, dB)
        H_g = bfgs_matrix_form(torch.eye(3), s, y)
        assert torch.allclose(gm.H_g[name], H_g, rtol=1e-9, atol=1e-11), name
        # the preconditioned gradient
        W = f"{name}.weight"
        Gw = plain[W].reshape(plain[W].shape[0], -1)
        got = model.get_submodule(name).weight.grad.reshape(Gw.shape)
        assert torch.allclose(got, H_g @ Gw @ H_a, rtol=1e-9, atol=1e-12)
        assert torch.allclose(model.get_submodule(name).bias.grad, H_g @ plain[f"{name}.bias"], rtol=1e-9, atol=1e-12)


def test_minibatch_hessian_action_and_sum_loss():
    """y_a = (1/(N·T)) aᵀ(a s) + δ s from the batch once H_a exists; a sum loss gives the same pairs."""
    torch.manual_seed(0)
    (x0, t0), (x1, t1) = data(2)
    runs = []
    for reduction in ("mean", "sum"):
        torch.manual_seed(0)
        model = Net()
        gm = KronBfgsGradientMaker(model, PreconditioningConfig(damping=0.05), minibatch_hessian_action=True)
        step(gm, model, x0, t0, reduction=reduction)
        H0 = {k: v.clone() for k, v in gm.H_a.items()}
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
        step(gm, model, x1, t1, reduction=reduction)
        assert gm.A.keys() == {"conv", "fc"}  # kept from the first step only
        runs.append((H0, gm.H_a, gm.H_g))
        _, L1 = manual(dict(model.named_parameters()), x1, t1)
        for name, d in L1.items():
            rows = d["rows"].detach()
            s = H0[name] @ rows.mean(0)
            y = rows.T @ (rows @ s) / rows.shape[0] + math.sqrt(0.05 / d["T"]) * s
            assert torch.allclose(gm.H_a[name], bfgs_matrix_form(H0[name], s, y), rtol=1e-9, atol=1e-11)
    for a, b in zip(runs[0][2].values(), runs[1][2].values()):
        assert torch.allclose(a, b, rtol=1e-8)


@given(d=st.integers(1, 5), seed=st.integers(0, 2**16), mu1=st.sampled_from([0.1, 0.2, 0.5]))
def test_damped_bfgs_keeps_positive_definite_and_secant(d, seed, mu1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, d, generator=g)
    H = X @ X.T + 0.1 * torch.eye(d)
    s, y = torch.randn(d, generator=g), torch.randn(d, generator=g)  # sᵀy may be negative
    s2, y2 = powell_lm_damping(H, s, y, mu1, 0.01)
    assert s2 @ y2 > 0
    H2 = bfgs_inverse_update(H, s2, y2)
    assert torch.allclose(H2 @ y2, s2, atol=1e-8 * (1 + s2.abs().max()))
    assert torch.linalg.eigvalsh(H2).min() > 0
    assert torch.allclose(H2, bfgs_matrix_form(H, s2, y2), atol=1e-8 * (1 + H2.abs().max()))


def test_trains_digits():
    """SGD lr 0.1, damping 0.1, EMA 0.1 of A; curvature and inverses every step."""
    acc = train_digits(
        lambda m: (torch.optim.SGD(m.parameters(), lr=0.1),
                   KronBfgsGradientMaker(m, PreconditioningConfig(damping=0.1, ema_decay=0.1))),
        dtype=torch.float32,
    )
    assert acc >= 0.90, acc


def test_readme_loop():
    torch.manual_seed(0)
    x, t = data(1, N=16)[0]
    ns = run_readme_loop("KronBfgsGradientMaker", Net, [(x, t)] * 8)
    assert ns["gm"].step == 8 and set(ns["gm"].H_g) == {"conv", "fc"}


def test_resume_is_bit_exact():
    config = PreconditioningConfig(damping=0.05, ema_decay=0.2, preconditioner_upd_interval=2, curvature_upd_interval=1)

    def saved_with_fresh_pair(gm):  # saved with a fresh, unapplied pair and a snapshot
        assert gm.pending_fresh and gm.snapshot

    check_resume_bit_exact(Net, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                           lambda m: KronBfgsGradientMaker(m, config), data(6), 2,
                           before_save=saved_with_fresh_pair)


def test_bad_input():
    model = Net()
    with pytest.raises(ValueError, match=r"mu1 \(Powell's damping threshold\) must be in \(0, 1\)"):
        KronBfgsGradientMaker(model, PreconditioningConfig(), mu1=1.0)
    with pytest.raises(ValueError, match="KronBfgsGradientMaker needs damping > 0"):
        KronBfgsGradientMaker(model, PreconditioningConfig(damping=0.0))
    with pytest.raises(TypeError, match="minibatch_hessian_action must be a bool"):
        KronBfgsGradientMaker(model, PreconditioningConfig(), minibatch_hessian_action="yes")
    with pytest.raises(ValueError, match="needs sᵀy > 0"):
        bfgs_inverse_update(torch.eye(2), torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0]))
    grouped = nn.Sequential(nn.Conv2d(2, 4, 1, groups=2), nn.Flatten(), nn.Linear(4, 2))
    gm = KronBfgsGradientMaker(grouped, PreconditioningConfig(damping=0.1))
    assert "groups=2" in gm.plain_modules["0"]


def test_layer_before_train_mode_batchnorm_keeps_identity_output_side():
    """A Conv2d feeding a train-mode BatchNorm has output gradients that sum to zero over the batch,
    so K-BFGS's y = ḡ − ḡ₀ is pure rounding: the pair is skipped and H_g stays I, and the run is
    stable under a 1e-13 relative change of the inputs (a noise-driven BFGS update is not)."""
    from curvfun.precondition import KronBfgsGradientMaker, PreconditioningConfig

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                             nn.Linear(3 * 5 * 5, 8), nn.Tanh(), nn.Linear(8, 4))

    g = torch.Generator().manual_seed(7)
    data = [(torch.randn(8, 2, 5, 5, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(4)]
    finals = []
    for rel in (0.0, 1e-13):
        model = net()
        gm = KronBfgsGradientMaker(model, PreconditioningConfig(damping=1e-2))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for x, t in data:
            opt.zero_grad()
            y = gm.setup_model_call(model, x * (1 + rel))
            gm.setup_loss_call(F.cross_entropy, y, t)
            gm.forward_and_backward()
            opt.step()
        assert torch.equal(gm.H_g["0"], torch.eye(3))
        assert not torch.allclose(gm.H_g["4"], torch.eye(8))  # the Linear layers do learn H_g
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert (finals[0] - finals[1]).norm() <= 1e-9 * finals[0].norm()
