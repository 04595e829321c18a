"""The layer registry on models people bring (tests/zoo.py), against plain autograd in float64:
per-sample gradients and norms equal the autograd loop, the Fisher / GGN diagonal equals the
dense matrices' diagonal, every registered layer's arrangement reproduces its per-sample
gradients, and every maker runs ASDL's README loop with a falling loss."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvfun
from curvfun.capture import CaptureFallbackWarning, capture
from curvfun.layers import layer_data, per_sample_layer_grads
from curvfun.testing import checks, reference as ref
from zoo import DT, NAMES, build

TOL = dict(rtol=1e-9, atol=1e-11)


def _trainable(model):
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", NAMES)
def test_per_sample_grads_and_norms_equal_the_autograd_loop(name):
    model, x, y, _ = build(name)
    params = _trainable(model)
    expected = ref.per_sample_grads(model, params, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureFallbackWarning)
        checks.assert_close_trees(curvfun.per_sample_grads(model, params, x, y), expected, **TOL, what=name)
        norms = curvfun.per_sample_grad_norms(model, params, x, y)
    dense = torch.cat([expected[k].reshape(len(y), -1) for k in params], 1)
    checks.assert_close(norms, dense.norm(dim=1), **TOL, what=f"{name} norms")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fisher_type", ["emp", "exact"])
def test_fisher_diagonal_equals_the_dense_diagonal(name, fisher_type):
    model, x, y, _ = build(name, n=3)
    params = _trainable(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureFallbackWarning)
        diag = curvfun.fisher(model, params, x, y, fisher_type=fisher_type, shape="diag")
    checks.assert_diag_matches_dense(diag, ref.fisher(model, params, x, y, fisher_type=fisher_type), params, **TOL,
                                     what=f"{name} {fisher_type}")


@pytest.mark.parametrize("name", NAMES)
def test_every_registered_layer_arrangement_reproduces_its_gradients(name):
    """The handler's canonical form (a, g) of every captured layer gives the autograd per-sample
    gradients through the family route (not the handlers' fast paths)."""
    model, x, y, _ = build(name)
    params = _trainable(model)
    expected = ref.per_sample_grads(model, params, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureFallbackWarning)
        cap = capture(model, params, x, y, fisher_type="emp")
    assert cap.layers, name
    for lname, rec in cap.layers.items():
        got = per_sample_layer_grads(layer_data(rec))
        for role, key in rec.info.keys.items():
            if sum(key in r.info.keys.values() for r in cap.layers.values()) == 1:  # not tied
                checks.assert_close(got[role], expected[key], **TOL, what=f"{name}: {lname}.{role}")


def _raw_calls(model, x, y):
    """Every module's tensor inputs and output gradients from a plain forward and backward of the
    summed per-sample losses (hooks and ``retain_grad``; no curvfun code):
    ``{module: [(input, dL/doutput), ...]}``."""
    calls, handles = {}, []

    def hook(module, args, out):
        if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor) and out.requires_grad:
            out.retain_grad()
            calls.setdefault(module, []).append((args[0].detach(), out))

    for m in model.modules():
        handles.append(m.register_forward_hook(hook))
    try:
        F.cross_entropy(model(x), y, reduction="sum").backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    return {m: [(a, out.grad.detach()) for a, out in c] for m, c in calls.items()}


def _conv_with(m, x, W):
    """Convolution (or transposed convolution) ``m``'s map of ``x`` with the weight ``W`` instead
    of its own, no bias: ``[N, filters, *positions]``."""
    n = m.weight.ndim - 2
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        f = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
        return f(x, W, None, m.stride, m.padding, m.output_padding, 1, m.dilation)
    return (F.conv1d, F.conv2d, F.conv3d)[n - 1](x, W, None, m.stride, m.padding, m.dilation)


@pytest.mark.parametrize("name", NAMES)
def test_kfac_factors_of_every_registered_layer_equal_their_dense_definition(name):
    """K-FAC-expand with the empirical Fisher, every captured layer of the zoo against its definition
    from a plain forward and backward: Linear A = mean a aᵀ over the N·T input rows; convolutions
    V A Vᵀ = mean y yᵀ over the N·T output positions of the same convolution with V's rows as
    filters (V square and random, so A itself is pinned; a transposed convolution through the
    transposed convolution, V in its factor's matrix layout); Embedding A = token frequencies;
    B = (1/N) Σ g gᵀ over all output positions; norm layers' unit-wise blocks = (1/N) Σ_n u_n u_nᵀ of
    the per-sample gradients of (γ_c, β_c). Attention's projections: tests/layers/test_attention.py."""
    from curvfun.kron import EmbeddingFactor, RelaidFactor, UnitWiseFactor
    from curvfun.layers.affine import matrix_as_weight

    model, x, y, _ = build(name, n=5)
    params = _trainable(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        factors = curvfun.kfac(model, params, x, y, fisher_type="emp")
    modules = dict(model.named_modules())
    raw = _raw_calls(model, x, y)
    psg = ref.per_sample_grads(model, params, x, y)
    N, checked = len(y), 0
    for lname, f in factors.items():
        m = modules.get(lname)
        if m is None or isinstance(m, nn.MultiheadAttention) or lname.endswith("out_proj"):
            continue
        (a, g), = raw[m]
        if isinstance(f, UnitWiseFactor):  # norm layers
            cols = [psg[f"{lname}.{p}"].reshape(N, -1) for p in ("weight", "bias") if f"{lname}.{p}" in params]
            U = torch.stack(cols, -1)  # [N, C, p]
            checks.assert_close(f.blocks, torch.einsum("ncp,ncq->cpq", U, U) / N, **TOL, what=f"{name}: {lname}")
            checked += 1
            continue
        conv = isinstance(m, nn.modules.conv._ConvNd)
        G = (g.movedim(1, -1) if conv else g).reshape(-1, g.shape[1] if conv else g.shape[-1])
        inner = f.inner if isinstance(f, RelaidFactor) else f
        checks.assert_close(inner.B, G.T @ G / N, **TOL, what=f"{name}: B of {lname}")
        if f"{lname}.weight" not in params:  # a frozen weight: the bias block B only
            pass
        elif isinstance(f, EmbeddingFactor):
            counts = torch.bincount(a.reshape(-1), minlength=m.num_embeddings).to(DT)
            checks.assert_close(f.A, counts / a.numel(), **TOL, what=f"{name}: A of {lname}")
        elif isinstance(m, nn.Linear):
            rows = a.reshape(-1, a.shape[-1])
            checks.assert_close(f.A, rows.T @ rows / rows.shape[0], **TOL, what=f"{name}: A of {lname}")
        else:  # convolutions (groups 1 in the zoo)
            assert conv and m.groups == 1, lname
            d = inner.A.shape[-1]
            V = torch.randn(d, d, dtype=DT, generator=torch.Generator().manual_seed(len(lname)))
            if isinstance(f, RelaidFactor):
                W = matrix_as_weight(V[None], (m.in_channels, d, *m.kernel_size), f.layout)
            else:
                W = V.reshape(d, m.in_channels, *m.kernel_size)
            Y = _conv_with(m, a, W).movedim(1, -1).reshape(-1, d)
            checks.assert_close(V @ inner.A @ V.T, Y.T @ Y / Y.shape[0], rtol=1e-8, atol=1e-10,
                                what=f"{name}: A of {lname}")
        checked += 1
    assert checked or name == "lstm", name


@pytest.mark.parametrize("name", NAMES)
def test_every_registered_layer_batch_gradient_is_the_sum_of_its_per_sample_gradients(name):
    """:func:`curvfun.layers.layer_batch_grads` (no per-sample tensors) = Σ_n of autograd's."""
    from curvfun.layers import layer_batch_grads

    model, x, y, _ = build(name)
    params = _trainable(model)
    expected = ref.per_sample_grads(model, params, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureFallbackWarning)
        cap = capture(model, params, x, y, fisher_type="emp")
    for lname, rec in cap.layers.items():
        got = layer_batch_grads(layer_data(rec))
        assert set(got) == set(rec.info.keys), lname
        for role, key in rec.info.keys.items():
            checks.assert_close(got[role], expected[key].sum(0), **TOL, what=f"{name}: {lname}.{role}")


def test_attention_projections_are_captured_not_fallen_back():
    """In a TransformerEncoderLayer, MHA's packed in_proj and its out_proj are registered layers
    of the capture (no fallback warning); a tied head read as ``h @ E.T`` is detected and named."""
    model, x, y, _ = build("gpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CaptureFallbackWarning)
        cap = capture(model, _trainable(model), x, y, fisher_type="emp")
    assert {"block.self_attn", "block.self_attn.out_proj", "block.linear1", "block.linear2"} <= set(cap.layers)
    model, x, y, _ = build("gpt_tied")
    with pytest.warns(CaptureFallbackWarning, match=r"tok \(parameter\(s\) \['tok.weight'\] used outside"):
        cap = capture(model, _trainable(model), x, y, fisher_type="emp")
    assert "tok" not in cap.layers and "tok" in cap.unsupported


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kv_same", [True, False])
def test_cross_attention_is_captured_as_three_groups(bias, kv_same):
    """query ≠ key (target length 5, source length 3): the packed projection is three groups
    (q on the query, k and v on key and value), zero-padded to the longer sequence. Per-sample
    gradients and the exact Fisher diagonal equal autograd; K-FAC's A of each group is the mean
    outer product of its own inputs over its own positions (expand), and the mean input per
    sample (reduce)."""

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(4, 2, batch_first=True, bias=bias)
            self.head = nn.Linear(4, 2)

        def forward(self, x, m):
            return self.head(self.att(x, m, m if kv_same else torch.tanh(m))[0].mean(1))

    torch.manual_seed(0)
    model = Cross().double().eval()
    x, m = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 3, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 1])
    params = dict(model.named_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error", CaptureFallbackWarning)
        got = curvfun.per_sample_grads(model, params, (x, m), y)
        diag = curvfun.fisher(model, params, (x, m), y, fisher_type="exact", shape="diag")
        f = curvfun.kfac(model, params, (x, m), y, fisher_type="emp", on_unsupported="raise")
        r = curvfun.kfac(model, params, (x, m), y, fisher_type="emp", kfac_type="reduce")
    checks.assert_close_trees(got, ref.per_sample_grads(model, params, (x, m), y), **TOL, what="cross-attention")
    checks.assert_diag_matches_dense(diag, ref.fisher(model, params, (x, m), y, fisher_type="exact"), params, **TOL,
                                     what="cross-attention exact Fisher diagonal")
    v_in = m if kv_same else torch.tanh(m)
    for j, inp in enumerate((x, m, v_in)):
        rows = inp.reshape(-1, 4)
        checks.assert_close(f["att"].A[j], rows.T @ rows / rows.shape[0], **TOL, what=f"A of group {j}")
        mean = inp.mean(1)
        checks.assert_close(r["att"].A[j], mean.T @ mean / 3, **TOL, what=f"reduce A of group {j}")
    assert f["att"].B.shape == (3, 4, 4) and "att.out_proj" in f


@pytest.mark.parametrize("conv", [
    lambda: nn.ConvTranspose1d(2, 4, 3, stride=2, padding=1, output_padding=1, groups=2),
    lambda: nn.ConvTranspose2d(3, 2, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
    lambda: nn.ConvTranspose3d(2, 2, 2, stride=2),
])
def test_transposed_conv_factor_acts_in_the_weights_own_layout(conv):
    """The K-FAC factor of a transposed convolution multiplies gradients in the stored layout
    ``[C_in, C_out/G, *k]``: ``to_dense()`` (parameter order) times vec(G) is vec(matvec(G)), and the
    weight block is kron(B, A) permuted to that order."""
    torch.manual_seed(0)
    c = conv().double()
    x = torch.randn(3, c.in_channels, *([3] * (c.weight.ndim - 2)), dtype=torch.float64)
    model = nn.Sequential(c, nn.Flatten(), nn.LazyLinear(2).double())
    model(x)
    y = torch.tensor([0, 1, 0])
    f = curvfun.kfac(model, dict(model.named_parameters()), x, y, fisher_type="emp")["0"]
    grad = {"weight": torch.randn_like(c.weight), "bias": torch.randn_like(c.bias)}
    dense = f.to_dense(include_bias=True)
    out = f.matvec(grad)
    checks.assert_close(dense @ torch.cat([grad["weight"].reshape(-1), grad["bias"]]),
                        torch.cat([out["weight"].reshape(-1), out["bias"]]), **TOL, what="to_dense vs matvec")
    inv = f.damped_inverse(0.1)
    back = f.matvec(inv.matvec(grad))
    assert back["weight"].shape == c.weight.shape


class Scaled(nn.Module):
    """A user's own affine layer: ``y = x (2W)ᵀ + b``."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in))
        self.bias = nn.Parameter(torch.randn(d_out))

    def forward(self, x):
        return F.linear(x, 2 * self.weight, self.bias)


def test_register_layer_for_a_users_module():
    """A handler registered for a custom class arranges its record (inputs scaled by 2 so that
    Σ g aᵀ is the gradient of W); per-sample gradients then come from the capture and equal
    autograd; unregistered, the same class takes the exact fallback."""
    from curvfun.layers import LayerHandler, register_layer, unregister_layer
    from curvfun.layers.linear import tokens_as_positions

    class ScaledHandler(LayerHandler):
        family = "affine"

        def arrange(self, module, inputs, grads):
            return tokens_as_positions([2 * x for x in inputs], grads)

    torch.manual_seed(0)
    model = nn.Sequential(Scaled(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    params = dict(model.named_parameters())
    expected = ref.per_sample_grads(model, params, x, y)
    register_layer(Scaled, ScaledHandler())
    try:
        cap = capture(model, params, x, y, fisher_type="emp")
        assert "0" in cap.layers
        checks.assert_close_trees(curvfun.per_sample_grads(model, params, x, y), expected, **TOL, what="registered")
        assert set(curvfun.kfac(model, params, x, y, fisher_type="emp")) == {"0", "2"}
    finally:
        unregister_layer(Scaled)
    assert "0" in capture(model, params, x, y, fisher_type="emp").unsupported
    checks.assert_close_trees(curvfun.per_sample_grads(model, params, x, y), expected, **TOL, what="fallback")


def test_register_layer_rejects_bad_arguments():
    from curvfun.layers import LayerHandler, register_layer

    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_layer(int, LayerHandler())
    with pytest.raises(TypeError, match="LayerHandler instance"):
        register_layer(nn.Linear, object())

    class Odd(LayerHandler):
        family = "spline"

    with pytest.raises(ValueError, match="family is 'spline'"):
        register_layer(nn.Linear, Odd())


def test_a_subclass_overriding_forward_is_not_served_by_its_parents_handler():
    class LoRA(nn.Linear):
        def forward(self, x):
            return super().forward(x) + 0.5 * x.sum(-1, keepdim=True)

    from curvfun.layers import handler_for

    assert handler_for(LoRA(2, 3)) is None
    assert handler_for(nn.modules.linear.NonDynamicallyQuantizableLinear(2, 3)) is not None


class MHAOnly(nn.Module):
    """One MultiheadAttention with the call options under test, pooled, linear head."""

    def __init__(self, batch_first, need_weights, average, mask, pad, zero_attn=False):
        super().__init__()
        self.att = nn.MultiheadAttention(6, 3, batch_first=batch_first, add_zero_attn=zero_attn)
        self.head = nn.Linear(6, 2)
        self.opts = dict(need_weights=need_weights, average_attn_weights=average)
        self.mask, self.pad = mask, pad

    def forward(self, x):
        T = x.shape[1]
        h = x if self.att.batch_first else x.transpose(0, 1)
        kw = dict(self.opts)
        if self.mask == "bool":
            kw["attn_mask"] = torch.ones(T, T, dtype=torch.bool).triu(1)
        elif self.mask == "float":
            kw["attn_mask"] = 0.3 * torch.arange(T * T, dtype=x.dtype).reshape(T, T).sin()
        if self.pad:
            kw["key_padding_mask"] = torch.zeros(x.shape[0], T, dtype=torch.bool).index_fill_(1, torch.tensor([T - 1]), True)
        out, w = self.att(h, h, h, **kw)
        out = out if self.att.batch_first else out.transpose(0, 1)
        extra = 0 if w is None else 0.1 * w.sum()
        return self.head(out.mean(1)) + extra


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights, average", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("zero_attn", [False, True])
def test_multihead_attention_call_options_are_captured_exactly(batch_first, need_weights, average, mask, pad,
                                                               zero_attn):
    """Every call option of self-attention (batch_first, need_weights and head averaging, bool
    and float masks, key padding, add_zero_attn): captured without fallback, per-sample gradients and the exact
    Fisher diagonal equal autograd, K-FAC has the in-projection and out_proj."""
    torch.manual_seed(0)
    model = MHAOnly(batch_first, need_weights, average, mask, pad, zero_attn).double().eval()
    x, y = torch.randn(3, 4, 6, dtype=torch.float64), torch.tensor([0, 1, 1])
    params = dict(model.named_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error", CaptureFallbackWarning)
        got = curvfun.per_sample_grads(model, params, x, y)
        diag = curvfun.fisher(model, params, x, y, fisher_type="exact", shape="diag")
        factors = curvfun.kfac(model, params, x, y, fisher_type="emp", on_unsupported="raise")
    checks.assert_close_trees(got, ref.per_sample_grads(model, params, x, y), **TOL, what="MHA per-sample grads")
    checks.assert_diag_matches_dense(diag, ref.fisher(model, params, x, y, fisher_type="exact"), params, **TOL,
                                     what="MHA exact Fisher diagonal")
    assert {"att", "att.out_proj", "head"} <= set(factors)
    assert factors["att"].A.shape == (6, 6) and factors["att"].B.shape == (18, 18)


def test_transformer_decoder_layer_self_and_cross_attention_are_captured():
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.dec = nn.TransformerDecoderLayer(6, 2, 8, dropout=0.0, batch_first=True)
            self.head = nn.Linear(6, 2)

        def forward(self, x, memory):
            return self.head(self.dec(x, memory).mean(1))

    torch.manual_seed(0)
    model = Decoder().double().eval()
    x, mem = torch.randn(3, 4, 6, dtype=torch.float64), torch.randn(3, 7, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 1])
    params = dict(model.named_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error", CaptureFallbackWarning)
        cap = capture(model, params, (x, mem), y, fisher_type="emp")
        got = curvfun.per_sample_grads(model, params, (x, mem), y)
        f = curvfun.kfac(model, params, (x, mem), y, fisher_type="emp", on_unsupported="raise")
    assert {"dec.self_attn", "dec.self_attn.out_proj", "dec.multihead_attn", "dec.multihead_attn.out_proj"} <= set(cap.layers)
    assert f["dec.self_attn"].A.shape == (6, 6) and f["dec.multihead_attn"].A.shape == (3, 6, 6)
    checks.assert_close_trees(got, ref.per_sample_grads(model, params, (x, mem), y), **TOL, what="decoder layer")


def test_a_handler_putting_a_parameter_in_two_parts_is_refused():
    from curvfun.layers import LayerHandler, LayerPart, register_layer, unregister_layer
    from curvfun.layers.linear import tokens_as_positions

    class Twice(nn.Linear):
        pass

    class TwiceHandler(LayerHandler):
        def parts(self, module):
            return (LayerPart("a", {"weight": "weight", "bias": "bias"}), LayerPart("b", {"bias": "bias"}))

        def arrange(self, module, inputs, grads):
            return tokens_as_positions(inputs, grads)

    register_layer(Twice, TwiceHandler())
    try:
        model = nn.Sequential(Twice(2, 2))
        with pytest.raises(ValueError, match=r"puts a parameter in several parts \(\['bias'\]\)"):
            curvfun.per_sample_grads(model, dict(model.named_parameters()), torch.randn(2, 2), torch.tensor([0, 1]))
    finally:
        unregister_layer(Twice)
