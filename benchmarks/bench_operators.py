"""Operators benchmark: the top 5 eigenvalues of the GGN of the benchmark MLP (784-512-512-10,
batch 128, cross-entropy, 1 thread).

Rows (median seconds after a warm-up, ratio against scipy's ``eigsh(k=5)`` on curvlinops'
``GGNLinearOperator`` where curvlinops is importable, else against ``eigsh`` on curvfun's own
operator; a forward+backward of the same batch is shown as a second scale):

* ``top_eigenvalues(k=5)`` of ``curvfun.operators.GGNOperator`` (Lanczos on the operator, one
  linearisation reused, stopped on the Ritz residuals);
* ``top_eigenvalues(k=5)`` of a closure over ``ggn_vp`` (recomputes the forward on every product);
* ``eigsh(k=5)`` on ``GGNOperator.to_scipy()`` and on curvlinops' ``GGNLinearOperator.to_scipy()``;
* the construction of ``GGNOperator`` (the forward, its vjp closure, the probe product and the
  output Hessians), paid once per batch and not included in the rows above.

Each row also gives the number of products and the largest relative difference of its five
eigenvalues from curvlinops' (or curvfun's) ``eigsh``. curvlinops is a benchmark-only dependency
(``pip install --no-deps curvlinops-for-pytorch`` next to the CPU torch; its extra imports:
einops, backpack-for-pytorch, unfoldNd, einconv, linear_operator, jaxtyping); the row is
skipped when it does not import.
"""

from __future__ import annotations

import torch

from common import batch, median_time, mlp, setup, table

import curvfun
from curvfun.operators import GGNOperator


class _Counting:
    """A scipy LinearOperator wrapper counting matrix-vector products (columns)."""

    def __init__(self, lo):
        from scipy.sparse.linalg import LinearOperator

        self.n = 0

        def mv(v):
            self.n += 1 if v.ndim == 1 else v.shape[1]
            return lo.matmat(v.reshape(lo.shape[0], -1)).reshape(v.shape)

        self.op = LinearOperator(lo.shape, matvec=mv, rmatvec=mv, matmat=mv, dtype=lo.dtype)


def main() -> None:
    from scipy.sparse.linalg import eigsh

    setup(threads=1)
    model = mlp()
    x, y = batch("mlp")
    params = dict(model.named_parameters())

    def fwd_bwd():
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()

    base_fb = median_time(fwd_bwd, 3, 10)

    rows: dict[str, tuple[float, int, torch.Tensor]] = {}

    def run(name, fn, count):
        vals = None

        def go():
            nonlocal vals
            vals = fn()

        t = median_time(go, 1, 3)
        rows[name] = (t, count(), torch.as_tensor(sorted(vals, reverse=True)[:5], dtype=torch.float64))

    build = median_time(lambda: GGNOperator(model, params, x, y), 1, 3)
    op = GGNOperator(model, params, x, y)
    n_op = [0]

    orig = op._matmat

    def counted(X):
        n_op[0] += X.shape[1]
        return orig(X)

    op._matmat = counted

    def ours():
        n_op[0] = 0
        return top_vals(curvfun.top_eigenvalues(op, k=5)[0])

    def top_vals(v):
        return [float(t) for t in v]

    run("top_eigenvalues(k=5), GGNOperator", ours, lambda: n_op[0])
    n_vp = [0]

    def ggn_closure(v):
        n_vp[0] += 1
        return curvfun.ggn_vp(model, params, x, y, v)

    def closure_run():
        n_vp[0] = 0
        return top_vals(curvfun.top_eigenvalues(ggn_closure, params, k=5)[0])

    run("top_eigenvalues(k=5), ggn_vp closure", closure_run, lambda: n_vp[0])
    sc = _Counting(op.to_scipy())

    def eigsh_ours():
        sc.n = 0
        return list(eigsh(sc.op, k=5, which="LA", return_eigenvectors=False))

    run("eigsh(k=5), GGNOperator.to_scipy()", eigsh_ours, lambda: sc.n)
    baseline = "eigsh(k=5), GGNOperator.to_scipy()"
    try:
        from curvlinops import GGNLinearOperator
    except Exception as e:  # noqa: BLE001 - benchmark-only dependency
        print(f"\n[curvlinops not importable ({type(e).__name__}: {e}); its row is skipped]")
    else:
        cl = GGNLinearOperator(model, torch.nn.CrossEntropyLoss(), list(model.parameters()), [(x, y)],
                               check_deterministic=False).to_scipy()
        cc = _Counting(cl)

        def eigsh_cl():
            cc.n = 0
            return list(eigsh(cc.op, k=5, which="LA", return_eigenvectors=False))

        run("eigsh(k=5), curvlinops GGNLinearOperator", eigsh_cl, lambda: cc.n)
        baseline = "eigsh(k=5), curvlinops GGNLinearOperator"
    ref_t, _, ref_vals = rows[baseline]
    print(f"\nTop-5 GGN eigenvalues, MLP 784-512-512-10, batch 128, 1 thread; ratios against {baseline}; "
          f"forward+backward {base_fb * 1e3:.2f} ms")
    table("top eigenvalues", [(name, t, t / ref_t) for name, (t, _, _) in rows.items()]
          + [("GGNOperator(...) construction (once per batch)", build, build / ref_t)])
    print(f"  {'what':<44} {'products':>10} {'x fwd+bwd':>10} {'max rel. diff':>14}")
    for name, (t, n, vals) in rows.items():
        diff = float(((vals - ref_vals).abs() / ref_vals.abs()).max())
        print(f"  {name:<44} {n:>10d} {t / base_fb:>10.1f} {diff:>14.2e}")


if __name__ == "__main__":
    main()
