"""The optimizer registry of the ``curvfun`` command: one entry per method.

An entry maps a name to a factory ``factory(model, hp, ctx) -> (optimizer, grad_maker)`` and
its default hyper-parameters ``hp``. Every method is then trained by the same ASDL loop::

    optimizer.zero_grad(set_to_none=True)
    dummy_y = grad_maker.setup_model_call(model, x)
    grad_maker.setup_loss_call(F.cross_entropy, dummy_y, t)
    y, loss = grad_maker.forward_and_backward()
    optimizer.step()

* first-order methods (SGD, Adam, AdamW) pair a ``torch.optim`` optimizer with the plain
  ``curvfun.precondition.GradientMaker`` (the gradients of ``loss.backward()``);
* preconditioners (K-FAC, Shampoo, ...) pair a ``curvfun.precondition.XxxGradientMaker``
  built from a ``PreconditioningConfig`` with ``torch.optim.SGD``;
* optimizers that read curvature themselves (AdaFisher, AdaHessian) pair with the plain
  ``GradientMaker`` (``create_graph=True`` for AdaHessian's Hessian-vector products).

Entries with ``default_compare=False`` (dense curvature that does not fit the default run) run
only when named explicitly.
"""

from __future__ import annotations

import json
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

import curvfun.optim
from curvfun import precondition as P

from .config import CliError


# ----------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class BuildContext:
    """What a factory may need besides the model and its hyper-parameters."""

    batch_size: int
    steps: int
    seed: int = 0
    loss_type: str = "cross_entropy"


Factory = Callable[[nn.Module, Dict[str, Any], BuildContext], Tuple[Any, Any]]


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    summary: str
    factory: Factory
    defaults: Mapping[str, Any] = field(default_factory=dict)
    default_compare: bool = True
    distributed: bool = True  # runs data-parallel under torch.distributed (cli.launch)
    #: per-model changes to ``defaults`` (the defaults are tuned on the digits MLP)
    model_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def hyperparameters(self, overrides: Optional[Mapping[str, Any]] = None,
                        model: Optional[str] = None) -> Dict[str, Any]:
        """The defaults, with this model's changes (``model_defaults``), then the user's ``overrides``."""
        hp = dict(self.defaults)
        hp.update(self.model_defaults.get(model, {}))
        for key, value in (overrides or {}).items():
            if key not in hp:
                raise CliError(f"unknown hyper-parameter {key!r} for optimizer {self.name!r}; "
                               f"valid: {', '.join(hp) or '(none)'}")
            _check_kind(self.name, key, value, hp[key])
            hp[key] = value
        return hp

    def build(self, model: nn.Module, hp: Mapping[str, Any], ctx: BuildContext):
        return self.factory(model, dict(hp), ctx)


def _check_kind(opt: str, key: str, value: Any, default: Any) -> None:
    """A hyper-parameter keeps its default's kind: number, bool, string or list (None: any)."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    checks = ((bool, lambda v: isinstance(v, bool), "true or false"), (int, number, "a number"),
              (float, number, "a number"), (str, lambda v: isinstance(v, str), "a string"),
              ((list, tuple), lambda v: isinstance(v, (list, tuple)), "a list"))
    for kind, ok, what in checks:
        if isinstance(default, kind):
            if not ok(value):
                shown = json.dumps(list(default) if isinstance(default, tuple) else default)
                raise CliError(f"hyper-parameter {key!r} of optimizer {opt!r} must be {what}, got {value!r} "
                               f"(its default: {shown})")
            return


REGISTRY: Dict[str, OptimizerSpec] = {}


def register(spec: OptimizerSpec) -> OptimizerSpec:
    REGISTRY[spec.name] = spec
    return spec


def available_names(default_only: bool = False) -> List[str]:
    return [n for n, s in REGISTRY.items() if s.default_compare or not default_only]


def get_spec(name: str) -> OptimizerSpec:
    spec = REGISTRY.get(name)
    if spec is None:
        raise CliError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(available_names())}")
    return spec


def resolve_names(names: List[str]) -> List[str]:
    """Expand 'all' (every available default entry) and check every name."""
    out: List[str] = []
    for n in names:
        for m in (available_names(default_only=True) if n == "all" else [n]):
            get_spec(m)
            if m not in out:
                out.append(m)
    if not out:
        raise CliError("no optimizer selected")
    return out


# ----------------------------------------------------------------------------- factories

def _torch_optimizer(cls_name: str) -> Factory:
    def factory(model, hp, ctx):
        opt = getattr(torch.optim, cls_name)(model.parameters(), **hp)
        return opt, P.GradientMaker(model)
    return factory


_CONFIG_KEYS = ("damping", "ema_decay", "curvature_upd_interval", "preconditioner_upd_interval")
_SGD_KEYS = ("lr", "momentum", "weight_decay")


def _maker(cls_name: str, sgd_keys: Tuple[str, ...] = _SGD_KEYS, **fixed) -> Factory:
    """K-FAC-style entry: ``XxxGradientMaker(model, PreconditioningConfig(...), **kwargs)`` + SGD.

    ``hp`` keys in ``_CONFIG_KEYS`` go to the config (with ``data_size`` = batch size and
    ``num_total_steps`` = steps), ``sgd_keys`` (default ``lr``, ``momentum``, ``weight_decay``) to
    SGD, the rest to the maker (with ``seed`` = the run's seed where the maker takes one).
    """
    def factory(model, hp, ctx):
        maker_cls = getattr(P, cls_name)
        config = P.PreconditioningConfig(data_size=ctx.batch_size, num_total_steps=ctx.steps,
                            **{k: hp[k] for k in _CONFIG_KEYS if k in hp})
        kwargs = {k: v for k, v in hp.items() if k not in _CONFIG_KEYS + sgd_keys}
        kwargs.update(fixed)
        if "seed" not in kwargs and _accepts(maker_cls, "seed"):
            kwargs["seed"] = ctx.seed  # MC sampling reproducible per run (and saved in its state_dict)
        gm = maker_cls(model, config, **kwargs)
        opt = torch.optim.SGD(model.parameters(), **{k: hp[k] for k in sgd_keys if k in hp})
        return opt, gm
    return factory


def _accepts(cls, name: str) -> bool:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def _model_optimizer(cls_name: str) -> Factory:
    """AdaFisher-style entry: ``curvfun.optim.Xxx(model, **hp)`` + plain gradients."""
    def factory(model, hp, ctx):
        from .. import distributed as cfd
        cls = getattr(curvfun.optim, cls_name)
        if cfd.is_distributed() and "dist" not in hp and _accepts(cls, "dist"):
            hp = {**hp, "dist": True}  # factors and gradients averaged over ranks by the optimizer
        return cls(model, **hp), P.GradientMaker(model)
    return factory


def _adahessian(model, hp, ctx):
    cls = curvfun.optim.AdaHessian
    if "seed" not in hp and _accepts(cls, "seed"):
        hp = {**hp, "seed": ctx.seed}
    opt = cls(model.parameters(), **hp)
    return opt, P.GradientMaker(model, create_graph=True)


#: on the digits CNN the K-FAC family diverges at the MLP's damping (0.03-0.1) within ~60 steps;
#: 0.3 is stable for K-FAC, EKFAC and low-rank K-FAC (checked over 300 steps, seed 0)
_KFAC_CNN = {"cnn": {"damping": 0.3}}


def _ng(interval: int = 5, damping: float = 0.03, lr: float = 0.03, ema_decay: float = 0.1, **extra):
    """Hyper-parameters of a natural-gradient style maker, chosen on the digits MLP (300 steps of
    batch 64; stable over seeds 0-2): SGD momentum 0.9 with a smaller lr than plain SGD (the
    preconditioned step is larger), curvature and inverses refreshed every 5 steps, EMA 0.1."""
    return dict(lr=lr, momentum=0.9, weight_decay=0.0, damping=damping, ema_decay=ema_decay,
                curvature_upd_interval=interval, preconditioner_upd_interval=interval, **extra)


for _spec in [
    # first order
    OptimizerSpec("sgd", "torch.optim.SGD with momentum", _torch_optimizer("SGD"),
                  dict(lr=0.1, momentum=0.9, weight_decay=0.0)),
    OptimizerSpec("adam", "torch.optim.Adam", _torch_optimizer("Adam"),
                  dict(lr=3e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0)),
    OptimizerSpec("adamw", "torch.optim.AdamW (decoupled weight decay)", _torch_optimizer("AdamW"),
                  dict(lr=3e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=1e-2)),
    # natural-gradient family (issue 5)
    OptimizerSpec("kfac", "K-FAC (MC Fisher, 1 sample) + SGD", _maker("KfacGradientMaker"),
                  _ng(fisher_type="fisher_mc", n_mc_samples=1),
                  model_defaults=_KFAC_CNN),
    OptimizerSpec("ekfac", "eigenvalue-corrected K-FAC (empirical Fisher) + SGD", _maker("EkfacGradientMaker"),
                  _ng(damping=0.1, fisher_type="fisher_emp"),
                  model_defaults=_KFAC_CNN),
    OptimizerSpec("lowrank_kfac", "low-rank(+diag) K-FAC by power iteration (rank 16) + SGD",
                  _maker("LowRankKfacGradientMaker"), _ng(lr=0.01, ema_decay=-1, rank=16, power_iters=2, fisher_type="fisher_mc"), model_defaults=_KFAC_CNN),
    OptimizerSpec("diag_ng", "diagonal natural gradient + SGD", _maker("DiagNaturalGradientMaker"),
                  _ng(damping=0.1)),
    OptimizerSpec("unitwise_ng", "unit-wise natural gradient (one block per output unit) + SGD",
                  _maker("UnitWiseNaturalGradientMaker"), _ng(lr=0.01)),
    # no EMA: the blocks stay as N x N push-through solves (with EMA they are dense P x P blocks)
    OptimizerSpec("layerwise_ng", "layer-wise (one block per layer) natural gradient + SGD",
                  _maker("LayerWiseNaturalGradientMaker"), _ng(damping=0.3, ema_decay=-1)),
    OptimizerSpec("full_ng", "full natural gradient (all layers, one block) + SGD", _maker("FullNaturalGradientMaker"),
                  _ng(damping=0.3, ema_decay=-1)),
    OptimizerSpec("emp_ng", "full empirical-Fisher natural gradient + SGD", _maker("EmpNaturalGradientMaker"),
                  _ng(damping=0.3, ema_decay=-1)),
    # the rest of the family (issue 6)
    OptimizerSpec("shampoo", "Shampoo (inverse 4th roots of L, R) + SGD", _maker("ShampooGradientMaker"),
                  _ng(lr=0.01, damping=1e-3, block_size=-1, root_method="eigh", warm_iters=1, eigh_every=50,
                      basis_every=1)),
    OptimizerSpec("kron_psgd", "Kronecker-factored PSGD (Hessian-vector products) + SGD", _maker("KronPsgdGradientMaker"),
                  dict(lr=0.01, momentum=0.9, weight_decay=0.0, damping=1e-3, curvature_upd_interval=5,
                       preconditioner_upd_interval=5, precond_lr=0.1, init_scale=1.0)),
    OptimizerSpec("psgd_full", "full-matrix PSGD (one dense P x P factor, small models) + SGD",
                  _maker("PsgdGradientMaker"),
                  dict(lr=0.01, momentum=0.9, weight_decay=0.0, damping=1e-3, precond_lr=0.1, init_scale=1.0), default_compare=False),
    OptimizerSpec("kbfgs", "K-BFGS + SGD", _maker("KronBfgsGradientMaker"), _ng()),
    OptimizerSpec("seng", "SENG (sketched empirical natural gradient) + SGD", _maker("SengGradientMaker"),
                  _ng(damping=0.3, ema_decay=-1, sketching_size=64, truncated_rank=16)),
    OptimizerSpec("smw_ng", "Sherman-Morrison-Woodbury empirical natural gradient + SGD",
                  _maker("SmwEmpNaturalGradientMaker"), dict(lr=0.3, momentum=0.9, weight_decay=0.0, damping=1.0)),
    OptimizerSpec("curveball", "CurveBall (one GGN-vector product per step; SGD lr 1 applies its step)",
                  _maker("CurveBallGradientMaker", sgd_keys=("lr", "weight_decay")),
                  dict(lr=1.0, weight_decay=0.0, damping=0.1, momentum=0.9, momentum_decay=1, auto_tune=True)),
    # a dense Hessian: the default MLP's 9610 parameters exceed max_params; e.g. --model-arg hidden=[32]
    OptimizerSpec("newton", "damped dense (|eigenvalue|) Newton + SGD, small models only", _maker("NewtonGradientMaker"),
                  dict(lr=1.0, momentum=0.0, weight_decay=0.0, damping=1.0, abs_eigenvalues=True, max_params=5000), default_compare=False),
    # optimizers that read curvature themselves
    OptimizerSpec("adahessian", "AdaHessian (Hutchinson Hessian diagonal)", _adahessian,
                  dict(lr=0.15, betas=[0.9, 0.999], eps=1e-4, weight_decay=0.0, hessian_power=1.0, update_period=1), distributed=False),
    OptimizerSpec("adafisher", "AdaFisher (diagonal Kronecker Fisher)", _model_optimizer("AdaFisher"),
                  dict(lr=3e-3, TCov=5)),
    OptimizerSpec("adafisherw", "AdaFisherW (decoupled weight decay)", _model_optimizer("AdaFisherW"),
                  dict(lr=3e-3, TCov=5, weight_decay=1e-2)),
]:
    register(_spec)


def describe() -> str:
    """Human-readable listing for ``curvfun list``."""
    lines = []
    for name, spec in REGISTRY.items():
        flag = "" if spec.default_compare else " [explicit only]"
        hp = ", ".join(f"{k}={v}" for k, v in spec.defaults.items())
        lines.append(f"  {name:<13} {spec.summary}{flag}\n  {'':<13} defaults: {hp}")
    return "\n".join(lines)

