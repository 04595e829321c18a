"""CurveBallGradientMaker (issue 6) against the dense GGN, in float64.

Ground truth: the per-sample Jacobians J_n of the logits by ``torch.autograd.functional.jacobian``,
the output Hessians H_n by ``torch.autograd.functional.hessian`` of the per-sample loss, so
G = (1/N) Σ_n J_nᵀ H_n J_n; g by ``torch.autograd.grad``. One update:
Δz = (G + λI)z + g, z ← ρz − βΔz, with (β, −ρ) from the 2x2 system of the paper (pseudo-inverse;
``torch.linalg.solve`` once z ≠ 0) or fixed; the maker writes p.grad = −z.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from digits_helper import train_digits  # noqa: E402
from maker_checks import check_resume_bit_exact, run_readme_loop  # noqa: E402

from curvfun.precondition import CurveBallGradientMaker, PreconditioningConfig  # noqa: E402
from curvfun.precondition.curveball import solve_rho_beta  # noqa: E402

TOL = dict(rtol=1e-8, atol=1e-10)


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny(seed=0, out=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out))


def batch(step, N=6, mse=False):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(N, 4, generator=g)
    return x, (torch.randn(N, 2, generator=g) if mse else torch.randint(0, 3, (N,), generator=g))


def half_mse(y, t):
    """½‖y − t‖² per sample, mean over the batch: the ``mse`` likelihood (var 1) of the GUIDE."""
    return 0.5 * (y - t).pow(2).sum(1).mean()


def dense_ggn_and_grad(model, x, t, loss_fn):
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone() for p in model.parameters())
    flat = torch.cat([p.reshape(-1) for p in params])
    sizes = [p.numel() for p in params]

    def logits(f):
        ps = [c.reshape(p.shape) for c, p in zip(torch.split(f, sizes), params)]
        return torch.func.functional_call(model, dict(zip(names, ps)), (x,))

    J = torch.autograd.functional.jacobian(logits, flat)  # [N, C, P]
    out = logits(flat).detach()
    N = out.shape[0]
    G = torch.zeros(len(flat), len(flat))
    for n in range(N):
        Hn = torch.autograd.functional.hessian(lambda o: loss_fn(o.unsqueeze(0), t[n : n + 1]), out[n])
        G += J[n].T @ Hn @ J[n] / N
    f = flat.clone().requires_grad_(True)
    g = torch.autograd.grad(loss_fn(logits(f), t), f)[0]
    return G, g


def run_steps(gm, model, loss_fn, steps, mse=False):
    """The ASDL loop with SGD(lr=1); yields (z after the step, x, t) per step."""
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for s in range(steps):
        x, t = batch(s, mse=mse)
        params_before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        dy = gm.setup_model_call(model, x)
        gm.setup_loss_call(loss_fn, dy, t)
        gm.forward_and_backward()
        z = -torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        ref = tiny(out=2 if mse else 3)
        with torch.no_grad():
            for q, v in zip(ref.parameters(), params_before):
                q.copy_(v)
        yield z, ref, x, t
        opt.step()


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_auto_tuned_update_equals_dense_ggn(loss):
    mse = loss == "mse"
    lam = 0.1
    model = tiny(out=2 if mse else 3)
    loss_fn = half_mse if mse else F.cross_entropy
    gm = CurveBallGradientMaker(model, PreconditioningConfig(damping=lam), loss_type=loss)
    z = None
    for s, (z_new, ref, x, t) in enumerate(run_steps(gm, model, loss_fn, 3, mse=mse)):
        G, g = dense_ggn_and_grad(ref, x, t, loss_fn)
        M = G + lam * torch.eye(len(g))
        if z is None:  # z = 0: ρ = 0, β = gᵀg / gᵀMg
            beta, rho = (g @ g) / (g @ M @ g), 0.0
            expect = -beta * g
        else:
            dz = M @ z + g
            A = torch.tensor([[dz @ M @ dz, z @ M @ dz], [z @ M @ dz, z @ M @ z]])
            beta, mrho = torch.linalg.solve(A, torch.stack([g @ dz, g @ z]))
            rho = -mrho
            expect = rho * z - beta * dz
        torch.testing.assert_close(z_new, expect, **TOL, msg=lambda m: f"step {s}: {m}")
        assert gm.rho == pytest.approx(float(rho), rel=1e-8, abs=1e-12)
        assert gm.beta_last == pytest.approx(float(beta), rel=1e-8)
        z = z_new


def test_fixed_coefficients_and_momentum_decay():
    lam, rho, beta, decay = 0.5, 0.7, 0.2, 0.9
    model = tiny()
    gm = CurveBallGradientMaker(model, PreconditioningConfig(damping=lam), momentum=rho, momentum_decay=decay,
                                auto_tune=False, beta=beta)
    z = None
    for s, (z_new, ref, x, t) in enumerate(run_steps(gm, model, F.cross_entropy, 3)):
        G, g = dense_ggn_and_grad(ref, x, t, F.cross_entropy)
        zd = torch.zeros_like(g) if z is None else decay * z
        expect = rho * zd - beta * ((G + lam * torch.eye(len(g))) @ zd + g)
        torch.testing.assert_close(z_new, expect, **TOL, msg=lambda m: f"step {s}: {m}")
        z = z_new


def test_pinv_solution_at_zero_direction():
    rho, beta = solve_rho_beta(*(torch.tensor(v, dtype=torch.float64) for v in (4.0, 0.0, 0.0, 2.0, 0.0)))
    assert rho == 0.0 and beta == pytest.approx(0.5)


def test_asdl_readme_loop():
    """ASDL's README loop verbatim with CurveBall (only the import differs): the loss drops."""
    model = tiny()
    x, t = batch(0, N=16)
    ns = run_readme_loop("CurveBallGradientMaker", lambda: model, [(x, t)] * 15)
    losses = ns["losses"]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.7 * losses[0], losses
    torch.testing.assert_close(ns["loss"], F.cross_entropy(ns["y"], ns["t"]))  # (y, loss) of the step, as in ASDL


def test_trains_digits(one_thread):
    acc = train_digits(lambda m: (torch.optim.SGD(m.parameters(), lr=1.0),
                                  CurveBallGradientMaker(m, PreconditioningConfig(damping=1.0))), steps=150)
    assert acc >= 0.9, acc


@pytest.mark.parametrize("auto_tune", [True, False])
def test_resume_is_bit_exact(auto_tune):
    check_resume_bit_exact(
        tiny, lambda m: torch.optim.SGD(m.parameters(), lr=0.5),
        lambda m: CurveBallGradientMaker(m, PreconditioningConfig(damping=0.1), auto_tune=auto_tune),
        [batch(s) for s in range(6)], 3, keep_training=False, serialize=True)


def test_bad_input_raises_with_message():
    model = tiny()
    cases = [
        (dict(momentum=1.0), ValueError, r"momentum must be in \[0, 1\)"),
        (dict(momentum_decay=0.0), ValueError, r"momentum_decay must be in \(0, 1\]"),
        (dict(beta=-1.0), ValueError, "beta must be a positive number"),
        (dict(auto_tune=1), TypeError, "auto_tune must be a bool"),
        (dict(loss_type=lambda y, t: (y - t).sum(1)), ValueError, "needs a likelihood"),
        (dict(loss_type="hinge"), ValueError, "unknown loss"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            CurveBallGradientMaker(model, **kw)
