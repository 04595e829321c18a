"""The ASDL-compatible ``GradientMaker`` interface: set up the model call and the loss call with
dummies, then ``forward_and_backward()`` gives exactly the gradients of ``loss.backward()``.

Pure functions of the registered calls (:meth:`GradientMaker.loss_from_output`,
:meth:`GradientMaker.model_output_at`) let preconditioners re-evaluate them under ``torch.func``.
Where curvfun differs from ASDL 0.1 is listed in :mod:`curvfun.precondition.base`.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import optree
from torch import Tensor, nn
from torch.func import functional_call

from ..precision import autocast_as
from . import guards
from .assignment import unwrap_model
from .config import PreconditioningConfig
from .dummy import DummyObject, contains_dummy, default_logits_dummy, replace_dummies, replay

__all__ = ["GradientMaker"]


class _BoundCall(nn.Module):
    """Holds ``model`` as submodule ``m`` and calls ``fn``: lets ``functional_call`` swap the
    parameters of ``model`` under any callable that uses it (a lambda, a bound method ...)."""

    def __init__(self, model: nn.Module, fn: Callable) -> None:
        super().__init__()
        self.m = model
        object.__setattr__(self, "_fn", fn)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)


class GradientMaker:
    """The ASDL ``GradientMaker`` interface; with no preconditioning it gives exactly the gradients
    of ``loss.backward()``.

    Example (ASDL's README loop; only the import differs)::

        gm = GradientMaker(model)
        for x, t in loader:
            optimizer.zero_grad()
            dummy_y = gm.setup_model_call(model, x)
            gm.setup_loss_call(F.cross_entropy, dummy_y, t)
            y, loss = gm.forward_and_backward()
            optimizer.step()

    Model outputs may be tensors, tuples, dicts, dataclasses or anything else; the dummy returned by
    :meth:`setup_model_call` records attribute reads, indexing and calls (see
    :mod:`curvfun.precondition.dummy`) and is replayed on the real output.

    Subclass hook (as in ASDL): ``_loss_reduction`` (None, ``'mean'``, ``'sum'`` or ``'none'``)
    makes :meth:`call_loss` run the loss with that reduction.
    """

    _loss_reduction: str | None = None

    #: the caller's autocast settings while a preconditioned step runs (see forward_and_backward)
    _autocast: tuple = ()
    #: whether the latest pass's gradient was written by the maker (not by ``loss.backward()``)
    _grads_written: bool = False
    #: makers whose curvature is each rank's own (no reduction implemented): under
    #: ``torch.distributed`` their preconditioned gradients are averaged at the end of the step, so
    #: the ranks take the same step (each preconditioned with its own batch's curvature)
    _local_curvature: bool = False

    def __init__(self, model: nn.Module, config: PreconditioningConfig | None = None, *,
                 create_graph: bool = False) -> None:
        """``create_graph=True``: :meth:`backward` keeps the gradients' graph (for optimizers that
        differentiate them again, e.g. AdaHessian's Hessian-vector products)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if config is not None:
            if not isinstance(config, PreconditioningConfig):
                raise TypeError(
                    f"config must be a curvfun.precondition.PreconditioningConfig, got {type(config).__name__}"
                )
            config.validate()
        if not isinstance(create_graph, bool):
            raise TypeError(f"create_graph must be a bool, got {create_graph!r}")
        self.create_graph = create_graph
        self.model = model
        #: accepted so that the README's ``XXXGradientMaker(model, config)`` line also works with the
        #: plain maker (ASDL's takes only ``model``); the plain maker does not use it.
        self.config = config
        self._model_fn: Callable | None = None
        self._model_args: tuple = ()
        self._model_kwargs: dict = {}
        self._model_output: Any = None
        self._logits: Any = None
        self._loss_fn: Callable | None = None
        self._loss_fn_args: tuple = ()
        self._loss_fn_kwargs: dict = {}
        self._dummy_loss: DummyObject | None = None
        self._dummy_logits: DummyObject = default_logits_dummy()
        self._loss: Tensor | None = None
        self._pass_count = 0  # completed forward+backward passes
        self._backward_pending = False  # a forward has run whose loss was not back-propagated

    # --- setup -------------------------------------------------------------------------------
    def setup_model_call(self, model_fn: Callable, *args: Any, **kwargs: Any) -> DummyObject:
        """Register ``model_fn(*args, **kwargs)`` as the model call; returns a dummy of its output."""
        if not callable(model_fn):
            raise TypeError(f"model_fn must be callable (e.g. the model), got {type(model_fn).__name__}")
        if contains_dummy(args) or contains_dummy(kwargs):
            raise TypeError("setup_model_call: a DummyObject stands for the model's output and cannot be its input")
        self._model_fn = model_fn
        self._model_args = args
        self._model_kwargs = kwargs
        self._backward_pending = False
        return DummyObject()

    def setup_loss_call(self, loss_fn: Callable, *args: Any, **kwargs: Any) -> None:
        """Register ``loss_fn(*args, **kwargs)``; dummies among the arguments (also inside tuples,
        lists and dicts) are replaced by their replay on the model output. Replaces a previous
        :meth:`setup_loss_repr`."""
        self._require_model_setup("setup_loss_call")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (e.g. F.cross_entropy), got {type(loss_fn).__name__}")
        self._loss_fn = loss_fn
        self._loss_fn_args = args
        self._loss_fn_kwargs = kwargs
        self._dummy_loss = None

    def setup_loss_repr(self, dummy_loss: DummyObject) -> None:
        """Declare the loss as a chain on the model output, e.g. ``dummy_y.loss`` or
        ``dummy_y[1].sum()``. Replaces a previous :meth:`setup_loss_call`."""
        self._require_model_setup("setup_loss_repr")
        if not isinstance(dummy_loss, DummyObject):
            raise TypeError(
                f"dummy_loss must be a DummyObject (the return value of setup_model_call or a chain on it), "
                f"got {type(dummy_loss).__name__}"
            )
        self._dummy_loss = dummy_loss
        self._loss_fn = None
        self._loss_fn_args, self._loss_fn_kwargs = (), {}

    def setup_logits_repr(self, dummy_logits: DummyObject) -> None:
        """Declare which (replayed) value are the logits, e.g. ``dummy_y.logits``. Until called, the
        logits are ``out[0]`` for tuple/list outputs, ``out["logits"]`` / ``out.logits`` where present,
        else the output itself."""
        self._require_model_setup("setup_logits_repr")
        if not isinstance(dummy_logits, DummyObject):
            raise TypeError(
                f"dummy_logits must be a DummyObject (the return value of setup_model_call or a chain on "
                f"it), got {type(dummy_logits).__name__}"
            )
        self._dummy_logits = dummy_logits

    def _require_model_setup(self, what: str) -> None:
        if self._model_fn is None:
            raise RuntimeError(
                f"{what}() was called before setup_model_call(): call dummy_y = "
                f"gm.setup_model_call(model, x) first and pass dummy_y (or a chain on it) here"
            )

    # --- results -----------------------------------------------------------------------------
    @property
    def model_output(self) -> Any:
        """The output of the latest model call."""
        return self._model_output

    @property
    def loss(self) -> Tensor | None:
        """The loss of the latest loss call."""
        return self._loss

    @property
    def logits(self) -> Any:
        """The logits of the latest model call (see :meth:`setup_logits_repr`)."""
        return self._logits

    # --- the pass ----------------------------------------------------------------------------
    def call_model(self) -> Any:
        """Run the registered model call; sets :attr:`model_output` and :attr:`logits`."""
        if self._model_fn is None:
            raise RuntimeError(
                "no model call is set up: call gm.setup_model_call(model, x) (and gm.setup_loss_call(...)) "
                "before forward_and_backward()"
            )
        with autocast_as(self._autocast):
            self._model_output = self._model_fn(*self._model_args, **self._model_kwargs)
            self._logits = replay(self._dummy_logits, self._model_output)
        return self._model_output

    def call_loss(self) -> Tensor:
        """Evaluate the registered loss on :attr:`model_output`; sets :attr:`loss`."""
        with autocast_as(self._autocast):
            self._loss = self.loss_from_output(self._model_output, reduction=self._loss_reduction)
        self._backward_pending = True
        return self._loss

    def forward(self) -> None:
        """:meth:`call_model` then :meth:`call_loss`."""
        self._require_loss_setup()
        self.call_model()
        self.call_loss()

    def backward(self) -> None:
        """``loss.backward()`` on the loss of the latest :meth:`forward` (``create_graph`` as set)."""
        if self.create_graph:  # the optimizer's step drops the gradients' graphs (no reference cycle kept)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
                self._loss_to_differentiate().backward(create_graph=True)
        else:
            self._loss_to_differentiate().backward()
        self._backward_done()

    def _backward_done(self) -> None:
        """Count the latest forward's backward as done (for subclasses that differentiate the loss
        themselves, e.g. with ``torch.autograd.grad``)."""
        self._backward_pending = False
        self._pass_count += 1
        self._grads_written = False

    def _loss_to_differentiate(self) -> Tensor:
        """The latest forward's loss, checked: a pending scalar that requires grad."""
        if self._loss is None:
            raise RuntimeError("backward() was called before forward(): there is no loss to differentiate")
        if not self._backward_pending:
            raise RuntimeError(
                "backward() already ran for the latest forward(); call forward() again for a new pass"
            )
        loss = self._loss
        if not isinstance(loss, Tensor):
            raise TypeError(f"the loss must be a tensor to call backward(), got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(
                f"the loss must be a scalar to call backward(), got shape {tuple(loss.shape)}: reduce it in "
                f"loss_fn (e.g. reduction='mean')"
            )
        if not loss.requires_grad:
            raise RuntimeError(
                "the loss does not require grad: is the model call inside torch.no_grad(), or are all "
                "parameters frozen?"
            )
        from .. import distributed as cfd

        count = cfd.local_sample_count()  # None outside forward_and_backward
        if count is not None and cfd.is_distributed() and cfd.is_ddp(self.model):
            # DDP averages over ranks unweighted: scale by W·n_r/N (1.0 for equal batches)
            scale = cfd.ddp_loss_scale(count, loss.device, self._pass_count)
            if scale != 1.0:
                loss = loss * scale
        return loss

    def forward_and_backward(self) -> tuple[Any, Tensor]:
        """Model call, loss call, ``loss.backward()``; returns ``(model_output, loss)``."""
        self._require_ready()
        with self._sample_weighting():
            self.forward()
            self.backward()
            self._average_gradients()
        return self._model_output, self._loss

    def sample_count(self) -> int | None:
        """This process's number of samples in the latest pass: the leading dimension of the logits
        (:meth:`setup_logits_repr`; else the first tensor of the model output); None if there is
        none. Under ``torch.distributed`` the means over ranks are weighted by it, so the loss must
        be the mean over that dimension (the GUIDE's convention)."""
        out = self._logits if isinstance(self._logits, Tensor) else next(
            (t for t in optree.tree_leaves(self._model_output) if isinstance(t, Tensor)), None)
        return int(out.shape[0]) if isinstance(out, Tensor) and out.ndim > 0 else None

    def _sample_weighting(self):
        """Under ``torch.distributed``: means over ranks inside are weighted by :meth:`sample_count`
        (:func:`curvfun.distributed.sample_weighting`); a null context otherwise."""
        import contextlib

        from .. import distributed as cfd

        return cfd.sample_weighting(self.sample_count) if cfd.is_distributed() else contextlib.nullcontext()

    def _average_gradients(self, step: int | None = None) -> None:
        """Under ``torch.distributed`` with a model that is not wrapped in
        ``DistributedDataParallel`` (which averages in backward), or whose gradient this maker wrote
        itself (:meth:`_record_pass`: DDP's backward hooks never ran): ``param.grad`` ← mean over
        ranks, one coalesced all-reduce (:func:`curvfun.distributed.average_gradients`). No-op
        otherwise."""
        from .. import distributed as cfd

        if cfd.is_distributed() and (not cfd.is_ddp(self.model) or self._grads_written):
            cfd.average_gradients(unwrap_model(self.model).parameters(), self._pass_count - 1 if step is None else step)

    def _require_loss_setup(self) -> None:
        if self._loss_fn is None and self._dummy_loss is None:
            raise RuntimeError(
                "no loss is set up: call gm.setup_loss_call(loss_fn, dummy_y, t) or "
                "gm.setup_loss_repr(dummy_y.loss) before forward_and_backward()"
            )

    def _require_ready(self) -> None:
        if self._model_fn is None:
            raise RuntimeError(
                "forward_and_backward() was called before setup_model_call(): call dummy_y = "
                "gm.setup_model_call(model, x) and gm.setup_loss_call(loss_fn, dummy_y, t) first"
            )
        self._require_loss_setup()
        guards.check_nonempty_batch(self, self._model_args, self._model_kwargs)

    def _record_pass(self, model_output: Any, loss: Tensor) -> None:
        """For subclasses that compute the gradient themselves (e.g. functionally) and write it into
        ``param.grad``: record the pass as if :meth:`forward` and :meth:`backward` had run."""
        self._model_output = model_output
        self._logits = replay(self._dummy_logits, model_output)
        self._loss = loss
        self._backward_pending = False
        self._pass_count += 1
        self._grads_written = True

    def delegate_forward_and_backward(self, other: "GradientMaker", *args: Any, **kwargs: Any) -> tuple[Any, Tensor]:
        """Run ``other.forward_and_backward(*args, **kwargs)`` with this maker's setup and keep the
        results here (ASDL's method of the same name)."""
        self._require_ready()
        other.setup_model_call(self._model_fn, *self._model_args, **self._model_kwargs)
        if self._loss_fn is None:
            other.setup_loss_repr(self._dummy_loss)
        else:
            other.setup_loss_call(self._loss_fn, *self._loss_fn_args, **self._loss_fn_kwargs)
        other.setup_logits_repr(self._dummy_logits)
        other.forward_and_backward(*args, **kwargs)
        self._model_output, self._loss, self._logits = other.model_output, other.loss, other.logits
        self._pass_count += 1
        self._backward_pending = False
        return self._model_output, self._loss

    # --- pure helpers for subclasses ------------------------------------------------------------
    def loss_from_output(self, output: Any, reduction: str | None = None) -> Tensor:
        """The registered loss evaluated on ``output`` (no state is changed).

        ``reduction`` overrides the loss function's reduction for this call only (an ``nn.Module``
        loss with a ``reduction`` attribute, or a function with a ``reduction`` parameter); the
        user's arguments are left as they were.
        """
        self._require_loss_setup()
        if self._loss_fn is None:
            if reduction is not None:
                raise TypeError(
                    "a loss declared with setup_loss_repr has no reduction to override; use setup_loss_call"
                )
            return replay(self._dummy_loss, output)
        args = replace_dummies(tuple(self._loss_fn_args), output)
        kwargs = replace_dummies(dict(self._loss_fn_kwargs), output)
        try:
            return self._call_loss_fn(args, kwargs, reduction)
        except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError) as e:
            from ..losses import swapped_arguments

            if len(args) >= 2 and not isinstance(self._loss_fn_args[0], DummyObject):
                why = swapped_arguments(args[0], args[1], "the loss's first argument", "the second",
                                        "call gm.setup_loss_call(loss_fn, dummy_y, t) with the dummy output first")
                if why:
                    raise ValueError(f"{type(self).__name__}: loss_fn failed ({type(e).__name__}: {e}); {why}") from e
            raise

    def _call_loss_fn(self, args: tuple, kwargs: dict, reduction: str | None) -> Tensor:
        fn = self._loss_fn
        if reduction is None:
            return fn(*args, **kwargs)
        if isinstance(fn, nn.Module) and hasattr(fn, "reduction"):
            old = fn.reduction
            fn.reduction = reduction
            try:
                return fn(*args, **kwargs)
            finally:
                fn.reduction = old
        if _accepts_reduction(fn):
            kwargs["reduction"] = reduction
            return fn(*args, **kwargs)
        raise TypeError(
            f"{type(self).__name__} needs the loss with reduction={reduction!r}, but loss_fn "
            f"{getattr(fn, '__name__', fn)!r} has no 'reduction' option: use e.g. F.cross_entropy or nn.MSELoss"
        )

    def logits_from_output(self, output: Any) -> Any:
        """The declared logits replayed on ``output`` (no state is changed)."""
        return replay(self._dummy_logits, output)

    def model_output_at(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor] | None = None) -> Any:
        """The registered model call evaluated with ``params`` in place of the model's parameters.

        A pure function of ``params`` (names as in ``self.model.named_parameters()``, or as in the
        module inside a DDP wrapper, which is evaluated directly; parameters left out keep their
        values), suitable for ``torch.func`` transforms. Buffers are copies, so BatchNorm running
        statistics are not updated; pass ``buffers`` to use others. Runs under the
        caller's autocast, like :meth:`call_model` (one precision for every model evaluation).
        """
        with autocast_as(self._autocast):
            return self._model_output_at(params, buffers)

    def _model_output_at(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor] | None) -> Any:
        if self._model_fn is None:
            raise RuntimeError("model_output_at() needs a model call: call setup_model_call() first")
        from ..functional import check_params

        model, fn = self.model, self._model_fn
        depth, inner = 0, model
        while isinstance(inner, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner, depth = inner.module, depth + 1
        prefix = "module." * depth
        if depth and fn is model:
            # a DDP / DataParallel wrapper called as is: evaluate the wrapped module (the wrapper's
            # forward only syncs buffers and prepares its gradient hooks, and is not a pure function)
            model = fn = inner
            params = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in params.items()}
            if buffers is not None:
                buffers = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in buffers.items()}
        elif depth:  # a custom call of the wrapper: its names
            params = {k if k.startswith(prefix) else prefix + k: v for k, v in params.items()}
        params = check_params(model, params)
        if buffers is None:
            buffers = {k: b.clone() for k, b in model.named_buffers()}
        if fn is model:
            return functional_call(
                model, (dict(params), dict(buffers)), self._model_args, self._model_kwargs,
                tie_weights=True, strict=False,
            )
        bound = _BoundCall(self.model, fn)
        prefixed = {f"m.{k}": v for k, v in params.items()}
        prefixed_buffers = {f"m.{k}": v for k, v in buffers.items()}
        return functional_call(
            bound, (prefixed, prefixed_buffers), self._model_args, self._model_kwargs,
            tie_weights=True, strict=False,
        )


def _accepts_reduction(fn: Callable) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    return "reduction" in sig.parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()
    )
