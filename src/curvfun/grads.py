"""Per-sample gradients, their norms, Jacobians and Jacobian-vector products.

Per-sample gradients of every layer the registry serves (:mod:`curvfun.layers`: Linear,
convolutions and transposed convolutions, Embedding, norm layers in eval mode, self-attention)
come from one captured pass (layer inputs and per-sample output-gradients, see
:mod:`curvfun.capture`) as batched outer products; any other parameter falls back to
``torch.func.vmap(torch.func.grad(...))`` restricted to those parameters (a per-sample loop
where the model cannot be vmapped, e.g. recurrent layers). A registered layer's parameter that
the forward also uses *outside* the layer's own call (``x @ self.embed.weight.T``, MHA's
``out_proj`` under cross-attention) is detected by the capture and takes the fallback, named in
a :class:`~curvfun.capture.CaptureFallbackWarning`. Jacobians take the same route with one
output-gradient column per output entry (:mod:`curvfun.rows`). ``model`` may also be a plain
callable ``f(params, *inputs)``: every parameter then takes the fallback.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .capture import capture, check_batch, supported_modules
from .functional import as_tuple, call_model, check_out, check_params, has_train_mode_batchnorm
from .layers import layer_data, per_sample_layer_grads, per_sample_layer_sq_norms
from .layers.affine import prefers_materialising
from .layers.registry import LayerHandler
from .losses import get_likelihood
from .rows import flat, jacobian_rows
from .tree import tree_map
from .memory import check_jacobian_size, check_per_sample_size

__all__ = ["per_sample_grads", "per_sample_grad_norms", "jacobian", "jvp", "vjp"]


def _no_train_batchnorm(model: nn.Module, what: str) -> None:
    bn = has_train_mode_batchnorm(model)
    if bn:
        raise ValueError(
            f"{what} is undefined for BatchNorm in train mode (its output mixes the samples of a batch): "
            f"modules {bn}. Call model.eval() first."
        )


def _vmap_grads(model, params, keys, inputs, targets, lik) -> dict[str, Tensor]:
    """vmap(grad) per-sample gradients for ``keys`` only (the others held fixed); a per-sample
    loop of ``grad`` where the model cannot be vmapped. Inputs are split along their first dim."""
    own = dict(model.named_parameters()) if isinstance(model, nn.Module) else {}
    fixed = {k: v.detach() for k, v in {**own, **params}.items() if k not in keys}
    buffers = {k: b.clone() for k, b in model.named_buffers()} if own or isinstance(model, nn.Module) else {}
    args = as_tuple(inputs)

    def loss_one(sub, x, y):
        xs = tree_map(lambda t: t.unsqueeze(0), x)
        if isinstance(model, nn.Module):
            out = functional_call(model, ({**fixed, **sub}, buffers), xs, tie_weights=True, strict=False)
        else:
            out = model({**fixed, **sub}, *xs)
        return lik.per_sample_unchecked(out, y.unsqueeze(0))[0]

    lik.check(call_model(model, {k: v.detach() for k, v in params.items()}, inputs), targets)
    sub = {k: params[k].detach() for k in keys}
    try:
        return vmap(grad(loss_one), in_dims=(None, 0, 0))(sub, args, targets)
    except RuntimeError:
        # a module without a batching rule, or one that writes in place into a tensor it made
        # itself (nn.LSTM / GRU / RNN initial states): one gradient per sample instead, same numbers
        per = [grad(loss_one)(sub, tree_map(lambda t, n=n: t[n], args), targets[n]) for n in range(targets.shape[0])]
        return {k: torch.stack([g[k] for g in per]) for k in keys}


def _modules(model, params):
    """:func:`curvfun.capture.supported_modules`; a plain callable model has none (exact fallback)."""
    if isinstance(model, nn.Module):
        return supported_modules(model, params)
    return {}, {"": ("a plain callable", list(params))}


def _record_grads(rec, bufs: dict | None = None) -> dict[str, Tensor]:
    """Per-sample gradients of one record: the handler's fast path where it has one (a grouped
    convolution weight backward, no im2col copy), else the family route."""
    fast = rec.info.handler.per_sample_grads(rec.module, rec.inputs, rec.grads, set(rec.info.keys))
    return fast if fast is not None else per_sample_layer_grads(layer_data(rec), bufs or {})


def _fast_grads_preferred(rec) -> bool:
    """Whether a squared norm is cheaper from the formed gradients (handler fast path, O(T·d·o))
    than from T x T Grams, for an affine record with positions."""
    m, h = rec.module, rec.info.handler
    if (h.family != "affine" or type(h).per_sample_grads is LayerHandler.per_sample_grads or not rec.grads
            or "weight" not in rec.info.attrs):
        return False
    T = sum(y[0, 0, 0].numel() for y in rec.grads)
    w = getattr(m, rec.info.attrs["weight"])
    G = h.groups(m)
    o = w.shape[0] // G if h.weight_layout(m) == "" else w.shape[1]
    return prefers_materialising(T, w.numel() // (G * o), o)


def per_sample_grads(
    model: nn.Module,
    params: Mapping[str, Tensor],
    inputs: Any,
    targets: Tensor,
    loss: Any = "cross_entropy",
    out: Mapping[str, Tensor] | None = None,
    create_graph: bool = False,
    return_output: bool = False,
) -> dict[str, Tensor]:
    """∇_θ ℓ_n for every sample: a dict like ``params`` whose leaves have a leading ``[N]``.

    ``mean_n`` of the result is the gradient of the mean loss. ``out``: optional dict of
    preallocated ``[N, *shape]`` buffers (reused across steps, they avoid writing N·P floats
    into fresh pages, the dominant cost for wide layers). Cost: one forward, one backward
    without weight-gradient work, and one batched outer product per layer, O(N·T·P).
    ``create_graph=True``: ``vmap`` of ``grad`` on the parameters and inputs as given, keeping
    the autograd graph to them. ``return_output=True``: ``(grads, output)``.
    """
    params = check_params(model, params)
    N = check_batch(inputs, targets)
    check_out(out, params, N)
    check_per_sample_size("per_sample_grads", params, N)
    _no_train_batchnorm(model, "a per-sample gradient")
    lik = get_likelihood(loss)
    if create_graph:
        res, output = _graph_grads(model, params, inputs, targets, lik)
        return (res, output) if return_output else res
    infos, unsupported = _modules(model, params)
    if torch.compiler.is_compiling():  # the capture's hooks are not traceable: the vmap(grad) route, same numbers
        infos, unsupported = {}, {"": ("compiled", list(params))}
    result: dict[str, Tensor] = {}
    output = None
    if infos:
        cap = capture(model, params, inputs, targets, lik, fisher_type="emp")
        output = cap.output
        unsupported = {**unsupported, **cap.unsupported}  # incl. layers called without the batch dim
        seen: dict[str, int] = {}
        for name, rec in cap.layers.items():
            keys = rec.info.keys
            bufs = {}
            if out is not None and all(keys[p] not in seen for p in keys):
                bufs = {p: out[keys[p]] for p in keys if keys[p] in out}
            grads = _record_grads(rec, bufs)
            for p, gp in grads.items():
                key = keys[p]
                if key in result:  # tied parameter used by several modules
                    result[key] = result[key] + gp
                else:
                    result[key] = gp
                seen[key] = seen.get(key, 0) + 1
    rest = [k for k in params if k not in result]
    covered = {k for _, (_, ks) in unsupported.items() for k in ks}
    vm = [k for k in rest if k in covered]
    if vm:
        result.update(_vmap_grads(model, params, vm, inputs, targets, lik))
    for k in params:  # parameters of supported modules that were never called
        if k not in result:
            result[k] = torch.zeros(N, *params[k].shape, dtype=params[k].dtype, device=params[k].device)
    if out is not None:
        for k, v in result.items():
            if k in out and v.data_ptr() != out[k].data_ptr():
                out[k].copy_(v)
                result[k] = out[k]
    res = {k: result[k] for k in params}
    if not return_output:
        return res
    if output is None:
        with torch.no_grad():
            output = call_model(model, {k: v.detach() for k, v in params.items()}, inputs)
    return res, output


def _graph_grads(model, params, inputs, targets, lik):
    """Per-sample gradients by ``vmap`` of ``grad``, differentiable w.r.t. params and inputs."""
    lik.check(call_model(model, {k: v.detach() for k, v in params.items()}, inputs), targets)

    def one(p, x, y):
        out = call_model(model, p, tree_map(lambda t: t.unsqueeze(0), x))
        return lik.per_sample_unchecked(out, y.unsqueeze(0))[0], out

    g, out = vmap(grad(one, has_aux=True), in_dims=(None, 0, 0))(dict(params), inputs, targets)
    return g, out.squeeze(1)


def per_sample_grad_norms(
    model: nn.Module,
    params: Mapping[str, Tensor],
    inputs: Any,
    targets: Tensor,
    loss: Any = "cross_entropy",
) -> Tensor:
    """‖∇_θ ℓ_n‖ for every sample, ``[N]``, over all of ``params``.

    For Linear and Conv2d layers the squared norm comes from the layer inputs and output
    gradients (``‖g‖²‖a‖²`` per position, or a T x T Gram product for T positions, whichever
    is cheaper) without materialising the per-sample gradients; other parameters fall back to
    the materialised ones. Cost O(N·Σ_layers min(T·d_in·d_out, T²·(d_in+d_out))).
    """
    params = check_params(model, params)
    N = check_batch(inputs, targets)
    _no_train_batchnorm(model, "a per-sample gradient norm")
    lik = get_likelihood(loss)
    infos, unsupported = _modules(model, params)
    # a parameter shared by several modules has cross terms: materialise it
    owners: dict[str, int] = {}
    for info in infos.values():
        for k in info.keys.values():
            owners[k] = owners.get(k, 0) + 1
    sq = torch.zeros(N, dtype=next(iter(params.values())).dtype)
    done: set[str] = set()
    if infos:
        cap = capture(model, params, inputs, targets, lik, fisher_type="emp")
        unsupported = {**unsupported, **cap.unsupported}  # incl. layers called without the batch dim
        shared: dict[str, Tensor] = {}
        for name, rec in cap.layers.items():
            keys = rec.info.keys
            if any(owners[k] > 1 for k in keys.values()):
                for p, gp in _record_grads(rec).items():
                    shared[keys[p]] = shared[keys[p]] + gp if keys[p] in shared else gp
            elif _fast_grads_preferred(rec):
                for gp in _record_grads(rec).values():
                    sq = sq + gp.reshape(N, -1).pow(2).sum(1).to(sq.dtype)
            else:
                sq = sq + per_sample_layer_sq_norms(layer_data(rec)).to(sq.dtype)
            done.update(keys.values())
        for gp in shared.values():
            sq = sq + gp.reshape(N, -1).pow(2).sum(1)
    covered = {k for _, (_, ks) in unsupported.items() for k in ks}
    vm = [k for k in params if k not in done and k in covered]
    if vm:
        for gp in _vmap_grads(model, params, vm, inputs, targets, lik).values():
            sq = sq + gp.reshape(N, -1).pow(2).sum(1)
    return sq.sqrt()


def jacobian(model: nn.Module, params: Mapping[str, Tensor], inputs: Any, flatten: bool = False,
             create_graph: bool = False, return_output: bool = False):
    """Per-sample Jacobians ∂f(x_n)/∂θ: a dict like ``params`` with leaves
    ``[N, *output.shape[1:], *param.shape]``, or with ``flatten=True`` one ``[N, O, P]`` tensor
    (O = entries of a sample's output, P in params order).

    Rows route (:mod:`curvfun.rows`): one capture with one output-gradient column per output
    entry o (``e_o`` at every sample at once: sample n's output depends on sample n only), per
    registered layer one GEMM; other parameters by ``vmap`` over samples of ``jacrev``. Cost
    linear in N: one forward, O batched backwards, O(O·N·P) for the products; memory N·O·P
    (checked against :mod:`curvfun.memory`'s limit). ``create_graph=True``: the exact route
    (``vmap`` of ``jacrev``) on the parameters and inputs as given, so the result keeps the
    autograd graph to them (for backpropagating through a predictive). ``return_output=True``:
    ``(jacobian, output)``."""
    params = check_params(model, params)
    N = check_batch(inputs, None)
    if create_graph:
        check_jacobian_size(model, {k: v.detach() for k, v in params.items()}, inputs, N)
        J, out = _graph_jacobian(model, params, inputs)
    else:
        J, out = jacobian_rows(model, params, inputs)  # [N, O, *shape]
    if flatten:
        res = flat(J, params, 2)
    else:
        res = {k: J[k].reshape(N, *out.shape[1:], *params[k].shape) for k in params}
    return (res, out) if return_output else res


def _graph_jacobian(model, params, inputs):
    """``vmap`` over samples of ``jacrev`` with the graph kept to ``params`` and ``inputs``."""
    def one(p, x):
        out = call_model(model, p, tree_map(lambda t: t.unsqueeze(0), x))
        return out.reshape(-1), out

    J, out = vmap(torch.func.jacrev(one, has_aux=True), in_dims=(None, 0))(dict(params), inputs)
    return J, out.squeeze(1)


def jvp(model: nn.Module, params: Mapping[str, Tensor], inputs: Any, tangent: Mapping[str, Tensor]) -> Tensor:
    """J v: the directional derivative of the batch output along ``tangent`` (forward mode)."""
    params = check_params(model, params)
    _check_like(params, tangent, "tangent")
    detached = {k: v.detach() for k, v in params.items()}
    _, out = torch.func.jvp(lambda p: call_model(model, p, inputs), (detached,), ({k: tangent[k] for k in params},))
    return out


def vjp(model: nn.Module, params: Mapping[str, Tensor], inputs: Any, cotangent: Tensor) -> dict[str, Tensor]:
    """Jᵀ u = Σ_n J_nᵀ u_n for an output-shaped cotangent ``u`` (reverse mode)."""
    params = check_params(model, params)
    detached = {k: v.detach() for k, v in params.items()}
    out, fn = torch.func.vjp(lambda p: call_model(model, p, inputs), detached)
    if cotangent.shape != out.shape:
        raise ValueError(f"cotangent has shape {tuple(cotangent.shape)}, the model output {tuple(out.shape)}")
    return fn(cotangent)[0]


def _check_like(params: Mapping[str, Tensor], vec: Mapping[str, Tensor], what: str) -> None:
    if not isinstance(vec, Mapping) or set(vec) != set(params):
        got = sorted(vec) if isinstance(vec, Mapping) else type(vec).__name__
        raise ValueError(f"{what} must be a dict with the same keys as params {sorted(params)}; got {got}")
    for k in params:
        if vec[k].shape != params[k].shape:
            raise ValueError(f"{what}[{k!r}] has shape {tuple(vec[k].shape)}, params[{k!r}] {tuple(params[k].shape)}")
