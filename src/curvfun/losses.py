"""Losses as likelihoods.

Each likelihood knows the per-sample loss ℓ_n, how to draw targets from the model's
predictive distribution (MC Fisher) and a square root S of the Hessian of ℓ with respect to
the model output, ``H = S Sᵀ`` (exact Fisher / GGN).

Output layout (fixed): ``output`` is ``[N, *positions, C]`` with the class / output dim
**last** (what a ``Linear`` head produces); an ``[N]`` output of ``mse`` or
``bce_with_logits`` is read as ``[N, 1]``. ``*positions`` (tokens of a sequence, pixels) are
summed into the per-sample loss: ``ℓ_n = Σ_t ℓ(f_nt, y_nt)``. For an image-shaped
``[N, C, H, W]`` output move the class dim last first (``output.movedim(1, -1)``).

* ``cross_entropy``: categorical on logits; ``target`` are class indices ``[N, *positions]``;
  ``ignore_index`` positions contribute nothing (loss, gradient, Fisher); ``label_smoothing``
  changes the loss only, never the likelihood (Fisher / sampling / Hessian).
  H = diag(p) - p pᵀ, S = diag(√p) - p √pᵀ.
* ``mse``: Gaussian with variance ``var``: ℓ = ½‖f - y‖²/var summed over output dims (ASDL's
  convention). For an ``[N, C]`` output ``nn.MSELoss()`` (mean over all N·C entries) is
  ``(2·var/C) · mean_n ℓ_n``: multiply curvfun's curvature by ``2·var/C`` to get that
  loss's. H = I/var, S = I/√var.
* ``bce_with_logits``: independent Bernoulli per output entry; targets in [0, 1].
  H = diag(σ(1-σ)), S = diag(√(σ(1-σ))).

A plain callable ``fn(output, target) -> per-sample losses [N]`` is accepted wherever only
gradients are needed (empirical Fisher, Hessian, GGN via autograd).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Likelihood", "CrossEntropy", "MSE", "BCEWithLogits", "CallableLoss", "get_likelihood", "LOSSES",
           "swapped_arguments"]


class Likelihood:
    """Base class: a per-sample loss that is the negative log-likelihood of a distribution."""

    name = "likelihood"
    #: whether sampling and the closed-form Hessian square root are available
    is_likelihood = True

    # --- to override -------------------------------------------------------------
    def _check(self, output: Tensor, target: Tensor) -> None:  # pragma: no cover - abstract
        pass

    def _loss(self, output: Tensor, target: Tensor, smooth: bool) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def sample(self, output: Tensor, n_samples: int = 1, generator: torch.Generator | None = None) -> Tensor:
        """``n_samples`` target sets drawn from the predictive distribution: ``[M, *target.shape]``."""
        raise NotImplementedError

    def hessian_sqrt(self, output: Tensor, target: Tensor | None = None) -> Tensor:
        """S with ``S Sᵀ = ∇²_f ℓ`` per position: ``[N, *positions, C, K]``."""
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------
    def canonical_output(self, output: Tensor) -> Tensor:
        return output

    def check(self, output: Tensor, target: Tensor) -> None:
        """Raise a clear error when ``target`` does not fit ``output``."""
        if not isinstance(output, Tensor):
            raise TypeError(f"{self.name}: the model output must be a tensor, got {type(output).__name__}")
        if not isinstance(target, Tensor):
            raise TypeError(f"{self.name}: targets must be a tensor, got {type(target).__name__}")
        swapped = swapped_arguments(output, target, "the model output", "the targets")
        if swapped:
            raise ValueError(f"{self.name}: {swapped}")
        if output.shape[0] != target.shape[0]:
            raise ValueError(
                f"{self.name}: batch sizes differ: the output has {output.shape[0]} samples, "
                f"the targets {target.shape[0]}"
            )
        self._check(self.canonical_output(output), target)

    def per_sample(self, output: Tensor, target: Tensor) -> Tensor:
        """ℓ_n for each sample, ``[N]`` (summed over positions)."""
        self.check(output, target)
        return self._loss(self.canonical_output(output), target, smooth=True)

    def per_sample_unchecked(self, output: Tensor, target: Tensor) -> Tensor:
        """:meth:`per_sample` without the target checks (no data-dependent control flow, so it
        runs under ``torch.func.vmap``); validate the targets once with :meth:`check` first."""
        return self._loss(self.canonical_output(output), target, smooth=True)

    def nll(self, output: Tensor, target: Tensor) -> Tensor:
        """Per-sample negative log-likelihood ``[N]`` (no label smoothing): what the Fisher uses."""
        return self._loss(self.canonical_output(output), target, smooth=False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def swapped_arguments(output, target, output_name: str = "the first argument", target_name: str = "the second argument",
                      fix: str = "pass the model output first and the targets second") -> str | None:
    """Why ``(output, target)`` look like swapped loss arguments (integer output, or integer
    output with floating targets), or None. Model outputs (logits, predictions) are floating
    point; only targets are integer class indices."""
    if not (isinstance(output, Tensor) and isinstance(target, Tensor)):
        return None
    if output.dtype.is_floating_point or output.is_complex():
        return None
    also = ""
    if target.dtype.is_floating_point:
        also = f" while {target_name} is {target.dtype} of shape {tuple(target.shape)}"
    return (
        f"{output_name} has integer dtype {output.dtype} (shape {tuple(output.shape)}){also}: were the output and "
        f"the targets swapped? Model outputs are floating point, class-index targets integer: {fix}"
    )


def _positions_sum(x: Tensor, n: int) -> Tensor:
    return x.reshape(n, -1).sum(1)


class CrossEntropy(Likelihood):
    name = "cross_entropy"

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0):
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"cross_entropy: label_smoothing must lie in [0, 1], got {label_smoothing}")
        self.ignore_index = int(ignore_index)
        self.label_smoothing = float(label_smoothing)

    def __repr__(self) -> str:
        return f"CrossEntropy(ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing})"

    def _check(self, output: Tensor, target: Tensor) -> None:
        if output.ndim < 2:
            raise ValueError(
                f"cross_entropy: output must be [N, *positions, C] logits with the class dim last; got shape "
                f"{tuple(output.shape)}"
            )
        if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
            hint = ""
            if tuple(target.shape) == tuple(output.shape):
                hint = (" of the logits' shape: were the logits passed as targets (arguments swapped)? Pass the "
                        "targets as integer class indices of shape " + str(tuple(output.shape[:-1])))
            raise ValueError(
                f"cross_entropy: targets must be integer class indices, got dtype {target.dtype}{hint}"
            )
        if tuple(target.shape) != tuple(output.shape[:-1]):
            raise ValueError(
                f"cross_entropy: targets of shape {tuple(target.shape)} do not fit logits of shape "
                f"{tuple(output.shape)}; expected targets of shape {tuple(output.shape[:-1])} "
                f"(class dim last in the output)"
            )
        C = output.shape[-1]
        valid = target != self.ignore_index
        if not torch.compiler.is_compiling() and valid.any():  # value check: eager only (data-dependent)
            t = target[valid]
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= C:
                raise ValueError(
                    f"cross_entropy: target class indices must lie in [0, {C - 1}] (or equal "
                    f"ignore_index={self.ignore_index}); found values in [{lo}, {hi}]"
                )

    def _loss(self, output: Tensor, target: Tensor, smooth: bool) -> Tensor:
        N, C = output.shape[0], output.shape[-1]
        losses = F.cross_entropy(
            output.reshape(-1, C),
            target.reshape(-1),
            reduction="none",
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing if smooth else 0.0,
        )
        return _positions_sum(losses, N)

    def sample(self, output, n_samples=1, generator=None):
        C = output.shape[-1]
        probs = torch.softmax(output.detach().reshape(-1, C).to(torch.float64), dim=-1)
        # a row with non-finite logits draws uniformly: its cotangent (p - onehot) stays non-finite,
        # so the curvature built from it is rejected downstream, instead of multinomial raising
        probs = torch.where(torch.isfinite(probs).all(-1, keepdim=True), probs, 1.0 / C)
        # inverse-CDF sampling: the class whose interval [cdf_{c-1}, cdf_c) holds u·cdf_C (an empty
        # interval is never hit); O(R·C), ~30x faster than torch.multinomial on the CPU
        cdf = probs.cumsum(-1)
        u = torch.rand(cdf.shape[0], n_samples, generator=generator, dtype=cdf.dtype, device=cdf.device)
        draws = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=C - 1)  # [R, M]
        return draws.t().reshape(n_samples, *output.shape[:-1])

    def mask(self, target: Tensor) -> Tensor:
        return target != self.ignore_index

    def hessian_sqrt(self, output, target=None):
        p = torch.softmax(output.detach(), dim=-1)
        s = p.sqrt()
        S = torch.diag_embed(s) - p.unsqueeze(-1) * s.unsqueeze(-2)
        if target is not None:
            S = S * self.mask(target)[..., None, None].to(S.dtype)
        return S


class MSE(Likelihood):
    name = "mse"

    def __init__(self, var: float = 1.0):
        if not (var > 0 and torch.isfinite(torch.tensor(float(var)))):
            raise ValueError(f"mse: var must be a positive finite number, got {var}")
        self.var = float(var)

    def __repr__(self) -> str:
        return f"MSE(var={self.var})"

    def canonical_output(self, output):
        return output.unsqueeze(-1) if output.ndim == 1 else output

    def _check(self, output, target):
        if not target.dtype.is_floating_point:
            raise ValueError(f"mse: targets must be floating point, got dtype {target.dtype}")
        t = target.unsqueeze(-1) if target.ndim == 1 and output.ndim == 2 and output.shape[-1] == 1 else target
        if tuple(t.shape) != tuple(output.shape):
            raise ValueError(
                f"mse: targets of shape {tuple(target.shape)} do not match the output of shape "
                f"{tuple(output.shape)}"
            )

    def _loss(self, output, target, smooth):
        target = target.reshape(output.shape)
        return _positions_sum(0.5 * (output - target).pow(2) / self.var, output.shape[0])

    def sample(self, output, n_samples=1, generator=None):
        out = self.canonical_output(output.detach())
        noise = torch.randn((n_samples, *out.shape), generator=generator, dtype=out.dtype, device=out.device)
        return out.unsqueeze(0) + noise * self.var**0.5

    def hessian_sqrt(self, output, target=None):
        out = self.canonical_output(output)
        C = out.shape[-1]
        eye = torch.eye(C, dtype=out.dtype, device=out.device) / self.var**0.5
        return eye.expand(*out.shape, C)


class BCEWithLogits(Likelihood):
    name = "bce_with_logits"

    def canonical_output(self, output):
        return output.unsqueeze(-1) if output.ndim == 1 else output

    def _check(self, output, target):
        t = target.unsqueeze(-1) if target.ndim == 1 and output.ndim == 2 and output.shape[-1] == 1 else target
        if tuple(t.shape) != tuple(output.shape):
            raise ValueError(
                f"bce_with_logits: targets of shape {tuple(target.shape)} do not match the output of shape "
                f"{tuple(output.shape)}"
            )
        tf = t.to(output.dtype)
        if tf.numel() and not torch.compiler.is_compiling() and (tf.min() < 0 or tf.max() > 1):  # eager only
            raise ValueError(
                f"bce_with_logits: targets must lie in [0, 1]; found values in "
                f"[{float(tf.min())}, {float(tf.max())}]"
            )

    def _loss(self, output, target, smooth):
        target = target.reshape(output.shape).to(output.dtype)
        losses = F.binary_cross_entropy_with_logits(output, target, reduction="none")
        return _positions_sum(losses, output.shape[0])

    def sample(self, output, n_samples=1, generator=None):
        out = self.canonical_output(output.detach())
        # non-finite logits draw with p = 1/2 (their curvature stays non-finite; see CrossEntropy.sample)
        p = torch.sigmoid(out).nan_to_num(0.5).expand(n_samples, *out.shape)
        return torch.bernoulli(p, generator=generator)

    def hessian_sqrt(self, output, target=None):
        p = torch.sigmoid(self.canonical_output(output).detach())
        return torch.diag_embed((p * (1 - p)).sqrt())


class CallableLoss(Likelihood):
    """Wrap ``fn(output, target) -> [N]`` per-sample losses. Gradients only: no sampling, no S."""

    name = "callable"
    is_likelihood = False

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor]):
        self.fn = fn

    def __repr__(self) -> str:
        return f"CallableLoss({getattr(self.fn, '__name__', self.fn)!r})"

    def _loss(self, output, target, smooth):
        out = self.fn(output, target)
        if not isinstance(out, Tensor) or out.shape != (output.shape[0],):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"a loss callable must return per-sample losses of shape [N] = [{output.shape[0]}]; got {got}. "
                f"Use reduction='none' (and sum over non-batch dims)."
            )
        return out

    def _unsupported(self, what):
        raise ValueError(
            f"{what} needs a likelihood (sampling / Hessian square root), which a plain loss callable "
            f"does not provide; pass loss='cross_entropy', 'mse' or 'bce_with_logits', or use "
            f"fisher_type='emp' / hessian / ggn."
        )

    def sample(self, output, n_samples=1, generator=None):
        self._unsupported("the MC Fisher")

    def hessian_sqrt(self, output, target=None):
        self._unsupported("the exact Fisher")


LOSSES: dict[str, type[Likelihood]] = {
    "cross_entropy": CrossEntropy,
    "mse": MSE,
    "bce_with_logits": BCEWithLogits,
}


def get_likelihood(loss: str | Likelihood | Callable) -> Likelihood:
    """Resolve ``loss`` (a name, a :class:`Likelihood`, or a per-sample loss callable)."""
    if isinstance(loss, Likelihood):
        return loss
    if isinstance(loss, str):
        try:
            return LOSSES[loss]()
        except KeyError:
            raise ValueError(f"unknown loss {loss!r}; known losses: {sorted(LOSSES)}") from None
    if callable(loss):
        return CallableLoss(loss)
    raise TypeError(
        f"loss must be one of {sorted(LOSSES)}, a Likelihood, or a callable (output, target) -> [N]; "
        f"got {type(loss).__name__}"
    )
