"""Shared helper for the "trains the digits MLP to >= 90% test accuracy" tests.

scikit-learn's bundled 8x8 digits (1797 images), standardised, fixed 1397/400 train/test
split, MLP 64-128-10, batch 64, a fixed seed. ``train_digits`` runs the ASDL README loop with
any GradientMaker (or a plain torch optimizer) and returns the test accuracy.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def digits_data(dtype=torch.float32):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=dtype)
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[:1397], perm[1397:]
    return x[tr], y[tr], x[te], y[te]


def digits_mlp(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(dtype)


def train_digits(
    make: Callable[[nn.Module], tuple[torch.optim.Optimizer, object]],
    steps: int = 300,
    batch: int = 64,
    seed: int = 0,
    dtype=torch.float32,
) -> float:
    """``make(model) -> (optimizer, grad_maker)``; grad_maker None means plain backward.
    Returns the test accuracy after ``steps`` steps."""
    xtr, ytr, xte, yte = digits_data(dtype)
    model = digits_mlp(seed, dtype)
    opt, gm = make(model)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(ytr), (batch,), generator=g)
        x, t = xtr[idx], ytr[idx]
        opt.zero_grad()
        if gm is None:
            F.cross_entropy(model(x), t).backward()
        else:
            dummy_y = gm.setup_model_call(model, x)
            gm.setup_loss_call(F.cross_entropy, dummy_y, t)
            gm.forward_and_backward()
        opt.step()
    with torch.no_grad():
        return (model(xte).argmax(1) == yte).float().mean().item()
