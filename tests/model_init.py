"""Deterministic float64 parameters for the Kronecker-factor tests (shared by tests/test_kron*.py)."""

from __future__ import annotations

import torch


def generator(seed) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def init_float64(model, seed, scale: float = 0.8):
    """``model`` in float64 with every parameter drawn from N(0, scale²) by a generator seeded ``seed``."""
    g = generator(seed)
    model.to(torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model
