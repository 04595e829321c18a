"""ASDL-compatible curvature outside a maker: ``FisherConfig``, ``get_fisher_maker``, the
``FISHER_*`` / ``SHAPE_*`` / ``LOSS_*`` constants and ASDL's common helpers, built on curvfun's
pure functions (:func:`curvfun.fisher`, :func:`curvfun.kfac`, :func:`curvfun.fisher_vp`,
:func:`curvfun.top_eigenvalues`, the layer capture).

A script switches with its import line, ``from curvfun import asdl`` (or ``import curvfun.asdl as
asdl``). Results are stored as module attributes as ASDL does, each a :class:`SymMatrix`:

* ``SHAPE_FULL``: ``model.<attr>.data``, ``[P, P]`` over the selected parameters in
  ``model.named_parameters()`` order (each weight row-major, then its bias);
* ``SHAPE_LAYER_WISE``: ``module.<attr>.data``, the block over the module's own parameters;
* ``SHAPE_KRON``: ``module.<attr>.kron.A`` / ``.kron.B`` for Linear / Conv2d (GUIDE convention,
  bias its own block: A is the input Gram without the ones column, as ASDL 0.1's);
* ``SHAPE_UNIT_WISE``: ``module.<attr>.unit.data``, ``[units, p, p]``: per output unit of an
  affine layer (Linear, convolutions) the block over its incoming weights and its bias, per
  channel of a norm layer the block over (γ_c, β_c) (:mod:`curvfun.unit_wise`);
* ``SHAPE_DIAG``: ``module.<attr>.diag.weight`` / ``.diag.bias``.

``<attr>`` is ``FisherConfig.fisher_attr`` (``'fisher'``, ASDL 0.1) for :func:`get_fisher_maker`, and
the Fisher type (``module.fisher_emp.kron.A``, the older asdfghjkl convention) for
:func:`fisher_for_cross_entropy` / :func:`fisher_for_mse`.

Scaling: every matrix is ``scale · (1/data_size) · Σ_n (…)_n`` over the batch (or loader) as in
ASDL; ``data_size=-1`` (not given) means the number of samples seen, i.e. the curvature of the
mean loss (GUIDE). ASDL raises there instead. ``loss_type='mse'`` is ½‖f − y‖² per sample (ASDL's
convention, :mod:`curvfun.losses`); the empirical Fisher without ``loss_type`` uses the registered
loss function with ``reduction='none'`` summed per sample (ASDL: ``reduction='sum'``, the same
per-sample gradients).

:class:`HessianMaker` (``HessianConfig(hessian_shapes=[...])``: full, layer-wise, diagonal) stores
``model.hessian.data``, ``module.hessian.data`` and ``module.hessian.diag.weight`` / ``.bias``: the
Hessian of the loss as registered (reduction included), as ASDL's does.

Not supported (an error says so): Fisher-vector products (``fvp=True``, ``vec``), inverses
(``calc_inv``; use the makers in :mod:`curvfun.precondition`), ASDL's distributed reductions,
models whose registered call is not ``model(x)`` with one positional input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from .capture import ModuleInfo, layer_kind, record_layers
from .curvature import fisher as _fisher
from .curvature import fisher_vp, top_eigenvalues
from .functional import twice_differentiable
from .kron import KronFactor, UnitWiseFactor
from .kron_drivers import kfac
from .layers import layer_data, per_sample_layer_grads
from .losses import get_likelihood
from .memory import check_dense_size
from .precondition.asdl_names import (
    CAPTURE_FISHER_TYPE,
    FISHER_EMP,
    FISHER_EXACT,
    FISHER_MC,
    LOSS_CROSS_ENTROPY,
    LOSS_MSE,
    SHAPE_DIAG,
    SHAPE_FULL,
    SHAPE_KRON,
    SHAPE_LAYER_WISE,
    SHAPE_UNIT_WISE,
)
from .precondition.base import GradientMaker
from .precondition.newton import dense_hessian

__all__ = [
    "FISHER_EXACT",
    "FISHER_MC",
    "FISHER_EMP",
    "SHAPE_FULL",
    "SHAPE_LAYER_WISE",
    "SHAPE_KRON",
    "SHAPE_UNIT_WISE",
    "SHAPE_DIAG",
    "LOSS_CROSS_ENTROPY",
    "LOSS_MSE",
    "FisherConfig",
    "FisherMaker",
    "get_fisher_maker",
    "HessianConfig",
    "HessianMaker",
    "SymMatrix",
    "Kron",
    "Diag",
    "UnitWise",
    "fisher_for_cross_entropy",
    "fisher_for_mse",
    "hessian_eigenvalues",
    "batch_gradient",
    "data_loader_gradient",
]

FISHER_TYPES = (FISHER_EXACT, FISHER_MC, FISHER_EMP)
SHAPES = (SHAPE_FULL, SHAPE_LAYER_WISE, SHAPE_KRON, SHAPE_UNIT_WISE, SHAPE_DIAG)
_TYPE_TO_CURVFUN = CAPTURE_FISHER_TYPE
_NO_DATA_SIZE = -1


# --- result containers (ASDL's attribute names) ---------------------------------------------------


@dataclass
class Kron:
    """``A`` (input side) and ``B`` (output side) of a Kronecker-factored block."""

    A: Tensor | None = None
    B: Tensor | None = None


@dataclass
class Diag:
    """The diagonal, shaped like the module's ``weight`` and ``bias``."""

    weight: Tensor | None = None
    bias: Tensor | None = None


@dataclass
class UnitWise:
    """Per-unit blocks ``[units, p, p]``."""

    data: Tensor | None = None


@dataclass
class SymMatrix:
    """One module's (or the model's) curvature in the shapes computed: ``data`` (full / layer-wise
    block), ``kron``, ``unit``, ``diag``."""

    data: Tensor | None = None
    kron: Kron | None = None
    unit: UnitWise | None = None
    diag: Diag | None = None

    def _tensors(self) -> dict[str, Tensor]:
        out = {"data": self.data}
        if self.kron is not None:
            out.update({"kron.A": self.kron.A, "kron.B": self.kron.B})
        if self.unit is not None:
            out["unit.data"] = self.unit.data
        if self.diag is not None:
            out.update({"diag.weight": self.diag.weight, "diag.bias": self.diag.bias})
        return {k: v for k, v in out.items() if v is not None}


def _set(sym: SymMatrix, path: str, value: Tensor, accumulate: bool) -> None:
    head, _, leaf = path.rpartition(".")
    holder = sym
    if head:
        holder = getattr(sym, head)
        if holder is None:
            holder = {"kron": Kron, "unit": UnitWise, "diag": Diag}[head]()
            setattr(sym, head, holder)
    old = getattr(holder, leaf)
    setattr(holder, leaf, old + value if accumulate and old is not None else value)


# --- pure pieces -----------------------------------------------------------------------------------


def _per_sample_loss(loss_fn: Callable) -> Callable[[Tensor, Tensor], Tensor]:
    """``loss_fn(out, y, reduction='none')`` summed over the non-batch dimensions: ``[N]``."""
    def per_sample(out: Tensor, y: Tensor) -> Tensor:
        return loss_fn(out, y, reduction="none").reshape(out.shape[0], -1).sum(1)
    return per_sample


def _selected_params(model: nn.Module, ignore_modules: Iterable[Any] | None) -> dict[str, Tensor]:
    """Trainable parameters of the modules not matched by ``ignore_modules`` (instances, classes, or
    name substrings, as ASDL)."""
    ignore = list(ignore_modules or [])
    out: dict[str, Tensor] = {}
    for mname, m in model.named_modules():
        if any((isinstance(e, nn.Module) and e is m) or (isinstance(e, type) and isinstance(m, e))
               or (isinstance(e, str) and e in mname) for e in ignore):
            continue
        for pname, p in m.named_parameters(recurse=False):
            if p.requires_grad:
                out[f"{mname}.{pname}" if mname else pname] = p
    order = [n for n, _ in model.named_parameters()]
    return {n: out[n] for n in order if n in out}


def _by_module(tree: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    out: dict[str, dict[str, Tensor]] = {}
    for key, v in tree.items():
        mname, _, pname = key.rpartition(".")
        out.setdefault(mname, {})[pname] = v
    return out


def _batch_fisher_sums(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, t: Tensor | None, lik: Any,
                       fisher_type: str, shapes: Iterable[str], n_mc_samples: int,
                       generator: torch.Generator | None) -> dict[str, dict[str, Tensor]]:
    """``{module name ('' for the model): {path: Σ_n (…)_n}}`` for one batch (the mean times N)."""
    ftype = _TYPE_TO_CURVFUN[fisher_type]
    N = x.shape[0]
    out: dict[str, dict[str, Tensor]] = {}
    kw = dict(loss=lik, fisher_type=ftype, n_mc_samples=n_mc_samples, generator=generator)
    mods = dict(model.named_modules())
    for shape in shapes:
        if shape == SHAPE_FULL:
            out.setdefault("", {})["data"] = N * _fisher(model, params, x, t, shape="full", **kw)
        elif shape == SHAPE_LAYER_WISE:
            for m, B in _fisher(model, params, x, t, shape="block", **kw).items():
                out.setdefault(m, {})["data"] = N * B
        elif shape == SHAPE_DIAG:
            for m, d in _by_module(_fisher(model, params, x, t, shape="diag", **kw)).items():
                for pname, v in d.items():
                    out.setdefault(m, {})[f"diag.{pname}"] = N * v
        elif shape == SHAPE_KRON:
            for m, f in kfac(model, params, x, t, lik, ftype, n_mc_samples=n_mc_samples, generator=generator,
                             on_unsupported="ignore").items():
                if isinstance(f, KronFactor):
                    out.setdefault(m, {}).update({"kron.A": N * f.A, "kron.B": N * f.B})
        elif shape == SHAPE_UNIT_WISE:
            for m, f in _fisher(model, params, x, t, shape="unit", **kw).items():
                if isinstance(f, UnitWiseFactor):
                    out.setdefault(m, {})["unit.data"] = N * f.blocks
        else:
            raise ValueError(f"unknown fisher shape {shape!r}; expected one of {list(SHAPES)}")
    return out


def _store(model: nn.Module, sums: dict[str, dict[str, Tensor]], attr: str, factor: float, accumulate: bool) -> None:
    mods = dict(model.named_modules())
    for m, entries in sums.items():
        module = mods[m]
        sym = getattr(module, attr, None) if accumulate else None
        if not isinstance(sym, SymMatrix):
            sym = SymMatrix()
        for path, value in entries.items():
            _set(sym, path, value * factor, accumulate)
        setattr(module, attr, sym)


def _zero(model: nn.Module, attr: str) -> None:
    for module in model.modules():
        if isinstance(getattr(module, attr, None), SymMatrix):
            delattr(module, attr)


def _check_type_shapes(fisher_type: str, fisher_shapes: Any, loss_type: str | None) -> list[str]:
    if fisher_type not in FISHER_TYPES:
        raise ValueError(f"unknown fisher_type {fisher_type!r}; expected one of {list(FISHER_TYPES)}")
    shapes = [fisher_shapes] if isinstance(fisher_shapes, str) else list(fisher_shapes)
    bad = [s for s in shapes if not isinstance(s, str) or s not in SHAPES]
    if bad or not shapes:
        raise ValueError(f"fisher_shapes {fisher_shapes!r}: each must be one of {list(SHAPES)} (per-module "
                         f"assignments are not supported)")
    if loss_type is not None and loss_type not in (LOSS_CROSS_ENTROPY, LOSS_MSE):
        raise ValueError(f"unknown loss_type {loss_type!r}; expected {LOSS_CROSS_ENTROPY!r} or {LOSS_MSE!r}")
    if loss_type is None and fisher_type != FISHER_EMP:
        raise ValueError(f"fisher_type={fisher_type!r} needs loss_type ({LOSS_CROSS_ENTROPY!r} or {LOSS_MSE!r}): "
                         f"the Fisher samples or integrates over the model's predictive distribution")
    return shapes


def _generator(seed: int | None, like: Tensor) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=like.device).manual_seed(int(seed))


# --- FisherConfig / get_fisher_maker -------------------------------------------------------------


@dataclass
class FisherConfig:
    """ASDL's ``FisherConfig`` (same fields, order and defaults). Used here: ``fisher_type``,
    ``fisher_shapes``, ``loss_type``, ``n_mc_samples``, ``seed`` (seeds a private generator; ASDL
    re-seeds the global RNG), ``fisher_attr``, ``ignore_modules``, ``data_size``, ``scale``.
    ``var`` must be 1 and ``fvp_attr``, ``is_distributed``, ``all_reduce``, ``is_master``,
    ``ignore_index`` keep their defaults (checked by :func:`get_fisher_maker`)."""

    fisher_type: str
    fisher_shapes: list[Any]
    loss_type: str | None = None
    n_mc_samples: int = 1
    var: float = 1.0
    seed: int | None = None
    fisher_attr: str = "fisher"
    fvp_attr: str = "fvp"
    ignore_modules: list[Any] | None = None
    data_size: int = _NO_DATA_SIZE
    scale: float = 1.0
    is_distributed: bool = False
    all_reduce: bool = False
    is_master: bool = True
    ignore_index: int = -1


class FisherMaker(GradientMaker):
    """What :func:`get_fisher_maker` returns: ASDL's interface (``setup_model_call``,
    ``setup_loss_call``, ``forward_and_backward``, ``zero_fisher``), results as module attributes
    (module docstring)."""

    def __init__(self, model: nn.Module, config: FisherConfig) -> None:
        super().__init__(model)
        self.fisher_config = config

    @property
    def shapes(self) -> list[str]:
        return _check_type_shapes(self.fisher_config.fisher_type, self.fisher_config.fisher_shapes,
                                  self.fisher_config.loss_type)

    def zero_fisher(self) -> None:
        """Remove the stored results (``module.<fisher_attr>``)."""
        _zero(self.model, self.fisher_config.fisher_attr)

    def fisher_eig(self, top_n: int = 1, max_iters: int = 100, tol: float = 1e-7, seed: int | None = None
                   ) -> tuple[list[float], list[dict[str, Tensor]]]:
        """ASDL's ``fisher_eig``: the ``top_n`` largest eigenpairs of the full Fisher of the registered
        batch (mean over its samples) by block power iteration on Fisher-vector products
        (:func:`curvfun.fisher_vp`; the MC targets drawn once from ``FisherConfig.seed``, or a fresh
        seed, so that every product uses the same F). Eigenvectors as dicts of the parameters."""
        return _fisher_eig(self, top_n, max_iters, tol, seed)

    def _inputs_targets(self) -> tuple[Tensor, Tensor | None]:
        if self._model_fn is not self.model or len(self._model_args) != 1 or self._model_kwargs:
            raise NotImplementedError(
                "the Fisher maker needs the model call set up as setup_model_call(model, x) (the model itself, one "
                "positional input)"
            )
        args = self._loss_fn_args
        t = args[1] if self._loss_fn is not None and len(args) >= 2 and isinstance(args[1], Tensor) else None
        return self._model_args[0], t

    def forward_and_backward(self, data_size: int = _NO_DATA_SIZE, scale: float | None = None,
                             accumulate: bool = False, calc_loss_grad: bool = False, calc_inv: bool = False,
                             fvp: bool = False, damping: float | None = None, vec: Any = None) -> tuple[Any, Any]:
        """Compute the configured Fisher shapes for the registered batch and store them; with
        ``calc_loss_grad`` also back-propagate the registered loss into ``param.grad``. Returns
        ``(model output, loss)`` (the loss as registered; None without a loss call)."""
        if fvp or vec is not None or calc_inv or damping is not None:
            raise NotImplementedError(
                "fvp / vec / calc_inv / damping are not supported by curvfun.asdl's Fisher maker: use "
                "curvfun.fisher_vp for products and the makers of curvfun.precondition for inverses"
            )
        c = self.fisher_config
        shapes = self.shapes
        if c.var != 1 or c.is_distributed or c.all_reduce or not c.is_master or c.ignore_index != -1:
            raise NotImplementedError("FisherConfig: var must be 1 and is_distributed / all_reduce / is_master / "
                                      "ignore_index must keep their defaults in curvfun.asdl")
        x, t = self._inputs_targets()
        if not c.fisher_attr or not isinstance(c.fisher_attr, str):
            raise ValueError(f"fisher_attr must be a non-empty str, got {c.fisher_attr!r}")
        if c.loss_type is not None:
            lik = get_likelihood(c.loss_type)
        elif self._loss_fn is not None:
            lik = get_likelihood(_per_sample_loss(self._loss_fn))
        else:
            raise ValueError("the empirical Fisher without loss_type needs setup_loss_call(loss_fn, dummy_y, t)")
        params = _selected_params(self.model, c.ignore_modules)
        sums = _batch_fisher_sums(self.model, params, x, t, lik, c.fisher_type, shapes, c.n_mc_samples,
                                  _generator(c.seed, x))
        n = data_size if data_size != _NO_DATA_SIZE else c.data_size
        n = x.shape[0] if n == _NO_DATA_SIZE else n
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"data_size must be a positive int (or -1: the batch size), got {n!r}")
        if not accumulate:
            self.zero_fisher()
        _store(self.model, sums, c.fisher_attr, (c.scale if scale is None else scale) / n, accumulate)
        out, loss = None, None
        if calc_loss_grad or self._loss_fn is not None or self._dummy_loss is not None:
            self.forward()
            out, loss = self._model_output, self._loss
            if calc_loss_grad:
                self.backward()
            else:
                self._backward_pending = False
        else:
            out = self.call_model()
        return out, loss


def _fisher_eig(maker: "FisherMaker", top_n: int, max_iters: int, tol: float, seed: int | None):
    c = maker.fisher_config
    x, t = maker._inputs_targets()
    if c.loss_type is None:
        raise ValueError("fisher_eig needs FisherConfig.loss_type")
    params = _selected_params(maker.model, c.ignore_modules)
    ftype = _TYPE_TO_CURVFUN[c.fisher_type]
    mc_seed = int(torch.randint(0, 2**31, ())) if c.seed is None else c.seed  # one fixed F for all products

    def fvp(v: dict[str, Tensor]) -> dict[str, Tensor]:
        with twice_differentiable():
            return fisher_vp(maker.model, params, x, t, v, c.loss_type, ftype, c.n_mc_samples,
                             _generator(mc_seed, x))

    return _top_eig(fvp, params, top_n, max_iters, tol, seed)


def get_fisher_maker(model: nn.Module, config: FisherConfig) -> FisherMaker:
    """ASDL's ``get_fisher_maker(model, config)``: one maker for all Fisher types (the type is read
    from ``config``); errors in the config are raised here."""
    if not isinstance(config, FisherConfig):
        raise TypeError(f"config must be a curvfun.asdl.FisherConfig, got {type(config).__name__}")
    _check_type_shapes(config.fisher_type, config.fisher_shapes, config.loss_type)
    if not (isinstance(config.n_mc_samples, int) and config.n_mc_samples >= 1):
        raise ValueError(f"n_mc_samples must be a positive int, got {config.n_mc_samples!r}")
    return FisherMaker(model, config)


# --- HessianConfig / HessianMaker ---------------------------------------------------------------

HESSIAN_SHAPES = (SHAPE_FULL, SHAPE_LAYER_WISE, SHAPE_DIAG)


@dataclass
class HessianConfig:
    """ASDL's ``HessianConfig`` (same fields and defaults). Used here: ``hessian_attr`` and
    ``hessian_shapes`` (a subset of full, layer_wise, diag); the ``tmp_*`` / ``hvp_attr`` names are
    accepted and unused (no Hessian-vector products here: :func:`curvfun.hessian_vp`)."""

    hessian_attr: str = "hessian"
    tmp_hessian_attr: str = "tmp_hessian"
    hvp_attr: str = "hvp"
    tmp_hvp_attr: str = "tmp_hvp"
    hessian_shapes: list[str] | None = None


class HessianMaker(GradientMaker):
    """ASDL's ``HessianMaker(model, config)``: ``forward_and_backward(scale=1., accumulate=False,
    calc_loss_grad=False)`` stores ``scale · ∇²L`` of the registered loss L over the trainable
    parameters (module docstring). Cost: the dense Hessian by reverse-over-reverse
    (:func:`curvfun.precondition.newton.dense_hessian`, P backward passes, P² memory) once,
    sliced into the requested shapes."""

    def __init__(self, model: nn.Module, config: HessianConfig) -> None:
        if not isinstance(config, HessianConfig):
            raise TypeError(f"config must be a curvfun.asdl.HessianConfig, got {type(config).__name__}")
        shapes = config.hessian_shapes
        shapes = [shapes] if isinstance(shapes, str) else list(shapes or [])
        bad = [s for s in shapes if s not in HESSIAN_SHAPES]
        if bad or not shapes:
            raise ValueError(f"hessian_shapes {config.hessian_shapes!r}: give one or more of {list(HESSIAN_SHAPES)}")
        super().__init__(model)
        self.hessian_config = config
        self._shapes = shapes

    def zero_hessian(self) -> None:
        """Remove the stored results (``module.<hessian_attr>``)."""
        _zero(self.model, self.hessian_config.hessian_attr)

    def forward_and_backward(self, scale: float = 1.0, accumulate: bool = False, calc_loss_grad: bool = False,
                             hvp: bool = False, vec: Any = None) -> tuple[Any, Any]:
        if hvp or vec is not None:
            raise NotImplementedError("hvp / vec are not supported by curvfun.asdl's HessianMaker: use "
                                      "curvfun.hessian_vp")
        params = {k: p for k, p in self.model.named_parameters() if p.requires_grad}
        names, shapes = list(params), [p.shape for p in params.values()]
        sizes = [p.numel() for p in params.values()]

        def loss_of_flat(flat: Tensor) -> Tensor:
            chunks = {n: c.reshape(s) for n, c, s in zip(names, torch.split(flat, sizes), shapes)}
            loss = self.loss_from_output(self.model_output_at(chunks))
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError("HessianMaker needs a scalar loss (reduce it in loss_fn, e.g. reduction='mean')")
            return loss.reshape(())

        flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
        check_dense_size("HessianMaker's dense Hessian", (flat.numel(), flat.numel()), flat.dtype, flat.device,
                         instead="leave parameters out (requires_grad=False) or use curvfun.hessian_vp")
        with twice_differentiable():
            H = dense_hessian(loss_of_flat, flat)
        sums: dict[str, dict[str, Tensor]] = {}
        if SHAPE_FULL in self._shapes:
            sums[""] = {"data": H}
        i = 0
        for m, ps in _by_module(params).items():
            n = sum(p.numel() for p in ps.values())
            block = H[i:i + n, i:i + n]
            if SHAPE_LAYER_WISE in self._shapes:
                sums.setdefault(m, {})["data"] = block
            if SHAPE_DIAG in self._shapes:
                d, j = block.diagonal(), 0
                for pname, p in ps.items():
                    sums.setdefault(m, {})[f"diag.{pname}"] = d[j:j + p.numel()].reshape(p.shape)
                    j += p.numel()
            i += n
        if not accumulate:
            self.zero_hessian()
        _store(self.model, sums, self.hessian_config.hessian_attr, scale, accumulate)
        self.forward()
        if calc_loss_grad:
            self.backward()
        else:
            self._backward_pending = False
        return self._model_output, self._loss

    def hessian_eig(self, top_n: int = 1, max_iters: int = 100, tol: float = 1e-7, seed: int | None = None
                    ) -> tuple[list[float], list[dict[str, Tensor]]]:
        """ASDL's ``hessian_eig``: the ``top_n`` eigenpairs of largest magnitude of the registered
        loss's Hessian by block power iteration (see :func:`hessian_eigenvalues`)."""
        with twice_differentiable():
            self.call_model()
            loss = self.call_loss()
        self._backward_pending = False
        return _hessian_top_eig(self.model, [(loss, 1.0)], top_n, max_iters, tol, seed)


# --- asdfghjkl-style helpers ---------------------------------------------------------------------


def _batches(inputs: Tensor | None, targets: Tensor | None, data_loader: Iterable | None):
    if data_loader is not None:
        if inputs is not None:
            raise ValueError("give either inputs (and targets) or data_loader, not both")
        return list(data_loader)
    if inputs is None:
        raise ValueError("give inputs (and targets) or a data_loader")
    return [(inputs, targets)]


def _calculate_fisher(model, loss_type, fisher_type, fisher_shapes, inputs=None, targets=None, data_loader=None,
                      n_mc_samples=1, seed=None, scale=1.0, data_average=True, accumulate=False,
                      ignore_modules=None):
    shapes = _check_type_shapes(fisher_type, fisher_shapes, loss_type)
    batches = _batches(inputs, targets, data_loader)
    if fisher_type == FISHER_EMP and any(t is None for _, t in batches):
        raise ValueError("the empirical Fisher needs targets")
    lik = get_likelihood(loss_type)
    params = _selected_params(model, ignore_modules)
    gen = _generator(seed, batches[0][0])
    total: dict[str, dict[str, Tensor]] = {}
    for x, t in batches:
        for m, entries in _batch_fisher_sums(model, params, x, t, lik, fisher_type, shapes, n_mc_samples, gen).items():
            mine = total.setdefault(m, {})
            for k, v in entries.items():
                mine[k] = mine[k] + v if k in mine else v
    n = sum(x.shape[0] for x, _ in batches) if data_average else 1
    if not accumulate:
        _zero(model, fisher_type)
    _store(model, total, fisher_type, scale / n, accumulate)
    return model


def fisher_for_cross_entropy(model: nn.Module, fisher_type: str, fisher_shapes: Any, inputs: Tensor | None = None,
                             targets: Tensor | None = None, data_loader: Iterable | None = None,
                             n_mc_samples: int = 1, seed: int | None = None, scale: float = 1.0,
                             data_average: bool = True, accumulate: bool = False,
                             ignore_modules: list | None = None) -> nn.Module:
    """asdfghjkl's ``fisher_for_cross_entropy``: the Fisher of the categorical likelihood on the
    logits over ``inputs`` (or every batch of ``data_loader``), stored as
    ``module.<fisher_type>`` (e.g. ``model.fisher_emp.data``, ``layer.fisher_mc.kron.A``); the
    average over samples with ``data_average`` (else the sum), times ``scale``. Returns the model."""
    return _calculate_fisher(model, LOSS_CROSS_ENTROPY, fisher_type, fisher_shapes, inputs, targets, data_loader,
                             n_mc_samples, seed, scale, data_average, accumulate, ignore_modules)


def fisher_for_mse(model: nn.Module, fisher_type: str, fisher_shapes: Any, inputs: Tensor | None = None,
                   targets: Tensor | None = None, data_loader: Iterable | None = None, n_mc_samples: int = 1,
                   seed: int | None = None, scale: float = 1.0, data_average: bool = True,
                   accumulate: bool = False, ignore_modules: list | None = None) -> nn.Module:
    """As :func:`fisher_for_cross_entropy` for the unit-variance Gaussian, ℓ = ½‖f − y‖² (the exact
    Fisher is Σ_n J_nᵀ J_n / N)."""
    return _calculate_fisher(model, LOSS_MSE, fisher_type, fisher_shapes, inputs, targets, data_loader,
                             n_mc_samples, seed, scale, data_average, accumulate, ignore_modules)


def hessian_eigenvalues(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], inputs: Tensor | None = None,
                        targets: Tensor | None = None, data_loader: Iterable | None = None, top_n: int = 1,
                        max_iters: int = 100, tol: float = 1e-3, seed: int | None = None
                        ) -> tuple[list[float], list[dict[str, Tensor]]]:
    """The ``top_n`` eigenvalues of largest magnitude of the Hessian of ``loss_fn(model(x), t)``
    (averaged over the loader's batches weighted by their sizes) by block power iteration
    (:func:`curvfun.top_eigenvalues`, ``method='power'``) with Hessian-vector products by
    double backward through one retained graph per batch. Returns ``(eigenvalues,
    eigenvectors)`` sorted descending, eigenvectors as dicts like ``model.named_parameters()``
    (ASDL: ParamVectors).
    Cost per iteration: top_n Hessian-vector products per batch."""
    batches = _batches(inputs, targets, data_loader)
    total = sum(x.shape[0] for x, _ in batches)
    with torch.enable_grad(), twice_differentiable():
        losses = [(loss_fn(model(x), t), x.shape[0] / total) for x, t in batches]
    return _hessian_top_eig(model, losses, top_n, max_iters, tol, seed)


def _hessian_top_eig(model: nn.Module, losses: list[tuple[Tensor, float]], top_n: int, max_iters: int, tol: float,
                     seed: int | None) -> tuple[list[float], list[dict[str, Tensor]]]:
    """Top eigenpairs (largest magnitude) of Σ_b w_b ∇²L_b over the trainable parameters, by block
    power iteration with products by double backward through one retained graph per loss."""
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
        raise ValueError(f"top_n must be a positive int, got {top_n!r}")
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    with torch.enable_grad():
        grads = [(torch.autograd.grad(loss, list(params.values()), create_graph=True), w) for loss, w in losses]

    def hvp(v: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {k: torch.zeros_like(p) for k, p in params.items()}
        for g, w in grads:
            hv = torch.autograd.grad(g, list(params.values()), [v[k] for k in params], retain_graph=True)
            for k, h in zip(params, hv):
                out[k] = out[k] + h.detach() * w
        return out

    return _top_eig(hvp, params, top_n, max_iters, tol, seed)


def _top_eig(matvec: Callable, params: Mapping[str, Tensor], top_n: int, max_iters: int, tol: float,
             seed: int | None) -> tuple[list[float], list[dict[str, Tensor]]]:
    like = {k: p.detach() for k, p in params.items()}
    gen = _generator(seed, next(iter(like.values())))
    vals, vecs = top_eigenvalues(matvec, like, k=top_n, method="power", iters=max_iters, tol=tol, generator=gen)
    return [float(v) for v in vals], vecs


def data_loader_gradient(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], data_loader: Iterable,
                         data_average: bool = True) -> float:
    """ASDL's ``data_loader_gradient``: ``loss_fn(model(x), t).backward()`` for every batch (``loss_fn``
    summing over the batch, ``reduction='sum'``, as ASDL expects), then ``param.grad`` and the
    returned total loss divided by the number of samples seen (``data_average``; ASDL divides by
    ``len(data_loader.dataset)``, the same for a loader over a dataset). The loader's gradient is
    added to what ``param.grad`` held before (ASDL divides that earlier part by the sample count
    too); any iterable of ``(inputs, targets)`` batches works."""
    total, n = 0.0, 0
    before = {p: (None if p.grad is None else p.grad.clone()) for p in model.parameters()}
    for x, t in data_loader:
        loss = loss_fn(model(x), t)
        loss.backward()
        total += float(loss)
        n += x.shape[0]
    if n == 0:
        raise ValueError("data_loader_gradient: the data loader gave no samples")
    if data_average:
        with torch.no_grad():
            for p, old in before.items():
                if p.grad is not None:
                    p.grad.sub_(0 if old is None else old).div_(n).add_(0 if old is None else old)
        total /= n
    return total


def batch_gradient(model: nn.Module, closure: Callable[[], Any], return_outputs: bool = False):
    """ASDL's ``batch_gradient``: the per-sample gradients of what ``closure`` back-propagates,
    ``[N, P]`` over the Linear / Conv2d / Embedding / LayerNorm / BatchNorm parameters in module
    order (each weight row-major, then its bias). The closure runs the forward and ``.backward()``
    itself (e.g. ``lambda: F.cross_entropy(model(x), t, reduction='sum').backward()``); the model's
    layers are recorded for its duration (curvfun's capture hooks, removed afterwards).
    Cost: the closure plus one batched outer product per layer."""
    infos = {}
    for name, m in model.named_modules():
        kind = layer_kind(m)
        own = {k: p for k, p in m.named_parameters(recurse=False) if p.requires_grad}
        if kind is not None and own and set(own) <= {"weight", "bias"}:
            infos[name] = ModuleInfo(name, m, kind, {k: f"{name}.{k}" for k in own})
    with record_layers(infos) as records:
        outputs = closure()
    cols = []
    for name, rec in records.items():
        if not rec.eps:
            continue
        if any(e.grad is None for e in rec.eps):
            raise RuntimeError(f"batch_gradient: the closure did not back-propagate through layer {name!r}; "
                               f"call .backward() on the loss inside the closure")
        rec.grads = [e.grad.unsqueeze(0) for e in rec.eps]
        ld = layer_data(rec, torch.ones(1, dtype=rec.grads[0].dtype, device=rec.grads[0].device))
        g = per_sample_layer_grads(ld)
        N = rec.inputs[0].shape[0]
        cols += [g[k].reshape(N, -1) for k in ("weight", "bias") if k in g]
    if not cols:
        raise ValueError("batch_gradient: the model has no supported layer with trainable parameters")
    grads = torch.cat(cols, 1)
    return (grads, outputs) if return_outputs else grads

