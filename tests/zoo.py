"""Models people bring, for the layer-registry tests: one builder per architecture, float64,
seeded. Each returns ``(model, inputs, targets, n_classes)``; targets are class indices."""

from __future__ import annotations

import torch
from torch import nn

DT = torch.float64


class LastStep(nn.Module):
    """``out[0][:, -1]`` of an RNN's ``(output, state)`` tuple (batch first)."""

    def forward(self, out):
        return out[0][:, -1]


class GPTBlock(nn.Module):
    """Token + position embedding, one ``nn.TransformerEncoderLayer`` (causal), LayerNorm, head."""

    def __init__(self, vocab=11, d=8, heads=2, T=5, tied=False):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(T, d))
        self.block = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.ln = nn.LayerNorm(d)
        self.tied = tied
        self.head = None if tied else nn.Linear(d, vocab)
        self.register_buffer("mask", torch.ones(T, T, dtype=torch.bool).triu(1))

    def forward(self, ids):
        h = self.tok(ids) + self.pos[: ids.shape[1]]
        h = self.ln(self.block(h, src_mask=self.mask, is_causal=True))[:, -1]
        return h @ self.tok.weight.T if self.tied else self.head(h)


class HandAttention(nn.Module):
    """Self-attention written with Linears (q, k, v, out) and a softmax."""

    def __init__(self, d=6, classes=3):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        s = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / x.shape[-1] ** 0.5, -1)
        return self.head(self.o(s @ self.v(x)).mean(1))


class DecoderBlock(nn.Module):
    """A TransformerDecoderLayer attending to a shorter memory made from the first tokens
    (self-attention over T = 5, cross-attention to S = 3), pooled, linear head."""

    def __init__(self, d=6, classes=3):
        super().__init__()
        self.mem = nn.Linear(d, d)
        self.dec = nn.TransformerDecoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.dec(x, torch.tanh(self.mem(x[:, :3]))).mean(1))


class CrossKV(nn.Module):
    """Three queries made from the first tokens attend to the raw tokens through a
    MultiheadAttention with separate q/k/v weights (kdim = vdim = 5 ≠ E = 4), learned ``bias_k`` /
    ``bias_v``, a zero key, sequence-first, the last token padded out; pooled, linear head."""

    def __init__(self, c=5, d=4, classes=3):
        super().__init__()
        self.q = nn.Linear(c, d)
        self.att = nn.MultiheadAttention(d, 2, kdim=c, vdim=c, add_bias_kv=True, add_zero_attn=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        q = torch.tanh(self.q(x[:, :3])).transpose(0, 1)
        kv = x.transpose(0, 1)
        pad = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
        pad[:, -1] = True
        out, _ = self.att(q, kv, torch.tanh(kv), key_padding_mask=pad)
        return self.head(out.mean(0))


class UNetLike(nn.Module):
    """Conv down (stride 2), ConvTranspose2d up, a skip connection, 1x1 conv head."""

    def __init__(self, c=2, classes=3):
        super().__init__()
        self.down = nn.Conv2d(c, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, c, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Conv2d(2 * c, classes, 1)

    def forward(self, x):
        y = self.up(torch.tanh(self.down(x)))
        return self.head(torch.cat([x, y], 1)).mean((2, 3))


class ResBlockNet(nn.Module):
    """Conv -> BatchNorm2d -> ReLU with a residual, pooled, linear head (eval-mode BN)."""

    def __init__(self, c=3, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.bn(self.conv(h)))
        return self.head(h.mean((2, 3)))


def _ids(n, T, V, g):
    return torch.randint(0, V, (n, T), generator=g)


def build(name: str, n: int = 4, seed: int = 0):
    """The zoo model ``name`` (see :data:`NAMES`) with a batch of ``n`` samples."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if name == "gpt":
        model, x, C = GPTBlock(), _ids(n, 5, 11, g), 11
    elif name == "gpt_tied":
        model, x, C = GPTBlock(tied=True), _ids(n, 5, 11, g), 11
    elif name == "decoder":
        model, x, C = DecoderBlock(), torch.randn(n, 5, 6, generator=g), 3
    elif name == "cross_kv":
        model, x, C = CrossKV(), torch.randn(n, 4, 5, generator=g), 3
    elif name == "hand_attention":
        model, x, C = HandAttention(), torch.randn(n, 4, 6, generator=g), 3
    elif name == "lstm":
        model, x, C = nn.Sequential(nn.LSTM(3, 5, batch_first=True), LastStep(), nn.Linear(5, 3)), torch.randn(n, 4, 3, generator=g), 3
    elif name == "conv1d":
        model = nn.Sequential(nn.Conv1d(2, 3, 3, padding="same"), nn.Tanh(), nn.Conv1d(3, 4, 2, stride=2, groups=1),
                              nn.Flatten(), nn.Linear(12, 3))
        x, C = torch.randn(n, 2, 6, generator=g), 3
    elif name == "conv3d":
        model = nn.Sequential(nn.Conv3d(1, 2, 2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4 * 3, 3))
        x, C = torch.randn(n, 1, 3, 3, 2, generator=g), 3
    elif name == "unet":
        model, x, C = UNetLike(), torch.randn(n, 2, 4, 4, generator=g), 3
    elif name == "resnet_bn":
        model, x, C = ResBlockNet(), torch.randn(n, 1, 4, 4, generator=g), 3
    elif name == "frozen_weight":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        model[0].weight.requires_grad_(False)
        x, C = torch.randn(n, 4, generator=g), 3
    elif name == "frozen_bias":
        model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 3))
        model[0].bias.requires_grad_(False)
        x, C = torch.randn(n, 1, 4, 4, generator=g), 3
    else:
        raise KeyError(name)
    model = model.to(DT)
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g, dtype=DT))
                m.running_var.copy_(1 + 0.3 * torch.rand(m.num_features, generator=g, dtype=DT))
                m.weight.add_(0.2 * torch.randn(m.num_features, generator=g, dtype=DT))
    model.eval()
    if x.is_floating_point():
        x = x.to(DT)
    y = torch.randint(0, C, (n,), generator=g)
    return model, x, y, C


NAMES = ("gpt", "gpt_tied", "decoder", "cross_kv", "hand_attention", "lstm", "conv1d", "conv3d", "unet", "resnet_bn", "frozen_weight", "frozen_bias")
