"""K-FAC in data space (curvfun.kron_rows): a factor side kept as rows and inverted by Woodbury is
the same matrix as the dense factor, its inverse the same inverse, and the K-FAC maker that uses it
gives the same preconditioned gradient as the dense route (float64, random shapes)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from curvfun.kron import KronFactor, NotPositiveDefiniteError, _layer_data_of, kron_factors_from_layer
from curvfun.kron_rows import KronRowsFactor, KronRowsInverse, kron_rows_from_layer, prefer_rows, woodbury_core
from curvfun.precondition import KfacGradientMaker, PreconditioningConfig


def _data(seed, n, d_in, d_out, T, kfac_type, bias, fisher_type):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, d_out), nn.Tanh(), nn.Linear(d_out, 3))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(n, T, d_in) if T > 1 else torch.randn(n, d_in)
    t = torch.randint(0, 3, (n, T) if T > 1 else (n,))
    data = _layer_data_of(model, params, x, t, "cross_entropy", fisher_type, kfac_type, bias, 1,
                          torch.Generator().manual_seed(seed), "warn")
    return data


layer_cases = st.tuples(
    st.integers(0, 10**6),                      # seed
    st.integers(1, 5),                          # batch
    st.integers(2, 24),                         # d_in
    st.integers(2, 24),                         # d_out
    st.sampled_from([1, 3]),                    # sequence length T
    st.sampled_from(["expand", "reduce"]),
    st.sampled_from(["separate", "folded"]),
    st.sampled_from(["emp", "mc", "exact"]),
)


def _always_rows(R, d):
    return True


@settings(deadline=None)
@given(layer_cases, st.sampled_from(["both", "default"]))
def test_rows_factor_is_the_dense_factor_and_inverts_the_same(case, which):
    """to_dense of the rows form = the dense K-FAC block; the damped inverses agree as matrices and
    as products with a random gradient, and the inverse times the damped factor is the identity."""
    data = _data(*case)
    prefer = _always_rows if which == "both" else prefer_rows
    for name, ld in data.items():
        dense = kron_factors_from_layer(ld, case[5], case[6])
        rows = kron_rows_from_layer(ld, case[5], case[6], prefer=prefer)
        if which == "both":
            assert isinstance(rows, KronRowsFactor) and rows.a_rows and rows.b_rows
        torch.testing.assert_close(rows.to_dense(True), dense.to_dense(True), rtol=1e-10, atol=1e-12)
        for lam in (1e-3, 1.0):
            inv_r, inv_d = rows.damped_inverse(lam), dense.damped_inverse(lam)
            torch.testing.assert_close(inv_r.to_dense(True), inv_d.to_dense(True), rtol=1e-7, atol=1e-9)
            W = ld.module.weight
            grad = {"weight": torch.randn_like(W)}
            if ld.has_bias:
                grad["bias"] = torch.randn_like(ld.module.bias)
            got, want = inv_r.matvec(grad), inv_d.matvec(grad)
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=1e-7, atol=1e-9)
            if isinstance(rows, KronRowsFactor):
                dA, dB = rows.damping(lam)
                damped = KronFactor(rows.dense().A + dA * torch.eye(rows.A.shape[-1]),
                                    rows.dense().B + dB * torch.eye(rows.B.shape[-1]),
                                    rows.weight_shape, rows.has_bias, rows.folded)
                P = inv_r.to_dense(True) @ damped.to_dense(True)
                torch.testing.assert_close(P, torch.eye(P.shape[0]), rtol=0, atol=1e-7)


def test_prefer_rows_rule_and_fallbacks():
    assert prefer_rows(128, 784) and prefer_rows(128, 256) and not prefer_rows(129, 256)
    data = _data(0, 4, 20, 3, 1, "expand", "separate", "emp")  # A: 4 rows x 20 -> rows; B: 4 x 3 -> dense
    f = kron_rows_from_layer(data["0"])
    assert isinstance(f, KronRowsFactor) and f.a_rows and not f.b_rows
    wide = _data(0, 16, 4, 3, 1, "expand", "separate", "emp")  # more rows than width: dense
    assert isinstance(kron_rows_from_layer(wide["0"]), KronFactor)


def test_woodbury_core_refuses_nonfinite_rows():
    Y = torch.randn(3, 8)
    Y[0, 0] = float("nan")
    with pytest.raises(NotPositiveDefiniteError, match="increase the damping"):
        woodbury_core(Y, torch.tensor(1e-3))


def wide_net(seed=0, d_in=30, hidden=40):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.LayerNorm(hidden),
                         nn.Linear(hidden, 4))


def _step(gm, model, x, t):
    model.zero_grad()
    y = gm.setup_model_call(model, x)
    gm.setup_loss_call(F.cross_entropy, y, t)
    gm.forward_and_backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@settings(deadline=None, max_examples=15)
@given(st.integers(0, 10**6), st.integers(2, 8), st.sampled_from(["fisher_emp", "fisher_mc", "fisher_exact"]),
       st.sampled_from(["separate", "folded"]), st.floats(1e-4, 1.0))
def test_maker_data_space_equals_dense_route(seed, n, fisher_type, bias, damping):
    """KfacGradientMaker with data_space='auto' (rows where 2R <= d) gives the preconditioned
    gradient of data_space='never' (dense factors), with the same MC samples (same seed)."""
    model = wide_net(seed % 7)
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(n, 30, generator=g), torch.randint(0, 4, (n,), generator=g)
    out = {}
    for ds in ("auto", "never"):
        gm = KfacGradientMaker(model, PreconditioningConfig(damping=damping), fisher_type=fisher_type,
                               bias=bias, data_space=ds, seed=seed)
        out[ds] = _step(gm, model, x, t)
        kinds = {k: type(v) for k, v in gm.curvature.items()}
        if ds == "auto":
            assert kinds["0"] is KronRowsFactor and kinds["2"] is KronRowsFactor, kinds
            assert isinstance(gm.inverses["0"], KronRowsInverse)
            assert {"0", "2"} <= gm._rows_grad_checked and not gm._rows_grad_off  # gradients from rows
        else:
            assert kinds["0"] is KronFactor, kinds
    torch.testing.assert_close(out["auto"], out["never"], rtol=1e-8, atol=1e-10)


def test_maker_keeps_dense_factors_under_ema_and_rejects_bad_option():
    model = wide_net()
    x, t = torch.randn(4, 30), torch.randint(0, 4, (4,))
    gm = KfacGradientMaker(model, PreconditioningConfig(damping=1e-2, ema_decay=0.5), fisher_type="fisher_emp")
    _step(gm, model, x, t)
    _step(gm, model, x, t)
    assert all(type(v) is KronFactor for k, v in gm.curvature.items() if k in ("0", "2", "4"))
    with pytest.raises(ValueError, match="unknown data_space 'sometimes'"):
        KfacGradientMaker(model, PreconditioningConfig(), data_space="sometimes")


def test_maker_with_rows_resumes_bit_exactly():
    """Rows factors and Woodbury inverses go through torch.save / load(weights_only=True); the
    resumed run (interval 2: the inverses are reused once after loading) equals the uninterrupted."""
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 30, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(5)]
    cfg = PreconditioningConfig(damping=1e-2, preconditioner_upd_interval=2, curvature_upd_interval=2)

    def run(model, gm, opt, bs):
        for x, t in bs:
            opt.zero_grad()
            y = gm.setup_model_call(model, x)
            gm.setup_loss_call(F.cross_entropy, y, t)
            gm.forward_and_backward()
            opt.step()

    model = wide_net()
    gm = KfacGradientMaker(model, cfg, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run(model, gm, opt, batches[:3])
    assert isinstance(gm.inverses["0"], KronRowsInverse)
    buf = io.BytesIO()
    torch.save({"m": model.state_dict(), "g": gm.state_dict(), "o": opt.state_dict()}, buf)
    run(model, gm, opt, batches[3:])
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = wide_net(5)
    fresh.load_state_dict(state["m"])
    gm2 = KfacGradientMaker(fresh, cfg, seed=1)
    gm2.load_state_dict(state["g"])
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1)
    opt2.load_state_dict(state["o"])
    run(fresh, gm2, opt2, batches[3:])
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


def _run_steps(model, gm, batches, accumulate_at=()):
    outs = []
    for i, (x, t) in enumerate(batches):
        if i not in accumulate_at:
            model.zero_grad()
        y = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, y, t)
        gm.forward_and_backward()
        outs.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(outs)


@pytest.mark.parametrize("ema_decay", [-1, 0.5])
def test_gradients_from_rows_between_refreshes_and_with_accumulated_grads(ema_decay):
    """Interval 2 (rows gradients with reused inverses), EMA (dense inverses applied to rows), and a
    step that accumulates onto the previous step's .grad: equal to the plain-backward route."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 30, generator=g), torch.randint(0, 4, (5,), generator=g)) for _ in range(5)]
    cfg = PreconditioningConfig(damping=1e-3, ema_decay=ema_decay, preconditioner_upd_interval=2,
                                curvature_upd_interval=2)
    out = {}
    for ds in ("auto", "never"):
        model = wide_net(1)
        gm = KfacGradientMaker(model, cfg, data_space=ds, seed=4)
        out[ds] = _run_steps(model, gm, batches, accumulate_at=(2,))
        assert bool(gm._rows_grad_checked) == (ds == "auto")
    torch.testing.assert_close(out["auto"], out["never"], rtol=1e-9, atol=1e-12)


class TiedHead(nn.Module):
    """A Linear whose weight is also used outside its own call: the rows see only part of it."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(30, 20)
        self.out = nn.Linear(20, 4)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(h) + (x[:, :20] @ self.inp.weight[:, :20].T)[:, :4]


def test_parameter_used_outside_its_layer_goes_back_to_plain_backward():
    torch.manual_seed(0)
    x, t = torch.randn(4, 30), torch.randint(0, 4, (4,))
    out = {}
    for ds in ("auto", "never"):
        torch.manual_seed(0)
        model = TiedHead()
        gm = KfacGradientMaker(model, PreconditioningConfig(damping=1e-2), fisher_type="fisher_emp", data_space=ds)
        if ds == "auto":
            with pytest.warns(UserWarning, match="layer 'inp' is not what its own inputs"):
                out[ds] = _run_steps(model, gm, [(x, t)] * 2)
            assert gm._rows_grad_off == {"inp"}
        else:
            out[ds] = _run_steps(model, gm, [(x, t)] * 2)
    torch.testing.assert_close(out["auto"], out["never"], rtol=1e-9, atol=1e-12)


def test_kfac_form_auto_keeps_wide_sides_as_rows_with_the_same_matrices():
    import curvfun

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 5), nn.LayerNorm(5))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(6, 2, 6, 6), torch.randn(6, 5)
    dense = curvfun.kfac(model, params, x, y, loss="mse", fisher_type="exact")
    auto = curvfun.kfac(model, params, x, y, loss="mse", fisher_type="exact", form="auto")
    assert isinstance(auto["2"], KronRowsFactor) and auto["2"].a_rows  # 6 rows, width 48
    assert isinstance(auto["0"], KronFactor)  # 6·16 rows, width 18: dense
    for k in dense:
        torch.testing.assert_close(auto[k].to_dense(), dense[k].to_dense(), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="unknown form 'sparse'"):
        curvfun.kfac(model, params, x, y, loss="mse", form="sparse")


class UnusedBranch(nn.Module):
    """A wide Linear whose output never reaches the loss (an auxiliary head left out of it)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(30, 20)
        self.aux = nn.Linear(20, 40)
        self.head = nn.Linear(20, 4)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        self.last_aux = self.aux(h)
        return self.head(h)


@pytest.mark.parametrize("fisher_type", ["fisher_emp", "fisher_mc"])
def test_layer_outside_the_loss_gets_a_zero_gradient_like_the_plain_route(fisher_type):
    x, t = torch.randn(4, 30), torch.randint(0, 4, (4,))
    out = {}
    for ds in ("auto", "never"):
        torch.manual_seed(0)
        model = UnusedBranch()
        gm = KfacGradientMaker(model, PreconditioningConfig(damping=1e-2), fisher_type=fisher_type, data_space=ds,
                               seed=0)
        model.zero_grad()
        y = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, y, t)
        gm.forward_and_backward()
        out[ds] = {k: (None if p.grad is None else p.grad.clone()) for k, p in model.named_parameters()}
    for k, g in out["never"].items():
        got = out["auto"][k]
        if g is None:  # the plain route leaves .grad None; the rows route may write zeros
            assert got is None or not got.any(), k
        else:
            torch.testing.assert_close(got, g, rtol=1e-9, atol=1e-12)


@settings(deadline=None, max_examples=20)
@given(layer_cases)
def test_rows_factor_matvec_is_the_dense_product(case):
    """KronRowsFactor.matvec (rows applied as Yᵀ(Y·)) equals the dense factor's B G A, B g."""
    for ld in _data(*case).values():
        dense = kron_factors_from_layer(ld, case[5], case[6])
        rows = kron_rows_from_layer(ld, case[5], case[6], prefer=_always_rows)
        grad = {"weight": torch.randn_like(ld.module.weight)}
        if ld.has_bias:
            grad["bias"] = torch.randn_like(ld.module.bias)
        got, want = rows.matvec(grad), dense.matvec(grad)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-12)


def test_frozen_weight_with_trainable_bias_matches_the_plain_route():
    x, t = torch.randn(4, 30), torch.randint(0, 4, (4,))
    out = {}
    for ds in ("auto", "never"):
        model = wide_net(2)
        model[0].weight.requires_grad_(False)
        gm = KfacGradientMaker(model, PreconditioningConfig(damping=1e-2), fisher_type="fisher_emp", data_space=ds)
        grads = []
        for _ in range(2):
            model.zero_grad()
            y = gm.setup_model_call(model, x)
            gm.setup_loss_call(F.cross_entropy, y, t)
            gm.forward_and_backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
        out[ds] = torch.stack(grads)
        assert model[0].weight.grad is None
    torch.testing.assert_close(out["auto"], out["never"], rtol=1e-9, atol=1e-12)
    # the frozen layer's bias got its own block: (B + δ_B I)⁻¹ g_b with the dense factor B
    import curvfun

    model = wide_net(2)
    params = {k: v.detach() for k, v in model.named_parameters()}
    f = curvfun.kfac(model, params, x, t, fisher_type="emp")["0"]
    _, dB = f.damping(1e-2)
    (g_b,) = torch.autograd.grad(F.cross_entropy(model(x), t), [model[0].bias])
    want = torch.linalg.solve(f.B + dB * torch.eye(f.B.shape[0]), g_b)
    torch.testing.assert_close(out["auto"][1, :want.numel()], want, rtol=1e-8, atol=1e-10)
