"""N-d convolutions (``nn.Conv1d`` / ``Conv2d`` / ``Conv3d``): a Linear over im2col patches.

Patch of output position t: the ``C_in/G · Π k`` input entries the kernel sees, in the order of
``weight.flatten(1)`` (channel, then kernel offsets), so the weight matrix is ``weight.reshape(G,
C_out/G, -1)``. Any stride, dilation, groups, integer or string padding (``'same'`` pads
``total//2`` before and the rest after, as PyTorch) and any ``padding_mode``.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .affine import feature_major
from .registry import LayerHandler

__all__ = ["ConvHandler", "conv_pads", "patches", "im2col", "arrange_patches"]


def conv_pads(module: nn.Module) -> list[tuple[int, int]]:
    """(before, after) zero-or-mode padding per spatial dim of a convolution."""
    nd = len(module.kernel_size)
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return [(0, 0)] * nd
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in module.padding]


def patches(x: Tensor, kernel: tuple, stride: tuple, dilation: tuple, pads: list[tuple[int, int]],
            mode: str = "zeros") -> Tensor:
    """im2col for any number of spatial dims: ``[N, C, *S]`` -> ``[N, L, C·Π k]`` (order: channel,
    then kernel offsets), L the output positions.

    Laid out feature-major underneath (a ``[C·Π k, N, L]`` buffer filled by Π k strided copies,
    returned as a permuted view) so that ``reshape(N·L, D)`` is a view and its Gram one GEMM on
    contiguous rows. Negative pads crop. Cost O(N·L·C·Π k) copies."""
    N, C = x.shape[:2]
    flat = [p for pair in reversed(pads) for p in pair]
    if any(flat):
        if mode == "zeros" or all(p <= 0 for p in flat):
            x = F.pad(x, flat)
        else:
            x = F.pad(x, flat, mode=mode)
    xc = x.transpose(0, 1)  # [C, N, *S]
    S = xc.shape[2:]
    out = [(s - d * (k - 1) - 1) // st + 1 for s, k, st, d in zip(S, kernel, stride, dilation)]
    if any(o <= 0 for o in out):
        raise ValueError(f"convolution input of spatial size {tuple(S)} (after padding) is smaller than the "
                         f"kernel {tuple(kernel)} at dilation {tuple(dilation)}")
    buf = x.new_empty(C, *kernel, N, *out)
    for offs in itertools.product(*(range(k) for k in kernel)):
        src = tuple(slice(i * d, i * d + st * (o - 1) + 1, st) for i, d, st, o in zip(offs, dilation, stride, out))
        buf[(slice(None), *offs)] = xc[(slice(None), slice(None), *src)]
    return buf.reshape(C * math.prod(kernel), N, math.prod(out)).permute(1, 2, 0)


def im2col(x: Tensor, module: nn.Module) -> Tensor:
    """Patches of a convolution's input ``[N, C_in, *S]``: ``[N, L, C_in·Π k]`` (see :func:`patches`)."""
    return patches(x, module.kernel_size, module.stride, module.dilation, conv_pads(module), module.padding_mode)


def arrange_patches(cols: list[Tensor], grads: list[Tensor] | None, groups: int) -> tuple[Tensor, Tensor | None]:
    """Per-call patches ``[N, L, D]`` and output gradients ``[K, N, C_out, *O]`` as the affine form
    ``[N, G, T, D/G]``, ``[K, N, G, T, C_out/G]`` (calls concatenated along T)."""
    a_list, g_list = [], []
    for i, c in enumerate(cols):
        N, L, D = c.shape
        a_list.append(c.reshape(N, L, groups, D // groups).transpose(1, 2))
        if grads is not None:
            y = grads[i]
            K, _, Cout = y.shape[:3]
            gl = feature_major(y.reshape(K, N, Cout, -1))  # [K, N, L, Cout]
            g_list.append(gl.reshape(K, N, gl.shape[2], groups, Cout // groups).transpose(2, 3))
    a = a_list[0] if len(a_list) == 1 else torch.cat(a_list, 2)
    if grads is None:
        return a, None
    return a, g_list[0] if len(g_list) == 1 else torch.cat(g_list, 3)


_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


class ConvHandler(LayerHandler):
    """``nn.ConvNd`` for N = 1, 2, 3."""

    family = "affine"

    def __init__(self, ndim: int) -> None:
        self.ndim = ndim

    def arrange(self, module: nn.Module, inputs, grads):
        for x in inputs:
            if x.ndim != self.ndim + 2:
                raise ValueError(f"{type(module).__name__}: expected a batched [N, C, {', '.join('S' * self.ndim)}] "
                                 f"input, got shape {tuple(x.shape)}")
        return arrange_patches([im2col(x, module) for x in inputs], grads, module.groups)

    def diag_kron_factors(self, module: nn.Module, inputs, grads, has_bias):
        """Conv2d with zero padding, equal on both sides: :func:`curvfun.diag_kron.conv2d_diag_kron`
        (strided sums of x², no im2col)."""
        if self.ndim != 2 or module.padding_mode != "zeros" or any(lo != hi for lo, hi in conv_pads(module)):
            return None
        from ..diag_kron import conv2d_diag_kron  # (diag_kron builds on this package)

        return conv2d_diag_kron(inputs, grads, module, has_bias)

    def per_sample_grads(self, module: nn.Module, inputs, grads, keys):
        """The weight gradient of every sample as one grouped weight backward with the batch folded
        into the groups (N·G groups), summed over calls: no im2col copy, O(N·P) memory. Zero
        padding with equal sides only (else ``None``: the patch route)."""
        pads = conv_pads(module)
        if module.padding_mode != "zeros" or any(l != r for l, r in pads):
            return None
        w_total = b_total = None
        for x, y in zip(inputs, grads):
            g = y[0]
            N, Cin = x.shape[:2]
            Cout = g.shape[1]
            if "weight" in keys:
                w = _WEIGHT_GRAD[self.ndim](
                    x.reshape(1, N * Cin, *x.shape[2:]), (N * Cout, Cin // module.groups, *module.kernel_size),
                    g.reshape(1, N * Cout, *g.shape[2:]), module.stride, [l for l, _ in pads], module.dilation,
                    N * module.groups,
                ).reshape(N, *module.weight.shape)
                w_total = w if w_total is None else w_total + w
            if "bias" in keys:
                b = g.reshape(N, Cout, -1).sum(2)
                b_total = b if b_total is None else b_total + b
        out = {}
        if w_total is not None:
            out["weight"] = w_total
        if b_total is not None:
            out["bias"] = b_total
        return out
