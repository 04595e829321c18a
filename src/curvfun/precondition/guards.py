"""Checks a maker runs at its boundaries: at the start of every step (config and model edited
after construction, empty batch), at ``setup_model_call`` (another model) and at
``load_state_dict`` (factor shapes). Each is cheap: the per-step checks compare tuples built in
O(#config fields + #settings) and do no tensor work.

Policy (documented in :class:`~curvfun.precondition.base.PreconditionedGradientMaker`):

* a config field edited after construction is validated at the next step, with the config's own
  message (and the maker's own constraints, :meth:`_check_config`); so are the maker's own
  settings listed in ``_settings`` (:meth:`_check_settings`);
* ``setup_model_call`` with a module that neither is, contains nor belongs to the maker's model
  raises :class:`ModelChangedError`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import optree
from torch import Tensor, nn

from ..capture import EMPTY_BATCH
from ..memory import check_dense_size
from ._layer_pass import linear_or_conv_reason
from .state_packing import PACKABLE

__all__ = [
    "ModelChangedError",
    "config_key",
    "snapshot",
    "check_step",
    "check_model_call",
    "check_nonempty_batch",
    "check_state_shapes",
    "check_dense_requests",
]


class ModelChangedError(RuntimeError):
    """The maker was asked to work on a model it was not built for; build a new maker."""


def config_key(config: Any) -> tuple:
    """The config's identity and field values (lists as tuples): equal keys, same config."""
    if not dataclasses.is_dataclass(config):
        return (id(config),)
    values = []
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if isinstance(v, list):
            v = ("__list__", *map(id, v))  # ignore_modules: its entries by identity
        values.append(v)
    return (id(config), *values)


def settings_key(maker: Any) -> tuple:
    """The maker's own settings (``_settings`` attribute names), by value."""
    return tuple(getattr(maker, name, None) for name in maker._settings)


def check_step(maker: Any) -> None:
    """At the start of a step: re-validate an edited config or setting (and rebuild the layer
    assignment after an edited ``ignore_modules``). No-op when nothing changed."""
    from .config import PreconditioningConfig

    key = config_key(maker.config)
    if key != maker._guard_config:
        if not isinstance(maker.config, PreconditioningConfig):
            raise TypeError(
                f"{type(maker).__name__}.config must be a curvfun.precondition.PreconditioningConfig, got "
                f"{type(maker.config).__name__}"
            )
        maker.config.validate()
        maker._check_config(maker.config)
        check_dense_requests(maker)
        if _ignore_key(key) != _ignore_key(maker._guard_config):
            _rebuild_keeping_calls(maker, "config.ignore_modules changed")
    if settings_key(maker) != maker._guard_settings:
        maker._check_settings()
    snapshot(maker)


#: what the registered model and loss calls consist of (kept across a rebuild within a step)
_CALL_ATTRIBUTES = ("_model_fn", "_model_args", "_model_kwargs", "_loss_fn", "_loss_fn_args", "_loss_fn_kwargs",
                    "_dummy_loss", "_dummy_logits", "_pass_count")


def _rebuild_keeping_calls(maker: Any, change: str) -> None:
    """The maker's own rebuild (layers re-assigned, curvature restarting) in the middle of a step,
    with the registered calls kept."""
    calls = {name: getattr(maker, name) for name in _CALL_ATTRIBUTES}
    maker._rebuild(change)
    for name, value in calls.items():
        setattr(maker, name, value)


def snapshot(maker: Any) -> None:
    """Record what :func:`check_step` compares against."""
    maker._guard_config = config_key(maker.config)
    maker._guard_settings = settings_key(maker)


def _ignore_key(key: tuple) -> Any:
    from .config import PreconditioningConfig

    names = [f.name for f in dataclasses.fields(PreconditioningConfig)]
    return key[1 + names.index("ignore_modules")] if len(key) > len(names) else None


def check_model_call(maker: Any, model_fn: Any) -> None:
    """Refuse ``setup_model_call`` with a module (or a bound method of one) that neither is,
    contains nor belongs to the maker's model: its curvature would belong to another model."""
    from .base import unwrap_model

    module = model_fn if isinstance(model_fn, nn.Module) else getattr(model_fn, "__self__", None)
    if not isinstance(module, nn.Module):
        return  # a function or lambda: cannot tell which model it calls
    mine, theirs = unwrap_model(maker.model), unwrap_model(module)
    if theirs is mine or module is maker.model:
        return
    if any(m is mine for m in theirs.modules()) or any(m is theirs for m in mine.modules()):
        return
    raise ModelChangedError(
        f"{type(maker).__name__}.setup_model_call got a {type(theirs).__name__} that is not the model this maker "
        f"was built for (a {type(mine).__name__}, id {id(mine):#x}) and shares no module with it: the curvature "
        f"would be of the wrong model. Build a maker for the new model: gm = {type(maker).__name__}(new_model, "
        f"config), or pass the model the maker was built with"
    )


def check_nonempty_batch(maker: Any, args: tuple, kwargs: Mapping) -> None:
    """Refuse a registered model call whose first tensor argument has 0 samples."""
    for leaf in optree.tree_leaves((args, dict(kwargs)), namespace="curvfun"):
        if isinstance(leaf, Tensor):
            if leaf.ndim > 0 and leaf.shape[0] == 0:
                raise ValueError(EMPTY_BATCH.format(who=type(maker).__name__))
            return


def check_dense_requests(maker: Any) -> None:
    """:func:`~curvfun.memory.check_dense_size` for each of the maker's :meth:`_dense_requests`."""
    for what, shape, dtype, device, instead in maker._dense_requests():
        check_dense_size(what, shape, dtype, device, instead=instead)


# --- load_state_dict: shapes ----------------------------------------------------------------------

#: packed factor classes whose (A, B) sides determine the layer's weight shape
_KRON_SIDES = {
    "curvfun.kron.KronFactor": ("A", "B"),
    "curvfun.kron.KronInverse": ("A_inv", "B_inv"),
    "curvfun.kron.EKFACFactor": ("QA", "QB"),
}


#: packed factor classes whose tensor shapes depend on the layer only: all but those holding rows
#: or a rank (their sizes follow the batch or the data)
_FIXED_SHAPE_CLASSES = PACKABLE - {
    "curvfun.kron_rows.KronRowsFactor",
    "curvfun.kron_rows.KronRowsInverse",
    "curvfun.lowrank.LowRankKron",
    "curvfun.lowrank.WoodburyFactor",
    "curvfun.precondition.natural_gradient.RowsBlock",
}


def _shape_mismatches(saved: Any, current: Any, path: str, out: list[str]) -> None:
    if isinstance(saved, Tensor) and isinstance(current, Tensor):
        if saved.shape != current.shape:
            out.append(f"{path}: saved {tuple(saved.shape)}, this maker {tuple(current.shape)}")
    elif isinstance(saved, Mapping) and isinstance(current, Mapping):
        cls = saved.get("__dataclass__")
        if (cls is not None or "__dataclass__" in current) and (
                cls != current.get("__dataclass__") or cls not in _FIXED_SHAPE_CLASSES):
            return  # another factor form (e.g. rows, whose count depends on the batch): not comparable
        for k in saved:
            if k in current:
                _shape_mismatches(saved[k], current[k], f"{path}[{k!r}]", out)
    elif isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)) and len(saved) == len(current):
        for i, (a, b) in enumerate(zip(saved, current)):
            _shape_mismatches(a, b, f"{path}[{i}]", out)


def _kron_mismatches(maker: Any, state: Mapping, out: list[str]) -> None:
    """Packed Kronecker factors keyed by a preconditioned layer: their sides must fit the layer's
    weight (works on a fresh maker, which has no state of its own to compare with)."""
    layers = maker.preconditioned_modules
    for attr, entries in state.items():
        if not isinstance(entries, Mapping):
            continue
        for name, packed in entries.items():
            if name not in layers or not isinstance(packed, Mapping):
                continue
            sides = _KRON_SIDES.get(packed.get("__dataclass__"))
            module = layers[name]
            weight = getattr(module, "weight", None)
            # weights laid out [d_out, d_in, *kernel] (the registry's plain affine layers)
            plain_layout = linear_or_conv_reason(module) is None
            if sides is None or not isinstance(weight, Tensor) or not plain_layout:
                continue
            A, B = packed.get(sides[0]), packed.get(sides[1])
            if not (isinstance(A, Tensor) and isinstance(B, Tensor)) or A.ndim < 2 or B.ndim < 2:
                continue
            groups = A.shape[0] if A.ndim == 3 else 1
            extra = 1 if packed.get("folded") and packed.get("has_bias") else 0
            d_in = math.prod(weight.shape[1:]) + extra
            d_out = weight.shape[0] // max(groups, 1)
            want_a = (*A.shape[:-2], d_in, d_in)
            want_b = (*B.shape[:-2], d_out, d_out)
            where = f"maker_state[{attr!r}][{name!r}]"
            if tuple(A.shape) != want_a:
                out.append(f"{where}.{sides[0]}: saved {tuple(A.shape)}, layer {name!r} (weight "
                           f"{tuple(weight.shape)}) needs {want_a}")
            if tuple(B.shape) != want_b:
                out.append(f"{where}.{sides[1]}: saved {tuple(B.shape)}, layer {name!r} (weight "
                           f"{tuple(weight.shape)}) needs {want_b}")


def check_state_shapes(maker: Any, saved_state: Mapping) -> None:
    """Refuse a saved maker state whose tensors do not have the shapes of this maker's current
    state (where it has one) or whose Kronecker factors do not fit their layer's weight."""
    mismatches: list[str] = []
    current = maker._extra_state()
    if isinstance(saved_state, Mapping):
        skip = set(maker._data_shaped_state)
        _shape_mismatches({k: v for k, v in saved_state.items() if k not in skip}, current, "maker_state",
                          mismatches)
        _kron_mismatches(maker, saved_state, mismatches)
    if mismatches:
        more = f" (and {len(mismatches) - 3} more)" if len(mismatches) > 3 else ""
        raise ValueError(
            f"the state dict does not fit {type(maker).__name__}: {'; '.join(mismatches[:3])}{more}. It was saved "
            f"for another model or altered; load the state dict saved with this model, or start without it"
        )
