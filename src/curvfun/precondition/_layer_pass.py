"""Plumbing shared by the makers that read layer inputs and output-gradients during their pass
(K-BFGS, SENG, SMW natural gradient): which modules to record, and the captured data as
:class:`~curvfun.layers.LayerData` once a backward pass has filled the zero perturbations' ``.grad``.

The recording itself is :func:`curvfun.capture.record_layers` (forward hooks that exist only for
the duration of the ``with`` block and add a zero perturbation ε to each output); the
output-gradient of a module is ``ε.grad`` after any backward pass, or the result of
``torch.autograd.grad(..., ε)``.
"""

from __future__ import annotations

import warnings
from typing import Mapping

import optree
import torch
from torch import Tensor, nn

from ..capture import LayerRecord, ModuleInfo, _check_versions, layer_kind, parameter_uses_outside
from ..layers import LayerData, layer_data
from ..layers.registry import LayerHandler, handler_for

__all__ = [
    "module_infos", "eps_leaves", "records_to_data", "linear_or_conv_reason", "user_reduction", "backward_with_rows",
    "rows_route_module", "holds_gradient", "add_grad", "name_outside_uses",
]


def linear_or_conv_reason(module: nn.Module, maker: str | None = None) -> str | None:
    """None for a layer the registry serves as a plain affine map with ``weight`` / ``bias`` stored
    as ``[out, in...]`` (Linear, Conv1d/2d/3d), else why not. With ``maker`` (its name), grouped
    convolutions are refused too (that maker's factors need groups=1)."""
    h = handler_for(module)
    if h is None or h.family != "affine" or h.params != LayerHandler.params or h.weight_layout(module):
        return f"unsupported layer class {type(module).__name__} (Linear and convolutions only)"
    why = h.reason(module)
    if why is not None:
        return f"unsupported layer {why}"
    if maker is not None and getattr(module, "groups", 1) != 1:
        return f"unsupported layer class {type(module).__name__} with groups={module.groups} ({maker} needs groups=1)"
    return None


def module_infos(modules: Mapping[str, nn.Module]) -> dict[str, ModuleInfo]:
    """:class:`~curvfun.capture.ModuleInfo` of each module the capture can record as one layer
    covering all its trainable parameters (others skipped: a module its handler splits into parts,
    e.g. MultiheadAttention with separate q/k/v weights, is left to the caller's exact route)."""
    infos = {}
    for name, m in modules.items():
        kind = layer_kind(m)
        if kind is None:
            continue
        h = handler_for(m)
        if len(h.parts(m)) != 1:
            continue
        own = {local: h.role_of(local, m) for local, p in m.named_parameters(recurse=False) if p.requires_grad}
        if None in own.values():
            continue
        infos[name] = ModuleInfo(name, m, kind, {role: (f"{name}.{local}" if name else local)
                                                 for local, (_, role) in own.items()})
    return infos


def name_outside_uses(maker, records: Mapping[str, LayerRecord], warned: set[str]) -> None:
    """Warn once per layer (``warned``: the names already warned of) whose parameters reach the
    maker's model output also outside the layer's own calls, recorded with ``tap=True`` (a tied head
    ``h @ emb.weight.T``, a weight read directly): its curvature is formed from its own calls only,
    while its whole gradient is preconditioned with it. A use in the loss alone (a weight penalty)
    does not change the Fisher / GGN and is not named."""
    out = [t for t in optree.tree_leaves(maker.model_output) if isinstance(t, Tensor)]
    for name, attrs in parameter_uses_outside(records, out).items():
        if name not in warned:
            warned.add(name)
            warnings.warn(f"{type(maker).__name__}: layer {name!r} uses {attrs} also outside its own forward (read "
                          f"directly or by another module); its curvature covers its own calls only",
                          UserWarning, stacklevel=5)


def eps_leaves(records: Mapping[str, LayerRecord]) -> list[Tensor]:
    """All zero perturbations of a recording, in record order (one per module call)."""
    return [e for r in records.values() for e in r.eps]


def records_to_data(
    records: Mapping[str, LayerRecord], scale: float = 1.0, grads: list[Tensor] | None = None
) -> dict[str, LayerData]:
    """LayerData (single output-gradient column) of every module that was called.

    ``grads``: output-gradients in :func:`eps_leaves` order (from ``torch.autograd.grad``); by
    default each ``ε.grad`` (after ``backward()``). Each is multiplied by ``scale`` (e.g. N to turn
    gradients of a mean loss into gradients of the per-sample losses).
    """
    _check_versions(records)  # a layer input modified in place after the layer read it: error
    out = {}
    i = 0
    for name, rec in records.items():
        if not rec.inputs:
            continue
        gs = []
        for e in rec.eps:
            g = grads[i] if grads is not None else e.grad
            i += 1
            if g is None:
                g = torch.zeros_like(e)
            gs.append((g * scale).unsqueeze(0))
        rec.grads = gs
        out[name] = layer_data(rec)
    return out


def user_reduction(maker) -> str:
    """The reduction of the user's loss: an ``nn.Module`` loss's ``reduction`` attribute, a
    ``reduction=`` keyword given to ``setup_loss_call``, else ``'mean'`` (the default of
    ``torch.nn.functional`` losses)."""
    fn = maker._loss_fn
    if fn is None:
        return "mean"
    if isinstance(fn, nn.Module) and hasattr(fn, "reduction"):
        return fn.reduction
    return maker._loss_fn_kwargs.get("reduction", "mean")


def rows_route_module(module: nn.Module) -> bool:
    """Whether a layer may take the data-space ("rows") route: a plain ``nn.Linear`` (its own
    ``forward``, not a subclass's), whose trainable parameters are its ``weight`` / ``bias`` held
    directly (no parametrization, no extra adapters), in at least single precision (the R x R Gram
    of float16 rows overflows where the formed gradient does not)."""
    if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
        return False
    trainable = {k for k, p in module.named_parameters() if p.requires_grad}
    w = module._parameters.get("weight")
    return (isinstance(w, Tensor) and w.requires_grad and trainable <= set(module._parameters) <= {"weight", "bias"}
            and torch.finfo(w.dtype).bits >= 32)


def backward_with_rows(
    maker, records: Mapping[str, LayerRecord], fold_bias: bool = False,
) -> dict[str, tuple[Tensor, Tensor]]:
    """The loss's backward in a pass recorded with some Linear layers' own parameters detached
    during their calls (:func:`~curvfun.capture.record_layers` ``detach=``): returns
    ``{name: (a, g)}`` for those layers, a ``[R, d_in]`` the inputs of their detached calls (every
    call's leading dimensions flattened into rows; a trailing ones column when ``fold_bias`` and
    the layer has a trainable bias) and g ``[R, d_out]`` the loss's gradients at those calls' outputs, in the
    weight's dtype: the layers' own part of their weight gradient is gᵀa (of the bias Σ g), which
    the maker forms or preconditions from the rows.

    The backward is the plain ``loss.backward()`` (``maker.backward()``): every leaf accumulates its
    gradient as usual (``.grad`` in place, hooks fire), the zero perturbations included, and a
    detached layer's parameters accumulate only what reaches them outside its detached calls
    (nothing, ``.grad`` untouched, in the usual case), so the caller adds its part to whatever is
    there and the result is exact without any check. No weight-gradient GEMM runs for the detached
    calls. A layer none of whose detached calls reaches the loss is left out of the result."""
    maker.backward()
    rows: dict[str, tuple[Tensor, Tensor]] = {}
    for n, rec in records.items():
        calls = [(x, e) for x, e, d in zip(rec.inputs, rec.eps, rec.detached_calls) if d]
        if not calls or all(e.grad is None for _, e in calls):  # no detached call reaches the loss
            continue
        w = rec.module.weight
        a = _stack_rows([x.reshape(-1, x.shape[-1]) for x, _ in calls]).to(w.dtype)
        g = _stack_rows([(torch.zeros_like(e) if e.grad is None else e.grad).reshape(-1, e.shape[-1])
                         for _, e in calls]).to(w.dtype)
        if fold_bias and rec.module.bias is not None and rec.module.bias.requires_grad:
            a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
        rows[n] = (a, g)
    return rows


def holds_gradient(p: Tensor) -> bool:
    """Whether ``p.grad`` holds something (not None and not all zeros, as after
    ``zero_grad(set_to_none=False)``)."""
    return p.grad is not None and bool(p.grad.any())


def add_grad(p: Tensor, value: Tensor) -> None:
    """``p.grad += value`` in place, or ``p.grad = value`` when there is none."""
    if p.grad is None:
        p.grad = value.to(p.dtype)
    else:
        p.grad.add_(value)


def _stack_rows(parts: list[Tensor]) -> Tensor:
    """The rows of every call, one after another (no copy for a single call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)
