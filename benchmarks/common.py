"""Shared benchmark helpers: fixed threads, median-after-warm-up timing, the reference models."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def setup(threads: int = 2, seed: int = 0) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)


def median_time(fn, warmup: int = 3, repeat: int = 10) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def mlp() -> nn.Module:
    """784-512-512-10 MLP (the issues' reference MLP)."""
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def cnn() -> nn.Module:
    """Two 3x3 convs (32, 64 channels) on 32x32x3, each followed by ReLU and 2x2 max-pool, then a Linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 10),
    )


def batch(kind: str, n: int = 128):
    if kind == "mlp":
        return torch.randn(n, 784), torch.randint(0, 10, (n,))
    return torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))


def table(title: str, rows: list[tuple[str, float, float]]) -> None:
    """Print rows of (name, seconds, ratio)."""
    print(f"\n{title}")
    width = max([44] + [len(name) for name, _, _ in rows])
    print(f"  {'what':<{width}} {'median ms':>10} {'ratio':>8}")
    for name, sec, ratio in rows:
        print(f"  {name:<{width}} {sec * 1e3:>10.2f} {ratio:>8.2f}x")
