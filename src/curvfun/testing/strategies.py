"""Hypothesis strategies for property-testing curvature code.

Everything here is float64 and deterministic given what hypothesis draws: a model's
architecture is drawn as small integers, its weights and the data come from a drawn seed
(``torch.Generator``, the global RNG is left untouched), so a failing example shrinks to a
small architecture and prints a reproducible description.

Building blocks:

* :func:`mlps`, :func:`cnns`, :func:`conv_nets` (1-D/2-D/3-D and transposed convolutions),
  :func:`attention_models` (``nn.MultiheadAttention`` in every configuration),
  :func:`sequence_models`, :func:`batchnorm_models`, :func:`linear_in_params_models` and
  :func:`models` draw a :class:`ModelCase`: an
  ``nn.Module`` with a description, a per-sample output shape ``(*positions, C)`` and a way to
  make inputs;
* :func:`params_of` draws a params mapping (a non-empty subset of the named parameters, in a
  drawn order, optionally with new values) for a model;
* :func:`batches` draws ``(inputs, targets)`` that are valid for a loss;
* :func:`problems` draws all of that at once as a :class:`Problem`;
* :func:`spd_matrices`, :func:`tensor_trees` and :func:`vectors_like` for linear algebra and
  pytree code.

Example (in a test module)::

    from hypothesis import given
    from curvfun.testing import strategies as cst, reference as ref, checks

    @given(cst.problems(loss="cross_entropy"))
    def test_my_fisher(pb):
        mine = my_fisher(pb.model, pb.params, pb.inputs, pb.targets)
        checks.assert_close(mine, ref.exact_fisher(*pb.args))

Sizes are kept small (P up to ~250, N up to 4) so that the dense references stay cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from hypothesis import assume, strategies as st
from torch import Tensor, nn

from ..losses import CrossEntropy, MSE, BCEWithLogits, Likelihood

__all__ = [
    "ModelCase",
    "Problem",
    "ACTIVATIONS",
    "LOSS_NAMES",
    "logcosh_loss",
    "seeds",
    "activations",
    "mlps",
    "cnns",
    "conv_nets",
    "attention_models",
    "sequence_models",
    "batchnorm_models",
    "linear_in_params_models",
    "models",
    "params_of",
    "make_targets",
    "batches",
    "losses",
    "problems",
    "spd_matrices",
    "tensor_trees",
    "vectors_like",
]

DTYPE = torch.float64

#: activation name -> module class (all smooth except ReLU, whose kinks are hit with
#: probability 0 on random data)
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "relu": nn.ReLU,
}

LOSS_NAMES = ("cross_entropy", "mse", "bce_with_logits")


def logcosh_loss(output: Tensor, target: Tensor) -> Tensor:
    """An example plain loss callable: Σ log cosh(f − y) per sample (``[N]``), float targets."""
    return torch.log(torch.cosh(output - target)).reshape(output.shape[0], -1).sum(1)


# --------------------------------------------------------------------------------------
# drawn objects
# --------------------------------------------------------------------------------------
@dataclass
class ModelCase:
    """A small model with what is needed to feed it.

    ``out_shape`` is the per-sample output shape ``(*positions, C)`` (class dim last);
    ``make_inputs(n, generator)`` returns a batch of ``n`` inputs; ``linear_params`` names the
    parameters in which the output is affine when the others are held fixed (used for
    Hessian = GGN checks), ``None`` when not known.
    """

    model: nn.Module
    description: str
    out_shape: tuple[int, ...]
    make_inputs: Callable[[int, torch.Generator], Any] = field(repr=False)
    linear_params: tuple[str, ...] | None = None

    @property
    def num_outputs(self) -> int:
        return self.out_shape[-1]

    @property
    def positions(self) -> tuple[int, ...]:
        return self.out_shape[:-1]

    def __repr__(self) -> str:
        return f"ModelCase({self.description}, out_shape={self.out_shape})"


@dataclass
class Problem:
    """A model, a params mapping, a batch and a loss: the arguments of curvfun's functions."""

    case: ModelCase
    params: dict[str, Tensor]
    inputs: Any
    targets: Tensor
    loss: Any

    @property
    def model(self) -> nn.Module:
        return self.case.model

    @property
    def args(self) -> tuple:
        """``(model, params, inputs, targets, loss)``: positional arguments for the references."""
        return (self.model, self.params, self.inputs, self.targets, self.loss)

    @property
    def N(self) -> int:
        x = self.inputs[0] if isinstance(self.inputs, tuple) else self.inputs
        return x.shape[0]

    @property
    def P(self) -> int:
        return sum(t.numel() for t in self.params.values())

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in self.params.items()}
        return (
            f"Problem({self.case!r}, loss={self.loss!r}, N={self.N}, P={self.P}, params={shapes}, "
            f"inputs={_describe(self.inputs)}, targets={self.targets.tolist()})"
        )


def _describe(x) -> str:
    if isinstance(x, tuple):
        return "(" + ", ".join(_describe(t) for t in x) + ")"
    return f"{x.dtype}{list(x.shape)}"


# --------------------------------------------------------------------------------------
# model strategies
# --------------------------------------------------------------------------------------
def seeds() -> st.SearchStrategy[int]:
    return st.integers(0, 2**31 - 1)


def activations(names: Sequence[str] = tuple(ACTIVATIONS)) -> st.SearchStrategy[str]:
    return st.sampled_from(list(names))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _init_(model: nn.Module, seed: int, scale: float = 1.0) -> nn.Module:
    """Deterministic float64 weights from ``seed``: U(−1, 1)·scale/√fan_in for weights and
    biases, 1 + 0.3·N(0,1) for norm-layer scales, 0.3·N(0,1) for their shifts."""
    g = _gen(seed)
    model.to(DTYPE)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)):
                if getattr(mod, "weight", None) is not None:
                    mod.weight.copy_(1 + 0.3 * torch.randn(mod.weight.shape, generator=g, dtype=DTYPE))
                if getattr(mod, "bias", None) is not None:
                    mod.bias.copy_(0.3 * torch.randn(mod.bias.shape, generator=g, dtype=DTYPE))
                if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats:
                    mod.running_mean.copy_(0.5 * torch.randn(mod.running_mean.shape, generator=g, dtype=DTYPE))
                    mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=g, dtype=DTYPE))
            elif isinstance(mod, nn.Embedding):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g, dtype=DTYPE))
            elif isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
                fan_in = mod.weight[0].numel()
                bound = scale / fan_in**0.5
                mod.weight.copy_((2 * torch.rand(mod.weight.shape, generator=g, dtype=DTYPE) - 1) * bound * 1.7)
                if mod.bias is not None:
                    mod.bias.copy_((2 * torch.rand(mod.bias.shape, generator=g, dtype=DTYPE) - 1) * bound)
            elif isinstance(mod, nn.MultiheadAttention):  # its projections, in_proj_bias, bias_k / bias_v
                for p in mod.parameters(recurse=False):
                    fan_in = p.shape[-1] if p.ndim > 1 else 1
                    bound = scale / fan_in**0.5 * (1.7 if p.ndim > 1 else 0.5)
                    p.copy_((2 * torch.rand(p.shape, generator=g, dtype=DTYPE) - 1) * bound)
    return model


def _randn_inputs(*shape_after_batch: int) -> Callable[[int, torch.Generator], Tensor]:
    def make(n: int, g: torch.Generator) -> Tensor:
        return torch.randn((n, *shape_after_batch), generator=g, dtype=DTYPE)

    return make


@st.composite
def mlps(draw, min_depth: int = 0, max_depth: int = 2, max_width: int = 6, max_in: int = 4,
         min_out: int = 1, max_out: int = 4, acts: Sequence[str] = tuple(ACTIVATIONS)) -> ModelCase:
    """MLP ``Linear(d_in, h1) → act → … → Linear(h_k, C)``, input ``[N, d_in]``, output ``[N, C]``.

    Depth (hidden layers), widths, activations and whether each layer has a bias are drawn.
    """
    depth = draw(st.integers(min_depth, max_depth))
    d_in = draw(st.integers(1, max_in))
    widths = [draw(st.integers(1, max_width)) for _ in range(depth)]
    C = draw(st.integers(min_out, max_out))
    layers: list[nn.Module] = []
    desc = [f"in={d_in}"]
    d = d_in
    for w in widths:
        bias = draw(st.booleans())
        act = draw(activations(acts))
        layers += [nn.Linear(d, w, bias=bias), ACTIVATIONS[act]()]
        desc.append(f"Linear({d},{w},bias={bias})-{act}")
        d = w
    bias = draw(st.booleans())
    layers.append(nn.Linear(d, C, bias=bias))
    desc.append(f"Linear({d},{C},bias={bias})")
    seed = draw(seeds())
    model = _init_(nn.Sequential(*layers), seed)
    last = str(len(layers) - 1)
    lin = tuple(n for n, _ in model.named_parameters() if n.startswith(last + "."))
    return ModelCase(model, f"MLP[{' '.join(desc)}] seed={seed}", (C,), _randn_inputs(d_in), lin)


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@st.composite
def cnns(draw, min_out: int = 1, max_out: int = 3, max_features: int = 48,
         acts: Sequence[str] = tuple(ACTIVATIONS)) -> ModelCase:
    """``Conv2d → [act] → Flatten → Linear``; input ``[N, c_in, H, W]``, output ``[N, C]``.

    Kernel size, stride, padding, dilation and groups (with 1–2 channels per group) are drawn;
    H and W are drawn so that the conv output is non-empty and the flattened features are
    at most ``max_features``.
    """
    groups = draw(st.integers(1, 2))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    k = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    pad = draw(st.integers(0, 1))
    dil = draw(st.integers(1, 2))
    bias = draw(st.booleans())
    sizes = [h for h in range(1, 8) if _conv_out(h, k, stride, pad, dil) >= 1]
    min_o = min(_conv_out(h, k, stride, pad, dil) for h in sizes)
    H = draw(st.sampled_from([h for h in sizes if c_out * min_o * _conv_out(h, k, stride, pad, dil) <= max_features]))
    Ho = _conv_out(H, k, stride, pad, dil)
    W = draw(st.sampled_from([w for w in sizes if c_out * Ho * _conv_out(w, k, stride, pad, dil) <= max_features]))
    Wo = _conv_out(W, k, stride, pad, dil)
    act = draw(st.none() | activations(acts))
    C = draw(st.integers(min_out, max_out))
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad, dilation=dil, groups=groups, bias=bias)]
    if act is not None:
        layers.append(ACTIVATIONS[act]())
    layers += [nn.Flatten(), nn.Linear(c_out * Ho * Wo, C)]
    seed = draw(seeds())
    model = _init_(nn.Sequential(*layers), seed)
    desc = (f"CNN[in={c_in}x{H}x{W} Conv2d({c_in},{c_out},k={k},s={stride},p={pad},d={dil},g={groups},"
            f"bias={bias})-{act}-Flatten-Linear({c_out * Ho * Wo},{C})] seed={seed}")
    lin = (f"{len(layers) - 1}.weight", f"{len(layers) - 1}.bias")
    return ModelCase(model, desc, (C,), _randn_inputs(c_in, H, W), lin)


@st.composite
def conv_nets(draw, min_out: int = 1, max_out: int = 3, max_features: int = 48,
              acts: Sequence[str] = tuple(ACTIVATIONS)) -> ModelCase:
    """``ConvNd`` or ``ConvTransposeNd`` (N = 1, 2, 3) ``→ [act] → Flatten → Linear``; input
    ``[N, c_in, *S]``, output ``[N, C]``.

    Per spatial dim the kernel, stride and dilation are drawn, and groups (1–2 channels per
    group); convolutions draw integer, ``'valid'`` or (stride 1) ``'same'`` padding and a
    ``padding_mode``, transposed ones a padding and an ``output_padding``. Sizes are drawn so that
    the output is non-empty and the flattened features are at most ``max_features``.
    """
    n = draw(st.integers(1, 3))
    transposed = draw(st.booleans())
    groups = draw(st.integers(1, 2))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    k = tuple(draw(st.integers(1, 3)) for _ in range(n))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(n))
    dil = tuple(draw(st.integers(1, 2)) for _ in range(n))
    size = tuple(draw(st.integers(1, (6, 4, 3)[n - 1])) for _ in range(n))
    bias = draw(st.booleans())
    cls = ((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d) if transposed
           else (nn.Conv1d, nn.Conv2d, nn.Conv3d))[n - 1]
    if transposed:
        pad = tuple(draw(st.integers(0, di * (ki - 1) // 2)) for ki, di in zip(k, dil))
        out_pad = tuple(draw(st.integers(0, max(si, di) - 1)) for si, di in zip(stride, dil))
        conv = cls(c_in, c_out, k, stride=stride, padding=pad, output_padding=out_pad, groups=groups,
                   dilation=dil, bias=bias)
        what = f"p={pad},op={out_pad}"
    else:
        pad = draw(st.sampled_from(["valid", 0, 1] + (["same"] if all(si == 1 for si in stride) else [])))
        mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
        conv = cls(c_in, c_out, k, stride=stride, padding=pad, dilation=dil, groups=groups, bias=bias,
                   padding_mode=mode)
        what = f"p={pad!r},{mode}"
    try:
        with torch.no_grad():
            features = conv(torch.zeros(1, c_in, *size)).numel()
    except RuntimeError:  # a padding larger than the input allows for reflect / circular
        features = 0
    assume(0 < features <= max_features)
    act = draw(st.none() | activations(acts))
    C = draw(st.integers(min_out, max_out))
    layers: list[nn.Module] = [conv] + ([ACTIVATIONS[act]()] if act is not None else [])
    layers += [nn.Flatten(), nn.Linear(features, C)]
    seed = draw(seeds())
    model = _init_(nn.Sequential(*layers), seed)
    desc = (f"ConvNet[in={c_in}x{'x'.join(map(str, size))} {cls.__name__}({c_in},{c_out},k={k},s={stride},"
            f"d={dil},g={groups},{what},bias={bias})-{act}-Flatten-Linear({features},{C})] seed={seed}")
    last = str(len(layers) - 1)
    return ModelCase(model, desc, (C,), _randn_inputs(c_in, *size), (f"{last}.weight", f"{last}.bias"))


class _AttentionNet(nn.Module):
    """Queries ``[N, T, E]`` attend to themselves (``cross=False``) or to a memory ``[N, S, kdim]``
    (values: ``tanh`` of it, through a Linear where vdim ≠ kdim) through one MultiheadAttention;
    mean over the queries, Linear head. ``pad``: the memory's last position is key padding."""

    def __init__(self, att: nn.MultiheadAttention, C: int, cross: bool, pad: bool):
        super().__init__()
        self.att, self.cross, self.pad = att, cross, pad
        self.to_v = nn.Linear(att.kdim, att.vdim) if cross and att.kdim != att.vdim else None
        self.head = nn.Linear(att.embed_dim, C)

    def forward(self, x: Tensor, m: Tensor | None = None) -> Tensor:
        seq = (lambda t: t) if self.att.batch_first else (lambda t: t.transpose(0, 1))
        if not self.cross:
            out, _ = self.att(seq(x), seq(x), seq(x))
        else:
            v = torch.tanh(m if self.to_v is None else self.to_v(m))
            kpm = None
            if self.pad:
                kpm = torch.zeros(m.shape[0], m.shape[1], dtype=torch.bool, device=m.device)
                kpm[:, -1] = True
            out, _ = self.att(seq(x), seq(m), seq(v), key_padding_mask=kpm)
        return self.head(seq(out).mean(1))


@st.composite
def attention_models(draw, min_out: int = 1, max_out: int = 3) -> ModelCase:
    """One ``nn.MultiheadAttention`` (self- or cross-attention) pooled into a Linear head; input
    ``[N, T, E]`` (and a memory ``[N, S, kdim]`` for cross-attention: inputs are then a tuple),
    output ``[N, C]``. Embedding dim and heads, packed or separate q/k/v weights (``kdim`` /
    ``vdim``), biases, ``add_bias_kv``, ``add_zero_attn``, ``batch_first`` and key padding are drawn.
    """
    E, heads = draw(st.sampled_from([(2, 1), (4, 1), (4, 2), (6, 3)]))
    cross = draw(st.booleans())
    kdim = draw(st.sampled_from([None, 2, 3])) if cross else None
    vdim = draw(st.sampled_from([None, 2, 5])) if cross else None
    bias, bias_kv, zero_attn, batch_first = (draw(st.booleans()) for _ in range(4))
    att = nn.MultiheadAttention(E, heads, bias=bias, add_bias_kv=bias_kv, add_zero_attn=zero_attn, kdim=kdim,
                                vdim=vdim, batch_first=batch_first)
    T = draw(st.integers(1, 3))
    S = draw(st.integers(2, 4))
    pad = cross and draw(st.booleans())
    C = draw(st.integers(min_out, max_out))
    seed = draw(seeds())
    model = _init_(_AttentionNet(att, C, cross, pad), seed)
    desc = (f"Attention[E={E} heads={heads} {'cross S=' + str(S) if cross else 'self'} T={T} kdim={kdim} "
            f"vdim={vdim} bias={bias} bias_kv={bias_kv} zero_attn={zero_attn} batch_first={batch_first} "
            f"pad={pad}] seed={seed}")
    if not cross:
        return ModelCase(model, desc, (C,), _randn_inputs(T, E), ("head.weight", "head.bias"))

    def make(n, g, T=T, S=S, E=E, kd=att.kdim):
        return (torch.randn(n, T, E, generator=g, dtype=DTYPE), torch.randn(n, S, kd, generator=g, dtype=DTYPE))

    return ModelCase(model, desc, (C,), make, ("head.weight", "head.bias"))


class _EmbedNormHead(nn.Module):
    """Embedding → LayerNorm → [Linear → act] → Linear head [× root-level ``scale``]:
    ``[N, T]`` ints -> ``[N, T, C]``. ``scale`` (a parameter of the root module, block key
    ``""``) multiplies the logits when present."""

    def __init__(self, vocab: int, emb: int, hidden: int | None, C: int, act: str | None, scale: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, emb)
        self.norm = nn.LayerNorm(emb)
        self.hidden = None if hidden is None else nn.Linear(emb, hidden)
        self.act = None if act is None else ACTIVATIONS[act]()
        self.head = nn.Linear(emb if hidden is None else hidden, C)
        self.scale = nn.Parameter(torch.ones(())) if scale else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(self.embed(x))
        if self.hidden is not None:
            h = self.act(self.hidden(h)) if self.act is not None else self.hidden(h)
        out = self.head(h)
        return out * self.scale if self.scale is not None else out


class _SeqMLP(nn.Module):
    """Per-position ``Linear → act → LayerNorm → Linear``: ``[N, T, d]`` -> ``[N, T, C]``."""

    def __init__(self, d: int, h: int, C: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.act = ACTIVATIONS[act]()
        self.norm = nn.LayerNorm(h)
        self.fc2 = nn.Linear(h, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


@st.composite
def sequence_models(draw, min_out: int = 1, max_out: int = 4, max_len: int = 4,
                    acts: Sequence[str] = tuple(ACTIVATIONS), root_params: bool = True) -> ModelCase:
    """Sequence models with output ``[N, T, C]`` (positions = T tokens).

    Either ``Embedding(V, E) → LayerNorm(E) → [Linear → act] → Linear(·, C)`` on integer
    tokens ``[N, T]`` (with ``root_params`` possibly times a scalar ``scale`` parameter of the
    root module, outside any layer), or a per-position ``Linear → act → LayerNorm → Linear``
    on ``[N, T, d]``.
    """
    T = draw(st.integers(1, max_len))
    C = draw(st.integers(min_out, max_out))
    seed = draw(seeds())
    if draw(st.booleans()):
        V = draw(st.integers(2, 6))
        E = draw(st.integers(2, 5))
        hidden = draw(st.none() | st.integers(1, 5))
        act = draw(activations(acts)) if hidden is not None else None
        scale = draw(st.booleans()) if root_params else False
        model = _init_(_EmbedNormHead(V, E, hidden, C, act, scale), seed)
        if scale:
            with torch.no_grad():
                model.scale.fill_(0.5 + torch.rand((), generator=_gen(seed + 1), dtype=DTYPE).item())

        def make(n, g, V=V, T=T):
            return torch.randint(0, V, (n, T), generator=g)

        desc = (f"Seq[tokens V={V} T={T} Embedding({V},{E})-LayerNorm-hidden={hidden}-{act}-Linear(.,{C})"
                f"{'-scale' if scale else ''}] seed={seed}")
        return ModelCase(model, desc, (T, C), make, ("head.weight", "head.bias"))
    d = draw(st.integers(1, 4))
    h = draw(st.integers(2, 5))
    act = draw(activations(acts))
    model = _init_(_SeqMLP(d, h, C, act), seed)
    desc = f"Seq[float T={T} Linear({d},{h})-{act}-LayerNorm-Linear({h},{C})] seed={seed}"
    return ModelCase(model, desc, (T, C), _randn_inputs(T, d), ("fc2.weight", "fc2.bias"))


@st.composite
def batchnorm_models(draw, min_out: int = 1, max_out: int = 3,
                     acts: Sequence[str] = tuple(ACTIVATIONS)) -> ModelCase:
    """Models with BatchNorm in **eval** mode (random running statistics and affine params).

    ``Linear → BatchNorm1d → act → Linear`` on ``[N, d]`` or
    ``Conv2d(3x3, pad 1) → BatchNorm2d → act → Flatten → Linear`` on ``[N, c, 3, 3]``.
    """
    C = draw(st.integers(min_out, max_out))
    act = draw(activations(acts))
    seed = draw(seeds())
    if draw(st.booleans()):
        d = draw(st.integers(1, 4))
        h = draw(st.integers(1, 5))
        model = nn.Sequential(nn.Linear(d, h), nn.BatchNorm1d(h), ACTIVATIONS[act](), nn.Linear(h, C))
        desc = f"BN1d[Linear({d},{h})-BatchNorm1d-{act}-Linear({h},{C})] seed={seed}"
        make = _randn_inputs(d)
    else:
        c = draw(st.integers(1, 2))
        co = draw(st.integers(1, 3))
        model = nn.Sequential(nn.Conv2d(c, co, 3, padding=1), nn.BatchNorm2d(co), ACTIVATIONS[act](),
                              nn.Flatten(), nn.Linear(co * 9, C))
        desc = f"BN2d[Conv2d({c},{co},3,p=1)-BatchNorm2d-{act}-Flatten-Linear({co * 9},{C})] on {c}x3x3 seed={seed}"
        make = _randn_inputs(c, 3, 3)
    model = _init_(model, seed).eval()
    return ModelCase(model, desc, (C,), make, ("3.weight", "3.bias") if isinstance(model[3], nn.Linear) else ("4.weight", "4.bias"))


@st.composite
def linear_in_params_models(draw, min_out: int = 1, max_out: int = 4) -> ModelCase:
    """Models whose output is affine in **all** their parameters: a single ``Linear`` or a
    ``Conv2d → Flatten`` (no activation); output ``[N, C]``. For Hessian = GGN checks."""
    seed = draw(seeds())
    if draw(st.booleans()):
        d = draw(st.integers(1, 5))
        C = draw(st.integers(min_out, max_out))
        bias = draw(st.booleans())
        model = _init_(nn.Sequential(nn.Linear(d, C, bias=bias)), seed)
        return ModelCase(model, f"Linear({d},{C},bias={bias}) seed={seed}", (C,), _randn_inputs(d),
                         tuple(n for n, _ in model.named_parameters()))
    c = draw(st.integers(1, 2))
    co = draw(st.integers(1, 2))
    k = draw(st.integers(1, 2))
    H = draw(st.integers(k, 3))
    Ho = H - k + 1
    model = _init_(nn.Sequential(nn.Conv2d(c, co, k), nn.Flatten()), seed)
    return ModelCase(model, f"Conv2d({c},{co},k={k})-Flatten on {c}x{H}x{H} seed={seed}", (co * Ho * Ho,),
                     _randn_inputs(c, H, H), tuple(n for n, _ in model.named_parameters()))


_KINDS = {
    "mlp": mlps,
    "cnn": cnns,
    "conv": conv_nets,
    "attention": attention_models,
    "sequence": sequence_models,
    "batchnorm": batchnorm_models,
    "linear": linear_in_params_models,
}


def models(kinds: Sequence[str] = ("mlp", "cnn", "sequence", "batchnorm"), min_out: int = 1,
           root_params: bool = True) -> st.SearchStrategy[ModelCase]:
    """One of the model families in ``kinds`` (``"mlp"``, ``"cnn"``, ``"conv"`` (N-d and transposed
    convolutions), ``"attention"``, ``"sequence"``, ``"batchnorm"``, ``"linear"``), with at least
    ``min_out`` outputs (use 2 for cross-entropy).
    ``root_params=False`` keeps every parameter inside a standard layer (Linear, Conv2d,
    Embedding, LayerNorm, BatchNorm)."""
    unknown = set(kinds) - set(_KINDS)
    if unknown:
        raise ValueError(f"unknown model kinds {sorted(unknown)}; known: {sorted(_KINDS)}")
    return st.one_of(*[_KINDS[k](min_out=min_out, root_params=root_params) if k == "sequence"
                       else _KINDS[k](min_out=min_out) for k in kinds])


# --------------------------------------------------------------------------------------
# params, batches, losses
# --------------------------------------------------------------------------------------
@st.composite
def params_of(draw, model: nn.Module, subset: bool | str = True, shuffle: bool = True, new_values: bool = True,
              only: Sequence[str] | None = None) -> dict[str, Tensor]:
    """A params mapping for ``model``.

    ``subset``: ``True`` a drawn non-empty subset of the parameters (a module may contribute
    only some of its parameters, e.g. a Linear's bias without its weight); ``"modules"`` a
    drawn non-empty set of modules with all their parameters; ``False`` all parameters.
    ``shuffle``: in a drawn order (curvfun's dense matrices follow this insertion order);
    ``new_values``: possibly replace the values by fresh ones (then functions must use
    ``params``, not the module's own values); ``only``: restrict to these names.
    """
    names = [n for n, _ in model.named_parameters()]
    if only is not None:
        names = [n for n in names if n in set(only)]
    if subset == "modules":
        mods = list(dict.fromkeys(n.rsplit(".", 1)[0] if "." in n else "" for n in names))
        chosen_mods = draw(st.lists(st.sampled_from(mods), min_size=1, max_size=len(mods), unique=True))
        keep = [n for n in names if (n.rsplit(".", 1)[0] if "." in n else "") in chosen_mods]
        if shuffle:  # modules in drawn order, a module's parameters in a drawn order
            keep = [n for m in chosen_mods for n in draw(st.permutations(
                [q for q in keep if (q.rsplit(".", 1)[0] if "." in q else "") == m]))]
        names, subset = keep, False
    if subset and len(names) > 1:
        chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True))
        if not shuffle:
            chosen = [n for n in names if n in chosen]
    else:
        chosen = list(names)
        if shuffle:
            chosen = draw(st.permutations(chosen))
    named = dict(model.named_parameters())
    if new_values and draw(st.booleans()):
        g = _gen(draw(seeds()))
        return {n: named[n].detach() + 0.3 * torch.randn(named[n].shape, generator=g, dtype=named[n].dtype) for n in chosen}
    return {n: named[n] for n in chosen}


def _loss_kind(loss: Any) -> str | None:
    if isinstance(loss, str):
        return loss
    if isinstance(loss, Likelihood):
        return loss.name if loss.name in LOSS_NAMES else None
    return None


def make_targets(case: ModelCase, loss: Any, n: int, g: torch.Generator, ignore_prob: float = 0.0) -> Tensor:
    """Valid targets for ``loss`` and a batch of ``n``: class indices ``[n, *positions]`` for
    cross-entropy (a fraction ``ignore_prob`` set to ``ignore_index``), Gaussian ``[n, *out]``
    for mse and plain callables, values in [0, 1] (half hard, half soft) for BCE."""
    kind = _loss_kind(loss)
    shape = (n, *case.out_shape)
    if kind == "cross_entropy":
        y = torch.randint(0, case.num_outputs, (n, *case.positions), generator=g)
        if ignore_prob > 0:
            ii = loss.ignore_index if isinstance(loss, CrossEntropy) else -100
            drop = torch.rand(y.shape, generator=g) < ignore_prob
            y = torch.where(drop, torch.full_like(y, ii), y)
        return y
    if kind == "bce_with_logits":
        u = torch.rand(shape, generator=g, dtype=DTYPE)
        hard = torch.rand(shape, generator=g, dtype=DTYPE) < 0.5
        return torch.where(hard, (u > 0.5).to(DTYPE), u)
    return torch.randn(shape, generator=g, dtype=DTYPE)


@st.composite
def batches(draw, case: ModelCase, loss: Any = "cross_entropy", min_n: int = 1, max_n: int = 4,
            ignore: bool = False) -> tuple[Any, Tensor]:
    """``(inputs, targets)`` for ``case`` with a drawn batch size in [min_n, max_n];
    ``ignore`` lets some cross-entropy targets equal ``ignore_index``."""
    n = draw(st.integers(min_n, max_n))
    g = _gen(draw(seeds()))
    x = case.make_inputs(n, g)
    p = draw(st.sampled_from([0.0, 0.3, 0.6])) if ignore else 0.0
    return x, make_targets(case, loss, n, g, ignore_prob=p)


def losses(names: Sequence[str] = LOSS_NAMES, configured: bool = True) -> st.SearchStrategy:
    """A loss: a name from ``names``, or (``configured``) a configured likelihood
    (``CrossEntropy(ignore_index, label_smoothing)``, ``MSE(var)``, ``BCEWithLogits()``)."""
    opts: list[st.SearchStrategy] = [st.sampled_from(list(names))]
    if configured:
        if "cross_entropy" in names:
            opts.append(st.builds(CrossEntropy, ignore_index=st.sampled_from([-100, -1, 7]),
                                  label_smoothing=st.sampled_from([0.0, 0.1, 0.5])))
        if "mse" in names:
            opts.append(st.builds(MSE, var=st.sampled_from([0.5, 1.0, 3.0])))
        if "bce_with_logits" in names:
            opts.append(st.just(BCEWithLogits()))
    return st.one_of(*opts)


@st.composite
def problems(draw, loss: Any = None, kinds: Sequence[str] = ("mlp", "cnn", "sequence", "batchnorm"),
             min_n: int = 1, max_n: int = 4, subset: bool | str = True, ignore: bool = True,
             linear_only: bool = False, root_params: bool = True) -> Problem:
    """A full :class:`Problem`. ``loss``: a fixed loss (name, Likelihood or callable), a
    strategy of losses, or ``None`` for :func:`losses`. ``subset``: see :func:`params_of`.
    ``linear_only``: params restricted to the parameters in which the model output is affine
    (for Hessian = GGN). ``root_params``: see :func:`models`."""
    if loss is None:
        loss = draw(losses())
    elif isinstance(loss, st.SearchStrategy):
        loss = draw(loss)
    min_out = 2 if _loss_kind(loss) == "cross_entropy" else 1
    case = draw(models(kinds, min_out=min_out, root_params=root_params))
    only = case.linear_params if linear_only else None
    params = draw(params_of(case.model, subset=subset, only=only))
    x, y = draw(batches(case, loss, min_n=min_n, max_n=max_n, ignore=ignore))
    return Problem(case, params, x, y, loss)


# --------------------------------------------------------------------------------------
# linear algebra and pytrees
# --------------------------------------------------------------------------------------
@st.composite
def spd_matrices(draw, min_n: int = 1, max_n: int = 8, max_cond: float = 1e3) -> Tensor:
    """A symmetric positive definite ``[n, n]`` float64 matrix Q diag(λ) Qᵀ, eigenvalues in
    [1, max_cond] (log-uniform), Q a random orthogonal matrix."""
    n = draw(st.integers(min_n, max_n))
    g = _gen(draw(seeds()))
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))
    lam = torch.exp(torch.rand(n, generator=g, dtype=DTYPE) * torch.log(torch.tensor(max_cond, dtype=DTYPE)))
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2


@st.composite
def tensor_trees(draw, max_leaves: int = 4, max_dim: int = 3, max_size: int = 4, nested: bool = True) -> Any:
    """A pytree of float64 tensors: a dict (str keys, drawn order) of leaves, lists and tuples
    (when ``nested``); leaf shapes have up to ``max_dim`` dims of size 1..``max_size``."""
    g = _gen(draw(seeds()))

    def leaf():
        shape = draw(st.lists(st.integers(1, max_size), min_size=0, max_size=max_dim))
        return torch.randn(shape, generator=g, dtype=DTYPE)

    n = draw(st.integers(1, max_leaves))
    keys = draw(st.lists(st.text("abcdefgh", min_size=1, max_size=3), min_size=n, max_size=n, unique=True))
    tree: dict[str, Any] = {}
    for k in keys:
        kind = draw(st.sampled_from(["leaf", "list", "tuple"] if nested else ["leaf"]))
        if kind == "leaf":
            tree[k] = leaf()
        elif kind == "list":
            tree[k] = [leaf() for _ in range(draw(st.integers(1, 2)))]
        else:
            tree[k] = tuple(leaf() for _ in range(draw(st.integers(1, 2))))
    return tree


@st.composite
def vectors_like(draw, like: Mapping[str, Tensor] | Any, scale: float = 1.0) -> Any:
    """A random tree shaped like ``like`` (Gaussian entries times ``scale``, float64)."""
    import optree

    g = _gen(draw(seeds()))
    return optree.tree_map(lambda t: scale * torch.randn(t.shape, generator=g, dtype=DTYPE), like)
