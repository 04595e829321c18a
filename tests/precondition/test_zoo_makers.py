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


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("maker", sorted(MAKERS))
def test_maker_runs_the_readme_loop_on_the_zoo(maker, name):
    model, x, y, _ = build(name, n=6)
    frozen = {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}
    start = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
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
        assert all(not torch.equal(p, start[k]) for k, p in model.named_parameters() if k in start)
    else:
        assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("maker", sorted(MAKERS))
def test_every_parameter_of_a_preconditioned_layer_is_preconditioned_or_named(maker, name):
    """On the third step (every maker has curvature by then), each trainable parameter of a layer
    the maker lists as preconditioned has a gradient other than the plain one, or the maker names it
    (a warning, or its report: Shampoo's 1-D parameters). A parameter whose plain gradient is zero
    (a key bias under softmax) cannot tell."""
    model, x, y, _ = build(name, n=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = MAKERS[maker](model, P.PreconditioningConfig(damping=0.1))
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        for step in range(3):
            optimizer.zero_grad()
            dummy_y = gm.setup_model_call(model, x)
            gm.setup_loss_call(F.cross_entropy, dummy_y, y)
            gm.forward_and_backward()
            if step < 2:
                optimizer.step()
    named = " ".join(str(w.message) for w in caught) + gm.report_preconditioned_modules(force=True)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    plain = dict(zip(params, torch.autograd.grad(F.cross_entropy(model(x), y), list(params.values()))))
    silent = [k for k, p in params.items()
              if gm.module_name_of(p) is not None and bool(plain[k].any())
              and torch.allclose(p.grad, plain[k], rtol=1e-10, atol=1e-13)
              and repr(gm.module_name_of(p)[0]) not in named and k not in named]
    assert not silent, silent


CURVATURE_MAKERS = ("kfac", "kfac_mc", "ekfac", "lowrank", "diag", "unitwise", "layerwise", "full", "emp")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("maker", CURVATURE_MAKERS)
def test_every_preconditioned_layer_gets_curvature_or_is_named(maker, name):
    """A layer a curvature maker lists as preconditioned has curvature after a curvature step,
    or a warning names it (a layer listed but silently left with the plain gradient is the
    defect): MultiheadAttention's projections, out_proj and every part of a split attention."""
    model, x, y, _ = build(name, n=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = MAKERS[maker](model, P.PreconditioningConfig(damping=0.1))
        dummy_y = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, dummy_y, y)
        gm.forward_and_backward()
    named = " ".join(str(w.message) for w in caught)
    have = set(gm.curvature) | set(getattr(gm, "lowrank", {})) | set(getattr(gm, "full_names", ()))
    silent = [n for n in gm.preconditioned_modules if n not in have and repr(n) not in named]
    assert not silent, silent
    attention = [n for n, m in model.named_modules() if isinstance(m, torch.nn.MultiheadAttention)]
    for a in attention:
        assert a not in gm.plain_modules, gm.plain_modules[a]
        assert any(n.startswith(a) and n in have for n in gm.preconditioned_modules if n != f"{a}.out_proj")


@pytest.mark.parametrize("maker", CURVATURE_MAKERS)
def test_a_layer_used_outside_its_forward_is_named(maker):
    """gpt_tied reads the embedding's weight as the head (``h @ tok.weight.T``): its curvature comes
    from the lookup alone, which misses that use; the maker says so, once, naming the layer."""
    model, x, y, _ = build("gpt_tied", n=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = MAKERS[maker](model, P.PreconditioningConfig(damping=0.1))
    if "tok" not in gm.preconditioned_modules:  # a maker without curvature for embeddings
        assert "tok" in gm.plain_modules
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            dummy_y = gm.setup_model_call(model, x)
            gm.setup_loss_call(F.cross_entropy, dummy_y, y)
            gm.forward_and_backward()
    named = [str(w.message) for w in caught if "outside its own forward" in str(w.message)]
    assert len(named) == 1 and "layer 'tok' uses ['weight'] also outside" in named[0], named
    have = set(gm.curvature) | set(getattr(gm, "lowrank", {})) | set(getattr(gm, "full_names", ()))
    assert {"block.linear1", "block.self_attn", "block.self_attn.out_proj"} <= have


class ReadTwice(torch.nn.Module):
    """A Linear whose weight the model also reads directly: ``b(tanh(a(x))) + (x a.Wᵀ)[:, :3]``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) + (x @ self.a.weight.T)[:, :3]


@pytest.mark.parametrize("maker", CURVATURE_MAKERS + ("kbfgs", "seng"))
def test_a_weight_read_outside_its_layer_is_named_once_by_makers_whose_curvature_misses_it(maker):
    """Makers that form a layer's curvature from its own calls (K-FAC family, K-BFGS, SENG) name a
    layer whose weight the model also reads directly, once; a weight penalty in the loss is not
    such a use (it leaves the Fisher / GGN unchanged) and is not named."""
    torch.manual_seed(0)
    for model, loss in ((ReadTwice(), F.cross_entropy),
                        (torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)), None)):
        if loss is None:
            def loss(out, t, reduction="mean", m=model):
                return F.cross_entropy(out, t, reduction=reduction) + 0.1 * m[0].weight.square().sum()
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gm = MAKERS[maker](model, P.PreconditioningConfig(damping=0.1))
            for _ in range(3):
                dummy_y = gm.setup_model_call(model, x)
                gm.setup_loss_call(loss, dummy_y, y)
                gm.forward_and_backward()
        named = [str(w.message) for w in caught if "outside its own forward" in str(w.message)]
        if isinstance(model, ReadTwice):
            assert len(named) == 1 and "layer 'a' uses ['weight'] also outside" in named[0], named
        else:
            assert not named, named


@pytest.mark.parametrize("frozen", ["weight", "bias"])
@pytest.mark.parametrize("maker", sorted(MAKERS))
def test_freezing_mid_run_leaves_the_frozen_parameter_untouched(maker, frozen):
    """Parameters frozen after some steps (weight or bias of the first layer): the maker goes on,
    the frozen one stays as it was, the others keep training."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = MAKERS[maker](model, P.PreconditioningConfig(data_size=8, damping=0.1))
        for step in range(6):
            if step == 3:
                getattr(model[0], frozen).requires_grad_(False)
                getattr(model[0], frozen).grad = None
                kept = getattr(model[0], frozen).detach().clone()
                other = model[2].weight.detach().clone()
            optimizer.zero_grad()
            dummy_y = gm.setup_model_call(model, x)
            gm.setup_loss_call(F.cross_entropy, dummy_y, y)
            gm.forward_and_backward()
            optimizer.step()
    assert torch.equal(getattr(model[0], frozen), kept)
    assert not torch.equal(model[2].weight, other)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_changed_model_is_named_and_reassigned():
    """A frozen parameter and a replaced layer are named in a warning; the new layer then gets
    curvature (K-FAC factors of the new module), the step count goes on."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    gm = P.KfacGradientMaker(model, P.PreconditioningConfig(data_size=8, damping=0.1))

    def step():
        dummy_y = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, dummy_y, y)
        gm.forward_and_backward()

    step()
    model[0].bias.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"frozen: \['0.bias'\]"):
        step()
    model[2] = torch.nn.Linear(6, 3).double()
    with pytest.warns(UserWarning, match=r"replaced: \['2'\]"):
        step()
    assert gm.step == 3 and gm.module_params("2")["weight"] is model[2].weight
    assert "2" in gm.curvature and gm.curvature["2"].A.shape == (6, 6)
