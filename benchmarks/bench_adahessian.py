"""AdaHessian per-step time at update period 1 and 10 against pytorch-optimizer's AdaHessian at the
same period (``pip install pytorch-optimizer``; the section says so and skips those rows when it
is not importable), on the 784-512-512-10 MLP at batch 128 (benchmarks/common.py).

A step is ``zero_grad()``, ``loss.backward(create_graph=...)``, ``step()``. Rows "graph every step"
pass ``create_graph=True`` on every step (the usual loop); rows "graph when needed" pass it only on
the steps that estimate the Hessian (curvfun: ``optimizer.needs_graph()``; pytorch-optimizer: its
schedule, steps 1, k + 1, ...). The variants run interleaved (eleven rounds, one cycle of each per
round: one step at period 1, ten at period 10), medians over rounds of the per-step time after a
warm-up round; ratios against the SGD step, and curvfun against pytorch-optimizer at equal period
and loop.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from bench_others import _interleaved_times
from common import batch, mlp, setup, table
from curvfun.optim import AdaHessian


def _stepper(model, x, t, opt, graph):
    """One training step; ``graph(opt)`` says whether this step's backward keeps the graph."""

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), t).backward(create_graph=graph(opt))
        opt.step()

    return step


def main() -> None:
    setup()
    print("== AdaHessian update period vs pytorch-optimizer (issue 16; target <= 1.0x at equal period) ==")
    torch.manual_seed(0)
    base = mlp()
    x, t = batch("mlp")
    try:
        from pytorch_optimizer import AdaHessian as TheirAdaHessian
    except ImportError:
        TheirAdaHessian = None
        print("  (pytorch-optimizer not importable: pip install pytorch-optimizer; its rows are skipped)")

    def ours(period):
        return lambda ps: AdaHessian(ps, lr=0.01, update_period=period, seed=0)

    def theirs(period):
        return lambda ps: TheirAdaHessian(ps, lr=0.01, update_period=period)

    always = lambda opt: True  # noqa: E731
    # pytorch-optimizer estimates on the calls with (step - 1) % period == 0, step counted from 1
    their_due = lambda opt: opt.param_groups[0].get("step", 0) % opt.update_period == 0  # noqa: E731
    variants = [("SGD step (forward, backward, step)", lambda ps: torch.optim.SGD(ps, lr=0.01), lambda o: False, 1)]
    for period in (1, 10):
        variants.append((f"curvfun AdaHessian, period {period}, graph every step", ours(period), always, period))
        if TheirAdaHessian is not None:
            variants.append((f"pytorch-optimizer AdaHessian, period {period}, graph every step", theirs(period), always, period))
    variants.append(("curvfun AdaHessian, period 10, graph when needed", ours(10), lambda o: o.needs_graph(), 10))
    if TheirAdaHessian is not None:
        variants.append(("pytorch-optimizer AdaHessian, period 10, graph when needed", theirs(10), their_due, 10))
    steps = []
    for _, make, graph, _ in variants:
        model = copy.deepcopy(base)
        steps.append(_stepper(model, x, t, make(model.parameters()), graph))
    secs = _interleaved_times(steps, [c for *_, c in variants], rounds=11)
    table(f"MLP (batch {x.shape[0]}, {torch.get_num_threads()} threads), ratio to SGD",
          [(name, sec, sec / secs[0]) for (name, *_), sec in zip(variants, secs)])
    if TheirAdaHessian is not None:
        by_name = {name: sec for (name, *_), sec in zip(variants, secs)}
        print("\n  curvfun / pytorch-optimizer at equal period and loop:")
        for name, sec in by_name.items():
            if name.startswith("curvfun"):
                other = by_name[name.replace("curvfun", "pytorch-optimizer")]
                print(f"    {name[len('curvfun AdaHessian, '):]:<36} {sec / other:.2f}x")


if __name__ == "__main__":
    main()
