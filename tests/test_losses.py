"""The likelihoods' sampling (MC Fisher columns): cross-entropy draws classes with the softmax's
probabilities, never a class of probability 0, uniformly on a row with non-finite logits, in the
shape ``[M, *positions]``, reproducibly from a generator."""

from __future__ import annotations

import torch

from curvfun.losses import get_likelihood


def test_cross_entropy_samples_follow_the_softmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, dtype=torch.float64)
    logits[1, 2] = float("-inf")  # probability 0
    M = 200_000
    draws = get_likelihood("cross_entropy").sample(logits, M, torch.Generator().manual_seed(1))
    assert draws.shape == (M, 3) and draws.dtype == torch.int64
    p = torch.softmax(logits, -1)
    for r in range(3):
        freq = torch.bincount(draws[:, r], minlength=5).to(torch.float64) / M
        sd = (p[r] * (1 - p[r]) / M).sqrt()
        assert ((freq - p[r]).abs() <= 5 * sd + 1e-12).all(), (r, freq, p[r])
    assert not (draws[:, 1] == 2).any()


def test_cross_entropy_samples_are_reproducible_and_uniform_on_non_finite_rows():
    lik = get_likelihood("cross_entropy")
    logits = torch.randn(2, 4, 3, dtype=torch.float64)
    logits[1, 0] = float("nan")
    a = lik.sample(logits, 4000, torch.Generator().manual_seed(7))
    b = lik.sample(logits, 4000, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (4000, 2, 4)
    freq = torch.bincount(a[:, 1, 0], minlength=3) / 4000
    assert ((freq - 1 / 3).abs() < 0.05).all(), freq
