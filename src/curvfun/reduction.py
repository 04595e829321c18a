"""How the per-sample losses are reduced: ``reduction="mean" | "sum"`` and ``torch.nn`` loss modules.

Every curvature is first the curvature of the *sum* Σ_n ℓ_n (curvfun's per-sample losses, see
:mod:`curvfun.losses`) and then multiplied by a factor:

* ``reduction="mean"`` (default): 1/N, the curvature of L = (1/N) Σ_n ℓ_n;
* ``reduction="sum"``: 1, the curvature of Σ_n ℓ_n (what a Laplace approximation over a data set
  needs: sums of batches add up);
* a loss module: the factor that makes curvfun's likelihood *equal* that module's loss
  (output ``[N, O]`` or ``[N]``, O entries per sample):

  ==============================================  ==================  ================
  module                                          likelihood          factor
  ==============================================  ==================  ================
  ``nn.CrossEntropyLoss(reduction="sum")``        cross_entropy       1
  ``nn.CrossEntropyLoss(reduction="mean")``       cross_entropy       1 / #targets ≠ ignore_index
  ``nn.MSELoss(reduction="sum")``                 mse (var = 1)       2
  ``nn.MSELoss(reduction="mean")``                mse (var = 1)       2 / (N·O)
  ``nn.BCEWithLogitsLoss(reduction="sum")``       bce_with_logits     1
  ``nn.BCEWithLogitsLoss(reduction="mean")``      bce_with_logits     1 / (N·O)
  ==============================================  ==================  ================

  ``ignore_index`` and ``label_smoothing`` carry over; class weights, ``pos_weight`` and
  ``reduction="none"`` are refused. ``nn.CrossEntropyLoss`` needs a 2-D ``[N, C]`` output (its class
  dim is the second, curvfun's the last).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from .losses import MSE, BCEWithLogits, CrossEntropy, Likelihood, get_likelihood

__all__ = ["REDUCTIONS", "loss_value", "resolve_loss"]

REDUCTIONS = ("mean", "sum")


def _module_likelihood(loss: nn.Module) -> Likelihood:
    name = type(loss).__name__
    if getattr(loss, "weight", None) is not None or getattr(loss, "pos_weight", None) is not None:
        raise ValueError(f"{name} with class weights / pos_weight has no likelihood in curvfun; pass it without them")
    if loss.reduction not in REDUCTIONS:
        raise ValueError(f"{name}(reduction={loss.reduction!r}): curvfun needs reduction 'mean' or 'sum'")
    if isinstance(loss, nn.CrossEntropyLoss):
        return CrossEntropy(loss.ignore_index, loss.label_smoothing)
    if isinstance(loss, nn.MSELoss):
        return MSE(1.0)
    return BCEWithLogits()


LOSS_MODULES = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)


def resolve_loss(loss: Any, reduction: str | None) -> tuple[Likelihood, Callable[[Tensor, Tensor | None], float]]:
    """``(likelihood, factor)`` with ``factor(output, targets)`` the multiplier of the curvature of
    Σ_n ℓ_n (see the module docstring). ``reduction=None``: the module's own, else ``"mean"``."""
    if reduction is not None and reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    if isinstance(loss, nn.Module):
        if not isinstance(loss, LOSS_MODULES):
            raise TypeError(f"loss module {type(loss).__name__} is not supported; pass one of "
                            f"{[c.__name__ for c in LOSS_MODULES]}, a loss name, a Likelihood or a per-sample callable")
        lik = _module_likelihood(loss)
        if reduction is not None and reduction != loss.reduction:
            raise ValueError(f"reduction={reduction!r} contradicts {type(loss).__name__}(reduction={loss.reduction!r}); "
                             f"leave reduction unset to use the module's")
        return lik, _module_factor(loss, lik)
    lik = get_likelihood(loss)
    if (reduction or "mean") == "sum":
        return lik, lambda output, targets: 1.0
    return lik, lambda output, targets: 1.0 / output.shape[0]


def _module_factor(loss: nn.Module, lik: Likelihood) -> Callable:
    def factor(output: Tensor, targets: Tensor | None) -> float:
        N = output.shape[0]
        O = output[0].numel()
        if isinstance(loss, nn.CrossEntropyLoss):
            if output.ndim != 2:
                raise ValueError(f"nn.CrossEntropyLoss takes the class dim second, curvfun's layout last: with an "
                                 f"output of shape {tuple(output.shape)} pass loss='cross_entropy' (class dim last) "
                                 f"and reduction='mean' or 'sum' instead")
            if loss.reduction == "sum":
                return 1.0
            if targets is None:
                return 1.0 / N
            valid = int((targets != loss.ignore_index).sum())
            if valid == 0:
                raise ValueError("nn.CrossEntropyLoss(reduction='mean'): every target equals ignore_index, "
                                 "so the mean is undefined")
            return 1.0 / valid
        two = 2.0 if isinstance(loss, nn.MSELoss) else 1.0
        return two if loss.reduction == "sum" else two / (N * O)
    return factor


def loss_value(loss: Any, lik: Likelihood, factor: Callable, output: Tensor, targets: Tensor) -> Tensor:
    """The reduced loss at ``output``: the module itself for a loss module, else factor · Σ_n ℓ_n."""
    if isinstance(loss, nn.Module):
        return loss(output, targets.to(output.dtype) if isinstance(loss, nn.BCEWithLogitsLoss) else targets)
    return lik.per_sample(output, targets).sum() * factor(output, targets)
