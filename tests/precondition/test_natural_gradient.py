"""The natural-gradient makers of issue 5 ("Must show"): the ASDL README loop, exactness against
dense autograd ground truth, EMA, digits training, robustness, ignored / unsupported modules.

Every expected value is computed in this file with plain autograd: per-sample (or per-class)
gradient loops for dense Fisher blocks, forward hooks + ``torch.autograd.grad`` for the layer
inputs and output-gradients of Kronecker factors, ``torch.linalg`` for solves and eigenbases.
Nothing is taken from the code under test. Schedules and save/resume live in
``test_natural_gradient_resume.py``; the comparison with ASDL 0.1 in
``test_natural_gradient_asdl.py``.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
import optree

from curvfun.kron import KronFactor, KronInverse, NotPositiveDefiniteError
from curvfun.precondition import (
    DiagNaturalGradientMaker,
    EkfacGradientMaker,
    EmpNaturalGradientMaker,
    FullNaturalGradientMaker,
    KfacGradientMaker,
    LayerWiseNaturalGradientMaker,
    LowRankKfacGradientMaker,
    NonFiniteCurvatureWarning,
    PreconditioningConfig,
    UnitWiseNaturalGradientMaker,
    UnsupportedModuleWarning,
)

MAKERS = {
    "kfac": KfacGradientMaker,
    "ekfac": EkfacGradientMaker,
    "lowrank": LowRankKfacGradientMaker,
    "diag": DiagNaturalGradientMaker,
    "unitwise": UnitWiseNaturalGradientMaker,
    "layerwise": LayerWiseNaturalGradientMaker,
    "full": FullNaturalGradientMaker,
    "emp": EmpNaturalGradientMaker,
}


# unsupported layers keep the plain gradient and the makers say so; tests that check the warning record it

pytestmark = [pytest.mark.filterwarnings("ignore::curvfun.precondition.UnsupportedModuleWarning"), pytest.mark.usefixtures("one_thread")]


def make(kind: str, model: nn.Module, config: PreconditioningConfig, fisher_type: str = "fisher_emp", **kw):
    """A maker of ``kind``; fisher_type is dropped for EmpNaturalGradientMaker (always empirical),
    LowRank gets rank 8 (>= every dimension of the test models: exact)."""
    cls = MAKERS[kind]
    if kind == "emp":
        return cls(model, config, **kw)
    if kind == "lowrank":
        kw.setdefault("rank", 8)
    return cls(model, config, fisher_type=fisher_type, **kw)


# ==============================================================================================
# models and data
# ==============================================================================================


def mlp(seed: int = 0, d_in: int = 4, hidden: int = 5, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes))


def ln_mlp(seed: int = 0) -> nn.Module:
    """Linear -> LayerNorm (affine, perturbed so that γ, β are not 1, 0) -> Tanh -> Linear."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3))
    with torch.no_grad():
        m[1].weight.add_(0.3 * torch.randn(5))
        m[1].bias.add_(0.3 * torch.randn(5))
    return m


def bn_eval_mlp(seed: int = 0) -> nn.Module:
    """Linear -> BatchNorm1d in eval mode (random running statistics) -> Tanh -> Linear."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    with torch.no_grad():
        m[1].running_mean.copy_(0.5 * torch.randn(5))
        m[1].running_var.copy_(torch.rand(5) + 0.5)
        m[1].weight.add_(0.3 * torch.randn(5))
        m[1].bias.add_(0.3 * torch.randn(5))
    m.eval()
    return m


def batch(n: int, seed: int, d_in: int = 4, classes: int = 3):
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(n, d_in, generator=g), torch.randint(0, classes, (n,), generator=g)


def flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def slices(model: nn.Module) -> dict[str, slice]:
    """Parameter name -> its slice of the flattened parameter vector (model.parameters() order)."""
    out, i = {}, 0
    for name, p in model.named_parameters():
        out[name] = slice(i, i + p.numel())
        i += p.numel()
    return out


def plain_grad(model: nn.Module, x, t) -> torch.Tensor:
    loss = F.cross_entropy(model(x), t)
    return flat(torch.autograd.grad(loss, list(model.parameters())))


def maker_step(gm, model, x, t):
    """One README step without the optimizer; returns the flattened preconditioned gradient."""
    model.zero_grad()
    dummy_y = gm.setup_model_call(model, x)
    gm.setup_loss_call(F.cross_entropy, dummy_y, t)
    gm.forward_and_backward()
    return flat([p.grad for p in model.parameters()])


# ==============================================================================================
# ground truth by plain autograd
# ==============================================================================================


def sample_class_grads(model: nn.Module, x, t, fisher_type: str):
    """[(weight, flat gradient of ℓ(f(x_n), y))] such that F = (1/N) Σ weight·g gᵀ: the true label
    (weight 1) for the empirical Fisher, every class c with weight p_c for the exact Fisher."""
    params = list(model.parameters())
    out = []
    for n in range(x.shape[0]):
        logits = model(x[n : n + 1])
        if fisher_type == "fisher_emp":
            out.append((1.0, flat(torch.autograd.grad(F.cross_entropy(logits, t[n : n + 1]), params))))
            continue
        p = torch.softmax(logits.detach(), -1)[0]
        for c in range(logits.shape[-1]):
            g = torch.autograd.grad(F.cross_entropy(logits, torch.tensor([c])), params, retain_graph=True)
            out.append((float(p[c]), flat(g)))
    return out


def dense_fisher(model: nn.Module, x, t, fisher_type: str) -> torch.Tensor:
    """F = (1/N) Σ_n [Σ_c p_nc] g gᵀ, [P, P], by a per-sample (per-class) autograd loop."""
    P = sum(p.numel() for p in model.parameters())
    Fm = torch.zeros(P, P)
    for w, g in sample_class_grads(model, x, t, fisher_type):
        Fm += w * torch.outer(g, g)
    return Fm / x.shape[0]


def linear_factors(model: nn.Module, x, t, fisher_type: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """K-FAC factors {name: (A, B)} of every nn.Linear, from forward hooks and autograd:
    A = (1/N) Σ a_n a_nᵀ, B = (1/N) Σ_n Σ_c w_nc ĝ_nc ĝ_ncᵀ with ĝ the gradient of the per-sample
    loss w.r.t. the layer output (samples are independent: no train-mode BatchNorm here)."""
    ins, outs = {}, {}

    def hook(name):
        def record(module, args, output):
            ins[name], outs[name] = args[0].detach(), output

        return record

    hooks = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    names = list(outs)
    N = x.shape[0]
    if fisher_type == "fisher_emp":
        cols = [(torch.ones(N), t)]
    else:
        p = torch.softmax(logits.detach(), -1)
        cols = [(p[:, c], torch.full((N,), c)) for c in range(logits.shape[-1])]
    Bs = {n: 0 for n in names}
    for w, y in cols:
        gs = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), [outs[n] for n in names], retain_graph=True)
        for n, g in zip(names, gs):
            Bs[n] = Bs[n] + (g * w[:, None]).T @ g / N
    return {n: (ins[n].T @ ins[n] / N, Bs[n]) for n in names}


def pi_dampings(A, B, lam):
    """GUIDE: π = sqrt((tr A/dim A)/(tr B/dim B)), δ_A = sqrt(λ)π, δ_B = sqrt(λ)/π (each >= 1e-7)."""
    pi = math.sqrt((float(A.trace()) / A.shape[0]) / (float(B.trace()) / B.shape[0]))
    return max(math.sqrt(lam) * pi, 1e-7), max(math.sqrt(lam) / pi, 1e-7)


def kfac_expected(model, factors, g: torch.Tensor, lam: float) -> torch.Tensor:
    """Dense damped K-FAC solve per Linear: weight (kron(B+δ_B I, A+δ_A I))^{-1} vec_r(G),
    bias (B+δ_B I)^{-1} g_b; other parameters unchanged."""
    out = g.clone()
    sl = slices(model)
    for name, (A, B) in factors.items():
        dA, dB = pi_dampings(A, B, lam)
        Ad, Bd = A + dA * torch.eye(A.shape[0]), B + dB * torch.eye(B.shape[0])
        w = sl[f"{name}.weight"]
        out[w] = torch.linalg.solve(torch.kron(Bd, Ad), g[w])
        if f"{name}.bias" in sl:
            b = sl[f"{name}.bias"]
            out[b] = torch.linalg.solve(Bd, g[b])
    return out


def ekfac_expected(model, x, t, g, lam, fisher_type="fisher_emp"):
    """EKFAC from dense pieces: Q = kron(Q_B, Q_A) (row-major vec(W)) from eigh of the test's A, B;
    S = diag(Qᵀ F_W Q) with F_W the dense Fisher weight block; weight Q diag(1/(S+λ)) Qᵀ g_W,
    bias Q_B diag(1/(s_b+λ)) Q_Bᵀ g_b with s_b = diag(Q_Bᵀ F_b Q_B)."""
    factors = linear_factors(model, x, t, fisher_type)
    Fm = dense_fisher(model, x, t, fisher_type)
    sl = slices(model)
    out = g.clone()
    for name, (A, B) in factors.items():
        QA, QB = torch.linalg.eigh(A)[1], torch.linalg.eigh(B)[1]
        Q = torch.kron(QB, QA)
        w = sl[f"{name}.weight"]
        S = torch.diagonal(Q.T @ Fm[w, w] @ Q)
        out[w] = Q @ ((Q.T @ g[w]) / (S + lam))
        b = sl[f"{name}.bias"]
        sb = torch.diagonal(QB.T @ Fm[b, b] @ QB)
        out[b] = QB @ ((QB.T @ g[b]) / (sb + lam))
    return out


def block_solve(Fm, g, idx, lam):
    """(F[idx, idx] + λI)^{-1} g[idx] written into a copy of g."""
    out = g.clone()
    idx = torch.as_tensor(idx)
    out[idx] = torch.linalg.solve(Fm[idx][:, idx] + lam * torch.eye(len(idx)), g[idx])
    return out


def module_index(model, names) -> list[int]:
    sl = slices(model)
    return [i for n in names for s in [sl[n]] for i in range(s.start, s.stop)]


def layer_blocks(model) -> list[list[int]]:
    """Index sets of each leaf module's parameters (weight, bias)."""
    blocks = []
    for mname, m in model.named_modules():
        own = [f"{mname}.{k}" for k, _ in m.named_parameters(recurse=False)]
        if own and not list(m.children()):
            blocks.append(module_index(model, own))
    return blocks


def norm_units(model) -> list[list[int]]:
    """Per-channel index pairs [γ_c, β_c] of every LayerNorm / BatchNorm."""
    sl = slices(model)
    units = []
    for mname, m in model.named_modules():
        if isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)):
            w, b = sl[f"{mname}.weight"], sl[f"{mname}.bias"]
            units += [[w.start + c, b.start + c] for c in range(w.stop - w.start)]
    return units


def unit_blocks(model) -> list[list[int]]:
    """Index sets of every unit: [W[c, :], b[c]] of each Linear, then [γ_c, β_c] of each norm layer."""
    sl = slices(model)
    units = []
    for mname, m in model.named_modules():
        if isinstance(m, nn.Linear):
            w, (o, d) = sl[f"{mname}.weight"], m.weight.shape
            b = sl.get(f"{mname}.bias")
            units += [list(range(w.start + c * d, w.start + (c + 1) * d)) + ([b.start + c] if b else []) for c in range(o)]
    return units + norm_units(model)


def expected_preconditioned(kind, model, x, t, g, lam, fisher_type="fisher_emp"):
    """The preconditioned gradient each maker must produce from curvature of batch (x, t) at the
    model's current parameters, applied to the gradient vector g (all ground truth)."""
    if kind == "emp":
        fisher_type = "fisher_emp"
    if kind in ("kfac", "lowrank", "ekfac"):
        if kind == "ekfac":
            out = ekfac_expected(model, x, t, g, lam, fisher_type)
        else:
            out = kfac_expected(model, linear_factors(model, x, t, fisher_type), g, lam)
        units = norm_units(model)  # norm layers: unit-wise 2x2 blocks, plain Tikhonov λ (as ASDL)
        if units:
            Fm = dense_fisher(model, x, t, fisher_type)
            for u in units:
                out[u] = block_solve(Fm, g, u, lam)[u]
        return out
    Fm = dense_fisher(model, x, t, fisher_type)
    if kind == "diag":
        return g / (torch.diagonal(Fm) + lam)
    if kind == "unitwise":
        out = g.clone()
        for u in unit_blocks(model):
            out[u] = block_solve(Fm, g, u, lam)[u]
        return out
    if kind == "layerwise":
        out = g.clone()
        for blk in layer_blocks(model):
            out[blk] = block_solve(Fm, g, blk, lam)[blk]
        return out
    assert kind in ("full", "emp")
    return torch.linalg.solve(Fm + lam * torch.eye(len(g)), g)


def assert_close(actual, expected, rtol=1e-9, atol=1e-11):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# ==============================================================================================
# 1. the ASDL README loop, unchanged but for its import line
# ==============================================================================================

# The README's code block, verbatim (seed 000), including its import line and its 2-space indent.
README = """
from asdl.precondition import PreconditioningConfig, KfacGradientMaker

# Initialize model
model = Net()

# Initialize optimizer (SGD is recommended)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

# Initialize KfacGradientMaker
config = PreconditioningConfig(data_size=batch_size, damping=0.01)
gm = KfacGradientMaker(model, config)

# Training loop
for x, t in data_loader:
  optimizer.zero_grad()
  
  # <Standard> (gradient calculation)
  # y = model(x)
  # loss = loss_fn(y, t)
  # loss.backward()

  # <ASDL> ('preconditioned' gradient calculation)
  dummy_y = gm.setup_model_call(model, x)
  gm.setup_loss_call(loss_fn, dummy_y, t)
  y, loss = gm.forward_and_backward()

  optimizer.step()
"""


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def _readme_batches(batch_size=128, n=1024, epochs=2):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 8, generator=g)
    T = (X @ torch.randn(8, 4, generator=g)).argmax(1)  # a linear teacher
    return [(X[i : i + batch_size], T[i : i + batch_size]) for i in range(0, n, batch_size)] * epochs


@pytest.mark.parametrize("maker_name", list(MAKERS))
def test_asdl_readme_loop_runs_unchanged_but_for_the_import(maker_name, monkeypatch):
    """The README's code block is executed as text with only its import line changed to
    ``from curvfun.precondition import PreconditioningConfig, <Maker>`` (and, for makers other than
    K-FAC, the README's "replace KfacGradientMaker by XXXGradientMaker"). Checks run inside
    ``optimizer.step()`` (an SGD subclass patched in for the run), where the loop's variables are
    current: (y, loss) are the model output and the loss of that output, and param.grad is not the
    plain gradient. Over 16 steps the loss falls."""
    maker = MAKERS[maker_name].__name__
    code = README.replace(
        "from asdl.precondition import PreconditioningConfig, KfacGradientMaker",
        f"from curvfun.precondition import PreconditioningConfig, {maker}",
    ).replace("gm = KfacGradientMaker(model, config)", f"gm = {maker}(model, config)")
    assert code.count("\n") == README.count("\n") and code != README

    ns = {"torch": torch, "Net": Net, "batch_size": 128, "data_loader": _readme_batches(), "loss_fn": F.cross_entropy}
    losses = []
    SGD = torch.optim.SGD

    class CheckedSGD(SGD):
        def step(self, closure=None):
            model, x, t, y, loss = (ns[k] for k in ("model", "x", "t", "y", "loss"))
            with torch.no_grad():
                assert torch.equal(y, model(x)), "y is not the model output"
                assert torch.equal(loss, ns["loss_fn"](y, t)), "loss is not the loss of y"
            grad = flat([p.grad for p in model.parameters()])
            assert not torch.allclose(grad, plain_grad(copy.deepcopy(model), x, t)), "param.grad is the plain gradient"
            losses.append(loss.item())
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "SGD", CheckedSGD)
    torch.manual_seed(0)
    exec(compile(code, f"<ASDL README with {maker}>", "exec"), ns)
    assert isinstance(ns["gm"], MAKERS[maker_name]) and ns["gm"].step == len(losses) == 16
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.75 * first, (first, last)


# ==============================================================================================
# 2. exactness: (dense matrix of the maker's shape + damping)^{-1} · gradient, float64
# ==============================================================================================

_fisher_types = st.sampled_from(["fisher_exact", "fisher_emp"])
_dampings = st.sampled_from([1e-3, 0.05, 1.0])


@given(seed=st.integers(0, 10_000), fisher_type=_fisher_types, lam=_dampings)
def test_kfac_single_datum_equals_dense_damped_kronecker_inverse(seed, fisher_type, lam):
    """N = 1: the Fisher weight block of each Linear is exactly kron(B, A) (checked against the
    dense per-class autograd Fisher), its bias block B; K-FAC's preconditioned gradient is
    (kron(B+δ_B I, A+δ_A I))^{-1} vec(G) and (B+δ_B I)^{-1} g_b with A, B, π recomputed here."""
    model = mlp(seed)
    x, t = batch(1, seed)
    g = plain_grad(model, x, t)
    factors = linear_factors(model, x, t, fisher_type)
    Fm = dense_fisher(model, x, t, fisher_type)
    sl = slices(model)
    for name, (A, B) in factors.items():  # the exactness condition itself
        w, b = sl[f"{name}.weight"], sl[f"{name}.bias"]
        assert_close(Fm[w, w], torch.kron(B, A), rtol=1e-10, atol=1e-13)
        assert_close(Fm[b, b], B, rtol=1e-10, atol=1e-13)
    expected = kfac_expected(model, factors, g, lam)
    gm = KfacGradientMaker(model, PreconditioningConfig(damping=lam), fisher_type=fisher_type)
    assert_close(maker_step(gm, model, x, t), expected)


@given(seed=st.integers(0, 10_000), n=st.integers(1, 6), fisher_type=_fisher_types, lam=_dampings)
def test_diag_equals_gradient_over_diag_fisher_plus_damping(seed, n, fisher_type, lam):
    """g / (diag F + λ) with diag F from a per-sample (per-class) autograd loop, any batch."""
    model = mlp(seed)
    x, t = batch(n, seed)
    g = plain_grad(model, x, t)
    expected = g / (torch.diagonal(dense_fisher(model, x, t, fisher_type)) + lam)
    gm = DiagNaturalGradientMaker(model, PreconditioningConfig(damping=lam), fisher_type=fisher_type)
    assert_close(maker_step(gm, model, x, t), expected)


@given(seed=st.integers(0, 10_000), n=st.integers(1, 6), fisher_type=_fisher_types, lam=_dampings,
       ema=st.sampled_from([-1, 0.5]))
def test_layerwise_equals_damped_dense_layer_blocks(seed, n, fisher_type, lam, ema):
    """(F_layer + λI)^{-1} g_layer per layer (weight and bias together), any batch; both the
    push-through path (no EMA) and the dense-block path (EMA; a first step installs F itself)."""
    model = mlp(seed)
    x, t = batch(n, seed)
    g = plain_grad(model, x, t)
    Fm = dense_fisher(model, x, t, fisher_type)
    expected = g.clone()
    for blk in layer_blocks(model):
        expected[blk] = block_solve(Fm, g, blk, lam)[blk]
    gm = LayerWiseNaturalGradientMaker(model, PreconditioningConfig(damping=lam, ema_decay=ema), fisher_type=fisher_type)
    assert_close(maker_step(gm, model, x, t), expected)


@given(seed=st.integers(0, 10_000), n=st.integers(1, 6), fisher_type=_fisher_types, lam=_dampings,
       ema=st.sampled_from([-1, 0.5]))
def test_full_equals_damped_dense_fisher_solve(seed, n, fisher_type, lam, ema):
    """(F + λI)^{-1} g over all parameters (cross-layer terms included), any batch."""
    model = mlp(seed)
    x, t = batch(n, seed)
    g = plain_grad(model, x, t)
    expected = torch.linalg.solve(dense_fisher(model, x, t, fisher_type) + lam * torch.eye(len(g)), g)
    gm = FullNaturalGradientMaker(model, PreconditioningConfig(damping=lam, ema_decay=ema), fisher_type=fisher_type)
    assert_close(maker_step(gm, model, x, t), expected)


@given(seed=st.integers(0, 10_000), n=st.integers(1, 6), lam=_dampings)
def test_emp_equals_damped_empirical_fisher_solve(seed, n, lam):
    """(F_emp + λI)^{-1} g, F_emp = (1/N) Σ g_n g_nᵀ from a per-sample autograd loop."""
    model = mlp(seed)
    x, t = batch(n, seed)
    g = plain_grad(model, x, t)
    expected = torch.linalg.solve(dense_fisher(model, x, t, "fisher_emp") + lam * torch.eye(len(g)), g)
    gm = EmpNaturalGradientMaker(model, PreconditioningConfig(damping=lam))
    assert_close(maker_step(gm, model, x, t), expected)


@pytest.mark.parametrize("model_fn", [ln_mlp, bn_eval_mlp], ids=["layernorm", "batchnorm_eval"])
@pytest.mark.parametrize("kind", ["unitwise", "kfac"])
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6), fisher_type=_fisher_types, lam=_dampings)
def test_unitwise_blocks_equal_dense_fisher_sub_blocks(model_fn, kind, seed, n, fisher_type, lam):
    """Per channel c of a LayerNorm / BatchNorm(eval): (F[(γ_c, β_c), (γ_c, β_c)] + λI)^{-1}
    (g_γc, g_βc) with the 2x2 sub-block of the dense Fisher; K-FAC treats the norm layer the same way.
    UnitWise also preconditions every Linear unit c by its block over [W[c, :], b[c]]."""
    model = model_fn(seed)
    x, t = batch(n, seed)
    g = plain_grad(model, x, t)
    Fm = dense_fisher(model, x, t, fisher_type)
    expected = g.clone()
    units = norm_units(model)
    for u in units:
        expected[u] = block_solve(Fm, g, u, lam)[u]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsupportedModuleWarning)  # UnitWise: Linear layers stay plain
        gm = make(kind, model, PreconditioningConfig(damping=lam), fisher_type)
        got = maker_step(gm, model, x, t)
    norm_idx = [i for u in units for i in u]
    assert_close(got[norm_idx], expected[norm_idx])
    if kind == "unitwise":
        for u in unit_blocks(model):
            assert_close(got[u], block_solve(Fm, g, u, lam)[u])


@given(seed=st.integers(0, 10_000), n=st.integers(6, 10), fisher_type=_fisher_types, lam=_dampings)
def test_ekfac_equals_eigenbasis_scaling_inverse(seed, n, fisher_type, lam):
    """Q diag(1/(S+λ)) Qᵀ g with Q = Q_B ⊗ Q_A from eigh of the test's K-FAC factors and
    S = diag(Qᵀ F_W Q) from the dense Fisher block (batch large enough for distinct eigenvalues)."""
    model = mlp(seed)
    x, t = batch(n, seed)
    g = plain_grad(model, x, t)
    expected = ekfac_expected(model, x, t, g, lam, fisher_type)
    gm = EkfacGradientMaker(model, PreconditioningConfig(damping=lam), fisher_type=fisher_type)
    assert_close(maker_step(gm, model, x, t), expected, rtol=1e-7, atol=1e-9)


@given(seed=st.integers(0, 10_000), n=st.integers(1, 8), fisher_type=_fisher_types, lam=_dampings)
def test_lowrank_at_full_rank_equals_dense_damped_kfac(seed, n, fisher_type, lam):
    """rank >= every dimension (8 >= 5, 4, 3): low-rank K-FAC is dense π-damped K-FAC."""
    model = mlp(seed)
    x, t = batch(n, seed)
    g = plain_grad(model, x, t)
    expected = kfac_expected(model, linear_factors(model, x, t, fisher_type), g, lam)
    gm = LowRankKfacGradientMaker(model, PreconditioningConfig(damping=lam), rank=8, fisher_type=fisher_type)
    assert_close(maker_step(gm, model, x, t), expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("kind", ["kfac", "ekfac", "lowrank", "diag", "layerwise", "full", "emp"])
def test_second_step_uses_only_the_new_batch_without_ema(kind):
    """interval 1, no EMA, after an optimizer step: step 2's preconditioned gradient is built from
    batch 2 alone at the new parameters (no stale state)."""
    model = mlp(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gm = make(kind, model, PreconditioningConfig(damping=0.05))
    (x1, t1), (x2, t2) = batch(8, 1), batch(8, 2)
    maker_step(gm, model, x1, t1)
    opt.step()
    g2 = plain_grad(model, x2, t2)
    expected = expected_preconditioned(kind, model, x2, t2, g2, 0.05)
    assert_close(maker_step(gm, model, x2, t2), expected, rtol=1e-7, atol=1e-9)


# --- EMA: F <- (1 - decay) F + decay F_new ----------------------------------------------------


def test_kfac_ema_installs_blended_factors_and_preconditions_with_them():
    """ema_decay = 0.3, two steps: the installed A, B are 0.7·(A1, B1) + 0.3·(A2, B2) and the
    second step's gradient is the damped Kronecker solve with the blended factors."""
    decay, lam = 0.3, 0.05
    model = mlp(5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gm = KfacGradientMaker(model, PreconditioningConfig(damping=lam, ema_decay=decay), fisher_type="fisher_emp")
    (x1, t1), (x2, t2) = batch(6, 1), batch(6, 2)
    f1 = linear_factors(model, x1, t1, "fisher_emp")
    maker_step(gm, model, x1, t1)
    for name, (A, B) in f1.items():  # a first step installs F1 itself
        assert_close(gm.curvature[name].A, A)
        assert_close(gm.curvature[name].B, B)
    opt.step()
    f2 = linear_factors(model, x2, t2, "fisher_emp")
    g2 = plain_grad(model, x2, t2)
    got = maker_step(gm, model, x2, t2)
    blended = {n: ((1 - decay) * f1[n][0] + decay * f2[n][0], (1 - decay) * f1[n][1] + decay * f2[n][1]) for n in f1}
    for name, (A, B) in blended.items():
        assert_close(gm.curvature[name].A, A)
        assert_close(gm.curvature[name].B, B)
    assert_close(got, kfac_expected(model, blended, g2, lam))


@pytest.mark.parametrize("kind", ["diag", "layerwise", "full", "emp", "unitwise"])
def test_dense_shapes_ema_blend(kind):
    """ema_decay = 0.3, two steps: step 2 preconditions with (0.7·F1 + 0.3·F2 + λ)^{-1} in the
    maker's shape, F1 at the step-1 parameters and F2 at the step-2 parameters."""
    decay, lam = 0.3, 0.05
    model = ln_mlp(7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsupportedModuleWarning)
        gm = make(kind, model, PreconditioningConfig(damping=lam, ema_decay=decay))
        (x1, t1), (x2, t2) = batch(5, 1), batch(5, 2)
        F1 = dense_fisher(model, x1, t1, "fisher_emp")
        maker_step(gm, model, x1, t1)
        opt.step()
        F2 = dense_fisher(model, x2, t2, "fisher_emp")
        g2 = plain_grad(model, x2, t2)
        got = maker_step(gm, model, x2, t2)
    Fb = (1 - decay) * F1 + decay * F2
    if kind == "diag":
        expected = g2 / (torch.diagonal(Fb) + lam)
    elif kind in ("full", "emp"):
        expected = torch.linalg.solve(Fb + lam * torch.eye(len(g2)), g2)
    else:
        expected = g2.clone()
        for blk in (layer_blocks(model) if kind == "layerwise" else unit_blocks(model)):
            expected[blk] = block_solve(Fb, g2, blk, lam)[blk]
    assert_close(got, expected)


# ==============================================================================================
# 5. digits: every maker reaches >= 90 % test accuracy in 300 steps
# ==============================================================================================


@pytest.mark.parametrize("kind", list(MAKERS))
def test_digits_mlp_reaches_90_percent(kind):
    """scikit-learn's digits, MLP 64-128-10, batch 64, 300 steps, seed 0, SGD lr 0.05,
    damping 0.05, default fisher_type (MC, one sample), LowRank rank 8. Curvature and inverse
    are refreshed every 5th step to keep this file fast."""
    from digits_helper import train_digits

    def make_fn(model):
        cfg = PreconditioningConfig(damping=0.05, preconditioner_upd_interval=5)
        kw = {"rank": 8} if kind == "lowrank" else {}
        return torch.optim.SGD(model.parameters(), lr=0.05), MAKERS[kind](model, cfg, seed=0, **kw)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsupportedModuleWarning)
        acc = train_digits(make_fn, steps=300, batch=64, seed=0, dtype=torch.float32)
    assert acc >= 0.90, acc


# ==============================================================================================
# 6. robustness and invalid arguments
# ==============================================================================================


def _state_tensors(gm):
    """The maker's curvature / inverse state (as saved), flattened to a list of tensors."""
    import optree

    return [x.clone() for x in optree.tree_leaves(gm.state_dict()["maker_state"]) if isinstance(x, torch.Tensor)]


@pytest.mark.parametrize("kind", list(MAKERS))
def test_nonfinite_curvature_is_not_installed_and_the_last_good_inverse_is_used(kind, monkeypatch):
    """Step 1's captured layer data is made NaN (the batch and the gradient stay finite): no new
    curvature or inverse is installed, one NonFiniteCurvatureWarning per layer, and step 1's
    gradient is preconditioned with step 0's inverse: the ground truth from batch 0 at step 0's
    parameters applied to step 1's gradient. Step 2 is back to normal."""
    lam = 0.05
    model = ln_mlp(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsupportedModuleWarning)
        gm = make(kind, model, PreconditioningConfig(damping=lam))
    (x0, t0), (x1, t1), (x2, t2) = batch(6, 0), batch(6, 1), batch(6, 2)
    maker_step(gm, model, x0, t0)
    before = _state_tensors(gm)

    original = gm._capture_pass
    poison = {"on": True}

    def nan_capture():
        data = original()
        if poison["on"]:
            for ld in data.values():
                ld.a = ld.a * float("nan")
        return data

    monkeypatch.setattr(gm, "_capture_pass", nan_capture)
    g1 = plain_grad(model, x1, t1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got1 = maker_step(gm, model, x1, t1)
        got1b = maker_step(gm, model, x1, t1)  # a second bad step: no second warning
    nonfinite = [w for w in rec if issubclass(w.category, NonFiniteCurvatureWarning)]
    layers = list(gm.preconditioned_modules) if kind not in ("full", "emp") else ["__full__"]
    assert len(nonfinite) == len(layers), [str(w.message) for w in nonfinite]
    for name in layers:
        assert sum(repr(name) in str(w.message) for w in nonfinite) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, _state_tensors(gm))), "a non-finite value was installed"
    expected1 = expected_preconditioned(kind, model, x0, t0, g1, lam)
    assert_close(got1, expected1, rtol=1e-7, atol=1e-9)
    assert torch.equal(got1, got1b)

    poison["on"] = False  # training goes on with fresh curvature
    g2 = plain_grad(model, x2, t2)
    assert_close(maker_step(gm, model, x2, t2), expected_preconditioned(kind, model, x2, t2, g2, lam),
                 rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("failure", ["raises", "nan"])
def test_kfac_failed_inverse_keeps_the_last_good_inverse(failure, monkeypatch):
    """The inversion at step 1 fails (not positive definite, or NaN entries): the new curvature
    is installed but the inverse of step 0 stays; a warning is given once; step 2 is normal."""
    lam = 0.05
    model = mlp(2)
    gm = KfacGradientMaker(model, PreconditioningConfig(damping=lam), fisher_type="fisher_emp")
    (x0, t0), (x1, t1), (x2, t2) = batch(6, 0), batch(6, 1), batch(6, 2)
    maker_step(gm, model, x0, t0)
    f0 = linear_factors(model, x0, t0, "fisher_emp")
    real = KronFactor.damped_inverse

    def bad(self, damping, heuristic="pi"):
        if failure == "raises":
            raise NotPositiveDefiniteError("injected")
        good = real(self, damping, heuristic)
        return KronInverse(good.A_inv * float("nan"), good.B_inv, good.weight_shape, good.has_bias, good.folded)

    monkeypatch.setattr(KronFactor, "damped_inverse", bad)
    g1 = plain_grad(model, x1, t1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got1 = maker_step(gm, model, x1, t1)
        maker_step(gm, model, x1, t1)
    msgs = [str(w.message) for w in rec if issubclass(w.category, NonFiniteCurvatureWarning)]
    assert len(msgs) == 2 and all("inverse" in m for m in msgs), msgs  # one per layer, once
    assert_close(got1, kfac_expected(model, f0, g1, lam))
    f1 = linear_factors(model, x1, t1, "fisher_emp")
    for name, (A, B) in f1.items():  # the (finite) curvature was installed
        assert_close(gm.curvature[name].A, A)
    monkeypatch.setattr(KronFactor, "damped_inverse", real)
    g2 = plain_grad(model, x2, t2)
    assert_close(maker_step(gm, model, x2, t2), kfac_expected(model, linear_factors(model, x2, t2, "fisher_emp"), g2, lam))


@pytest.mark.parametrize("kind", list(MAKERS))
def test_nan_batch_is_rejected_and_training_goes_on(kind):
    """A NaN batch: the curvature / inverse state is unchanged (torch.equal), a warning names each
    layer once, and the next good batch gets its exact preconditioned gradient."""
    lam = 0.05
    model = ln_mlp(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsupportedModuleWarning)
        gm = make(kind, model, PreconditioningConfig(damping=lam))
    (x0, t0), (x2, t2) = batch(6, 0), batch(6, 2)
    maker_step(gm, model, x0, t0)
    before = _state_tensors(gm)
    xn = x0.clone()
    xn[2, 1] = float("nan")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        maker_step(gm, model, xn, t0)
        maker_step(gm, model, xn, t0)
    assert all(torch.equal(a, b) for a, b in zip(before, _state_tensors(gm)))
    nonfinite = [str(w.message) for w in rec if issubclass(w.category, NonFiniteCurvatureWarning)]
    warned = [re.search(r"of '(.+?)' at step", m).group(1) for m in nonfinite]
    assert len(warned) >= 1 and len(warned) == len(set(warned)), nonfinite  # once per layer
    assert all("not installed" in m for m in nonfinite)
    g2 = plain_grad(model, x2, t2)
    got = maker_step(gm, model, x2, t2)
    assert torch.isfinite(got).all()
    assert_close(got, expected_preconditioned(kind, model, x2, t2, g2, lam), rtol=1e-7, atol=1e-9)


def test_negative_damping_is_rejected_by_the_config_and_by_the_maker():
    with pytest.raises(ValueError, match=r"damping must be >= 0"):
        PreconditioningConfig(damping=-0.1)
    cfg = PreconditioningConfig(damping=0.1)
    cfg.damping = -0.1  # edited after construction: the maker validates again
    for cls in MAKERS.values():
        with pytest.raises(ValueError, match=r"damping must be a finite number >= 0, got -0.1"):
            cls(mlp(), cfg)


@pytest.mark.parametrize("kind", [k for k in MAKERS if k != "emp"])
def test_invalid_maker_arguments_raise_at_construction(kind):
    model = mlp()
    cfg = PreconditioningConfig()
    cls = MAKERS[kind]
    with pytest.raises(ValueError, match=r"unknown fisher_type 'fisher_foo'; expected one of \['fisher_exact', 'fisher_mc', 'fisher_emp'\]"):
        cls(model, cfg, fisher_type="fisher_foo")
    with pytest.raises(ValueError, match=r"unknown loss_type 'hinge'"):
        cls(model, cfg, loss_type="hinge")
    with pytest.raises(ValueError, match=r"n_mc_samples must be a positive integer, got 0"):
        cls(model, cfg, n_mc_samples=0)


def test_invalid_kfac_and_lowrank_arguments():
    model = mlp()
    with pytest.raises(ValueError, match=r"unknown kfac_type 'shrink'; expected one of \('expand', 'reduce'\)"):
        KfacGradientMaker(model, PreconditioningConfig(), kfac_type="shrink")
    with pytest.raises(ValueError, match=r"unknown kfac_type 'shrink'"):
        EkfacGradientMaker(model, PreconditioningConfig(), kfac_type="shrink")
    with pytest.raises(ValueError, match=r"rank must be a positive integer, got 0"):
        LowRankKfacGradientMaker(model, PreconditioningConfig(), rank=0)
    with pytest.raises(ValueError, match=r"keeps no EMA.*set config.ema_decay=-1"):
        LowRankKfacGradientMaker(model, PreconditioningConfig(ema_decay=0.5))
    with pytest.raises(ValueError, match=r"unknown loss_type 'hinge'"):
        EmpNaturalGradientMaker(model, PreconditioningConfig(), loss_type="hinge")
    with pytest.raises(TypeError, match="fisher_type"):
        EmpNaturalGradientMaker(model, PreconditioningConfig(), fisher_type="fisher_mc")  # always empirical


# ==============================================================================================
# 7. ignored and unsupported modules keep exactly the plain gradient; reported once, by name
# ==============================================================================================


class Scale(nn.Module):
    """A layer with a parameter that no maker supports."""

    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.s


def named_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(4, 6), act1=nn.Tanh(), norm=nn.LayerNorm(6), fc2=nn.Linear(6, 6), scale=Scale(6),
        act2=nn.Tanh(), head=nn.Linear(6, 3),
    ))


IGNORES = {
    "instance": (lambda m: [m.fc1], {"fc1"}),
    "class": (lambda m: [nn.LayerNorm], {"norm"}),
    "name": (lambda m: ["fc2"], {"fc2"}),
    "all_three": (lambda m: [m.fc1, nn.LayerNorm, "head"], {"fc1", "norm", "head"}),
}


@pytest.mark.parametrize("how", list(IGNORES))
@pytest.mark.parametrize("kind", list(MAKERS))
def test_ignored_and_unsupported_modules_keep_the_plain_gradient(kind, how, caplog):
    """ignore_modules by instance, class or name substring, and an unsupported layer (Scale):
    their gradients are torch.equal to loss.backward()'s on every step; the other layers' are
    preconditioned (differ); the maker logs once which layers it preconditions and which not,
    and warns once, by name, about the unsupported one."""
    model = named_model()
    entries, ignored = IGNORES[how][0](model), IGNORES[how][1]
    supported = {"fc1", "norm", "fc2", "head"}  # Scale: never
    plain_expected = ({"fc1", "norm", "fc2", "scale", "head"} - supported) | ignored
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gm = make(kind, model, PreconditioningConfig(damping=0.05, ignore_modules=entries))
    with caplog.at_level(logging.INFO, logger="curvfun.precondition"), warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for s in range(3):
            x, t = batch(5, s)
            ref = copy.deepcopy(model)
            ref.zero_grad()
            F.cross_entropy(ref(x), t).backward()
            maker_step(gm, model, x, t)
            for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
                layer = name.split(".")[0]
                if layer in plain_expected:
                    assert torch.equal(p.grad, q.grad), f"{name} of a plain layer was changed"
                elif layer in supported:
                    assert not torch.allclose(p.grad, q.grad), f"{name} was not preconditioned"
            opt.step()
    reports = [r.getMessage() for r in caplog.records if r.name == "curvfun.precondition" and "preconditioning" in r.getMessage()]
    assert len(reports) == 1, reports
    report = reports[0]
    pre = [n for n in ("fc1", "norm", "fc2", "head") if n not in plain_expected]
    assert f"preconditioning {len(pre)} layer(s): {pre or 'none'}" in report
    for n in plain_expected:
        assert f"{n} (" in report.split("plain gradient for:")[1]
    for n in ignored:
        assert "ignored by config" in report.split(f"{n} (")[1].split(")")[0]
    unsupported = [str(w.message) for w in rec if issubclass(w.category, UnsupportedModuleWarning)]
    assert len([m for m in unsupported if "'scale'" in m]) == 1, unsupported


@pytest.mark.parametrize("kind", ["kfac", "ekfac", "lowrank", "diag"])
def test_under_autocast_only_the_model_runs_in_reduced_precision(kind):
    """A step inside ``torch.autocast(bfloat16)`` (the CLI's ``--amp``) installs float32 curvature
    and inverses (no non-finite warning), and its preconditioned gradient matches the float32 step
    to bf16 accuracy of the model's forward pass."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4)).float()
    x, t = torch.randn(32, 10, dtype=torch.float32), torch.randint(0, 4, (32,))
    kw = {"rank": 4} if kind == "lowrank" else {}
    grads = []
    for amp in (False, True):
        gm = MAKERS[kind](model, PreconditioningConfig(damping=1e-2), fisher_type="fisher_emp", **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error", NonFiniteCurvatureWarning)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                grads.append(maker_step(gm, model, x, t))
        assert not torch.is_autocast_enabled("cpu")
        for name, inv in gm.inverses.items():
            leaves = [v for v in optree.tree_leaves(inv, namespace="curvfun") if isinstance(v, torch.Tensor)]
            assert leaves and all(v.dtype == torch.float32 for v in leaves if v.is_floating_point()), name
    ref, got = grads
    assert got.dtype == torch.float32
    assert (got - ref).norm() <= 0.05 * ref.norm()
