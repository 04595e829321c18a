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

import torch
from torch import Tensor, nn

from ..capture import LayerRecord, ModuleInfo, _check_versions, layer_kind
from ..kron_rows import gradient_from_rows
from ..layers import LayerData, layer_data

__all__ = [
    "module_infos", "eps_leaves", "records_to_data", "linear_or_conv_reason", "user_reduction", "backward_with_rows",
]


def linear_or_conv_reason(module: nn.Module) -> str | None:
    """None for a Linear / Conv2d the capture supports, else why not."""
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        return f"unsupported layer class {type(module).__name__} (Linear and Conv2d only)"
    if layer_kind(module) is None:
        return f"unsupported layer class {type(module).__name__} with padding_mode={module.padding_mode!r} / padding={module.padding!r}"
    return None


def module_infos(modules: Mapping[str, nn.Module]) -> dict[str, ModuleInfo]:
    """:class:`~curvfun.capture.ModuleInfo` of each module the capture can record (others skipped)."""
    infos = {}
    for name, m in modules.items():
        kind = layer_kind(m)
        if kind is None:
            continue
        keys = {
            local: (f"{name}.{local}" if name else local)
            for local, p in m.named_parameters(recurse=False)
            if p.requires_grad and local in ("weight", "bias")
        }
        infos[name] = ModuleInfo(name, m, kind, keys)
    return infos


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


def backward_with_rows(
    maker, records: Mapping[str, LayerRecord], fast: list[str], checked: set[str], off: set[str],
    fold_bias: bool = False,
) -> dict[str, tuple[Tensor, Tensor]]:
    """The loss's backward for a maker that forms the gradients of the Linear layers ``fast`` itself,
    from their rows: returns ``{name: (a, g)}`` with a ``[R, d_in]`` the layer's inputs (every call's
    leading dimensions flattened into rows; a trailing ones column when ``fold_bias`` and the layer
    has a bias) and g ``[R, d_out]`` the loss's gradients at its outputs, in the weight's dtype, so
    that the weight gradient is gᵀa (the bias gradient Σ g).

    One ``torch.autograd.grad`` call returns the output gradients (through the zero perturbations)
    of the ``fast`` layers and the parameter gradients of every other parameter (accumulated into
    ``.grad``); the ``fast`` layers' own parameter gradients are not computed, which saves their
    weight-gradient GEMMs. A layer none of whose outputs reaches the loss is left out of the result
    (its parameters keep ``.grad`` as it was, as after ``loss.backward()``). A layer not in
    ``checked`` is checked once against autograd's gradient (a parameter used outside the layer's
    own call would differ; to ~1e-4 relative in float32, 1e-9 in float64, 8 units of rounding for
    reduced-precision records (autocast), so an outside use smaller than that goes unnoticed): on a mismatch it joins ``off``,
    its parameters get autograd's gradient, it is left out of the result, and a warning says so.
    Counts as the pass's backward (``maker._backward_done()``)."""
    loss = maker._loss_to_differentiate()
    own = {id(p) for n in fast for p in maker.module_params(n).values()}
    others = [p for p in maker.model.parameters() if p.requires_grad and id(p) not in own]
    check = [n for n in fast if n not in checked]
    check_params = [p for n in check for p in maker.module_params(n).values()]
    leaves = [e for n in fast for e in records[n].eps]
    grads = torch.autograd.grad(loss, leaves + others + check_params, allow_unused=True)
    g_eps, g_others = grads[:len(leaves)], grads[len(leaves):len(leaves) + len(others)]
    g_check = grads[len(leaves) + len(others):]
    for p, g in zip(others, g_others):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g
    rows: dict[str, tuple[Tensor, Tensor]] = {}
    i = 0
    for n in fast:
        rec = records[n]
        k = len(rec.eps)
        gs = g_eps[i:i + k]
        i += k
        if all(g is None for g in gs):  # no output reaches the loss: no gradient, as loss.backward()
            continue
        w = maker.module_params(n)["weight"]
        a = _stack_rows([x.reshape(-1, x.shape[-1]) for x in rec.inputs]).to(w.dtype)
        g = _stack_rows([(torch.zeros_like(e) if ge is None else ge).reshape(-1, e.shape[-1])
                         for ge, e in zip(gs, rec.eps)]).to(w.dtype)
        if fold_bias and "bias" in maker.module_params(n):
            a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
        rows[n] = (a, g)
    j = 0
    for n in check:
        params = maker.module_params(n)
        want = dict(zip(params, g_check[j:j + len(params)]))
        j += len(params)
        if n not in rows:
            continue
        checked.add(n)
        got = gradient_from_rows(*rows[n], "bias" in params, fold_bias and "bias" in params, params["weight"].shape)
        want = {k: torch.zeros_like(got[k]) if w is None else w for k, w in want.items()}  # None: unused
        rtol, atol = _check_tolerance(records[n], got["weight"].dtype)
        if all(torch.allclose(got[key], w, rtol=rtol, atol=atol * float(w.abs().max()) + 1e-30)
               for key, w in want.items()):
            continue
        off.add(n)
        del rows[n]
        for key, p in params.items():
            p.grad = want[key] if p.grad is None else p.grad + want[key]
        warnings.warn(
            f"{type(maker).__name__}: the gradient of layer {n!r} is not what its own inputs and output "
            f"gradients give (a parameter used outside the layer's call?); the layer keeps the plain "
            f"backward", UserWarning, stacklevel=5)
    maker._backward_done()
    return rows


def _stack_rows(parts: list[Tensor]) -> Tensor:
    """The rows of every call, one after another (no copy for a single call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _check_tolerance(rec: LayerRecord, dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol relative to the largest entry) for comparing gᵀa with autograd's weight gradient:
    the same products up to summation order, or up to the rounding of reduced-precision records
    (autocast) against the gradient formed in the parameters' dtype."""
    # under autocast the layer's GEMM ran in reduced precision even on float32 inputs: its outputs
    # (the zero perturbations' dtype) tell
    low = [torch.finfo(t.dtype).eps for t in (*rec.inputs, *rec.eps)
           if t.is_floating_point() and torch.finfo(t.dtype).bits < 32]
    if low:  # autograd's product was rounded to that precision (bf16: 2⁻⁸ relative to the largest entry)
        return 8 * max(low), 8 * max(low)
    if dtype == torch.float64:
        return 1e-9, 1e-12
    return 1e-4, 1e-6
