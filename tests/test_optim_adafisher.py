"""AdaFisher / AdaFisherW (issue 6) against their defining formula, in float64.

Ground truth: per-sample output gradients ĝ_n = ∂ℓ_n/∂(layer output) by an autograd loop over
samples (one backward per sample, hooks written here), layer inputs read by hooks, im2col by
``F.unfold``; then diag(A) = Σ a²/(N·T) (with a homogeneous 1 for a bias), diag(B) = Σ ĝ²/N,
the EMA (corrected: γH + (1−γ)Ĥ starting at Ĥ₀; paper: 0.1γH + 0.01γ·MinMax(Ĥ) starting at ones,
MinMax's 1e-6 on the published scale: B of the mean loss's output gradients over N·T rows),
F̃ = diag(B) ⊗ diag(A) + λ, and the Adam-like first moment. No code is shared with
``curvfun.diag_kron`` / ``curvfun.layers``.
"""

from __future__ import annotations

import copy
import math
import io
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from digits_helper import train_digits  # noqa: E402

from curvfun.capture import LayerRecord, ModuleInfo  # noqa: E402
from curvfun.diag_kron import (  # noqa: E402
    conv2d_diag_kron,
    diag_kron_factors,
    diag_kron_fisher,
    ema_corrected,
    ema_paper,
)
from curvfun.kron_math import kron_factors_from_layer  # noqa: E402
from curvfun.layers import layer_data  # noqa: E402
from curvfun.optim import AdaFisher, AdaFisherW  # noqa: E402

TOL = dict(rtol=1e-9, atol=1e-11)


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------
class ConvNet(nn.Module):
    """Conv2d (groups=2, stride 2) -> BatchNorm2d (eval) -> LayerNorm -> Linear -> Linear (no bias)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, stride=2, groups=2)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(36)
        self.fc1 = nn.Linear(36, 5)
        self.fc2 = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        h = torch.tanh(self.bn(self.conv(x)))
        h = self.ln(h.flatten(1))
        return self.fc2(torch.tanh(self.fc1(h)))


class SeqNet(nn.Module):
    """Embedding (padding_idx) -> Linear over T positions -> mean -> Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4, padding_idx=0)
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, ids):
        return self.fc2(torch.tanh(self.fc1(self.emb(ids))).mean(1))


class TokenNet(nn.Module):
    """A learnable class token (held by the container) registered *before* the Linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 6)
        self.cls = nn.Parameter(0.1 * torch.randn(1, 1, 6))
        self.head = nn.Linear(6, 4)

    def forward(self, x):  # x [N, T, 3]
        h = self.embed(x)
        h = torch.cat([self.cls.expand(x.shape[0], 1, -1), h], 1)
        return self.head(torch.tanh(h[:, 0] + h.mean(1)))


def make_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "conv":
        m = ConvNet()
        with torch.no_grad():
            m.bn.running_mean.uniform_(-0.3, 0.3)
            m.bn.running_var.uniform_(0.5, 1.5)
            m.bn.weight.uniform_(0.5, 1.5)
            m.bn.bias.uniform_(-0.2, 0.2)
            m.ln.weight.uniform_(0.5, 1.5)
        return m.eval()
    if kind == "seq":
        return SeqNet()
    return TokenNet()


def make_batch(kind: str, step: int, N: int = 6):
    g = torch.Generator().manual_seed(100 + step)
    if kind == "conv":
        x = torch.randn(N, 2, 5, 5, generator=g)
    elif kind == "seq":
        x = torch.randint(0, 7, (N, 4), generator=g)
    else:
        x = torch.randn(N, 5, 3, generator=g)
    return x, torch.randint(0, 3, (N,), generator=g)


# --------------------------------------------------------------------------------------
# the reference: per-sample autograd loop
# --------------------------------------------------------------------------------------
def reference_factors(model: nn.Module, x, t, positions: dict | None = None):
    """(factors {layer: (A, B)}, grads {param name: g}) from a per-sample autograd loop;
    ``positions`` (if given) receives each layer's output positions per sample and channel, T."""
    layers = {n: m for n, m in model.named_modules()
              if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.BatchNorm2d))}
    ins, outs = {}, {}

    def hook(m, a, o, n):
        ins[n], outs[n] = a[0].detach(), o

    hs = [m.register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)) for n, m in layers.items()]
    try:
        logits = model(x)
    finally:
        for h in hs:
            h.remove()
    N = logits.shape[0]
    names = list(layers)
    ghat = {n: torch.zeros_like(outs[n]) for n in names}
    for i in range(N):
        li = F.cross_entropy(logits[i : i + 1], t[i : i + 1], reduction="sum")
        gs = torch.autograd.grad(li, [outs[n] for n in names], retain_graph=True)
        for n, gi in zip(names, gs):
            ghat[n][i] = gi[i]
    loss = F.cross_entropy(logits, t)
    grads = dict(zip([n for n, _ in model.named_parameters()],
                     torch.autograd.grad(loss, list(model.parameters()))))
    factors = {}
    for n, m in layers.items():
        a, g = ins[n], ghat[n]
        if positions is not None:  # Conv2d / BatchNorm2d: H·W of the output; Linear / Embedding: the sequence
            positions[n] = g[0].numel() // (g.shape[1] if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) else g.shape[-1])
        if isinstance(m, nn.Linear):
            a2 = a.reshape(N, -1, a.shape[-1])
            A = a2.pow(2).sum((0, 1)) / a2[:, :, 0].numel()
            if m.bias is not None:
                A = torch.cat([A, torch.ones(1)])
            B = g.reshape(N, -1, g.shape[-1]).pow(2).sum((0, 1)) / N
            factors[n] = (A.unsqueeze(0), B.unsqueeze(0))
        elif isinstance(m, nn.Conv2d):
            cols = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)  # [N, C·k·k, L]
            G, L = m.groups, cols.shape[-1]
            cols = cols.reshape(N, G, -1, L)
            A = cols.pow(2).sum((0, 3)) / (N * L)
            if m.bias is not None:
                A = torch.cat([A, torch.ones(G, 1)], 1)
            B = g.pow(2).sum((0, 2, 3)).reshape(G, -1) / N
            factors[n] = (A, B)
        elif isinstance(m, nn.Embedding):
            counts = torch.bincount(a[a != m.padding_idx].reshape(-1), minlength=m.num_embeddings).to(g.dtype)
            # A counts tokens other than padding_idx; B, as K-FAC's, keeps every position's ĝ
            factors[n] = (counts / a.numel(), g.pow(2).sum((0, 1)) / N)
        elif isinstance(m, nn.LayerNorm):
            xhat = (a - a.mean(-1, keepdim=True)) / torch.sqrt(a.var(-1, unbiased=False, keepdim=True) + m.eps)
            A = torch.stack([xhat.pow(2).sum(0) / N, torch.ones(a.shape[-1])], 1)
            factors[n] = (A, (g.pow(2).sum(0) / N).unsqueeze(1))
        else:  # BatchNorm2d, eval mode: running statistics
            xhat = (a - m.running_mean[:, None, None]) / torch.sqrt(m.running_var[:, None, None] + m.eps)
            T = a.shape[2] * a.shape[3]
            A = torch.stack([xhat.pow(2).sum((0, 2, 3)) / (N * T), torch.ones(a.shape[1])], 1)
            factors[n] = (A, (g.pow(2).sum((0, 2, 3)) / N).unsqueeze(1))
    return factors, grads


def minmax(x):
    return (x - x.min()) / (x.max() - x.min() + 1e-6)


def ref_fisher(m: nn.Module, A, B, lam):
    """{param local name: F̃} from (A, B) as built by reference_factors."""
    if isinstance(m, nn.Embedding):
        return {"weight": A[:, None] * B[None, :] + lam}
    if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        return {"weight": (B[:, 0] * A[:, 0]).reshape(m.weight.shape) + lam,
                "bias": (B[:, 0] * A[:, 1]).reshape(m.weight.shape) + lam}
    G = A.shape[0]
    d = m.weight[0].numel()
    out = {"weight": torch.cat([B[g][:, None] * A[g][None, :d] for g in range(G)]).reshape(m.weight.shape) + lam}
    if m.bias is not None:
        out["bias"] = torch.cat([B[g] * A[g][d] for g in range(G)]) + lam
    return out


def run_against_reference(kind, cls, ema, TCov, steps=3, lr=0.05, beta=0.8, gamma=0.7, lam=1e-2, wd=0.0):
    model = make_model(kind)
    ref = copy.deepcopy(model)
    opt = cls(model, lr=lr, beta=beta, Lambda=lam, gamma=gamma, TCov=TCov, weight_decay=wd, ema=ema)
    H, m1, layers = {}, {}, dict(ref.named_modules())
    owner = {f"{ln}.{k}": (ln, k) for ln, mod in layers.items() if ln for k, _ in mod.named_parameters(recurse=False)}
    for s in range(steps):
        x, t = make_batch(kind, s)
        opt.zero_grad()
        F.cross_entropy(model(x), t).backward()
        opt.step()
        T = {}
        fac, grads = reference_factors(ref, x, t, T)
        if s % TCov == 0:
            for n, (A, B) in fac.items():
                if ema == "corrected":
                    H[n] = (A, B) if n not in H else (gamma * H[n][0] + (1 - gamma) * A, gamma * H[n][1] + (1 - gamma) * B)
                else:  # MinMax of B on the published scale: the mean loss's output gradients over N·T rows
                    old = H.get(n, (torch.ones_like(A), torch.ones_like(B)))
                    B_pub = B / (x.shape[0] ** 2 * T[n])
                    H[n] = (0.1 * gamma * old[0] + 0.01 * gamma * minmax(A), 0.1 * gamma * old[1] + 0.01 * gamma * minmax(B_pub))
        with torch.no_grad():
            for pname, p in ref.named_parameters():
                ln, k = owner[pname]
                g = grads[pname] + (wd * p if cls is AdaFisher else 0)
                m1[pname] = beta * m1.get(pname, torch.zeros_like(p)) + (1 - beta) * g
                Ft = ref_fisher(layers[ln], *H[ln], lam)[k]
                step = m1[pname] / (1 - beta ** (s + 1)) / Ft
                if cls is AdaFisherW:
                    step = step + wd * p
                p -= lr * step
        for (pname, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(p, q, **TOL, msg=lambda msg: f"step {s}, {pname}: {msg}")
    return opt, H


@pytest.mark.parametrize("kind", ["conv", "seq"])
@pytest.mark.parametrize("ema,TCov", [("corrected", 1), ("corrected", 2), ("paper", 1)])
def test_adafisher_update_equals_formula(kind, ema, TCov):
    opt, H = run_against_reference(kind, AdaFisher, ema, TCov)
    # the optimizer's averaged factors are the reference's
    for n, f in opt.factors.items():
        A, B = H[n]
        torch.testing.assert_close(f.A.reshape(-1), A.reshape(-1), **TOL)
        torch.testing.assert_close(f.B.reshape(-1), B.reshape(-1), **TOL)


def published_first_step(model: nn.Module, x, t, lr, gamma, lam, minmax_eps=1e-6):
    """One step of the published AdaFisher (ema="paper") from its formulas, in float64: from the
    mean loss's own output gradients s (not rescaled) and layer inputs a over the rows (N, or N·T
    positions for Conv2d, im2col by F.unfold), diag H = Σ ā²/rows (ā = [a, 1] with a bias) and
    diag S = Σ s²/rows; each averaged from ones, 0.1γ·1 + 0.01γ·MinMax (eps added to the range);
    F = S ⊗ H + λ; the first moment's first step is the gradient: p ← p − lr·g/F."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    ins, outs = {}, {}

    def keep(m, a, o, n):
        ins[n], outs[n] = a[0].detach(), o

    hs = [m.register_forward_hook(lambda m, a, o, n=n: keep(m, a, o, n)) for n, m in layers.items()]
    try:
        loss = F.cross_entropy(model(x), t)
    finally:
        for h in hs:
            h.remove()
    names = list(layers)
    s_all = dict(zip(names, torch.autograd.grad(loss, [outs[n] for n in names], retain_graph=True)))
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))

    def normalised(v):
        return (v - v.min()) / (v.max() - v.min() + minmax_eps)

    new = {}
    for n, m in layers.items():
        a, s = ins[n], s_all[n]
        if isinstance(m, nn.Conv2d):
            a = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2).reshape(-1, m.weight[0].numel())
            s = s.permute(0, 2, 3, 1).reshape(-1, s.shape[1])
        a = torch.cat([a, torch.ones(a.shape[0], 1)], 1) if m.bias is not None else a
        H = 0.1 * gamma + 0.01 * gamma * normalised(a.pow(2).sum(0) / a.shape[0])
        S = 0.1 * gamma + 0.01 * gamma * normalised(s.pow(2).sum(0) / s.shape[0])
        Fm = S[:, None] * H[None, :] + lam
        d = m.weight[0].numel()
        with torch.no_grad():
            new[f"{n}.weight"] = m.weight - lr * grads[f"{n}.weight"] / Fm[:, :d].reshape(m.weight.shape)
            if m.bias is not None:
                new[f"{n}.bias"] = m.bias - lr * grads[f"{n}.bias"] / Fm[:, d]
    return new


def test_paper_mode_is_the_published_step():
    """ema="paper" reproduces the published code's first step to rounding in float64: its
    MinMax adds 1e-6 to the range of factors on the mean loss's gradient scale (B 1/(N²·T) of
    curvfun's), which the step puts at the same place; taken on curvfun's scale instead the
    step differs visibly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 5), nn.Tanh(),
                          nn.Linear(5, 3))
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(8, 2, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    lr, gamma, lam = 0.01, 0.8, 1e-3
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    want = published_first_step(copy.deepcopy(model), x, t, lr, gamma, lam)
    opt = AdaFisher(model, lr=lr, gamma=gamma, Lambda=lam, TCov=1, ema="paper")
    F.cross_entropy(model(x), t).backward()
    opt.step()
    got = {k: p.detach() for k, p in model.named_parameters()}
    for k, w in want.items():
        torch.testing.assert_close(got[k] - before[k], w - before[k], rtol=1e-12, atol=0)

    def step(new):
        return torch.cat([(new[k] - before[k]).flatten() for k in before])

    # the 1e-6 on curvfun's scale (the Linear layers' B N² larger): far from the published step
    other = published_first_step(copy.deepcopy(model), x, t, lr, gamma, lam, 1e-6 / x.shape[0] ** 2)
    assert float((step(other) - step(want)).norm() / step(want).norm()) > 1e-5


@pytest.mark.parametrize("cls", [AdaFisher, AdaFisherW])
def test_weight_decay_coupled_and_decoupled(cls):
    run_against_reference("conv", cls, "corrected", 1, steps=2, wd=0.1)


def test_paper_factors_settle_where_the_published_rule_puts_them():
    """The published average is not convex: factors tend to 0.01γ·MinMax/(1 − 0.1γ) ≤ 0.0087 (γ=0.8)
    whatever the curvature's scale, so λ = 1e-3 is of the same size as the factors' product."""
    h = None
    new = torch.tensor([0.0, 5.0, 100.0])
    for _ in range(30):
        h = ema_paper(h, new, 0.8)
    torch.testing.assert_close(h, 0.008 / (1 - 0.08) * minmax(new))
    c = None
    for _ in range(60):
        c = ema_corrected(c, new, 0.8)
    torch.testing.assert_close(c, new)  # the corrected average keeps the scale


# --------------------------------------------------------------------------------------
# the diag-Kron factors are the diagonals of the K-FAC factors (hypothesis)
# --------------------------------------------------------------------------------------
@given(
    N=st.integers(1, 4), T=st.integers(1, 3), d_in=st.integers(1, 4), d_out=st.integers(1, 4),
    bias=st.booleans(), K=st.integers(1, 2), seed=st.integers(0, 2**16),
)
def test_diag_kron_is_the_diagonal_of_kfac(N, T, d_in, d_out, bias, K, seed):
    """diag(B ⊗ A) = diag(B) ⊗ diag(A): F̃ − λ is the diagonal of K-FAC's weight block kron(B, A)
    and the bias block B, for any captured data and column weights."""
    torch.manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=bias)
    keys = {"weight": "weight"} | ({"bias": "bias"} if bias else {})
    rec = LayerRecord(ModuleInfo("", lin, "affine", keys), inputs=[torch.randn(N, T, d_in)],
                      grads=[torch.randn(K, N, T, d_out)])
    data = layer_data(rec, torch.rand(K) + 0.1)
    kf = kron_factors_from_layer(data)
    Ft = diag_kron_fisher(diag_kron_factors(data), "affine", tuple(lin.weight.shape), bias, 0.5)
    dense = torch.kron(kf.B, kf.A)
    torch.testing.assert_close(Ft["weight"].reshape(-1) - 0.5, torch.diagonal(dense), **TOL)
    if bias:
        torch.testing.assert_close(Ft["bias"] - 0.5, torch.diagonal(kf.B), **TOL)


@given(
    N=st.integers(1, 3), groups=st.sampled_from([1, 2]), k=st.sampled_from([1, 2, 3]),
    stride=st.integers(1, 2), padding=st.sampled_from([0, 1, "same"]), dilation=st.integers(1, 2),
    bias=st.booleans(), calls=st.integers(1, 2), K=st.integers(1, 2), seed=st.integers(0, 2**16),
)
def test_conv_diag_kron_without_im2col_equals_im2col_route(N, groups, k, stride, padding, dilation, bias, calls, K, seed):
    """The optimizer's Conv2d fast path (strided window sums of x²) equals diag_kron_factors on the
    im2col layer data, for any kernel / stride / padding / dilation / groups, several calls
    (weight sharing) and weighted columns."""
    if padding == "same":  # symmetric 'same' padding only (what the capture supports)
        stride = 1
        if (dilation * (k - 1)) % 2:
            padding = 0
    torch.manual_seed(seed)
    conv = nn.Conv2d(2 * groups, 2 * groups, k, stride=stride, padding=padding, dilation=dilation,
                     groups=groups, bias=bias)
    xs = [torch.randn(N, 2 * groups, 6, 5) for _ in range(calls)]
    gs = [torch.randn(K, *conv(x).shape) for x in xs]
    w = torch.rand(K) + 0.1
    keys = {"weight": "weight"} | ({"bias": "bias"} if bias else {})
    rec = LayerRecord(ModuleInfo("", conv, "affine", keys), inputs=xs, grads=gs)
    slow = diag_kron_factors(layer_data(rec, w))
    fast = conv2d_diag_kron(xs, gs, conv, bias, w)
    torch.testing.assert_close(fast.A, slow.A, **TOL)
    torch.testing.assert_close(fast.B, slow.B, **TOL)


# --------------------------------------------------------------------------------------
# unsupported parameters: matched by identity, explicit fallback, never skipped
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fallback", ["adam", "momentum"])
def test_class_token_gets_fallback_and_head_gets_its_own_fisher(fallback):
    model = make_model("token")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, beta, lam = 0.05, 0.9, 1e-2
    opt = AdaFisher(model, lr=lr, beta=beta, Lambda=lam, TCov=1, fallback=fallback)
    assert set(opt.fallback_parameters) == {"cls"}
    assert "container" in opt.fallback_parameters["cls"]
    assert list(opt.preconditioned_modules) == ["embed", "head"]
    x, t = make_batch("token", 0)
    ref = copy.deepcopy(model)
    opt.zero_grad()
    F.cross_entropy(model(x), t).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} was not updated"
    # the class token: Adam's first step (m̂ = g, v̂ = g²) or plain m̂
    g = grads["cls"]
    expect = before["cls"] - lr * (g / (g.abs() + 1e-8) if fallback == "adam" else g)
    torch.testing.assert_close(model.cls.detach(), expect, **TOL)
    # the head: its own diag-Kron Fisher (positional pairing would have given it another layer's)
    fac, _ = reference_factors(ref, x, t)
    for k in ("weight", "bias"):
        Ft = ref_fisher(ref.head, *fac["head"], lam)[k]
        torch.testing.assert_close(getattr(model.head, k).detach(),
                                   before[f"head.{k}"] - lr * grads[f"head.{k}"] / Ft, **TOL)


# --------------------------------------------------------------------------------------
# training, hooks, resume, bad input
# --------------------------------------------------------------------------------------
@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("cls,kw", [(AdaFisher, {}), (AdaFisherW, dict(weight_decay=1e-2))])
def test_trains_digits(cls, kw, one_thread):
    """Default hyper-parameters (lr=1e-3, TCov=100: refreshes at steps 0, 100, 200)."""
    acc = train_digits(lambda m: (cls(m, **kw), None), steps=300, batch=64, seed=0)
    assert acc >= 0.9, f"{cls.__name__}({kw}) reached {acc:.3f}"


def test_hooks_only_on_refresh_steps_and_removable():
    model = make_model("seq")
    opt = AdaFisher(model, TCov=3)
    n_hooks = lambda: sum(len(m._forward_hooks) for m in model.modules())  # noqa: E731
    assert n_hooks() == 3  # emb, fc1, fc2 armed for step 0
    for s in range(4):
        x, t = make_batch("seq", s)
        opt.zero_grad()
        F.cross_entropy(model(x), t).backward()
        opt.step()
        assert n_hooks() == (3 if (s + 1) % 3 == 0 else 0)
    opt.remove_hooks()
    assert n_hooks() == 0
    before = opt.factors
    for s in range(4, 8):
        x, t = make_batch("seq", s)
        opt.zero_grad()
        F.cross_entropy(model(x), t).backward()
        opt.step()
        assert n_hooks() == 0
    for n, f in opt.factors.items():
        assert torch.equal(f.A, before[n].A) and torch.equal(f.B, before[n].B)


@pytest.mark.parametrize("cls,ema", [(AdaFisher, "corrected"), (AdaFisherW, "paper")])
def test_resume_is_bit_exact(cls, ema):
    def run(steps, start=None):
        model = make_model("conv")
        opt = cls(model, lr=0.02, TCov=3, ema=ema, weight_decay=1e-3)
        if start is not None:
            model.load_state_dict(start[0])
            opt.load_state_dict(torch.load(io.BytesIO(start[1]), weights_only=True))
        for s in range(*steps):
            x, t = make_batch("conv", s)
            opt.zero_grad()
            F.cross_entropy(model(x), t).backward()
            opt.step()
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        return model, (copy.deepcopy(model.state_dict()), buf.getvalue())

    full, _ = run((0, 8))
    _, saved = run((0, 4))
    resumed, _ = run((4, 8), saved)
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n


def test_bad_input_raises_with_message():
    model = make_model("seq")
    cases = [
        (dict(lr=-1.0), ValueError, "Invalid learning rate"),
        (dict(beta=1.0), ValueError, "Invalid beta parameter"),
        (dict(Lambda=0.0), ValueError, "Lambda > 0"),
        (dict(gamma=1.0), ValueError, "Invalid gamma parameter"),
        (dict(TCov=0), ValueError, "Invalid TCov"),
        (dict(weight_decay=-0.1), ValueError, "Invalid weight_decay"),
        (dict(ema="kfac"), ValueError, "Invalid ema"),
        (dict(fallback="sgd"), ValueError, "Invalid fallback"),
        (dict(dist=True), RuntimeError, "needs torch.distributed to be initialised"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            AdaFisher(model, **kw)
    with pytest.raises(TypeError, match="needs the model"):
        AdaFisher(model.parameters())
    opt = AdaFisher(model)
    sd = opt.state_dict()
    del sd["curvfun.adafisher"]
    with pytest.raises(ValueError, match="no 'curvfun.adafisher' entry"):
        AdaFisher(model).load_state_dict(sd)


def test_parameters_without_factors_are_named():
    """A transformer block: MultiheadAttention's in-projection (not a weight/bias layer) is named
    at construction, its out_proj (read by the attention directly, never called) at the first
    refresh step; both take the fallback rule, and the Linears of the block get factors."""
    import warnings

    from curvfun.precondition import UnsupportedModuleWarning
    from zoo import build

    model, x, y, _ = build("gpt")
    with pytest.warns(UnsupportedModuleWarning, match=r"block\.self_attn\.in_proj_bias', 'block\.self_attn\.in_proj_weight"):
        opt = AdaFisher(model, lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    named = [str(w.message) for w in caught if "not called through its own forward" in str(w.message)]
    assert len(named) == 1 and "'block.self_attn.out_proj'" in named[0], named
    assert {"block.linear1", "block.linear2", "head"} <= set(opt.factors)


def test_an_embedding_also_read_as_the_head_is_named_once():
    """gpt_tied reads the embedding's weight as the head: its gradient holds more than the lookup
    gives, which its factors do not see; named once (gpt, untied: nothing named)."""
    import warnings

    from zoo import build

    for name, expected in (("gpt_tied", 1), ("gpt", 0)):
        model, x, y, _ = build(name)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = AdaFisher(model, lr=1e-3)
            for _ in range(3):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        named = [str(w.message) for w in caught if "holds more than its own calls" in str(w.message)]
        assert len(named) == expected, named
        assert all("layer 'tok'" in m for m in named)


@pytest.mark.parametrize("conv", [
    lambda: nn.ConvTranspose2d(3, 2, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
    lambda: nn.ConvTranspose1d(2, 4, 3, stride=2, padding=1, output_padding=1, groups=2),
])
def test_transposed_convolutions_get_the_diagonal_of_their_kronecker_block(conv):
    """F̃ of a transposed convolution (no damping) in the weight's own layout ``[C_in, C_out/G, *k]``:
    per group diag(B)_o · diag(A)_i with, from a plain forward and backward, diag(A) the mean over the
    N·T output positions of the squared patch entries (the transposed convolution with one-hot
    filters) and diag(B) = (1/N) Σ_{n,t} g² of the per-sample loss's output gradients; the bias's
    diag(B)."""
    from curvfun.capture import capture
    from curvfun.layers.affine import matrix_as_weight

    torch.manual_seed(0)
    c = conv().double()
    x = torch.randn(3, c.in_channels, *([3] * (c.weight.ndim - 2)), dtype=torch.float64)
    model = nn.Sequential(c, nn.Flatten(), nn.LazyLinear(2).double())
    model(x)
    y = torch.tensor([0, 1, 0])
    out = c(x)
    out.retain_grad()
    F.cross_entropy(model[2](model[1](out)), y, reduction="sum").backward()
    G, N, n = c.groups, x.shape[0], c.weight.ndim - 2
    d = c.in_channels // G * math.prod(c.kernel_size)
    eye = torch.eye(d, dtype=torch.float64).expand(G, d, d)
    onehot = matrix_as_weight(eye, (c.in_channels, d, *c.kernel_size), "transposed")
    f = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
    patches = f(x, onehot, None, c.stride, c.padding, c.output_padding, G, c.dilation)  # [N, G·d, *out]
    A = patches.movedim(1, -1).reshape(-1, G, d).pow(2).mean(0)  # [G, d]
    B = out.grad.movedim(1, -1).reshape(-1, G, c.out_channels // G).pow(2).sum(0) / N  # [G, o]
    expected = matrix_as_weight(B.unsqueeze(2) * A.unsqueeze(1), tuple(c.weight.shape), "transposed")

    params = dict(model.named_parameters())
    cap = capture(model, params, x, y, fisher_type="emp")
    Ft = diag_kron_fisher(diag_kron_factors(layer_data(cap.layers["0"], cap.weights)), "affine",
                          tuple(c.weight.shape), True, 0.0, "transposed")
    torch.testing.assert_close(Ft["weight"], expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(Ft["bias"], B.reshape(-1), rtol=1e-10, atol=1e-12)
    opt = AdaFisher(model, lr=1e-3)
    assert "0" in opt.preconditioned_modules and not opt.fallback_parameters
