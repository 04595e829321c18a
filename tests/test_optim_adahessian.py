"""AdaHessian (issue 6) against a hand computation in float64.

Ground truth: the dense Hessian of the mean loss from ``torch.autograd.functional.hessian``,
the Rademacher vectors drawn as documented (the optimizer's seeded generator, parameter by
parameter, ``randint(0, 2) * 2 - 1``), D = v ⊙ Hv averaged over a conv kernel's spatial dims,
then Adam-style moments with bias correction, Hessian power k and decoupled weight decay.
"""

from __future__ import annotations

import copy
import io
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from digits_helper import digits_data, digits_mlp  # noqa: E402

from curvfun.optim import AdaHessian  # noqa: E402

TOL = dict(rtol=1e-9, atol=1e-12)


def small_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 2 * 2, 3))


def batch(step, N=5):
    g = torch.Generator().manual_seed(10 + step)
    return torch.randn(N, 1, 4, 4, generator=g), torch.randint(0, 3, (N,), generator=g)


def dense_hessian(model, x, t):
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone() for p in model.parameters())

    def L(*ps):
        return F.cross_entropy(torch.func.functional_call(model, dict(zip(names, ps)), (x,)), t)

    H = torch.autograd.functional.hessian(L, params)
    sizes = [p.numel() for p in params]
    return torch.cat([torch.cat([H[i][j].reshape(sizes[i], sizes[j]) for j in range(len(params))], 1)
                      for i in range(len(params))], 0)


@pytest.mark.parametrize("n_samples,k,wd", [(1, 1.0, 0.0), (2, 0.5, 0.1)])
def test_two_steps_equal_hand_computation(n_samples, k, wd):
    model = small_cnn()
    ref = copy.deepcopy(model)
    lr, (b1, b2), eps, seed = 0.1, (0.8, 0.9), 1e-4, 1234
    opt = AdaHessian(model.parameters(), lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd,
                     hessian_power=k, n_samples=n_samples, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    m = [torch.zeros_like(p) for p in ref.parameters()]
    v = [torch.zeros_like(p) for p in ref.parameters()]
    for s in range(2):
        x, t = batch(s)
        opt.zero_grad()
        F.cross_entropy(model(x), t).backward(create_graph=True)
        opt.step()
        # hand computation
        H = dense_hessian(ref, x, t)
        grads = torch.autograd.grad(F.cross_entropy(ref(x), t), list(ref.parameters()))
        sizes = [p.numel() for p in ref.parameters()]
        D = torch.zeros(sum(sizes))
        for _ in range(n_samples):
            r = torch.cat([(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.dtype).reshape(-1)
                           for p in ref.parameters()])
            D += r * (H @ r) / n_samples
        with torch.no_grad():
            for i, (p, d) in enumerate(zip(ref.parameters(), torch.split(D, sizes))):
                d = d.reshape(p.shape)
                if p.ndim == 4:
                    d = d.mean((2, 3), keepdim=True).expand_as(p)
                m[i] = b1 * m[i] + (1 - b1) * grads[i]
                v[i] = b2 * v[i] + (1 - b2) * d * d
                denom = (v[i].sqrt() / (1 - b2 ** (s + 1)) ** 0.5) ** k + eps
                p -= lr * (m[i] / (1 - b1 ** (s + 1)) / denom + wd * p)
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, **TOL, msg=lambda msg: f"step {s}, {n}: {msg}")
    # the graph of the gradients is dropped after the step
    assert all(not p.grad.requires_grad for p in model.parameters())


def test_update_period_equals_hand_computation():
    """update_period=3: D from the Hutchinson draws of steps 1 and 4 (the generator advances only
    there), reused on steps 2-3 and 5-6, m and v updated every step; the reuse steps' gradients
    come without a graph (``needs_graph()``)."""
    model = small_cnn()
    ref = copy.deepcopy(model)
    lr, (b1, b2), eps, wd, seed, period = 0.1, (0.8, 0.9), 1e-4, 0.1, 99, 3
    opt = AdaHessian(model.parameters(), lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, seed=seed,
                     update_period=period)
    gen = torch.Generator().manual_seed(seed)
    m = [torch.zeros_like(p) for p in ref.parameters()]
    v = [torch.zeros_like(p) for p in ref.parameters()]
    D = None
    for s in range(6):
        x, t = batch(s)
        assert opt.needs_graph() == (s % period == 0)
        opt.zero_grad()
        F.cross_entropy(model(x), t).backward(create_graph=opt.needs_graph())
        opt.step()
        grads = torch.autograd.grad(F.cross_entropy(ref(x), t), list(ref.parameters()))
        if s % period == 0:
            H = dense_hessian(ref, x, t)
            r = torch.cat([(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.dtype).reshape(-1)
                           for p in ref.parameters()])
            D = [d.reshape(p.shape) for p, d in zip(ref.parameters(), torch.split(r * (H @ r), [p.numel() for p in ref.parameters()]))]
            D = [d.mean((2, 3), keepdim=True).expand_as(d) if d.ndim == 4 else d for d in D]
        with torch.no_grad():
            for i, (p, d) in enumerate(zip(ref.parameters(), D)):
                m[i] = b1 * m[i] + (1 - b1) * grads[i]
                v[i] = b2 * v[i] + (1 - b2) * d * d
                denom = v[i].sqrt() / (1 - b2 ** (s + 1)) ** 0.5 + eps
                p -= lr * (m[i] / (1 - b1 ** (s + 1)) / denom + wd * p)
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, **TOL, msg=lambda msg: f"step {s}, {n}: {msg}")


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_trains_digits(one_thread):
    xtr, ytr, xte, yte = digits_data(torch.float32)
    model = digits_mlp(0, torch.float32)
    opt = AdaHessian(model.parameters(), seed=0)  # defaults: lr=0.15
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(ytr), (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(xtr[idx]), ytr[idx]).backward(create_graph=True)
        opt.step()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    assert acc >= 0.9, acc


@pytest.mark.parametrize("period", [1, 4])  # saved after step 3: mid-period for 4
def test_resume_is_bit_exact(period):
    def run(steps, start=None):
        model = small_cnn()
        opt = AdaHessian(model.parameters(), lr=0.05, n_samples=2, seed=7, update_period=period)
        if start is not None:
            model.load_state_dict(start[0])
            opt.load_state_dict(torch.load(io.BytesIO(start[1]), weights_only=True))
        for s in range(*steps):
            x, t = batch(s)
            opt.zero_grad()
            F.cross_entropy(model(x), t).backward(create_graph=True)
            opt.step()
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        return model, (copy.deepcopy(model.state_dict()), buf.getvalue())

    full, _ = run((0, 6))
    _, saved = run((0, 3))
    resumed, _ = run((3, 6), saved)
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n


def test_without_create_graph_raises():
    model = small_cnn()
    opt = AdaHessian(model.parameters(), seed=0)
    x, t = batch(0)
    F.cross_entropy(model(x), t).backward()
    with pytest.raises(RuntimeError, match=r"backward\(create_graph=True\)"):
        opt.step()


def test_bad_input_raises_with_message():
    params = list(small_cnn().parameters())
    cases = [
        (dict(lr=-0.1), ValueError, "Invalid learning rate"),
        (dict(eps=-1.0), ValueError, "Invalid epsilon"),
        (dict(betas=(1.0, 0.9)), ValueError, "beta parameter at index 0"),
        (dict(betas=(0.9, -0.1)), ValueError, "beta parameter at index 1"),
        (dict(hessian_power=1.5), ValueError, "Invalid Hessian power"),
        (dict(n_samples=0), ValueError, "Invalid n_samples"),
        (dict(weight_decay=-1.0), ValueError, "Invalid weight_decay"),
        (dict(seed=1.5), TypeError, "seed must be an int"),
        (dict(update_period=0), ValueError, "Invalid update_period: 0 \\(expected an int >= 1"),
        (dict(update_period=2.0), ValueError, "Invalid update_period"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            AdaHessian(params, **kw)
    sd = AdaHessian(params, seed=0).state_dict()
    del sd["curvfun.adahessian.generator"]
    with pytest.raises(ValueError, match="generator"):
        AdaHessian(params, seed=0).load_state_dict(sd)
