"""``nn.MultiheadAttention`` (and so ``nn.Transformer*Layer``): its input projections as affine
layers, ``out_proj`` as the Linear it is.

``F.multi_head_attention_forward`` reads the projection weights and ``out_proj.weight`` directly,
so none is seen by a plain forward hook. While recorded, the module runs the same computation
written with explicit projections (each recorded as an affine call over its T positions:
K-FAC-expand, as for a Linear on sequences) and a *call* of ``out_proj`` (recorded by its own
handler). The layers (:meth:`MultiheadAttentionHandler.parts`):

* packed weights (``kdim = vdim = E``): one layer, ``in_proj_weight`` ``[3E, E]`` and
  ``in_proj_bias``. Self-attention (``query is key is value``) is one affine map
  ``[N, T, E] -> 3E`` (B is 3E x 3E); cross-attention is three groups of the packed weight (q on
  the query, k and v on key and value, each zero-padded to the longest sequence and counted by
  its own positions);
* separate weights (``kdim`` or ``vdim`` ≠ E): ``q_proj_weight`` ``[E, E]``, ``k_proj_weight``
  ``[E, kdim]`` and ``v_proj_weight`` ``[E, vdim]``, each a weight-only affine map on its own
  input, and ``in_proj_bias`` as the bias of the three: an affine map of the constant input 1 in
  three groups (A = 1, B per projection). Their bias is therefore always a separate block, also
  under ``bias="folded"``;
* ``add_bias_kv``: ``bias_k`` and ``bias_v`` ``[1, 1, E]`` are the key and value appended at one
  extra position, each an affine map of the constant input 1 there.

``add_zero_attn`` is handled. An unbatched call runs the original forward unrecorded, and its
parameters are reported as not captured (they take the exact fallback). Attention dropout in
train mode draws its own mask (curvature with dropout is a sample anyway).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .linear import tokens_as_positions
from .registry import LayerHandler, LayerPart

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
    """``nn.MultiheadAttention``'s input projections (see the module docstring for its layers)."""

    family = "affine"
    params = {"weight": "in_proj_weight", "bias": "in_proj_bias"}

    def parts(self, module: nn.Module) -> tuple[LayerPart, ...]:
        if module._qkv_same_embed_dim:
            parts = [LayerPart("", self.params)]
        else:
            parts = [LayerPart(f"{x}_proj_weight", {"weight": f"{x}_proj_weight"}) for x in "qkv"]
            parts.append(LayerPart("in_proj_bias", {"bias": "in_proj_bias"}))
        if module.bias_k is not None:
            parts += [LayerPart("bias_k", {"bias": "bias_k"}), LayerPart("bias_v", {"bias": "bias_v"})]
        return tuple(parts)

    def arrange(self, module: nn.Module, inputs, grads):
        return tokens_as_positions(inputs, grads)

    def groups(self, module: nn.Module) -> int:
        return 1

    def arrange_record(self, record):
        """The packed projection in self-attention, a separate projection, ``bias_k`` / ``bias_v``:
        one affine map ``[N, 1, T, d]``. The packed projection in cross-attention and the separate
        projections' ``in_proj_bias``: three groups (q, k, v; their calls come in that order)
        ``[N, 3, T, d]``, each zero-padded to the longest and counted by its own positions."""
        if not (record.info.part == "in_proj_bias" or (record.info.part == "" and record.mode == "cross")):
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

        def forward(recs, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                    average_attn_weights=True, is_causal=False):
            recs = recs if isinstance(recs, dict) else {"": recs}
            mode = "self" if (query is key and key is value) else "cross"
            packed = recs.get("")
            why = ("called on an unbatched input" if query.ndim != 3 else
                   "called both as self- and as cross-attention in one pass"
                   if packed is not None and packed.mode not in (None, mode) else None)
            if why is not None:
                for r in recs.values():
                    r.not_captured(why)
                return original(module, query, key, value, key_padding_mask=key_padding_mask,
                                need_weights=need_weights, attn_mask=attn_mask,
                                average_attn_weights=average_attn_weights, is_causal=is_causal)
            if packed is not None:
                packed.mode = mode

            def affine(part: str, x: Tensor, W: Tensor | None, b: Tensor | None, y: Tensor | None = None) -> Tensor:
                """``x Wᵀ + b`` (or the given ``y``), recorded as a call of ``part`` when it has a record."""
                y = F.linear(x, W, b) if y is None else y
                r = recs.get(part)
                return y if r is None else r.add_call(x, y)

            bf = (lambda t: t) if module.batch_first else (lambda t: t.transpose(0, 1))
            x = bf(query)
            if is_causal and attn_mask is None:
                attn_mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
            b = module.in_proj_bias
            bs = (None,) * 3 if b is None else b.chunk(3)
            if module._qkv_same_embed_dim:
                W = module.in_proj_weight
                if mode == "self":
                    q, k, v = affine("", x, W, b).chunk(3, -1)
                else:  # three affine maps of one packed weight, each on its own input (recorded in turn)
                    q, k, v = (affine("", t, Wj, bj) for t, Wj, bj in zip((x, bf(key), bf(value)), W.chunk(3), bs))
            else:  # three weights, and the bias of the three as a map of the constant 1 (recorded in turn)
                ins = (x, bf(key), bf(value))
                q, k, v = (affine(f"{n}_proj_weight", t, getattr(module, f"{n}_proj_weight"), None)
                           for n, t in zip("qkv", ins))
                if b is not None:
                    q, k, v = (affine("in_proj_bias", t.new_ones(*t.shape[:-1], 1), None, None, y + bj)
                               for t, y, bj in zip(ins, (q, k, v), bs))
            if module.bias_k is not None:  # a learned key and value appended at one more position
                one = x.new_ones(x.shape[0], 1, 1)
                k = torch.cat([k, affine("bias_k", one, None, None, module.bias_k.reshape(1, 1, -1).expand(x.shape[0], 1, -1))], 1)
                v = torch.cat([v, affine("bias_v", one, None, None, module.bias_v.reshape(1, 1, -1).expand(x.shape[0], 1, -1))], 1)
                attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
                key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
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
