"""``KronPsgdGradientMaker`` and ``PsgdGradientMaker``: Kronecker-factored and full-matrix PSGD
(Li 2018) driven by Hessian-vector products.

Which pure functions are called when (math in :mod:`curvfun.psgd_math`):

* on curvature steps the pass is functional: with ``torch.func``, forward-over-reverse
  (``jvp`` of ``grad``) of the registered model and loss call (:meth:`model_output_at`,
  :meth:`loss_from_output`) gives in one go the gradient (written into ``param.grad``) and the
  Hessian-vector product H·v of the loss for a probe v ~ N(0, I) drawn from ``self.generator`` on
  the weights and biases of the preconditioned Linear / Conv2d layers (zero elsewhere). The pair
  (v, H·v) is kept per layer as matrices (dX, dG), weight read as ``[out, in·kh·kw]`` with the
  bias as a last column (Kronecker), or as two flat vectors over all those parameters (full);
* on preconditioner steps the preconditioner is updated once from the latest fresh pair,
  (Q_l, Q_r) ← :func:`~curvfun.psgd_math.psgd_update` per layer, or
  Q ← :func:`~curvfun.psgd_math.psgd_full_update`, with step ``precond_lr`` (a pair is used at
  most once; a preconditioner step without a fresh pair changes nothing);
* every step: G ← Q_lᵀ Q_l G Q_rᵀ Q_r for the ``[weight | bias]`` matrix of each layer, or
  g ← Qᵀ Q g for the vector of all of them (each layer's weight row-major, then its bias).

The factors start at ``init_scale·I`` (so the first steps are plain SGD scaled by init_scale⁴ for
Kronecker PSGD, init_scale² for full PSGD). With the default config both schedules refresh every
step.

Notes. The functional pass evaluates the model with copies of its buffers, so BatchNorm running
statistics are not updated on curvature steps (they are on the other steps, which make a plain
pass). The curvature is that of the loss as registered (the mean over the batch for the usual
``reduction='mean'``). ``use_functorch`` is accepted for ASDL's signature; the pass is always
``torch.func``.

Differences from ASDL 0.1 (``asdl/precondition/psgd.py``): B = Q⁻ᵀ dX in the Kronecker update as
in Li's reference code (see :mod:`curvfun.psgd_math`); the probe comes from the maker's seeded
generator (ASDL uses ``torch.randn_like``, the global stream), so a resumed run continues
bit-for-bit; ASDL's ``do_forward_and_backward`` follows the preconditioner schedule, here the
curvature schedule decides when the Hessian-vector product (and the pass that makes it) happens;
``config`` may be omitted (ASDL requires it, so ``PsgdGradientMaker(model)`` raises there);
``PsgdGradientMaker`` refuses more than ``max_params`` parameters up front (ASDL allocates the
P x P factor and runs out of memory).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..functional import twice_differentiable
from ..psgd_math import psgd_full_precondition, psgd_full_update, psgd_precondition, psgd_update
from .base import PreconditionedGradientMaker
from ._layer_pass import linear_or_conv_reason
from .newton import check_max_params
from .config import PreconditioningConfig

__all__ = ["KronPsgdGradientMaker", "PsgdGradientMaker"]


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


class _PsgdMaker(PreconditionedGradientMaker):
    """Shared plumbing: arguments, the preconditioned layers and the probe pass."""

    #: curvature from each rank's own batch; the preconditioned gradients are averaged (base class)
    _local_curvature = True

    _settings = ("precond_lr", "init_scale")

    def _unsupported_reason(self, name: str, module: nn.Module) -> str | None:
        reason = linear_or_conv_reason(module)  # any affine layer stored as [out, in...] (the registry's)
        if reason is None and not module.weight.requires_grad:
            return "frozen weight (PSGD's factors act on a layer's weight, its bias with it)"
        return reason

    def __init__(
        self,
        model: nn.Module,
        config: PreconditioningConfig | None = None,
        precond_lr: float = 0.01,
        init_scale: float = 1.0,
        use_functorch: bool = False,
        *,
        seed: int | None = None,
    ) -> None:
        _check_psgd_args(precond_lr, init_scale)
        super().__init__(model, config, seed=seed)
        self.precond_lr = float(precond_lr)
        self.init_scale = float(init_scale)
        self.use_functorch = bool(use_functorch)
        #: the preconditioned layers that own a trainable weight, in model order
        self.layers: list[str] = [n for n in self.preconditioned_modules if self._weight_bias(n)[0] is not None]
        #: the latest probe pair and whether it is still unused
        self.pairs: dict[str, list[Tensor]] = {}
        self.pairs_fresh = False

    def _check_settings(self) -> None:
        _check_psgd_args(self.precond_lr, self.init_scale)

    def _weight_bias(self, name: str) -> tuple[Tensor | None, Tensor | None]:
        ps = self.module_params(name)
        return ps.get("weight"), ps.get("bias")

    def _probe_pass(self) -> dict[str, tuple[Tensor, Tensor | None, Tensor, Tensor | None]]:
        """The gradient (into ``param.grad``) and H·v for a probe v on the layers' weights and biases:
        ``{layer: (v_weight, v_bias, Hv_weight, Hv_bias)}`` (biases None where absent)."""
        named = {k: p for k, p in self.model.named_parameters() if p.requires_grad}
        key_of = {id(p): k for k, p in named.items()}
        primals = {k: p.detach() for k, p in named.items()}
        tangents = {k: torch.zeros_like(p) for k, p in primals.items()}
        probes: dict[str, tuple[str | None, str | None]] = {}
        for name in self.layers:
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
        self._record_pass(out.detach() if isinstance(out, Tensor) else out, loss.detach())
        return {name: (tangents[kw], None if kb is None else tangents[kb],
                       hvp[kw].detach(), None if kb is None else hvp[kb].detach())
                for name, (kw, kb) in probes.items()}


class KronPsgdGradientMaker(_PsgdMaker):
    """Kronecker-factored PSGD for Linear and Conv2d layers (see the module docstring).

    Args:
        model: the model.
        config: :class:`PreconditioningConfig` (schedules, ``ignore_modules``; ``damping`` and
            ``ema_decay`` are not used by PSGD).
        precond_lr: μ, the normalised step of the factor updates, in (0, 1]. (default 0.01)
        init_scale: the factors start at ``init_scale · I``, > 0. (default 1.0)
        use_functorch: accepted for ASDL's signature (the pass always uses ``torch.func``).
        seed: seed of the probe generator (default: ``config.seed`` or derived).
    """

    _state_attributes = ("factors", "pairs", "pairs_fresh")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        #: layer name -> [Q_l, Q_r]
        self.factors: dict[str, list[Tensor]] = {}
        for name in self.layers:
            w, b = self._weight_bias(name)
            d_out, d_in = w.shape[0], w[0].numel() + (b is not None)
            eye = lambda d: self.init_scale * torch.eye(d, dtype=w.dtype, device=w.device)  # noqa: E731
            self.factors[name] = [eye(d_out), eye(d_in)]

    def update_curvature(self) -> None:
        self.pairs = {}
        for name, (vw, vb, hw, hb) in self._probe_pass().items():
            m = self.preconditioned_modules[name]
            self.pairs[name] = [_layer_matrix(m, vw, vb), _layer_matrix(m, hw, hb)]
        self.pairs_fresh = True

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


def _check_max_params_arg(max_params) -> None:
    if isinstance(max_params, bool) or not isinstance(max_params, int) or max_params < 1:
        raise ValueError(f"max_params must be a positive int, got {max_params!r}")


class PsgdGradientMaker(_PsgdMaker):
    """Full-matrix PSGD: one dense upper-triangular Q over the P weights and biases of the
    preconditioned Linear / Conv2d layers, g ← Qᵀ Q g (see the module docstring).

    Args:
        model, config, precond_lr, init_scale, use_functorch, seed: as for
            :class:`KronPsgdGradientMaker` (ASDL's signature; ``config`` may be omitted).
        max_params: the largest P accepted. (default: 5000)

    Cost per step O(P²) (the product Qᵀ Q g), per preconditioner update O(P²) (a triangular solve
    and ∇ Q by suffix sums, :func:`~curvfun.psgd_math.psgd_full_update`); memory P² entries for Q.
    """

    _state_attributes = ("Q", "pairs", "pairs_fresh")
    _settings = ("precond_lr", "init_scale", "max_params")

    def __init__(self, *args: Any, max_params: int = 5000, **kwargs: Any) -> None:
        _check_max_params_arg(max_params)
        super().__init__(*args, **kwargs)
        self.max_params = max_params
        self._params = [p for name in self.layers for p in self._weight_bias(name) if p is not None]
        self.num_params = sum(p.numel() for p in self._params)
        check_max_params("PsgdGradientMaker", self.num_params, max_params, "the dense factor Q", "O(P²) per step",
                         "KronPsgdGradientMaker")
        ref = self._params[0] if self._params else torch.empty(0)
        #: the upper-triangular factor, P = init_scale·I at the start
        self.Q = self.init_scale * torch.eye(self.num_params, dtype=ref.dtype, device=ref.device)

    def _check_settings(self) -> None:
        super()._check_settings()
        _check_max_params_arg(self.max_params)

    def _dense_requests(self) -> list:
        params = [p for n in self.preconditioned_modules for k, p in self.module_params(n).items()
                  if k in ("weight", "bias")]
        if not params:
            return []
        P = sum(p.numel() for p in params)
        return [("PsgdGradientMaker's dense factor Q", (P, P), params[0].dtype, params[0].device,
                 "restrict it with config.ignore_modules or use KronPsgdGradientMaker")]

    def update_curvature(self) -> None:
        vs, hs = [], []
        for vw, vb, hw, hb in self._probe_pass().values():
            vs += [vw.reshape(-1)] + ([] if vb is None else [vb.reshape(-1)])
            hs += [hw.reshape(-1)] + ([] if hb is None else [hb.reshape(-1)])
        if vs:
            self.pairs = {"all": [torch.cat(vs), torch.cat(hs)]}
            self.pairs_fresh = True

    def update_preconditioner(self) -> None:
        if not self.pairs_fresh:
            return
        dx, dg = self.pairs["all"]
        new = psgd_full_update(self.Q, dx, dg, self.precond_lr)
        self.Q = self._install_if_finite("all", new, self.Q, "PSGD factor")
        self.pairs_fresh = False

    def precondition(self) -> None:
        if not self._params or any(p.grad is None for p in self._params):
            return
        g = psgd_full_precondition(self.Q, torch.cat([p.grad.reshape(-1) for p in self._params]))
        for p, c in zip(self._params, torch.split(g, [p.numel() for p in self._params])):
            p.grad.copy_(c.reshape(p.shape))
