"""Per-layer views of a capture: the layer's data as matrices, and per-sample gradients.

For each supported layer type the captured input ``a`` and output-gradient ``g`` are put in
one shape the rest of the library works with:

* Linear / Conv2d: ``a`` is ``[N, G, T, d_in]`` and ``g`` is ``[K, N, G, T, d_out]`` (G =
  groups, 1 for Linear; T = positions: sequence tokens, conv output pixels (im2col), and
  repeated calls of a weight-shared module). The weight gradient of sample n is
  ``Σ_t g_nt a_ntᵀ`` per group, the bias gradient ``Σ_t g_nt``.
* Embedding: ``ids`` ``[N, T]``, ``g`` ``[K, N, T, D]``; weight gradient
  ``Σ_t e_{id_t} g_tᵀ`` (``[V, D]``), zero at ``padding_idx``.
* LayerNorm / BatchNorm: ``a`` is the normalised input x̂ ``[N, T, C]`` (BatchNorm: batch
  statistics in train mode, running statistics in eval mode), ``g`` ``[K, N, T, C]``;
  gradients ``Σ_t g ⊙ x̂`` (weight) and ``Σ_t g`` (bias).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .capture import LayerRecord

__all__ = ["LayerData", "layer_data", "per_sample_layer_grads", "per_sample_layer_sq_norms"]


@dataclass
class LayerData:
    kind: str
    module: nn.Module
    a: Tensor  # see module docstring (ids for embedding)
    g: Tensor | None
    weights: Tensor | None  # column weights [K]
    has_bias: bool
    has_weight: bool = True  # False when params holds only the bias (the weight held fixed)

    @property
    def batch_size(self) -> int:
        return self.a.shape[0]


def _conv_padding(m: nn.Conv2d) -> tuple[int, int]:
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return (0, 0)
        return tuple(d * (k - 1) // 2 for d, k in zip(m.dilation, m.kernel_size))  # 'same', symmetric
    return tuple(m.padding)


def _linear(rec: LayerRecord):
    a = [x.reshape(x.shape[0], -1, x.shape[-1]) for x in rec.inputs]
    g = None if rec.grads is None else [y.reshape(y.shape[0], y.shape[1], -1, y.shape[-1]) for y in rec.grads]
    return _cat(a, 1).unsqueeze(1), None if g is None else _cat(g, 2).unsqueeze(2)


def im2col(x: Tensor, module: nn.Conv2d) -> Tensor:
    """Patches of a Conv2d input, ``[N, Ho·Wo, C_in·kh·kw]`` in the order of
    ``weight.flatten(1)`` (channel, kernel row, kernel column).

    Laid out feature-major underneath (a ``[C_in·kh·kw, N, Ho·Wo]`` buffer filled by kh·kw strided
    copies from the padded, channel-major input, returned as a permuted view), so that
    ``reshape(N·L, D)`` is a view and its Gram ``XᵀX`` one GEMM on contiguous rows of Xᵀ. A
    channels-last patch matrix (or ``F.unfold`` + a transpose) costs 2-3x more copying on CPU."""
    kh, kw = module.kernel_size
    dh, dw = module.dilation
    sh, sw = module.stride
    ph, pw = _conv_padding(module)
    N, C, H, W = x.shape
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xc = F.pad(x.transpose(0, 1), (pw, pw, ph, ph))  # [C, N, H + 2ph, W + 2pw]
    buf = x.new_empty(C, kh, kw, N, Ho, Wo)
    for i in range(kh):
        for j in range(kw):
            buf[:, i, j] = xc[:, :, i * dh: i * dh + sh * (Ho - 1) + 1: sh, j * dw: j * dw + sw * (Wo - 1) + 1: sw]
    return buf.reshape(C * kh * kw, N, Ho * Wo).permute(1, 2, 0)


def _feature_major(y: Tensor) -> Tensor:
    """``[K, N, C, L]`` -> the same values as a ``[K, N, L, C]`` view of a ``[C, K, N, L]`` buffer
    (one copy in runs of L; see :func:`im2col`)."""
    return y.permute(2, 0, 1, 3).contiguous().permute(1, 2, 3, 0)


def _cat(ts: list[Tensor], dim: int) -> Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim)


def _conv(rec: LayerRecord):
    m: nn.Conv2d = rec.module
    G = m.groups
    a_list, g_list = [], []
    for i, x in enumerate(rec.inputs):
        if x.ndim != 4:
            raise ValueError(f"Conv2d {rec.info.name!r}: expected a batched [N, C, H, W] input, got shape {tuple(x.shape)}")
        cols = im2col(x, m)  # [N, L, D]
        N, L, D = cols.shape
        a_list.append(cols.reshape(N, L, G, D // G).transpose(1, 2))
        if rec.grads is not None:
            y = rec.grads[i]  # [K, N, Cout, Ho, Wo]
            K, _, Cout = y.shape[:3]
            gl = _feature_major(y.reshape(K, N, Cout, -1))  # [K, N, L, Cout]
            g_list.append(gl.reshape(K, N, gl.shape[2], G, Cout // G).transpose(2, 3))
    return _cat(a_list, 2), None if rec.grads is None else _cat(g_list, 3)


def _embedding(rec: LayerRecord):
    m: nn.Embedding = rec.module
    ids = torch.cat([x.reshape(x.shape[0], -1) for x in rec.inputs], 1)
    g = None
    if rec.grads is not None:
        g = torch.cat([y.reshape(y.shape[0], y.shape[1], -1, y.shape[-1]) for y in rec.grads], 2)
    return ids, g


def _embedding_g(ld: "LayerData", g: Tensor) -> Tensor:
    """Output gradients with padding positions zeroed: the weight row ``padding_idx`` gets no
    gradient (as in ``nn.Embedding``). The K-FAC factor B keeps them unmasked (the GUIDE's ĝ is
    the gradient w.r.t. the layer output); its A has count 0 at ``padding_idx``."""
    pad = ld.module.padding_idx
    if pad is None:
        return g
    return g * (ld.a != pad).unsqueeze(-1).to(g.dtype)


def _normalised(rec: LayerRecord, x: Tensor) -> Tensor:
    m = rec.module
    if isinstance(m, nn.LayerNorm):
        xhat = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        C = math.prod(m.normalized_shape)
        return xhat.reshape(x.shape[0], -1, C)
    # BatchNorm: channel dim 1
    dims = [0] + list(range(2, x.ndim))
    if m.training or m.running_mean is None:
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
    else:
        shape = [1, -1] + [1] * (x.ndim - 2)
        mean, var = m.running_mean.reshape(shape), m.running_var.reshape(shape)
    xhat = (x - mean) / torch.sqrt(var + m.eps)
    return xhat.movedim(1, -1).reshape(x.shape[0], -1, x.shape[1])


def _norm(rec: LayerRecord):
    m = rec.module
    a = torch.cat([_normalised(rec, x) for x in rec.inputs], 1)
    if rec.grads is None:
        return a, None
    gs = []
    for y in rec.grads:
        if isinstance(m, nn.LayerNorm):
            gs.append(y.reshape(y.shape[0], y.shape[1], -1, a.shape[-1]))
        else:
            gs.append(y.movedim(2, -1).reshape(y.shape[0], y.shape[1], -1, y.shape[2]))
    return a, torch.cat(gs, 2)


def layer_data(rec: LayerRecord, weights: Tensor | None = None) -> LayerData:
    """Arrange one module's record as :class:`LayerData` (see the module docstring)."""
    kind = rec.kind
    if kind == "linear":
        a, g = _linear(rec)
    elif kind == "conv2d":
        a, g = _conv(rec)
    elif kind == "embedding":
        a, g = _embedding(rec)
    elif kind in ("layernorm", "batchnorm"):
        a, g = _norm(rec)
    else:  # pragma: no cover - guarded by capture.layer_kind
        raise ValueError(f"unsupported layer kind {kind!r}")
    # curvature is formed in the parameters' dtype: under autocast the records are bf16/fp16, whose
    # Gram matrices lose the precision the damped inverses need
    dt = next((p.dtype for p in rec.module.parameters() if p.is_floating_point()), None)
    if dt is not None:
        a = a.to(dt) if a.is_floating_point() else a
        g = None if g is None else g.to(dt)
        weights = None if weights is None else weights.to(device=g.device if g is not None else a.device, dtype=dt)
    return LayerData(kind, rec.module, a, g, weights, "bias" in rec.info.keys, "weight" in rec.info.keys)


def _col0(ld: LayerData) -> Tensor:
    if ld.g is None:
        raise ValueError("per-sample gradients need a capture with output gradients (fisher_type='emp')")
    if ld.g.shape[0] != 1:
        raise ValueError("per-sample gradients need a single column (fisher_type='emp')")
    return ld.g[0]


def per_sample_layer_grads(ld: LayerData, out: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    res = _per_sample_layer_grads(ld, out if ld.has_weight else {k: v for k, v in (out or {}).items() if k != "weight"})
    if not ld.has_weight:
        res.pop("weight", None)
    return res


def _per_sample_layer_grads(ld: LayerData, out: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Per-sample gradients ``{"weight": [N, *W.shape], "bias": [N, *b.shape]}`` of one layer
    from its captured data; written into ``out[...]`` when given (preallocated buffers are
    several times faster than fresh pages for large layers). Cost O(N·T·d_in·d_out)."""
    m, g, N = ld.module, _col0(ld), ld.batch_size
    res: dict[str, Tensor] = {}
    out = out or {}
    if ld.kind in ("linear", "conv2d"):
        a = ld.a  # [N, G, T, d]
        G, T, d = a.shape[1:]
        o = g.shape[-1]
        wbuf = out.get("weight")
        if wbuf is not None:
            dst = wbuf.view(N * G, o, d)
            if T == 1:
                torch.mul(g.reshape(N * G, o, 1), a.reshape(N * G, 1, d), out=dst)
            else:
                torch.bmm(g.reshape(N * G, T, o).transpose(1, 2), a.reshape(N * G, T, d), out=dst)
            res["weight"] = wbuf
        elif T == 1:
            res["weight"] = (g.reshape(N * G, o, 1) * a.reshape(N * G, 1, d)).reshape(N, *m.weight.shape)
        else:
            res["weight"] = torch.bmm(g.reshape(N * G, T, o).transpose(1, 2), a.reshape(N * G, T, d)).reshape(
                N, *m.weight.shape
            )
        if ld.has_bias:
            b = g.sum(2).reshape(N, -1)
            res["bias"] = out["bias"].copy_(b) if "bias" in out else b
    elif ld.kind == "embedding":
        ids = ld.a  # [N, T]
        g = _embedding_g(ld, g)
        D = g.shape[-1]
        dst = out.get("weight")
        if dst is None:
            dst = torch.zeros(N, m.num_embeddings, D, dtype=g.dtype, device=g.device)
        else:
            dst.zero_()
        dst.scatter_add_(1, ids.unsqueeze(-1).expand(N, ids.shape[1], D), g)
        res["weight"] = dst
    else:  # layernorm / batchnorm
        w = (g * ld.a).sum(1).reshape(N, *m.weight.shape)
        res["weight"] = out["weight"].copy_(w) if "weight" in out else w
        if ld.has_bias:
            b = g.sum(1).reshape(N, *m.bias.shape)
            res["bias"] = out["bias"].copy_(b) if "bias" in out else b
    return res


def per_sample_layer_sq_norms(ld: LayerData) -> Tensor:
    """``‖∇_layer ℓ_n‖²`` for each n, ``[N]``, without materialising per-sample gradients
    where that is cheaper: for T positions, ``‖Σ_t g_t a_tᵀ‖² = Σ_{t,t'} (a_t·a_t')(g_t·g_t')``
    costs O(T²(d_in+d_out)) instead of O(T·d_in·d_out) (the cheaper one is used)."""
    g, N = _col0(ld), ld.batch_size
    if not ld.has_weight:  # bias only (embeddings have no bias)
        return per_sample_layer_grads(ld)["bias"].reshape(N, -1).pow(2).sum(1)
    if ld.kind in ("linear", "conv2d"):
        a = ld.a
        G, T, d = a.shape[1:]
        o = g.shape[-1]
        if T == 1:
            sq = (a.pow(2).sum(-1) * g.pow(2).sum(-1)).reshape(N, -1).sum(1)
        elif T * (d + o) <= d * o:
            sq = ((a @ a.transpose(-1, -2)) * (g @ g.transpose(-1, -2))).reshape(N, -1).sum(1)
        else:
            sq = (g.transpose(-1, -2) @ a).pow(2).reshape(N, -1).sum(1)
        if ld.has_bias:
            sq = sq + g.sum(2).pow(2).reshape(N, -1).sum(1)
        return sq
    if ld.kind == "embedding":
        ids = ld.a
        g = _embedding_g(ld, g)
        same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(g.dtype)  # [N, T, T]
        return (same * (g @ g.transpose(-1, -2))).reshape(N, -1).sum(1)
    sq = (g * ld.a).sum(1).pow(2).sum(-1)
    if ld.has_bias:
        sq = sq + g.sum(1).pow(2).sum(-1)
    return sq


def column(ld: LayerData, k: int) -> LayerData:
    """The layer data restricted to output-gradient column ``k`` (weight not applied)."""
    return LayerData(ld.kind, ld.module, ld.a, ld.g[k : k + 1], None, ld.has_bias, ld.has_weight)


def layer_diag_fisher(ld: LayerData) -> dict[str, Tensor]:
    """diag F = (1/N) Σ_k w_k Σ_n (∇ℓ_nk)² per parameter of the layer (``{"weight", "bias"}``).

    Linear/Conv2d with T = 1: from (g²)ᵀ(a²) without per-sample gradients, O(K·N·d_in·d_out);
    otherwise from the materialised per-sample gradients of each column.
    """
    if ld.g is None or ld.weights is None:
        raise ValueError("a diagonal Fisher needs output gradients and column weights")
    N = ld.batch_size
    w = ld.weights
    if ld.kind in ("linear", "conv2d") and ld.a.shape[2] == 1:
        a2 = ld.a[:, :, 0].pow(2)  # [N, G, d]
        g2 = (ld.g[:, :, :, 0].pow(2) * w.reshape(-1, 1, 1, 1).to(ld.g.dtype)).sum(0)  # [N, G, o]
        W = torch.einsum("ngo,ngd->god", g2, a2) / N
        out = {"weight": W.reshape(ld.module.weight.shape)}
        if ld.has_bias:
            out["bias"] = g2.sum(0).reshape(-1) / N
        return out
    acc: dict[str, Tensor] = {}
    for k in range(ld.g.shape[0]):
        for p, gp in per_sample_layer_grads(column(ld, k)).items():
            v = w[k] * gp.pow(2).sum(0) / N
            acc[p] = acc[p] + v if p in acc else v
    return acc


def layer_column_rows(ld: LayerData) -> Tensor:
    """Rows U ``[K·N, P_layer]`` with F_layer = UᵀU: per-sample gradients of every column,
    scaled by sqrt(w_k / N), flattened in the layer's parameter order (weight, bias)."""
    if ld.g is None or ld.weights is None:
        raise ValueError("layer rows need output gradients and column weights")
    N = ld.batch_size
    rows = []
    for k in range(ld.g.shape[0]):
        grads = per_sample_layer_grads(column(ld, k))
        r = torch.cat([grads[p].reshape(N, -1) for p in ("weight", "bias") if p in grads], 1)
        rows.append(r * (ld.weights[k].to(r.dtype) / N).sqrt())
    return torch.cat(rows, 0)


def conv2d_per_sample_grads(rec: LayerRecord) -> dict[str, Tensor]:
    """Per-sample gradients of a Conv2d straight from its captured input and output gradients
    (first column), without im2col: the weight gradient of every sample is one grouped
    convolution-weight backward with the batch folded into the groups (N·G groups), summed over
    the module's calls. Same result as ``per_sample_layer_grads(layer_data(rec))``, O(N·P) memory."""
    m: nn.Conv2d = rec.module
    if rec.grads is None or any(y.shape[0] != 1 for y in rec.grads):
        raise ValueError("per-sample gradients need a single output-gradient column (fisher_type='emp')")
    keys = rec.info.keys
    w_total = b_total = None
    for x, y in zip(rec.inputs, rec.grads):
        g = y[0]
        N, Cin, H, W = x.shape
        Cout = g.shape[1]
        if "weight" in keys:
            w = torch.nn.grad.conv2d_weight(
                x.reshape(1, N * Cin, H, W), (N * Cout, Cin // m.groups, *m.kernel_size),
                g.reshape(1, N * Cout, *g.shape[2:]), m.stride, _conv_padding(m), m.dilation, N * m.groups,
            ).reshape(N, *m.weight.shape)
            w_total = w if w_total is None else w_total + w
        if "bias" in keys:
            b = g.sum((2, 3))
            b_total = b if b_total is None else b_total + b
    out = {}
    if w_total is not None:
        out["weight"] = w_total
    if b_total is not None:
        out["bias"] = b_total
    return out


def conv2d_prefers_materialising(rec: LayerRecord) -> bool:
    """Whether ‖per-sample grad‖² is cheaper from the materialised gradients (O(T·d·o)) than
    from the T x T Gram products (O(T²·(d+o))), for a Conv2d record."""
    m: nn.Conv2d = rec.module
    T = sum(y.shape[-1] * y.shape[-2] for y in rec.grads) if rec.grads else 1
    d = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
    o = m.out_channels // m.groups
    return T > 1 and T * (d + o) > d * o
