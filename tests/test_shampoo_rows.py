"""Shampoo in data space: the ``*_rows`` functions of curvfun.shampoo_math against dense float64
ground truth, :func:`~curvfun.shampoo_math.rows_pay`, and ``ShampooGradientMaker(data_space=
"auto")`` against the dense route ``data_space="never"`` (training, warm roots from a shared state,
the fallback for a parameter used outside its layer, accumulated gradients, biases, resume, bad
input)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, strategies as st
from torch import nn

import curvfun.precondition.shampoo as shampoo_mod
from curvfun.precondition import PreconditioningConfig
from curvfun.precondition.shampoo import ShampooGradientMaker
from curvfun.shampoo_math import (
    precondition_matrix,
    precondition_rows,
    rotate_rows,
    row_tiles,
    rows_pay,
    split_blocks,
    update_statistics,
    update_statistics_from_rows,
)
from maker_checks import check_resume_bit_exact, train_steps

D64 = torch.float64


def _close(got, want, rtol=1e-10, what=""):
    """Relative to the largest entry of ``want`` (entries near zero compared on that scale)."""
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale + 1e-300, msg=lambda m: f"{what}: {m}")


def _spd(d, g):
    X = torch.randn(d, d + 2, generator=g, dtype=D64)
    return X @ X.T / d + 0.1 * torch.eye(d, dtype=D64)


def _orthogonal(d, g):
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=D64))
    return Q


# --- the pure functions ---------------------------------------------------------------------------

shapes = dict(R=st.integers(1, 8), d_out=st.integers(1, 9), d_in=st.integers(1, 9),
              block_size=st.sampled_from([-1, 2, 3]), seed=st.integers(0, 2**16))


@given(ema_decay=st.sampled_from([-1, 0.3]), **shapes)
def test_statistics_from_rows_are_the_dense_statistics(R, d_out, d_in, block_size, seed, ema_decay):
    """Per tile (r, c): update_statistics_from_rows(L, R, g_r, a_c) = update_statistics(L, R, G[r, c])
    with G = gᵀa, from random SPD L, R; the same with the Grams a_c a_cᵀ, g_r g_rᵀ passed in; the
    inputs are not modified."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(R, d_out, generator=gen, dtype=D64)
    a = torch.randn(R, d_in, generator=gen, dtype=D64)
    G = g.T @ a
    dense_tiles = split_blocks(G, block_size)
    rows = row_tiles(g, a, block_size)
    assert len(rows) == len(dense_tiles)
    for i, ((g_r, a_c), T) in enumerate(zip(rows, dense_tiles)):
        _close(g_r.T @ a_c, T, what="tile")  # the tile's rows
        L0, R0 = _spd(T.shape[0], gen), _spd(T.shape[1], gen)
        L0c, R0c = L0.clone(), R0.clone()
        want_L, want_R = update_statistics(L0, R0, T, ema_decay)
        for grams in (dict(), dict(aa=a_c @ a_c.T, gg=g_r @ g_r.T)):
            got_L, got_R = update_statistics_from_rows(L0, R0, g_r, a_c, ema_decay, **grams)
            assert got_L.shape == want_L.shape and got_R.shape == want_R.shape
            _close(got_L, want_L, what=f"L tile {i} {list(grams)}")
            _close(got_R, want_R, what=f"R tile {i} {list(grams)}")
        assert torch.equal(L0, L0c) and torch.equal(R0, R0c)


@given(**shapes)
def test_rotate_rows_is_the_rotated_gradient(R, d_out, d_in, block_size, seed):
    """For random orthogonal Q_L, Q_R: U V = Q_Lᵀ G Q_R and rowsq / colsq are its squared row /
    column norms (per tile of the blocked gradient)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(R, d_out, generator=gen, dtype=D64)
    a = torch.randn(R, d_in, generator=gen, dtype=D64)
    for (g_r, a_c), T in zip(row_tiles(g, a, block_size), split_blocks(g.T @ a, block_size)):
        Q_L, Q_R = _orthogonal(T.shape[0], gen), _orthogonal(T.shape[1], gen)
        U, V, rowsq, colsq = rotate_rows(g_r, a_c, Q_L, Q_R, a_c @ a_c.T, g_r @ g_r.T)
        assert U.shape == (T.shape[0], R) and V.shape == (R, T.shape[1])
        Gr = Q_L.T @ T @ Q_R
        _close(U @ V, Gr, what="U V")
        _close(rowsq, Gr.square().sum(1), what="rowsq")
        _close(colsq, Gr.square().sum(0), what="colsq")
        assert bool((rowsq >= 0).all()) and bool((colsq >= 0).all())


@given(factored=st.sampled_from([(False, False), (True, True), (True, False), (False, True)]), **shapes)
def test_precondition_rows_is_precondition_matrix(R, d_out, d_in, block_size, seed, factored):
    """precondition_rows(g_r, a_c, L_root, R_root) = precondition_matrix(g_rᵀa_c, L_root, R_root)
    per tile, each root dense or factored [Q, w]; a factored root also equals its dense matrix."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(R, d_out, generator=gen, dtype=D64)
    a = torch.randn(R, d_in, generator=gen, dtype=D64)
    for (g_r, a_c), T in zip(row_tiles(g, a, block_size), split_blocks(g.T @ a, block_size)):
        roots, dense = [], []
        for d, fac in zip(T.shape, factored):
            Q = _orthogonal(d, gen)
            w = torch.rand(d, generator=gen, dtype=D64) * 2 + 0.1
            dense.append((Q * w) @ Q.T)
            roots.append([Q, w] if fac else dense[-1])
        got = precondition_rows(g_r, a_c, *roots)
        _close(got, precondition_matrix(T, *roots), what="vs precondition_matrix")
        _close(got, dense[0] @ T @ dense[1], what="vs dense product")


# --- rows_pay -----------------------------------------------------------------------------------


def test_rows_pay_examples():
    assert rows_pay(128, 512, 784, -1)
    assert rows_pay(128, 512, 512, -1)
    assert not rows_pay(128, 10, 512, -1)
    assert not rows_pay(128, 512, 784, 64)  # 64 x 64 tiles: fewer columns per tile than rows
    assert rows_pay(1, 2, 2, -1) and not rows_pay(2, 2, 2, -1)
    # one d x d tile: 4Rd² + 4R²d < 4d³ iff R < d(√5 - 1)/2 ≈ 0.618 d
    assert rows_pay(61, 100, 100, -1) and not rows_pay(62, 100, 100, -1)
    assert rows_pay(61, 300, 300, 100) and not rows_pay(62, 300, 300, 100)  # nine 100 x 100 tiles


@given(rows=st.integers(1, 300), d_out=st.integers(1, 600), d_in=st.integers(1, 600),
       block_size=st.sampled_from([-1, 1, 2, 7, 32, 128]), seed=st.integers(0, 2**16))
def test_rows_pay_is_monotone_in_the_rows(rows, d_out, d_in, block_size, seed):
    """If the rows pay at R rows they pay at every smaller R >= 1 (checked at all smaller R up to
    40 below and at random ones), and they never pay with at least as many rows as the larger width
    of every tile (R >= max(b_r, b_c) makes each tile's rows cost exceed its dense cost)."""
    gen = torch.Generator().manual_seed(seed)
    if rows_pay(rows, d_out, d_in, block_size):
        smaller = set(range(max(1, rows - 40), rows)) | {1}
        smaller |= {int(r) for r in torch.randint(1, rows + 1, (20,), generator=gen)}
        bad = [r for r in sorted(smaller) if not rows_pay(r, d_out, d_in, block_size)]
        assert not bad, bad
    b = max(d_out, d_in) if block_size <= 0 else min(block_size, max(d_out, d_in))
    assert not rows_pay(max(rows, b), d_out, d_in, block_size)


# --- the maker: data_space="auto" against "never" ----------------------------------------------------


class MLP(nn.Module):
    def __init__(self, d_in, h1, h2, C, bias=True):
        super().__init__()
        self.fc1 = nn.Linear(d_in, h1, bias=bias)
        self.fc2 = nn.Linear(h1, h2, bias=bias)
        self.fc3 = nn.Linear(h2, C, bias=bias)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _batches(n, N, d_in, C, seed):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(N, d_in, generator=gen, dtype=D64), torch.randint(0, C, (N,), generator=gen))
            for _ in range(n)]


def _step(gm, model, x, t, zero=True):
    """One maker step; returns the parameters' ``.grad`` (cloned) by name."""
    if zero:
        model.zero_grad()
    y = gm.setup_model_call(model, x)
    gm.setup_loss_call(F.cross_entropy, y, t)
    gm.forward_and_backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rows_layers(gm):
    """Layers that took (and kept) the rows route."""
    return gm._rows_checked - gm._rows_off


def _assert_params_close(m1, m2, rtol, what=""):
    for (n, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters()):
        _close(p.detach(), q.detach(), rtol=rtol, what=f"{what} {n}")


@given(seed=st.integers(0, 2**16), d_in=st.integers(12, 30), h1=st.integers(12, 30), h2=st.integers(12, 30),
       N=st.integers(1, 4), C=st.integers(2, 4), block_size=st.sampled_from([-1, 5]),
       ema_decay=st.sampled_from([-1, 0.3]), interval=st.sampled_from([1, 2]), bias=st.booleans(),
       damping_mode=st.sampled_from(["relative", "absolute"]))
def test_maker_rows_route_equals_dense_route(seed, d_in, h1, h2, N, C, block_size, ema_decay, interval, bias,
                                             damping_mode):
    """4 SGD steps with data_space="auto" and "never" from the same init and batches (root_method
    "eigh"): the preconditioned .grads of every step (the first included) and every parameter after
    each step agree to 1e-9 relative; exactly the layers for which rows_pay holds took the rows
    route, fc1 among them (so the comparison is not vacuous), and the dense route records none."""
    assume(rows_pay(N, h1, d_in, block_size))
    torch.manual_seed(seed)
    model = MLP(d_in, h1, h2, C, bias)
    models = {ds: copy.deepcopy(model) for ds in ("auto", "never")}
    cfg = PreconditioningConfig(damping=1e-3, ema_decay=ema_decay, preconditioner_upd_interval=interval)
    gms = {ds: ShampooGradientMaker(m, cfg, block_size, damping_mode=damping_mode, data_space=ds)
           for ds, m in models.items()}
    opts = {ds: torch.optim.SGD(m.parameters(), lr=0.1) for ds, m in models.items()}
    for i, (x, t) in enumerate(_batches(4, N, d_in, C, seed)):
        grads = {}
        for ds in ("auto", "never"):
            opts[ds].zero_grad()
            grads[ds] = _step(gms[ds], models[ds], x, t)
            opts[ds].step()
        assert grads["auto"].keys() == grads["never"].keys()
        for n in grads["never"]:
            _close(grads["auto"][n], grads["never"][n], rtol=1e-9, what=f"step {i} grad {n}")
        _assert_params_close(models["auto"], models["never"], 1e-9, f"after step {i}")
    expected = {n for n, (o, d) in (("fc1", (h1, d_in)), ("fc2", (h2, h1)), ("fc3", (C, h2)))
                if rows_pay(N, o, d, block_size)}
    assert "fc1" in expected
    assert gms["auto"]._rows_checked == expected and not gms["auto"]._rows_off
    assert not gms["never"]._rows_checked
    assert set(gms["auto"].statistics) == set(gms["never"].statistics)


def test_maker_rows_route_with_sequence_inputs():
    """[N, T, d] inputs (rows = N·T, bias gradient summed over positions): the rows route's .grads
    equal the dense route's over 3 steps (manual SGD updates), and rows_pay saw N·T rows."""
    torch.manual_seed(0)
    model = MLP(24, 20, 16, 3)
    models = {ds: copy.deepcopy(model) for ds in ("auto", "never")}
    cfg = PreconditioningConfig(damping=1e-3)
    gms = {ds: ShampooGradientMaker(m, cfg, data_space=ds) for ds, m in models.items()}

    def loss(y, t):
        return F.cross_entropy(y.flatten(0, 1), t.flatten())

    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, t = torch.randn(2, 3, 24, generator=gen), torch.randint(0, 3, (2, 3), generator=gen)
        grads = {}
        for ds, m in models.items():
            m.zero_grad()
            y = gms[ds].setup_model_call(m, x)
            gms[ds].setup_loss_call(loss, y, t)
            gms[ds].forward_and_backward()
            grads[ds] = {n: p.grad.clone() for n, p in m.named_parameters()}
            with torch.no_grad():
                for p in m.parameters():
                    p -= 0.1 * p.grad
        for n in grads["never"]:
            _close(grads["auto"][n], grads["never"][n], rtol=1e-9, what=n)
    # the rows are counted as N·T = 6: fc3 (3 x 16) would pay at 2 rows, not at 6
    assert rows_pay(2, 3, 16, -1) and not rows_pay(6, 3, 16, -1)
    assert _rows_layers(gms["auto"]) == gms["auto"]._rows_checked == {"fc1", "fc2"}


@pytest.mark.parametrize("block_size", [-1, 6])
def test_warm_rotated_gradient_from_rows(monkeypatch, block_size):
    """root_method="warm" (basis_every=5, eigh_every=None): the routes pick different null-space
    bases, so the state is shared instead: a "never" maker trains 3 steps, its state_dict goes into
    fresh "auto" and "never" makers (copies of the model), and one more step whose refresh keeps the
    basis (the rotated gradient moves λ) is taken on both with the same batch. The rows step went
    through rotate_rows; .grads and the tracked bases (Q, λ) agree to 1e-9 relative."""
    calls = []
    real = shampoo_mod.rotate_rows
    monkeypatch.setattr(shampoo_mod, "rotate_rows", lambda *a: calls.append(a[0].shape) or real(*a))
    torch.manual_seed(3)
    model = MLP(20, 18, 16, 3)
    cfg = PreconditioningConfig(damping=1e-3)
    kw = dict(block_size=block_size, root_method="warm", basis_every=5, eigh_every=None)
    batches = _batches(4, 3, 20, 3, seed=7)
    gm0 = ShampooGradientMaker(model, cfg, data_space="never", **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_steps(model, opt, gm0, batches[:3])
    assert not calls and gm0.warm_counts["fc1.weight"] % 5 != 0  # the next refresh keeps the basis
    state = gm0.state_dict()
    grads, gms = {}, {}
    for ds in ("auto", "never"):
        m = copy.deepcopy(model)
        gms[ds] = ShampooGradientMaker(m, cfg, data_space=ds, **kw)
        gms[ds].load_state_dict(state)
        grads[ds] = _step(gms[ds], m, *batches[3])
    assert calls, "the rows step did not take the rotated gradient from the rows"
    assert {"fc1", "fc2"} <= _rows_layers(gms["auto"])
    for n in grads["never"]:
        _close(grads["auto"][n], grads["never"][n], rtol=1e-9, what=n)
    for key, tiles in gms["never"].bases.items():
        for tile_a, tile_n in zip(gms["auto"].bases[key], tiles):
            for (Qa, la), (Qn, ln) in zip(tile_a, tile_n):
                torch.testing.assert_close(Qa, Qn, rtol=0, atol=0)  # the kept basis
                _close(la, ln, rtol=1e-9, what=f"{key} λ")
    assert gms["auto"].warm_counts == gms["never"].warm_counts
    assert gms["auto"].eigen_fresh == gms["never"].eigen_fresh


class Twice(nn.Module):
    """fc1 called twice in one forward: its rows are those of both calls."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 20)
        self.fc2 = nn.Linear(20, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(torch.tanh(self.fc1(x)))))


class Tied(nn.Module):
    """fc1 and fc1b share their weight (tied: both keep the plain gradient, fc2 takes the rows)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 20)
        self.fc1b = nn.Linear(20, 20)
        self.fc1b.weight = self.fc1.weight
        self.fc2 = nn.Linear(20, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1b(torch.tanh(self.fc1(x)))))


class NoGradCall(nn.Module):
    """fc1 also called under no_grad (a target branch): that call's output gradients are zero."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 20)
        self.fc2 = nn.Linear(20, 3)

    def forward(self, x):
        with torch.no_grad():
            target = self.fc1(x)
        return self.fc2(torch.tanh(self.fc1(x)) + 0.1 * target)


@pytest.mark.parametrize("cls, rows", [(Twice, {"fc1", "fc2"}), (Tied, {"fc2"}), (NoGradCall, {"fc1", "fc2"})])
def test_shared_layers_and_extra_calls(cls, rows):
    """A layer called twice, tied weights, a call under no_grad: 3 steps equal the dense route's to
    1e-9, no fallback warning, and exactly the expected layers take the rows."""
    torch.manual_seed(0)
    model = cls()
    models = {ds: copy.deepcopy(model) for ds in ("auto", "never")}
    cfg = PreconditioningConfig(damping=1e-3)
    gms = {ds: ShampooGradientMaker(m, cfg, data_space=ds) for ds, m in models.items()}
    for ds, m in models.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            train_steps(m, torch.optim.SGD(m.parameters(), lr=0.1), gms[ds], _batches(3, 2, 20, 3, seed=1))
    assert gms["auto"]._rows_checked == rows and not gms["auto"]._rows_off
    _assert_params_close(models["auto"], models["never"], 1e-9)


class Leaky(nn.Module):
    """fc1's weight is also used outside fc1's call: its gradient is not gᵀa alone."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x)) + 0.3 * torch.tanh(x @ self.fc1.weight.T)
        return self.fc2(h)


def test_parameter_used_outside_its_layer_falls_back():
    """The first rows step of fc1 disagrees with autograd: a UserWarning naming 'fc1', fc1 lands in
    _rows_off (fc2 keeps the rows), and 4 steps equal the dense route's to 1e-9 (the warned step
    included: the layer gets autograd's gradient)."""
    torch.manual_seed(0)
    model = Leaky()
    models = {ds: copy.deepcopy(model) for ds in ("auto", "never")}
    cfg = PreconditioningConfig(damping=1e-3)
    gms = {ds: ShampooGradientMaker(m, cfg, data_space=ds) for ds, m in models.items()}
    opts = {ds: torch.optim.SGD(m.parameters(), lr=0.1) for ds, m in models.items()}
    batches = _batches(4, 2, 20, 3, seed=2)
    with pytest.warns(UserWarning, match="'fc1'") as record:
        train_steps(models["auto"], opts["auto"], gms["auto"], batches[:1])
    assert not any("'fc2'" in str(w.message) for w in record)
    assert gms["auto"]._rows_off == {"fc1"} and gms["auto"]._rows_checked == {"fc1", "fc2"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only; the layer stays off
        train_steps(models["auto"], opts["auto"], gms["auto"], batches[1:])
    train_steps(models["never"], opts["never"], gms["never"], batches)
    assert gms["auto"]._rows_off == {"fc1"}
    _assert_params_close(models["auto"], models["never"], 1e-9)


@pytest.mark.parametrize("which", ["all", "fc1"])
def test_accumulated_gradients_take_the_plain_backward(monkeypatch, which):
    """A normal step, then a step with .grad already set to fixed random tensors (every parameter,
    or fc1's only): the layers holding a .grad do not take the rows route that step (no rows
    functions see them) and the resulting .grads equal the dense route's to 1e-9."""
    torch.manual_seed(1)
    model = MLP(20, 18, 16, 3)
    models = {ds: copy.deepcopy(model) for ds in ("auto", "never")}
    cfg = PreconditioningConfig(damping=1e-3)
    gms = {ds: ShampooGradientMaker(m, cfg, data_space=ds) for ds, m in models.items()}
    batches = _batches(2, 2, 20, 3, seed=4)
    gen = torch.Generator().manual_seed(5)
    preset = {n: torch.randn(p.shape, generator=gen, dtype=D64) for n, p in model.named_parameters()
              if which == "all" or n.startswith("fc1.")}
    seen = []
    real = shampoo_mod.update_statistics_from_rows
    monkeypatch.setattr(shampoo_mod, "update_statistics_from_rows",
                        lambda L, R, g, a, *r, **k: seen.append((g.shape[1], a.shape[1])) or real(L, R, g, a, *r, **k))
    grads, rows_seen = {}, {}
    for ds, m in models.items():
        _step(gms[ds], m, *batches[0])
        m.zero_grad()
        for n, p in m.named_parameters():
            if n in preset:
                p.grad = preset[n].clone()
        seen.clear()
        grads[ds] = _step(gms[ds], m, *batches[1], zero=False)
        rows_seen[ds] = set(seen)
    # fc1 (18 x 20) did not go through the rows in the second step; with "fc1" only, fc2 (16 x 18) did
    assert (18, 20) not in rows_seen["auto"]
    assert ((16, 18) in rows_seen["auto"]) == (which == "fc1")
    assert not rows_seen["never"]
    assert {"fc1", "fc2"} <= _rows_layers(gms["auto"])  # both took the rows in the first step
    for n in grads["never"]:
        _close(grads["auto"][n], grads["never"][n], rtol=1e-9, what=n)


def test_zeroed_gradients_keep_the_rows_route(monkeypatch):
    """``zero_grad(set_to_none=False)`` leaves zero tensors in ``.grad``: nothing to accumulate, so
    the rows route still runs (every step), the results go into the very same ``.grad`` tensors,
    and the parameters follow the dense route's to 1e-9 over 3 steps."""
    torch.manual_seed(1)
    model = MLP(20, 18, 16, 3)
    models = {ds: copy.deepcopy(model) for ds in ("auto", "never")}
    batches = _batches(3, 2, 20, 3, seed=6)
    calls = []
    real = shampoo_mod.update_statistics_from_rows
    monkeypatch.setattr(shampoo_mod, "update_statistics_from_rows",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    for ds, m in models.items():
        gm = ShampooGradientMaker(m, PreconditioningConfig(damping=1e-3), data_space=ds)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for x, t in batches:
            opt.zero_grad(set_to_none=False)
            held = {n: p.grad for n, p in m.named_parameters()}
            calls.clear()
            y = gm.setup_model_call(m, x)
            gm.setup_loss_call(F.cross_entropy, y, t)
            gm.forward_and_backward()
            if ds == "auto" and held["fc1.weight"] is not None:  # after the first step: zero tensors
                assert len(calls) >= 2, calls  # fc1 and fc2 through their rows
                assert all(p.grad is held[n] for n, p in m.named_parameters() if n.startswith(("fc1", "fc2")))
            opt.step()
    _assert_params_close(models["auto"], models["never"], 1e-9)


def test_bias_of_a_rows_layer_gets_the_plain_gradient():
    """fc1 / fc2 take the rows route; their bias .grad after the (preconditioning) step is autograd's
    gradient of the loss (1-D parameters are not preconditioned), to 1e-12, on two steps."""
    torch.manual_seed(2)
    model = MLP(20, 18, 16, 3)
    gm = ShampooGradientMaker(model, PreconditioningConfig(damping=1e-3))
    for x, t in _batches(2, 3, 20, 3, seed=6):
        ref = torch.autograd.grad(F.cross_entropy(model(x), t), [model.fc1.bias, model.fc2.bias, model.fc3.bias])
        grads = _step(gm, model, x, t)
        for n, want in zip(("fc1.bias", "fc2.bias", "fc3.bias"), ref):
            _close(grads[n], want, rtol=1e-12, what=n)
    assert {"fc1", "fc2"} <= _rows_layers(gm)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("root_method", ["eigh", "warm"])
def test_resume_with_rows_is_bit_exact(dtype, root_method):
    """check_resume_bit_exact (save at step 3 of 7, the saved run keeps training) with the rows
    route taken by fc1 and fc2 (batch 4; interval 2 for "eigh", basis_every 3 for "warm")."""
    gen = torch.Generator().manual_seed(8)
    batches = [(torch.randn(4, 30, generator=gen, dtype=dtype), torch.randint(0, 4, (4,), generator=gen))
               for _ in range(7)]
    if root_method == "eigh":
        cfg = PreconditioningConfig(damping=1e-3, preconditioner_upd_interval=2, curvature_upd_interval=1)
        kw = dict(block_size=16)
    else:
        cfg = PreconditioningConfig(damping=1e-3)
        kw = dict(root_method="warm", basis_every=3, eigh_every=None)
    gm = check_resume_bit_exact(lambda: MLP(30, 40, 40, 4).to(dtype),
                                lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                                lambda m: ShampooGradientMaker(m, cfg, **kw), batches, 3, serialize=True)
    assert {"fc1", "fc2"} <= _rows_layers(gm)


def test_bad_data_space():
    with pytest.raises(ValueError, match=r"data_space must be one of \('auto', 'never'\).*got 'sometimes'"):
        ShampooGradientMaker(MLP(4, 4, 4, 2), PreconditioningConfig(), data_space="sometimes")


# --- layers the rows route must treat as the plain backward does ---


class Detached(nn.Module):
    """aux is called but its output does not reach the loss (e.g. computed for logging)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 16)
        self.aux = nn.Linear(20, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        self.last_aux = self.aux(x).detach()
        return self.fc2(torch.tanh(self.fc1(x)))


def test_layer_whose_output_does_not_reach_the_loss():
    """The dense route leaves aux's .grad None (SGD skips it, no statistics); the rows route must too:
    the parameters after 2 SGD steps with momentum and weight decay agree, aux unmoved."""
    torch.manual_seed(0)
    model = Detached()
    models = {ds: copy.deepcopy(model) for ds in ("auto", "never")}
    gms = {}
    for ds, m in models.items():
        gms[ds] = ShampooGradientMaker(m, PreconditioningConfig(damping=1e-3), data_space=ds)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        train_steps(m, opt, gms[ds], _batches(2, 2, 20, 3, seed=3))
    assert models["auto"].aux.weight.grad is None and models["auto"].aux.bias.grad is None
    assert set(gms["auto"].statistics) == set(gms["never"].statistics)
    _assert_params_close(models["auto"], models["never"], 1e-9)


class Prototypes(nn.Module):
    """enc is called on the batch [N, 20] and on 3 learned prototypes [3, 20]."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(20, 16)
        self.protos = nn.Parameter(torch.randn(3, 20))

    def forward(self, x):
        return self.enc(x) @ self.enc(self.protos).T


@pytest.mark.parametrize("case", ["unbatched", "prototypes"])
def test_inputs_without_a_common_batch_dimension(case):
    """Shampoo needs no per-sample structure, so any Linear input is rows: an unbatched 1-D input and
    a layer called on [2, 20] and [3, 20] give the dense route's gradients."""
    torch.manual_seed(0)
    if case == "unbatched":
        model, x, t = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 3)), torch.randn(20), torch.tensor(1)
    else:
        model, x, t = Prototypes(), torch.randn(2, 20), torch.tensor([0, 2])
    grads = {}
    for ds in ("auto", "never"):
        m = copy.deepcopy(model)
        grads[ds] = _step(ShampooGradientMaker(m, PreconditioningConfig(damping=1e-3), data_space=ds), m, x, t)
    for n in grads["never"]:
        _close(grads["auto"][n], grads["never"][n], rtol=1e-9, what=n)
