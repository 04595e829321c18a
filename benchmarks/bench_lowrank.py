"""Issue 4 benchmark: low-rank(+diag) K-FAC vs dense K-FAC for one Linear layer.

d_in = d_out = 2048, N = 256 captured rows, rank 16, float32, threads fixed (2 by default;
``python benchmarks/bench_lowrank.py --threads 1`` for one).

(a) refresh: low-rank factors + their Woodbury cores (warm-started from the previous refresh,
    a fresh batch of rows each time) vs forming both dense factors and their damped Cholesky
    inverses;
(b) apply: precondition one weight gradient, (B̃+δ_B)⁻¹ G (Ã+δ_A)⁻¹ vs B⁻¹ G A⁻¹ (dense);
(c) memory held after a refresh (bytes): LowRankKron.nbytes() vs the two dense inverses.

Ratios are dense / low-rank (higher is better for low-rank); medians after warm-up, the
contenders timed in turn (round-robin) so that both see the same machine load.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import setup  # noqa: E402

from curvfun.lowrank import LowRankKron, pi_damping  # noqa: E402

D_IN = D_OUT = 2048
N = 256
RANK = 16
DAMPING = 1e-3
POWER_ITERS = 10
POWER_TOL = 1e-2  # relative Ritz residual; warm starts usually meet it in 1-3 iterations
N_BATCHES = 8


def _interleaved_medians(fns: dict, warmup: int, rounds: int, inner: dict | None = None) -> dict:
    """Median seconds of each fn, the fns run in turn (round-robin, ``inner[name]`` calls of fn
    per round) so that all of them see the same machine load; ``warmup`` untimed rounds first."""
    inner = inner or {}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(inner.get(name, 1)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _row_source(d: int, gen: torch.Generator, top: int = 64):
    """Rows = (a few strong, slowly rotating-free directions) + isotropic noise: a decaying spectrum
    whose top subspace is shared by consecutive batches, as for a layer during training."""
    Q = torch.linalg.qr(torch.randn(d, top, generator=gen)).Q
    s = 10.0 * 0.85 ** torch.arange(top, dtype=torch.float32)

    def draw() -> torch.Tensor:
        return (torch.randn(N, top, generator=gen) * s) @ Q.T + 0.3 * torch.randn(N, d, generator=gen)

    return draw


def _dense_refresh(a_rows: torch.Tensor, g_rows: torch.Tensor):
    A = a_rows.T @ a_rows / N
    B = g_rows.T @ g_rows / N
    da, db = pi_damping(float(torch.trace(A)), D_IN, float(torch.trace(B)), D_OUT, DAMPING)
    A.diagonal().add_(da)
    B.diagonal().add_(db)
    A_inv = torch.cholesky_inverse(torch.linalg.cholesky(A))
    B_inv = torch.cholesky_inverse(torch.linalg.cholesky(B))
    return A_inv, B_inv


def main(threads: int | None = None) -> None:
    """Run at ``threads`` intra-op threads (default 2, the suite's setting; ``--threads N`` on
    the command line)."""
    if threads is None:
        threads = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 2
    setup(threads=threads)
    torch.set_default_dtype(torch.float32)
    gen = torch.Generator().manual_seed(0)
    draw_a, draw_g = _row_source(D_IN, gen), _row_source(D_OUT, gen)
    batches = [(draw_a(), 1e-2 * draw_g()) for _ in range(N_BATCHES)]
    G = torch.randn(D_OUT, D_IN, generator=gen)

    print(f"== low-rank K-FAC (issue 4): Linear {D_IN}->{D_OUT}, N={N}, rank={RANK}, float32, "
          f"{torch.get_num_threads()} threads; targets: refresh >= 20x, apply >= 5x, memory O(d*k) ==")

    # --- (a) refresh -------------------------------------------------------------------------
    state = {"i": 0, "prev": None, "iters": []}

    def lowrank_refresh():
        a, g = batches[state["i"] % N_BATCHES]
        state["i"] += 1
        K = LowRankKron.from_rows(a, g, RANK, DAMPING, 1.0 / N, 1.0 / N, power_iters=POWER_ITERS,
                                  power_tol=POWER_TOL, init=state["prev"], generator=gen)
        state["prev"] = K
        state["iters"].append(K.iterations)
        return K

    dense_state = {"i": 0}

    def dense_refresh():
        a, g = batches[dense_state["i"] % N_BATCHES]
        dense_state["i"] += 1
        return _dense_refresh(a, g)

    cold_iters = []

    def cold_refresh():
        K = LowRankKron.from_rows(*batches[0], RANK, DAMPING, 1.0 / N, 1.0 / N, power_iters=POWER_ITERS,
                                  power_tol=POWER_TOL, generator=gen)
        cold_iters.append(K.iterations)

    # several low-rank refreshes per dense one (they are cheap); the warm-start chain runs
    # through a new batch at every call
    t = _interleaved_medians({"dense": dense_refresh, "warm": lowrank_refresh, "cold": cold_refresh},
                             warmup=2, rounds=7, inner={"warm": 4, "cold": 4})
    t_dense_refresh, t_low_refresh, t_cold_refresh = t["dense"], t["warm"], t["cold"]
    warm_iters = state["iters"][2:]
    cold = cold_iters

    # --- (b) apply -----------------------------------------------------------------------------
    K = state["prev"]
    A_inv, B_inv = _dense_refresh(*batches[(state["i"] - 1) % N_BATCHES])
    t = _interleaved_medians({"dense": lambda: B_inv @ G @ A_inv, "low": lambda: K.matvec({"weight": G})},
                             warmup=2, rounds=7, inner={"low": 4})
    t_dense_apply, t_low_apply = t["dense"], t["low"]

    # --- (c) memory ----------------------------------------------------------------------------
    dense_bytes = A_inv.numel() * A_inv.element_size() + B_inv.numel() * B_inv.element_size()
    low_bytes = K.nbytes()
    dk_floats = (D_IN + D_OUT) * RANK

    # quality, for context (not a target): top-k eigenvalues of A vs dense eigvalsh, and the
    # angle between the preconditioned gradients
    a_last = batches[(state["i"] - 1) % N_BATCHES][0].double()
    ev = torch.linalg.eigvalsh(a_last.T @ a_last / N).flip(0)[:RANK]
    ev_err = float(((K.a_eigenvalues.double() - ev).abs() / ev).max())
    p_low = K.matvec({"weight": G})["weight"].double().reshape(-1)
    p_dense = (B_inv @ G @ A_inv).double().reshape(-1)
    cos = float(p_low @ p_dense / (p_low.norm() * p_dense.norm()))

    print("\n(a) refresh factors + inverses")
    print(f"  {'dense: 2 factors + damped Cholesky inverses':<52} {t_dense_refresh * 1e3:>9.2f} ms")
    print(f"  {'low-rank, warm-started':<52} {t_low_refresh * 1e3:>9.2f} ms   ratio {t_dense_refresh / t_low_refresh:>7.1f}x")
    print(f"  {'low-rank, cold start (random init)':<52} {t_cold_refresh * 1e3:>9.2f} ms   ratio {t_dense_refresh / t_cold_refresh:>7.1f}x")
    mean_w = tuple(round(sum(it[j] for it in warm_iters) / len(warm_iters), 1) for j in range(2))
    mean_c = tuple(round(sum(it[j] for it in cold) / len(cold), 1) for j in range(2))
    print(f"  power iterations (A, B) to rel. residual {POWER_TOL:g}, cap {POWER_ITERS}: warm {mean_w}, cold {mean_c}")
    print("\n(b) precondition one weight gradient")
    print(f"  {'dense: B^-1 G A^-1':<52} {t_dense_apply * 1e3:>9.2f} ms")
    print(f"  {'low-rank: LowRankKron.matvec':<52} {t_low_apply * 1e3:>9.2f} ms   ratio {t_dense_apply / t_low_apply:>7.1f}x")
    print("\n(c) memory held after a refresh")
    print(f"  {'dense: A^-1 and B^-1':<52} {dense_bytes:>12,d} B")
    print(f"  {'low-rank: LowRankKron.nbytes()':<52} {low_bytes:>12,d} B   ratio {dense_bytes / low_bytes:>7.1f}x")
    print(f"  low-rank bytes / (4 * (d_in + d_out) * k) = {low_bytes / (4 * dk_floats):.2f}  (O(d*k))")
    print("\n(context) top-16 eigenvalues of A: max rel. error "
          f"{ev_err:.2e}; cos(low-rank, dense preconditioned gradient) = {cos:.3f}"
          f"; B-side shrink factor {K.shrink:.3f}; damping (A, B) = ({K.damping_a:.3g}, {K.damping_b:.3g})")
    assert math.isfinite(t_low_refresh)


if __name__ == "__main__":
    main()
