"""The layer registry: module class -> :class:`LayerHandler`.

A handler knows one layer type: which of its parameters it covers, when a module of that type
cannot be captured (and why), and how the inputs and output gradients recorded for it are laid
out in its *family*'s canonical form (see :mod:`curvfun.layers`). Everything downstream (per-sample
gradients, norms, diagonals, Kronecker and unit-wise blocks, the makers' rows routes) works on the
family's form only, so a new layer type is one handler file plus one :func:`register_layer` line.

Lookup walks the module's class MRO, nearest class first, but a subclass that overrides
``forward`` is *not* served by its parent's handler (a LoRA-style subclass computes something
else): it is unsupported unless registered itself, and its parameters take the exact fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping

from torch import Tensor, nn

__all__ = ["FAMILIES", "LayerPart", "LayerHandler", "register_layer", "unregister_layer", "handler_for",
           "registered_layers", "part_name"]

#: ``"affine"``: a = ``[N, G, T, d_in]``, g = ``[K, N, G, T, d_out]``, weight gradient Σ_t g aᵀ per group;
#: ``"embedding"``: ids ``[N, T]``, g ``[K, N, T, D]``; ``"norm"``: x̂ ``[N, T, C]``, g ``[K, N, T, C]``.
FAMILIES = ("affine", "embedding", "norm")


@dataclass(frozen=True)
class LayerPart:
    """One layer of a module that holds several (``nn.MultiheadAttention`` with separate q/k/v
    weights: three weight-only affine maps and the bias of all three): ``name`` is what follows the
    module's name in the layer's name (``""``: the module itself), ``params`` maps role -> attribute
    of the parameters it owns. Every parameter of the module belongs to exactly one part, whole."""

    name: str
    params: Mapping[str, str]


def part_name(module_name: str, part: str) -> str:
    """The name of a module's part as a layer: ``"att.q_proj_weight"`` (the module's own: its name)."""
    if not part:
        return module_name
    return f"{module_name}.{part}" if module_name else part


class LayerHandler:
    """What curvfun knows about one module class. Subclass it, set :attr:`family`, implement
    :meth:`arrange` (and :meth:`reason` where some configurations cannot be captured), and
    :func:`register_layer` the module class with an instance.

    Affine handlers may override :meth:`weight_layout` when the weight is not stored as the
    ``[G·d_out, d_in]`` matrix the canonical form multiplies (transposed convolutions). A module
    whose parameters form several layers declares them in :meth:`parts`."""

    family: ClassVar[str] = "affine"
    #: role -> attribute name of the parameters the handler covers (the family math speaks of
    #: roles ``"weight"`` / ``"bias"``); a module owning other parameters is unsupported
    params: ClassVar[dict[str, str]] = {"weight": "weight", "bias": "bias"}

    def reason(self, module: nn.Module) -> str | None:
        """Why ``module`` cannot be captured exactly (``None``: it can)."""
        return None

    def arrange(self, module: nn.Module, inputs: list[Tensor], grads: list[Tensor] | None) -> tuple[Tensor, Tensor | None]:
        """The recorded inputs (one per call, ``[N, ...]``) and output gradients (one per call,
        ``[K, N, *output.shape[1:]]``) in the family's canonical form."""
        raise NotImplementedError

    def arrange_record(self, record) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(a, g, positions)`` of a :class:`~curvfun.capture.LayerRecord`: :meth:`arrange` of its
        calls, and the positions per group (``None``: all ``T``; a ``[G]`` tensor when groups were
        zero-padded to a common T, see :mod:`curvfun.layers.attention`)."""
        a, g = self.arrange(record.module, record.inputs, record.grads)
        return a, g, None

    def groups(self, module: nn.Module) -> int:
        """Number of independent weight blocks G (affine family)."""
        return getattr(module, "groups", 1)

    def weight_layout(self, module: nn.Module) -> str:
        """``""`` when ``weight.reshape(G, d_out, d_in)`` is the matrix of the canonical form;
        otherwise a layout name understood by :func:`curvfun.layers.affine.weight_as_matrix`."""
        return ""

    def per_sample_grads(self, module: nn.Module, inputs: list[Tensor], grads: list[Tensor],
                         keys: set[str]) -> dict[str, Tensor] | None:
        """Optional fast path: per-sample gradients straight from the record (first column);
        ``None`` to use the family's route through :meth:`arrange`."""
        return None

    def diag_kron_factors(self, module: nn.Module, inputs: list[Tensor], grads: list[Tensor], has_bias: bool):
        """Optional fast path: the diagonal Kronecker factors (:func:`curvfun.diag_kron.diag_kron_factors`,
        same numbers) straight from the record; ``None`` to use the family's route."""
        return None

    def forward_override(self, module: nn.Module) -> Callable | None:
        """Optional: a replacement for ``module.forward`` used while the module is recorded, for
        modules that use their own (or their children's) parameters outside a plain call (see
        :mod:`curvfun.layers.attention`). It receives ``(record, *args, **kwargs)``; for a module
        recorded as several parts (:meth:`parts`), ``{part name: record}`` of the parts being
        recorded (a part whose parameters are all left out of ``params`` has none)."""
        return None

    def parts(self, module: nn.Module) -> tuple[LayerPart, ...]:
        """The layers ``module``'s parameters form (default: one, the module, with :attr:`params`).
        Each part gets its own record (:class:`~curvfun.capture.LayerRecord`, whose ``info.part``
        says which), its own factors and its own entry in the makers."""
        return (LayerPart("", self.params),)

    def role_of(self, attribute: str, module: nn.Module | None = None) -> tuple[str, str] | None:
        """``(part, role)`` of parameter ``attribute`` (of ``module``, whose configuration decides
        the parts; ``None``: the handler's default part), or ``None`` when no part covers it."""
        parts = self.parts(module) if module is not None else (LayerPart("", self.params),)
        return next(((p.name, r) for p in parts for r, a in p.params.items() if a == attribute), None)

    @property
    def name(self) -> str:
        return type(self).__name__


_HANDLERS: dict[type, LayerHandler] = {}


def register_layer(module_class: type, handler: LayerHandler) -> None:
    """Register (or replace) the handler of ``module_class``. Public: a user's own module class
    gets exact curvature from every route once it maps to a family."""
    if not (isinstance(module_class, type) and issubclass(module_class, nn.Module)):
        raise TypeError(f"register_layer needs an nn.Module subclass, got {module_class!r}")
    if not isinstance(handler, LayerHandler):
        raise TypeError(f"register_layer needs a LayerHandler instance, got {type(handler).__name__}")
    if handler.family not in FAMILIES:
        raise ValueError(f"{handler.name}.family is {handler.family!r}; expected one of {FAMILIES}")
    _HANDLERS[module_class] = handler


def unregister_layer(module_class: type) -> None:
    """Remove the handler of ``module_class`` (its modules then take the exact fallback)."""
    _HANDLERS.pop(module_class, None)


def registered_layers() -> dict[type, LayerHandler]:
    """A copy of the registry."""
    return dict(_HANDLERS)


def handler_for(module: nn.Module) -> LayerHandler | None:
    """The handler serving ``module``'s class (see the module docstring), or ``None``."""
    cls = type(module)
    if cls in _HANDLERS:
        return _HANDLERS[cls]
    for base in cls.__mro__[1:]:
        if base in _HANDLERS:
            if cls.forward is not base.forward:
                return None
            return _HANDLERS[base]
    return None
