"""The per-step boundary checks of the makers (:func:`curvfun.precondition.guards.check_step`:
config, own settings and model compared by tuples of values and identities) as a fraction of the
step they guard: K-FAC at interval 10 (its cheapest steps) on the reference MLP, and on a deep
narrow MLP (100 Linear(64, 64) layers, batch 32) where the check, O(#modules + #parameters), is
largest relative to the arithmetic. Median after warm-up; the step is measured in the same run."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from common import batch, median_time, mlp, setup, table
from curvfun.precondition import KfacGradientMaker, PreconditioningConfig
from curvfun.precondition import guards


def one(name: str, model: nn.Module, x, y) -> list[tuple[str, float, float]]:
    cfg = PreconditioningConfig(damping=1e-2, curvature_upd_interval=10, preconditioner_upd_interval=10)
    gm = KfacGradientMaker(model, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad()
        d = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, d, y)
        gm.forward_and_backward()
        opt.step()

    t_step = median_time(step, warmup=12, repeat=30)
    t_check = median_time(lambda: guards.check_step(gm), warmup=10, repeat=200)
    return [(f"{name}: K-FAC step, interval 10", t_step, 1.0),
            (f"{name}: guards.check_step (nothing changed)", t_check, t_check / t_step)]


def main() -> None:
    setup()
    warnings.simplefilter("ignore")
    print("== per-step boundary checks of the makers (issue 15) ==")
    x, y = batch("mlp")
    rows = one("MLP 784-512-512-10, batch 128", mlp(), x, y)
    deep = nn.Sequential(*[m for _ in range(100) for m in (nn.Linear(64, 64), nn.ReLU())])
    rows += one("100 x Linear(64, 64), batch 32", deep, torch.randn(32, 64), torch.randint(0, 64, (32,)))
    table("check_step time as a fraction of the step", rows)
    for name, sec, ratio in rows[1::2]:
        print(f"  {name}: {sec * 1e6:.1f} us, {ratio:.1e} of the step")


if __name__ == "__main__":
    main()
