"""nn.MultiheadAttention in every configuration, against plain autograd in float64.

Packed or separate q/k/v weights (kdim / vdim), with or without biases, ``add_bias_kv``,
``add_zero_attn``, batch-first or sequence-first, key padding, ``need_weights``: per-sample
gradients, norms and the exact Fisher diagonal equal autograd with no fallback; the factors of
the separate projections equal those of the same attention written with ``nn.Linear`` layers;
``bias_k`` / ``bias_v`` have the second moment of their per-sample gradients as B; the curvature
makers precondition every part with its exact block."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import curvfun
from curvfun import precondition as P
from curvfun.capture import CaptureFallbackWarning, capture
from curvfun.testing import checks, reference as ref

TOL = dict(rtol=1e-9, atol=1e-11)
DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


class Attend(nn.Module):
    """Queries ``x`` ``[N, T, E]`` attend to a memory ``m`` ``[N, S, kdim]`` (values: a map of it to
    vdim) through one MultiheadAttention; pooled, linear head."""

    def __init__(self, E=4, heads=2, kdim=None, vdim=None, bias=True, bias_kv=False, zero_attn=False,
                 batch_first=True, pad=False, need_weights=False):
        super().__init__()
        self.att = nn.MultiheadAttention(E, heads, bias=bias, add_bias_kv=bias_kv, add_zero_attn=zero_attn,
                                         kdim=kdim, vdim=vdim, batch_first=batch_first)
        self.to_v = nn.Linear(self.att.kdim, self.att.vdim)
        self.head = nn.Linear(E, 3)
        self.pad, self.need_weights = pad, need_weights

    def forward(self, x, m):
        v = torch.tanh(self.to_v(m))
        seq = (lambda t: t) if self.att.batch_first else (lambda t: t.transpose(0, 1))
        kpm = None
        if self.pad:  # the last key of every sample is padding
            kpm = torch.zeros(m.shape[0], m.shape[1], dtype=torch.bool)
            kpm[:, -1] = True
        out, w = self.att(seq(x), seq(m), seq(v), key_padding_mask=kpm, need_weights=self.need_weights)
        extra = 0 if w is None else 0.1 * w.sum()
        return self.head(seq(out).mean(1)) + extra


def _expected_layers(att: nn.MultiheadAttention) -> set[str]:
    if att._qkv_same_embed_dim:
        names = {"att"}
    else:
        names = {"att.q_proj_weight", "att.k_proj_weight", "att.v_proj_weight"}
        if att.in_proj_bias is not None:
            names.add("att.in_proj_bias")
    if att.bias_k is not None:
        names |= {"att.bias_k", "att.bias_v"}
    return names | {"att.out_proj"}


@settings(max_examples=12, deadline=None)
@given(E_heads=st.sampled_from([(4, 1), (4, 2), (6, 3)]), kdim=st.sampled_from([None, 2, 3, 5]),
       vdim=st.sampled_from([None, 3, 5]), bias=st.booleans(), bias_kv=st.booleans(), zero_attn=st.booleans(),
       batch_first=st.booleans(), pad=st.booleans(), need_weights=st.booleans(), T=st.integers(1, 3),
       S=st.integers(2, 4), seed=st.integers(0, 1000))
def test_every_attention_configuration_is_captured_exactly(E_heads, kdim, vdim, bias, bias_kv, zero_attn,
                                                           batch_first, pad, need_weights, T, S, seed):
    E, heads = E_heads
    torch.manual_seed(seed)
    model = Attend(E, heads, kdim, vdim, bias, bias_kv, zero_attn, batch_first, pad, need_weights).to(DT).eval()
    x, m = torch.randn(3, T, E, dtype=DT), torch.randn(3, S, model.att.kdim, dtype=DT)
    y = torch.tensor([0, 2, 1])
    params = dict(model.named_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error", CaptureFallbackWarning)
        cap = capture(model, params, (x, m), y, fisher_type="emp")
        got = curvfun.per_sample_grads(model, params, (x, m), y)
        norms = curvfun.per_sample_grad_norms(model, params, (x, m), y)
        diag = curvfun.fisher(model, params, (x, m), y, fisher_type="exact", shape="diag")
        factors = curvfun.kfac(model, params, (x, m), y, fisher_type="emp", on_unsupported="raise")
    assert {n for n in cap.layers if n.startswith("att")} == _expected_layers(model.att)
    assert not cap.unsupported
    expected = ref.per_sample_grads(model, params, (x, m), y)
    checks.assert_close_trees(got, expected, **TOL, what="per-sample gradients")
    dense = torch.cat([expected[k].reshape(3, -1) for k in params], 1)
    checks.assert_close(norms, dense.norm(dim=1), **TOL, what="norms")
    checks.assert_diag_matches_dense(diag, ref.fisher(model, params, (x, m), y, fisher_type="exact"), params,
                                     **TOL, what="exact Fisher diagonal")
    assert _expected_layers(model.att) <= set(factors)


class Written(nn.Module):
    """The attention of ``nn.MultiheadAttention(E, heads, kdim, vdim)`` written out with Linears
    (q, k, v, out) and an explicit softmax, weights copied from ``mha``; same head as ``Attend``."""

    def __init__(self, model: Attend):
        super().__init__()
        att = model.att
        E, self.heads = att.embed_dim, att.num_heads
        self.q, self.k, self.v = nn.Linear(E, E), nn.Linear(att.kdim, E), nn.Linear(att.vdim, E)
        self.o, self.to_v, self.head = nn.Linear(E, E), nn.Linear(att.kdim, att.vdim), nn.Linear(E, 3)
        with torch.no_grad():
            for lin, w, b in zip((self.q, self.k, self.v), (att.q_proj_weight, att.k_proj_weight, att.v_proj_weight),
                                 att.in_proj_bias.chunk(3)):
                lin.weight.copy_(w)
                lin.bias.copy_(b)
            for mine, theirs in ((self.o, att.out_proj), (self.to_v, model.to_v), (self.head, model.head)):
                mine.load_state_dict(theirs.state_dict())

    def forward(self, x, m):
        N, T, E = x.shape
        H, Dh = self.heads, E // self.heads
        split = lambda t: t.reshape(N, -1, H, Dh).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(m)), split(self.v(torch.tanh(self.to_v(m))))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(Dh), -1)
        out = self.o((w @ v).transpose(1, 2).reshape(N, T, E))
        return self.head(out.mean(1))


@pytest.mark.parametrize("kfac_type", ["expand", "reduce"])
@pytest.mark.parametrize("fisher_type", ["emp", "exact"])
def test_separate_projection_factors_equal_those_of_the_attention_written_with_linears(kfac_type, fisher_type):
    """kdim = 3, vdim = 5: the factors of q/k/v_proj_weight are those of the Linears q, k, v of the
    written-out attention (A over each projection's own inputs and positions, B over its output
    gradients); ``in_proj_bias`` has A = 1 and, per group, the B of that Linear."""
    torch.manual_seed(0)
    model = Attend(kdim=3, vdim=5).to(DT).eval()
    written = Written(model).to(DT).eval()
    x, m, y = torch.randn(4, 3, 4, dtype=DT), torch.randn(4, 5, 3, dtype=DT), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        checks.assert_close(model(x, m), written(x, m), **TOL, what="the written-out attention")
    kw = dict(fisher_type=fisher_type, kfac_type=kfac_type, on_unsupported="raise")
    f = curvfun.kfac(model, dict(model.named_parameters()), (x, m), y, **kw)
    w = curvfun.kfac(written, dict(written.named_parameters()), (x, m), y, **kw)
    for j, name in enumerate("qkv"):
        part = f[f"att.{name}_proj_weight"]
        checks.assert_close(part.A, w[name].A, **TOL, what=f"A of {name}_proj_weight")
        checks.assert_close(part.B, w[name].B, **TOL, what=f"B of {name}_proj_weight")
        assert part.weight_shape == tuple(getattr(model.att, f"{name}_proj_weight").shape) and not part.has_bias
        checks.assert_close(f["att.in_proj_bias"].B[j], w[name].B, **TOL, what=f"B of in_proj_bias group {name}")
    checks.assert_close(f["att.in_proj_bias"].A, torch.ones(3, 1, 1, dtype=DT), **TOL, what="A of in_proj_bias")
    checks.assert_close(f["att.out_proj"].B, w["o"].B, **TOL, what="B of out_proj")
    grad = {"bias": torch.randn(12, dtype=DT)}
    expected = torch.cat([w[n].B @ gb for n, gb in zip("qkv", grad["bias"].chunk(3))])
    checks.assert_close(f["att.in_proj_bias"].matvec(grad)["bias"], expected, **TOL, what="bias matvec")


def test_bias_kv_factor_is_the_second_moment_of_its_per_sample_gradients():
    """``bias_k`` is the key at one extra position, an affine map of the constant 1: A = 1 and
    B = (1/N) Σ_n ∇ℓ_n ∇ℓ_nᵀ exactly (one position), in its ``[1, 1, E]`` shape."""
    torch.manual_seed(1)
    model = Attend(bias_kv=True, zero_attn=True, batch_first=False).to(DT).eval()
    x, m, y = torch.randn(5, 2, 4, dtype=DT), torch.randn(5, 3, 4, dtype=DT), torch.tensor([0, 1, 2, 1, 0])
    params = dict(model.named_parameters())
    f = curvfun.kfac(model, params, (x, m), y, fisher_type="emp", on_unsupported="raise")
    psg = ref.per_sample_grads(model, params, (x, m), y)
    for name in ("bias_k", "bias_v"):
        g = psg[f"att.{name}"].reshape(5, -1)
        checks.assert_close(f[f"att.{name}"].B, g.T @ g / 5, **TOL, what=f"B of {name}")
        checks.assert_close(f[f"att.{name}"].A, torch.ones(1, 1, dtype=DT), **TOL, what=f"A of {name}")
        out = f[f"att.{name}"].matvec({"bias": torch.ones(1, 1, 4, dtype=DT)})["bias"]
        assert out.shape == (1, 1, 4)
    ek = curvfun.ekfac(model, params, (x, m), y, fisher_type="emp")
    assert {"att", "att.bias_k", "att.bias_v"} <= set(ek)


def _blocks(gm, params):
    """Parameter indices of each preconditioned layer, in the order of ``params``."""
    offsets, i = {}, 0
    for k, p in params.items():
        offsets[id(p)] = torch.arange(i, i + p.numel())
        i += p.numel()
    return {n: torch.cat([offsets[id(p)] for p in gm.module_params(n).values()]) for n in gm.preconditioned_modules}


@pytest.mark.parametrize("fisher_type", ["fisher_emp", "fisher_exact"])
def test_layerwise_maker_solves_each_attention_part_with_its_dense_block(fisher_type):
    """LayerWiseNaturalGradientMaker on split attention (separate weights, bias_k / bias_v): every
    part is a layer with its own block, (F_part + λI)^{-1} g_part with F the dense autograd Fisher."""
    torch.manual_seed(2)
    model = Attend(kdim=3, vdim=5, bias_kv=True, pad=True).to(DT).eval()
    x, m, y = torch.randn(4, 2, 4, dtype=DT), torch.randn(4, 3, 3, dtype=DT), torch.tensor([0, 1, 2, 1])
    params = dict(model.named_parameters())
    lam = 0.05
    loss = F.cross_entropy(model(x, m), y)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(params.values()))])
    Fm = ref.fisher(model, params, (x, m), y, fisher_type=fisher_type.removeprefix("fisher_"))
    gm = P.LayerWiseNaturalGradientMaker(model, P.PreconditioningConfig(damping=lam), fisher_type=fisher_type)
    blocks = _blocks(gm, params)
    assert {"att.q_proj_weight", "att.k_proj_weight", "att.v_proj_weight", "att.in_proj_bias", "att.bias_k",
            "att.bias_v", "att.out_proj"} <= set(blocks) and not gm.plain_modules
    expected = g.clone()
    for idx in blocks.values():
        expected[idx] = torch.linalg.solve(Fm[idx][:, idx] + lam * torch.eye(len(idx), dtype=DT), g[idx])
    model.zero_grad()
    dummy_y = gm.setup_model_call(model, x, m)
    gm.setup_loss_call(F.cross_entropy, dummy_y, y)
    gm.forward_and_backward()
    got = torch.cat([p.grad.reshape(-1) for p in params.values()])
    checks.assert_close(got, expected, **TOL, what="layer-wise natural gradient")


def test_kfac_maker_preconditions_each_part_with_the_functional_factors():
    """KfacGradientMaker on separate-weight attention installs, per part, the factors of
    :func:`curvfun.kfac` and preconditions that part's gradient with their damped inverse."""
    torch.manual_seed(3)
    model = Attend(kdim=3, vdim=5, bias_kv=True).to(DT).eval()
    x, m, y = torch.randn(6, 2, 4, dtype=DT), torch.randn(6, 3, 3, dtype=DT), torch.tensor([0, 1, 2, 1, 0, 2])
    params = dict(model.named_parameters())
    f = curvfun.kfac(model, params, (x, m), y, fisher_type="emp")
    loss = F.cross_entropy(model(x, m), y)
    raw = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    gm = P.KfacGradientMaker(model, P.PreconditioningConfig(damping=0.1), fisher_type="fisher_emp")
    model.zero_grad()
    dummy_y = gm.setup_model_call(model, x, m)
    gm.setup_loss_call(F.cross_entropy, dummy_y, y)
    gm.forward_and_backward()
    for name in ("att.q_proj_weight", "att.k_proj_weight", "att.v_proj_weight", "att.in_proj_bias", "att.bias_k",
                 "att.bias_v", "att.out_proj"):
        checks.assert_close(gm.curvature[name].A, f[name].A, **TOL, what=f"{name} A")
        checks.assert_close(gm.curvature[name].B, f[name].B, **TOL, what=f"{name} B")
        own = gm.module_params(name)
        key = {id(p): k for k, p in params.items()}
        want = f[name].damped_inverse(0.1).matvec({role: raw[key[id(p)]] for role, p in own.items()})
        for role, p in own.items():
            checks.assert_close(p.grad, want[role], **TOL, what=f"{name}.{role} preconditioned")


@pytest.mark.parametrize("maker", ["kfac", "ekfac", "lowrank", "layerwise"])
def test_makers_on_split_attention_resume_bit_exact(maker):
    """The per-part state (``att.q_proj_weight``, ..., ``att.bias_v``) saves and resumes bit for bit."""
    from maker_checks import check_resume_bit_exact
    from zoo import build

    makers = {"kfac": P.KfacGradientMaker, "ekfac": P.EkfacGradientMaker, "lowrank": P.LowRankKfacGradientMaker,
              "layerwise": P.LayerWiseNaturalGradientMaker}
    _, _, _, C = build("cross_kv")
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(6, 4, 5, dtype=DT, generator=g), torch.randint(0, C, (6,), generator=g)) for _ in range(5)]
    cfg = P.PreconditioningConfig(damping=0.1, ema_decay=-1 if maker == "lowrank" else 0.9, curvature_upd_interval=2,
                                  preconditioner_upd_interval=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = check_resume_bit_exact(lambda: build("cross_kv")[0], lambda m: torch.optim.SGD(m.parameters(), lr=0.05),
                                    lambda m: makers[maker](m, cfg), batches, 3, serialize=True)
    assert {"att.q_proj_weight", "att.in_proj_bias", "att.bias_k"} <= set(gm.preconditioned_modules)


def test_unit_wise_blocks_of_every_part_equal_the_dense_fisher():
    """``fisher(shape="unit")`` on split attention: per output unit of each part (a projection's
    row of weights, one entry of ``in_proj_bias`` / ``bias_k``) the block of the dense exact
    Fisher, and its diagonal in the parameter's own shape (``bias_k`` is ``[1, 1, E]``)."""
    from curvfun.unit_wise import unit_wise_from_dense, unit_wise_modules

    torch.manual_seed(4)
    model = Attend(kdim=3, vdim=5, bias_kv=True).to(DT).eval()
    x, m, y = torch.randn(3, 2, 4, dtype=DT), torch.randn(3, 3, 3, dtype=DT), torch.tensor([0, 1, 2])
    params = dict(model.named_parameters())
    got = curvfun.fisher(model, params, (x, m), y, fisher_type="exact", shape="unit")
    dense = unit_wise_from_dense(ref.fisher(model, params, (x, m), y, fisher_type="exact"), params,
                                 unit_wise_modules(model, params))
    assert set(got) == set(dense) and {"att.q_proj_weight", "att.in_proj_bias", "att.bias_k"} <= set(got)
    for name in got:
        checks.assert_close(got[name].blocks, dense[name].blocks, **TOL, what=f"unit-wise blocks of {name}")
    assert got["att.bias_k"].blocks.shape == (4, 1, 1)
    assert got["att.bias_k"].diag().values["bias"].shape == (1, 1, 4)


def test_out_proj_is_captured_when_the_attention_itself_is_left_out():
    """Only ``out_proj`` in params (or the projections frozen): the attention's forward still runs
    the recorded form, so ``out_proj`` is called and captured (it would otherwise be read directly),
    in the functional routes and in the makers."""
    torch.manual_seed(6)
    model = Attend(kdim=3, vdim=5).to(DT).eval()
    x, m, y = torch.randn(3, 2, 4, dtype=DT), torch.randn(3, 3, 3, dtype=DT), torch.tensor([0, 1, 2])
    params = {k: p for k, p in model.named_parameters() if k.startswith("att.out_proj")}
    with warnings.catch_warnings():
        warnings.simplefilter("error", CaptureFallbackWarning)
        got = curvfun.per_sample_grads(model, params, (x, m), y)
        f = curvfun.kfac(model, params, (x, m), y, fisher_type="emp", on_unsupported="raise")
    checks.assert_close_trees(got, ref.per_sample_grads(model, params, (x, m), y), **TOL, what="out_proj only")
    assert set(f) == {"att.out_proj"}
    for k, p in model.att.named_parameters(recurse=False):
        p.requires_grad_(False)
    gm = P.KfacGradientMaker(model, P.PreconditioningConfig(damping=0.1), fisher_type="fisher_emp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dummy_y = gm.setup_model_call(model, x, m)
        gm.setup_loss_call(F.cross_entropy, dummy_y, y)
        gm.forward_and_backward()
    checks.assert_close(gm.curvature["att.out_proj"].A, f["att.out_proj"].A, **TOL, what="maker's out_proj A")


def test_ignore_modules_can_name_a_part():
    """``ignore_modules=["k_proj", "bias_k"]`` leaves exactly those parts of a split attention with
    the plain gradient, reported as ignored (not as entries matching nothing)."""
    torch.manual_seed(7)
    model = Attend(kdim=3, vdim=5, bias_kv=True).to(DT).eval()
    x, m, y = torch.randn(4, 2, 4, dtype=DT), torch.randn(4, 3, 3, dtype=DT), torch.tensor([0, 1, 2, 1])
    plain = torch.autograd.grad(F.cross_entropy(model(x, m), y), [model.att.k_proj_weight, model.att.bias_k])
    cfg = P.PreconditioningConfig(damping=0.1, ignore_modules=["k_proj", "bias_k"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = P.KfacGradientMaker(model, cfg, fisher_type="fisher_emp")
        dummy_y = gm.setup_model_call(model, x, m)
        gm.setup_loss_call(F.cross_entropy, dummy_y, y)
        gm.forward_and_backward()
    assert {"att.k_proj_weight", "att.bias_k"} <= set(gm.plain_modules)
    assert {"att.k_proj_weight", "att.bias_k"} <= set(gm.plain_parameters)
    assert "att.k_proj_weight" not in gm.preconditioned_modules and "att.q_proj_weight" in gm.curvature
    checks.assert_close(model.att.k_proj_weight.grad, plain[0], **TOL, what="ignored part's gradient")
    checks.assert_close(model.att.bias_k.grad, plain[1], **TOL, what="ignored part's gradient")
