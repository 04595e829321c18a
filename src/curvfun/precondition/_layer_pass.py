"""Plumbing shared by the makers that read layer inputs and output-gradients during their pass
(K-BFGS, SENG, SMW natural gradient): which modules to record, and the captured data as
:class:`~curvfun.layers.LayerData` once a backward pass has filled the zero perturbations' ``.grad``.

The recording itself is :func:`curvfun.capture.record_layers` (forward hooks that exist only for
the duration of the ``with`` block and add a zero perturbation ε to each output); the
output-gradient of a module is ``ε.grad`` after any backward pass, or the result of
``torch.autograd.grad(..., ε)``.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from ..capture import LayerRecord, ModuleInfo, _check_versions, layer_kind
from ..layers import LayerData, layer_data

__all__ = ["module_infos", "eps_leaves", "records_to_data", "linear_or_conv_reason", "user_reduction"]


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
