"""Warm-started roots (curvfun.roots.warm_eigh) and ShampooGradientMaker(root_method="warm"):
convergence to eigh, exactness for an unchanged matrix, tracking a slowly changing sequence with a
stated bound, the maker's schedule and fallback, training, resume, bad input. float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from threadpoolctl import threadpool_limits
from torch import nn

import curvfun.precondition.shampoo as shampoo_mod
from curvfun.precondition import PreconditioningConfig
from curvfun.precondition.shampoo import ShampooGradientMaker
from curvfun.roots import descending_eigh, eigen_power_from, inverse_root, rayleigh_quotients, sym_eigh, warm_eigh
from curvfun.shampoo_math import block_slices
from digits_helper import train_digits
from maker_checks import check_resume_bit_exact
from test_precond_shampoo import Net, batches

D64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(old)


def _orthogonal(d: int, g: torch.Generator) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=D64))
    return Q


def _spd_with_gap(d: int, rho: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U diag(λ) Uᵀ with λ_i = 3·ρ^i (descending, consecutive ratio ρ)."""
    lam = 3.0 * rho ** torch.arange(d, dtype=D64)
    U = _orthogonal(d, g)
    return (U * lam) @ U.T, lam, U


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b)).item()


# --- the pure function ------------------------------------------------------------------------


@given(d=st.integers(1, 8), rho=st.floats(0.1, 0.6), seed=st.integers(0, 2**16))
def test_warm_eigh_converges_to_eigh(d, rho, seed):
    """From a random orthogonal start, 80 subspace steps with consecutive eigenvalue ratio <= 0.6
    (error factor 0.6^80 ≈ 2e-18 per pair): eigenvalues to 1e-10 relative (+1e-14 absolute), each eigenvector to
    1e-7 up to sign, and the root to 1e-9."""
    g = torch.Generator().manual_seed(seed)
    M, lam, U = _spd_with_gap(d, rho, g)
    got_lam, Q = warm_eigh(M, _orthogonal(d, g), iters=80)
    torch.testing.assert_close(got_lam, lam, rtol=1e-10, atol=1e-14)  # atol: rounding ~ eps·λ_max
    torch.testing.assert_close((Q.T @ U).abs(), torch.eye(d, dtype=D64), rtol=0, atol=1e-7)
    torch.testing.assert_close(Q.T @ Q, torch.eye(d, dtype=D64), rtol=0, atol=1e-12)
    root = eigen_power_from(got_lam, Q, -0.25, 1e-3).matrix()
    assert _rel(root, inverse_root(M, 4, 1e-3)) < 1e-9


@given(d=st.integers(1, 8), k=st.integers(1, 10), eps=st.sampled_from([1e-4, 1e-2, 1.0]),
       relative=st.booleans(), seed=st.integers(0, 2**16))
def test_one_warm_step_on_an_unchanged_matrix_is_exact(d, k, eps, relative, seed):
    """Q_prev an exact eigenbasis of M (any PSD M, singular when k < d, repeated eigenvalues
    allowed): one step returns the exact root to 1e-10 relative (null-space Rayleigh quotients
    carry rounding ~1e-16·λ_max, amplified by the root's slope ¼δ^{-5/4} at δ = 1e-4)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, k, generator=g, dtype=D64)
    M = X @ X.T
    _, Q0 = descending_eigh(M)
    lam, Q = warm_eigh(M, Q0, iters=1)
    got = eigen_power_from(lam, Q, -0.25, eps, relative).matrix()
    assert _rel(got, inverse_root(M, 4, eps, relative)) < 1e-10
    torch.testing.assert_close(Q.T @ Q, torch.eye(d, dtype=D64), rtol=0, atol=1e-12)


@given(d=st.integers(2, 7), rho=st.floats(0.2, 0.7), t=st.floats(1e-4, 1e-2), seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_tracks_a_slowly_rotating_matrix(d, rho, t, seed):
    """M_k = U_k diag(λ) U_kᵀ whose eigenbasis turns by angle t per step (U_k = U_0 exp(k t S),
    ‖S‖₂ = 1), consecutive eigenvalue ratio <= ρ, one warm step per M_k from the previous basis.
    A step leaves an angle error θ' <= ρ(θ + t), so θ <= ρt/(1-ρ) at all times, and the root's
    relative Frobenius error stays below that bound over 100 steps (δ = 1e-3)."""
    g = torch.Generator().manual_seed(seed)
    _, lam, U0 = _spd_with_gap(d, rho, g)
    A = torch.randn(d, d, generator=g, dtype=D64)
    S = (A - A.T) / 2
    S = S / torch.linalg.matrix_norm(S, 2)
    _, Q = descending_eigh((U0 * lam) @ U0.T)
    bound = t * rho / (1 - rho)
    step = torch.linalg.matrix_exp(t * S)
    U = U0
    for _ in range(100):
        U = U @ step
        M = (U * lam) @ U.T
        est, Q = warm_eigh(M, Q, iters=1)
        err = _rel(eigen_power_from(est, Q, -0.25, 1e-3).matrix(), inverse_root(M, 4, 1e-3))
        assert err <= bound, (err, bound)


@given(d=st.integers(1, 8), k=st.integers(1, 10), iters=st.integers(0, 2), delta=st.sampled_from([1e-3, 0.1]),
       seed=st.integers(0, 2**16))
def test_root_error_is_bounded_by_the_off_diagonal_part(d, k, iters, delta, seed):
    """For *any* orthogonal start (``iters = 0``: the basis is kept), the root from λ = diag(QᵀMQ)
    differs from the exact one by at most sup|f'|·‖offdiag(QᵀMQ)‖_F = ¼δ^{-5/4}·‖offdiag‖_F
    (f(x) = (x+δ)^{-1/4} is Lipschitz on [0, ∞), and Lipschitz functions are Lipschitz with the
    same constant on symmetric matrices in the Frobenius norm). Checks that λ belongs to Q."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, k, generator=g, dtype=D64)
    M = X @ X.T
    lam, Q = warm_eigh(M, _orthogonal(d, g), iters=iters)
    B = Q.T @ M @ Q
    torch.testing.assert_close(lam, B.diagonal(), rtol=1e-12, atol=1e-12)
    off = torch.linalg.matrix_norm(B - torch.diag(B.diagonal())).item()
    err = torch.linalg.matrix_norm(eigen_power_from(lam, Q, -0.25, delta).matrix() - inverse_root(M, 4, delta)).item()
    assert err <= 0.25 * delta ** -1.25 * off + 1e-10


def test_warm_eigh_bad_input():
    with pytest.raises(ValueError, match="Q_prev must be a tensor of M's shape"):
        warm_eigh(torch.eye(3), torch.eye(2))
    with pytest.raises(ValueError, match="iters must be an int >= 0"):
        warm_eigh(torch.eye(3), torch.eye(3), iters=-1)
    with pytest.raises(ValueError, match="expected a square matrix"):
        warm_eigh(torch.ones(2, 3), torch.ones(2, 3))


def test_sym_eigh_without_symmetrizing_reads_the_lower_triangle():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(6, 6, generator=g, dtype=D64)
    S = torch.tril(M) + torch.tril(M, -1).T
    lam, Q = sym_eigh(M, symmetrize=False)
    torch.testing.assert_close((Q * lam) @ Q.T, S, rtol=0, atol=1e-12)
    lam2, Q2 = sym_eigh(M)  # default: the symmetric part
    torch.testing.assert_close((Q2 * lam2) @ Q2.T, (M + M.T) / 2, rtol=0, atol=1e-12)


def test_rayleigh_quotients():
    g = torch.Generator().manual_seed(0)
    M, Q = torch.randn(5, 5, generator=g, dtype=D64), _orthogonal(5, g)
    torch.testing.assert_close(rayleigh_quotients(M, Q), torch.diagonal(Q.T @ M @ Q))


# --- the maker ----------------------------------------------------------------------------------


def _run(model, gm, data):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    grads = []
    for x, t in data:
        opt.zero_grad()
        y = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, y, t)
        gm.forward_and_backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return grads


def _spy(monkeypatch, poison):
    calls = []
    real_warm, real_eigh = shampoo_mod.warm_eigh, shampoo_mod.descending_eigh

    def warm(M, Q, iters):
        calls.append(("warm", iters))
        lam, Q = real_warm(M, Q, iters)
        return (lam * float("nan"), Q) if poison["on"] else (lam, Q)

    def eigh(M, *args, **kwargs):
        calls.append(("eigh", None))
        return real_eigh(M, *args, **kwargs)

    monkeypatch.setattr(shampoo_mod, "warm_eigh", warm)
    monkeypatch.setattr(shampoo_mod, "descending_eigh", eigh)
    return calls


def _finite_roots(gm, key):
    return all(bool(torch.isfinite(t).all()) for pair in gm.roots[key] for r in pair
               for t in ([r] if isinstance(r, torch.Tensor) else r))


def test_warm_schedule_and_fallback(monkeypatch):
    """eigh_every=3, basis_every=2, default schedule: per factor, full eigh at refreshes 0, 3, 6;
    the subspace step at counts 2, 5; at counts 1, 4 the basis is kept and λ is moved by the
    rotated gradient (no decomposition, no warm_eigh call); a non-finite warm result falls back to
    eigh for that factor."""
    poison = {"on": False}
    calls = _spy(monkeypatch, poison)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    gm = ShampooGradientMaker(model, PreconditioningConfig(damping=1e-3), root_method="warm", eigh_every=3, basis_every=2)
    data = [(x.reshape(6, -1)[:, :4], t) for x, t in batches(7)]
    for step, batch in enumerate(data):
        calls.clear()
        poison["on"] = step == 5
        _run(model, gm, [batch])
        per_factor = {0: [("eigh", None)], 1: [], 2: [("warm", 1)], 3: [("eigh", None)],
                      4: [], 5: [("warm", 1), ("eigh", None)], 6: [("eigh", None)]}[step]
        assert calls == per_factor * 2, (step, calls)  # L, then R
        assert gm.warm_counts["0.weight"] == step % 3 + 1
        assert _finite_roots(gm, "0.weight")


def test_warm_stale_eigenvalues_are_recomputed(monkeypatch):
    """Statistics every step, roots every 2nd: the kept λ are stale at a kept-basis refresh, so
    they are recomputed as Rayleigh quotients (warm_eigh with iters=0)."""
    calls = _spy(monkeypatch, {"on": False})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    cfg = PreconditioningConfig(damping=1e-3, preconditioner_upd_interval=2, curvature_upd_interval=1)
    gm = ShampooGradientMaker(model, cfg, root_method="warm", eigh_every=None, basis_every=2)
    data = [(x.reshape(6, -1)[:, :4], t) for x, t in batches(5)]
    seen = []
    for batch in data:
        calls.clear()
        _run(model, gm, [batch])
        seen.append(list(calls))
    assert seen == [[("eigh", None)] * 2, [], [("warm", 0)] * 2, [], [("warm", 1)] * 2], seen


@pytest.mark.parametrize("ema", [-1, 0.3])
def test_tracked_eigenvalues_are_the_rayleigh_quotients(ema):
    """float64, basis kept for 4 refreshes (basis_every=5, no re-sync): the λ moved by the rotated
    gradient equal diag(Qᵀ S Q) of the current statistics, and the preconditioned gradient equals
    the dense Q_L diag(w_L) Q_Lᵀ G Q_R diag(w_R) Q_Rᵀ, to 1e-12 relative."""
    torch.manual_seed(0)
    model = Net().double()
    gm = ShampooGradientMaker(model, PreconditioningConfig(damping=1e-3, ema_decay=ema), block_size=3,
                              root_method="warm", eigh_every=None, basis_every=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step, (x, t) in enumerate(batches(5)):
        x = x.double()
        G = {k: g.detach().clone() for k, g in zip(
            [n for n, _ in model.named_parameters()],
            torch.autograd.grad(F.cross_entropy(model(x), t), list(model.parameters())))}
        opt.zero_grad()
        y = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, y, t)
        gm.forward_and_backward()
        if step == 0:
            opt.step()
            continue
        assert gm._rotated == {}  # the stash lives within one step only
        for key, tiles in gm.bases.items():
            g = G[key].reshape(G[key].shape[0], -1)
            want = torch.zeros_like(g)
            for (r, c), (L_pair, R_pair), (L, R) in zip(block_slices(g.shape, 3), tiles, gm.statistics[key]):
                for (Q, lam), S in ((L_pair, L), (R_pair, R)):
                    torch.testing.assert_close(lam, torch.diagonal(Q.T @ S @ Q), rtol=1e-12, atol=1e-15)
                wL = (L_pair[1].clamp_min(0) + 1e-3 * L_pair[1].max()) ** -0.25
                wR = (R_pair[1].clamp_min(0) + 1e-3 * R_pair[1].max()) ** -0.25
                RL = (L_pair[0] * wL) @ L_pair[0].T
                RR = (R_pair[0] * wR) @ R_pair[0].T
                want[r, c] = RL @ g[r, c] @ RR
            got = dict(model.named_parameters())[key].grad.reshape(g.shape)
            assert (got - want).norm() <= 1e-12 * want.norm()
        opt.step()


def test_warm_maker_tracks_the_exact_maker():
    """float64, batch 6, statistics accumulated over 20 steps, no re-sync: the warm maker's
    preconditioned gradients equal eigh's on the first step (both decompose fully); afterwards
    (measured: 3-23% with one subspace step per refresh, shrinking as the statistics grow) every
    step is within 30% relative (the early steps depend on the arbitrary null-space basis of the
    rank-deficient statistics) and the last 10 average below 10%; three steps per refresh track
    closer; a frozen basis (eigenvalues refreshed, never the basis) is off by more than 25%."""
    torch.manual_seed(0)
    base = Net().double()
    data = [(x.double(), t) for x, t in batches(20)]
    grads = {}
    variants = {"eigh": dict(root_method="eigh"), "warm": dict(root_method="warm", eigh_every=None),
                "warm3": dict(root_method="warm", eigh_every=None, warm_iters=3),
                "frozen": dict(root_method="warm", eigh_every=None, basis_every=10**9)}
    for name, kw in variants.items():
        model = Net().double()
        model.load_state_dict(base.state_dict())
        grads[name] = _run(model, ShampooGradientMaker(model, PreconditioningConfig(damping=1e-3), **kw), data)
    err = {}
    for name in ("warm", "warm3", "frozen"):
        for a, b in zip(grads[name][0], grads["eigh"][0]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
        err[name] = torch.tensor([max(((a - b).norm() / b.norm()).item() for a, b in zip(gw, ge))
                                  for gw, ge in zip(grads[name][1:], grads["eigh"][1:])], dtype=D64)
    assert err["warm"].max() <= 0.3 and err["warm"][-10:].mean() <= 0.1, err["warm"]
    assert err["warm3"].mean() < 0.5 * err["warm"].mean(), (err["warm3"], err["warm"])
    assert err["frozen"].mean() > 0.25, err["frozen"]


def test_warm_trains_digits():
    """The digits MLP to >= 90% test accuracy in 300 steps at batch 64 (lr 0.1, damping 1e-4)."""
    acc = train_digits(
        lambda m: (torch.optim.SGD(m.parameters(), lr=0.1),
                   ShampooGradientMaker(m, PreconditioningConfig(damping=1e-4), root_method="warm")),
        steps=300, batch=64, dtype=torch.float32,
    )
    assert acc >= 0.90, acc


@pytest.mark.parametrize("serialize", [False, True])
def test_warm_resume_is_bit_exact(serialize):
    """Save at step 5 of 11: between an eigh re-sync (every 4) and subspace steps every 2nd refresh,
    so the resumed run needs the kept bases and counts."""
    config = PreconditioningConfig(damping=1e-3)
    check_resume_bit_exact(
        Net, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        lambda m: ShampooGradientMaker(m, config, block_size=3, root_method="warm", eigh_every=4, basis_every=2),
        batches(11), 5, serialize=serialize)


def test_warm_bad_options():
    model = Net()
    cfg = PreconditioningConfig()
    with pytest.raises(ValueError, match=r"root_method must be one of \('eigh', 'warm'\), got 'newton'"):
        ShampooGradientMaker(model, cfg, root_method="newton")
    with pytest.raises(ValueError, match="warm_iters must be an int >= 1, got 0"):
        ShampooGradientMaker(model, cfg, root_method="warm", warm_iters=0)
    with pytest.raises(ValueError, match=r"eigh_every must be an int >= 1 or None, got 0"):
        ShampooGradientMaker(model, cfg, root_method="warm", eigh_every=0)
    with pytest.raises(ValueError, match="basis_every must be an int >= 1, got 2.5"):
        ShampooGradientMaker(model, cfg, root_method="warm", basis_every=2.5)
    with pytest.raises(ValueError, match="warm_iters must be an int >= 1, got True"):
        ShampooGradientMaker(model, cfg, root_method="warm", warm_iters=True)
