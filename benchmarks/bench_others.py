"""Issue 6 benchmark: per-step time of Shampoo (interval 1 and 10) and SMW-NG against a plain SGD
step, and eigh inverse roots against a coupled Newton iteration (the kind of root ASDL uses).

A "step" is what the training loop does: ``optimizer.zero_grad()``, the gradient (plain backward, or
the maker's ``forward_and_backward()``), ``optimizer.step()``. The variants run interleaved (one
cycle of each in turn, seven rounds after a warm-up round), so that load changes on a shared machine
hit all of them alike; a cycle is one step, or a whole 10-step cycle for the interval-10 schedule
(refresh included); times are medians over rounds per step, ratios against the SGD step of the same
model in the same run.

Where the time goes (MLP, 2 threads, profiled). ``root_method="eigh"`` at interval 1: most of a
step is the six eigendecompositions (784, 5 x 512, 10): LAPACK's ``eigh`` takes ~58 ms at 784 and
~22 ms at 512 on this CPU, ~20 SGD steps together, which no exact per-step decomposition avoids.
``root_method="warm"`` refreshing the basis on every step (one subspace step: Y = M Q, QR,
Rayleigh quotients) saves only ~10%: Householder QR costs about a third of an ``eigh`` (784: 21 vs
58 ms), plus two products per factor. What brings interval 1 under 10x is keeping the basis
between subspace steps (``basis_every``; SOAP refreshes its basis every 10 steps) and refreshing
only the eigenvalues on the other steps, from the rotated gradient the preconditioning needs anyway
(see ``curvfun.precondition.shampoo``), together with the data-space route (``data_space="auto"``,
the default): the MLP's two wide layers (batch 128 against widths 512 / 784) take their statistics
gᵀ(a aᵀ)g, aᵀ(g gᵀ)a, their rotated gradient and their preconditioned gradient through the 128
rows, about a third of the products on the formed 512 x 784 gradient. The ``data_space='never'``
rows show the same variants on the formed gradient. The CNN's Linear head has a 4096 x 4096 right
Shampoo factor (one eigh(4096) per refresh), so the CNN rows use ``block_size=512``; its layers
are convolutions and a 10-row head, where the rows route does not pay (``rows_pay``).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn.functional as F

from common import batch, cnn, median_time, mlp, setup, table
from curvfun.precondition import PreconditioningConfig, ShampooGradientMaker, SmwEmpNaturalGradientMaker
from curvfun.roots import inverse_root

def _interleaved_times(steps: list, cycles: list[int], rounds: int) -> list[float]:
    """Per-step seconds of each variant: in every round each variant runs one cycle (``cycles[i]``
    consecutive steps) in turn, so that a change of machine load hits all variants alike; the
    median over rounds of cycle time / cycle length. One warm-up round (at least two steps each)."""
    for step, cycle in zip(steps, cycles):
        for _ in range(max(cycle, 2)):
            step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(rounds):
        for i, (step, cycle) in enumerate(zip(steps, cycles)):
            t0 = time.perf_counter()
            for _ in range(cycle):
                step()
            times[i].append((time.perf_counter() - t0) / cycle)
    return [statistics.median(ts) for ts in times]


def _stepper(model, x, t, gm):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        if gm is None:
            F.cross_entropy(model(x), t).backward()
        else:
            y = gm.setup_model_call(model, x)
            gm.setup_loss_call(F.cross_entropy, y, t)
            gm.forward_and_backward()
        opt.step()

    return step


def run(kind: str, base) -> dict:
    x, t = batch(kind)
    block = 512 if kind == "cnn" else -1
    tag = " (block 512)" if block > 0 else ""

    def shampoo(interval, **kw):
        cfg = PreconditioningConfig(damping=1e-4, preconditioner_upd_interval=interval)
        return lambda m: ShampooGradientMaker(m, cfg, block_size=block, **kw)

    variants = [  # (name, maker, cycle)
        ("SGD step (forward, backward, step)", None, 1),
        (f"Shampoo eigh interval 1{tag}", shampoo(1), 1),
        (f"Shampoo eigh interval 10{tag}", shampoo(10), 10),
        (f"Shampoo warm interval 1{tag}", shampoo(1, root_method="warm"), 1),
        (f"Shampoo warm interval 10{tag}", shampoo(10, root_method="warm"), 10),
        (f"Shampoo warm interval 1, basis every 10{tag}", shampoo(1, root_method="warm", basis_every=10), 10),
        (f"Shampoo warm interval 1, basis every 20{tag}", shampoo(1, root_method="warm", basis_every=20), 20),
        ("SMW empirical NG (damping 1e-3)", lambda m: SmwEmpNaturalGradientMaker(m, PreconditioningConfig(damping=1e-3)), 1),
    ]
    if kind == "mlp":  # the CNN has no layer where the rows route pays
        variants[-1:-1] = [
            ("  formed gradient (data_space='never'): eigh interval 1", shampoo(1, data_space="never"), 1),
            ("  formed gradient (data_space='never'): eigh interval 10", shampoo(10, data_space="never"), 10),
            ("  formed gradient (data_space='never'): warm, basis every 10",
             shampoo(1, root_method="warm", basis_every=10, data_space="never"), 10),
        ]
    steps = []
    for _, make, _ in variants:
        model = copy.deepcopy(base)
        steps.append(_stepper(model, x, t, None if make is None else make(model)))
    secs = _interleaved_times(steps, [c for _, _, c in variants], rounds=7)
    rows = [(name, sec, sec / secs[0]) for (name, _, _), sec in zip(variants, secs)]
    table(f"{kind.upper()} (batch {x.shape[0]}, {torch.get_num_threads()} threads)", rows)
    return {name: ratio for name, _, ratio in rows}


def coupled_newton_inverse_root(A: torch.Tensor, p: int, tol: float = 1e-6, max_iter: int = 100) -> torch.Tensor:
    """A^{-1/p} by the coupled Newton iteration (Guo & Higham 2006), for comparison only:
    X ← X((p+1)I − M)/p, M ← (((p+1)I − M)/p)^p M from X = z^{1/p} I, M = zA, z = (1+p)/(2‖A‖_F)."""
    d = A.shape[0]
    eye = torch.eye(d, dtype=A.dtype)
    z = (1 + p) / (2 * torch.linalg.matrix_norm(A))
    X, M = eye * z ** (1.0 / p), A * z
    err = (M - eye).abs().max()
    for _ in range(max_iter):
        if err <= tol:
            break
        T = ((p + 1) * eye - M) / p
        X_new, M_new = X @ T, torch.linalg.matrix_power(T, p) @ M
        new_err = (M_new - eye).abs().max()
        if new_err > 1.2 * err:
            break
        X, M, err = X_new, M_new, new_err
    return X


def roots(model) -> None:
    """eigh vs coupled Newton on the MLP's own Shampoo statistics after 5 steps."""
    x, t = batch("mlp")
    gm = ShampooGradientMaker(model, PreconditioningConfig(damping=1e-4), block_size=-1)
    step = _stepper(model, x, t, gm)
    for _ in range(5):
        step()
    rows = []
    for key, label in (("0.weight", "layer 1"),):
        for side, S in zip(("L", "R"), gm.statistics[key][0]):
            ridge = 1e-4 * torch.linalg.eigvalsh(S).max()
            Sd = S + ridge * torch.eye(S.shape[0])
            t_e = median_time(lambda: inverse_root(S, 4, 1e-4, relative=True), warmup=1, repeat=3)
            t_n = median_time(lambda: coupled_newton_inverse_root(Sd, 4), warmup=0, repeat=1)
            R = coupled_newton_inverse_root(Sd, 4)
            err = (torch.linalg.matrix_power(R, 4) @ Sd - torch.eye(S.shape[0])).abs().max().item()
            rows.append((f"{label} {side} ({S.shape[0]}x{S.shape[0]}) eigh", t_e, 1.0))
            rows.append((f"{label} {side} coupled Newton (max|R^4 S - I| {err:.0e})", t_n, t_n / t_e))
    table("inverse 4th root of one Shampoo factor (ratio to eigh)", rows)


def fidelity(base, steps: int = 60) -> None:
    """How far the cheaper root methods' steps are from exact Shampoo (eigh every step) on the MLP:
    every variant sees the exact run's parameters and batches (so all keep the same statistics);
    the relative distance ‖G̃_variant − G̃_eigh‖ / ‖G̃_eigh‖ over all preconditioned weight
    gradients, per step, median and max over steps 6.. and over the last 20. For scale: the
    exact roots refreshed every 10 steps instead of every step (statistics still every step)."""
    gen = torch.Generator().manual_seed(0)
    cfg = PreconditioningConfig(damping=1e-4)
    variants = {"eigh": {}, "warm, basis every step": dict(root_method="warm"),
                "warm, basis every 10": dict(root_method="warm", basis_every=10),
                "warm, basis every 20": dict(root_method="warm", basis_every=20),
                "eigh, roots every 10 steps": dict(config=PreconditioningConfig(
                    damping=1e-4, curvature_upd_interval=1, preconditioner_upd_interval=10))}
    models = {k: copy.deepcopy(base) for k in variants}
    makers = {k: ShampooGradientMaker(models[k], kw.pop("config", cfg), **kw) for k, kw in variants.items()}
    opt = torch.optim.SGD(models["eigh"].parameters(), lr=0.01)
    errs: dict[str, list[float]] = {k: [] for k in variants if k != "eigh"}
    for step in range(steps):
        x, t = torch.randn(128, 784, generator=gen), torch.randint(0, 10, (128,), generator=gen)
        grads = {}
        for k, m in models.items():
            if k != "eigh":
                m.load_state_dict(models["eigh"].state_dict())
            m.zero_grad(set_to_none=True)
            y = makers[k].setup_model_call(m, x)
            makers[k].setup_loss_call(F.cross_entropy, y, t)
            makers[k].forward_and_backward()
            grads[k] = torch.cat([p.grad.flatten() for n, p in m.named_parameters() if n.endswith("weight")])
        if step >= 5:
            for k in errs:
                errs[k].append(float((grads[k] - grads["eigh"]).norm() / grads["eigh"].norm()))
        opt.step()
    print(f"\nShampoo step vs exact eigh roots every step (MLP; relative distance of the preconditioned "
          f"weight gradients; steps 6-{steps} | last 20)")
    for k, e in errs.items():
        print(f"  {k:<28} median {statistics.median(e):.3f}  max {max(e):.3f}  |  median "
              f"{statistics.median(e[-20:]):.3f}  max {max(e[-20:]):.3f}")


def main() -> None:
    setup()
    print("== Shampoo and SMW-NG per-step time (issue 6; target: Shampoo interval 1 <= 10x SGD on the MLP) ==")
    torch.manual_seed(0)
    run("mlp", mlp())
    torch.manual_seed(0)
    run("cnn", cnn())
    torch.manual_seed(0)
    roots(mlp())
    torch.manual_seed(0)
    fidelity(mlp())


if __name__ == "__main__":
    main()
