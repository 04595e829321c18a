"""K-FAC in data space (curvfun.kron_rows): a factor side kept as rows and inverted by Woodbury is
the same matrix as the dense factor, its inverse the same inverse, and the K-FAC maker that uses it
gives the same preconditioned gradient as the dense route (float64, random shapes)."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from curvfun.kron import KronFactor, NotPositiveDefiniteError
from curvfun.kron_drivers import _layer_data_of
from curvfun.kron_math import kron_factors_from_layer
from curvfun.kron_rows import KronRowsFactor, KronRowsInverse, kron_rows_from_layer, prefer_rows, woodbury_core
from curvfun.precondition import KfacGradientMaker, NonFiniteCurvatureWarning, PreconditioningConfig
from rows_models import CentredWeightLinear, Detached, KeywordCall, LoRALinear, Siamese


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
            assert {"0", "2"} <= gm._rows_seen  # gradients from rows
        else:
            assert kinds["0"] is KronFactor, kinds
            assert not gm._rows_seen
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
    assert {"0", "2"} <= gm._rows_seen and {"0", "2"} <= gm2._rows_seen
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
        assert ({"0", "2"} <= gm._rows_seen) if ds == "auto" else not gm._rows_seen, gm._rows_seen
    torch.testing.assert_close(out["auto"], out["never"], rtol=1e-9, atol=1e-12)


def _kfac_routes(model, batches, loss_for=None, fisher_type="fisher_emp", interval=1, bias="separate"):
    """Train deep copies of ``model`` with data_space="auto" and "never" (SGD, lr 0.01, damping 1e-2,
    the same MC seed), any warning an error. ``loss_for(m, i)``: the loss function of step i for copy
    m (default cross-entropy). Asserts that every step's .grads (None where the dense route's are)
    and the parameters after it agree to 1e-9 relative to the largest entry; returns the makers and
    models."""
    models = {ds: copy.deepcopy(model) for ds in ("auto", "never")}
    cfg = PreconditioningConfig(damping=1e-2, preconditioner_upd_interval=interval, curvature_upd_interval=interval)
    gms = {ds: KfacGradientMaker(m, cfg, fisher_type=fisher_type, bias=bias, data_space=ds, seed=0)
           for ds, m in models.items()}
    opts = {ds: torch.optim.SGD(m.parameters(), lr=0.01) for ds, m in models.items()}  # no saturated softmax
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=r".*layer 'inp' uses \['weight'\] also outside")  # TiedHead
        for i, (x, t) in enumerate(batches):
            grads = {}
            for ds, m in models.items():
                opts[ds].zero_grad()
                y = gms[ds].setup_model_call(m, x)
                gms[ds].setup_loss_call(F.cross_entropy if loss_for is None else loss_for(m, i), y, t)
                gms[ds].forward_and_backward()
                grads[ds] = {n: None if p.grad is None else p.grad.clone() for n, p in m.named_parameters()}
                opts[ds].step()
            for n, want in grads["never"].items():
                got = grads["auto"][n]
                assert (got is None) == (want is None), (i, n, got, want)
                if want is not None:
                    _close(got, want, f"step {i} grad {n}")
            for (n, p), q in zip(models["auto"].named_parameters(), models["never"].parameters()):
                _close(p.detach(), q.detach(), f"after step {i}: {n}")
    assert not gms["never"]._rows_seen
    return gms, models


def _close(got, want, what, rtol=1e-9):
    """Relative to the largest entry of ``want``."""
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()) + 1e-300,
                               msg=lambda m: f"{what}: {m}")


class TiedHead(nn.Module):
    """A Linear whose weight is also used outside its own call: the rows see only part of it."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(30, 20)
        self.out = nn.Linear(20, 4)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(h) + (x[:, :20] @ self.inp.weight[:, :20].T)[:, :4]


@pytest.mark.parametrize("fisher_type, interval, bias", [("fisher_emp", 1, "separate"), ("fisher_mc", 1, "folded"),
                                                         ("fisher_emp", 2, "folded")])
def test_parameter_used_outside_its_layer_is_exact(fisher_type, interval, bias):
    """inp's weight is also used outside inp's call: autograd leaves that part in .grad, K-FAC keeps
    inp's rows for its own part and preconditions the remainder by the same inverse (linear). Only
    that use is named (its factors see inp's own calls), every step (4; refresh steps and, with interval 2, the plain passes between) equals
    the dense route to 1e-9, and inp took the rows route."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 30, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(4)]
    gms, _ = _kfac_routes(TiedHead(), batches, fisher_type=fisher_type, interval=interval, bias=bias)
    assert "inp" in gms["auto"]._rows_seen


@pytest.mark.parametrize("fisher_type", ["fisher_emp", "fisher_mc"])
@pytest.mark.parametrize("form", ["zero_term", "absent"])
def test_outside_use_that_starts_after_the_first_step(fisher_type, form):
    """loss = CE + λ·‖layer 0's weight‖² with λ = 0 on step 0 (the term multiplied by 0, or left out)
    and 0.1 afterwards: no warning, every step equals the dense route to 1e-9 (the penalty's
    gradient is preconditioned with the rows part), and layer 0 keeps the rows route. (A check done
    once, on the first step, would miss the later use.)"""

    def loss_for(m, i):
        lam = 0.0 if i == 0 else 0.1
        if form == "absent" and lam == 0:
            return F.cross_entropy

        def loss(y, t, reduction="mean"):
            return F.cross_entropy(y, t, reduction=reduction) + lam * m[0].weight.square().sum()

        return loss

    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(4, 30, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(4)]
    gms, _ = _kfac_routes(wide_net(3), batches, loss_for, fisher_type=fisher_type)
    assert {"0", "2"} <= gms["auto"]._rows_seen


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
        # body and head take the rows route; aux (no output gradient) does not
        assert gm._rows_seen == ({"body", "head"} if ds == "auto" else set()), gm._rows_seen
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
        # the frozen weight keeps layer 0 off the rows route; layer 2 takes it
        assert gm._rows_seen == ({"2", "4"} if ds == "auto" else set()), gm._rows_seen
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


# --- outside uses, bad batches and layers that keep the dense route ------------------------------


def _batches(n, N=4, seed=0, shape=(30,)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(N, *shape, generator=g), torch.randint(0, 4, (N,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("fisher_type", ["fisher_emp", "fisher_mc"])
@pytest.mark.parametrize("bad_step", [0, 2])
def test_nan_in_the_batch(fisher_type, bad_step):
    """A NaN in one sample of the batch, on the first step (no curvature yet: MC sampling must not
    raise, the layers keep no curvature and the plain gradient) or later (the last good curvature
    stays): both routes finish the step, warn (NonFiniteCurvatureWarning only), and the caller skips
    the optimizer step on the non-finite gradient; training goes on with finite gradients and
    parameters, and the finite steps' .grads and the parameters agree between the routes to 1e-9."""
    model = wide_net(4)
    batches = _batches(4, seed=5)
    batches[bad_step][0][2, 7] = float("nan")
    models = {ds: copy.deepcopy(model) for ds in ("auto", "never")}
    gms = {ds: KfacGradientMaker(m, PreconditioningConfig(damping=1e-2), fisher_type=fisher_type, data_space=ds,
                                 seed=0) for ds, m in models.items()}
    opts = {ds: torch.optim.SGD(m.parameters(), lr=0.01) for ds, m in models.items()}
    for i, (x, t) in enumerate(batches):
        grads = {}
        for ds, m in models.items():
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                grads[ds] = _step(gms[ds], m, x, t)
            kinds = {type(w.message) for w in record}
            finite = bool(torch.isfinite(grads[ds]).all())
            if i == bad_step:
                assert kinds == {NonFiniteCurvatureWarning}, [str(w.message) for w in record]
                assert not finite and gms[ds].nonfinite_counts.get("0", 0) >= 1
                if i == 0:
                    assert "0" not in gms[ds].curvature  # nothing good yet: plain gradient
            else:
                assert not kinds, [str(w.message) for w in record]
                assert finite and "0" in gms[ds].curvature
                opts[ds].step()
            assert all(bool(torch.isfinite(p).all()) for p in m.parameters())
        if i != bad_step:
            _close(grads["auto"], grads["never"], f"step {i}")
        for p, q in zip(models["auto"].parameters(), models["never"].parameters()):
            _close(p.detach(), q.detach(), f"after step {i}")
    assert {"0", "2"} <= gms["auto"]._rows_seen


@pytest.mark.parametrize("bias", ["separate", "folded"])
def test_bias_whose_gradient_is_exactly_zero(bias):
    """enc's bias gradient is 0 (exact zeros on the dense route), its rows give Σg = 0 up to
    rounding: no warning, enc takes the rows route, and 3 steps equal the dense route (the weights
    to 1e-9; enc's bias, zero on the dense route with bias="separate", to 1e-9 of the weight's
    scale)."""
    torch.manual_seed(0)
    model = Siamese(30, 40, 4)
    batches = _batches(3, seed=6, shape=(2, 30))
    models = {ds: copy.deepcopy(model) for ds in ("auto", "never")}
    gms = {ds: KfacGradientMaker(m, PreconditioningConfig(damping=1e-2), fisher_type="fisher_emp", bias=bias,
                                 data_space=ds) for ds, m in models.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=r".*layer 'inp' uses \['weight'\] also outside")  # TiedHead
        for i, (x, t) in enumerate(batches):
            grads = {}
            for ds, m in models.items():
                _step(gms[ds], m, x, t)
                grads[ds] = {n: p.grad.clone() for n, p in m.named_parameters()}
                with torch.no_grad():
                    for p in m.parameters():
                        p -= 0.01 * p.grad
            if bias == "separate":
                assert not grads["never"]["enc.bias"].any()
            scale = float(grads["never"]["enc.weight"].abs().max())
            torch.testing.assert_close(grads["auto"]["enc.bias"], grads["never"]["enc.bias"], rtol=1e-9,
                                       atol=1e-9 * scale)
            for n in ("enc.weight", "head.weight", "head.bias"):
                _close(grads["auto"][n], grads["never"][n], f"step {i} {n}")
    assert "enc" in gms["auto"]._rows_seen


@pytest.mark.parametrize("fisher_type", ["fisher_emp", "fisher_mc"])
def test_layer_whose_output_does_not_reach_the_loss_but_its_weight_does(fisher_type):
    """aux.weight's .grad is the penalty's gradient preconditioned by aux's inverse (not None), as on
    the dense route; aux.bias's stays None; 3 steps equal the dense route to 1e-9, no warning; aux
    never took the rows route (no output gradient), fc1 did."""
    torch.manual_seed(0)

    def loss_for(m, i):
        def loss(y, t, reduction="mean"):
            return F.cross_entropy(y, t, reduction=reduction) + 0.1 * m.aux.weight.square().sum()

        return loss

    gms, models = _kfac_routes(Detached(30, 40, 4), _batches(3, seed=7), loss_for, fisher_type=fisher_type)
    assert models["auto"].aux.weight.grad is not None and models["auto"].aux.bias.grad is None
    assert "fc1" in gms["auto"]._rows_seen and "aux" not in gms["auto"]._rows_seen


@pytest.mark.parametrize("case", ["lora", "centred_weight"])
def test_linear_subclass_with_its_own_forward_keeps_the_plain_gradient(case):
    """nn.Linear subclasses with their own forward (LoRA-style weight + B·A; a transformed weight)
    compute something else than the Linear handler describes: the maker names them as unsupported
    (plain gradient) and the other layers keep the rows route."""
    torch.manual_seed(0)
    model = wide_net(5)
    model[0] = LoRALinear(30, 40) if case == "lora" else CentredWeightLinear(30, 40)
    gm = KfacGradientMaker(model, PreconditioningConfig(damping=1e-2), fisher_type="fisher_emp", data_space="auto")
    assert "0" in gm.plain_modules and type(model[0]).__name__ in gm.plain_modules["0"]
    assert "0" not in gm.preconditioned_modules and "2" in gm.preconditioned_modules


def test_keyword_input_takes_the_rows_route():
    """A plain Linear called with ``input=x`` takes its rows; 3 steps equal the dense route to 1e-9,
    no warning."""
    torch.manual_seed(0)
    gms, _ = _kfac_routes(KeywordCall(30, 40, 4), _batches(3, seed=8))
    assert gms["auto"]._rows_seen >= {"fc1", "fc2"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_parameters_keep_the_dense_route(dtype):
    """float16 / bfloat16 parameters: no layer takes the rows-gradient route (its R x R Grams would
    overflow float16), every step gets finite preconditioned gradients (the factors are inverted in
    float32: no half-precision Cholesky on the CPU), and "auto" (whose factor sides may still be
    rows, a different rounding) follows "never" to half-precision accuracy over 3 steps."""
    model = wide_net(6).to(dtype)
    batches = [(x.to(dtype), t) for x, t in _batches(3, seed=9)]
    models = {ds: copy.deepcopy(model) for ds in ("auto", "never")}
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteCurvatureWarning)
        gms = {ds: KfacGradientMaker(m, PreconditioningConfig(damping=1e-2), fisher_type="fisher_emp", data_space=ds)
               for ds, m in models.items()}
        for x, t in batches:
            grads = {}
            for ds, m in models.items():
                grads[ds] = _step(gms[ds], m, x, t)
                with torch.no_grad():
                    for p in m.parameters():
                        p -= 0.01 * p.grad
            assert torch.isfinite(grads["never"]).all() and torch.isfinite(grads["auto"]).all()
            err = (grads["auto"].float() - grads["never"].float()).norm() / grads["never"].float().norm()
            assert err < 64 * torch.finfo(dtype).eps, err  # K-FAC's inverse amplifies the rounding
    assert not gms["auto"]._rows_seen
    assert set(gms["never"].inverses) == set(gms["auto"].inverses) and all(
        v is not None for v in gms["auto"].inverses.values())
    for p in models["auto"].parameters():
        assert p.dtype == dtype


def test_post_accumulate_grad_hooks_and_grad_identity():
    """With the rows route active (layers 0, 2), the LayerNorm's parameters (not a rows layer) have
    their post-accumulate-grad hooks fire once per step, as with loss.backward(), on refresh steps
    and the plain passes between (interval 2); with zero_grad(set_to_none=False) every parameter
    keeps its very .grad tensor across steps."""
    model = wide_net(7)
    cfg = PreconditioningConfig(damping=1e-2, preconditioner_upd_interval=2, curvature_upd_interval=2)
    fired = {}
    for ds in ("auto", "never"):
        m = copy.deepcopy(model)
        gm = KfacGradientMaker(m, cfg, fisher_type="fisher_emp", data_space=ds)
        counts = {"3.weight": 0, "3.bias": 0}
        for n in counts:
            m.get_parameter(n).register_post_accumulate_grad_hook(lambda p, n=n: counts.__setitem__(n, counts[n] + 1))
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        held = None
        for i, (x, t) in enumerate(_batches(4, seed=10)):
            opt.zero_grad(set_to_none=False)
            y = gm.setup_model_call(m, x)
            gm.setup_loss_call(F.cross_entropy, y, t)
            gm.forward_and_backward()
            assert counts == {"3.weight": i + 1, "3.bias": i + 1}, (ds, i, counts)
            if held is not None:
                assert all(p.grad is held[n] for n, p in m.named_parameters()), ds
            held = {n: p.grad for n, p in m.named_parameters()}
            opt.step()
        fired[ds] = counts
        assert ({"0", "2"} <= gm._rows_seen) if ds == "auto" else not gm._rows_seen
    assert fired["auto"] == fired["never"]


@pytest.mark.parametrize("bias", ["separate", "folded"])
def test_frozen_bias_takes_the_rows_route(bias):
    """A wide layer with a frozen bias: its rows carry no ones column even with ``bias="folded"``
    (the bias has no gradient), the route is taken, and every step equals the dense route."""
    torch.manual_seed(0)
    model = wide_net(5)
    model[0].bias.requires_grad_(False)
    gms, models = _kfac_routes(model, _batches(3, seed=10), bias=bias)
    assert "0" in gms["auto"]._rows_seen and models["auto"][0].bias.grad is None
