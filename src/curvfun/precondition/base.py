"""The ``PreconditionedGradientMaker`` base (the ASDL interface it extends is in
:mod:`curvfun.precondition.interface`, the module assignment in :mod:`curvfun.precondition.assignment`).

``GradientMaker`` is the plain interface: set up the model call and the loss call with dummies,
then ``forward_and_backward()`` gives exactly the gradients of ``loss.backward()``.

``PreconditionedGradientMaker`` is the thin stateful layer every preconditioner builds on. It owns
the config, the step counter, the ``torch.Generator`` for MC sampling, the schedule (pure
functions of ``config`` and ``step`` from :mod:`curvfun.precondition.config`), the module
assignment (pure :func:`assign_modules`) and the state dict. A subclass says *which pure
functions are called when* by implementing :meth:`~PreconditionedGradientMaker.update_curvature`
(performs the forward and backward pass and captures curvature), optionally
:meth:`~PreconditionedGradientMaker.update_preconditioner` (inverts) and
:meth:`~PreconditionedGradientMaker.precondition` (rewrites ``param.grad`` in place), and lists its
state in ``_state_attributes``.

Differences from ASDL 0.1 (``asdl/grad_maker.py``, ``asdl/precondition/prec_grad_maker.py``):

* ``state_dict()`` holds **all** state (step, generator state, curvature/inverses registered by the
  subclass, non-finite bookkeeping) and returns a copy; ASDL returns its live ``{'step': n}`` dict
  and loads only the step, so a resumed ASDL run restarts its curvature from nothing.
  ``load_state_dict`` checks the maker class and the model's parameter names and shapes.
* Schedules apply the ``'step'`` / ``'linear'`` interval types and the curvature's own fields (see
  :mod:`curvfun.precondition.config`).
* Modules are matched to parameters by identity; a parameter shared by several layers (tied
  weights) keeps the plain gradient, since a per-layer curvature block does not describe it.
  Ignoring a container instance or class ignores every layer inside it. A model wrapped in
  ``DistributedDataParallel`` / ``DataParallel`` is accepted (ASDL's natural-gradient makers
  reject DDP); modules are named as in the wrapped module.
* The latest of ``setup_loss_call`` / ``setup_loss_repr`` wins (in ASDL, once a loss function is set,
  a later ``setup_loss_repr`` is silently ignored), and overriding the loss reduction for a
  subclass never rewrites the user's keyword arguments (ASDL stores ``reduction`` into them).
* Calls out of order (``forward_and_backward`` before ``setup_model_call``, ``backward`` twice,
  a subclass step that makes no or two backward passes) raise errors that say what to call.
* With no preconditioned module at all, the maker warns (ASDL fails with ``StopIteration``).
* Under ``torch.distributed`` (:mod:`curvfun.distributed`): the gradients are averaged over ranks
  after the pass (one coalesced all-reduce; not when the model is wrapped in DDP, which already
  did), weighted by the per-rank sample counts (:meth:`GradientMaker.sample_count`) so that
  unequal batches give the concatenated batch's mean (under DDP: one one-number all-reduce per
  step and the loss scaled by W·n_r/N before backward), the model structure and preconditioned
  layers are checked across ranks at construction,
  the MC generator is seeded with ``seed + rank``, and ``inverse_mode`` ("assigned" / "replicated")
  says whether inverses are computed by one owner per layer and broadcast, or everywhere.
"""

from __future__ import annotations

import abc
import copy
import logging
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import optree
import torch
from torch import Tensor, nn

from .config import (
    SCHEDULE_KINDS,
    PreconditioningConfig,
    _follows_preconditioner,
    is_update_step,
    resolve_schedule,
)
from ..precision import autocast_state, full_precision
from ..layers.registry import LayerPart, handler_for
from .dummy import DummyObject
from . import guards
from .assignment import (
    ModuleAssignment,
    assign_modules,
    describe_structure_change,
    model_structure_signature,
    split_parts,
    unwrap_model,
)
from .interface import GradientMaker

__all__ = [
    "GradientMaker",
    "PreconditionedGradientMaker",
    "ModuleAssignment",
    "assign_modules",
    "unwrap_model",
    "all_finite",
    "NonFiniteCurvatureWarning",
    "UnsupportedModuleWarning",
]

logger = logging.getLogger("curvfun.precondition")

_STATE_FORMAT = "curvfun.precondition.PreconditionedGradientMaker/1"


class NonFiniteCurvatureWarning(RuntimeWarning):
    """A new curvature or inverse had inf/NaN entries and was not installed."""


class UnsupportedModuleWarning(UserWarning):
    """Some layers with trainable parameters are of a class the maker cannot precondition."""




# ==============================================================================================
# finiteness and state copies
# ==============================================================================================


def _tensor_finite(t: Tensor) -> bool:
    """One reduction instead of isfinite's passes: the sum is finite only if every entry is (a NaN
    or Inf entry makes it NaN or Inf); a non-finite sum may be an overflow of huge finite entries,
    so that case is settled entrywise. The sum runs in the tensor's own dtype (a float64 sum of a
    float32 tensor would convert it first, a copy of the whole tensor)."""
    if t.numel() == 0:
        return True
    if t.is_complex():
        return bool(torch.isfinite(t).all())
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def all_finite(tree: Any) -> bool:
    """Whether every tensor / number in the pytree ``tree`` is finite (None counts as finite)."""
    for leaf in optree.tree_leaves(tree, none_is_leaf=False, namespace="curvfun"):
        if isinstance(leaf, Tensor):
            if leaf.is_floating_point() or leaf.is_complex():
                if not _tensor_finite(leaf):
                    return False
        elif isinstance(leaf, (int, float, bool)):
            if isinstance(leaf, float) and not math.isfinite(leaf):
                return False
        else:
            raise TypeError(
                f"cannot check finiteness of a {type(leaf).__name__}: pass tensors, numbers, or dicts / "
                f"lists / tuples of them"
            )
    return True


def _clone_tree(obj: Any) -> Any:
    """A deep copy in which tensors are detached clones."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    t = type(obj)
    if t is dict:
        return {k: _clone_tree(v) for k, v in obj.items()}
    if t is list or t is tuple:
        return t(_clone_tree(v) for v in obj)
    if isinstance(obj, tuple) and hasattr(t, "_fields"):
        return t(*(_clone_tree(v) for v in obj))
    if isinstance(obj, Mapping):
        try:
            return t((k, _clone_tree(v)) for k, v in obj.items())
        except TypeError:
            return {k: _clone_tree(v) for k, v in obj.items()}
    return copy.deepcopy(obj)


def _derived_seed() -> int:
    """A seed derived from ``torch.initial_seed()`` without consuming the global random stream."""
    return (torch.initial_seed() * 6364136223846793005 + 1442695040888963407) % (2**63)


# ==============================================================================================
# PreconditionedGradientMaker
# ==============================================================================================


class PreconditionedGradientMaker(GradientMaker, abc.ABC):
    """Base of all preconditioning makers: which pure functions are called when.

    ``forward_and_backward()`` runs, at step ``s`` (``self.step``, starting at 0):

    1. ``_startup()``;
    2. a plain forward and backward pass if ``do_forward_and_backward(s)`` (by default: when the
       curvature is not refreshed at ``s``);
    3. ``update_curvature()`` if ``do_update_curvature(s)``; it must perform the pass itself
       (``self.forward(); self.backward()`` with capture around it, or write ``param.grad`` and call
       ``self._record_pass(output, loss)``), since capturing curvature needs that pass;
    4. ``update_preconditioner()`` if ``do_update_preconditioner(s)``;
    5. exactly one pass must have happened by now (else ``RuntimeError``);
    6. ``precondition()``, which rewrites each preconditioned ``param.grad`` in place;
    7. ``_teardown()``; the step counter becomes ``s + 1``; returns ``(model_output, loss)``.

    A subclass **must** implement ``update_curvature()`` and ``precondition()``; it may override
    ``update_preconditioner()`` (default: nothing, e.g. when ``update_curvature`` already inverts),
    ``do_forward_and_backward(step)`` (e.g. ``True`` for a method whose curvature is built from the
    plain gradient, like Shampoo), ``_startup`` / ``_teardown``, ``_supported_classes`` (tuple of
    layer classes it can precondition; None: all) or ``_unsupported_reason(name, module)``.

    State: list the attribute names holding curvature, inverses, EMA ... in ``_state_attributes``
    (tensors, numbers, None and dicts / lists / tuples of them): they are saved and restored by
    ``state_dict()`` / ``load_state_dict()`` together with the step, the generator and the
    non-finite bookkeeping. For anything else override ``_extra_state()`` / ``_load_extra_state()``.

    Helpers a subclass gets:

    * ``self.config``, ``self.step``, ``self.generator`` (``torch.Generator`` on the model's device,
      seeded with ``seed`` / ``config.seed`` / a value derived from ``torch.initial_seed()``),
      ``self.device``;
    * ``self.preconditioned_modules`` (name -> module, model order), ``self.plain_modules``
      (name -> reason), ``self.plain_parameters`` (parameter name -> reason),
      ``self.module_params(name)`` (the layer's trainable parameters, local name -> parameter,
      matched by identity) and ``self.module_name_of(param)``;
    * ``self._install_if_finite(name, new_value, keep_old)``;
    * ``self.report_preconditioned_modules()`` (called once automatically);
    * from :class:`GradientMaker`: ``forward()``, ``backward()``, ``loss_from_output(output,
      reduction)``, ``logits_from_output(output)``, ``model_output_at(params)`` (pure functions
      of the registered calls, for ``torch.func``), ``self.logits``.

    Changes after construction, checked at the start of every step (:mod:`curvfun.precondition.guards`;
    tuples of values are compared, O(#config fields + #settings), no tensor work):

    * an edited ``config`` field (or a new config object) is validated with the config's own message
      (``PreconditioningConfig.validate``) and the maker's constraints (:meth:`_check_config`); an
      edited own setting (``_settings``, e.g. Shampoo's ``block_size``) by :meth:`_check_settings`;
      an edited ``ignore_modules`` rebuilds the maker as a changed model does (:meth:`setup_model_call`);
    * ``setup_model_call`` with a module that neither is, contains nor belongs to the maker's model
      raises :class:`~curvfun.precondition.guards.ModelChangedError` (a plain function or lambda
      cannot be checked): its curvature would be another model's;
    * a batch of 0 samples (the first tensor argument of the model call) raises ``ValueError``;
    * the dense matrices a maker allocates (:meth:`_dense_requests`: the full and layer-wise natural
      gradient with EMA, Newton) are checked against :mod:`curvfun.memory`'s dense limit at
      construction and after a change.

    ``load_state_dict`` refuses factors whose shapes differ from this maker's current state (where it
    has one) or, for Kronecker factors, do not fit their layer's weight.
    """

    _supported_classes: tuple[type, ...] | None = None
    _state_attributes: tuple[str, ...] = ()
    #: the maker's own settings (attribute names): re-validated by :meth:`_check_settings` when edited
    _settings: tuple[str, ...] = ()
    #: state attributes whose tensor shapes depend on the batch (not compared at load)
    _data_shaped_state: tuple[str, ...] = ()
    #: whether a module holding several layers (:meth:`~curvfun.layers.LayerHandler.parts`) is
    #: preconditioned as those layers, ``"<module>.<part>"`` (else as one module)
    _layer_parts: bool = False

    def __new__(cls, *args: Any, **kwargs: Any):
        self = super().__new__(cls)
        self._init_args = (args, kwargs)  # to rebuild the assignment when the model changes
        return self

    def __init__(
        self,
        model: nn.Module,
        config: PreconditioningConfig | None = None,
        *,
        seed: int | None = None,
        inverse_mode: str = "assigned",
    ) -> None:
        from .. import distributed as cfd

        if inverse_mode not in cfd.INVERSE_MODES:
            raise ValueError(f"unknown inverse_mode {inverse_mode!r}; expected one of {cfd.INVERSE_MODES}")
        #: under torch.distributed: "assigned" (each inverse computed by one rank, chosen by cost, and
        #: broadcast) or "replicated" (computed on every rank); ignored in a single process
        self.inverse_mode = inverse_mode
        if config is None:
            config = PreconditioningConfig()
        super().__init__(model, config)  # type-checks and validates config
        self._check_config(config)
        self.config: PreconditioningConfig = config
        self.state: dict[str, Any] = {"step": 0}  # ASDL's attribute; the step lives here
        root = unwrap_model(model)
        first = next(iter(root.parameters()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        if seed is None:
            seed = config.seed
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        self.seed = _derived_seed() if seed is None else seed
        self.generator = torch.Generator(device=self.device)
        # per rank under torch.distributed (seed + rank: reproducible, and MC samples differ across
        # ranks as independent samples of the concatenated batch would); rank 0 = single process
        self.generator.manual_seed((self.seed + cfd.rank()) % 2**63)
        self.nonfinite_counts: dict[str, int] = {}
        self._nonfinite_warned: set[str] = set()
        self._reported = False
        self._warned_past_total: set[str] = set()
        #: layers already named for using their parameters outside their own calls (see _layer_pass)
        self._outside_warned: set[str] = set()
        self._resolve_modules()
        cfd.check_same_structure(
            [type(self).__name__, self._model_structure(), list(self.preconditioned_modules)],
            f"model structure or preconditioned layers of {type(self).__name__}",
        )
        guards.check_dense_requests(self)
        guards.snapshot(self)

    # --- module assignment ------------------------------------------------------------------------
    def _check_config(self, config: PreconditioningConfig) -> None:
        """Raise if ``config`` (already valid) does not suit this maker; run at construction and at the
        first step after a config field was edited. Default: nothing."""

    def _check_settings(self) -> None:
        """Raise if one of the maker's own ``_settings`` is invalid; run at the first step after one
        was edited. Default: nothing."""

    def _dense_requests(self) -> list[tuple[str, tuple, torch.dtype, torch.device, str]]:
        """The dense matrices the maker will allocate, as ``(what, shape, dtype, device, instead)``;
        checked against the dense limit (:mod:`curvfun.memory`) at construction and after a config or
        model change. Default: none."""
        return []

    def _unsupported_reason(self, name: str, module: nn.Module) -> str | None:
        """Why this maker cannot precondition ``module`` (None: it can). Default: not an instance of
        ``_supported_classes``."""
        if self._supported_classes is not None and not isinstance(module, self._supported_classes):
            return f"unsupported layer class {type(module).__name__}"
        return None

    def _resolve_modules(self) -> None:
        """(Re)compute the module assignment; called by ``__init__``. A subclass whose support test
        needs its own attributes may set them before ``super().__init__`` or call this again."""
        a = assign_modules(self.model, self.config.ignore_modules, self._unsupported_reason)
        self.preconditioned_modules: dict[str, nn.Module] = a.preconditioned
        self.plain_modules: dict[str, str] = a.plain
        self.plain_parameters: dict[str, str] = a.plain_parameters
        #: the layers that are parts of a module, by layer name (see ``_layer_parts``)
        self._parts: dict[str, LayerPart] = {}
        unmatched = a.unmatched_ignores
        if self._layer_parts:
            split = split_parts(a.preconditioned, self.config.ignore_modules)
            self.preconditioned_modules, self._parts = split.layers, split.parts
            for pname, (reason, owned) in split.ignored.items():
                self.plain_modules[pname] = reason
                self.plain_parameters.update(dict.fromkeys(owned, reason))
            unmatched = [e for e in unmatched if not (isinstance(e, str) and e in split.matched)]
        self._param_owner = {
            id(p): (name, role) for name in self.preconditioned_modules for role, p in self.module_params(name).items()
        }
        self._structure = model_structure_signature(self.model)
        if unmatched:
            names = [n for n, _ in unwrap_model(self.model).named_modules() if n][:20]
            warnings.warn(
                f"{type(self).__name__}: ignore_modules entries {unmatched!r} match no module of "
                f"{type(unwrap_model(self.model)).__name__} (module names: {names})",
                UserWarning,
                stacklevel=3,
            )

    def setup_model_call(self, model_fn: Callable, *args: Any, **kwargs: Any) -> DummyObject:
        """As :meth:`GradientMaker.setup_model_call`; first, when the model's modules or trainable
        parameters changed since the assignment (a layer added, removed or replaced, a parameter
        frozen or unfrozen), the maker is rebuilt on the model as it is now (same arguments, same
        step count and random state), with a warning naming what changed: every layer's curvature
        restarts at its next update (plain gradient until then). A module that neither is, contains
        nor belongs to the maker's model is refused (:func:`~curvfun.precondition.guards.check_model_call`)."""
        guards.check_model_call(self, model_fn)
        now = model_structure_signature(self.model)
        if now != self._structure:
            self._rebuild(describe_structure_change(self._structure, now))
        return super().setup_model_call(model_fn, *args, **kwargs)

    def _rebuild(self, change: str) -> None:
        step, rng = self.state["step"], self.generator.get_state()
        args, kwargs = self._init_args
        warnings.warn(f"{type(self).__name__}: the model changed since the maker was built ({change}); layers "
                      f"re-assigned, curvature restarts at the next update", UserWarning, stacklevel=3)
        type(self).__init__(self, *args, **kwargs)
        self.state["step"] = step
        self.generator.set_state(rng)

    def module_params(self, name: str) -> dict[str, nn.Parameter]:
        """The trainable parameters of preconditioned layer ``name`` by their role in the layer
        registry (``"weight"`` / ``"bias"``; MultiheadAttention's ``in_proj_weight`` is its
        ``"weight"``; a part's, e.g. ``"att.q_proj_weight"``, its own), or by local name for a module
        the registry does not serve or that holds several parts preconditioned as one."""
        if name not in self.preconditioned_modules:
            raise KeyError(f"{name!r} is not a preconditioned module; these are: {list(self.preconditioned_modules)}")
        m = self.preconditioned_modules[name]
        part = self._parts.get(name)
        if part is not None:
            own = {role: getattr(m, attr, None) for role, attr in part.params.items()}
            return {role: p for role, p in own.items() if p is not None and p.requires_grad}
        h = handler_for(m)
        whole = h is not None and len(h.parts(m)) == 1
        return {(h.role_of(k, m) or ("", k))[1] if whole else k: p
                for k, p in m.named_parameters(recurse=False) if p.requires_grad}

    def _plain_parameters_in_layers(self) -> dict[str, str]:
        """Parameters of preconditioned layers that the method leaves with the plain gradient by
        design (parameter name -> reason), for the report. Default: none."""
        return {}

    def module_name_of(self, param: Tensor) -> tuple[str, str] | None:
        """``(layer name, local name)`` of a preconditioned parameter, matched by identity; None for
        a parameter that keeps the plain gradient."""
        return self._param_owner.get(id(param))

    def report_preconditioned_modules(self, force: bool = False) -> str:
        """Say (once, unless ``force``) which layers are preconditioned and which keep the plain
        gradient, by name: an INFO record on the ``curvfun.precondition`` logger, plus an
        :class:`UnsupportedModuleWarning` when layers of unsupported classes are left plain, and a
        warning when nothing at all is preconditioned. Returns the report text."""
        lines = [f"{type(self).__name__}: preconditioning {len(self.preconditioned_modules)} layer(s): "
                 f"{list(self.preconditioned_modules) or 'none'}"]
        if self.plain_modules:
            lines.append("plain gradient for: " + "; ".join(f"{n} ({r})" for n, r in self.plain_modules.items()))
        inside = self._plain_parameters_in_layers()
        if inside:
            lines.append("plain gradient for parameters of preconditioned layers: " +
                         "; ".join(f"{n} ({r})" for n, r in inside.items()))
        text = "\n".join(lines)
        if self._reported and not force:
            return text
        self._reported = True
        logger.info(text)
        unsupported = {n: r for n, r in self.plain_modules.items() if r.startswith("unsupported")}
        if unsupported:
            warnings.warn(
                f"{type(self).__name__} cannot precondition {list(unsupported)} "
                f"({', '.join(sorted(set(unsupported.values())))}); they keep the plain gradient. "
                f"Add them to ignore_modules to silence this.",
                UnsupportedModuleWarning,
                stacklevel=2,
            )
        if not self.preconditioned_modules:
            warnings.warn(
                f"{type(self).__name__} preconditions no layer of {type(unwrap_model(self.model)).__name__}: "
                f"every gradient stays plain",
                UnsupportedModuleWarning,
                stacklevel=2,
            )
        return text

    # --- schedule -----------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """The number of completed ``forward_and_backward()`` steps."""
        return self.state["step"]

    def do_update_curvature(self, step: int | None = None) -> bool:
        """Whether the curvature is refreshed at ``step`` (default: the current step)."""
        return is_update_step(self.step if step is None else step, self.config, "curvature")

    def do_update_preconditioner(self, step: int | None = None) -> bool:
        """Whether the preconditioner is refreshed at ``step`` (default: the current step)."""
        return is_update_step(self.step if step is None else step, self.config, "preconditioner")

    def do_forward_and_backward(self, step: int | None = None) -> bool:
        """Whether the step makes a plain pass before the updates. Default: when the curvature is
        not refreshed (``update_curvature`` makes the pass otherwise), as ASDL's natural-gradient
        makers do."""
        return not self.do_update_curvature(step)

    def _warn_past_total(self, step: int) -> None:
        for kind in SCHEDULE_KINDS:
            if kind == "curvature" and _follows_preconditioner(self.config):
                continue  # the same schedule as the preconditioner's, warned about once
            s = resolve_schedule(self.config, kind)
            if s.ratio_mode and step >= s.num_total_steps and kind not in self._warned_past_total:
                self._warned_past_total.add(kind)
                warnings.warn(
                    f"step {step} is past num_total_steps={s.num_total_steps}: the {kind} ratio schedule makes "
                    f"no more refreshes (as in ASDL); the last preconditioner stays in use",
                    UserWarning,
                    stacklevel=3,
                )

    # --- the step -----------------------------------------------------------------------------
    def forward_and_backward(self) -> tuple[Any, Tensor]:
        """One training step's (preconditioned) gradient; see the class docstring for the order.

        Under ``torch.autocast`` only the model and loss calls run in reduced precision; curvature,
        inverses and preconditioning run with autocast off (:mod:`curvfun.precision`)."""
        self._autocast = autocast_state()
        try:
            with full_precision():
                return self._forward_and_backward()
        finally:
            self._autocast = ()

    def _forward_and_backward(self) -> tuple[Any, Tensor]:
        self._require_ready()
        guards.check_step(self)
        step = self.step
        if not self._reported:
            self.report_preconditioned_modules()
        self._warn_past_total(step)
        before = self._pass_count
        self._startup()
        synced = False
        # under torch.distributed, every mean over ranks below is weighted by the per-rank sample
        # counts (the concatenated batch's mean; no extra collective, see curvfun.distributed)
        with self._sample_weighting():
            if self.do_forward_and_backward(step):
                self.plain_pass()
                # under torch.distributed: mean gradient over ranks before update_curvature (Shampoo
                # builds its statistics from it); no-op in one process or with DDP
                self._average_gradients(step)
                synced = True
            if self.do_update_curvature(step):
                self.update_curvature()
            if not synced and self._pass_count > before:  # the pass ran inside update_curvature
                self._average_gradients(step)
            if self.do_update_preconditioner(step):
                self.update_preconditioner()
        passes = self._pass_count - before
        if passes != 1:
            what = "no" if passes == 0 else f"{passes}"
            raise RuntimeError(
                f"{type(self).__name__} made {what} forward/backward passes at step {step}; exactly one is "
                f"needed. update_curvature() must run the pass (self.forward(); self.backward(), or write "
                f"param.grad and call self._record_pass(output, loss)) on steps where "
                f"do_forward_and_backward() is False, and must not when it is True"
            )
        self.precondition()
        if self._local_curvature:
            from .. import distributed as cfd

            if cfd.is_distributed():  # ranks stay in step: mean of the locally preconditioned grads
                cfd.average_gradients(unwrap_model(self.model).parameters(), step)
        self._teardown()
        self.state["step"] = step + 1
        return self._model_output, self._loss

    def plain_pass(self) -> None:
        """The pass of a step that does not refresh the curvature: :meth:`forward` then
        :meth:`backward` (subclasses may record more, e.g. layer inputs)."""
        self.forward()
        self.backward()

    def _startup(self) -> None:
        """Hook run at the start of every step."""

    def _teardown(self) -> None:
        """Hook run at the end of every step."""

    @abc.abstractmethod
    def update_curvature(self) -> None:
        """Run the forward and backward pass and capture / accumulate the curvature."""

    def update_preconditioner(self) -> None:
        """Compute the preconditioner (e.g. damped inverses) from the accumulated curvature."""

    @abc.abstractmethod
    def precondition(self) -> None:
        """Rewrite ``param.grad`` of every preconditioned parameter in place."""

    # --- robustness ---------------------------------------------------------------------------
    def _install_if_finite(self, name: str, new_value: Any, keep_old: Any = None, what: str = "curvature") -> Any:
        """The value to install for ``name``: ``new_value`` if all its entries are finite, else
        ``keep_old`` (the last good value; None if there is none yet, meaning the layer keeps the
        plain gradient). A rejection is counted in ``self.nonfinite_counts[name]`` and warned about
        once per ``name`` (:class:`NonFiniteCurvatureWarning`); training goes on.

        Usage: ``self.inv[name] = self._install_if_finite(name, new_inv, self.inv.get(name), "inverse")``.
        """
        if all_finite(new_value):
            return new_value
        self.nonfinite_counts[name] = self.nonfinite_counts.get(name, 0) + 1
        if name not in self._nonfinite_warned:
            self._nonfinite_warned.add(name)
            kept = "the last good one is kept" if keep_old is not None else "no good one exists yet, so the plain gradient is used"
            warnings.warn(
                f"{type(self).__name__}: the new {what} of {name!r} at step {self.step} has non-finite entries "
                f"and was not installed; {kept}. (Warned once per module; counts in nonfinite_counts.)",
                NonFiniteCurvatureWarning,
                stacklevel=2,
            )
        return keep_old

    # --- state --------------------------------------------------------------------------------
    def _model_structure(self) -> list[list[Any]]:
        return [[n, list(p.shape)] for n, p in unwrap_model(self.model).named_parameters()]

    def _maker_name(self) -> str:
        cls = type(self)
        return f"{cls.__module__}.{cls.__qualname__}"

    def _extra_state(self) -> dict[str, Any]:
        """The subclass's state: by default the attributes named in ``_state_attributes`` (copied)."""
        return {name: _clone_tree(getattr(self, name)) for name in self._state_attributes}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`_extra_state` returned."""
        missing = [k for k in self._state_attributes if k not in state]
        unknown = [k for k in state if k not in self._state_attributes]
        if missing or unknown:
            raise ValueError(
                f"the state dict's maker state does not match {type(self).__name__}: missing {missing}, "
                f"unexpected {unknown}"
            )
        for name in self._state_attributes:
            setattr(self, name, _clone_tree(state[name]))

    def state_dict(self) -> dict[str, Any]:
        """All state, as a fresh copy: step, generator state, non-finite bookkeeping, the subclass's
        state, and what is needed to check a load (maker class, parameter names and shapes, the
        preconditioned layers, the config). Safe for ``torch.save`` / ``torch.load(weights_only=True)``."""
        return {
            "format": _STATE_FORMAT,
            "maker": self._maker_name(),
            "model_structure": self._model_structure(),
            "preconditioned_modules": list(self.preconditioned_modules),
            "config": self.config.summary(),
            "step": int(self.step),
            "generator": self.generator.get_state(),
            "nonfinite_counts": dict(self.nonfinite_counts),
            "nonfinite_warned": sorted(self._nonfinite_warned),
            "maker_state": self._extra_state(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output, so that training continues bit-for-bit (together
        with the model's and optimizer's own state dicts). Raises ``ValueError`` for a state dict of
        another maker class or model structure; warns when the config differs."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        required = ["format", "maker", "model_structure", "step", "generator", "maker_state"]
        missing = [k for k in required if k not in state_dict]
        if missing or state_dict.get("format") != _STATE_FORMAT:
            raise ValueError(
                f"not a curvfun PreconditionedGradientMaker state dict (missing {missing}, format "
                f"{state_dict.get('format')!r}); ASDL's {{'step': n}} dicts cannot restore the generator and "
                f"curvature: save with {type(self).__name__}.state_dict()"
            )
        if state_dict["maker"] != self._maker_name():
            raise ValueError(
                f"state dict was saved by {state_dict['maker']} and cannot be loaded into {self._maker_name()}"
            )
        saved, mine = [list(x) for x in state_dict["model_structure"]], self._model_structure()
        if saved != mine:
            diffs = []
            for i in range(max(len(saved), len(mine))):
                a = saved[i] if i < len(saved) else None
                b = mine[i] if i < len(mine) else None
                if a != b:
                    diffs.append(f"saved {a} vs model {b}")
                if len(diffs) == 3:
                    break
            raise ValueError(
                f"state dict was saved for a model with another structure ({len(saved)} parameters vs "
                f"{len(mine)}); first differences (name, shape): {diffs}"
            )
        saved_modules = list(state_dict.get("preconditioned_modules", list(self.preconditioned_modules)))
        if saved_modules != list(self.preconditioned_modules):
            raise ValueError(
                f"state dict preconditions layers {saved_modules} but this maker preconditions "
                f"{list(self.preconditioned_modules)}: use the same ignore_modules as the saved run"
            )
        saved_config = state_dict.get("config")
        if saved_config is not None and saved_config != self.config.summary():
            changed = sorted(k for k in set(saved_config) | set(self.config.summary())
                             if saved_config.get(k) != self.config.summary().get(k))
            warnings.warn(
                f"loading a state dict saved with another config (fields {changed} differ): the run will not "
                f"continue exactly as the saved one",
                UserWarning,
                stacklevel=2,
            )
        guards.check_state_shapes(self, state_dict["maker_state"])
        self._load_extra_state(state_dict["maker_state"])
        self.generator.set_state(state_dict["generator"].clone())
        self.state["step"] = int(state_dict["step"])
        self.nonfinite_counts = dict(state_dict.get("nonfinite_counts", {}))
        self._nonfinite_warned = set(state_dict.get("nonfinite_warned", []))
