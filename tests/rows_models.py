"""Models that exercise the data-space ("rows") route of K-FAC and Shampoo at its edges: Linear
subclasses it must leave alone, keyword inputs, outputs that miss the loss, calls whose bias
gradients cancel (tests/test_kron_rows.py, tests/test_shampoo_rows.py)."""

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Linear):
    """A Linear subclass with its own forward and two extra trainable parameters (a low-rank
    adapter): not a plain nn.Linear, so no rows route."""

    def __init__(self, d_in, d_out, rank=2):
        super().__init__(d_in, d_out)
        self.A = nn.Parameter(0.1 * torch.randn(rank, d_in))
        self.B = nn.Parameter(0.1 * torch.randn(d_out, rank))

    def forward(self, x):
        return F.linear(x, self.weight + self.B @ self.A, self.bias)


class CentredWeightLinear(nn.Linear):
    """A Linear subclass without extra parameters whose forward uses its weight differently (rows
    centred, as in weight standardization): gᵀa is not its weight's gradient."""

    def forward(self, x):
        return F.linear(x, self.weight - self.weight.mean(1, keepdim=True), self.bias)


class KeywordCall(nn.Module):
    """fc1 called with its input as a keyword (``self.fc1(input=x)``)."""

    def __init__(self, d_in, d_hidden, d_out):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(input=x)))


class Detached(nn.Module):
    """aux is called but its output does not reach the loss (e.g. kept for logging)."""

    def __init__(self, d_in, d_hidden, d_out):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.aux = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        self.last_aux = self.aux(x).detach()
        return self.fc2(torch.tanh(self.fc1(x)))


class Siamese(nn.Module):
    """head(enc(x₁) − enc(x₂)) on x ``[N, 2, d_in]``: enc's bias gradient is exactly zero (its two
    calls cancel)."""

    def __init__(self, d_in, d_hidden, d_out):
        super().__init__()
        self.enc = nn.Linear(d_in, d_hidden)
        self.head = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.head(torch.tanh(self.enc(x[:, 0]) - self.enc(x[:, 1])))
