"""``SmwEmpNaturalGradientMaker``: the exact damped empirical natural gradient of the batch,
(F_emp + λI)^{-1} ḡ, through the Sherman-Morrison-Woodbury / push-through identity.

Conventions (see :mod:`curvfun.smw` for the derivation): U is the N x P matrix of per-sample
gradients ∇_θ ℓ_n of the per-sample losses (rows), ḡ = (1/N) Uᵀ1 the mean gradient (the gradient
of the usual ``reduction='mean'`` loss), F_emp = (1/N) UᵀU and λ = ``config.damping``. The maker
writes

    param.grad = (F_emp + λI)^{-1} ḡ = Uᵀ c,     c = (UUᵀ/N + λI)^{-1} 1/N,

over all parameters of the preconditioned layers jointly (one block for the whole model, as in
ASDL). With a ``reduction='sum'`` loss the objective is Σ ℓ_n and the result is
(UᵀU + λI)^{-1} Uᵀ1 (ASDL's ``data_average=False``).

Which pure functions are called when, on every step (one forward, two backward passes):

1. forward with the layers recorded (:func:`curvfun.capture.record_layers`), per-sample losses
   (the loss called with ``reduction='none'``);
2. a backward of Σ_n ℓ_n to the layers' zero perturbations only (no parameter gradients) gives the
   per-sample output-gradients; the Gram K = UUᵀ is the sum of :func:`curvfun.smw.layer_gram` over
   Linear / Conv2d layers (never materialising U), of ``U_l U_lᵀ`` for the other captured layers
   (Embedding, LayerNorm, BatchNorm in eval mode; their per-sample gradients are small) and, for
   layers the capture does not know, of per-sample gradients from one batched backward;
3. c = :func:`curvfun.smw.smw_coefficients` (an N x N Cholesky solve, float64 retry);
4. one vector-Jacobian product of the per-sample losses with cotangent c writes Uᵀc into
   ``param.grad`` (accumulating, like ``loss.backward()``). Parameters outside the preconditioned
   layers (ignored layers, tied weights, parameters held by container modules) get the plain
   gradient of the objective.

Memory O(N² + activations); no P x P (and no N x P for Linear / Conv2d) matrix is formed.

The curvature belongs to the current batch, so it is recomputed on every step: the config's
schedules must refresh every step (the default) and ``ema_decay`` must be -1; anything else is
rejected at construction. BatchNorm in train mode mixes the samples of a batch, so that per-sample
gradients are not what the capture measures: such a model is rejected at the step (call
``model.eval()`` on those layers or use another maker).

Differences from ASDL 0.1 (``asdl/precondition/smw.py``): ASDL's maker is a plain
``GradientMaker`` with its own config dataclass (``data_size``, ``damping=1e-5``); this one takes the
shared :class:`PreconditioningConfig` (the README's ``PreconditioningConfig(data_size=..., damping=...)``
works) and N is the batch size. ASDL adds a further ``1e-8`` to the diagonal of the Gram matrix
inside its Cholesky solve; here the damping is exactly λ. ASDL's result for the mean objective is
the same quantity, assembled as (1/λ)(ḡ − Uᵀ(...)) with a second backward; here the push-through
form Uᵀc needs one.
"""

from __future__ import annotations

import optree
import torch
from torch import Tensor, nn

from ..functional import has_train_mode_batchnorm
from ..layers import per_sample_layer_grads
from ..capture import override_parents, parameter_uses_outside, record_layers
from ..smw import layer_gram, rows_gram, smw_coefficients
from ._layer_pass import eps_leaves, module_infos, records_to_data, user_reduction
from .base import PreconditionedGradientMaker, unwrap_model
from .config import PreconditioningConfig, resolve_schedule, SCHEDULE_KINDS, INTERVAL_CONSTANT

__all__ = ["SmwEmpNaturalGradientMaker"]


def check_every_step(config: PreconditioningConfig, who: str) -> None:
    """Raise unless both schedules of ``config`` refresh on every step, with no EMA."""
    for kind in SCHEDULE_KINDS:
        s = resolve_schedule(config, kind)
        if s.ratio_mode or s.start_interval != 1 or s.interval_type != INTERVAL_CONSTANT:
            raise ValueError(
                f"{who} computes its curvature from the current batch on every step, so the {kind} schedule must "
                f"refresh every step (interval 1, constant, no ratio schedule); got {kind}_upd_interval="
                f"{getattr(config, f'{kind}_upd_interval')!r}, {kind}_interval_type={s.interval_type!r}"
            )
    if config.use_ema:
        raise ValueError(
            f"{who} has no moving average (the curvature belongs to the current batch): leave ema_decay=-1, "
            f"got {config.ema_decay!r}"
        )


class SmwEmpNaturalGradientMaker(PreconditionedGradientMaker):
    """Exact damped empirical natural gradient by the push-through identity (see the module
    docstring). Args: ``model``, ``config`` (uses ``damping`` > 0 and ``ignore_modules``),
    ``seed`` (unused: the method draws no random numbers)."""

    #: curvature from each rank's own batch; the preconditioned gradients are averaged (base class)
    _local_curvature = True

    def __init__(self, model: nn.Module, config: PreconditioningConfig | None = None, *, seed: int | None = None) -> None:
        if config is None:
            config = PreconditioningConfig()
        super().__init__(model, config, seed=seed)

    def _check_config(self, config: PreconditioningConfig) -> None:
        if not config.damping > 0:
            raise ValueError(
                f"SmwEmpNaturalGradientMaker needs damping > 0 (the N x N system UUᵀ/N + λI is singular "
                f"for λ = 0 once N exceeds the number of parameters); got damping={config.damping}"
            )
        check_every_step(config, "SmwEmpNaturalGradientMaker")

    def do_update_curvature(self, step: int | None = None) -> bool:
        return True

    def do_update_preconditioner(self, step: int | None = None) -> bool:
        return False

    def _parameter_split(self):
        pre: dict[str, nn.Parameter] = {}
        for name in self.preconditioned_modules:
            for local, p in self.module_params(name).items():
                pre[f"{name}.{local}" if name else local] = p
        ids = {id(p) for p in pre.values()}
        plain = {k: p for k, p in self.model.named_parameters() if p.requires_grad and id(p) not in ids}
        return pre, plain

    def update_curvature(self) -> None:
        bn = has_train_mode_batchnorm(self.model)
        if bn:
            raise ValueError(
                f"SmwEmpNaturalGradientMaker needs per-sample gradients, which BatchNorm in train mode does not "
                f"have (its output mixes the samples of a batch): modules {bn}. Call .eval() on them, or add "
                f"them to config.ignore_modules and keep them in eval mode"
            )
        reduction = user_reduction(self)
        if reduction not in ("mean", "sum"):
            raise ValueError(
                f"SmwEmpNaturalGradientMaker needs a loss with reduction 'mean' or 'sum' (the objective), got "
                f"{reduction!r}"
            )
        pre, plain = self._parameter_split()
        infos = module_infos(self.preconditioned_modules)
        with torch.enable_grad():
            with record_layers(infos, tap=True, parents=override_parents(unwrap_model(self.model), infos)) as records:
                output = self.call_model()
            raw = self.loss_from_output(output, reduction="none")
            if not isinstance(raw, Tensor) or raw.ndim == 0:
                raise ValueError(
                    "SmwEmpNaturalGradientMaker needs per-sample losses: loss_fn(..., reduction='none') must "
                    "return one loss per sample (shape [N, ...])"
                )
            N = raw.shape[0]
            first = output if isinstance(output, Tensor) else next(
                (v for v in optree.tree_leaves(output) if isinstance(v, Tensor)), None)
            if first is not None and first.ndim and first.shape[0] != N:
                # the loss sees the output flattened over positions (logits.view(-1, C) of a
                # [B, T, C] output): a sample is a row of the model's batch, its loss the sum of
                # its positions' (rows b·T .. b·T+T-1 in row-major order)
                B = first.shape[0]
                if N % B:
                    raise ValueError(
                        f"SmwEmpNaturalGradientMaker: the loss has {N} per-sample losses but the model's batch has "
                        f"{B} samples; the loss's rows must be the model's samples (or its samples x positions, "
                        f"flattened in row-major order as logits.view(-1, C) does)"
                    )
                N = B
            ell = raw.reshape(N, -1).sum(1)
            if reduction == "mean":
                ell = ell * (N / raw.numel())  # objective = mean_n ell_n
                objective, scale = ell.mean(), 1.0 / N
            else:
                objective, scale = ell.sum(), 1.0
            # per-sample output-gradients of the captured layers (no parameter gradients); a layer whose
            # parameters are also used elsewhere (a tied head) takes the exact autograd Gram instead
            for name in parameter_uses_outside(records, [ell]):
                records.pop(name)
            leaves = eps_leaves(records)
            # the Gram in the parameters' dtype (under autocast ell is bf16; Cholesky needs more digits)
            K = torch.zeros(N, N, dtype=next(iter(pre.values())).dtype if pre else ell.dtype, device=ell.device)
            covered: set[int] = set()
            if leaves:
                gs = torch.autograd.grad(ell.sum(), leaves, retain_graph=True, allow_unused=True)
                for name, data in records_to_data(records, 1.0, list(gs)).items():
                    if data.kind == "affine":
                        K += layer_gram(data.a, data.g[0], data.has_bias, data.has_weight)
                    else:
                        for U in per_sample_layer_grads(data).values():
                            K += rows_gram(U)
                    covered.update(id(p) for p in self.module_params(name).values())
            rest = [p for p in pre.values() if id(p) not in covered]
            if rest:
                K += _batched_gram(ell, rest)
            c = smw_coefficients(K.detach(), float(self.config.damping), scale)
            params = list(pre.values())
            new = torch.autograd.grad(ell, params, grad_outputs=c.to(ell.dtype), retain_graph=bool(plain), allow_unused=True)
            if plain:
                new_plain = torch.autograd.grad(objective, list(plain.values()), allow_unused=True)
                params += list(plain.values())
                new = tuple(new) + tuple(new_plain)
        with torch.no_grad():
            for p, g in zip(params, new):
                if g is None:
                    g = torch.zeros_like(p)
                if p.grad is None:
                    p.grad = g.detach()
                else:
                    p.grad.add_(g)
        self._record_pass(output, objective.detach())

    def precondition(self) -> None:
        """Nothing: the pass already wrote Uᵀc (the vector-Jacobian product needs its graph)."""


def _batched_gram(ell: Tensor, params: list[Tensor]) -> Tensor:
    """Σ over ``params`` of U_p U_pᵀ with per-sample gradients from one batched backward
    (a loop over samples where an op has no batching rule)."""
    N = ell.shape[0]
    eye = torch.eye(N, dtype=ell.dtype, device=ell.device)
    try:
        gs = torch.autograd.grad(ell, params, eye, retain_graph=True, is_grads_batched=True, allow_unused=True)
    except RuntimeError:
        rows = [torch.autograd.grad(ell[n], params, retain_graph=True, allow_unused=True) for n in range(N)]
        gs = [
            torch.stack([r[i] if r[i] is not None else torch.zeros_like(params[i]) for r in rows])
            for i in range(len(params))
        ]
    K = torch.zeros(N, N, dtype=ell.dtype, device=ell.device)
    for g in gs:
        if g is not None:
            K += rows_gram(g)
    return K
