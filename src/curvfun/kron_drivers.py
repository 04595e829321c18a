"""``kfac()`` and ``ekfac()``: capture once, arrange every registered layer, build its factor.

Factor objects: :mod:`curvfun.kron`; their construction from layer data: :mod:`curvfun.kron_math`;
the rows form of wide sides: :mod:`curvfun.kron_rows`.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .capture import Capture, capture
from .functional import call_model
from .kron import BIAS_MODES, KFAC_TYPES, DiagFactor, EmbeddingFactor, KronFactor, RelaidFactor, UnitWiseFactor
from .kron_math import kron_factors_from_layer
from .kron_rows import KronRowsFactor, kron_rows_from_layer
from .layers import LayerData, layer_data
from .precision import full_precision
from .reduction import resolve_loss

__all__ = ["kfac", "ekfac", "scale_factor"]


def scale_factor(factor: Any, s: float) -> Any:
    """``s`` times the block a factor of :func:`kfac` stands for (B scaled for Kronecker factors,
    B's rows by √s)."""
    if isinstance(factor, (KronFactor, EmbeddingFactor)):
        return replace(factor, B=factor.B * s)
    if isinstance(factor, KronRowsFactor):
        return replace(factor, B=factor.B * (s ** 0.5 if factor.b_rows else s))
    if isinstance(factor, UnitWiseFactor):
        return replace(factor, blocks=factor.blocks * s)
    if isinstance(factor, DiagFactor):
        return replace(factor, values=factor.values * s)
    if isinstance(factor, RelaidFactor):
        return replace(factor, inner=scale_factor(factor.inner, s))
    raise TypeError(f"cannot scale a {type(factor).__name__}")


def _warn_unsupported(cap: Capture, on_unsupported: str) -> None:
    if not cap.unsupported or on_unsupported == "ignore":
        return
    msg = "no Kronecker factors for: " + ", ".join(
        f"{n or '<root>'} ({cls}; parameters {keys})" for n, (cls, keys) in cap.unsupported.items()
    )
    if on_unsupported == "raise":
        raise ValueError(msg + ". Exclude their parameters from params, or use on_unsupported='warn'.")
    warnings.warn(msg + ": they get no factor (the supported layers still do)", stacklevel=3)


def kfac(
    model: nn.Module,
    params: Mapping[str, Tensor],
    inputs: Any,
    targets: Tensor | None = None,
    loss: Any = "cross_entropy",
    fisher_type: str = "mc",
    kfac_type: str = "expand",
    bias: str = "separate",
    n_mc_samples: int = 1,
    generator: torch.Generator | None = None,
    on_unsupported: str = "warn",
    form: str = "dense",
    reduction: str | None = None,
) -> dict[str, Any]:
    """K-FAC factors of every supported module owning entries of ``params``.

    ``reduction``: ``"mean"`` (default; the factors below) or ``"sum"``, or a ``torch.nn`` loss
    module's own (see :mod:`curvfun.reduction`): B is multiplied by N·factor, so that A⊗B
    approximates the curvature of that reduced loss (:func:`curvfun.dataset.scale_factor`).

    Returns ``{module name (as in model.named_modules()): factor}``, a module holding several
    layers giving one entry per part, ``"<module>.<part>"`` (MultiheadAttention with kdim/vdim:
    ``att.q_proj_weight``, ... ``att.in_proj_bias``; see :mod:`curvfun.layers.attention`), with
    :class:`KronFactor` for affine layers (Linear, convolutions, attention's projections; wrapped in a
    :class:`RelaidFactor` for transposed convolutions), :class:`EmbeddingFactor`, and
    :class:`UnitWiseFactor` for norm layers. Unsupported modules are named in a warning (``on_unsupported="raise"`` makes it
    an error, ``"ignore"`` silences it). Embedding always uses K-FAC-expand. Cost: one
    captured forward and one backward per column (see :mod:`curvfun.capture`), plus the
    factor products.

    ``form="auto"``: an affine layer's factor side with R rows and width d ≥ 2R (a 4096-wide
    layer at batch 128) is kept as its scaled rows (:class:`curvfun.kron_rows.KronRowsFactor`:
    same ``to_dense`` / ``matvec`` / ``damped_inverse``, Woodbury inverse), skipping its O(R·d²)
    Gram matrix; ``"dense"`` (default): every factor a matrix.
    """
    if form not in ("dense", "auto"):
        raise ValueError(f"unknown form {form!r}; expected 'dense' (matrices) or 'auto' (rows where 2R <= d)")
    lik, fac = resolve_loss(loss, reduction)
    data = _layer_data_of(model, params, inputs, targets, lik, fisher_type, kfac_type, bias, n_mc_samples,
                          generator, on_unsupported)
    s = 1.0
    if reduction is not None or isinstance(loss, nn.Module):
        with torch.no_grad():
            out = call_model(model, {k: v.detach() for k, v in params.items()}, inputs)
        s = out.shape[0] * fac(out, targets)
    if form == "auto":
        make = lambda ld: (kron_rows_from_layer(ld, kfac_type, bias) if ld.kind == "affine" and not ld.layout  # noqa: E731
                           else kron_factors_from_layer(ld, kfac_type, bias))
    else:
        make = lambda ld: kron_factors_from_layer(ld, kfac_type, bias)  # noqa: E731
    with full_precision():  # the model ran under the caller's autocast; the factors never do
        fs = {name: make(ld) for name, ld in data.items()}
    return fs if s == 1.0 else {name: scale_factor(f, s) for name, f in fs.items()}


def _layer_data_of(model, params, inputs, targets, loss, fisher_type, kfac_type, bias, n_mc_samples, generator,
                   on_unsupported) -> dict[str, LayerData]:
    """Validate the K-FAC options, capture once, name the unsupported modules, arrange the data."""
    if kfac_type not in KFAC_TYPES:
        raise ValueError(f"unknown kfac_type {kfac_type!r}; expected one of {KFAC_TYPES}")
    if bias not in BIAS_MODES:
        raise ValueError(f"unknown bias mode {bias!r}; expected one of {BIAS_MODES}")
    if fisher_type == "emp" and targets is None:
        raise ValueError("fisher_type='emp' needs the data targets")
    cap = capture(model, params, inputs, targets, loss, fisher_type, n_mc_samples, generator)
    _warn_unsupported(cap, on_unsupported)
    return {name: layer_data(rec, cap.weights) for name, rec in cap.layers.items()}


def ekfac(
    model: nn.Module,
    params: Mapping[str, Tensor],
    inputs: Any,
    targets: Tensor | None = None,
    loss: Any = "cross_entropy",
    fisher_type: str = "mc",
    kfac_type: str = "expand",
    bias: str = "separate",
    n_mc_samples: int = 1,
    generator: torch.Generator | None = None,
    on_unsupported: str = "warn",
) -> dict[str, Any]:
    """EKFAC factors of affine layers (the K-FAC eigenbasis with per-sample second
    moments from the same capture); other supported layers get their K-FAC factor."""
    out = {}
    for name, data in _layer_data_of(model, params, inputs, targets, loss, fisher_type, kfac_type, bias,
                                     n_mc_samples, generator, on_unsupported).items():
        with full_precision():
            f = kron_factors_from_layer(data, kfac_type, bias)
            out[name] = f.ekfac(data) if isinstance(f, KronFactor) else f
    return out
