"""Models of the ``curvfun`` command: MLP, CNN, a small ResNet, a small GPT.

All use out-of-place operations only (``out = out + shortcut``, ``ReLU(inplace=False)``), so
hook- or ``torch.func``-based curvature capture sees every layer. Image models take
``[N, C, H, W]`` and return logits ``[N, num_classes]``; the GPT takes token ids ``[N, T]``
and returns next-token logits ``[N, T, vocab_size]``.
"""

from __future__ import annotations

import inspect
import math
from typing import Sequence

import torch
from torch import nn

from .config import CliError


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU] * len(hidden) -> Linear. Default 64-128-10 on digits."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (128,)):
        super().__init__()
        dims = [math.prod(input_shape), *hidden]
        layers = [nn.Flatten()]
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    """[Conv3x3 -> ReLU -> MaxPool2] per channel count, adaptive 2x2 average pool, Linear."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (32, 64)):
        super().__init__()
        c_in = input_shape[0]
        layers = []
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers[:-1], nn.AdaptiveAvgPool2d(2))  # last pool adapts to any size
        self.head = nn.Linear(c_in * 4, num_classes)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and a residual add (1x1 conv + BN on the shortcut when shapes change)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu(out)


class ResNet(nn.Module):
    """A small ResNet: 3x3 stem, stages of BasicBlocks (stride 2 between stages), global pool, Linear."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, widths: Sequence[int] = (16, 32, 64),
                 blocks: Sequence[int] = (1, 1, 1)):
        super().__init__()
        if len(widths) != len(blocks):
            raise CliError(f"resnet: widths {list(widths)} and blocks {list(blocks)} must have the same length")
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, c_in = [], widths[0]
        for i, (w, b) in enumerate(zip(widths, blocks)):
            for j in range(b):
                stages.append(BasicBlock(c_in, w, stride=2 if (i > 0 and j == 0) else 1))
                c_in = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, max_len: int, dropout: float):
        super().__init__()
        if d_model % n_head:
            raise CliError(f"gpt: d_model {d_model} must be divisible by n_head {n_head}")
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.drop = nn.Dropout(dropout)
        self.register_buffer("causal", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)), persistent=False)

    def forward(self, x):
        b, t, c = x.shape
        h = self.n_head
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = (z.reshape(b, t, h, c // h).transpose(1, 2) for z in (q, k, v))  # [b, h, t, d]
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c // h)
        att = att.masked_fill(~self.causal[:t, :t], float("-inf"))  # position i sees positions <= i only
        att = self.drop(torch.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(b, t, c)
        return self.proj(y)


class GPTBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_head: int, max_len: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, max_len, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model),
                                 nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A small GPT: token + learned position embeddings, pre-LN blocks, final LayerNorm, LM head.

    ``tie_weights=True`` shares the head's weight with the token embedding (one Parameter).
    """

    def __init__(self, vocab_size: int, seq_len: int, d_model: int = 64, n_layer: int = 2, n_head: int = 4,
                 max_len: int = 0, dropout: float = 0.0, tie_weights: bool = True):
        super().__init__()
        max_len = max_len or seq_len
        self.max_len = max_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[GPTBlock(d_model, n_head, max_len, dropout) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init)
        if tie_weights:
            self.head.weight = self.tok_emb.weight

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx):
        t = idx.shape[-1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds the model's max_len {self.max_len}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        return self.head(self.ln_f(self.blocks(x)))


#: name -> (class, task, arguments filled in from the data set)
MODELS = {
    "mlp": (MLP, "classification", ("input_shape", "num_classes")),
    "cnn": (CNN, "classification", ("input_shape", "num_classes")),
    "resnet": (ResNet, "classification", ("input_shape", "num_classes")),
    "gpt": (GPT, "lm", ("vocab_size", "seq_len")),
}


def model_arg_names(name: str):
    cls, _, data_args = MODELS[name]
    params = inspect.signature(cls.__init__).parameters
    return [p for p in params if p not in ("self",) + data_args]


def build_model(name: str, data_info: dict, model_args: dict | None = None) -> nn.Module:
    """Build a model for a data set; ``model_args`` are validated against the model's signature."""
    if name not in MODELS:
        raise CliError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    cls, task, data_args = MODELS[name]
    if task != data_info["task"]:
        need = "a language-modelling data set (wikitext2)" if task == "lm" else "an image data set (digits, cifar10)"
        raise CliError(f"model {name!r} needs {need}")
    model_args = dict(model_args or {})
    valid = model_arg_names(name)
    unknown = [k for k in model_args if k not in valid]
    if unknown:
        raise CliError(f"unknown model_args {unknown} for model {name!r}; valid: {', '.join(valid)}")
    params = inspect.signature(cls.__init__).parameters
    for key, value in model_args.items():
        _check_model_arg(name, key, value, params[key].default)
    try:
        return cls(**{a: data_info[a] for a in data_args}, **model_args)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CliError(f"model {name!r} cannot be built with model_args {model_args}: {exc}") from None


def _check_model_arg(model: str, key: str, value, default) -> None:
    """A model argument must have its default's kind: an int, a float, a bool or a list of ints."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, kind = is_int(value) and value > 0, "a positive integer"
    elif isinstance(default, float):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, (tuple, list)):
        ok, kind = isinstance(value, (list, tuple)) and all(is_int(v) and v > 0 for v in value), \
            "a list of positive integers"
    else:
        return
    if not ok:
        example = f"[{', '.join(map(str, default))}]" if isinstance(default, (tuple, list)) else str(default).lower()
        raise CliError(f"model_args {key!r} of model {model!r} must be {kind}, got {value!r} "
                       f"(e.g. --model-arg {key}={example})")
