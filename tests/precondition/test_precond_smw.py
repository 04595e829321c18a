"""SmwEmpNaturalGradientMaker and curvfun.smw: the dense damped empirical-Fisher solve in float64,
training, README loop, resume, bad input."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn

from curvfun.precondition import PreconditioningConfig
from curvfun.precondition.smw import SmwEmpNaturalGradientMaker
from curvfun.smw import layer_gram, smw_coefficients
from curvfun.testing import checks, reference as ref
from digits_helper import train_digits
from zoo import NAMES, build
from maker_checks import check_resume_bit_exact, run_readme_loop


pytestmark = pytest.mark.usefixtures("one_thread")


class Scale(nn.Module):
    """A layer the capture does not know (per-sample gradients by the batched fallback)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.weight


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.norm = nn.LayerNorm(16)
        self.scale = Scale(16)
        self.fc = nn.Linear(16, 3)
        self.extra = nn.Linear(3, 3, bias=False)

    def forward(self, x):
        h = F.avg_pool2d(torch.tanh(self.conv(x)), 2).flatten(1)  # 4 x 2 x 2
        return self.extra(torch.tanh(self.fc(self.scale(self.norm(h)))))


def mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def data(N, conv, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 2, 4, 4, generator=g) if conv else torch.randn(N, 4, generator=g)
    return x, torch.randint(0, 3, (N,), generator=g)


def dense_reference(model, x, t, damping, keys, reduction="mean"):
    """(F_emp + λI)^{-1} ḡ over ``keys`` from an autograd loop over samples; plain gradient elsewhere."""
    params = dict(model.named_parameters())
    rows = []
    for n in range(len(t)):
        gs = torch.autograd.grad(F.cross_entropy(model(x[n:n + 1]), t[n:n + 1]), [params[k] for k in keys])
        rows.append(torch.cat([g.flatten() for g in gs]))
    U = torch.stack(rows)  # N x P
    N, P = U.shape
    if reduction == "mean":
        Fm, g = U.T @ U / N, U.mean(0)
    else:
        Fm, g = U.T @ U, U.sum(0)
    sol = torch.linalg.solve(Fm + damping * torch.eye(P), g)
    out, i = {}, 0
    for k in keys:
        out[k] = sol[i:i + params[k].numel()].reshape(params[k].shape)
        i += params[k].numel()
    loss = F.cross_entropy(model(x), t, reduction=reduction)
    for k in params:
        if k not in out:
            out[k] = torch.autograd.grad(loss, params[k], retain_graph=True)[0]
    return out


def step(gm, model, x, t, loss_fn=F.cross_entropy, **kw):
    model.zero_grad()
    y = gm.setup_model_call(model, x)
    gm.setup_loss_call(loss_fn, y, t, **kw)
    return gm.forward_and_backward()


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("N", [3, 40])  # fewer and more samples than parameters (mlp: 43)
def test_equals_dense_solve(conv, N):
    torch.manual_seed(0)
    model = ConvNet() if conv else mlp()
    x, t = data(N, conv)
    lam = 0.05
    gm = SmwEmpNaturalGradientMaker(model, PreconditioningConfig(damping=lam))
    keys = [k for k, _ in model.named_parameters()]
    want = dense_reference(model, x, t, lam, keys)
    _, loss = step(gm, model, x, t)
    assert torch.allclose(loss, F.cross_entropy(model(x), t), rtol=1e-12)
    for k, p in model.named_parameters():
        assert torch.allclose(p.grad, want[k], rtol=1e-8, atol=1e-11), k


def test_sum_reduction_and_ignored_layer():
    torch.manual_seed(0)
    model = ConvNet()
    x, t = data(5, True)
    lam = 0.1
    gm = SmwEmpNaturalGradientMaker(model, PreconditioningConfig(damping=lam, ignore_modules=[model.extra]))
    keys = [k for k, _ in model.named_parameters() if not k.startswith("extra")]
    want = dense_reference(model, x, t, lam, keys, reduction="sum")
    step(gm, model, x, t, reduction="sum")
    for k, p in model.named_parameters():
        assert torch.allclose(p.grad, want[k], rtol=1e-8, atol=1e-11), k


@given(N=st.integers(1, 5), T=st.integers(1, 4), d=st.integers(1, 4), o=st.integers(1, 4), groups=st.integers(1, 2),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_layer_gram_is_gram_of_per_sample_grads(N, T, d, o, groups, bias, seed):
    g_ = torch.Generator().manual_seed(seed)
    a = torch.randn(N, groups, T, d, generator=g_)
    g = torch.randn(N, groups, T, o, generator=g_)
    U = torch.einsum("ngto,ngtd->ngod", g, a).reshape(N, -1)
    if bias:
        U = torch.cat([U, g.sum(2).reshape(N, -1)], 1)
    assert torch.allclose(layer_gram(a, g, bias), U @ U.T, atol=1e-10)


def test_smw_coefficients_push_through():
    g_ = torch.Generator().manual_seed(0)
    U = torch.randn(6, 9, generator=g_)
    c = smw_coefficients(U @ U.T, 0.3, 1 / 6)
    direct = torch.linalg.solve(U.T @ U / 6 + 0.3 * torch.eye(9), U.mean(0))
    assert torch.allclose(U.T @ c, direct, atol=1e-12)


def test_trains_digits():
    """lr 0.1 and damping 1.0 (the damped natural gradient of a mean loss, F + I)."""
    acc = train_digits(
        lambda m: (torch.optim.SGD(m.parameters(), lr=0.1),
                   SmwEmpNaturalGradientMaker(m, PreconditioningConfig(damping=1.0))),
        dtype=torch.float32,
    )
    assert acc >= 0.90, acc


def test_readme_loop():
    torch.manual_seed(0)
    x, t = data(16, True)
    ns = run_readme_loop("SmwEmpNaturalGradientMaker", ConvNet, [(x, t)] * 6)
    assert ns["gm"].step == 6


def test_resume_is_bit_exact():
    gm2 = check_resume_bit_exact(
        ConvNet, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        lambda m: SmwEmpNaturalGradientMaker(m, PreconditioningConfig(damping=0.1)),
        [data(8, True, seed=s) for s in range(5)], 2, keep_training=False)
    assert gm2.step == 5


def test_bad_input():
    model = mlp()
    with pytest.raises(ValueError, match="needs damping > 0"):
        SmwEmpNaturalGradientMaker(model, PreconditioningConfig(damping=0.0))
    with pytest.raises(ValueError, match="the preconditioner schedule must refresh every step"):
        SmwEmpNaturalGradientMaker(model, PreconditioningConfig(preconditioner_upd_interval=5))
    with pytest.raises(ValueError, match="leave ema_decay=-1"):
        SmwEmpNaturalGradientMaker(model, PreconditioningConfig(ema_decay=0.9))
    bn = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    gm = SmwEmpNaturalGradientMaker(bn, PreconditioningConfig(damping=0.1))
    x, t = data(4, False)
    with pytest.raises(ValueError, match="BatchNorm in train mode"):
        step(gm, bn, x, t)
    with pytest.raises(ValueError, match="reduction 'mean' or 'sum'"):
        step(gm, bn.eval(), x, t, reduction="none")


class TokenModel(nn.Module):
    """Embedding + a position-wise Tanh-Linear head: output [B, T, V] (a language model's shape)."""

    def __init__(self, V=7, d=5):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.head = nn.Linear(d, V)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)))


def test_loss_over_flattened_positions_uses_the_models_samples():
    """logits.view(-1, V) with targets.reshape(-1) (the CLI's language models): the samples are the
    model's B sequences, each loss the sum of its positions', so the result is the dense damped
    empirical-Fisher solve over per-sequence gradients (of the mean over all tokens)."""
    torch.manual_seed(0)
    B, T, V, lam = 4, 3, 7, 0.05
    model = TokenModel(V)
    x, t = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    gm = SmwEmpNaturalGradientMaker(model, PreconditioningConfig(damping=lam))
    model.zero_grad()
    y = gm.setup_model_call(model, x)
    gm.setup_loss_call(F.cross_entropy, y.view(-1, V), t.reshape(-1))
    gm.forward_and_backward()
    params = dict(model.named_parameters())
    rows = []
    for b in range(B):  # ell_b = mean over its T tokens, so the objective is the mean over all B·T
        gs = torch.autograd.grad(F.cross_entropy(model(x[b:b + 1]).view(-1, V), t[b]), list(params.values()))
        rows.append(torch.cat([g.flatten() for g in gs]))
    U = torch.stack(rows)
    want = torch.linalg.solve(U.T @ U / B + lam * torch.eye(U.shape[1]), U.mean(0))
    got = torch.cat([p.grad.flatten() for p in params.values()])
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-11)


def test_loss_rows_not_a_multiple_of_the_batch_is_an_error():
    model = TokenModel()
    gm = SmwEmpNaturalGradientMaker(model, PreconditioningConfig(damping=0.1))
    x = torch.randint(0, 7, (4, 3))
    y = gm.setup_model_call(model, x)
    gm.setup_loss_call(lambda out, t, reduction="mean": F.cross_entropy(out.reshape(-1, 7)[:5], t, reduction=reduction),
                       y, torch.randint(0, 7, (5,)))
    with pytest.raises(ValueError, match="the loss has 5 per-sample losses but the model's batch has 4"):
        gm.forward_and_backward()


@pytest.mark.parametrize("name", NAMES)
def test_equals_dense_solve_on_the_zoo(name):
    """(F_emp + λI)^{-1} g over the preconditioned parameters, F_emp from the autograd loop, on
    every zoo model: attention in every form, an LSTM, convolutions, a frozen weight, and an
    embedding also read as the head (its layer Gram from the lookup alone would miss that use)."""
    model, x, y, _ = build(name, n=5)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    lam = 0.1
    gm = SmwEmpNaturalGradientMaker(model, PreconditioningConfig(damping=lam))
    owned = {id(p) for n in gm.preconditioned_modules for p in gm.module_params(n).values()}
    keys = [k for k, p in params.items() if id(p) in owned]
    raw = dict(zip(params, torch.autograd.grad(F.cross_entropy(model(x), y), list(params.values()))))
    Fm = ref.fisher(model, {k: params[k] for k in keys}, x, y, fisher_type="emp")
    g = torch.cat([raw[k].reshape(-1) for k in keys])
    expected = torch.linalg.solve(Fm + lam * torch.eye(len(g), dtype=g.dtype), g)
    model.zero_grad()
    dummy_y = gm.setup_model_call(model, x)
    gm.setup_loss_call(F.cross_entropy, dummy_y, y)
    gm.forward_and_backward()
    got = torch.cat([params[k].grad.reshape(-1) for k in keys])
    checks.assert_close(got, expected, rtol=1e-9, atol=1e-12, what=f"SMW natural gradient on {name}")
