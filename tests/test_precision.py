"""Mixed precision (curvfun.precision): under ``torch.autocast(bfloat16)`` — the CLI's ``--amp`` —
every gradient maker runs its model in bf16 and its curvature algebra in the parameters' dtype:
the step works, leaves float32 gradients, and matches the float32 step to the accuracy of a bf16
forward pass. Runs on the CPU's bf16 autocast; tests/test_cuda.py covers CUDA."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvfun import precondition as P
from curvfun.precision import autocast_as, autocast_state, full_precision


def cfg():
    return P.PreconditioningConfig(damping=0.1, data_size=32)


MAKERS = {
    "plain": lambda m: P.GradientMaker(m),
    "kfac": lambda m: P.KfacGradientMaker(m, cfg(), seed=0),
    "ekfac": lambda m: P.EkfacGradientMaker(m, cfg(), seed=0),
    "lowrank": lambda m: P.LowRankKfacGradientMaker(m, cfg(), rank=4, seed=0),
    "diag": lambda m: P.DiagNaturalGradientMaker(m, cfg(), seed=0),
    "layerwise": lambda m: P.LayerWiseNaturalGradientMaker(m, cfg(), seed=0),
    "full": lambda m: P.FullNaturalGradientMaker(m, cfg(), seed=0),
    "emp": lambda m: P.EmpNaturalGradientMaker(m, cfg()),
    "shampoo": lambda m: P.ShampooGradientMaker(m, cfg()),
    "psgd": lambda m: P.KronPsgdGradientMaker(m, cfg(), seed=0),
    "kbfgs": lambda m: P.KronBfgsGradientMaker(m, cfg()),
    "seng": lambda m: P.SengGradientMaker(m, cfg(), sketching_size=8, truncated_rank=4, seed=0),
    "smw": lambda m: P.SmwEmpNaturalGradientMaker(m, cfg()),
    "newton": lambda m: P.NewtonGradientMaker(m, P.PreconditioningConfig(damping=1.0)),
    "curveball": lambda m: P.CurveBallGradientMaker(m, cfg()),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_maker_step_under_bf16_autocast(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 4)).float()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 10, generator=g, dtype=torch.float32), torch.randint(0, 4, (32,), generator=g))
               for _ in range(3)]
    grads = {}
    for amp in (False, True):
        m = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 4)).float()
        m.load_state_dict(model.state_dict())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            gm = MAKERS[name](m)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for i, (x, t) in enumerate(batches):
            if i:
                opt.step()  # K-BFGS measures its pairs between parameter values: let them differ
            m.zero_grad()
            with warnings.catch_warnings():
                warnings.simplefilter("error", P.NonFiniteCurvatureWarning)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    y = gm.setup_model_call(m, x)
                    gm.setup_loss_call(F.cross_entropy, y, t)
                    gm.forward_and_backward()
        assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in m.parameters())
        grads[amp] = torch.cat([p.grad.flatten() for p in m.parameters()])
    err = (grads[True] - grads[False]).norm() / grads[False].norm()
    assert err < 0.1, f"{name}: relative difference {err:.3g} between the bf16-autocast and float32 steps"


@pytest.mark.parametrize("name", ["kfac", "shampoo"])
def test_rows_route_under_bf16_autocast(name):
    """The data-space route (gᵀa formed from the bf16 layer's rows instead of autograd's bf16 weight
    GEMM) under autocast: no warning, the wide layers take the route, and the step stays within bf16
    accuracy of the float32 step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 3)).float()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(8, 64, generator=g, dtype=torch.float32), torch.randint(0, 3, (8,), generator=g)
    grads = {}
    for amp in (False, True):
        m = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 3)).float()
        m.load_state_dict(model.state_dict())
        gm = MAKERS[name](m)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                y = gm.setup_model_call(m, x)
                gm.setup_loss_call(F.cross_entropy, y, t)
                gm.forward_and_backward()
        assert {"0", "2"} <= gm._rows_seen, gm._rows_seen
        grads[amp] = torch.cat([p.grad.flatten() for p in m.parameters()])
    err = (grads[True] - grads[False]).norm() / grads[False].norm()
    assert err < 0.1, f"{name}: relative difference {err:.3g} between the bf16-autocast and float32 steps"


@pytest.mark.parametrize("name", ["kfac", "shampoo"])
def test_outside_use_under_bf16_autocast(name):
    """A weight also used outside its layer under bf16 autocast (float32 parameters): loss = CE +
    λ‖W₀‖² with the penalty's gradient 1% of W₀'s gradient (small enough to pass for bf16 rounding
    in a numerical comparison). One step from the same parameters: the rows route's W₀ .grad is
    within bf16 accuracy of the dense route's (relative error < 2e-2 and under half of the
    penalty's own effect on the dense route, so a dropped penalty would show), no warning; K-FAC
    keeps layer 0's rows (the penalty preconditioned as the remainder), Shampoo forms the gradient
    for it (fc2 keeps its rows)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 3)).float()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(8, 64, generator=g, dtype=torch.float32), torch.randint(0, 3, (8,), generator=g)
    probe = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 3)).float()
    probe.load_state_dict(model.state_dict())
    (g0,) = torch.autograd.grad(F.cross_entropy(probe(x), t), probe[0].weight)
    lam = 0.01 * float(g0.norm()) / float(2 * probe[0].weight.detach().norm())
    grads, seen = {}, {}
    for ds, penalty in (("auto", lam), ("never", lam), ("never", 0.0)):
        m = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 3)).float()
        m.load_state_dict(model.state_dict())
        if name == "kfac":
            gm = P.KfacGradientMaker(m, cfg(), seed=0, data_space=ds)
        else:
            gm = P.ShampooGradientMaker(m, cfg(), data_space=ds)

        def loss(y, t, reduction="mean", m=m, penalty=penalty):
            return F.cross_entropy(y, t, reduction=reduction) + penalty * m[0].weight.square().sum()

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = gm.setup_model_call(m, x)
                gm.setup_loss_call(loss, y, t)
                gm.forward_and_backward()
        assert m[0].weight.grad.dtype == torch.float32
        grads[ds, penalty] = m[0].weight.grad.clone()
        seen[ds, penalty] = set(gm._rows_seen)
    want = grads["never", lam]
    err = float((grads["auto", lam] - want).norm() / want.norm())
    effect = float((grads["never", 0.0] - want).norm() / want.norm())
    assert err < 2e-2 and err < effect / 2, (err, effect)
    assert seen["auto", lam] == ({"0", "2"} if name == "kfac" else {"2"}), seen
    assert not seen["never", lam]


def test_precision_contexts_nest():
    assert autocast_state() == ()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = autocast_state()
        assert state == (("cpu", torch.bfloat16),)
        with full_precision():
            assert (torch.ones(2, 2, dtype=torch.float32) @ torch.ones(2, 2, dtype=torch.float32)).dtype == torch.float32
            with autocast_as(state):
                assert (torch.ones(2, 2, dtype=torch.float32) @ torch.ones(2, 2, dtype=torch.float32)).dtype == torch.bfloat16
    with autocast_as(()):
        assert not torch.is_autocast_enabled("cpu")


def test_every_model_evaluation_inside_a_step_uses_the_callers_autocast():
    """Functional re-evaluations (K-BFGS's pass at θ₀, SENG's / CurveBall's passes) run in the
    same precision as the step's own forward, so differences between them are not rounding."""
    seen = {}

    class Probe(P.KfacGradientMaker):
        def update_curvature(self):
            params = {k: v.detach() for k, v in self.model.named_parameters()}
            seen["output_at"] = self.model_output_at(params).dtype
            seen["algebra"] = torch.is_autocast_enabled("cpu")
            super().update_curvature()

    model = nn.Sequential(nn.Linear(10, 4)).float()
    gm = Probe(model, cfg())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gm.setup_model_call(model, torch.randn(8, 10, dtype=torch.float32))
        gm.setup_loss_call(F.cross_entropy, y, torch.randint(0, 4, (8,)))
        out, _ = gm.forward_and_backward()
    assert out.dtype == torch.bfloat16 and seen == {"output_at": torch.bfloat16, "algebra": False}
