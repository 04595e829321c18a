"""Rows routes: per-sample pushed-back output cotangents from one capture.

A *column* is a cotangent ``c_k`` on the model output, ``[N, *output.shape[1:]]`` (one value per
sample). Its *row* for sample n is the pushed-back vector ``r_kn = J_nᵀ c_kn`` (``J_n`` the
Jacobian of sample n's output w.r.t. the parameters; sample n's output depends on sample n only,
so one backward of ``Σ_n c_knᵀ f_n`` gives all N rows at once through the capture's output
gradients). Every route here is linear in N:

* the Jacobian: one column per output entry o (``e_o`` placed at every sample), rows ``[N, O, P]``;
* the GGN / exact Fisher: the columns of a square root of each output Hessian, ``H_n = S_n S_nᵀ``,
  GGN = (1/N) Σ_k w_k Σ_n r_kn r_knᵀ (the exact Fisher's columns of :mod:`curvfun.capture`);
* the MC Fisher: the sampled NLL gradients as columns, weights 1/M.

Registered layers get their rows from the captured inputs and output gradients (family math:
an affine layer's row is ``Σ_t g_t a_tᵀ``); every other parameter (unregistered module, a
parameter used outside its layer, a plain callable model) by the exact fallback: ``vmap`` over
samples of ``jacrev`` restricted to those parameters, contracted with the columns.

Rows are laid out ``[K, N, *param.shape]`` per parameter (a dict in the insertion order of
``params``), or ``[K, N, P]`` flattened in that order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from .capture import capture, output_grad_columns, supported_modules
from .functional import as_tuple, call_model, has_train_mode_batchnorm
from .layers import (
    affine,
    column,
    layer_data,
    layer_diag_fisher,
    per_sample_layer_grads,
)
from .linalg import sym_gram
from .memory import check_dense_size
from .tree import tree_leaves, tree_map

__all__ = [
    "column_rows",
    "diag_from_capture",
    "flat",
    "hessian_sqrt_columns",
    "jacobian_columns",
    "jacobian_rows",
    "layer_rows",
    "module_indices",
    "module_of",
    "output_hessian_columns",
    "rows_shaped",
    "unflat",
]


def flat(tree: Mapping[str, Tensor], params: Mapping[str, Tensor], lead: int) -> Tensor:
    """Leaves ``[*lead_dims, *param.shape]`` concatenated into ``[*lead_dims, P]`` in params order."""
    first = tree[next(iter(params))]
    lead_shape = first.shape[:lead]
    return torch.cat([tree[k].reshape(*lead_shape, -1) for k in params], -1)


def unflat(vec: Tensor, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`flat` over the last dim."""
    out, i = {}, 0
    for k, p in params.items():
        n = p.numel()
        out[k] = vec[..., i : i + n].reshape(vec.shape[:-1] + p.shape)
        i += n
    return out


def _affine_rows(ld, sample_major: bool) -> dict[str, Tensor]:
    """Rows of every column of one affine layer: ``{"weight": [K, N, *W.shape], "bias": [K, N, b]}``
    (``[N, K, ...]`` when ``sample_major``). One batched GEMM, O(K·N·G·T·d·o)."""
    a, g = ld.a, ld.g  # [N, G, T, d], [K, N, G, T, o]
    K, N = g.shape[0], g.shape[1]
    res = {}
    if ld.has_weight:
        if a.shape[2] == 1:  # an outer product per sample and column: one broadcast multiply
            gk = g[:, :, :, 0].transpose(0, 1) if sample_major else g[:, :, :, 0]  # [L1, L2, G, o]
            M = gk.unsqueeze(-1) * a[:, :, 0].unsqueeze(0 if not sample_major else 1).unsqueeze(-2)
        else:
            M = torch.einsum("kngto,ngtd->nkgod" if sample_major else "kngto,ngtd->kngod", g, a)
        res["weight"] = affine.matrix_as_weight(M, ld.weight_shape, ld.layout, lead=2)
    if ld.has_bias:
        b = g.sum(3).reshape(K, N, -1)
        res["bias"] = b.transpose(0, 1) if sample_major else b
    return res


def layer_rows(ld, sample_major: bool = False) -> dict[str, Tensor]:
    """Per-sample gradients of every column of one layer (roles ``"weight"`` / ``"bias"``),
    ``[K, N, *shape]`` (``[N, K, *shape]`` when ``sample_major``)."""
    if ld.kind == "affine":
        return _affine_rows(ld, sample_major)
    per = [per_sample_layer_grads(column(ld, k)) for k in range(ld.g.shape[0])]
    return {p: torch.stack([c[p] for c in per], 1 if sample_major else 0) for p in per[0]}


def _fallback_jacobian(model, params: Mapping[str, Tensor], keys: list[str], inputs: Any) -> dict[str, Tensor]:
    """Exact per-sample Jacobians ``[N, O, *shape]`` of ``keys`` only (others held fixed): ``vmap``
    over samples of ``jacrev``; a per-sample loop where the model cannot be vmapped; ``jacrev`` of
    the whole batch where train-mode BatchNorm couples the samples (f_n then depends on every
    sample, and ∂f_n/∂θ includes that)."""
    args = as_tuple(inputs)
    sub = {k: params[k].detach() for k in keys}
    if isinstance(model, nn.Module) and has_train_mode_batchnorm(model):
        # batch statistics couple the samples: the Jacobian of the whole batch output, O(N²)
        def whole(s):
            out = call_model(model, {**{k: v.detach() for k, v in params.items()}, **s}, inputs)
            return out.reshape(out.shape[0], -1)

        return jacrev(whole)(sub)  # [N, O, *shape]: ∂f_n/∂θ through every sample's use of θ
    if isinstance(model, nn.Module):
        own = dict(model.named_parameters())
        fixed = {k: v.detach() for k, v in {**own, **params}.items() if k not in keys}
        buffers = {k: b.clone() for k, b in model.named_buffers()}

        def f(s, *x):
            return functional_call(model, ({**fixed, **s}, buffers), x, tie_weights=True, strict=False)
    else:
        fixed = {k: v.detach() for k, v in params.items() if k not in keys}

        def f(s, *x):
            return model({**fixed, **s}, *x)

    def one(s, x):
        out = f(s, *tree_map(lambda t: t.unsqueeze(0), x))
        return out.reshape(-1)

    try:
        return vmap(jacrev(one), in_dims=(None, 0))(sub, args)
    except RuntimeError:  # no batching rule (RNN/LSTM/GRU initial states): one sample at a time
        N = tree_leaves(args)[0].shape[0]
        per = [jacrev(one)(sub, tree_map(lambda t, n=n: t[n], args)) for n in range(N)]
        return {k: torch.stack([j[k] for j in per]) for k in keys}


def _fallback_rows(model, params, keys: list[str], inputs, out: Tensor, columns: Callable, sample_major: bool,
                   cot: Tensor | None = None) -> dict[str, Tensor]:
    """Rows of ``keys`` by the exact fallback: per-sample Jacobians contracted with the columns."""
    if cot is None:
        cot, _ = columns(out)
    N, O = out.shape[0], out[0].numel()
    first = params[keys[0]]
    check_dense_size("the exact fallback's per-sample Jacobian", (N, O, sum(params[k].numel() for k in keys)),
                     first.dtype, first.device, instead="register the layers (curvfun.layers.register_layer)")
    J = _fallback_jacobian(model, params, keys, inputs)
    C = cot.reshape(cot.shape[0], N, O).to(first.dtype)
    spec = "kno,no...->nk..." if sample_major else "kno,no...->kn..."
    return {k: torch.einsum(spec, C, J[k]) for k in keys}


def _captured(model, params, inputs, targets, lik, columns: Callable):
    """Capture with custom columns; returns (capture or None, [unsupported keys])."""
    if not isinstance(model, nn.Module) or has_train_mode_batchnorm(model):
        return None, list(params)
    infos, _ = supported_modules(model, params)
    if not infos:
        return None, list(params)
    cap = capture(model, params, inputs, targets, lik or "cross_entropy", fisher_type="exact", columns=columns)
    covered = {k for rec in cap.layers.values() for k in rec.info.keys.values()}
    rest = [k for k in params if k not in covered]
    return cap, rest


def _once(columns: Callable, check: Callable[[int, int], None] | None = None) -> Callable:
    """``columns`` evaluated once (MC columns are random: the capture and the fallback must see the
    same draws); ``check(K, N)`` runs on the first call, i.e. after the forward and before any
    backward or row is allocated."""
    memo: list = []

    def cached(out: Tensor):
        if not memo:
            cols = columns(out)
            if check is not None:
                check(cols[1].shape[0], out.shape[0])
            memo.append(cols)
        return memo[0]

    return cached


def _check_rows(what: str, K: int, N: int, P: int, like: Tensor, sample_major: bool) -> None:
    shape = (N, K, P) if sample_major else (K, N, P)
    check_dense_size(what, shape, like.dtype, like.device,
                     instead="use shape='diag', jvp / vjp, the *_vp products or curvfun.kfac")


def column_rows(model, params: Mapping[str, Tensor], inputs: Any, targets, lik, columns: Callable,
                sample_major: bool = False, what: str = "rows") -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Rows of the columns ``columns(output) -> (cot [K, *output.shape], weights [K])``: a dict like
    ``params`` with leaves ``[K, N, *shape]`` (``[N, K, *shape]`` when ``sample_major``), the weights
    and the (detached) output. Registered layers from the capture, the rest by the exact fallback."""
    first = next(iter(params.values()))
    P = sum(p.numel() for p in params.values())
    columns = _once(columns, lambda K, N: _check_rows(what, K, N, P, first, sample_major))
    cap, rest = _captured(model, params, inputs, targets, lik, columns)
    result: dict[str, Tensor] = {}
    if cap is not None:
        out, weights = cap.output, cap.weights
        for rec in cap.layers.values():
            for role, r in layer_rows(layer_data(rec), sample_major).items():
                key = rec.info.keys[role]
                result[key] = result[key] + r if key in result else r  # tied: sum of the calls
        cot = None
    else:
        with torch.no_grad():
            out = call_model(model, {k: v.detach() for k, v in params.items()}, inputs)
        cot, weights = columns(out)
    if rest:
        result.update(_fallback_rows(model, params, rest, inputs, out, columns, sample_major, cot))
    K, N = weights.shape[0], out.shape[0]
    for k, p in params.items():  # registered layers never called: zero rows
        if k not in result:
            lead = (N, K) if sample_major else (K, N)
            result[k] = torch.zeros(*lead, *p.shape, dtype=p.dtype, device=p.device)
    return {k: result[k] for k in params}, weights, out


def jacobian_columns(output: Tensor) -> tuple[Tensor, Tensor]:
    """One column per output entry o: ``e_o`` at every sample, ``[O, *output.shape]``, weights 1."""
    O = output[0].numel()
    eye = torch.eye(O, dtype=output.dtype, device=output.device)
    cot = eye.reshape(O, 1, *output.shape[1:]).expand(O, *output.shape)
    return cot, torch.ones(O, dtype=output.dtype, device=output.device)


def jacobian_rows(model, params: Mapping[str, Tensor], inputs: Any) -> tuple[dict[str, Tensor], Tensor]:
    """Per-sample Jacobians ``∂f(x_n)/∂θ``: leaves ``[N, O, *shape]`` (O entries per sample's
    output) and the output. Cost: one forward, one batched backward of O columns, and per layer
    one GEMM of O·N·P_layer outputs."""
    rows, _, out = column_rows(model, params, inputs, None, None, jacobian_columns, sample_major=True,
                               what="jacobian")
    return rows, out


def hessian_sqrt_columns(lik, targets: Tensor | None) -> Callable:
    """Columns of the likelihood's Hessian square root (exact Fisher, :mod:`curvfun.capture`)."""
    def columns(output: Tensor):
        return output_grad_columns(output, lik, "exact", targets if hasattr(lik, "mask") else None)
    return columns


def output_hessian_columns(lik, targets: Tensor) -> Callable:
    """Columns from the output Hessians ``H_n = ∇²_f ℓ_n`` by autograd (any loss callable):
    ``H_n = V Λ Vᵀ``, columns ``V √max(Λ, 0)`` (weight +1) and, where some H_n is indefinite,
    ``V √max(-Λ, 0)`` (weight -1), so that Σ_k w_k c_k c_kᵀ = H_n exactly. O(N·O³)."""
    def columns(output: Tensor):
        N, O = output.shape[0], output[0].numel()

        def loss_one(o, y):
            return lik.per_sample_unchecked(o.unsqueeze(0), y.unsqueeze(0))[0]

        try:
            H = vmap(torch.func.hessian(loss_one))(output.detach(), targets)
        except Exception:  # a loss callable that vmap cannot batch: loop
            H = torch.stack([torch.func.hessian(loss_one)(output[n].detach(), targets[n]) for n in range(N)])
        H = H.reshape(N, O, O)
        lam, V = torch.linalg.eigh((H + H.transpose(1, 2)) / 2)
        cols = [V * lam.clamp_min(0).sqrt().unsqueeze(1)]
        w = [torch.ones(O, dtype=H.dtype, device=H.device)]
        if (lam < 0).any():
            cols.append(V * (-lam).clamp_min(0).sqrt().unsqueeze(1))
            w.append(-w[0])
        cot = torch.cat(cols, 2).permute(2, 0, 1).reshape(-1, *output.shape)  # [K, N, O] -> columns
        return cot, torch.cat(w)
    return columns


def module_of(key: str) -> str:
    """The module of parameter ``key``: the name up to its last '.', ``""`` for the root."""
    return key.rsplit(".", 1)[0] if "." in key else ""


def module_indices(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Module name -> indices of its parameters in the flat (params-order) vector."""
    offsets: dict[str, list[Tensor]] = {}
    i = 0
    for k, p in params.items():
        offsets.setdefault(module_of(k), []).append(torch.arange(i, i + p.numel()))
        i += p.numel()
    return {m: torch.cat(idx) for m, idx in offsets.items()}




def rows_shaped(rows: Tensor, weights: Tensor, params: Mapping[str, Tensor], scale: float, shape: str):
    """``scale · Σ_k w_k Σ_n r_kn r_knᵀ`` from rows ``[K, N, P]``, as ``shape``: ``"full"``
    ``[P, P]``, ``"block"`` module -> ``[P_m, P_m]``, ``"diag"`` a dict like ``params``."""
    w = weights.to(rows.dtype).reshape(-1, 1, 1)
    if shape == "diag":
        return unflat((rows.pow(2) * w).sum((0, 1)) * scale, params)
    P = rows.shape[-1]
    if bool((weights >= 0).all()):  # one matrix R with RᵀR, the upper block triangle only
        R = rows.reshape(-1, P) if bool((weights == 1).all()) else (rows * w.sqrt()).reshape(-1, P)

        def gram(idx=None):
            return sym_gram(R if idx is None else R[:, idx]) * scale
    else:  # an indefinite output Hessian: Σ_k w_k R_kᵀ R_k with signed weights
        R, Rw = rows.reshape(-1, P), (rows * w).reshape(-1, P)

        def gram(idx=None):
            A, B = (R, Rw) if idx is None else (R[:, idx], Rw[:, idx])
            M = A.T @ B * scale
            return (M + M.T) / 2

    if shape == "full":
        return gram()
    return {m: gram(idx) for m, idx in module_indices(params).items()}


def diag_from_capture(model, params: Mapping[str, Tensor], inputs: Any, targets, lik, columns: Callable,
                      scale: float) -> tuple[dict[str, Tensor], Tensor]:
    """``scale · Σ_k w_k Σ_n r_kn²`` per parameter without forming rows of more than one layer and
    one column at a time: registered layers by :func:`curvfun.layers.layer_diag_fisher` (affine
    T = 1: ``Σ_k w_k (g_k²)ᵀ(a²)``), the rest by the exact fallback's rows. Returns it and the output."""
    columns = _once(columns)
    cap, rest = _captured(model, params, inputs, targets, lik, columns)
    result: dict[str, Tensor] = {}
    if cap is not None:
        out = cap.output
        N = cap.batch_size
        owners: dict[str, int] = {}
        for rec in cap.layers.values():
            for k in rec.info.keys.values():
                owners[k] = owners.get(k, 0) + 1
        tied = {k for k, c in owners.items() if c > 1}
        for rec in cap.layers.values():
            if tied & set(rec.info.keys.values()):
                rest += [k for k in rec.info.keys.values() if k not in rest]
                continue
            ld = layer_data(rec, cap.weights)
            for role, d in layer_diag_fisher(ld).items():
                result[rec.info.keys[role]] = d * (N * scale)
    else:
        with torch.no_grad():
            out = call_model(model, {k: v.detach() for k, v in params.items()}, inputs)
    if rest:  # unregistered, or tied (its row is the sum over its modules): the exact fallback
        for k, r in _fallback_rows(model, params, rest, inputs, out, columns, False).items():
            w = columns(out)[1] if cap is None else cap.weights
            result[k] = (r.pow(2) * w.to(r.dtype).reshape(-1, *[1] * (r.ndim - 1))).sum((0, 1)) * scale
    for k, p in params.items():
        if k not in result:
            result[k] = torch.zeros_like(p.detach())
    return {k: result[k] for k in params}, out
