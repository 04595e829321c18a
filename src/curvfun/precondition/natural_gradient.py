"""The natural-gradient family as ``GradientMaker`` s: K-FAC, EKFAC, low-rank K-FAC, diagonal,
unit-wise, layer-wise and full (empirical) natural gradient.

Every maker is "which pure functions, called when":

* curvature steps (``update_curvature``): one capture pass (:func:`curvfun.capture.record_layers`
  around the registered model + loss call), the user's ``loss.backward()`` for ``param.grad``,
  then the layer curvature from :mod:`curvfun.kron` / :mod:`curvfun.layers` / :mod:`curvfun.lowrank`,
  blended by EMA ``F ← (1 − decay)·F + decay·F_new`` when ``config.ema_decay`` is not -1;
* preconditioner steps (``update_preconditioner``): damped inverses of the current curvature;
* every step (``precondition``): ``param.grad ← inverse.matvec(param.grad)`` per layer.

Curvature is of the **per-sample** losses' mean (GUIDE): output gradients are those of ℓ_n, not
of the user's (mean-reduced) loss. For ``fisher_type="fisher_emp"`` they are taken from the
registered loss called with ``reduction="sum"`` (the loss function must accept ``reduction``);
for ``fisher_mc`` / ``fisher_exact`` from the logits (``setup_logits_repr``) and ``loss_type``'s
likelihood, sampled with the maker's generator. ``config.data_size`` is accepted for ASDL
compatibility and not used: the curvature is that of the batch mean.

A new curvature or inverse that is non-finite (or not positive definite) is not installed: the
last good one stays, with one warning per layer (:meth:`_install_if_finite`). Layers that are
unsupported, ignored, or share a parameter with another layer keep the plain gradient.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Any, Collection

import optree
import torch
from torch import Tensor, nn

from .. import distributed as cfd
from ..capture import (
    LayerRecord,
    ModuleInfo,
    _batched_backward,
    _check_versions,
    layer_kind,
    output_grad_columns,
    override_parents,
    record_layers,
    unbatched_records,
)
from ..kron import (
    BIAS_MODES,
    KFAC_TYPES,
    EKFACFactor,
    KronFactor,
    DiagFactor,
    _ekfac_from,
)
from ..kron_math import kron_factors_from_layer
from ..kron_rows import (
    KronRowsInverse,
    gradient_from_rows,
    kron_rows_from_layer,
    preconditioned_gradient_from_rows,
    rows_gradient_pays,
)
from ..layers import LayerData, layer_column_rows, layer_data, layer_diag_fisher
from ..linalg import MIN_DAMPING, NotPositiveDefiniteError, damped_cholesky_inverse, ema, psd_cholesky
from ..losses import LOSSES, get_likelihood
from ..lowrank import LowRankKron
from ..unit_wise import UNIT_WISE_KINDS, unit_wise_from_layer
from ._layer_pass import add_grad, backward_with_rows, holds_gradient, name_outside_uses, rows_route_module
from .base import PreconditionedGradientMaker, unwrap_model
from .asdl_names import CAPTURE_FISHER_TYPE
from .config import NO_EMA, PreconditioningConfig
from .state_packing import pack, unpack

__all__ = [
    "KfacGradientMaker",
    "EkfacGradientMaker",
    "LowRankKfacGradientMaker",
    "DiagNaturalGradientMaker",
    "UnitWiseNaturalGradientMaker",
    "LayerWiseNaturalGradientMaker",
    "FullNaturalGradientMaker",
    "EmpNaturalGradientMaker",
    "FISHER_TYPES",
    "DenseBlock",
    "RowsBlock",
]

#: ASDL's names -> curvfun's
FISHER_TYPES = CAPTURE_FISHER_TYPE  # the makers' fisher_type (ASDL's names) -> the capture's


# --- dense / low-rank blocks for layer-wise and full natural gradient -------------------------


@dataclass(frozen=True)
class DenseBlock:
    """F as a dense ``[P, P]`` matrix; ``inv`` = (F + λI)^{-1} once inverted."""

    F: Tensor
    inv: Tensor | None = None

    def damped_inverse(self, damping: float) -> "DenseBlock":
        return DenseBlock(self.F, damped_cholesky_inverse(self.F, max(damping, MIN_DAMPING), "Fisher block"))

    def solve(self, v: Tensor) -> Tensor:
        return self.inv @ v


@dataclass(frozen=True)
class RowsBlock:
    """F = UᵀU held as its rows ``U`` ``[R, P]`` (R = columns·N ≪ P); (F + λI)^{-1} v by the
    push-through identity: (v − Uᵀ (λI + UUᵀ)^{-1} U v)/λ, with the R x R Cholesky factor
    cached. Cost O(R·P) per solve, O(R²·P + R³) per refresh; never a P x P matrix."""

    U: Tensor
    chol: Tensor | None = None
    lam: float = 0.0

    def damped_inverse(self, damping: float) -> "RowsBlock":
        """The Cholesky factor of λI + UUᵀ, in float64 (the push-through cancels in v − Uᵀz)."""
        lam = max(float(damping), MIN_DAMPING)
        L = psd_cholesky((self.U @ self.U.T).to(torch.float64), "R x R Gram core of a Fisher block", lam)
        return RowsBlock(self.U, L, lam)

    def solve(self, v: Tensor) -> Tensor:
        Uv = (self.U @ v).to(self.chol.dtype)
        z = torch.cholesky_solve(Uv.unsqueeze(-1), self.chol).squeeze(-1).to(v.dtype)
        return (v - self.U.T @ z) / self.lam


for _cls, _kids, _meta in ((DenseBlock, ("F", "inv"), ()), (RowsBlock, ("U", "chol"), ("lam",))):
    optree.register_pytree_node(
        _cls,
        lambda o, k=_kids, m=_meta: (tuple(getattr(o, f) for f in k), tuple(getattr(o, f) for f in m), k),
        lambda meta, kids, c=_cls, k=_kids, m=_meta: c(**dict(zip(k, kids)), **dict(zip(m, meta))),
        namespace="curvfun",
    )


# --- the shared capture-based maker ----------------------------------------------------------------


class _CurvatureMaker(PreconditionedGradientMaker):
    """Shared plumbing: arguments, the capture pass, EMA, inverses and precondition()."""

    _kinds: tuple[str, ...] = ("affine", "embedding", "norm")
    _layer_parts = True  # MultiheadAttention with separate q/k/v weights: one layer per projection
    _state_attributes = ("curvature", "inverses")

    def __init__(
        self,
        model: nn.Module,
        config: PreconditioningConfig | None = None,
        fisher_type: str = "fisher_mc",
        loss_type: str = "cross_entropy",
        n_mc_samples: int = 1,
        *,
        seed: int | None = None,
        inverse_mode: str = "assigned",
    ) -> None:
        if fisher_type not in FISHER_TYPES:
            raise ValueError(f"unknown fisher_type {fisher_type!r}; expected one of {list(FISHER_TYPES)}")
        if loss_type not in LOSSES:
            raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {sorted(LOSSES)}")
        if not isinstance(n_mc_samples, int) or n_mc_samples < 1:
            raise ValueError(f"n_mc_samples must be a positive integer, got {n_mc_samples!r}")
        config = PreconditioningConfig() if config is None else config
        if not (config.damping >= 0 and math.isfinite(config.damping)):
            raise ValueError(f"config.damping must be a finite number >= 0, got {config.damping}")
        self.fisher_type = fisher_type  # ASDL's name, kept for its users
        self._capture_type = FISHER_TYPES[fisher_type]
        self.loss_type = loss_type
        self.n_mc_samples = n_mc_samples
        self.likelihood = get_likelihood(loss_type)
        self.curvature: dict[str, Any] = {}
        self._unbatched_warned: set[str] = set()
        self.inverses: dict[str, Any] = {}
        super().__init__(model, config, seed=seed, inverse_mode=inverse_mode)
        self._infos = {
            name: ModuleInfo(name, m, layer_kind(m), {k: f"{name}.{k}" if name else k for k in self.module_params(name)},
                             part=self._parts[name].name if name in self._parts else "",
                             attrs=dict(self._parts[name].params) if name in self._parts else None)
            for name, m in self.preconditioned_modules.items()
        }
        #: modules whose forward override must run for a recorded layer inside them to be called
        self._parents = override_parents(unwrap_model(self.model), self._infos)

    def _unsupported_reason(self, name: str, module: nn.Module) -> str | None:
        kind = layer_kind(module)
        if kind is None or kind not in self._kinds:
            return f"unsupported layer class {type(module).__name__}"
        return None

    # --- the capture pass ------------------------------------------------------------------------
    def _capture_pass(self) -> dict[str, LayerData]:
        """forward (recording) + output-gradient columns + the user's backward; returns layer data."""
        cands = self._rows_grad_candidates()
        with record_layers(self._infos, detach=lambda n, x: n in cands and self._rows_grad_would_pay(n, x),
                           tap=True, parents=self._parents) as recorded:
            self.forward()
        records = dict(recorded)  # the curvature's; the backward needs every recorded layer
        name_outside_uses(self, recorded, self._outside_warned)
        for name, rec in recorded.items():
            if rec.uncaptured is not None or not rec.inputs:
                records.pop(name)
                why = rec.uncaptured or ("not called through its own forward in this pass (its parameters, if "
                                         "used, are read directly, e.g. by a parent module)")
                if name not in self._unbatched_warned:
                    self._unbatched_warned.add(name)
                    warnings.warn(f"{type(self).__name__}: layer {name!r} was {why}; it keeps the plain gradient",
                                  UserWarning, stacklevel=4)
        out = self.logits if isinstance(self.logits, Tensor) else self.model_output
        first = out if isinstance(out, Tensor) else next(
            (t for t in optree.tree_leaves(out) if isinstance(t, Tensor)), None)
        if first is not None and first.ndim > 0:
            for name, why in unbatched_records(records, first.shape[0]).items():
                records.pop(name)
                if name not in self._unbatched_warned:
                    self._unbatched_warned.add(name)
                    warnings.warn(f"{type(self).__name__}: layer {name!r} was {why}; it keeps the plain gradient",
                                  UserWarning, stacklevel=4)
        names = [n for n, r in records.items() for _ in r.eps]
        leaves = [e for r in records.values() for e in r.eps]
        for r in records.values():
            r.grads = []
        if leaves:
            if self._capture_type == "emp":
                total = self.loss_from_output(self.model_output, reduction="sum")
                gs = torch.autograd.grad(total, leaves, retain_graph=True, allow_unused=True)
                gs = [(torch.zeros(l.shape, dtype=l.dtype, device=l.device) if g is None else g).unsqueeze(0)
                      for g, l in zip(gs, leaves)]  # None: the layer's output does not reach the loss
                weights = torch.ones(1, device=total.device)
            else:
                logits = self.logits
                if not isinstance(logits, Tensor):
                    raise TypeError(
                        f"{type(self).__name__} needs tensor logits for fisher_type={self.fisher_type!r}; got "
                        f"{type(logits).__name__}: declare them with gm.setup_logits_repr(dummy_y.logits)"
                    )
                cot, weights = output_grad_columns(
                    logits.detach(), self.likelihood, self._capture_type, None, self.n_mc_samples,
                    self.generator,
                )
                gs = _batched_backward(logits, leaves, cot.to(logits.dtype), retain=True)
            for n, g in zip(names, gs):
                records[n].grads.append(g)
        self._data_backward(recorded)
        _check_versions(records)
        return {n: layer_data(r, weights.to(r.inputs[0].dtype if r.inputs[0].is_floating_point() else torch.float32))
                for n, r in records.items() if r.inputs}

    def _data_backward(self, records: dict[str, LayerRecord]) -> None:
        """The backward of the data loss in a recorded pass (default: ``loss.backward()``)."""
        self.backward()

    def _rows_grad_candidates(self) -> dict[str, ModuleInfo]:
        """Layers recorded with their own parameters detached, their gradient taken from their rows
        (default: none; see :class:`KfacGradientMaker`)."""
        return {}

    @property
    def _decay(self) -> float:
        return self.config.ema_decay

    def _install_curvature(self, name: str, new: Any) -> None:
        blended = ema(self.curvature.get(name), new, self._decay)
        kept = self._install_if_finite(name, blended, self.curvature.get(name), "curvature")
        if kept is None:  # non-finite with nothing good before it: no curvature (plain gradient) yet
            self.curvature.pop(name, None)
        else:
            self.curvature[name] = kept

    def _invert(self, name: str, fn) -> None:
        try:
            new = fn()
        except (NotPositiveDefiniteError, torch.linalg.LinAlgError):  # numerical only: argument errors propagate
            new = {"nonfinite": torch.tensor(float("nan"))}
        self.inverses[name] = self._install_if_finite(name, new, self.inverses.get(name), "inverse")

    def _invert_all(self, fns: dict[str, Any]) -> None:
        """``self._invert(name, fn)`` for every item; under ``torch.distributed`` with
        ``inverse_mode="assigned"`` each rank runs only the layers :func:`~curvfun.distributed.assign_by_cost`
        gives it (cost: :func:`~curvfun.distributed.inverse_cost` of the curvature) and every rank
        installs the owner's result (its non-finite handling included: a rejected inverse leaves the
        owner's last good one, on every rank)."""
        owners = cfd.owners_for(self.inverse_mode, {n: cfd.inverse_cost(self.curvature.get(n)) for n in fns})
        me = cfd.rank()
        for name, fn in fns.items():
            if owners is None or owners[name] == me:
                self._invert(name, fn)
        if owners is not None:
            mine = {n: self.inverses.get(n) for n in fns if owners[n] == me}
            for name, value in cfd.broadcast_from_owners(mine, owners, self.step).items():
                if value is None:
                    self.inverses.pop(name, None)
                else:
                    self.inverses[name] = value

    def _reduce_curvature(self, new: dict[str, Any]) -> dict[str, Any]:
        """The mean over ranks of this step's per-layer curvature (one coalesced all-reduce; only
        called on curvature steps). Identity in one process."""
        return cfd.all_reduce_tree_mean(new, "curvature", self.step)

    def update_curvature(self) -> None:
        data = self._capture_pass()
        new = self._reduce_curvature({name: self._layer_curvature(ld) for name, ld in data.items()})
        for name, c in new.items():
            self._install_curvature(name, c)

    def _layer_curvature(self, ld: LayerData) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def update_preconditioner(self) -> None:
        self._invert_all({name: (lambda c=curv: c.damped_inverse(self.config.damping))
                          for name, curv in self.curvature.items()})

    def precondition(self, skip: Collection[str] = ()) -> None:
        """Every layer's ``.grad`` ← its inverse times it (layers in ``skip`` left as they are)."""
        for name, inv in self.inverses.items():
            if inv is None or name in skip:  # no good inverse yet: plain gradient
                continue
            params = self.module_params(name)
            grads = {k: p.grad for k, p in params.items()}
            if any(g is None for g in grads.values()):
                continue
            out = inv.matvec(grads)
            for k, p in params.items():
                if k in out:
                    p.grad.copy_(out[k])

    # --- state: factor objects as plain containers ---------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        return {name: pack(getattr(self, name)) for name in self._state_attributes}

    def _load_extra_state(self, state) -> None:
        missing = [k for k in self._state_attributes if k not in state]
        if missing:
            raise ValueError(f"the state dict's maker state misses {missing} for {type(self).__name__}")
        for name in self._state_attributes:
            setattr(self, name, unpack(state[name]))


class KfacGradientMaker(_CurvatureMaker):
    """K-FAC (Martens & Grosse 2015) with curvfun's factor conventions (GUIDE): A ⊗ B per Linear /
    Conv2d (bias its own block B, or ``bias="folded"``), diagonal-A Kronecker for Embedding,
    unit-wise 2x2 blocks for LayerNorm / BatchNorm (as ASDL); π-damped inverses
    (``damping_heuristic="pi"``, or ``"none"``). ``kfac_type="expand"|"reduce"`` for weight sharing.

    Cost per curvature step: one forward, one backward to the layer outputs per MC sample (none
    extra for ``fisher_emp`` beyond the sum-loss backward), the user's backward, and the factor
    GEMMs; per preconditioner step one Cholesky per factor; per step two GEMMs per layer.

    ``data_space="auto"`` (default) uses two exact shortcuts of :mod:`curvfun.kron_rows` outside
    ``torch.distributed``; ``"never"`` turns both off (dense factors, plain ``loss.backward()``):

    * without EMA (``ema_decay=-1``, ASDL's default), a Linear layer's factor side with R rows and
      width d, 2R ≤ d (a 784-wide input at batch 128), is kept as its rows and inverted by
      Woodbury: an R x R instead of a d x d Cholesky, O(o·d·R) instead of O(o·d²) per apply;
    * a plain ``nn.Linear`` layer (:func:`~curvfun.precondition._layer_pass.rows_route_module`)
      whose batch has fewer rows than its widths (:func:`rows_gradient_pays`) gets its
      preconditioned gradient as (B⁻¹gᵀ)(aA⁻¹) from the recorded inputs a and output gradients g
      of the loss. During its own calls its weight and bias are detached, so autograd skips its
      weight-gradient GEMM and accumulates into its ``.grad`` only what reaches the parameters
      elsewhere (a weight also used outside the layer, earlier micro-batches): that remainder is
      preconditioned by the same inverse and added, so the step is exact in every case. The
      layer's own part reaches ``.grad`` from the maker, not through autograd (tensor hooks on those
      parameters do not see it); every other parameter's gradient accumulates as after
      ``loss.backward()``. (Tied layers are not preconditioned at all.)
    """

    #: whether this maker may keep factor sides as rows (EKFAC needs dense factors for its eigh)
    _data_space_capable = True

    def __init__(
        self,
        model: nn.Module,
        config: PreconditioningConfig | None = None,
        fisher_type: str = "fisher_mc",
        loss_type: str = "cross_entropy",
        n_mc_samples: int = 1,
        kfac_type: str = "expand",
        bias: str = "separate",
        damping_heuristic: str = "pi",
        *,
        seed: int | None = None,
        inverse_mode: str = "assigned",
        data_space: str = "auto",
    ) -> None:
        if data_space not in ("auto", "never"):
            raise ValueError(f"unknown data_space {data_space!r}; expected 'auto' (rows + Woodbury where "
                             f"cheaper, without EMA) or 'never' (dense factors)")
        self.data_space = data_space
        if kfac_type not in KFAC_TYPES:
            raise ValueError(f"unknown kfac_type {kfac_type!r}; expected one of {KFAC_TYPES}")
        if bias not in BIAS_MODES:
            raise ValueError(f"unknown bias mode {bias!r}; expected one of {BIAS_MODES}")
        if damping_heuristic not in ("pi", "none"):
            raise ValueError(f"unknown damping_heuristic {damping_heuristic!r}; expected 'pi' or 'none'")
        self.kfac_type, self.bias, self.damping_heuristic = kfac_type, bias, damping_heuristic
        super().__init__(model, config, fisher_type, loss_type, n_mc_samples, seed=seed, inverse_mode=inverse_mode)
        #: this step's (a, g) rows of the layers whose gradient comes from their rows
        self._rows_grads: dict[str, tuple[Tensor, Tensor]] = {}
        #: layers that have taken the rows route (introspection)
        self._rows_seen: set[str] = set()

    def _layer_curvature(self, ld: LayerData) -> Any:
        if self._rows_allowed() and ld.kind == "affine" and not ld.layout:
            return kron_rows_from_layer(ld, self.kfac_type, self.bias)
        return kron_factors_from_layer(ld, self.kfac_type, self.bias)

    # --- gradients straight from the rows ---------------------------------------------------------
    def plain_pass(self) -> None:
        """A non-refresh step's pass: recorded (inputs + zero perturbations, the candidate layers'
        own parameters detached during their calls) when some layer may get its gradient from its
        rows, else the plain forward + backward."""
        infos = self._rows_grad_candidates()
        if not infos:
            return super().plain_pass()
        with record_layers(infos, detach=self._rows_grad_would_pay, only_detached=True) as records:
            self.forward()
        self._data_backward(records)
        _check_versions(records)

    def _rows_grad_candidates(self) -> dict[str, ModuleInfo]:
        if not (self._data_space_capable and self.data_space == "auto") or cfd.is_distributed():
            return {}
        return {n: i for n, i in self._infos.items()
                if isinstance(i.module, nn.Linear) and "weight" in i.keys and rows_route_module(i.module)}

    def _rows_grad_would_pay(self, name: str, x: Tensor) -> bool:
        """Detach the layer's own parameters for this call (its input ``x``) iff its rows pay."""
        return self._rows_grad_pays(name, self._infos[name].module, x.numel() // max(x.shape[-1], 1))

    def _rows_grad_pays(self, name: str, module: nn.Linear, rows: int) -> bool:
        d_in = module.in_features + (1 if self.bias == "folded" and module.bias is not None else 0)
        inv = self.inverses.get(name)
        if isinstance(inv, KronRowsInverse):
            ra = inv.A.shape[0] if inv.a_rows else None
            rb = inv.B.shape[0] if inv.b_rows else None
        else:  # dense inverse (or none yet): compare with dense sides
            ra = rb = None
        return rows_gradient_pays(rows, d_in, module.out_features, ra, rb)

    def _data_backward(self, records: dict[str, LayerRecord]) -> None:
        """The data loss's backward. The layers recorded with their own parameters detached get
        their own part of the gradient from their rows (:func:`backward_with_rows`): kept as rows for
        :meth:`precondition` to form B⁻¹(gᵀa)A⁻¹ where that is cheaper (:func:`rows_gradient_pays`),
        else formed as gᵀa into ``.grad``."""
        if not any(r.detached for r in records.values()):
            return self.backward()
        folded = self.bias == "folded"
        for name, (a, g) in backward_with_rows(self, records, fold_bias=folded).items():
            params = self.module_params(name)
            if self._rows_grad_pays(name, records[name].module, a.shape[0]):
                self._rows_grads[name] = (a, g)
                self._rows_seen.add(name)
            else:
                own = gradient_from_rows(a, g, "bias" in params, folded and "bias" in params, params["weight"].shape)
                for key, value in own.items():
                    add_grad(params[key], value)

    def precondition(self) -> None:
        rows, self._rows_grads = self._rows_grads, {}
        # a rows layer's .grad holds only what reached its parameters outside its own calls (or was
        # accumulated before): usually nothing; precondition that remainder only where there is one
        plain = set()
        for name in rows:
            params = self.module_params(name).values()
            if any(holds_gradient(p) for p in params):
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
            else:
                plain.add(name)
        super().precondition(skip=plain)
        for name, (a, g) in rows.items():
            params = self.module_params(name)
            inv = self.inverses.get(name)
            out = None if inv is None else preconditioned_gradient_from_rows(inv, a, g)
            if out is None:
                raw = gradient_from_rows(a, g, "bias" in params, self.bias == "folded" and "bias" in params,
                                         params["weight"].shape)
                out = raw if inv is None else inv.matvec(raw)
            for k, p in params.items():
                add_grad(p, out[k])

    def _rows_allowed(self) -> bool:
        """Rows are exact only for this step's factors (no EMA) and per process (no all-reduce)."""
        return (self._data_space_capable and self.data_space == "auto" and self._decay == NO_EMA
                and not cfd.is_distributed())

    def update_preconditioner(self) -> None:
        fns = {}
        for name, f in self.curvature.items():
            if isinstance(f, KronFactor) or hasattr(f, "damping"):
                fns[name] = lambda f=f: f.damped_inverse(self.config.damping, self.damping_heuristic)
            else:
                fns[name] = lambda f=f: f.damped_inverse(self.config.damping)
        self._invert_all(fns)


class EkfacGradientMaker(KfacGradientMaker):
    """EKFAC (George et al. 2018): K-FAC's eigenbasis refreshed on preconditioner steps, the
    diagonal scalings S = E[(Q_Bᵀ G_n Q_A)²] re-estimated (EMA) on every curvature step in the
    current basis; inverse Q diag(1/(S + λ)) Qᵀ. Non-Kronecker layers use their K-FAC factor.
    (ASDL 0.1's ``EkfacGradientMaker`` calls methods it does not define and cannot run.)"""

    _state_attributes = ("curvature", "inverses", "ekfac")
    _data_space_capable = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.ekfac: dict[str, EKFACFactor] = {}
        self._last_data: dict[str, LayerData] = {}
        super().__init__(*args, **kwargs)

    def update_curvature(self) -> None:
        data = self._capture_pass()
        # this step's factors and, in the current bases, scalings: one all-reduce for all of them
        fresh_all = {
            name: _scalings(_ekfac_from(replace_eig(self.ekfac[name]), ld))
            for name, ld in data.items()
            if name in self.ekfac and ld.kind == "affine" and not ld.layout
        }
        new_curv, fresh_all = self._reduce_curvature(
            ({name: self._layer_curvature(ld) for name, ld in data.items()}, fresh_all)
        )
        for name, ld in data.items():
            self._install_curvature(name, new_curv[name])
            old = self.ekfac.get(name)
            if name in fresh_all:
                fresh = replace(old, S=fresh_all[name][0], s_bias=fresh_all[name][1])
                S = ema(old.S, fresh.S, self._decay)
                sb = None if old.s_bias is None else ema(old.s_bias, fresh.s_bias, self._decay)
                new = replace(old, S=S, s_bias=sb)
                if self._install_if_finite(name, new, None, "EKFAC scaling") is not None:
                    self.ekfac[name] = new
                    self._invert(name, lambda e=new: e.damped_inverse(self.config.damping))
        self._last_data = data

    def update_preconditioner(self) -> None:
        # the eigh runs on every rank (identical reduced factors, so identical bases); the scalings
        # of the new bases are averaged over ranks in one all-reduce
        eigs: dict[str, Any] = {}
        for name, f in self.curvature.items():
            if isinstance(f, KronFactor):
                try:
                    eigs[name] = f.eigh()
                except (RuntimeError, ValueError):
                    eigs[name] = None
        scal = {
            name: _scalings(_ekfac_from(eig, self._last_data[name]))
            for name, eig in eigs.items()
            if eig is not None and name in self._last_data
        }
        scal = self._reduce_curvature(scal)
        others = {}
        for name, f in self.curvature.items():
            if isinstance(f, KronFactor):
                try:
                    eig = eigs[name]
                    if eig is None:
                        raise ValueError("eigh failed")
                    ld = self._last_data.get(name)
                    if ld is not None:
                        ek = _ekfac_from_scalings(eig, *scal[name])
                    else:
                        lam = eig.eigenvalues().reshape(-1, eig.QB.shape[-1], eig.QA.shape[-1])
                        sb = eig.lamB.reshape(lam.shape[0], -1) if f.has_bias and not f.folded else None
                        ek = EKFACFactor(eig.QA, eig.QB, lam, sb, f.weight_shape, f.has_bias, f.folded)
                except (RuntimeError, ValueError):
                    ek = None
                if ek is not None and self._install_if_finite(name, ek, None, "EKFAC basis") is not None:
                    self.ekfac[name] = ek
                    self._invert(name, lambda e=ek: e.damped_inverse(self.config.damping))
                else:
                    self._invert(name, lambda: (_ for _ in ()).throw(NotPositiveDefiniteError("eigh failed")))
            else:
                others[name] = lambda f=f: f.damped_inverse(self.config.damping)
        self._invert_all(others)

    def _teardown(self) -> None:
        self._last_data = {}


def _scalings(ek: EKFACFactor) -> tuple[Tensor, Tensor | None]:
    return ek.S, ek.s_bias


def _ekfac_from_scalings(eig: Any, S: Tensor, s_bias: Tensor | None) -> EKFACFactor:
    return EKFACFactor(eig.QA, eig.QB, S, s_bias, eig.weight_shape, eig.has_bias, eig.folded)


def replace_eig(ek: EKFACFactor):
    """The (Q_A, Q_B) basis of an EKFAC factor as a KronEigen-like object for :func:`_ekfac_from`."""
    from ..kron import KronEigen

    return KronEigen(ek.QA, torch.zeros(ek.QA.shape[:-1]), ek.QB, torch.zeros(ek.QB.shape[:-1]),
                     ek.weight_shape, ek.has_bias, ek.folded)


class LowRankKfacGradientMaker(KfacGradientMaker):
    """Low-rank K-FAC (the low-rank ASDL seed): per Linear / Conv2d (groups = 1) layer, A ≈ rank-k
    and B ≈ diag + rank-k by warm-started block power iteration on the captured rows (the d x d
    factors are never formed), inverted by Woodbury (:class:`curvfun.lowrank.LowRankKron`);
    π-damping from the exact traces. Other supported layers use their K-FAC factors.

    ``rank`` is clipped to each side's dimension. The factors are those of the current batch:
    an EMA of factors that are never formed is not offered, so ``config.ema_decay`` must be -1.
    The low-rank factors are refreshed (and inverted) on curvature steps. The power iteration
    draws its random start from its own generator (``power_generator``), seeded with ``seed``
    on every rank (the MC-sampling generator is seeded with ``seed + rank``).

    Under ``torch.distributed`` no rows are gathered: on curvature steps each rank multiplies its
    own rows and :func:`curvfun.lowrank.lowrank_kron_many` sums over ranks (category
    ``"curvature"``) once the statistics (‖a‖², ‖g‖², diag(GᵀG), sample counts: one all-reduce of
    O(Σ d_out) numbers) and then, per power-iteration step, the products Uᵀ(U Q) of every layer
    and both sides (one all-reduce of O(Σ (d_in + d_out)·k) numbers): ``power_iters + 1``
    all-reduces per refresh, whatever the batch size, and the result equals one process on the
    concatenated batch (unequal per-rank batches included). The k x k Woodbury cores are then
    built on every rank (O(d·k² + k³), nothing to assign); the other layers' K-FAC factors are
    averaged and inverted like :class:`KfacGradientMaker`'s (``inverse_mode``). Nothing is
    communicated on other steps.
    """

    _state_attributes = ("curvature", "inverses", "lowrank")

    def __init__(
        self,
        model: nn.Module,
        config: PreconditioningConfig | None = None,
        rank: int = 16,
        power_iters: int = 5,
        fisher_type: str = "fisher_mc",
        loss_type: str = "cross_entropy",
        n_mc_samples: int = 1,
        damping_heuristic: str = "pi",
        *,
        seed: int | None = None,
        inverse_mode: str = "assigned",
    ) -> None:
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if not isinstance(power_iters, int) or power_iters < 1:
            raise ValueError(f"power_iters must be a positive integer, got {power_iters!r}")
        self.rank, self.power_iters = rank, power_iters
        self.lowrank: dict[str, LowRankKron] = {}
        super().__init__(model, config, fisher_type, loss_type, n_mc_samples, "expand", "separate",
                         damping_heuristic, seed=seed, inverse_mode=inverse_mode)
        #: the power iteration's random draws: the same stream on every rank
        self.power_generator = torch.Generator(device=self.device)
        self.power_generator.manual_seed(self.seed % 2**63)

    def _check_config(self, config: PreconditioningConfig) -> None:
        if config.ema_decay != NO_EMA:
            raise ValueError(
                "LowRankKfacGradientMaker keeps no EMA of its factors (the d x d factors are never formed): "
                "set config.ema_decay=-1"
            )

    def update_curvature(self) -> None:
        from ..lowrank import LowRankRows, lowrank_kron_many

        data = self._capture_pass()
        names, items, others = [], [], {}
        for name, ld in data.items():
            if ld.kind == "affine" and ld.a.shape[1] == 1 and not ld.layout and ld.has_weight:
                N, _, T, d = ld.a.shape
                g = ld.g * ld.weights.sqrt().to(ld.g.dtype).reshape(-1, 1, 1, 1, 1)
                g_rows = g.reshape(-1, g.shape[-1])
                old = self.lowrank.get(name)
                names.append(name)
                items.append(LowRankRows(
                    ld.a.reshape(N * T, d), g_rows, (min(self.rank, d), min(self.rank, g_rows.shape[-1])),
                    self.config.damping, a_count=N * T, b_count=N, heuristic=self.damping_heuristic,
                    power_iters=self.power_iters, init=None if old is None else old.warm_start(),
                ))
            else:
                others[name] = self._layer_curvature(ld)
        reduce = None
        if cfd.is_distributed():
            reduce = lambda ts: cfd.all_reduce_sum_coalesced(ts, "curvature", self.step)  # noqa: E731
        for name, new in zip(names, lowrank_kron_many(items, reduce, self.power_generator)):
            if isinstance(new, Exception):
                new = {"nonfinite": torch.tensor(float("nan"))}
            got = self._install_if_finite(name, new, self.lowrank.get(name), "low-rank factors")
            if got is not None:
                self.lowrank[name] = got
                self.inverses[name] = got
        for name, c in self._reduce_curvature(others).items():
            self._install_curvature(name, c)

    def update_preconditioner(self) -> None:
        self._invert_all({name: (lambda f=f: f.damped_inverse(self.config.damping))
                          for name, f in self.curvature.items()})

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "power_generator": self.power_generator.get_state()}

    def _load_extra_state(self, state) -> None:
        super()._load_extra_state(state)
        if "power_generator" in state:
            self.power_generator.set_state(state["power_generator"].clone())


class DiagNaturalGradientMaker(_CurvatureMaker):
    """Diagonal natural gradient: g / (diag F + λ) with diag F = (1/N) Σ_k w_k Σ_n (∇ℓ_nk)² per
    parameter of every supported layer (exact diagonal of the chosen Fisher type)."""

    def _layer_curvature(self, ld: LayerData) -> Any:
        return DiagFactor(layer_diag_fisher(ld))


class UnitWiseNaturalGradientMaker(_CurvatureMaker):
    """Unit-wise natural gradient (ASDL's ``SHAPE_UNIT_WISE``): for every output unit c of an
    affine layer (Linear, convolutions, attention projections: its fan-in row ``W[c].reshape(-1)``,
    d = C_in/groups·Π kernel entries, and its bias ``b[c]``) and every channel of a norm layer
    ((γ_c, β_c)), the exact Fisher block

        F_c = (1/N) Σ_k w_k Σ_n u_kn,c u_kn,cᵀ,   u_kn,c = Σ_t ĝ_kn,t,c · [a_n,t; 1]

    (:func:`curvfun.unit_wise.unit_wise_from_layer`; frozen weight or bias dropped from u), and
    the preconditioned gradient ``(F_c + λI)^{-1} g_c`` per unit. Cost per curvature step
    O(K·N·C·(T·d + d²)) per layer, per inverse O(C·(d + 1)³), per step O(C·(d + 1)²). Other
    layers keep the plain gradient."""

    _kinds = UNIT_WISE_KINDS

    def _layer_curvature(self, ld: LayerData) -> Any:
        return unit_wise_from_layer(ld)


class _BlockMaker(_CurvatureMaker):
    """Layer-wise / full blocks from per-sample column gradients U: (F + λI)^{-1} g.

    Without EMA (``ema_decay=-1``) F = UᵀU is held as its rows and solved by the push-through
    identity (:class:`RowsBlock`, never P x P); with EMA the dense block is accumulated and
    inverted by Cholesky (:class:`DenseBlock`, O(P³): small models only)."""

    def _blocks(self, rows: dict[str, Tensor]) -> dict[str, Any]:
        """This step's blocks from the rows ``U`` of each block. Under ``torch.distributed``: the
        rows of every rank stacked and scaled by 1/sqrt(world size) (F = mean over ranks of UᵀU;
        one all-gather per block), or, with EMA, the dense blocks averaged (one all-reduce)."""
        if self._decay == NO_EMA:
            ws = cfd.world_size()
            if ws == 1:
                return {n: RowsBlock(U) for n, U in rows.items()}
            return {n: RowsBlock(cfd.all_gather_rows(U, "curvature", self.step) / math.sqrt(ws))
                    for n, U in rows.items()}
        return self._reduce_curvature({n: DenseBlock(U.T @ U) for n, U in rows.items()})

    def _dense_requests(self) -> list:
        """With EMA the dense blocks are P x P (per layer, or over all layers for the full maker)."""
        if self._decay == NO_EMA:
            return []
        sizes = {n: sum(p.numel() for p in self.module_params(n).values()) for n in self.preconditioned_modules}
        if not sizes:
            return []
        full = isinstance(self, FullNaturalGradientMaker)
        P = sum(sizes.values()) if full else max(sizes.values())
        p0 = next(iter(self.module_params(next(iter(sizes))).values()))
        what = f"{type(self).__name__} with EMA (ema_decay={self.config.ema_decay})"
        what += "" if full else " (largest layer)"
        return [(what, (P, P), p0.dtype, p0.device,
                 "use ema_decay=-1 (rows, never P x P), KfacGradientMaker, or config.ignore_modules")]

    def _install_block(self, name: str, new: Any) -> None:
        old = self.curvature.get(name)
        if isinstance(new, DenseBlock) and isinstance(old, DenseBlock):
            new = DenseBlock(ema(old.F, new.F, self._decay))
        self.curvature[name] = self._install_if_finite(name, new, old, "curvature")

    def _apply(self, names: list[str], inv) -> None:
        params = [p for n in names for p in self.module_params(n).values()]
        if any(p.grad is None for p in params):
            return
        v = torch.cat([p.grad.reshape(-1) for p in params])
        out = inv.solve(v)
        i = 0
        for p in params:
            p.grad.copy_(out[i : i + p.numel()].reshape(p.shape))
            i += p.numel()


class LayerWiseNaturalGradientMaker(_BlockMaker):
    """One Fisher block per layer over all its parameters (weight and bias together)."""

    def update_curvature(self) -> None:
        rows = {name: layer_column_rows(ld) for name, ld in self._capture_pass().items()}
        for name, block in self._blocks(rows).items():
            self._install_block(name, block)

    def precondition(self) -> None:
        for name, inv in self.inverses.items():
            self._apply([name], inv)


class FullNaturalGradientMaker(_BlockMaker):
    """One Fisher block over the parameters of all preconditioned layers (cross-layer terms
    included): (F + λI)^{-1} g."""

    _FULL = "__full__"
    _state_attributes = ("curvature", "inverses", "full_names")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        #: the layers (in order) whose parameters the full block covers
        self.full_names: list[str] = []
        super().__init__(*args, **kwargs)

    def update_curvature(self) -> None:
        data = self._capture_pass()
        names = [n for n in self.preconditioned_modules if n in data]
        if self.full_names and names != self.full_names and self._decay != NO_EMA:
            self.curvature.pop(self._FULL, None)  # the EMA'd block covered other layers
        U = torch.cat([layer_column_rows(data[n]) for n in names], 1)
        self.full_names = names
        self._install_block(self._FULL, self._blocks({self._FULL: U})[self._FULL])

    def precondition(self) -> None:
        inv = self.inverses.get(self._FULL)
        if inv is not None:
            self._apply(list(self.full_names), inv)


class EmpNaturalGradientMaker(FullNaturalGradientMaker):
    """Full natural gradient with the empirical Fisher (ASDL's ``EmpNaturalGradientMaker``):
    (F_emp + λI)^{-1} g, F_emp = (1/N) Σ_n g_n g_nᵀ, by the N x N push-through solve."""

    def __init__(self, model: nn.Module, config: PreconditioningConfig | None = None,
                 loss_type: str = "cross_entropy", *, seed: int | None = None,
                 inverse_mode: str = "assigned") -> None:
        super().__init__(model, config, "fisher_emp", loss_type, 1, seed=seed, inverse_mode=inverse_mode)
