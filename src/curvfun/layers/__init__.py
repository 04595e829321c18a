"""The layer registry and the per-layer quantities built on it.

One handler per layer type (:mod:`.linear`, :mod:`.conv`, :mod:`.conv_transpose`,
:mod:`.embedding`, :mod:`.norm`, :mod:`.attention`) arranges what the capture recorded for a
module (or for each of its parts, :class:`LayerPart`) into its family's canonical form; the family
math (:mod:`.affine`, and the functions of :mod:`.embedding` / :mod:`.norm`) is written once per
family. :func:`register_layer` adds a
module class (a user's own included); :func:`handler_for` is the one lookup every route uses.
"""

from __future__ import annotations

from torch import nn

from .attention import MultiheadAttentionHandler
from .conv import ConvHandler, im2col
from .conv_transpose import ConvTransposeHandler
from .data import (
    LayerData,
    column,
    layer_batch_grads,
    layer_column_rows,
    layer_data,
    layer_diag_fisher,
    per_sample_layer_grads,
    per_sample_layer_sq_norms,
)
from .embedding import EmbeddingHandler
from .linear import LinearHandler
from .norm import NormHandler
from .registry import (
    FAMILIES,
    LayerHandler,
    LayerPart,
    handler_for,
    part_name,
    register_layer,
    registered_layers,
    unregister_layer,
)

__all__ = [
    "FAMILIES", "LayerHandler", "LayerPart", "part_name", "register_layer", "unregister_layer", "registered_layers", "handler_for",
    "LayerData", "layer_data", "layer_batch_grads", "per_sample_layer_grads", "per_sample_layer_sq_norms", "column",
    "layer_diag_fisher", "layer_column_rows", "im2col",
]

register_layer(nn.Linear, LinearHandler())
register_layer(nn.Conv1d, ConvHandler(1))
register_layer(nn.Conv2d, ConvHandler(2))
register_layer(nn.Conv3d, ConvHandler(3))
register_layer(nn.ConvTranspose1d, ConvTransposeHandler(1))
register_layer(nn.ConvTranspose2d, ConvTransposeHandler(2))
register_layer(nn.ConvTranspose3d, ConvTransposeHandler(3))
register_layer(nn.Embedding, EmbeddingHandler())
for _norm in (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm,
              nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
    register_layer(_norm, NormHandler())
register_layer(nn.MultiheadAttention, MultiheadAttentionHandler())
