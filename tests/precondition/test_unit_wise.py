"""Unit-wise curvature (ASDL's SHAPE_UNIT_WISE) for Linear and Conv2d, in float64 against plain autograd.

Ground truth: the dense Fisher / GGN over all of a layer's trainable parameters in the order
[vec_row-major(W); b], from a per-sample autograd loop (per-sample gradients for ``emp`` and ``mc``,
J_nᵀ H_n J_n with autograd Jacobians and output Hessians for ``exact``); the unit-wise block of
unit c is its restriction to [W[c].reshape(-1); b[c]].
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import curvfun
from curvfun.capture import capture
from curvfun.layers import layer_data
from curvfun.losses import get_likelihood
from curvfun.precondition import PreconditioningConfig, UnitWiseNaturalGradientMaker
from curvfun.precondition.state_packing import pack, unpack
from curvfun.unit_wise import unit_wise_from_layer
from test_natural_gradient import maker_step


def close(a, b, msg="", rtol=1e-9, atol=1e-11):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{msg}: {m}")


# --- models ---------------------------------------------------------------------------------------


class SeqNet(nn.Module):
    """Linear on a sequence [N, T, d_in] (T positions share the weight), tanh, mean over T, head."""

    def __init__(self, d_in, hidden, classes, bias=True):
        super().__init__()
        self.lin = nn.Linear(d_in, hidden, bias=bias)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x)).mean(1))


def conv_net(c_in, c_out, k, stride, padding, groups, bias, hw, classes):
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, groups=groups, bias=bias)
    ho = (hw + 2 * padding - k) // stride + 1
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(c_out * ho * ho, classes))


# --- ground truth by plain autograd ---------------------------------------------------------------


def _targets_mse(out):
    return out.detach()


def dense_layer_curvature(model, module, x, y, loss, fisher_type, keys=("weight", "bias"), ys=None):
    """F over [vec(W); b] (the trainable ``keys`` of ``module``) of the mean loss, by a per-sample loop.
    ``ys``: sampled targets ``[M, N, ...]`` for ``mc``."""
    ps = [getattr(module, k) for k in keys]
    N = x.shape[0]
    P = sum(p.numel() for p in ps)
    Fm = torch.zeros(P, P)

    def nll(o, t):
        if loss == "cross_entropy":
            return F.cross_entropy(o, t, reduction="sum")
        return 0.5 * (o - t).pow(2).sum()

    def grad(scalar):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(scalar, ps, retain_graph=True)])

    for n in range(N):
        out = model(x[n : n + 1])
        if fisher_type == "emp":
            g = grad(nll(out, y[n : n + 1]))
            Fm += torch.outer(g, g)
        elif fisher_type == "mc":
            for m in range(ys.shape[0]):
                g = grad(nll(out, ys[m, n : n + 1]))
                Fm += torch.outer(g, g) / ys.shape[0]
        else:
            J = torch.stack([grad(out.reshape(-1)[i]) for i in range(out.numel())])  # [O, P]
            t = y[n : n + 1]
            H = torch.autograd.functional.hessian(lambda o: nll(o.reshape(out.shape), t), out.detach().reshape(-1))
            Fm += J.T @ H @ J
    return Fm / N


def unit_index(C, d, has_weight, has_bias):
    """[C, p]: unit c's entries in [vec_row-major(W); b] (only the trainable parts present)."""
    c = torch.arange(C).unsqueeze(1)
    cols = [c * d + torch.arange(d)] if has_weight else []
    if has_bias:
        cols.append((C * d if has_weight else 0) + c)
    return torch.cat(cols, 1)


def expected_blocks(Fm, idx):
    return Fm[idx.unsqueeze(2), idx.unsqueeze(1)]


def check_factor(f, Fm, module, has_weight, has_bias, name):
    """blocks = the dense restriction; to_dense = Fm with cross-unit entries removed; diag; matvec;
    damped_inverse against dense solves."""
    C = module.weight.shape[0]
    d = module.weight[0].numel()
    idx = unit_index(C, d, has_weight, has_bias)
    assert isinstance(f, curvfun.UnitWiseFactor), name
    assert (f.has_weight, f.has_bias, f.fan_in) == (has_weight, has_bias, d if has_weight else 0), name
    close(f.blocks, expected_blocks(Fm, idx), f"{name}: unit blocks")
    mask = torch.zeros_like(Fm, dtype=torch.bool)
    mask[idx.unsqueeze(2), idx.unsqueeze(1)] = True
    D = Fm * mask
    close(f.to_dense(), D, f"{name}: to_dense in [vec(W); b] order")
    if has_weight and has_bias:
        close(f.to_dense(include_bias=False), D[: C * d, : C * d], f"{name}: to_dense(include_bias=False)")
    dg = f.diag()
    close(torch.cat([v.reshape(-1) for v in dg.values.values()]), Fm.diagonal(), f"{name}: diag()")
    g = torch.randn(Fm.shape[0], generator=torch.Generator().manual_seed(3))
    grads = {}
    i = 0
    if has_weight:
        grads["weight"] = g[: C * d].reshape(module.weight.shape)
        i = C * d
    if has_bias:
        grads["bias"] = g[i:].reshape(module.bias.shape)
    flat = lambda t: torch.cat([t[k].reshape(-1) for k in ("weight", "bias") if k in t])  # noqa: E731
    close(flat(f.matvec(grads)), D @ g, f"{name}: matvec")
    lam = 0.1
    close(flat(f.damped_inverse(lam).matvec(grads)), torch.linalg.solve(D + lam * torch.eye(len(g)), g),
          f"{name}: damped inverse")


# --- strategies -----------------------------------------------------------------------------------

_fisher_types = st.sampled_from(["emp", "exact"])
_losses = st.sampled_from(["cross_entropy", "mse"])


def _batch(model_in_shape, N, classes, loss, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, *model_in_shape, generator=g)
    y = torch.randint(0, classes, (N,), generator=g) if loss == "cross_entropy" else torch.randn(N, classes, generator=g)
    return x, y


# --- Linear ---------------------------------------------------------------------------------------


@given(d_in=st.integers(1, 3), hidden=st.integers(1, 3), T=st.integers(1, 3), N=st.integers(1, 4),
       bias=st.booleans(), fisher_type=_fisher_types, loss=_losses, seed=st.integers(0, 1000))
def test_linear_unit_blocks_equal_dense_restriction(d_in, hidden, T, N, bias, fisher_type, loss, seed):
    """Linear on sequences (T positions), with and without bias, emp / exact, cross-entropy and MSE:
    fisher(shape="unit") is the dense Fisher restricted to each unit's [W[c, :], b[c]] (both layers);
    ggn(shape="unit") equals the exact one."""
    torch.manual_seed(seed)
    model = SeqNet(d_in, hidden, 3, bias)
    x, y = _batch((T, d_in), N, 3, loss, seed)
    params = dict(model.named_parameters())
    got = curvfun.fisher(model, params, x, y, loss, fisher_type=fisher_type, shape="unit")
    assert set(got) == {"lin", "head"}
    for name in ("lin", "head"):
        m = model.get_submodule(name)
        keys = ("weight", "bias") if m.bias is not None else ("weight",)
        Fm = dense_layer_curvature(model, m, x, y, loss, fisher_type, keys)
        check_factor(got[name], Fm, m, True, m.bias is not None, f"{name} ({fisher_type})")
    if fisher_type == "exact":
        ggn = curvfun.ggn(model, params, x, y, loss, shape="unit")
        for name in ("lin", "head"):
            close(ggn[name].blocks, got[name].blocks, f"{name}: ggn(shape='unit') = exact Fisher")


# --- Conv2d ---------------------------------------------------------------------------------------


@st.composite
def conv_cases(draw):
    groups = draw(st.integers(1, 2))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    k = draw(st.integers(1, 3))
    padding = draw(st.integers(0, 1))
    hw = draw(st.integers(max(k - 2 * padding, 1), 4))
    stride = draw(st.integers(1, 2))
    return dict(c_in=c_in, c_out=c_out, k=k, stride=stride, padding=padding, groups=groups, hw=hw)


@given(case=conv_cases(), N=st.integers(1, 3), bias=st.booleans(), fisher_type=_fisher_types,
       seed=st.integers(0, 1000))
def test_conv2d_unit_blocks_equal_dense_restriction(case, N, bias, fisher_type, seed):
    """Conv2d with stride, padding and groups (unit c: its [C_in/groups, kh, kw] row and b[c])."""
    torch.manual_seed(seed)
    model = conv_net(**case, bias=bias, classes=3)
    x, y = _batch((case["c_in"], case["hw"], case["hw"]), N, 3, "cross_entropy", seed)
    params = dict(model.named_parameters())
    got = curvfun.fisher(model, params, x, y, fisher_type=fisher_type, shape="unit")
    conv = model[0]
    keys = ("weight", "bias") if bias else ("weight",)
    Fm = dense_layer_curvature(model, conv, x, y, "cross_entropy", fisher_type, keys)
    check_factor(got["0"], Fm, conv, True, bias, f"conv {case} ({fisher_type})")
    if fisher_type == "exact":
        close(curvfun.ggn(model, params, x, y, shape="unit")["0"].blocks, got["0"].blocks, "ggn(shape='unit')")


class Family(nn.Module):
    """One layer of the registry's families between a fixed input map and a head."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.layer = {
            "conv1d": lambda: nn.Conv1d(2, 4, 3, stride=2, padding=1, groups=2),
            "conv3d": lambda: nn.Conv3d(2, 3, 2),
            "conv_transpose2d": lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2),
            "groupnorm": lambda: nn.GroupNorm(2, 4),
            "attention": lambda: nn.MultiheadAttention(4, 2, batch_first=True),
        }[kind]()
        self.head = nn.LazyLinear(3)

    def forward(self, x):
        z = self.layer(x, x, x, need_weights=False)[0] if self.kind == "attention" else self.layer(x)
        return self.head(torch.tanh(z).flatten(1))


_FAMILY_INPUTS = {"conv1d": (2, 5), "conv3d": (2, 3, 3, 3), "conv_transpose2d": (4, 3, 3), "groupnorm": (4, 3, 2),
                  "attention": (3, 4)}


def _unit_of_entries(kind, m, keys):
    """The unit of every entry of the layer's trainable parameters (in ``keys`` order, row-major)."""
    out = []
    for k in keys:
        p = getattr(m, k)
        idx = torch.arange(p.numel()).reshape(p.shape)
        if k.endswith("bias") or kind == "groupnorm":
            out.append(idx.reshape(-1))
        elif kind == "conv_transpose2d":  # [C_in, C_out/G, kh, kw]: unit (group of c_in) · C_out/G + j
            cin, cog = p.shape[:2]
            ci = torch.arange(cin).reshape(-1, 1, 1, 1).expand(p.shape)
            j = torch.arange(cog).reshape(1, -1, 1, 1).expand(p.shape)
            out.append((ci // (cin // m.groups) * cog + j).reshape(-1))
        else:  # the output unit is the first dim
            out.append(torch.arange(p.shape[0]).repeat_interleave(p[0].numel()))
    return torch.cat(out)


@pytest.mark.parametrize("kind", list(_FAMILY_INPUTS))
def test_other_registered_layers_unit_blocks_equal_dense_restriction(kind):
    """Conv1d (groups, stride, padding), Conv3d, ConvTranspose2d (groups, stride: the unit's row of the
    weight matrix, mapped back to the stored layout), GroupNorm and the packed attention projection:
    fisher(shape="unit").to_dense() is the dense exact Fisher with the entries of different units
    removed, in the parameters' own order; ggn(shape="unit") agrees."""
    torch.manual_seed(0)
    model = Family(kind)
    x, y = _batch(_FAMILY_INPUTS[kind], 3, 3, "cross_entropy", 0)
    model(x)  # materialise the lazy head
    m = model.layer
    keys = ["in_proj_weight", "in_proj_bias"] if kind == "attention" else ["weight", "bias"]
    params = {f"layer.{k}": getattr(m, k) for k in keys}
    Fm = dense_layer_curvature(model, m, x, y, "cross_entropy", "exact", keys)
    unit = _unit_of_entries(kind, m, keys)
    expected = Fm * (unit.unsqueeze(0) == unit.unsqueeze(1))
    f = curvfun.fisher(model, params, x, y, fisher_type="exact", shape="unit")["layer"]
    close(f.to_dense(include_bias=True), expected, f"{kind}: unit blocks in parameter order")
    close(curvfun.ggn(model, params, x, y, shape="unit")["layer"].blocks, f.blocks, f"{kind}: ggn(shape='unit')")


# --- frozen weight / frozen bias --------------------------------------------------------------------


@pytest.mark.parametrize("frozen", ["weight", "bias"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_frozen_weight_or_bias(frozen, kind):
    """params without a layer's weight (blocks 1x1 over b[c]) or without its bias (d x d over W[c]);
    equal to the dense Fisher over the trainable part, from fisher, ggn and the maker's capture."""
    torch.manual_seed(0)
    if kind == "linear":
        model, name = SeqNet(3, 4, 3), "lin"
        x, y = _batch((2, 3), 5, 3, "cross_entropy", 1)
    else:
        model, name = conv_net(2, 4, 2, 1, 1, 2, True, 3, 3), "0"
        x, y = _batch((2, 3, 3), 5, 3, "cross_entropy", 1)
    m = model.get_submodule(name)
    params = {k: v for k, v in model.named_parameters() if k != f"{name}.{frozen}"}
    keys = ("bias",) if frozen == "weight" else ("weight",)
    for ft in ("emp", "exact"):
        Fm = dense_layer_curvature(model, m, x, y, "cross_entropy", ft, keys)
        f = curvfun.fisher(model, params, x, y, fisher_type=ft, shape="unit")[name]
        check_factor(f, Fm, m, frozen != "weight", frozen != "bias", f"{name}: {frozen} frozen ({ft})")
        assert f.blocks.shape[-1] == (1 if frozen == "weight" else m.weight[0].numel())
    close(curvfun.ggn(model, params, x, y, shape="unit")[name].blocks, f.blocks, "ggn(shape='unit'), frozen")


def test_hessian_unit_blocks_equal_dense_hessian_restriction():
    """hessian(shape="unit"): the Hessian of the mean loss (autograd over the layer's flat parameters)
    restricted to each unit, bias-first params order included."""
    torch.manual_seed(1)
    model = SeqNet(2, 3, 3)
    x, y = _batch((2, 2), 4, 3, "cross_entropy", 1)
    params = dict(model.named_parameters())
    params = {"lin.bias": params["lin.bias"], **{k: v for k, v in params.items() if k != "lin.bias"}}
    got = curvfun.hessian(model, params, x, y, shape="unit")
    for name in ("lin", "head"):
        m = model.get_submodule(name)
        W, b = m.weight.detach(), m.bias.detach()

        def loss(flat, m=m, W=W, b=b):
            w, bb = flat[: W.numel()].reshape(W.shape), flat[W.numel():]
            out = torch.func.functional_call(model, {f"{name}.weight": w, f"{name}.bias": bb}, (x,))
            return F.cross_entropy(out, y)

        H = torch.autograd.functional.hessian(loss, torch.cat([W.reshape(-1), b]))
        idx = unit_index(W.shape[0], W.shape[1], True, True)
        close(got[name].blocks, expected_blocks(H, idx), f"{name}: Hessian unit blocks")


# --- MC Fisher --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_mc", [1, 3])
def test_mc_fisher_with_a_fixed_generator(n_mc):
    """fisher_type="mc": the blocks of (1/(N·M)) Σ_{n,m} g_nm g_nmᵀ at targets drawn from the model's
    predictive distribution with the same generator seed (here drawn by the likelihood's sampler)."""
    torch.manual_seed(2)
    model = conv_net(2, 3, 2, 1, 0, 1, True, 3, 4)
    x, y = _batch((2, 3, 3), 4, 4, "cross_entropy", 2)
    got = curvfun.fisher(model, dict(model.named_parameters()), x, y, fisher_type="mc", n_mc_samples=n_mc,
                         shape="unit", generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ys = get_likelihood("cross_entropy").sample(model(x), n_mc, torch.Generator().manual_seed(5))
    for name in ("0", "3"):
        m = model.get_submodule(name)
        Fm = dense_layer_curvature(model, m, x, y, "cross_entropy", "mc", ys=ys)
        check_factor(got[name], Fm, m, True, True, f"{name} (mc, {n_mc} samples)")


# --- the pure function, the factor object, errors ---------------------------------------------------


def test_unit_wise_from_layer_for_norm_layers_equals_kfac_blocks_and_handles_a_frozen_gamma():
    """LayerNorm: the same 2x2 blocks as kfac()'s norm-layer factor; with γ frozen, the 1x1 β blocks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2))
    x, y = _batch((3,), 5, 2, "cross_entropy", 0)
    params = dict(model.named_parameters())
    kf = curvfun.kfac(model, params, x, y, fisher_type="exact")["1"]
    uw = curvfun.fisher(model, params, x, y, fisher_type="exact", shape="unit")["1"]
    close(uw.blocks, kf.blocks, "LayerNorm unit blocks")
    close(uw.to_dense(), kf.to_dense(), "LayerNorm to_dense unchanged")
    sub = {k: v for k, v in params.items() if k != "1.weight"}
    cap = capture(model, sub, x, y, fisher_type="exact")
    f = unit_wise_from_layer(layer_data(cap.layers["1"], cap.weights))
    assert not f.has_weight and f.blocks.shape == (4, 1, 1)
    close(f.blocks, uw.blocks[:, 1:, 1:], "β blocks with γ frozen")


def test_factor_is_a_pytree_and_survives_state_packing():
    """optree maps over the blocks only (EMA blends them) and keeps the static fields; pack/unpack
    round-trips; a packed state without has_weight / bias_shape (saved before) still loads."""
    import optree

    f = curvfun.UnitWiseFactor(torch.randn(3, 4, 4), (3, 1, 2, 1), True, True, (3,))
    g = curvfun.UnitWiseFactor(torch.randn(2, 1, 1), (2, 5), True, False, (2,))
    static = lambda h: (h.weight_shape, h.has_bias, h.has_weight, h.bias_shape)  # noqa: E731
    for h in (f, g):
        doubled = optree.tree_map(lambda t: 2 * t, h, namespace="curvfun")
        assert isinstance(doubled, curvfun.UnitWiseFactor) and static(doubled) == static(h)
        assert torch.equal(doubled.blocks, 2 * h.blocks)
        u = unpack(pack(h))
        assert torch.equal(u.blocks, h.blocks) and static(u) == static(h)
    old = {k: v for k, v in pack(f).items() if k not in ("has_weight", "bias_shape")}
    assert unpack(old).has_weight and unpack(old).fan_in == 3


def test_shape_unit_names_modules_without_unit_wise_blocks():
    model = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2))
    x = torch.randint(0, 5, (4, 2))
    y = torch.randint(0, 2, (4,))
    params = dict(model.named_parameters())
    for fn in (lambda: curvfun.fisher(model, params, x, y, shape="unit"),
               lambda: curvfun.ggn(model, params, x, y, shape="unit")):
        with pytest.raises(ValueError, match=r"not for: 0 \(Embedding: \['0.weight'\]\)\. Exclude their parameters"):
            fn()
    # without the embedding's parameters, the Linear gets its blocks
    assert set(curvfun.fisher(model, {"2.weight": params["2.weight"]}, x, y, shape="unit")) == {"2"}


def test_unit_wise_from_layer_rejects_a_capture_without_gradients_and_other_layers():
    model = nn.Sequential(nn.Embedding(5, 3))
    x = torch.randint(0, 5, (4, 2))
    cap = capture(model, dict(model.named_parameters()), x, None, fisher_type="none")
    with pytest.raises(ValueError, match="unit-wise blocks need a capture with output gradients"):
        unit_wise_from_layer(layer_data(cap.layers["0"]))
    cap = capture(model, dict(model.named_parameters()), x, torch.randn(4, 2, 3), loss="mse", fisher_type="emp")
    with pytest.raises(ValueError, match=r"no unit-wise blocks for a Embedding \(layer family .embedding.\)"):
        unit_wise_from_layer(layer_data(cap.layers["0"], cap.weights))


# --- the maker ------------------------------------------------------------------------------------


class ConvSeqNet(nn.Module):
    """A Conv2d (groups 2, stride 2, padding 1, bias frozen) then a Linear on its 4 positions and a head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2)
        self.conv.bias.requires_grad_(False)
        self.lin = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        z = torch.tanh(self.conv(x)).flatten(2).transpose(1, 2)  # [N, 4 positions, 4]
        return self.head(torch.tanh(self.lin(z)).mean(1))


@pytest.mark.parametrize("fisher_type", ["fisher_emp", "fisher_exact"])
@pytest.mark.parametrize("lam", [1e-3, 0.1])
def test_maker_preconditions_every_unit_by_its_damped_block(fisher_type, lam):
    """UnitWiseNaturalGradientMaker: per unit c of every Linear / Conv2d, (F_c + λI)^{-1} g_c with F_c
    the dense Fisher block over the unit's trainable parameters (frozen conv bias untouched)."""
    torch.manual_seed(0)
    model = ConvSeqNet()
    x, y = _batch((2, 4, 4), 6, 3, "cross_entropy", 4)
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y).backward()
    gm = UnitWiseNaturalGradientMaker(model, PreconditioningConfig(damping=lam), fisher_type=fisher_type)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer is left plain
        dummy_y = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, dummy_y, y)
        gm.forward_and_backward()
    ft = {"fisher_emp": "emp", "fisher_exact": "exact"}[fisher_type]
    assert model.conv.bias.grad is None
    for name in ("conv", "lin", "head"):
        m, r = model.get_submodule(name), ref.get_submodule(name)
        keys = [k for k, p in m.named_parameters(recurse=False) if p.requires_grad]
        Fm = dense_layer_curvature(ref, r, x, y, "cross_entropy", ft, keys)
        g = torch.cat([getattr(r, k).grad.reshape(-1) for k in keys])
        got = torch.cat([getattr(m, k).grad.reshape(-1) for k in keys])
        idx = unit_index(m.weight.shape[0], m.weight[0].numel(), True, "bias" in keys)
        expected = torch.empty_like(g)
        for u in idx:
            expected[u] = torch.linalg.solve(Fm[u][:, u] + lam * torch.eye(len(u)), g[u])
        close(got, expected, f"{name}: preconditioned gradient")


def _digits_run(make_gm, lr, steps, seed=0):
    """digits_helper's loop, SGD (no momentum) with an optional grad maker; the final loss on the
    whole training set."""
    from digits_helper import digits_data, train_digits

    trained = []

    def make(model):
        trained.append(model)
        return torch.optim.SGD(model.parameters(), lr=lr), make_gm(model) if make_gm else None

    train_digits(make, steps=steps, batch=64, seed=seed, dtype=torch.float32)
    xtr, ytr, _, _ = digits_data(torch.float32)
    with torch.no_grad():
        return F.cross_entropy(trained[0](xtr), ytr).item()


def test_maker_trains_the_digits_mlp_well_below_sgd():
    """Same lr, steps, batches and initialisation: unit-wise natural gradient ends at a training loss
    well below plain SGD's (the MLP has only Linear layers: before, the maker was SGD)."""
    lr, steps = 0.05, 60
    sgd = _digits_run(None, lr, steps)
    cfg = PreconditioningConfig(damping=0.05, curvature_upd_interval=2, preconditioner_upd_interval=2)
    ng = _digits_run(lambda m: UnitWiseNaturalGradientMaker(m, cfg, fisher_type="fisher_emp"), lr, steps)
    assert math.isfinite(ng) and ng < 0.5 * sgd, (ng, sgd)


def test_cli_unitwise_ng_row_differs_from_sgd(tmp_path, capsys):
    """`curvfun compare`: the unitwise_ng row is no longer SGD under another name (same lr, momentum
    and batches as the sgd row: only the preconditioning can make its loss differ)."""
    from curvfun.__main__ import main

    rc = main(["compare", "--optimizers", "sgd,unitwise_ng", "--steps", "3", "--no-plots", "--out",
               str(tmp_path / "o"), "--hp", "unitwise_ng.lr=0.1", "--hp", "sgd.lr=0.1", "--hp", "sgd.momentum=0.9",
               "--no-progress", "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    rows = {r["optimizer"]: r for r in json.loads((tmp_path / "o" / "results.json").read_text())}
    assert rows["sgd"]["status"] == rows["unitwise_ng"]["status"] == "ok"
    assert rows["sgd"]["final_train_loss"] != rows["unitwise_ng"]["final_train_loss"]


# --- ASDL 0.1 (where importable: PyPI asdfghjkl==0.1a5, pip install --no-deps) ------------------------


def _asdl_models():
    torch.manual_seed(0)
    return {
        "mlp": (nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4)), (5,)),
        "cnn": (nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4)),
                (2, 4, 4)),
    }


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("fisher_type", ["fisher_emp", "fisher_exact"])
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_unit_blocks_agree_with_asdl_shape_unit_wise(model_name, fisher_type):
    """ASDL's SHAPE_UNIT_WISE Fisher (data_size = N) of every Linear / Conv2d equals fisher(shape="unit")
    (measured: about 1e-16 relative)."""
    asdl = pytest.importorskip("asdl")
    from asdl.fisher import FisherConfig, get_fisher_maker

    model, shape = _asdl_models()[model_name]
    x, t = _batch(shape, 8, 4, "cross_entropy", 7)
    fm = get_fisher_maker(model, FisherConfig(fisher_type=fisher_type, fisher_shapes=[asdl.SHAPE_UNIT_WISE],
                                              loss_type="cross_entropy", data_size=8))
    dummy_y = fm.setup_model_call(model, x)
    fm.setup_loss_call(F.cross_entropy, dummy_y, t)
    fm.forward_and_backward()
    ours = curvfun.fisher(model, dict(model.named_parameters()), x, t, fisher_type=fisher_type[len("fisher_"):],
                          shape="unit")
    assert set(ours) == {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    for name, f in ours.items():
        close(f.blocks, model.get_submodule(name).fisher.unit.data, f"{name}: ASDL's unit-wise block")


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("fisher_type", ["fisher_emp", "fisher_exact"])
def test_maker_agrees_with_asdl_unit_wise_maker(fisher_type):
    """Three README steps on an MLP, damping 0.01, data_size = N: the preconditioned gradients equal
    ASDL's UnitWiseNaturalGradientMaker's (ASDL 0.1a5's maker fails on Conv2d: its unit-wise product
    stacks the 4-D weight gradient with the bias)."""
    pytest.importorskip("asdl")
    from asdl.precondition import PreconditioningConfig as AsdlConfig
    from asdl.precondition import UnitWiseNaturalGradientMaker as AsdlUnitWise

    model, shape = _asdl_models()["mlp"]
    g = torch.Generator().manual_seed(7)
    data = [(torch.randn(8, *shape, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(3)]

    def run(cls, cfg):
        m = copy.deepcopy(model)
        gm = cls(m, cfg, fisher_type=fisher_type, loss_type="cross_entropy")
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        out = []
        for x, t in data:
            out.append(maker_step(gm, m, x, t))
            opt.step()
        return out

    theirs = run(AsdlUnitWise, AsdlConfig(data_size=8, damping=0.01))
    ours = run(UnitWiseNaturalGradientMaker, PreconditioningConfig(data_size=8, damping=0.01))
    for step, (a, b) in enumerate(zip(ours, theirs)):
        close(a, b, f"step {step}", rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", ["sum", "module_sum", "mean_module"])
def test_unit_blocks_follow_the_losss_reduction(loss):
    """``reduction="sum"`` (or an ``nn.CrossEntropyLoss(reduction="sum")`` module): the blocks of the
    summed loss, the dense per-sample Fisher of the mean times N restricted to each unit, for every
    type of Fisher; a mean module: the mean's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    params = dict(model.named_parameters())
    kw = {"sum": dict(reduction="sum"), "module_sum": dict(loss=nn.CrossEntropyLoss(reduction="sum")),
          "mean_module": dict(loss=nn.CrossEntropyLoss())}[loss]
    s = 1.0 if loss == "mean_module" else 5.0
    for fisher_type in ("exact", "emp"):
        got = curvfun.fisher(model, params, x, y, fisher_type=fisher_type, shape="unit", **kw)
        for name in ("0", "2"):
            m = model.get_submodule(name)
            Fm = dense_layer_curvature(model, m, x, y, "cross_entropy", fisher_type)
            C, d = m.weight.shape
            close(got[name].blocks, s * expected_blocks(Fm, unit_index(C, d, True, True)), f"{fisher_type} {name}")
