"""Which layers a maker preconditions: pure functions of the model and ``ignore_modules``, and the
signature that tells when the model changed."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from torch import nn

from ..layers.registry import LayerPart, handler_for, part_name

__all__ = ["unwrap_model", "ModuleAssignment", "assign_modules", "PartSplit", "split_parts", "model_structure_signature",
           "describe_structure_change"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (else ``model``)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


class ModuleAssignment(NamedTuple):
    """Which layers a maker preconditions, by name (names as in ``named_modules()``).

    ``preconditioned``: name -> module, in model order. ``plain``: name -> reason, for layers with
    trainable parameters that keep the plain gradient. ``plain_parameters``: parameter name ->
    reason for trainable parameters outside any preconditioned layer (the parameters of ``plain``
    layers, and parameters held directly by container modules). ``unmatched_ignores``: the
    ``ignore_modules`` entries that matched no module.
    """

    preconditioned: dict[str, nn.Module]
    plain: dict[str, str]
    plain_parameters: dict[str, str]
    unmatched_ignores: list[Any]


def _ignore_reason(name: str, chain: list[nn.Module], entries: list[Any], used: set[int]) -> str | None:
    """The ignore entry matching module ``name`` (``chain``: its ancestors and itself)."""
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            if entry in name:
                used.add(i)
                return f"ignored by config: name contains {entry!r}"
        elif isinstance(entry, type):
            if any(isinstance(m, entry) for m in chain):
                used.add(i)
                return f"ignored by config: class {entry.__name__}"
        elif any(m is entry for m in chain):
            used.add(i)
            return f"ignored by config: instance {type(entry).__name__}"
    return None


def assign_modules(
    model: nn.Module,
    ignore_modules: list[Any] | None = None,
    is_supported: Callable[[str, nn.Module], str | None] | None = None,
) -> ModuleAssignment:
    """Split the layers of ``model`` into preconditioned and plain ones (pure).

    A *layer* is a module with at least one parameter that requires grad that is a leaf or has a
    registered handler (MultiheadAttention holds ``out_proj`` and is a layer). A layer keeps the
    plain gradient when (in this order) it matches ``ignore_modules`` (an instance, a class, or a
    substring of its dotted name; an ignored container instance/class covers the layers inside it),
    when ``is_supported(name, module)`` returns a reason string (None means supported), or when
    one of its parameters also belongs to another layer (tied weights; the match is by identity).
    """
    model = unwrap_model(model)
    entries = list(ignore_modules) if ignore_modules is not None else []
    used: set[int] = set()
    named = dict(model.named_modules())
    owners: dict[int, list[str]] = {}
    layers: list[str] = []
    for name, module in named.items():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            # still mark matches, so that ignoring e.g. nn.ReLU is not reported as unmatched
            parts = name.split(".") if name else []
            chain = [named[".".join(parts[:k])] for k in range(len(parts) + 1) if ".".join(parts[:k]) in named]
            _ignore_reason(name, chain, entries, used)
            continue
        for p in own:
            owners.setdefault(id(p), []).append(name)
        layers.append(name)

    preconditioned: dict[str, nn.Module] = {}
    plain: dict[str, str] = {}
    plain_parameters: dict[str, str] = {}
    for name in layers:
        module = named[name]
        parts = name.split(".") if name else []
        chain = [named[".".join(parts[:k])] for k in range(len(parts) + 1) if ".".join(parts[:k]) in named]
        reason = None
        if len(list(module.children())) > 0 and handler_for(module) is None:
            reason = f"parameters held directly by container module {type(module).__name__} (not a leaf layer)"
        if reason is None:
            reason = _ignore_reason(name, chain, entries, used)
        if reason is None and is_supported is not None:
            reason = is_supported(name, module)
        if reason is None:
            for p in module.parameters(recurse=False):
                others = [o for o in owners.get(id(p), []) if o != name]
                if others:
                    reason = f"parameter shared with {others[0]!r} (tied weights)"
                    break
        if reason is None:
            preconditioned[name] = module
        else:
            plain[name or "<root>"] = reason
            prefix = f"{name}." if name else ""
            for pname, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    plain_parameters[prefix + pname] = reason
    unmatched = [e for i, e in enumerate(entries) if i not in used]
    return ModuleAssignment(preconditioned, plain, plain_parameters, unmatched)




class PartSplit(NamedTuple):
    """:func:`split_parts`' result: ``layers`` (name -> module, parts replacing their module),
    ``parts`` (part layer name -> :class:`~curvfun.layers.LayerPart`), ``ignored`` (part layer name ->
    ``(reason, [parameter names])`` for parts an ``ignore_modules`` string names) and ``matched``
    (those strings)."""

    layers: dict[str, nn.Module]
    parts: dict[str, LayerPart]
    ignored: dict[str, tuple[str, list[str]]]
    matched: list[str]


def split_parts(preconditioned: dict[str, nn.Module], ignore_modules: list[Any] | None = None) -> PartSplit:
    """The layers of ``preconditioned`` with every module its handler splits into several parts
    (:meth:`~curvfun.layers.LayerHandler.parts`: MultiheadAttention with separate q/k/v weights)
    replaced by its parts that hold a trainable parameter, named ``"<module>.<part>"`` (pure). A
    part whose name contains a string entry of ``ignore_modules`` (``"q_proj"``) is left out, with
    its reason in ``ignored``."""
    strings = [e for e in (ignore_modules or []) if isinstance(e, str)]
    layers: dict[str, nn.Module] = {}
    parts: dict[str, LayerPart] = {}
    ignored: dict[str, tuple[str, list[str]]] = {}
    matched: list[str] = []
    for name, module in preconditioned.items():
        h = handler_for(module)
        split = h.parts(module) if h is not None and h.reason(module) is None else ()
        if len(split) < 2:
            layers[name] = module
            continue
        for part in split:
            if any(getattr(module, a, None) is not None and getattr(module, a).requires_grad
                   for a in part.params.values()):
                pname = part_name(name, part.name)
                entry = next((e for e in strings if e in pname), None)
                if entry is not None:
                    owned = [f"{name}.{a}" if name else a for a in part.params.values()
                             if getattr(module, a, None) is not None and getattr(module, a).requires_grad]
                    ignored[pname] = (f"ignored by config: name contains {entry!r}", owned)
                    matched += [entry] if entry not in matched else []
                    continue
                layers[pname], parts[pname] = module, part
    return PartSplit(layers, parts, ignored, matched)


def model_structure_signature(model: nn.Module) -> tuple:
    """Which modules hold which parameters, and which are trainable: compared each step to
    detect a changed model. O(#modules + #parameters), no tensor work."""
    return tuple(
        (name, id(m), tuple((k, id(p), p.requires_grad) for k, p in m.named_parameters(recurse=False)))
        for name, m in unwrap_model(model).named_modules()
    )


def describe_structure_change(old: tuple, new: tuple) -> str:
    """The modules added / removed / replaced and the parameters frozen / unfrozen, in words."""
    before, after = {n: (i, ps) for n, i, ps in old}, {n: (i, ps) for n, i, ps in new}
    parts = []
    added = [n for n in after if n not in before]
    removed = [n for n in before if n not in after]
    replaced = [n for n in after if n in before and after[n][0] != before[n][0]]
    frozen, unfrozen = [], []
    for n in after:
        if n in before and n not in replaced:
            was = {k: g for k, _, g in before[n][1]}
            for k, _, g in after[n][1]:
                if k in was and was[k] != g:
                    (unfrozen if g else frozen).append(f"{n}.{k}" if n else k)
    for what, names in (("added", added), ("removed", removed), ("replaced", replaced), ("frozen", frozen),
                        ("unfrozen", unfrozen)):
        if names:
            parts.append(f"{what}: {names}")
    return "; ".join(parts) or "parameters re-registered"
