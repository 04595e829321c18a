"""Dummy model outputs: record operations now, replay them on the real output later.

``GradientMaker.setup_model_call`` returns a :class:`DummyObject` before the model has run. Reading
an attribute, indexing or calling it returns a new dummy that remembers the chain
(``dummy_y.logits``, ``dummy_y[0]``, ``dummy_y.view(-1, n)``, ``dummy_y["out"].float()``); dummies
may appear among the arguments of a recorded call and are replayed against the same model output.
:func:`replay` applies a chain to a value, :func:`replace_dummies` replaces every dummy inside
plain containers (tuple, namedtuple, list, dict) of loss arguments.

Differences from ASDL 0.1's ``DummyObject`` (same idea, written anew):

* Unpacking (``a, b = dummy_y``), ``in`` and truth tests raise ``TypeError``. In ASDL, unpacking
  loops forever, since Python falls back to ``__getitem__(0), (1), ...``.
* Dunder lookups (``__array__``, ...) and IPython's display probes (``_repr_html_``, ...) are not
  recorded, so such probing gives the usual ``AttributeError``; dummies are immutable (``copy``
  returns the same object, pickling works) and setting an attribute raises ``TypeError``.
* A failed replay raises :class:`DummyReplayError` naming the recorded chain and the step that
  failed, chained to the original error.
* The default logits (when ``setup_logits_repr`` is not called) also understand dict-like outputs
  with a ``"logits"`` key and objects (dataclasses, ``ModelOutput``) with a tensor ``.logits``
  attribute; ASDL takes the first item of a tuple/list and otherwise the whole output.
* ``DummyObject.eval(value)`` is kept for ASDL compatibility (so ``dummy_y.eval`` is that method,
  not a recorded attribute, as in ASDL); :func:`replay` is the function form.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DummyObject", "DummyReplayError", "replay", "replace_dummies", "default_logits_dummy", "GetAttr", "GetItem", "Call"]


class DummyReplayError(RuntimeError):
    """Replaying a recorded chain on the real model output failed."""


@dataclass(frozen=True)
class GetAttr:
    name: str

    def apply(self, value: Any, base: Any) -> Any:
        return getattr(value, self.name)

    def render(self) -> str:
        return f".{self.name}"


@dataclass(frozen=True)
class GetItem:
    key: Any

    def apply(self, value: Any, base: Any) -> Any:
        return value[replace_dummies(self.key, base)]

    def render(self) -> str:
        return f"[{_render_arg(self.key)}]"


@dataclass(frozen=True)
class Call:
    args: tuple
    kwargs: tuple  # of (name, value) pairs, to keep the op hashable-looking and ordered

    def apply(self, value: Any, base: Any) -> Any:
        args = replace_dummies(self.args, base)
        kwargs = {k: replace_dummies(v, base) for k, v in self.kwargs}
        return value(*args, **kwargs)

    def render(self) -> str:
        parts = [_render_arg(a) for a in self.args] + [f"{k}={_render_arg(v)}" for k, v in self.kwargs]
        return f"({', '.join(parts)})"


@dataclass(frozen=True)
class DefaultLogits:
    """The logits when none were declared: ``out[0]`` for a tuple/list, ``out["logits"]`` for a
    mapping with that key, ``out.logits`` when that attribute is a tensor, else ``out`` itself."""

    def apply(self, value: Any, base: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return value[0] if len(value) > 0 else value
        if isinstance(value, Mapping) and "logits" in value:
            return value["logits"]
        if not isinstance(value, torch.Tensor) and isinstance(getattr(value, "logits", None), torch.Tensor):
            return value.logits
        return value

    def render(self) -> str:
        return "<default logits>"


def _render_arg(arg: Any) -> str:
    if isinstance(arg, DummyObject):
        return repr(arg)
    if isinstance(arg, torch.Tensor):
        return f"tensor(shape={tuple(arg.shape)})"
    if isinstance(arg, slice):
        f = lambda x: "" if x is None else repr(x)  # noqa: E731
        return f"{f(arg.start)}:{f(arg.stop)}" + ("" if arg.step is None else f":{arg.step!r}")
    text = repr(arg)
    return text if len(text) <= 40 else text[:37] + "..."


_OPS_SLOT = "_curvfun_ops"


class DummyObject:
    """A placeholder for a value that does not exist yet, recording reads made on it.

    Example::

        y = DummyObject()                      # stands for the model output
        logits = y.logits.view(-1, 10)         # records .logits, .view, (-1, 10)
        replay(logits, real_output)            # == real_output.logits.view(-1, 10)
    """

    __slots__ = (_OPS_SLOT,)

    def __init__(self, operations: tuple = ()) -> None:
        object.__setattr__(self, _OPS_SLOT, tuple(operations))

    # --- recording
    def __getattr__(self, name: str) -> "DummyObject":
        if name == _OPS_SLOT or (name.startswith("__") and name.endswith("__")) or name.startswith(("_ipython_", "_repr_")):
            raise AttributeError(name)
        return DummyObject(self._curvfun_ops + (GetAttr(name),))

    def __getitem__(self, key: Any) -> "DummyObject":
        return DummyObject(self._curvfun_ops + (GetItem(key),))

    def __call__(self, *args: Any, **kwargs: Any) -> "DummyObject":
        return DummyObject(self._curvfun_ops + (Call(args, tuple(kwargs.items())),))

    # --- what a placeholder cannot answer yet
    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError(
            f"cannot set {name!r} on a DummyObject: it only records reads (attributes, indexing, calls) "
            f"to replay on the model output"
        )

    def __iter__(self):
        raise TypeError(
            "cannot iterate or unpack a DummyObject: the model output does not exist until "
            "forward_and_backward(); index it instead, e.g. dummy_y[0], dummy_y[1]"
        )

    def __bool__(self) -> bool:
        raise TypeError("a DummyObject has no truth value: the model output does not exist yet")

    def __copy__(self) -> "DummyObject":
        return self  # immutable

    def __deepcopy__(self, memo: dict) -> "DummyObject":
        return self

    def __reduce__(self):
        return (DummyObject, (self._curvfun_ops,))

    def __repr__(self) -> str:
        return "DummyObject(output" + "".join(op.render() for op in self._curvfun_ops) + ")"

    # --- ASDL compatibility
    def eval(self, base_value: Any) -> Any:  # noqa: A003 - ASDL's name
        """Replay the recorded operations on ``base_value`` (ASDL's name for :func:`replay`)."""
        return replay(self, base_value)


def replay(dummy: DummyObject, base_value: Any) -> Any:
    """Apply the operations recorded in ``dummy`` to ``base_value`` (the real model output).

    Dummies among recorded call arguments or index keys are replayed on the same ``base_value``.
    """
    if not isinstance(dummy, DummyObject):
        raise TypeError(f"replay expects a DummyObject, got {type(dummy).__name__}")
    value = base_value
    done = "output"
    for op in object.__getattribute__(dummy, _OPS_SLOT):
        try:
            value = op.apply(value, base_value)
        except Exception as err:
            raise DummyReplayError(
                f"replaying {dummy!r} on the model output ({type(base_value).__name__}) failed at "
                f"{done}{op.render()} (applied to a {type(value).__name__}): {type(err).__name__}: {err}"
            ) from err
        done += op.render()
    return value


def replace_dummies(obj: Any, base_value: Any) -> Any:
    """``obj`` with every :class:`DummyObject` replaced by its replay on ``base_value``.

    Looks inside tuples, namedtuples, lists and dicts (exact types; other containers and objects
    are passed through unchanged).
    """
    if isinstance(obj, DummyObject):
        return replay(obj, base_value)
    t = type(obj)
    if t is tuple or t is list:
        return t(replace_dummies(v, base_value) for v in obj)
    if isinstance(obj, tuple) and hasattr(t, "_fields"):
        return t(*(replace_dummies(v, base_value) for v in obj))
    if t is dict:
        return {k: replace_dummies(v, base_value) for k, v in obj.items()}
    return obj


def contains_dummy(obj: Any) -> bool:
    """Whether ``obj`` is or contains (in plain containers) a :class:`DummyObject`."""
    if isinstance(obj, DummyObject):
        return True
    if isinstance(obj, (tuple, list)):
        return any(contains_dummy(v) for v in obj)
    if type(obj) is dict:
        return any(contains_dummy(v) for v in obj.values())
    return False


def default_logits_dummy() -> DummyObject:
    """The logits representation used until ``setup_logits_repr`` is called (see :class:`DefaultLogits`)."""
    return DummyObject((DefaultLogits(),))
