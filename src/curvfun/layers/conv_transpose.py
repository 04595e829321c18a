"""Transposed N-d convolutions (``nn.ConvTranspose1d`` / ``2d`` / ``3d``).

``conv_transpose(x, W)`` equals a stride-1 convolution of the *stride-dilated* input (``s − 1``
zeros between neighbours) padded by ``dil·(k − 1) − p`` before and that plus ``output_padding``
after (negative: cropped), with the kernel flipped and its two channel dims swapped. Its patches
are the affine family's ``a`` (A over the patches, B over output positions, as for Conv2d); the
weight ``[C_in, C_out/G, *k]`` maps to that convolution's matrix by the ``"transposed"`` layout
(:func:`curvfun.layers.affine.weight_as_matrix`). Cost: the patches of the dilated input,
``s^N`` times those of a convolution of the same output size.
"""

from __future__ import annotations

from torch import Tensor, nn

from .conv import arrange_patches, patches
from .registry import LayerHandler

__all__ = ["ConvTransposeHandler", "dilate"]


def dilate(x: Tensor, stride: tuple) -> Tensor:
    """``[N, C, *S]`` with ``s − 1`` zeros inserted between neighbours along each spatial dim."""
    if all(s == 1 for s in stride):
        return x
    N, C, *S = x.shape
    out = x.new_zeros(N, C, *[(n - 1) * s + 1 for n, s in zip(S, stride)])
    out[(slice(None), slice(None), *(slice(None, None, s) for s in stride))] = x
    return out


class ConvTransposeHandler(LayerHandler):
    """``nn.ConvTransposeNd`` for N = 1, 2, 3 (zero padding, as PyTorch requires)."""

    family = "affine"

    def __init__(self, ndim: int) -> None:
        self.ndim = ndim

    def weight_layout(self, module: nn.Module) -> str:
        return "transposed"

    def arrange(self, module: nn.Module, inputs, grads):
        k, d, s = module.kernel_size, module.dilation, module.stride
        cols = []
        for i, x in enumerate(inputs):
            if x.ndim != self.ndim + 2:
                raise ValueError(f"{type(module).__name__}: expected a batched [N, C, {', '.join('S' * self.ndim)}] "
                                 f"input, got shape {tuple(x.shape)}")
            xd = dilate(x, s)
            before = [di * (ki - 1) - p for di, ki, p in zip(d, k, module.padding)]
            if grads is not None:  # the output size as called (forward(x, output_size=...) included)
                out = grads[i].shape[3:]
            else:
                out = [(n - 1) * si - 2 * p + di * (ki - 1) + op + 1
                       for n, si, p, di, ki, op in zip(x.shape[2:], s, module.padding, d, k, module.output_padding)]
            after = [o - n - b + di * (ki - 1) for o, n, b, di, ki in zip(out, xd.shape[2:], before, d, k)]
            cols.append(patches(xd, k, (1,) * self.ndim, d, list(zip(before, after))))
        return arrange_patches(cols, grads, module.groups)
