"""Shampoo in data space: the ``*_rows`` functions of curvfun.shampoo_math against dense float64
ground truth, :func:`~curvfun.shampoo_math.rows_pay`, and ``ShampooGradientMaker(data_space=
"auto")`` against the dense route ``data_space="never"`` (training, warm roots from a shared state,
parameters used outside their layer, accumulated gradients, biases, resume, bad input, layers that
must keep the dense route), and the centred rows (:func:`~curvfun.shampoo_math.centered_rows`)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, strategies as st
from torch import nn

import curvfun.precondition.shampoo as shampoo_mod
from curvfun.precondition import NonFiniteCurvatureWarning, PreconditioningConfig
from curvfun.precondition.shampoo import ShampooGradientMaker
from curvfun.shampoo_math import (
    apply_rotated,
    centered_rows,
    precondition_matrix,
    precondition_rows,
    rotate_rows,
    row_tiles,
    row_tiles_with_grams,
    rows_pay,
    split_blocks,
    update_statistics,
    update_statistics_from_rows,
)
from rows_models import CentredWeightLinear, Detached, KeywordCall, LoRALinear, Siamese
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
    assert not rows_pay(0, 512, 784, -1)  # an empty batch: the formed (zero) gradient, nothing to centre


@given(R=st.integers(1, 6), d_out=st.integers(1, 9), d_in=st.integers(1, 9), block_size=st.sampled_from([-1, 2, 3]),
       seed=st.integers(0, 2**16))
def test_row_tiles_with_grams_and_apply_rotated_against_dense(R, d_out, d_in, block_size, seed):
    """row_tiles_with_grams: each tile's rows and the Grams of exactly those rows; apply_rotated on
    the rotated gradient, formed or as rotate_rows' factors, equals the dense
    Q_L diag(w_L) Q_Lᵀ G Q_R diag(w_R) Q_Rᵀ of the tile."""
    gen = torch.Generator().manual_seed(seed)
    g, a = torch.randn(R, d_out, generator=gen, dtype=D64), torch.randn(R, d_in, generator=gen, dtype=D64)
    G_tiles = split_blocks(g.T @ a, block_size)
    for (g_r, a_c, aa, gg), (g_t, a_t), G in zip(row_tiles_with_grams(g, a, block_size), row_tiles(g, a, block_size), G_tiles):
        assert torch.equal(g_r, g_t) and torch.equal(a_c, a_t)
        _close(aa, a_t @ a_t.T, what="a aᵀ")
        _close(gg, g_t @ g_t.T, what="g gᵀ")
        Q_L, Q_R = _orthogonal(G.shape[0], gen), _orthogonal(G.shape[1], gen)
        w_L = torch.rand(G.shape[0], generator=gen, dtype=D64) + 0.1
        w_R = torch.rand(G.shape[1], generator=gen, dtype=D64) + 0.1
        want = (Q_L * w_L) @ Q_L.T @ G @ (Q_R * w_R) @ Q_R.T
        _close(apply_rotated(Q_L.T @ G @ Q_R, [Q_L, w_L], [Q_R, w_R]), want, what="formed G'")
        U, V, _, _ = rotate_rows(g_r, a_c, Q_L, Q_R, aa, gg)
        _close(apply_rotated((U, V), [Q_L, w_L], [Q_R, w_R]), want, what="factored G'")


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
    """Layers that have taken the rows route (on at least one step)."""
    return gm._rows_seen


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
    assert gms["auto"]._rows_seen == expected
    assert not gms["never"]._rows_seen
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
    assert _rows_layers(gms["auto"]) == {"fc1", "fc2"}


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
    1e-9, no warning, and exactly the expected layers take the rows."""
    torch.manual_seed(0)
    model = cls()
    models = {ds: copy.deepcopy(model) for ds in ("auto", "never")}
    cfg = PreconditioningConfig(damping=1e-3)
    gms = {ds: ShampooGradientMaker(m, cfg, data_space=ds) for ds, m in models.items()}
    for ds, m in models.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            train_steps(m, torch.optim.SGD(m.parameters(), lr=0.1), gms[ds], _batches(3, 2, 20, 3, seed=1))
    assert gms["auto"]._rows_seen == rows and not gms["never"]._rows_seen
    _assert_params_close(models["auto"], models["never"], 1e-9)


def _train_routes(model, batches, loss_for=None, steps=None, **kw):
    """Train deep copies of ``model`` with data_space="auto" and "never" (SGD, lr 0.1, damping 1e-3,
    maker options ``kw``) on ``batches``, any warning an error. ``loss_for(m, i)``: the loss function
    of step i for copy m (default cross-entropy). Asserts that every step's .grads (None where the
    dense route has None) and the parameters after it agree to 1e-9 relative; returns the makers
    and, with ``steps`` (a list), appends the (d_out, d_in) of the rows passed to centered_rows on
    each step of the rows route (the layers that kept their rows that step)."""
    real = shampoo_mod.centered_rows
    shapes = []

    def spy(g, a):
        shapes.append((g.shape[1], a.shape[1]))
        return real(g, a)

    models = {ds: copy.deepcopy(model) for ds in ("auto", "never")}
    gms = {ds: ShampooGradientMaker(m, PreconditioningConfig(damping=1e-3), data_space=ds, **kw)
           for ds, m in models.items()}
    opts = {ds: torch.optim.SGD(m.parameters(), lr=0.1) for ds, m in models.items()}
    shampoo_mod.centered_rows = spy
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for i, (x, t) in enumerate(batches):
                grads = {}
                for ds, m in models.items():
                    shapes.clear()
                    opts[ds].zero_grad()
                    y = gms[ds].setup_model_call(m, x)
                    gms[ds].setup_loss_call(F.cross_entropy if loss_for is None else loss_for(m, i), y, t)
                    gms[ds].forward_and_backward()
                    grads[ds] = {n: None if p.grad is None else p.grad.clone() for n, p in m.named_parameters()}
                    if ds == "auto" and steps is not None:
                        steps.append(set(shapes))
                    opts[ds].step()
                for n, want in grads["never"].items():
                    got = grads["auto"][n]
                    assert (got is None) == (want is None), (i, n, got, want)
                    if want is not None:
                        _close(got, want, rtol=1e-9, what=f"step {i} grad {n}")
                _assert_params_close(models["auto"], models["never"], 1e-9, f"after step {i}")
    finally:
        shampoo_mod.centered_rows = real
    assert not gms["never"]._rows_seen
    return gms, models


class Leaky(nn.Module):
    """fc1's weight is also used outside fc1's call: its gradient is not gᵀa alone."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x)) + 0.3 * torch.tanh(x @ self.fc1.weight.T)
        return self.fc2(h)


def test_parameter_used_outside_its_layer_is_exact():
    """The outside use reaches fc1.weight's .grad through autograd on every step, so fc1 takes the
    formed gradient gᵀa + outside part on every step (never its rows) while fc2 keeps its rows; no
    warning, and every step's .grads and parameters equal the dense route's to 1e-9 (4 steps)."""
    torch.manual_seed(0)
    steps = []
    gms, _ = _train_routes(Leaky(), _batches(4, 2, 20, 3, seed=2), steps=steps)
    assert gms["auto"]._rows_seen == {"fc2"}
    assert steps == [{(3, 16)}] * 4, steps


@pytest.mark.parametrize("form", ["zero_term", "absent"])
def test_outside_use_that_starts_after_the_first_step(form):
    """loss = CE + λ·‖fc1.weight‖² with λ = 0 on step 0 (the term multiplied by 0, or left out) and
    0.1 afterwards (a weight decay switched on later): fc1 takes its rows on step 0 and the formed
    gradient from then on (the penalty's gradient is in .grad), no warning, and every step equals
    the dense route to 1e-9. (A check done once, on the first step, would miss the later use.)"""
    torch.manual_seed(0)

    def loss_for(m, i):
        lam = 0.0 if i == 0 else 0.1
        if form == "absent" and lam == 0:
            return F.cross_entropy
        return lambda y, t: F.cross_entropy(y, t) + lam * m.fc1.weight.square().sum()

    steps = []
    gms, _ = _train_routes(MLP(20, 18, 16, 3), _batches(4, 2, 20, 3, seed=5), loss_for, steps=steps)
    assert steps[0] == {(18, 20), (16, 18), (3, 16)}, steps  # every layer's rows pay at 2 rows
    assert all(s == {(16, 18), (3, 16)} for s in steps[1:]), steps
    assert gms["auto"]._rows_seen == {"fc1", "fc2", "fc3"}


@pytest.mark.parametrize("which", ["all", "fc1"])
def test_accumulated_gradients_take_the_plain_backward(monkeypatch, which):
    """A normal step, then a step with .grad already set to fixed random tensors (every parameter,
    or fc1's only): the layers holding a .grad do not take the rows route that step (no rows
    functions see them; those that do see the R + 1 centred rows) and the resulting .grads equal
    the dense route's to 1e-9."""
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

    def spy(L, R, g, a, *r, **k):
        assert g.shape[0] == a.shape[0] == 2 + 1, (g.shape, a.shape)  # the centred rows: R + 1
        seen.append((g.shape[1], a.shape[1]))
        return real(L, R, g, a, *r, **k)

    monkeypatch.setattr(shampoo_mod, "update_statistics_from_rows", spy)
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
        assert ({"fc1", "fc2"} <= gm._rows_seen) if ds == "auto" else not gm._rows_seen
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


def test_layer_whose_output_does_not_reach_the_loss():
    """The dense route leaves aux's .grad None (SGD skips it, no statistics); the rows route must too:
    the parameters after 2 SGD steps with momentum and weight decay agree, aux unmoved; fc1 took
    the rows route, aux (no output gradient) did not."""
    torch.manual_seed(0)
    model = Detached(20, 16, 3)
    models = {ds: copy.deepcopy(model) for ds in ("auto", "never")}
    gms = {}
    for ds, m in models.items():
        gms[ds] = ShampooGradientMaker(m, PreconditioningConfig(damping=1e-3), data_space=ds)
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        train_steps(m, opt, gms[ds], _batches(2, 2, 20, 3, seed=3))
    assert models["auto"].aux.weight.grad is None and models["auto"].aux.bias.grad is None
    assert set(gms["auto"].statistics) == set(gms["never"].statistics)
    assert gms["auto"]._rows_seen == {"fc1", "fc2"}
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
    """Shampoo needs no per-sample structure, so any Linear input is rows: an unbatched 1-D input (1
    row) and a layer called on [2, 20] and [3, 20] (5 rows) take the rows route and give the dense
    route's gradients."""
    torch.manual_seed(0)
    if case == "unbatched":
        model, x, t = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 3)), torch.randn(20), torch.tensor(1)
        layer = "0"
    else:
        model, x, t = Prototypes(), torch.randn(2, 20), torch.tensor([0, 2])
        layer = "enc"
    assert rows_pay(1 if case == "unbatched" else 5, 16, 20, -1)
    grads, gms = {}, {}
    for ds in ("auto", "never"):
        m = copy.deepcopy(model)
        gms[ds] = ShampooGradientMaker(m, PreconditioningConfig(damping=1e-3), data_space=ds)
        grads[ds] = _step(gms[ds], m, x, t)
    assert layer in gms["auto"]._rows_seen and not gms["never"]._rows_seen
    assert grads["auto"].keys() == grads["never"].keys()
    for n in grads["never"]:
        _close(grads["auto"][n], grads["never"][n], rtol=1e-9, what=n)


# --- outside uses, bad batches and layers that keep the dense route ------------------------------


def _finite_grads(model):
    return all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("bad_step", [0, 2])
def test_nan_in_the_batch(bad_step):
    """A NaN in one sample of the batch (on the first step, when no statistics exist yet, or later):
    both routes finish the step without an exception, warn (NonFiniteCurvatureWarning: the
    statistics are rejected and the previous ones kept), and the caller skips the optimizer step on
    the non-finite gradient; training then goes on with finite gradients and parameters, and every
    finite step's .grads and the parameters agree between the routes to 1e-9."""
    torch.manual_seed(0)
    model = MLP(20, 18, 16, 3)
    batches = _batches(4, 3, 20, 3, seed=9)
    batches[bad_step][0][1, 4] = float("nan")
    models = {ds: copy.deepcopy(model) for ds in ("auto", "never")}
    gms = {ds: ShampooGradientMaker(m, PreconditioningConfig(damping=1e-3), data_space=ds) for ds, m in models.items()}
    opts = {ds: torch.optim.SGD(m.parameters(), lr=0.1) for ds, m in models.items()}
    for i, (x, t) in enumerate(batches):
        grads = {}
        for ds, m in models.items():
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                opts[ds].zero_grad()
                grads[ds] = _step(gms[ds], m, x, t)
            kinds = {type(w.message) for w in record}
            if i == bad_step:
                assert kinds == {NonFiniteCurvatureWarning}, [str(w.message) for w in record]
                assert not _finite_grads(m)
                assert gms[ds].nonfinite_counts.get("fc1.weight") == 1
            else:
                assert not kinds, [str(w.message) for w in record]
                assert _finite_grads(m)
                opts[ds].step()
            assert all(bool(torch.isfinite(p).all()) for p in m.parameters())
        if i != bad_step:
            for n in grads["never"]:
                _close(grads["auto"][n], grads["never"][n], rtol=1e-9, what=f"step {i} grad {n}")
        _assert_params_close(models["auto"], models["never"], 1e-9, f"after step {i}")
    assert {"fc1", "fc2"} <= gms["auto"]._rows_seen
    for key, stats in gms["auto"].statistics.items():  # the statistics skipped exactly the bad batch
        for (L, R), (Ln, Rn) in zip(stats, gms["never"].statistics[key]):
            _close(L, Ln, rtol=1e-9, what=f"{key} L")
            _close(R, Rn, rtol=1e-9, what=f"{key} R")


def test_bias_whose_gradient_is_exactly_zero():
    """enc's bias gradient is 0 (the dense route gives exact zeros); the rows route's Σg over both
    calls is 0 up to rounding: no warning, enc keeps its rows, the weights' .grads agree to 1e-9
    and the bias .grad is zero to 1e-12 of the weight gradient's scale (3 steps)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(2, 2, 20, generator=gen), torch.randint(0, 3, (2,), generator=gen)) for _ in range(3)]
    models = {ds: Siamese(20, 16, 3) for ds in ("auto", "never")}
    models["never"].load_state_dict(models["auto"].state_dict())
    gms = {ds: ShampooGradientMaker(m, PreconditioningConfig(damping=1e-3), data_space=ds) for ds, m in models.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i, (x, t) in enumerate(batches):
            grads = {ds: _step(gms[ds], m, x, t) for ds, m in models.items()}
            assert not grads["never"]["enc.bias"].any()  # exactly zero on the dense route
            scale = float(grads["never"]["enc.weight"].abs().max())
            torch.testing.assert_close(grads["auto"]["enc.bias"], grads["never"]["enc.bias"], rtol=0,
                                       atol=1e-12 * scale)
            for n in ("enc.weight", "head.weight", "head.bias"):
                _close(grads["auto"][n], grads["never"][n], rtol=1e-9, what=f"step {i} {n}")
            with torch.no_grad():
                for ds, m in models.items():
                    for p in m.parameters():
                        p -= 0.1 * p.grad
                    m.zero_grad()
    assert gms["auto"]._rows_seen == {"enc", "head"}


def test_layer_whose_output_does_not_reach_the_loss_but_its_weight_does():
    """aux.weight's .grad is the penalty's gradient (not None), as on the dense route, aux.bias's
    stays None; every step equals the dense route to 1e-9, no warning; aux never took the rows
    route (no output gradient), fc1 did."""
    torch.manual_seed(0)

    def loss_for(m, i):
        return lambda y, t: F.cross_entropy(y, t) + 0.1 * m.aux.weight.square().sum()

    gms, models = _train_routes(Detached(20, 16, 3), _batches(3, 2, 20, 3, seed=4), loss_for)
    assert models["auto"].aux.weight.grad is not None and models["auto"].aux.bias.grad is None
    assert {"fc1", "fc2"} == gms["auto"]._rows_seen


@pytest.mark.parametrize("case", ["lora", "centred_weight", "keyword"])
def test_linear_subclass_and_keyword_input(case):
    """nn.Linear subclasses with their own forward keep the dense route (not in _rows_seen), with
    extra trainable parameters (LoRA-style weight + B·A) or without (a transformed weight), and do
    not break the route of the others; a plain Linear called with ``input=x`` takes its rows. All:
    3 steps equal the dense route to 1e-9, no warning."""
    torch.manual_seed(0)
    if case == "keyword":
        model = KeywordCall(20, 18, 3)
    else:
        model = MLP(20, 18, 16, 3)
        model.fc1 = LoRALinear(20, 18) if case == "lora" else CentredWeightLinear(20, 18)
    gms, _ = _train_routes(model, _batches(3, 2, 20, 3, seed=8))
    assert gms["auto"]._rows_seen == ({"fc1", "fc2"} if case == "keyword" else {"fc2", "fc3"})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_parameters_keep_the_dense_route(dtype):
    """float16 / bfloat16 parameters: no layer takes the rows route (the R x R Grams could overflow),
    so data_space="auto" runs exactly the computation of "never": bit-identical .grads and
    parameters over 3 steps."""
    torch.manual_seed(0)
    model = MLP(20, 18, 16, 3).to(dtype)
    batches = [(x.to(dtype), t) for x, t in _batches(3, 2, 20, 3, seed=1)]
    models = {ds: copy.deepcopy(model) for ds in ("auto", "never")}
    gms = {ds: ShampooGradientMaker(m, PreconditioningConfig(damping=1e-3), data_space=ds) for ds, m in models.items()}
    for x, t in batches:
        grads = {}
        for ds, m in models.items():
            grads[ds] = _step(gms[ds], m, x, t)
            with torch.no_grad():
                for p in m.parameters():
                    p -= 0.1 * p.grad
        assert grads["auto"].keys() == grads["never"].keys()
        assert all(torch.equal(grads["auto"][n], g) for n, g in grads["never"].items())
    assert not gms["auto"]._rows_seen
    assert rows_pay(2, 18, 20, -1)  # in float32 fc1 would take its rows
    for p, q in zip(models["auto"].parameters(), models["never"].parameters()):
        assert p.dtype == dtype and torch.equal(p, q)


def test_post_accumulate_grad_hooks_and_grad_identity():
    """With the rows route active (fc1, fc2), a LayerNorm between them (not a rows layer) has its
    parameters' post-accumulate-grad hooks fire once per step, as with loss.backward(), and, with
    zero_grad(set_to_none=False), every parameter keeps its very .grad tensor across steps."""
    torch.manual_seed(0)

    class WithNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(20, 18)
            self.norm = nn.LayerNorm(18)
            self.fc2 = nn.Linear(18, 3)

        def forward(self, x):
            return self.fc2(torch.tanh(self.norm(self.fc1(x))))

    model = WithNorm()
    fired = {}
    for ds in ("auto", "never"):
        m = copy.deepcopy(model)
        gm = ShampooGradientMaker(m, PreconditioningConfig(damping=1e-3), data_space=ds)
        counts = {"norm.weight": 0, "norm.bias": 0}
        for n in counts:
            m.get_parameter(n).register_post_accumulate_grad_hook(lambda p, n=n: counts.__setitem__(n, counts[n] + 1))
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        held = None
        for i, (x, t) in enumerate(_batches(3, 2, 20, 3, seed=2)):
            opt.zero_grad(set_to_none=False)
            _step(gm, m, x, t, zero=False)
            assert counts == {"norm.weight": i + 1, "norm.bias": i + 1}, (ds, i, counts)
            if held is not None:
                assert all(p.grad is held[n] for n, p in m.named_parameters()), ds
            held = {n: p.grad for n, p in m.named_parameters()}
            opt.step()
        fired[ds] = counts
        assert gm._rows_seen == ({"fc1", "fc2"} if ds == "auto" else set())
    assert fired["auto"] == fired["never"]


# --- centred rows ----------------------------------------------------------------------------------


@given(R=st.integers(1, 8), d_out=st.integers(1, 9), d_in=st.integers(1, 9), seed=st.integers(0, 2**16),
       offset=st.sampled_from([0.0, 30.0]))
def test_centered_rows_are_rows_of_the_same_gradient(R, d_out, d_in, seed, offset):
    """centered_rows(g, a) = (g', a'), R + 1 rows: g'ᵀa' = gᵀa; the first R rows of each are centred
    (sum to zero) and the last is √R times the mean; the inputs are not modified."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(R, d_out, generator=gen, dtype=D64) + offset
    a = torch.randn(R, d_in, generator=gen, dtype=D64) + offset
    g0, a0 = g.clone(), a.clone()
    gc, ac = centered_rows(g, a)
    assert gc.shape == (R + 1, d_out) and ac.shape == (R + 1, d_in)
    _close(gc.T @ ac, g.T @ a, rtol=1e-12, what="g'ᵀa'")
    for c, x in ((gc, g), (ac, a)):
        assert float(c[:R].sum(0).abs().max()) <= 1e-12 * (1 + float(x.abs().max())) * R
        _close(c[R], x.mean(0) * R ** 0.5, rtol=1e-12, what="mean row")
    assert torch.equal(g, g0) and torch.equal(a, a0)


@pytest.mark.parametrize("R, d_out, d_in", [(4, 20, 30), (8, 32, 64), (16, 48, 96)])
def test_centered_rows_keep_float32_statistics_accurate(R, d_out, d_in):
    """Inputs of mean 20 and std 1, output gradients summing to zero over the rows (as before a
    BatchNorm), float32: the statistics from the centred rows are within 1e-5 (Frobenius, relative)
    of G Gᵀ and Gᵀ G computed in float64 from the same float32 rows, while the raw rows (the Gram
    aaᵀ dominated by the common mean, cancelling in (aaᵀ)g) lose at least 10x more in L."""
    gen = torch.Generator().manual_seed(R)
    a = (20 + torch.randn(R, d_in, generator=gen, dtype=D64)).float()
    g = torch.randn(R, d_out, generator=gen, dtype=D64)
    g = (g - g.mean(0)).float()
    G = g.double().T @ a.double()
    want_L, want_R = G @ G.T, G.T @ G
    zeros = (torch.zeros(d_out, d_out, dtype=torch.float32), torch.zeros(d_in, d_in, dtype=torch.float32))

    def errors(g_, a_):
        L, Rs = update_statistics_from_rows(*zeros, g_, a_, -1)
        assert L.dtype == Rs.dtype == torch.float32
        return (float((L.double() - want_L).norm() / want_L.norm()),
                float((Rs.double() - want_R).norm() / want_R.norm()))

    centred = errors(*centered_rows(g, a))
    raw = errors(g, a)
    assert max(centred) < 1e-5, centred
    assert raw[0] > 10 * centred[0], (raw, centred)


def test_maker_statistics_come_from_the_centred_rows(monkeypatch):
    """The maker's rows route centres the rows: a float32 Linear (inputs of mean 20) before a
    BatchNorm (output gradients summing to ~0), batch 8: the installed statistics L, R are within
    1e-5 relative of G Gᵀ, Gᵀ G formed in float64 from the rows the layer recorded, and the rows
    the statistics saw are R + 1 centred ones. With centring switched off (patched to return the raw
    rows) L is at least 10x further off: the maker does not bypass it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.BatchNorm1d(48), nn.Tanh(), nn.Linear(48, 3)).float()
    gen = torch.Generator().manual_seed(0)
    x = 20 + torch.randn(8, 64, generator=gen, dtype=torch.float32)
    t = torch.randint(0, 3, (8,), generator=gen)
    real = shampoo_mod.centered_rows
    errs = {}
    for centre in (True, False):
        seen = {}

        def spy(g, a):
            seen[g.shape[1]] = (g, a)
            out = real(g, a) if centre else (g, a)
            seen[(g.shape[1], "rows")] = out[0].shape[0]
            return out

        monkeypatch.setattr(shampoo_mod, "centered_rows", spy)
        m = copy.deepcopy(model)
        gm = ShampooGradientMaker(m, PreconditioningConfig(damping=1e-3))
        y = gm.setup_model_call(m, x)
        gm.setup_loss_call(F.cross_entropy, y, t)
        gm.forward_and_backward()
        assert "0" in gm._rows_seen
        g, a = seen[48]
        assert seen[(48, "rows")] == (9 if centre else 8)
        G = g.double().T @ a.double()
        (L, R), = gm.statistics["0.weight"]
        errs[centre] = float((L.double() - G @ G.T).norm() / (G @ G.T).norm())
        if centre:
            assert float((R.double() - G.T @ G).norm() / (G.T @ G).norm()) < 1e-5
    assert errs[True] < 1e-5 and errs[False] > 10 * errs[True], errs


# --- activation checkpointing, tensors outside the model, hooks on layers that keep the plain route ---


class Checkpointed(nn.Module):
    """fc1 runs inside non-reentrant activation checkpointing (re-run during backward, without the
    maker's hooks), fc2 outside."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(20, 18), nn.Linear(18, 16), nn.Linear(16, 3)

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = checkpoint(lambda u: torch.tanh(self.fc1(u)), x, use_reentrant=False)
        return self.fc3(torch.tanh(self.fc2(h)))


def test_non_reentrant_checkpointing():
    """A layer inside a checkpointed region keeps the plain backward (its own parameters are never
    detached there: the recomputation would differ); the others take their rows; every step equals
    the dense route."""
    torch.manual_seed(4)
    gms, _ = _train_routes(Checkpointed(), _batches(3, 2, 20, 3, seed=11))
    assert gms["auto"]._rows_seen == {"fc2", "fc3"}


def test_tensors_outside_the_model_get_their_gradient():
    """A learnable temperature in the loss function and an input that requires grad are leaves of
    the graph outside the model: the rows route's backward is loss.backward(), so they get exactly
    the gradients of the dense route."""
    torch.manual_seed(5)
    model = MLP(20, 18, 16, 3)
    temps = {}

    def loss_for(m, i):
        temp = temps.setdefault(id(m), torch.tensor(1.5, requires_grad=True))
        return lambda y, t: F.cross_entropy(y / temp, t)

    batches = [(x.requires_grad_(), t) for x, t in _batches(2, 2, 20, 3, seed=12)]
    gms, models = _train_routes(model, batches, loss_for=loss_for)
    assert {"fc1", "fc2"} <= gms["auto"]._rows_seen
    t_auto, t_never = (temps[id(models[ds])] for ds in ("auto", "never"))
    assert t_auto.grad is not None
    _close(t_auto.grad, t_never.grad, rtol=1e-9, what="temperature")
    x = batches[-1][0]
    assert x.grad is not None  # accumulated over both routes' steps on the same input tensor


def test_hooks_fire_on_layers_that_keep_the_plain_route():
    """Candidate layers whose rows do not pay (the 16 -> 3 head) are never detached: autograd forms
    their gradient, so their tensor and post-accumulate hooks fire once per step, as with "never"."""
    torch.manual_seed(6)
    counts = {}
    for ds in ("auto", "never"):
        model = MLP(20, 18, 16, 3)
        fired = []
        model.fc3.weight.register_post_accumulate_grad_hook(lambda p: fired.append("post"))
        model.fc3.bias.register_hook(lambda g: fired.append("tensor") or g)
        gm = ShampooGradientMaker(model, PreconditioningConfig(damping=1e-3), data_space=ds)
        for x, t in _batches(3, 4, 20, 3, seed=13):
            _step(gm, model, x, t)
        counts[ds] = (fired.count("post"), fired.count("tensor"))
        if ds == "auto":
            assert {"fc1", "fc2"} <= gm._rows_seen and "fc3" not in gm._rows_seen
    assert counts["auto"] == counts["never"] == (3, 3)
