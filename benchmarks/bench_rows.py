"""Rows routes (issue 14): Jacobian and full GGN linear in N, the Jacobian against C calls of
per_sample_grads, the public GGN / exact-Fisher diagonal against a forward+backward (and
BackPACK's DiagGGNExact where importable), the full GGN of a small CNN against ASDL's (and
BackPACK's). One thread, ratios against baselines measured in the same run.

``python benchmarks/bench_rows.py [--quick]``. BackPACK is a benchmark-only dependency: put an
installation on ``PYTHONPATH`` (e.g. ``pip install --no-deps --target /tmp/bp backpack-for-pytorch
einops unfoldNd``, which leaves the torch build alone); its rows are left out otherwise.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import batch, cnn, median_time, mlp, setup, table  # noqa: E402

import curvfun  # noqa: E402


def small_cnn() -> nn.Module:
    """P = 1,394: two 3x3 convs (8 channels) on 1x12x12 with ReLU and 2x2 max-pool, a Linear head."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 3 * 3, 10),
    )


def small_batch(n: int):
    return torch.randn(n, 1, 12, 12), torch.randint(0, 10, (n,))


def _fwd_bwd(model, x, y):
    def run():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    return run


def scaling(quick: bool) -> None:
    """Time at N against time at N/2: 2x per doubling is linear (the former jacrev route: ~4x)."""
    model = small_cnn()
    params = dict(model.named_parameters())
    rows = []
    prev = None
    for n in (50, 100, 200, 400):
        x, y = small_batch(n)
        tj = median_time(lambda: curvfun.jacobian(model, params, x), 1, 3 if quick else 7)
        tg = median_time(lambda: curvfun.ggn(model, params, x, y), 1, 3 if quick else 7)
        rj, rg = (1.0, 1.0) if prev is None else (tj / prev[0], tg / prev[1])
        rows.append((f"jacobian        N={n:<4} (t_N / t_N/2)", tj, rj))
        rows.append((f"ggn full        N={n:<4} (t_N / t_N/2)", tg, rg))
        prev = (tj, tg)
    table(f"small CNN (P = {sum(p.numel() for p in params.values())}): scaling in N (2x per doubling = linear)",
          rows)


def jacobian_vs_psg(quick: bool) -> None:
    out = []
    for name, model, (x, y) in (("small CNN N=400", small_cnn(), small_batch(400)),
                                ("CNN (common, P=60k) N=400", cnn(), batch("cnn", 400))):
        params = dict(model.named_parameters())
        C = 10
        cols = [torch.full_like(y, c) for c in range(C)]

        def psg_c():
            for t in cols:  # C calls, one per class (the cost of one Jacobian row block each)
                curvfun.per_sample_grads(model, params, x, t)

        reps = 3 if quick or name.startswith("CNN") else 7  # the big one: ~1 GB Jacobian, seconds each
        t_psg = median_time(psg_c, 1, reps)
        t_j = median_time(lambda: curvfun.jacobian(model, params, x), 1, reps)
        out.append((f"{name}: {C} x per_sample_grads", t_psg, 1.0))
        out.append((f"{name}: jacobian", t_j, t_j / t_psg))
    table("jacobian against C calls of per_sample_grads (target <= 1.5x)", out)


def _backpack_diag(model, x, y):
    try:
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact
    except ImportError:
        return None
    m = extend(copy.deepcopy(model))  # BackPACK hooks stay on the module: its own copy
    lf = extend(nn.CrossEntropyLoss())

    def run():
        m.zero_grad(set_to_none=True)
        with backpack(DiagGGNExact()):
            lf(m(x), y).backward()
    return run


def diagonal(quick: bool) -> None:
    out = []
    for name in ("mlp", "cnn"):
        torch.manual_seed(0)
        model = mlp() if name == "mlp" else cnn()
        params = dict(model.named_parameters())
        x, y = batch(name, 128)
        t_fb = median_time(_fwd_bwd(model, x, y), 2, 5 if quick else 15)
        t_g = median_time(lambda: curvfun.ggn(model, params, x, y, shape="diag"), 1, 3 if quick else 9)
        t_f = median_time(lambda: curvfun.fisher(model, params, x, y, fisher_type="exact", shape="diag"), 1,
                          3 if quick else 9)
        out.append((f"{name} N=128: forward+backward", t_fb, 1.0))
        out.append((f"{name} N=128: ggn(shape='diag')", t_g, t_g / t_fb))
        out.append((f"{name} N=128: fisher(exact, shape='diag')", t_f, t_f / t_fb))
        bp = _backpack_diag(model, x, y)
        if bp is not None:
            t_b = median_time(bp, 1, 3 if quick else 9)
            out.append((f"{name} N=128: BackPACK DiagGGNExact", t_b, t_b / t_fb))
            out.append((f"{name} N=128: ggn diag / BackPACK", t_g, t_g / t_b))
    if not any("BackPACK" in r[0] for r in out):
        print("\n[BackPACK not importable: its DiagGGNExact rows are left out]")
    table("GGN / exact-Fisher diagonal through the public function (ratio to forward+backward; "
          "target <= 1.2x BackPACK)", out)


def _asdl_full(model, x, y):
    try:
        import asdl
        from asdl.fisher import FisherConfig, get_fisher_maker
    except ImportError:
        return None
    fm = get_fisher_maker(model, FisherConfig(fisher_type=asdl.FISHER_EXACT, fisher_shapes=[asdl.SHAPE_FULL],
                                              loss_type=asdl.LOSS_CROSS_ENTROPY, data_size=x.shape[0]))

    def run():
        dummy = fm.setup_model_call(model, x)
        fm.setup_loss_call(F.cross_entropy, dummy, y)
        fm.forward_and_backward()
        return model.fisher.data
    return run


def _backpack_full(model, x, y):
    """BackPACK's SqrtGGNExact rows ``[C, N, *shape]`` per parameter, then VᵀV."""
    try:
        from backpack import backpack, extend
        from backpack.extensions import SqrtGGNExact
    except ImportError:
        return None
    m = extend(copy.deepcopy(model))
    lf = extend(nn.CrossEntropyLoss(reduction="sum"))
    N = x.shape[0]

    def run():
        m.zero_grad(set_to_none=True)
        with backpack(SqrtGGNExact()):
            lf(m(x), y).backward()
        V = torch.cat([p.sqrt_ggn_exact.reshape(p.sqrt_ggn_exact.shape[0] * N, -1) for p in m.parameters()], 1)
        return V.T @ V / N
    return run


def full_ggn(quick: bool) -> None:
    torch.manual_seed(0)
    model = small_cnn()
    params = dict(model.named_parameters())
    x, y = small_batch(500)
    t_g = median_time(lambda: curvfun.ggn(model, params, x, y), 1, 3 if quick else 9)
    out = [("curvfun ggn(shape='full')", t_g, 1.0)]
    bp = _backpack_full(model, x, y)  # before ASDL: its maker leaves backward hooks on the model
    run = _asdl_full(model, x, y)
    if run is not None:
        G = curvfun.ggn(model, params, x, y)
        A = run()
        err = ((A - G).norm() / G.norm()).item()
        t_a = median_time(run, 1, 3 if quick else 9)
        out.append((f"ASDL fisher_exact SHAPE_FULL (rel. diff {err:.1e})", t_a, t_a / t_g))
        out.append(("curvfun / ASDL", t_g, t_g / t_a))
    if bp is not None:
        err = ((bp() - curvfun.ggn(model, params, x, y)).norm() / curvfun.ggn(model, params, x, y).norm()).item()
        t_b = median_time(bp, 1, 3 if quick else 9)
        out.append((f"BackPACK SqrtGGNExact, VᵀV (rel. diff {err:.1e})", t_b, t_b / t_g))
        out.append(("curvfun / BackPACK", t_g, t_g / t_b))
    table(f"full GGN, small CNN (P = {sum(p.numel() for p in params.values())}), N = 500, 10 classes "
          f"(target curvfun <= 1.0x ASDL / BackPACK)", out)


def main(quick: bool = False) -> None:
    setup(threads=1)
    scaling(quick)
    jacobian_vs_psg(quick)
    diagonal(quick)
    full_ggn(quick)


if __name__ == "__main__":
    main("--quick" in sys.argv)
