"""CUDA paths: every maker and optimizer on a GPU agrees with the same run on the CPU.

Skipped where no CUDA device is present (CI has none; run on a GPU machine with
``python -m pytest tests/test_cuda.py``). Deterministic methods (empirical Fisher, no random
probes) run three steps on each device in float64 and must agree to 1e-8 relative; methods that
draw random numbers (MC Fisher, PSGD, SENG, AdaHessian) draw them from a generator on the model's
device, so CPU and CUDA streams differ: for those the CUDA run must keep every parameter finite,
move every parameter, and resume bit-exactly from a state dict saved on the GPU.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvfun import kfac, per_sample_grads
from curvfun.optim import AdaFisher, AdaFisherW, AdaHessian
from curvfun import precondition as P
from maker_checks import train_steps

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

CUDA = torch.device("cuda")
DTYPE = torch.float64


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
        nn.Linear(3 * 5 * 5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 4),
    ).to(DTYPE)


def batches(n: int = 3, bs: int = 8):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(bs, 2, 5, 5, generator=g, dtype=DTYPE),
             torch.randint(0, 4, (bs,), generator=g)) for _ in range(n)]


def cfg(**kw):
    kw.setdefault("damping", 1e-2)
    kw.setdefault("data_size", 8)
    return P.PreconditioningConfig(**kw)


# name -> factory(model) -> (optimizer, maker); deterministic methods only
DETERMINISTIC = {
    "kfac": lambda m: P.KfacGradientMaker(m, cfg(), fisher_type="fisher_emp"),
    "ekfac": lambda m: P.EkfacGradientMaker(m, cfg(), fisher_type="fisher_emp"),
    "diag": lambda m: P.DiagNaturalGradientMaker(m, cfg(), fisher_type="fisher_emp"),
    "unitwise": lambda m: P.UnitWiseNaturalGradientMaker(m, cfg(), fisher_type="fisher_emp"),
    "layerwise": lambda m: P.LayerWiseNaturalGradientMaker(m, cfg(), fisher_type="fisher_emp"),
    "full": lambda m: P.FullNaturalGradientMaker(m, cfg(), fisher_type="fisher_emp"),
    "emp": lambda m: P.EmpNaturalGradientMaker(m, cfg()),
    "shampoo": lambda m: P.ShampooGradientMaker(m, cfg()),
    "smw": lambda m: P.SmwEmpNaturalGradientMaker(m, cfg()),
    "newton": lambda m: P.NewtonGradientMaker(m, cfg(damping=1.0)),
    "kbfgs": lambda m: P.KronBfgsGradientMaker(m, cfg()),
    "curveball": lambda m: P.CurveBallGradientMaker(m, cfg()),
    "plain": lambda m: P.GradientMaker(m),
}

RANDOM = {
    "kfac_mc": lambda m: P.KfacGradientMaker(m, cfg(), fisher_type="fisher_mc"),
    "lowrank_mc": lambda m: P.LowRankKfacGradientMaker(m, cfg(), rank=2),
    "psgd": lambda m: P.KronPsgdGradientMaker(m, cfg()),
    "seng": lambda m: P.SengGradientMaker(m, cfg(), sketching_size=4, truncated_rank=2),
}


def run(model, maker, batches_, device, opt=None):
    """SGD steps through the maker on ``device``; returns the optimizer."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05) if opt is None else opt
    train_steps(model, opt, maker, [(x.to(device), t.to(device)) for x, t in batches_])
    return opt


# per-sample-gradient methods refuse BatchNorm in train mode (it mixes the samples): eval mode
NEEDS_EVAL = {"smw", "seng"}


def _build(factory, device, name=""):
    model = net().to(device)
    if name in NEEDS_EVAL:
        model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        maker = factory(model)
    return model, maker


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_deterministic_maker_cuda_equals_cpu(name):
    data = batches()
    m_cpu, g_cpu = _build(DETERMINISTIC[name], "cpu", name)
    m_gpu, g_gpu = _build(DETERMINISTIC[name], CUDA, name)
    run(m_cpu, g_cpu, data, "cpu")
    run(m_gpu, g_gpu, data, CUDA)
    for (n, p), q in zip(m_cpu.named_parameters(), m_gpu.parameters()):
        assert q.device.type == "cuda"
        torch.testing.assert_close(q.cpu(), p, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {n}\n{m}")


@pytest.mark.parametrize("name", sorted(RANDOM))
def test_random_maker_cuda_trains_and_resumes_bit_exactly(name):
    data = batches(4)
    model, maker = _build(RANDOM[name], CUDA, name)
    before = [p.detach().clone() for p in model.parameters()]
    opt = run(model, maker, data[:2], CUDA)
    for p, b in zip(model.parameters(), before):
        assert torch.isfinite(p).all() and not torch.equal(p, b)
    buf = io.BytesIO()
    torch.save({"m": model.state_dict(), "g": maker.state_dict(), "o": opt.state_dict()}, buf)
    run(model, maker, data[2:], CUDA)  # uninterrupted
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh, fresh_maker = _build(RANDOM[name], CUDA, name)
    fresh.load_state_dict(state["m"])
    fresh_maker.load_state_dict(state["g"])
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.05)
    fresh_opt.load_state_dict(state["o"])
    run(fresh, fresh_maker, data[2:], CUDA, fresh_opt)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [AdaFisher, AdaFisherW])
def test_adafisher_cuda_equals_cpu(cls):
    data = batches()
    results = []
    for device in ("cpu", CUDA):
        model = net().to(device)
        opt = cls(model, lr=1e-2, TCov=2)
        for x, t in data:
            opt.zero_grad()
            F.cross_entropy(model(x.to(device)), t.to(device)).backward()
            opt.step()
        results.append([p.detach().cpu() for p in model.parameters()])
    for p, q in zip(*results):
        torch.testing.assert_close(q, p, rtol=1e-8, atol=1e-10)


def test_adahessian_cuda_runs_finite():
    model = net().to(CUDA)
    opt = AdaHessian(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    for x, t in batches():
        opt.zero_grad()
        F.cross_entropy(model(x.to(CUDA)), t.to(CUDA)).backward(create_graph=True)
        opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.isfinite(p).all() and not torch.equal(p, b)


def test_functions_cuda_equal_cpu():
    x, t = batches(1)[0]
    out = {}
    for device in ("cpu", CUDA):
        model = net().to(device).eval()
        params = {k: v.detach() for k, v in model.named_parameters()}
        g = per_sample_grads(model, params, x.to(device), t.to(device), loss="cross_entropy")
        f = kfac(model, params, x.to(device), t.to(device), loss="cross_entropy",
                 fisher_type="emp")
        out[str(device)] = (g, {k: v.to_dense() for k, v in f.items()})
    (g0, f0), (g1, f1) = out["cpu"], out["cuda"]
    for k in g0:
        torch.testing.assert_close(g1[k].cpu(), g0[k], rtol=1e-9, atol=1e-12)
    assert f0.keys() == f1.keys()
    for k in f0:
        torch.testing.assert_close(f1[k].cpu(), f0[k], rtol=1e-9, atol=1e-12)


def _wide_mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 24), nn.Tanh(), nn.Linear(24, 3)).to(DTYPE)


ROWS = {  # makers whose data-space route applies to a wide layer at a small batch
    "kfac_rows": lambda m: P.KfacGradientMaker(m, cfg(), fisher_type="fisher_emp"),
    "shampoo_rows": lambda m: P.ShampooGradientMaker(m, cfg()),
}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_rows_route_cuda_equals_cpu(name):
    """The data-space routes (rows instead of the formed gradient) on CUDA: three steps of a
    40-30-24-3 MLP at batch 4 equal the CPU run to 1e-8, and the route was taken (``_rows_seen``)
    by the same layers on both devices, layer 0 among them."""
    factory = ROWS[name]
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(4, 40, generator=g, dtype=DTYPE), torch.randint(0, 3, (4,), generator=g)) for _ in range(3)]
    runs = {}
    for device in ("cpu", CUDA):
        model = _wide_mlp().to(device)
        maker = factory(model)
        run(model, maker, data, device)
        runs[str(device)] = (model, maker)
    assert "0" in runs["cuda"][1]._rows_seen
    assert runs["cuda"][1]._rows_seen == runs["cpu"][1]._rows_seen
    for (n, p), q in zip(runs["cpu"][0].named_parameters(), runs["cuda"][0].parameters()):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {n}\n{m}")
