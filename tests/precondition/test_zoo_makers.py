"""Every gradient maker runs ASDL's README loop on every model of tests/zoo.py (transformers,
LSTM, 1-D/3-D/transposed convs, BatchNorm ResNet, tied embeddings, a frozen weight): no error,
finite parameters, frozen parameters untouched, and the loss falls on a repeated batch."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from curvfun import precondition as P
from zoo import NAMES, build

MAKERS = {
    "kfac": lambda m, c: P.KfacGradientMaker(m, c),
    "kfac_mc": lambda m, c: P.KfacGradientMaker(m, c, fisher_type="fisher_mc"),
    "ekfac": lambda m, c: P.EkfacGradientMaker(m, c),
    "lowrank": lambda m, c: P.LowRankKfacGradientMaker(m, c, rank=4),
    "diag": lambda m, c: P.DiagNaturalGradientMaker(m, c),
    "unitwise": lambda m, c: P.UnitWiseNaturalGradientMaker(m, c),
    "layerwise": lambda m, c: P.LayerWiseNaturalGradientMaker(m, c),
    "full": lambda m, c: P.FullNaturalGradientMaker(m, c),
    "emp": lambda m, c: P.EmpNaturalGradientMaker(m, c),
    "shampoo": lambda m, c: P.ShampooGradientMaker(m, c),
    "kpsgd": lambda m, c: P.KronPsgdGradientMaker(m, c),
    "kbfgs": lambda m, c: P.KronBfgsGradientMaker(m, c),
    "seng": lambda m, c: P.SengGradientMaker(m, c),
    "smw": lambda m, c: P.SmwEmpNaturalGradientMaker(m, c),
    "newton": lambda m, c: P.NewtonGradientMaker(m, c),
    "abs_newton": lambda m, c: P.NewtonGradientMaker(m, c, abs_eigenvalues=True),
    "curveball": lambda m, c: P.CurveBallGradientMaker(m, c),
}


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("maker", sorted(MAKERS))
def test_maker_runs_the_readme_loop_on_the_zoo(maker, name):
    model, x, y, _ = build(name, n=6)
    frozen = {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}
    config = P.PreconditioningConfig(data_size=len(y), damping=0.1)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # plain-gradient layers are named in warnings; tested elsewhere
        gm = MAKERS[maker](model, config)
        for _ in range(8):
            optimizer.zero_grad()
            dummy_y = gm.setup_model_call(model, x)
            gm.setup_loss_call(F.cross_entropy, dummy_y, y)
            _, loss = gm.forward_and_backward()
            optimizer.step()
            losses.append(loss.item())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for k, p in model.named_parameters():
        if k in frozen:
            assert torch.equal(p, frozen[k]), k
    if maker == "newton":  # a saddle-seeking step on a non-convex loss: it must move and stay finite
        assert min(losses) < losses[0], losses
    else:
        assert losses[-1] < losses[0], losses
