"""``nn.Embedding``: ids ``[N, T]`` and output gradients ``[K, N, T, D]``.

The weight gradient of sample n is ``Σ_t e_{id_t} g_tᵀ`` (``[V, D]``), zero at ``padding_idx``.
``max_norm`` (renormalises the weight in place during the forward) and ``scale_grad_by_freq``
(scales by batch counts) are not captured: such modules take the exact fallback.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .registry import LayerHandler

__all__ = ["EmbeddingHandler", "masked_grads", "per_sample_grads", "per_sample_sq_norms"]


class EmbeddingHandler(LayerHandler):
    family = "embedding"
    params = {"weight": "weight"}

    def reason(self, module: nn.Module) -> str | None:
        if module.max_norm is not None or module.scale_grad_by_freq:
            return "Embedding(max_norm / scale_grad_by_freq)"
        return None

    def arrange(self, module: nn.Module, inputs, grads):
        ids = torch.cat([x.reshape(x.shape[0], -1) for x in inputs], 1)
        if grads is None:
            return ids, None
        return ids, torch.cat([y.reshape(y.shape[0], y.shape[1], -1, y.shape[-1]) for y in grads], 2)


def masked_grads(ids: Tensor, g: Tensor, padding_idx: int | None) -> Tensor:
    """Output gradients with padding positions zeroed: the row ``padding_idx`` gets no gradient
    (as in ``nn.Embedding``). K-FAC's B keeps them (ĝ is the gradient w.r.t. the layer output)."""
    if padding_idx is None:
        return g
    return g * (ids != padding_idx).unsqueeze(-1).to(g.dtype)


def per_sample_grads(ids: Tensor, g: Tensor, num_embeddings: int, padding_idx: int | None,
                     out: Tensor | None = None) -> Tensor:
    """``[N, V, D]`` by one scatter-add of the ``[N, T, D]`` column ``g``. O(N·(V + T)·D)."""
    g = masked_grads(ids, g, padding_idx)
    N, T, D = g.shape
    if out is None:
        out = torch.zeros(N, num_embeddings, D, dtype=g.dtype, device=g.device)
    else:
        out.zero_()
    return out.scatter_add_(1, ids.unsqueeze(-1).expand(N, T, D), g)


def per_sample_sq_norms(ids: Tensor, g: Tensor, padding_idx: int | None) -> Tensor:
    """``‖Σ_t e_{id_t} g_tᵀ‖² = Σ_{t,t'} [id_t = id_t'] g_t·g_t'``, ``[N]``, O(N·T²·D)."""
    g = masked_grads(ids, g, padding_idx)
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(g.dtype)  # [N, T, T]
    return (same * (g @ g.transpose(-1, -2))).reshape(ids.shape[0], -1).sum(1)
