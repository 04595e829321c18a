"""K-FAC factors (issue 3) against their definitions, computed here with autograd loops.

Ground truth in this file is independent of curvfun's capture: a forward hook on the layer
reads its inputs and outputs while the model runs on **one sample at a time**, and
``torch.autograd.grad`` of each sample's loss (``fisher_type="emp"``) or of each
per-class / per-entry term of the likelihood (``"exact"``, by enumeration: Σ_c p_c ∇(−log p_c)
for cross-entropy, ∇f_e/√var for MSE, σ/(1−σ)-weighted ∇(−log σ(±f_e)) for BCE) gives the
output-gradients ĝ. Conv2d patches come from an explicit im2col loop over output pixels,
kernel offsets, stride, padding, dilation and groups. The factors are then (GUIDE)

* expand: A = (1/(N·T)) Σ_{n,t} a_nt a_ntᵀ, B = (1/N) Σ_{n,k} w_k Σ_t ĝ_ntk ĝ_ntkᵀ;
* reduce: A = (1/N) Σ_n â_n â_nᵀ with â_n = mean_t a_nt, B = (1/N) Σ_{n,k} w_k ĝ_nk ĝ_nkᵀ with
  ĝ_nk = Σ_t ĝ_ntk;

with T = positions (sequence tokens, output pixels, and the calls of a weight-shared module)
and, for ``bias="folded"``, ā = [a, 1]. Per-sample gradients are compared with the reference
autograd loop (:mod:`curvfun.testing.reference`). float64, tolerance
``1e-10·max(1, max|expected|) + 1e-8·|expected|`` entrywise.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import curvfun
from curvfun.capture import CaptureFallbackWarning
from curvfun.testing import checks, reference as ref, strategies as cst
from model_init import generator as _gen, init_float64 as _init

RTOL, ATOL = 1e-8, 1e-10
# the costliest conv tests run half the profile's examples (at least 3)
HALF = settings(max_examples=max(3, settings.default.max_examples // 2))


def close(actual, expected, what):
    checks.assert_close(actual, expected, rtol=RTOL, atol=ATOL, what=what)




def loss_min_out(loss):
    return 2 if curvfun.get_likelihood(loss).name == "cross_entropy" else 1


# --------------------------------------------------------------------------------------
# ground truth: per-sample layer inputs and output-gradient columns by autograd
# --------------------------------------------------------------------------------------
def _loss(o, y, lik):
    name = lik.name
    if name == "cross_entropy":
        C = o.shape[-1]
        return F.cross_entropy(o.reshape(-1, C), y.reshape(-1), reduction="sum",
                               ignore_index=lik.ignore_index, label_smoothing=lik.label_smoothing)
    y = y.reshape(o.shape).to(o.dtype)
    if name == "mse":
        return 0.5 * ((o - y) ** 2).sum() / lik.var
    return F.binary_cross_entropy_with_logits(o, y, reduction="sum")


def _columns(o, y, lik, fisher_type):
    """(w, scalar) with Σ_k w_k ∇s_k ∇s_kᵀ = this sample's Fisher contribution."""
    if fisher_type == "emp":
        yield 1.0, _loss(o, y, lik)
        return
    if lik.name == "cross_entropy":
        C = o.shape[-1]
        logp = torch.log_softmax(o.reshape(-1, C), -1)
        keep = y.reshape(-1) != lik.ignore_index
        for t in range(logp.shape[0]):
            if keep[t]:
                for c in range(C):
                    yield float(logp[t, c].exp()), -logp[t, c]
    elif lik.name == "mse":
        for e in o.reshape(-1):
            yield 1.0 / lik.var, e
    else:
        for e in o.reshape(-1):
            s = float(torch.sigmoid(e))
            yield s, -F.logsigmoid(e)
            yield 1.0 - s, -F.logsigmoid(-e)


def layer_io(model, module, x, y, loss, fisher_type):
    """Per sample n: (inputs of each call, [(w_k, [ĝ of each call])]) from a 1-sample forward."""
    lik = curvfun.get_likelihood(loss)
    recs = []
    handle = module.register_forward_hook(lambda m, args, out: recs.append((args[0].detach(), out)))
    result = []
    try:
        for n in range(x.shape[0]):
            recs.clear()
            out = model(x[n:n + 1])[0]
            ins, outs = [a for a, _ in recs], [o for _, o in recs]
            cols = []
            for w, s in _columns(out, y[n], lik, fisher_type):
                gs = torch.autograd.grad(s, outs, retain_graph=True, allow_unused=True)
                cols.append((w, [torch.zeros_like(o) if g is None else g.detach() for g, o in zip(gs, outs)]))
            result.append((ins, cols))
    finally:
        handle.remove()
    return result


def im2col(x1, conv):
    """Explicit patches of one sample ``[C_in, H, W]``: ``[G, T, C_in/G·kh·kw]`` (pixels row-major,
    patch entries ordered (channel, kernel row, kernel col) like the weight)."""
    G = conv.groups
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    if conv.padding == "valid":
        ph = pw = 0
    elif conv.padding == "same":  # total padding d·(k − 1), even here: split equally
        ph, pw = dh * (kh - 1) // 2, dw * (kw - 1) // 2
    else:
        ph, pw = conv.padding
    Cin, H, W = x1.shape
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cg = Cin // G
    v = x1.tolist()
    out = torch.zeros(G, Ho * Wo, cg * kh * kw, dtype=x1.dtype)
    for g in range(G):
        for i in range(Ho):
            for j in range(Wo):
                col = []
                for c in range(g * cg, (g + 1) * cg):
                    for u in range(kh):
                        for q in range(kw):
                            h, w = i * sh - ph + u * dh, j * sw - pw + q * dw
                            col.append(v[c][h][w] if 0 <= h < H and 0 <= w < W else 0.0)
                out[g, i * Wo + j] = torch.tensor(col, dtype=x1.dtype)
    return out


def patches(module, a):
    """Inputs of one call of one sample as ``[G, T, d]`` (Conv2d: explicit im2col)."""
    if isinstance(module, nn.Conv2d):
        return im2col(a[0], module)
    return a.reshape(1, -1, a.shape[-1])


def grad_positions(module, g_out):
    """Output-gradients of one call of one sample as ``[G, T, o]`` (same pixel order)."""
    if isinstance(module, nn.Conv2d):
        G = module.groups
        return g_out[0].reshape(G, g_out.shape[1] // G, -1).transpose(1, 2)
    return g_out.reshape(1, -1, g_out.shape[-1])


def expected_factors(model, name, x, y, loss, fisher_type, kfac_type="expand", folded=False):
    """A and B of a Linear / Conv2d by their definitions (module docstring)."""
    module = model.get_submodule(name)
    data = layer_io(model, module, x, y, loss, fisher_type)
    N = len(data)
    A = B = 0
    for ins, cols in data:
        pa = torch.cat([patches(module, a) for a in ins], 1)
        if folded:
            pa = torch.cat([pa, torch.ones_like(pa[..., :1])], -1)
        T = pa.shape[1]
        if kfac_type == "expand":
            A = A + pa.transpose(1, 2) @ pa / T
        else:
            m = pa.mean(1)
            A = A + m.unsqueeze(2) * m.unsqueeze(1)
        for w, gs in cols:
            pg = torch.cat([grad_positions(module, g) for g in gs], 1)
            if kfac_type == "expand":
                B = B + w * pg.transpose(1, 2) @ pg
            else:
                s = pg.sum(1)
                B = B + w * s.unsqueeze(2) * s.unsqueeze(1)
    A, B = A / N, B / N
    if A.shape[0] == 1:
        A, B = A[0], B[0]
    return A, B


def check_factors(f, A, B, name):
    close(f.A, A, f"{name}: A")
    close(f.B, B, f"{name}: B")


def layer_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


# --------------------------------------------------------------------------------------
# Conv2d
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fisher_type", ["exact", "emp"])
@given(data=st.data())
def test_conv_factors_equal_explicit_im2col_definition(fisher_type, data):
    """Conv2d with drawn kernel, stride, padding, dilation and groups (and the Linear head):
    A and B (per group, ``[G, d, d]``) equal the explicit-im2col definition, expand and reduce,
    separate and folded, for the three losses."""
    loss = data.draw(cst.losses(configured=False))
    case = data.draw(cst.cnns(min_out=loss_min_out(loss)))
    x, y = data.draw(cst.batches(case, loss, max_n=3))
    kfac_type = data.draw(st.sampled_from(["expand", "reduce"]))
    bias = data.draw(st.sampled_from(["separate", "folded"]))
    model = case.model
    params = {n: p.detach() for n, p in model.named_parameters()}
    f = curvfun.kfac(model, params, x, y, loss=loss, fisher_type=fisher_type, kfac_type=kfac_type, bias=bias)
    for name in layer_names(model):
        folded = bias == "folded" and model.get_submodule(name).bias is not None
        A, B = expected_factors(model, name, x, y, loss, fisher_type, kfac_type, folded)
        check_factors(f[name], A, B, name)


@given(case=cst.cnns(min_out=2), data=st.data())
def test_conv_per_sample_grads_equal_autograd_loop_and_explicit_im2col(case, data):
    """curvfun.per_sample_grads (the capture path: Σ_t ĝ_t a_tᵀ per group) equals the reference
    autograd loop, and so does the explicit im2col product built here (which validates the
    im2col ground truth used above)."""
    x, y = data.draw(cst.batches(case, "cross_entropy", max_n=4))
    model = case.model
    params = {n: p.detach() for n, p in model.named_parameters()}
    expected = ref.per_sample_grads(model, params, x, y)
    got = curvfun.per_sample_grads(model, params, x, y)
    checks.assert_close_trees(got, expected, rtol=RTOL, atol=ATOL, what="per-sample grads")
    conv = model[0]
    G = conv.groups
    for n, (ins, cols) in enumerate(layer_io(model, conv, x, y, "cross_entropy", "emp")):
        pa, pg = patches(conv, ins[0]), grad_positions(conv, cols[0][1][0])
        gw = (pg.transpose(1, 2) @ pa).reshape(conv.weight.shape)
        close(gw, expected["0.weight"][n], "explicit im2col weight gradient")
        if conv.bias is not None:
            close(pg.sum(1).reshape(-1), expected["0.bias"][n], "bias gradient Σ_t ĝ_t")
        assert pa.shape[0] == G


@st.composite
def asymmetric_convs(draw):
    """Conv2d with independent (height, width) kernel, stride, dilation and padding, or a
    string padding ('valid', or 'same' with an even total padding), groups 1-2; then tanh,
    Flatten and a Linear head."""
    G = draw(st.integers(1, 2))
    cin, cout = G * draw(st.integers(1, 2)), G * draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    mode = draw(st.sampled_from(["ints", "valid", "same"]))
    if mode == "same":
        sh = sw = 1
        dh = 2 if kh == 2 else draw(st.integers(1, 2))
        dw = 2 if kw == 2 else draw(st.integers(1, 2))
        pad, ph, pw = "same", dh * (kh - 1) // 2, dw * (kw - 1) // 2
    else:
        sh, sw, dh, dw = (draw(st.integers(1, 2)) for _ in range(4))
        ph, pw = (draw(st.integers(0, 1)), draw(st.integers(0, 1))) if mode == "ints" else (0, 0)
        pad = (ph, pw) if mode == "ints" else "valid"
    H = draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), 5))
    W = draw(st.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), 5))
    conv = nn.Conv2d(cin, cout, (kh, kw), stride=(sh, sw), padding=pad, dilation=(dh, dw), groups=G,
                     bias=draw(st.booleans()))
    feats = conv(torch.zeros(1, cin, H, W, dtype=conv.weight.dtype)).numel()
    C = draw(st.integers(2, 3))
    model = _init(nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(feats, C)), draw(cst.seeds()))
    return model, (cin, H, W), C


@HALF
@given(case=asymmetric_convs(), n=st.integers(1, 3), seed=cst.seeds(),
       fisher_type=st.sampled_from(["exact", "emp"]), kfac_type=st.sampled_from(["expand", "reduce"]),
       bias=st.sampled_from(["separate", "folded"]))
def test_asymmetric_and_string_padding_convs(case, n, seed, fisher_type, kfac_type, bias):
    """Non-square kernels / strides / dilations / paddings and padding='valid' / 'same' (catch
    height-width transpositions): factors equal the explicit im2col definition and per-sample
    gradients equal the autograd loop."""
    model, shape, C = case
    g = _gen(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, C, (n,), generator=g)
    params = {k: v.detach() for k, v in model.named_parameters()}
    f = curvfun.kfac(model, params, x, y, fisher_type=fisher_type, kfac_type=kfac_type, bias=bias)
    folded = bias == "folded" and model[0].bias is not None
    A, B = expected_factors(model, "0", x, y, "cross_entropy", fisher_type, kfac_type, folded)
    check_factors(f["0"], A, B, "conv")
    checks.assert_close_trees(curvfun.per_sample_grads(model, params, x, y), ref.per_sample_grads(model, params, x, y),
                              rtol=RTOL, atol=ATOL, what="per-sample grads")


@pytest.mark.parametrize("conv, pad, mode", [
    (lambda: nn.Conv2d(1, 2, 2, padding="same"), (0, 1, 0, 1), "constant"),  # odd total: PyTorch pads after
    (lambda: nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), (1, 1, 1, 1), "reflect"),
    (lambda: nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"), (1, 1, 1, 1), "circular"),
])
def test_asymmetric_same_padding_and_padding_modes_are_captured(conv, pad, mode):
    """'same' with an odd total padding and non-zero padding modes get factors: A equals the
    Gram of ``F.unfold`` patches of the input padded as the convolution pads it, and the
    per-sample gradients equal the autograd loop."""
    model = _init(nn.Sequential(conv(), nn.Flatten(), nn.Linear(32, 2)), 0).double()  # both keep 4x4
    x = torch.randn(3, 1, 4, 4, generator=_gen(0), dtype=torch.float64)
    y = torch.tensor([0, 1, 1])
    params = dict(model.named_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error", CaptureFallbackWarning)
        f = curvfun.kfac(model, params, x, y, fisher_type="emp", on_unsupported="raise")
    assert set(f) == {"0", "2"}
    cols = F.unfold(F.pad(x, pad, mode=mode), model[0].kernel_size).transpose(1, 2).reshape(-1, 4 if mode == "constant" else 9)
    checks.assert_close(f["0"].A, cols.T @ cols / cols.shape[0], rtol=1e-12, atol=1e-12, what="A from F.unfold")
    checks.assert_close_trees(curvfun.per_sample_grads(model, params, x, y), ref.per_sample_grads(model, params, x, y),
                              rtol=RTOL, atol=ATOL, what="per-sample grads")


# --------------------------------------------------------------------------------------
# Linear on sequences / any number of leading dims, Embedding
# --------------------------------------------------------------------------------------
class Seq2D(nn.Module):
    """Linear → tanh → Linear on ``[N, T1, T2, d]`` (two leading position dims)."""

    def __init__(self, d, h, C):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, C)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize("fisher_type", ["exact", "emp"])
@given(data=st.data())
def test_linear_sequence_factors_equal_definition(fisher_type, data):
    """Linear layers on ``[N, T, d]`` (sequence models with activations and LayerNorm, output
    ``[N, T, C]``) and on ``[N, T1, T2, d]``: expand and reduce factors, separate and folded."""
    loss = data.draw(cst.losses(configured=False))
    if data.draw(st.booleans()):
        case = data.draw(cst.sequence_models(min_out=loss_min_out(loss)))
        model = case.model
        x, y = data.draw(cst.batches(case, loss, max_n=3))
    else:
        d, h, C = (data.draw(st.integers(1, 3)) for _ in range(3))
        C = max(C, loss_min_out(loss))
        model = _init(Seq2D(d, h, C), data.draw(cst.seeds()))
        n, T1, T2 = (data.draw(st.integers(1, 2)) for _ in range(3))
        g = _gen(data.draw(cst.seeds()))
        x = torch.randn(n, T1, T2, d, generator=g)
        case = cst.ModelCase(model, "Seq2D", (T1, T2, C), lambda *a: x)
        y = cst.make_targets(case, loss, n, g)
    kfac_type = data.draw(st.sampled_from(["expand", "reduce"]))
    bias = data.draw(st.sampled_from(["separate", "folded"]))
    params = {n: p.detach() for n, p in model.named_parameters()}
    f = curvfun.kfac(model, params, x, y, loss=loss, fisher_type=fisher_type, kfac_type=kfac_type, bias=bias,
                     on_unsupported="ignore")
    for name in layer_names(model):
        A, B = expected_factors(model, name, x, y, loss, fisher_type, kfac_type, bias == "folded")
        check_factors(f[name], A, B, name)


class EmbedSeq(nn.Module):
    def __init__(self, V, E, C):
        super().__init__()
        self.embed = nn.Embedding(V, E)
        self.head = nn.Linear(E, C)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)))


@pytest.mark.parametrize("fisher_type", ["exact", "emp"])
@given(V=st.integers(2, 5), E=st.integers(1, 3), C=st.integers(2, 3), n=st.integers(1, 3), T=st.integers(1, 3),
       seed=cst.seeds())
def test_embedding_factors_equal_definition(fisher_type, V, E, C, n, T, seed):
    """Embedding: A = token counts/(N·T) (a vector: the diagonal), B = (1/N) Σ w Σ_t ĝ ĝᵀ
    (always expand, even when kfac_type="reduce")."""
    model = _init(EmbedSeq(V, E, C), seed)
    g = _gen(seed)
    ids = torch.randint(0, V, (n, T), generator=g)
    y = torch.randint(0, C, (n, T), generator=g)
    data = layer_io(model, model.embed, ids, y, "cross_entropy", fisher_type)
    B = sum(w * gs[0].reshape(-1, E).T @ gs[0].reshape(-1, E) for _, cols in data for w, gs in cols) / n
    counts = torch.bincount(ids.reshape(-1), minlength=V).to(torch.float64)
    for kfac_type in ("expand", "reduce"):
        f = curvfun.kfac(model, {"embed.weight": model.embed.weight}, ids, y, fisher_type=fisher_type,
                         kfac_type=kfac_type)["embed"]
        close(f.A, counts / (n * T), "embedding A")
        close(f.B, B, "embedding B")


# --------------------------------------------------------------------------------------
# weight sharing: the same module called several times
# --------------------------------------------------------------------------------------
class TwiceComposed(nn.Module):
    """``head(tanh(lin(tanh(lin(x)))))``: one square Linear applied twice in sequence."""

    def __init__(self, d, C):
        super().__init__()
        self.lin, self.head = nn.Linear(d, d), nn.Linear(d, C)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


class TwiceParallel(nn.Module):
    """``stack([lin(x[:, 0]), lin(x[:, 1])], 1)``: the same Linear on two slices."""

    def __init__(self, d, C):
        super().__init__()
        self.lin = nn.Linear(d, C)

    def forward(self, x):
        return torch.stack([self.lin(x[:, 0]), self.lin(x[:, 1])], 1)


@given(d=st.integers(1, 4), C=st.integers(2, 3), n=st.integers(1, 4), seed=cst.seeds(),
       loss=cst.losses(configured=False))
def test_weight_shared_module_per_sample_grads_and_expand_positions(d, C, n, seed, loss):
    """A Linear called twice in sequence: per-sample gradients (summed over both calls) equal
    the reference autograd loop, and K-FAC treats the two calls as expand positions (T = 2)
    for both kfac types, with a = each call's input and ĝ = each call's output-gradient."""
    model = _init(TwiceComposed(d, C), seed)
    g = _gen(seed)
    x = torch.randn(n, d, generator=g)
    y = cst.make_targets(cst.ModelCase(model, "twice", (C,), None), loss, n, g)
    params = {k: v.detach() for k, v in model.named_parameters()}
    checks.assert_close_trees(curvfun.per_sample_grads(model, params, x, y, loss=loss),
                              ref.per_sample_grads(model, params, x, y, loss=loss),
                              rtol=RTOL, atol=ATOL, what="per-sample grads (shared Linear)")
    for fisher_type in ("exact", "emp"):
        for kfac_type in ("expand", "reduce"):
            f = curvfun.kfac(model, params, x, y, loss=loss, fisher_type=fisher_type, kfac_type=kfac_type)
            for name in ("lin", "head"):
                A, B = expected_factors(model, name, x, y, loss, fisher_type, kfac_type)
                check_factors(f[name], A, B, f"{name} ({fisher_type}, {kfac_type})")


@given(d=st.integers(1, 4), C=st.integers(1, 3), n=st.integers(1, 3), seed=cst.seeds(),
       kfac_type=st.sampled_from(["expand", "reduce"]), bias=st.sampled_from(["separate", "folded"]))
def test_two_calls_equal_one_call_on_a_length_two_sequence(d, C, n, seed, kfac_type, bias):
    """Calling a Linear on x[:, 0] and x[:, 1] separately gives the same factors as calling it
    once on the ``[N, 2, d]`` sequence (calls = positions), expand and reduce."""
    par = _init(TwiceParallel(d, C), seed)
    seq = nn.Sequential(par.lin)
    g = _gen(seed)
    x = torch.randn(n, 2, d, generator=g)
    y = torch.randn(n, 2, C, generator=g)
    kw = dict(loss="mse", fisher_type="exact", kfac_type=kfac_type, bias=bias)
    torch.testing.assert_close(par(x), seq(x))
    a = curvfun.kfac(par, dict(par.named_parameters()), x, y, **kw)["lin"]
    b = curvfun.kfac(seq, dict(seq.named_parameters()), x, y, **kw)["0"]
    close(a.A, b.A, "A")
    close(a.B, b.B, "B")
    A, B = expected_factors(seq, "0", x, y, "mse", "exact", kfac_type, bias == "folded")
    check_factors(a, A, B, "lin")


# --------------------------------------------------------------------------------------
# unsupported layers
# --------------------------------------------------------------------------------------
class WithGRU(nn.Module):
    def __init__(self, d, h, C, scale):
        super().__init__()
        self.fc = nn.Linear(d, h)
        self.gru = nn.GRU(h, h, batch_first=True)
        self.head = nn.Linear(h, C)
        self.scale = nn.Parameter(torch.ones(())) if scale else None

    def forward(self, x):
        out, _ = self.gru(torch.tanh(self.fc(x)))
        out = self.head(out)
        return out * self.scale if self.scale is not None else out


@given(d=st.integers(1, 3), h=st.integers(1, 3), C=st.integers(2, 3), n=st.integers(1, 2), T=st.integers(1, 3),
       scale=st.booleans(), seed=cst.seeds())
def test_unsupported_layers_are_named_and_supported_layers_keep_their_factors(d, h, C, n, T, scale, seed):
    """A GRU (and a bare root-level Parameter) in params: kfac warns naming them (module name
    and class; ``<root>`` for the root), ``on_unsupported="raise"`` raises naming them, and
    the Linear layers before and after still get factors equal to their definition."""
    model = _init(WithGRU(d, h, C, scale), seed)
    g = _gen(seed)
    x = torch.randn(n, T, d, generator=g)
    y = torch.randint(0, C, (n, T), generator=g)
    params = dict(model.named_parameters())
    with pytest.warns(UserWarning, match=r"gru \(GRU") as rec:
        f = curvfun.kfac(model, params, x, y, fisher_type="exact")
    msg = " ".join(str(w.message) for w in rec)
    assert "no Kronecker factors" in msg
    if scale:
        assert "<root>" in msg and "scale" in msg
    assert set(f) == {"fc", "head"}
    for name in ("fc", "head"):
        A, B = expected_factors(model, name, x, y, "cross_entropy", "exact")
        check_factors(f[name], A, B, name)
    with pytest.raises(ValueError, match=r"gru \(GRU.*gru\.weight_ih_l0"):
        curvfun.kfac(model, params, x, y, fisher_type="exact", on_unsupported="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g2 = curvfun.kfac(model, params, x, y, fisher_type="exact", on_unsupported="ignore")
    close(g2["head"].B, f["head"].B, "ignore mode gives the same factors")
    # excluding the unsupported parameters silences the warning
    sub = {k: v for k, v in params.items() if k.startswith(("fc.", "head."))}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f3 = curvfun.kfac(model, sub, x, y, fisher_type="exact")
    close(f3["fc"].A, f["fc"].A, "fc A without the GRU in params")


class BareParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.temperature = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.fc(x) / self.temperature


def test_bare_parameter_used_in_forward_is_named():
    model = _init(BareParam(), 0)
    model.temperature.data.fill_(1.5)
    x, y = torch.randn(3, 3, generator=_gen(1)), torch.tensor([0, 1, 1])
    params = dict(model.named_parameters())
    with pytest.warns(UserWarning, match=r"<root> \(BareParam; parameters \['temperature'\]\)"):
        f = curvfun.kfac(model, params, x, y, fisher_type="emp")
    assert set(f) == {"fc"}
    A, B = expected_factors(model, "fc", x, y, "cross_entropy", "emp")
    check_factors(f["fc"], A, B, "fc")
    with pytest.raises(ValueError, match=r"<root> \(BareParam.*temperature"):
        curvfun.kfac(model, params, x, y, fisher_type="emp", on_unsupported="raise")


def test_factors_under_autocast_are_formed_in_the_parameter_dtype():
    """Under bf16 autocast the recorded inputs / output gradients are bf16; the factors must still
    be float32 (the parameters' dtype), finite, and match the float32 factors to bf16 accuracy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5)).float()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(32, 12, dtype=torch.float32), torch.randint(0, 5, (32,))
    ref = curvfun.kfac(model, params, x, y, fisher_type="emp")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = curvfun.kfac(model, params, x, y, fisher_type="emp")
    for name in ref:
        for side in ("A", "B"):
            a, b = getattr(got[name], side), getattr(ref[name], side)
            assert a.dtype == torch.float32, (name, side, a.dtype)
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * b.abs().max().item())
