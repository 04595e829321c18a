"""Issue 5 benchmark: one full training step (forward, backward, curvature, inverse, precondition,
optimizer.step()) of K-FAC (MC, one sample) and low-rank K-FAC (rank 16) at curvature/inverse
interval 1 and 10 (mean over 20 steps after warm-up), as ratios to a plain SGD step."""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn.functional as F

from common import batch, cnn, mlp, setup, table
from curvfun.precondition import (
    GradientMaker,
    KfacGradientMaker,
    LowRankKfacGradientMaker,
    PreconditioningConfig,
)


def mean_step(model, make_gm, x, y, steps: int = 20, warmup: int = 3) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    gm = make_gm(model)

    def step():
        opt.zero_grad()
        d = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, d, y)
        gm.forward_and_backward()
        opt.step()

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def run(kind: str, build) -> None:
    x, y = batch(kind)
    rows = []
    base = mean_step(build(), GradientMaker, x, y)
    rows.append(("SGD step (GradientMaker)", base, 1.0))
    for interval in (1, 10):
        cfg = PreconditioningConfig(damping=1e-2, curvature_upd_interval=interval, preconditioner_upd_interval=interval)
        t = mean_step(build(), lambda m: KfacGradientMaker(m, cfg), x, y)
        rows.append((f"K-FAC (MC 1) interval {interval}", t, t / base))
        t = mean_step(build(), lambda m: KfacGradientMaker(m, cfg, data_space="never"), x, y)
        rows.append((f"  dense factors only (data_space='never')", t, t / base))
        t = mean_step(build(), lambda m: LowRankKfacGradientMaker(m, cfg, rank=16), x, y)
        rows.append((f"low-rank K-FAC (rank 16) interval {interval}", t, t / base))
    table(f"{kind.upper()} (batch {x.shape[0]}, mean of 20 steps)", rows)


def main() -> None:
    setup()
    warnings.simplefilter("ignore")
    print("== training step of the makers (issue 5; targets: K-FAC interval 1 <= 4x SGD on the MLP, "
          "interval 10 <= 1.5x on both) ==")
    run("mlp", mlp)
    run("cnn", cnn)


if __name__ == "__main__":
    main()
