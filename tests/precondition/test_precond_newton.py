"""NewtonGradientMaker (issue 6) against the dense damped Hessian solve, in float64.

Ground truth: H from ``torch.autograd.functional.hessian`` of the mean loss over the
preconditioned parameters (flattened in model order), g by ``torch.autograd.grad``; the
preconditioned gradient must be ``(H + λI)⁻¹ g`` (``torch.linalg.solve``) or, with
``abs_eigenvalues``, ``(Q|Λ|Qᵀ + λI)⁻¹ g``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from digits_helper import train_digits  # noqa: E402
from maker_checks import check_resume_bit_exact, run_readme_loop  # noqa: E402

from curvfun.precondition import NewtonGradientMaker, PreconditioningConfig  # noqa: E402

TOL = dict(rtol=1e-8, atol=1e-10)


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def batch(step, N=7):
    g = torch.Generator().manual_seed(step)
    return torch.randn(N, 4, generator=g), torch.randint(0, 3, (N,), generator=g)


def dense(model, x, t, names):
    """(H, g) of the mean cross-entropy over the parameters ``names`` (model order)."""
    all_params = dict(model.named_parameters())
    params = tuple(all_params[n].detach().clone() for n in names)

    def L(*ps):
        full = {k: v.detach() for k, v in all_params.items()} | dict(zip(names, ps))
        return F.cross_entropy(torch.func.functional_call(model, full, (x,)), t)

    H = torch.autograd.functional.hessian(L, params)
    sizes = [p.numel() for p in params]
    Hd = torch.cat([torch.cat([H[i][j].reshape(sizes[i], sizes[j]) for j in range(len(params))], 1)
                    for i in range(len(params))], 0)
    ps = [p.clone().requires_grad_(True) for p in params]
    g = torch.cat([v.reshape(-1) for v in torch.autograd.grad(L(*ps), ps)])
    return Hd, g


def expected_direction(H, g, lam, absolute):
    if absolute:
        L, Q = torch.linalg.eigh(H)
        H = Q @ torch.diag(L.abs()) @ Q.T
    return torch.linalg.solve(H + lam * torch.eye(len(g)), g)


def flat_grad(model, names):
    p = dict(model.named_parameters())
    return torch.cat([p[n].grad.reshape(-1) for n in names])


@pytest.mark.parametrize("absolute", [False, True])
def test_direction_equals_dense_damped_solve(absolute):
    model = tiny()
    lam = 0.3
    gm = NewtonGradientMaker(model, PreconditioningConfig(damping=lam), abs_eigenvalues=absolute)
    x, t = batch(0)
    dy = gm.setup_model_call(model, x)
    gm.setup_loss_call(F.cross_entropy, dy, t)
    y, loss = gm.forward_and_backward()
    names = [n for n, _ in model.named_parameters()]
    H, g = dense(model, x, t, names)
    torch.testing.assert_close(gm.hessian, H, **TOL)
    torch.testing.assert_close(flat_grad(model, names), expected_direction(H, g, lam, absolute), **TOL)
    torch.testing.assert_close(loss, F.cross_entropy(model(x), t), **TOL)


def test_schedule_ema_and_ignored_layer():
    """Refresh every 2 steps with ema_decay 0.5: step 1 reuses H₀'s solve on its own gradient, step 2
    uses ½H₀ + ½H₂; the ignored first layer keeps its plain gradient and is not in H."""
    model = tiny()
    lam = 0.2
    config = PreconditioningConfig(damping=lam, preconditioner_upd_interval=2, ema_decay=0.5,
                                   ignore_modules=[model[0]])
    gm = NewtonGradientMaker(model, config)
    assert gm.param_names == ["2.weight", "2.bias"] and gm.num_params == 18
    ref = copy.deepcopy(model)
    names = gm.param_names
    Hs = []
    for s in range(3):
        x, t = batch(s)
        for p in model.parameters():
            p.grad = None
        dy = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, dy, t)
        gm.forward_and_backward()
        H, g = dense(ref, x, t, names)
        Hs.append(H)
        Hcur = Hs[0] if s < 2 else 0.5 * Hs[0] + 0.5 * Hs[2]
        torch.testing.assert_close(flat_grad(model, names), expected_direction(Hcur, g, lam, False), **TOL)
        plain = torch.autograd.grad(F.cross_entropy(ref(x), t), [ref[0].weight])[0]
        torch.testing.assert_close(model[0].weight.grad, plain, **TOL)
        with torch.no_grad():  # move both models the same way
            for p, q in zip(model.parameters(), ref.parameters()):
                p -= 0.1 * p.grad
                q.copy_(p)


def test_asdl_readme_loop():
    """Logistic regression (a convex loss, so the damped Newton step descends): the loss drops and
    the last step's gradient is the damped Newton direction at the parameters it was taken at."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x, t = batch(0, N=16)
    losses = run_readme_loop("NewtonGradientMaker", lambda: model, [(x, t)] * 6)["losses"]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], losses
    ref = copy.deepcopy(model)
    with torch.no_grad():  # undo the last SGD step
        for q, p in zip(ref.parameters(), model.parameters()):
            q.add_(0.1 * p.grad)
    names = [n for n, _ in model.named_parameters()]
    H, g = dense(ref, x, t, names)
    torch.testing.assert_close(flat_grad(model, names), expected_direction(H, g, 0.01, False), **TOL)


def test_trains_digits(one_thread):
    """The full digits MLP has 9610 parameters (above max_params); Newton on its head (1290
    parameters, the first layer plain through ignore_modules), refreshed every 20 steps."""
    with pytest.raises(ValueError, match="9610 parameters"):
        train_digits(lambda m: (torch.optim.SGD(m.parameters(), lr=1.0), NewtonGradientMaker(m)))
    acc = train_digits(lambda m: (
        torch.optim.SGD(m.parameters(), lr=1.0),
        NewtonGradientMaker(m, PreconditioningConfig(damping=1.0, preconditioner_upd_interval=20,
                                                     ignore_modules=[m[0]]))), steps=100)
    assert acc >= 0.9, acc


@pytest.mark.parametrize("absolute", [False, True])
def test_resume_is_bit_exact(absolute):
    config = dict(damping=0.1, preconditioner_upd_interval=3, ema_decay=0.5)
    check_resume_bit_exact(
        tiny, lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9),
        lambda m: NewtonGradientMaker(m, PreconditioningConfig(**config), abs_eigenvalues=absolute),
        [batch(s) for s in range(7)], 4, keep_training=False, serialize=True)


def test_bad_input_raises_with_message():
    model = tiny()  # 43 parameters
    with pytest.raises(ValueError, match=r"has 43 parameters to precondition, more than max_params=40"):
        NewtonGradientMaker(model, max_params=40)
    with pytest.raises(ValueError, match="max_params must be a positive int"):
        NewtonGradientMaker(model, max_params=0)
    with pytest.raises(TypeError, match="abs_eigenvalues must be a bool"):
        NewtonGradientMaker(model, abs_eigenvalues="yes")
    with pytest.raises(ValueError, match="hessian_chunk_size"):
        NewtonGradientMaker(model, hessian_chunk_size=0)
