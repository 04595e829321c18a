"""``nn.MultiheadAttention`` (and so ``nn.Transformer*Layer``): the packed input projection as an
affine layer, ``out_proj`` as the Linear it is.

``F.multi_head_attention_forward`` reads ``in_proj_weight`` and ``out_proj.weight`` directly, so
neither is seen by a plain forward hook. While recorded, the module runs the same computation
written with an explicit projection ``qkv = x W_inᵀ + b_in`` (recorded as one affine call over the
T positions: K-FAC-expand, as for a Linear on sequences) and a *call* of ``out_proj`` (recorded by
its own handler). Self-attention (``query is key is value``) is one affine map ``[N, T, E] -> 3E`` (B is 3E x 3E);
cross-attention is three groups of the packed weight (q on the query, k and v on key and value,
each zero-padded to the longest sequence and counted by its own positions). Batched input and
packed weights only (no kdim/vdim or ``bias_k``/``bias_v``; ``add_zero_attn`` is handled); any other call runs
the original forward unrecorded, and its parameters are reported as not captured (they take the
exact fallback).
Attention dropout in train mode draws its own mask (curvature with dropout is a sample anyway).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .linear import tokens_as_positions
from .registry import LayerHandler

__all__ = ["MultiheadAttentionHandler", "attention_core"]


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def attention_core(q: Tensor, k: Tensor, v: Tensor, heads: int, attn_mask: Tensor | None,
                   key_padding_mask: Tensor | None, dropout: float, need_weights: bool,
                   average_attn_weights: bool) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention of batch-first ``[N, T, E]`` projections with ``heads`` heads,
    PyTorch's mask conventions (bool: True = masked; float: added; ``attn_mask`` ``[T, S]`` or
    ``[N·H, T, S]``; ``key_padding_mask`` ``[N, S]``). Returns ``[N, T, E]`` and the weights
    (averaged over heads when asked) or ``None``. O(N·H·T·S·E/H)."""
    N, T, E = q.shape
    S = k.shape[1]
    Dh = E // heads
    qh, kh, vh = (t.reshape(N, -1, heads, Dh).transpose(1, 2) for t in (q, k, v))  # [N, H, *, Dh]
    mask = _additive(attn_mask, q.dtype)
    if mask is not None and mask.ndim == 3:
        mask = mask.reshape(N, heads, T, S)
    kpm = _additive(key_padding_mask, q.dtype)
    if kpm is not None:
        kpm = kpm.reshape(N, 1, 1, S)
        mask = kpm if mask is None else mask + kpm
    if not need_weights:  # the fused kernel (the weights are not returned)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, dropout_p=dropout)
        return out.transpose(1, 2).reshape(N, T, E), None
    scores = (qh / math.sqrt(Dh)) @ kh.transpose(-1, -2)  # [N, H, T, S]
    if mask is not None:
        scores = scores + mask
    w = torch.softmax(scores, -1)
    if dropout > 0:
        w = F.dropout(w, dropout)
    out = (w @ vh).transpose(1, 2).reshape(N, T, E)
    if not need_weights:
        return out, None
    return out, w.mean(1) if average_attn_weights else w


class MultiheadAttentionHandler(LayerHandler):
    """The packed ``in_proj`` of ``nn.MultiheadAttention``: weight ``[3E, E]``, bias ``[3E]``."""

    family = "affine"
    params = {"weight": "in_proj_weight", "bias": "in_proj_bias"}

    def reason(self, module: nn.Module) -> str | None:
        if not module._qkv_same_embed_dim:
            return "MultiheadAttention with kdim/vdim (separate q/k/v weights)"
        if module.bias_k is not None:
            return "MultiheadAttention with add_bias_kv (bias_k / bias_v are not projections)"
        return None

    def arrange(self, module: nn.Module, inputs, grads):
        return tokens_as_positions(inputs, grads)

    def groups(self, module: nn.Module) -> int:
        return 1

    def arrange_record(self, record):
        """Self-attention: one affine map ``[N, 1, T, E] -> 3E``. Cross-attention: three groups
        (q from the query, k and v from key and value) ``[N, 3, T, E]``, each zero-padded to the
        longest and counted by its own positions."""
        if record.mode != "cross":
            return (*tokens_as_positions(record.inputs, record.grads), None)
        parts = [tokens_as_positions(record.inputs[j::3], None if record.grads is None else record.grads[j::3])
                 for j in range(3)]
        lengths = [a.shape[2] for a, _ in parts]
        T = max(lengths)

        def pad(t: Tensor, dim: int) -> Tensor:
            return F.pad(t, (0, 0) * (t.ndim - 1 - dim) + (0, T - t.shape[dim])) if t.shape[dim] < T else t

        a = torch.cat([pad(a, 2) for a, _ in parts], 1)
        g = None if record.grads is None else torch.cat([pad(g, 3) for _, g in parts], 2)
        return a, g, torch.tensor(lengths, device=a.device)

    def forward_override(self, module: nn.Module):
        original = type(module).forward

        def forward(rec, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                    average_attn_weights=True, is_causal=False):
            mode = "self" if (query is key and key is value) else "cross"
            if query.ndim != 3 or (rec.mode is not None and rec.mode != mode):
                rec.not_captured("called on an unbatched input" if query.ndim != 3 else
                                 "called both as self- and as cross-attention in one pass")
                return original(module, query, key, value, key_padding_mask=key_padding_mask,
                                need_weights=need_weights, attn_mask=attn_mask,
                                average_attn_weights=average_attn_weights, is_causal=is_causal)
            rec.mode = mode
            bf = (lambda t: t) if module.batch_first else (lambda t: t.transpose(0, 1))
            x = bf(query)
            if is_causal and attn_mask is None:
                attn_mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
            W, b = module.in_proj_weight, module.in_proj_bias
            if mode == "self":
                q, k, v = rec.add_call(x, F.linear(x, W, b)).chunk(3, -1)
            else:  # three affine maps of one packed weight, each on its own input (recorded in turn)
                Ws, bs = W.chunk(3), (None,) * 3 if b is None else b.chunk(3)
                q, k, v = (rec.add_call(t, F.linear(t, Wj, bj)) for t, Wj, bj in zip((x, bf(key), bf(value)), Ws, bs))
            if module.add_zero_attn:  # one all-zero key and value appended, visible to every query
                k, v = (torch.cat([t, t.new_zeros(t.shape[0], 1, t.shape[2])], 1) for t in (k, v))
                attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
                key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
            out, weights = attention_core(q, k, v, module.num_heads, attn_mask, key_padding_mask,
                                          module.dropout if module.training else 0.0, need_weights,
                                          average_attn_weights)
            out = module.out_proj(out)
            return (out if module.batch_first else out.transpose(0, 1)), weights

        return forward
