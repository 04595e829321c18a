"""Issue 3 benchmark: all K-FAC factors (MC Fisher, one sample) vs a plain forward+backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import curvfun
from common import batch, cnn, median_time, mlp, setup, table


def run(kind: str, model) -> None:
    x, y = batch(kind)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)

    def plain():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    t_plain = median_time(plain)
    t_kfac = median_time(lambda: curvfun.kfac(model, params, x, y, fisher_type="mc", generator=gen))
    t_emp = median_time(lambda: curvfun.kfac(model, params, x, y, fisher_type="emp"))
    t_auto = median_time(lambda: curvfun.kfac(model, params, x, y, fisher_type="mc", generator=gen, form="auto"))
    table(f"{kind.upper()} (batch {x.shape[0]})", [
        ("plain forward+backward", t_plain, 1.0),
        ("kfac (MC, 1 sample): all factors", t_kfac, t_kfac / t_plain),
        ("  form='auto' (wide sides as rows)", t_auto, t_auto / t_plain),
        ("kfac (empirical): all factors", t_emp, t_emp / t_plain),
    ])


def main() -> None:
    setup()
    print("== K-FAC factors (issue 3; target <= 2.0x plain) ==")
    run("mlp", mlp())
    run("cnn", cnn())


if __name__ == "__main__":
    main()
