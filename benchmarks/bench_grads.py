"""Issue 2 benchmark: per-sample gradients and their norms vs vmap(grad) and a plain step.

Ratios are to a plain forward+backward of the mean loss measured in the same run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import curvfun
from common import batch, cnn, median_time, mlp, setup, table


def run(kind: str, model) -> dict[str, float]:
    x, y = batch(kind)
    params = dict(model.named_parameters())
    detached = {k: v.detach() for k, v in params.items()}
    N = x.shape[0]

    def plain():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def loss_one(p, xn, yn):
        return F.cross_entropy(functional_call(model, p, (xn.unsqueeze(0),)), yn.unsqueeze(0))

    vg = vmap(grad(loss_one), in_dims=(None, 0, 0))
    buffers = {k: torch.empty(N, *v.shape) for k, v in params.items()}

    t = {
        "plain forward+backward": median_time(plain),
        "vmap(grad) baseline": median_time(lambda: vg(detached, x, y)),
        "per_sample_grads": median_time(lambda: curvfun.per_sample_grads(model, params, x, y)),
        "per_sample_grads(out=reused buffers)": median_time(
            lambda: curvfun.per_sample_grads(model, params, x, y, out=buffers)
        ),
        "per_sample_grad_norms": median_time(lambda: curvfun.per_sample_grad_norms(model, params, x, y)),
    }
    base = t["plain forward+backward"]
    table(f"{kind.upper()} (batch {N}, P = {sum(p.numel() for p in params.values())})",
          [(k, v, v / base) for k, v in t.items()])
    print(f"  per_sample_grads / vmap(grad):            {t['per_sample_grads'] / t['vmap(grad) baseline']:.2f}x "
          f"(with out=: {t['per_sample_grads(out=reused buffers)'] / t['vmap(grad) baseline']:.2f}x)")
    print(f"  per_sample_grad_norms / per_sample_grads: {t['per_sample_grad_norms'] / t['per_sample_grads']:.2f}x")
    return t


def main() -> None:
    setup()
    print("== per-sample gradients (issue 2) ==")
    run("mlp", mlp())
    run("cnn", cnn())


if __name__ == "__main__":
    main()
