"""``KronPsgdGradientMaker``: Kronecker-factored PSGD (Li 2018) driven by Hessian-vector products.

Which pure functions are called when (math in :mod:`curvfun.psgd_math`):

* on curvature steps the pass is functional: with ``torch.func``, forward-over-reverse
  (``jvp`` of ``grad``) of the registered model and loss call (:meth:`model_output_at`,
  :meth:`loss_from_output`) gives in one go the gradient (written into ``param.grad``) and the
  Hessian-vector product H·v of the loss for a probe v ~ N(0, I) drawn from ``self.generator`` on
  the weights and biases of the preconditioned Linear / Conv2d layers (zero elsewhere). Per layer
  the pair is kept as matrices (dX, dG) = (v, H·v), weight read as ``[out, in·kh·kw]`` with the bias
  as a last column;
* on preconditioner steps each layer's factors are updated once from the latest fresh pair,
  (Q_l, Q_r) ← :func:`curvfun.psgd_math.psgd_update` with step ``precond_lr`` (a pair is used at
  most once; a preconditioner step without a fresh pair changes nothing);
* every step: G ← Q_lᵀ Q_l G Q_rᵀ Q_r for the ``[weight | bias]`` matrix of each layer.

The factors start at ``init_scale·I`` (so the first steps are plain SGD scaled by init_scale⁴).
With the default config both schedules refresh every step.

Notes. The functional pass evaluates the model with copies of its buffers, so BatchNorm running
statistics are not updated on curvature steps (they are on the other steps, which make a plain
pass). The curvature is that of the loss as registered (the mean over the batch for the usual
``reduction='mean'``).

Differences from ASDL 0.1 (``asdl/precondition/psgd.py``): B = Q⁻ᵀ dX as in Li's reference code
(see :mod:`curvfun.psgd_math`); the probe comes from the maker's seeded generator (ASDL uses
``torch.randn_like``, the global stream), so a resumed run continues bit-for-bit; ASDL's
``do_forward_and_backward`` follows the preconditioner schedule, here the curvature schedule
decides when the Hessian-vector product (and the pass that makes it) happens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..functional import twice_differentiable

from ..psgd_math import psgd_precondition, psgd_update
from .base import PreconditionedGradientMaker
from .config import PreconditioningConfig

__all__ = ["KronPsgdGradientMaker"]


def _layer_matrix(module: nn.Module, weight: Tensor, bias: Tensor | None) -> Tensor:
    W = weight.reshape(weight.shape[0], -1)
    return W if bias is None else torch.cat([W, bias.reshape(-1, 1)], 1)


def _check_psgd_args(precond_lr, init_scale) -> None:
    if isinstance(precond_lr, bool) or not isinstance(precond_lr, (int, float)) or not (0 < precond_lr <= 1):
        raise ValueError(
            f"precond_lr must be in (0, 1] (the factor update's step relative to its largest change), got {precond_lr!r}"
        )
    if isinstance(init_scale, bool) or not isinstance(init_scale, (int, float)) or not (0 < init_scale < float("inf")):
        raise ValueError(f"init_scale must be a finite number > 0 (factors start at init_scale·I), got {init_scale!r}")


class KronPsgdGradientMaker(PreconditionedGradientMaker):
    """Kronecker-factored PSGD for Linear and Conv2d layers (see the module docstring).

    Args:
        model: the model.
        config: :class:`PreconditioningConfig` (schedules, ``ignore_modules``; ``damping`` and
            ``ema_decay`` are not used by PSGD).
        precond_lr: μ, the normalised step of the factor updates, in (0, 1]. (default 0.01)
        init_scale: the factors start at ``init_scale · I``, > 0. (default 1.0)
        seed: seed of the probe generator (default: ``config.seed`` or derived).
    """

    #: curvature from each rank's own batch; the preconditioned gradients are averaged (base class)
    _local_curvature = True

    _supported_classes = (nn.Linear, nn.Conv2d)
    _state_attributes = ("factors", "pairs", "pairs_fresh")
    _settings = ("precond_lr", "init_scale")

    def __init__(
        self,
        model: nn.Module,
        config: PreconditioningConfig | None = None,
        precond_lr: float = 0.01,
        init_scale: float = 1.0,
        *,
        seed: int | None = None,
    ) -> None:
        _check_psgd_args(precond_lr, init_scale)
        super().__init__(model, config, seed=seed)
        self.precond_lr = float(precond_lr)
        self.init_scale = float(init_scale)
        #: layer name -> [Q_l, Q_r]
        self.factors: dict[str, list[Tensor]] = {}
        for name in self.preconditioned_modules:
            w, b = self._weight_bias(name)
            if w is None:
                continue
            d_out, d_in = w.shape[0], w[0].numel() + (b is not None)
            eye = lambda d: self.init_scale * torch.eye(d, dtype=w.dtype, device=w.device)  # noqa: E731
            self.factors[name] = [eye(d_out), eye(d_in)]
        #: layer name -> [dX, dG] of the latest probe, and whether it is still unused
        self.pairs: dict[str, list[Tensor]] = {}
        self.pairs_fresh = False

    def _check_settings(self) -> None:
        _check_psgd_args(self.precond_lr, self.init_scale)

    def _weight_bias(self, name: str) -> tuple[Tensor | None, Tensor | None]:
        ps = self.module_params(name)
        return ps.get("weight"), ps.get("bias")

    # --- the pass: gradient and Hessian-vector product -----------------------------------------
    def update_curvature(self) -> None:
        named = {k: p for k, p in self.model.named_parameters() if p.requires_grad}
        key_of = {id(p): k for k, p in named.items()}
        primals = {k: p.detach() for k, p in named.items()}
        tangents = {k: torch.zeros_like(p) for k, p in primals.items()}
        probes: dict[str, tuple[str | None, str | None]] = {}
        for name in self.factors:
            w, b = self._weight_bias(name)
            kw = key_of[id(w)]
            kb = key_of[id(b)] if b is not None else None
            for k in (kw, kb):
                if k is not None:
                    tangents[k] = torch.randn(primals[k].shape, generator=self.generator, dtype=primals[k].dtype,
                                              device=primals[k].device)
            probes[name] = (kw, kb)

        def loss_and_output(p):
            out = self.model_output_at(p)
            return self.loss_from_output(out), out

        def grad_with_aux(p):
            g, (loss, out) = torch.func.grad_and_value(loss_and_output, has_aux=True)(p)
            return g, (loss, out)

        with torch.enable_grad(), twice_differentiable():
            grads, hvp, (loss, out) = torch.func.jvp(grad_with_aux, (primals,), (tangents,), has_aux=True)
        with torch.no_grad():
            for k, p in named.items():
                g = grads[k].detach()
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.add_(g)
        self.pairs = {}
        for name, (kw, kb) in probes.items():
            m = self.preconditioned_modules[name]
            dX = _layer_matrix(m, tangents[kw], None if kb is None else tangents[kb])
            dG = _layer_matrix(m, hvp[kw].detach(), None if kb is None else hvp[kb].detach())
            self.pairs[name] = [dX, dG]
        self.pairs_fresh = True
        self._record_pass(out.detach() if isinstance(out, Tensor) else out, loss.detach())

    def update_preconditioner(self) -> None:
        if not self.pairs_fresh:
            return
        for name, (dX, dG) in self.pairs.items():
            Ql, Qr = self.factors[name]
            new = list(psgd_update(Ql, Qr, dX, dG, self.precond_lr))
            self.factors[name] = self._install_if_finite(name, new, self.factors[name], "PSGD factors")
        self.pairs_fresh = False

    def precondition(self) -> None:
        for name, (Ql, Qr) in self.factors.items():
            w, b = self._weight_bias(name)
            if w.grad is None or (b is not None and b.grad is None):
                continue
            m = self.preconditioned_modules[name]
            G = psgd_precondition(Ql, Qr, _layer_matrix(m, w.grad, None if b is None else b.grad))
            if b is None:
                w.grad.copy_(G.reshape(w.shape))
            else:
                w.grad.copy_(G[:, :-1].reshape(w.shape))
                b.grad.copy_(G[:, -1])
