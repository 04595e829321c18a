"""ShampooGradientMaker and curvfun.roots: dense float64 references, training, README loop,
resume, bad input."""

from __future__ import annotations

import copy
import numpy as np
import optree
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from threadpoolctl import threadpool_limits
from torch import nn

from curvfun.precondition import PreconditioningConfig
from curvfun.precondition.shampoo import ShampooGradientMaker
from curvfun.roots import eigen_power, eigen_power_from, inverse_root, sym_eigh
from curvfun.shampoo_math import block_slices, merge_blocks, needs_float64, resolved_floor, split_blocks
from digits_helper import train_digits
from maker_checks import check_resume_bit_exact, run_readme_loop


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: a second intra-op thread only adds contention on a loaded machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):  # SciPy's BLAS too
        yield
    torch.set_num_threads(old)


class Net(nn.Module):
    """Linear, Conv2d (4-D kernel) and a 1-D-only LayerNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.norm = nn.LayerNorm(12)
        self.fc1 = nn.Linear(12, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        h = F.avg_pool2d(torch.tanh(self.conv(x)), 2).flatten(1)  # 3 x 2 x 2 = 12
        return self.fc2(torch.tanh(self.fc1(self.norm(h))))


def batches(n, N=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(N, 2, 4, 4, generator=g), torch.randint(0, 3, (N,), generator=g)) for _ in range(n)]


def root_ref(M: np.ndarray, eps: float, relative: bool) -> np.ndarray:
    """(M + δI)^{-1/4} by SciPy's Schur-Padé fractional power (independent of eigh)."""
    lam_max = np.linalg.eigvalsh(M).max()
    delta = eps * lam_max if relative else eps
    return np.real(scipy.linalg.fractional_matrix_power(M + delta * np.eye(len(M)), -0.25))


# --- roots ------------------------------------------------------------------------------------


@given(d=st.integers(1, 6), k=st.integers(1, 8), p=st.sampled_from([1, 2, 4, 8]), eps=st.sampled_from([1e-3, 0.1, 1.0]),
       seed=st.integers(0, 2**16))
def test_inverse_root_is_the_root(d, k, p, eps, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, k, generator=g)
    M = X @ X.T  # PSD, singular when k < d
    R = inverse_root(M, p, eps)
    Mp = M + eps * torch.eye(d)
    assert torch.allclose(R, R.T, atol=1e-12)
    assert torch.allclose(torch.linalg.matrix_power(R, p) @ Mp, torch.eye(d), atol=1e-8)
    # relative damping: δ = eps · λ_max
    Rr = inverse_root(M, p, eps, relative=True)
    lam_max = torch.linalg.eigvalsh(M).max().clamp_min(0)
    Mr = M + eps * lam_max * torch.eye(d)
    if lam_max > 0:
        assert torch.allclose(torch.linalg.matrix_power(Rr, p) @ Mr, torch.eye(d), atol=1e-7)


def test_sym_eigh_retries_in_float64(monkeypatch):
    real = torch.linalg.eigh
    calls = []

    def flaky(M, *a, **k):
        calls.append(M.dtype)
        if M.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated: failed to converge")
        return real(M, *a, **k)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    X = torch.randn(5, 7, dtype=torch.float32)
    M = X @ X.T
    lam, Q = sym_eigh(M)
    assert calls == [torch.float32, torch.float64]
    assert lam.dtype == Q.dtype == torch.float32
    assert torch.allclose((Q * lam) @ Q.T, M, atol=1e-4)
    R = inverse_root(M, 4, 1e-3)
    assert R.dtype == torch.float32 and bool(torch.isfinite(R).all())


@given(d=st.integers(2, 7), k=st.integers(1, 7), floor=st.sampled_from([0.0, 1e-9, 1e-3, 0.5]),
       eps=st.sampled_from([0.0, 1e-6, 1e-2]), relative=st.booleans(), seed=st.integers(0, 2**16))
def test_eigen_power_floor_is_the_floored_root(d, k, floor, eps, relative, seed):
    """(Q diag(max(λ, f·λ_max)) Qᵀ + δI)^{-1/4} against SciPy's fractional power of that matrix."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, k, generator=g, dtype=torch.float64)
    M = X @ X.T
    lam, Q = torch.linalg.eigh(M)
    lam_max = float(lam.max())
    floored = (Q * torch.maximum(lam, torch.tensor(floor * lam_max))) @ Q.T if floor else (Q * lam.clamp_min(0)) @ Q.T
    delta = eps * lam_max if relative else eps
    if delta == 0 and (floor == 0 and k < d):
        return  # singular without damping or floor: no root
    want = np.real(scipy.linalg.fractional_matrix_power(floored.numpy() + delta * np.eye(d), -0.25))
    got = eigen_power_from(lam, Q, -0.25, eps, relative, floor).matrix().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9 * np.abs(want).max())


def test_roots_bad_input():
    with pytest.raises(ValueError, match="expected a square matrix"):
        inverse_root(torch.ones(2, 3), 4)
    with pytest.raises(ValueError, match="p must be a positive number"):
        inverse_root(torch.eye(2), 0)
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        eigen_power(torch.eye(2), -0.25, damping=-1.0)
    with pytest.raises(ValueError, match="inf/NaN"):
        sym_eigh(torch.full((2, 2), float("nan")))


def test_blocks_roundtrip():
    G = torch.arange(35.0).reshape(5, 7)
    tiles = split_blocks(G, 3)
    assert [tuple(t.shape) for t in tiles] == [(3, 3), (3, 3), (3, 1), (2, 3), (2, 3), (2, 1)]
    assert torch.equal(merge_blocks(tiles, G.shape, 3), G)
    assert block_slices((5, 7), -1) == [(slice(0, 5), slice(0, 7))]


# --- the maker against the dense formula ------------------------------------------------------


@pytest.mark.parametrize(
    "block_size, ema, mode",
    [(-1, -1, "relative"), (2, -1, "relative"), (-1, 0.3, "absolute"), (4, 0.5, "absolute")],
)
def test_update_equals_dense_formula(block_size, ema, mode):
    torch.manual_seed(0)
    model = Net()
    eps = 1e-3
    config = PreconditioningConfig(damping=eps, ema_decay=ema)
    gm = ShampooGradientMaker(model, config, block_size=block_size, damping_mode=mode)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    matrices = {"conv.weight", "fc1.weight", "fc2.weight"}
    stats = {}
    for x, t in batches(3):
        params = dict(model.named_parameters())
        plain = dict(zip(params, torch.autograd.grad(F.cross_entropy(model(x), t), list(params.values()))))
        opt.zero_grad()
        y = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, y, t)
        gm.forward_and_backward()
        for key, p in params.items():
            if key not in matrices:  # 1-D parameters (biases, LayerNorm) keep the plain gradient
                assert torch.equal(p.grad, plain[key])
                continue
            G = plain[key].reshape(plain[key].shape[0], -1).numpy()
            want = np.zeros_like(G)
            for i, (r, c) in enumerate(block_slices(G.shape, block_size)):
                tile = G[r, c]
                L0, R0 = stats.get((key, i), (1e-12 * np.eye(tile.shape[0]), 1e-12 * np.eye(tile.shape[1])))
                if ema == -1:
                    L, R = L0 + tile @ tile.T, R0 + tile.T @ tile
                else:
                    L, R = (1 - ema) * L0 + ema * tile @ tile.T, (1 - ema) * R0 + ema * tile.T @ tile
                stats[(key, i)] = (L, R)
                want[r, c] = root_ref(L, eps, mode == "relative") @ tile @ root_ref(R, eps, mode == "relative")
            got = p.grad.reshape(G.shape).numpy()
            np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-10)
        opt.step()


def test_interval_roots_lag_statistics():
    """Roots refreshed every 2 steps from statistics accumulated on every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    config = PreconditioningConfig(damping=1e-2, preconditioner_upd_interval=2, curvature_upd_interval=1)
    gm = ShampooGradientMaker(model, config)
    L = 1e-12 * torch.eye(3)
    Lroot = None
    for step, (x, t) in enumerate(batches(3, N=5)):
        x = x.reshape(5, -1)[:, :4]
        t = t % 2
        model.zero_grad()
        G = torch.autograd.grad(F.cross_entropy(model(x), t), model[0].weight)[0]
        L = L + G @ G.T
        if step % 2 == 0:
            Lroot = torch.as_tensor(root_ref(L.numpy(), 1e-2, True))
        y = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, y, t)
        gm.forward_and_backward()
        assert torch.allclose(gm.statistics["0.weight"][0][0], L, rtol=1e-12)
        assert torch.allclose(gm.roots["0.weight"][0][0], Lroot, rtol=1e-8, atol=1e-12)


# --- training, README loop, resume, bad input ------------------------------------------------


def _ill_conditioned():
    """Widths 24-48-40-6 on 16 samples of rank-3 inputs with a common offset: every factor is
    singular, with eigenvalues spread over many decades."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 48), nn.Tanh(), nn.Linear(48, 40), nn.Tanh(), nn.Linear(40, 6)).float()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=g) @ torch.randn(3, 24, generator=g) + 1.0
    return model, x.float(), torch.randint(0, 6, (16,), generator=g)


def _preconditioned(model, x, t, config, steps=1, **kw):
    """The preconditioned gradients of ``steps`` maker steps on one batch (no parameter update)."""
    gm = ShampooGradientMaker(model, config, **kw)
    out = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        y = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, y, t)
        gm.forward_and_backward()
        out.append(torch.cat([p.grad.flatten().double() for p in model.parameters()]))
    return gm, out


@pytest.mark.parametrize("damping", [1e-12, 1e-8, 1e-6, 1e-2])
@pytest.mark.parametrize("kw", [{}, dict(data_space="never"), dict(root_method="warm", basis_every=2)],
                         ids=["rows", "formed", "warm"])
def test_float32_matches_float64_at_any_damping(damping, kw):
    """float32 parameters against the same maker on a float64 copy of the model (relative
    distance of all preconditioned gradients <= 3e-3, three steps): below the damping float32
    resolves the statistics are float64 (the float32 ones were 4.1 away at 1e-12, 0.07 at 1e-8)."""
    model, x, t = _ill_conditioned()
    config = PreconditioningConfig(damping=damping)
    _, ref = _preconditioned(copy.deepcopy(model).double(), x.double(), t, config, 3, **kw)
    gm, got = _preconditioned(model, x, t, config, 3, **kw)
    for a, b in zip(got, ref):
        assert float((a - b).norm() / b.norm()) <= 3e-3
    wide = needs_float64(torch.float32, damping)
    assert all(S.dtype == (torch.float64 if wide else torch.float32)
               for tiles in gm.statistics.values() for pair in tiles for S in pair)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


def test_native_precision_is_the_float32_computation():
    """``precision="native"`` keeps float32 statistics: far from float64 at damping 1e-12;
    ``"float64"`` matches it whatever the damping."""
    model, x, t = _ill_conditioned()
    config = PreconditioningConfig(damping=1e-12)
    _, (ref,) = _preconditioned(copy.deepcopy(model).double(), x.double(), t, config)
    _, (native,) = _preconditioned(copy.deepcopy(model), x, t, config, precision="native")
    _, (wide,) = _preconditioned(copy.deepcopy(model), x, t, config, precision="float64")
    assert float((native - ref).norm() / ref.norm()) > 0.5
    assert float((wide - ref).norm() / ref.norm()) <= 3e-3


def test_absolute_damping_moves_to_float64():
    """``damping_mode="absolute"``: statistics move to float64 once δ falls below what float32
    resolves next to their largest diagonal entry, and stay float32 otherwise."""
    model, x, t = _ill_conditioned()
    for damping, wide in ((1e-14, True), (10.0, False)):
        config = PreconditioningConfig(damping=damping)
        _, (ref,) = _preconditioned(copy.deepcopy(model).double(), x.double(), t, config, damping_mode="absolute")
        gm, (got,) = _preconditioned(copy.deepcopy(model), x, t, config, damping_mode="absolute")
        assert {S.dtype for tiles in gm.statistics.values() for pair in tiles for S in pair} == {
            torch.float64 if wide else torch.float32}
        assert float((got - ref).norm() / ref.norm()) <= 3e-3


@pytest.mark.parametrize("kw", [{}, dict(data_space="never", root_method="warm", basis_every=2)], ids=["rows", "warm"])
def test_lowered_damping_moves_to_float64(kw):
    """Relative damping lowered after the statistics were made in float32: they (and the kept roots
    and bases) move to float64, also between refreshes (roots every 2 steps, statistics every step)."""
    model, x, t = _ill_conditioned()
    config = PreconditioningConfig(damping=1e-2, curvature_upd_interval=1, preconditioner_upd_interval=2)
    gm, _ = _preconditioned(model, x, t, config, 1, **kw)
    assert all(S.dtype == torch.float32 for tiles in gm.statistics.values() for pair in tiles for S in pair)
    config.damping = 1e-12
    for _ in range(3):  # step 1 keeps the old roots, step 2 refreshes them
        model.zero_grad(set_to_none=True)
        y = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, y, t)
        gm.forward_and_backward()
        assert all(S.dtype == torch.float64 for tiles in gm.statistics.values() for pair in tiles for S in pair)
        assert all(p.grad.dtype == torch.float32 and bool(torch.isfinite(p.grad).all()) for p in model.parameters())


def test_precision_rules():
    assert needs_float64(torch.float32, 1e-5) and needs_float64(torch.bfloat16, 1e-12)
    assert not needs_float64(torch.float32, 1e-4) and not needs_float64(torch.float64, 1e-12)
    assert resolved_floor(torch.float32) == pytest.approx((300 * torch.finfo(torch.float32).eps) ** 2)
    assert resolved_floor(torch.float64) < 1e-25 and resolved_floor(torch.bfloat16) == 1e-4


def test_trains_digits():
    """lr 0.1, damping 1e-4 (relative), statistics and roots refreshed every step."""
    acc = train_digits(
        lambda m: (torch.optim.SGD(m.parameters(), lr=0.1), ShampooGradientMaker(m, PreconditioningConfig(damping=1e-4))),
        dtype=torch.float32,
    )
    assert acc >= 0.90, acc


def test_readme_loop():
    torch.manual_seed(0)
    x, t = batches(1, N=16)[0]
    ns = run_readme_loop("ShampooGradientMaker", Net, [(x, t)] * 8)
    assert ns["gm"].step == 8 and set(ns["gm"].roots) == {"conv.weight", "fc1.weight", "fc2.weight"}


@pytest.mark.parametrize("damping", [1e-3, 1e-12])  # float32 / float64 statistics
def test_resume_is_bit_exact(damping):
    config = PreconditioningConfig(damping=damping, preconditioner_upd_interval=2, curvature_upd_interval=1)
    # the live maker keeps training after the save: the saved copy must not move
    check_resume_bit_exact(Net, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                           lambda m: ShampooGradientMaker(m, config, block_size=3), batches(6), 3)


def test_bad_input():
    model = Net()
    with pytest.raises(ValueError, match="block_size must be a positive tile size or -1"):
        ShampooGradientMaker(model, PreconditioningConfig(), block_size=0)
    with pytest.raises(TypeError, match="block_size must be an int"):
        ShampooGradientMaker(model, PreconditioningConfig(), block_size=2.5)
    with pytest.raises(ValueError, match="damping_mode must be one of"):
        ShampooGradientMaker(model, PreconditioningConfig(), damping_mode="trace")
    with pytest.raises(ValueError, match="precision must be one of"):
        ShampooGradientMaker(model, PreconditioningConfig(), precision="float32")
    with pytest.raises(ValueError, match="damping must be >= 0"):
        ShampooGradientMaker(model, PreconditioningConfig(damping=-1.0))


def test_non_finite_gradient_keeps_the_last_statistics():
    from curvfun.precondition import NonFiniteCurvatureWarning

    torch.manual_seed(0)
    model = Net()
    gm = ShampooGradientMaker(model, PreconditioningConfig(damping=1e-3))
    (x, t), = batches(1)
    y = gm.setup_model_call(model, x)
    gm.setup_loss_call(F.cross_entropy, y, t)
    gm.forward_and_backward()
    before = copy.deepcopy(gm.statistics), copy.deepcopy(gm.roots)
    model.zero_grad()
    gm.setup_loss_call(lambda out, tt: F.cross_entropy(out, tt) * float("nan"), y, t)
    with pytest.warns(NonFiniteCurvatureWarning, match="new statistics of 'conv.weight' at step 1"):
        gm.forward_and_backward()
    assert gm.nonfinite_counts == {"conv.weight": 1, "fc1.weight": 1, "fc2.weight": 1}
    for key in before[0]:
        assert _tree_equal(before[0][key], gm.statistics[key])
        assert _tree_equal(before[1][key], gm.roots[key])  # roots dense or factored [Q, w]


def _tree_equal(a, b) -> bool:
    """Same nesting and bit-equal tensors."""
    la, sa = optree.tree_flatten(a)
    lb, sb = optree.tree_flatten(b)
    return sa == sb and all(torch.equal(x, y) for x, y in zip(la, lb))
