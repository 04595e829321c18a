"""Layer inputs and output-gradients of every supported module, in one pass.

The zero-perturbation trick (kfac-jax's tracer): during a single forward call each supported
module's output ``z`` is replaced by ``z + ε`` with ``ε = 0``; the gradient of the summed
per-sample losses with respect to ``ε`` is then the per-sample output-gradient
``ĝ_n = ∂ℓ_n/∂z_n`` (sample n's loss depends on sample n's outputs only), and the module's
input ``a`` is read on the way. The forward hooks that do this exist only for the duration
of the call (removed in ``finally``), so nothing is left on the model.

Output-gradient "columns". Curvature needs output-gradients for cotangents other than the
data loss's: ``fisher_type``

* ``"emp"``  : one column, the gradient of the data loss (K = 1, weight 1);
* ``"mc"``   : ``n_mc_samples`` columns, the gradients of the NLL at targets drawn from the
  model's predictive distribution (weight 1/M each);
* ``"exact"``: one column per (output position, Hessian-square-root column): the cotangent
  ``S[n, t, :, k]`` placed at position t (weight 1). Cost: positions·K backward passes
  (batched with ``is_grads_batched`` where the model allows).
* ``"none"``  : forward only (inputs, no gradients).

With these weights every Fisher-type quantity is ``Σ_k w_k (…)`` over columns.

A module called several times in one forward (weight sharing) gets one record per call; the
consumers treat the calls as extra positions (K-FAC-expand) and sum their contributions to
per-sample gradients.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterator, Mapping

import torch
from torch import Tensor, nn

from .functional import as_tuple, call_model, check_params
from .layers.registry import LayerHandler, handler_for, part_name, registered_layers
from .losses import Likelihood, get_likelihood

__all__ = [
    "SUPPORTED_LAYERS",
    "LayerRecord",
    "Capture",
    "layer_kind",
    "supported_modules",
    "record_layers",
    "output_grad_columns",
    "capture",
    "FISHER_TYPES",
    "CaptureFallbackWarning",
    "parameter_uses_outside",
    "override_parents",
]

FISHER_TYPES = ("exact", "mc", "emp")


class CaptureFallbackWarning(UserWarning):
    """Parameters of a registered layer that the capture cannot account for (used outside the
    layer's own forward, or a call the handler could not record): they are treated as
    unsupported (the exact fallback where the route has one)."""

#: the built-in layer types (see :func:`curvfun.layers.registered_layers` for the live registry)
SUPPORTED_LAYERS = tuple(registered_layers())


def layer_kind(module: nn.Module) -> str | None:
    """The family of ``module``'s registered handler (``'affine' | 'embedding' | 'norm'``), or
    ``None`` when no handler serves it or its configuration cannot be captured."""
    h = handler_for(module)
    if h is None or h.reason(module) is not None:
        return None
    return h.family


def _unsupported_reason(module: nn.Module) -> str:
    h = handler_for(module)
    why = None if h is None else h.reason(module)
    return why or type(module).__name__


@dataclass
class ModuleInfo:
    """One layer the capture records: ``name`` (the module's, or ``"<module>.<part>"`` for a part of
    a module holding several layers, see :class:`~curvfun.layers.LayerPart`), the module, ``kind``
    (its handler's family), ``keys``: where its parameters sit in ``params`` by role
    (``{"weight": key, "bias": key}``), ``handler`` (looked up when omitted), ``part`` (``""``: the
    whole module) and ``attrs``: role -> the module's attribute (the part's, by default)."""

    name: str
    module: nn.Module
    kind: str
    keys: dict[str, str]
    handler: LayerHandler | None = None
    part: str = ""
    attrs: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        if self.handler is None:
            self.handler = handler_for(self.module)
            if self.handler is None:
                raise ValueError(f"module {self.name!r} ({type(self.module).__name__}) has no registered layer handler")
        if self.attrs is None:
            part = next((p for p in self.handler.parts(self.module) if p.name == self.part), None)
            if part is None:
                raise ValueError(f"{self.handler.name} has no part {self.part!r} for module {self.name!r}")
            self.attrs = dict(part.params)


def supported_modules(
    model: nn.Module, params: Mapping[str, Tensor]
) -> tuple[dict[str, ModuleInfo], dict[str, tuple[str, list[str]]]]:
    """Split the modules owning entries of ``params`` into supported / unsupported.

    Parameters are matched to modules by identity (tied weights included), never by
    position. A module is supported when the layer registry has a handler for it that can capture
    its configuration and covers every parameter it owns. Returns ``(supported, unsupported)``:
    ``supported`` by layer name (the module's, or ``"<module>.<part>"`` for each part of a module
    holding several layers), ``unsupported[module name] = (reason, [param keys])``; a parameter held
    directly by the root module is reported under ``""``.
    """
    keys_by_id: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        keys_by_id.setdefault(id(p), []).append(pname)
    wanted = set(params)
    supported: dict[str, ModuleInfo] = {}
    unsupported: dict[str, tuple[str, list[str]]] = {}
    for mname, module in model.named_modules():
        own = {}
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            key = full if full in wanted else next((k for k in keys_by_id.get(id(p), []) if k in wanted), None)
            if key is not None:
                own[pname] = key
        if not own:
            continue
        h = handler_for(module)
        if h is None or h.reason(module) is not None:
            unsupported[mname] = (_unsupported_reason(module), sorted(own.values()))
            continue
        parts = h.parts(module)
        attrs = [a for part in parts for a in part.params.values()]
        if len(attrs) != len(set(attrs)):
            raise ValueError(f"{h.name}.parts({type(module).__name__}) puts a parameter in several parts "
                             f"({sorted({a for a in attrs if attrs.count(a) > 1})}); each belongs to exactly one")
        found = {pname: h.role_of(pname, module) for pname in own}
        if None in found.values():
            stray = sorted(k for k, v in found.items() if v is None)
            unsupported[mname] = (f"{type(module).__name__} with parameters {stray} its handler "
                                  f"{h.name} does not cover", sorted(own.values()))
            continue
        for part in parts:
            keys = {role: own[pname] for pname, (pn, role) in found.items() if pn == part.name}
            if keys:
                name = part_name(mname, part.name)
                supported[name] = ModuleInfo(name, module, h.family, keys, h, part.name, dict(part.params))
    return supported, unsupported


@dataclass
class LayerRecord:
    """What one supported module saw during the captured call.

    ``inputs[c]``: the module's input at its c-th call, ``[N, ...]`` (token ids for
    Embedding). ``grads[c]``: output-gradients for every column, ``[K, N, *output.shape[1:]]``
    (``None`` for ``fisher_type="none"``). ``uncaptured``: why a call could not be recorded
    (its parameters then take the exact fallback), or ``None``.
    """

    info: ModuleInfo
    inputs: list[Tensor] = field(default_factory=list)
    eps: list[Tensor] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    grads: list[Tensor] | None = None
    #: per call: whether the module's own parameters were detached during it (see :func:`record_layers`)
    detached_calls: list[bool] = field(default_factory=list)
    uncaptured: str | None = None
    #: how the handler recorded its calls, where it has several ways (attention: "self" / "cross")
    mode: str | None = None
    perturb: bool = True
    _detached_now: bool = False

    @property
    def detached(self) -> bool:
        """Whether any call ran with the module's own parameters detached."""
        return any(self.detached_calls)

    @property
    def module(self) -> nn.Module:
        return self.info.module

    @property
    def kind(self) -> str:
        return self.info.kind

    def add_call(self, x: Tensor, output: Tensor) -> Tensor:
        """Record one call: its input ``x`` (detached) and, when perturbing, a zero leaf ε added to
        ``output`` (returned). Handlers' forward overrides call this for their affine maps."""
        x = x.detach()
        self.inputs.append(x)
        self.versions.append(x._version)
        self.detached_calls.append(self._detached_now)
        if not self.perturb:
            return output
        if not isinstance(output, Tensor):
            raise TypeError(f"module {self.info.name!r} returned {type(output).__name__}, expected a tensor")
        # a zero leaf broadcast from one element: nothing to fill, the add reads it at stride 0
        eps = output.new_zeros(()).expand(output.shape).requires_grad_()
        self.eps.append(eps)
        return output + eps

    def not_captured(self, reason: str) -> None:
        """Mark a call the handler could not record (see ``uncaptured``)."""
        self.uncaptured = reason


@dataclass
class Capture:
    """Result of :func:`capture`: per-module records plus the column weights ``w_k``."""

    layers: dict[str, LayerRecord]
    weights: Tensor
    output: Tensor
    losses: Tensor | None
    batch_size: int
    fisher_type: str
    unsupported: dict[str, tuple[str, list[str]]]


class _ParameterTap(torch.autograd.Function):
    """The identity on a parameter: its backward node marks a use inside a recorded call (see
    :func:`parameter_uses_outside`)."""

    @staticmethod
    def forward(ctx, p: Tensor) -> Tensor:
        return p.view_as(p)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g


def parameter_uses_outside(records: Mapping[str, LayerRecord], roots: Collection[Any]) -> dict[str, list[str]]:
    """The layers whose parameters reach ``roots`` (the loss, the output) other than through their
    recorded calls, with the attributes used so: a tied embedding read as ``h @ E.T``, a weight
    read directly or penalised in the loss. The calls must have been recorded with ``tap=True``
    or detached (:func:`record_layers`): every in-call use is then a tap node (or no node at all),
    any other node that reads the parameter is an outside use. One walk over the autograd graph,
    O(nodes)."""
    watch: dict[int, list[tuple[str, str]]] = {}
    for name, rec in records.items():
        for attr in rec.info.attrs.values():
            p = rec.module._parameters.get(attr)
            if p is not None:
                watch.setdefault(id(p), []).append((name, attr))
    bad: dict[str, set[str]] = {}
    stack = [r.grad_fn for r in roots if isinstance(r, Tensor) and r.grad_fn is not None]
    seen = set()
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        tap = isinstance(fn, _ParameterTap._backward_cls)
        for nf, _ in fn.next_functions:
            if nf is None:
                continue
            var = getattr(nf, "variable", None)
            if var is None:
                stack.append(nf)
            elif not tap:
                for name, attr in watch.get(id(var), ()):
                    bad.setdefault(name, set()).add(attr)
    return {name: sorted(attrs) for name, attrs in bad.items()}


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are active (non-reentrant activation checkpointing, offloading):
    such a region may re-run its forward during backward, without our hooks."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


def override_parents(model: nn.Module, infos: Mapping[str, ModuleInfo]) -> dict[str, nn.Module]:
    """The modules with a handler's forward override that have no record themselves but hold a
    recorded layer: their override must run while recording, or that layer is never called (a
    MultiheadAttention whose own parameters are left out reads ``out_proj``'s weight directly)."""
    recorded = {id(info.module) for info in infos.values()}
    out = {}
    for name, m in model.named_modules():
        if id(m) in recorded:
            continue
        h = handler_for(m)
        if h is None or type(h).forward_override is LayerHandler.forward_override or h.reason(m) is not None:
            continue
        if any(id(c) in recorded for c in m.modules()):
            out[name] = m
    return out


@contextlib.contextmanager
def record_layers(infos: Mapping[str, ModuleInfo], perturb: bool = True,
                  detach: Collection[str] | Callable[[str, Tensor], bool] = (),
                  tap: bool = False, only_detached: bool = False,
                  parents: Mapping[str, nn.Module] | None = None) -> Iterator[dict[str, LayerRecord]]:
    """Temporarily hook ``infos``' modules: record inputs (the first positional argument, or the
    ``input=`` keyword) and add a zero ``ε`` (a leaf that requires grad) to each output. Works for
    any forward (plain ``model(x)`` or ``functional_call``); the hooks are removed on exit,
    whatever happens.

    ``detach``: names of modules (or a predicate ``(name, input) -> bool`` asked at each call)
    whose own ``weight`` / ``bias`` are swapped for detached views during their calls (and restored
    right after, or on exit); ``LayerRecord.detached_calls`` says which calls were. Autograd then
    sees those parameters only where they are used *outside* such calls: the module's own part of
    their gradient is left to the caller (gᵀa from the recorded rows of those calls), which saves
    its weight-gradient GEMM, and what autograd still accumulates is exactly the rest. A call inside
    a region with saved-tensor hooks (non-reentrant activation checkpointing re-runs it during
    backward, without these hooks) is never detached.

    ``tap=True``: during every other call the module's parameters are read through an identity
    node (:class:`_ParameterTap`; gradients unchanged), so that :func:`parameter_uses_outside` can
    tell the uses inside the recorded calls from all others. ``only_detached=True``: only the
    detached calls are recorded (and perturbed), for a pass that needs their rows and nothing else.
    ``parents``: modules whose forward override runs with no record of their own
    (:func:`override_parents`)."""
    wants = detach if callable(detach) else (lambda name, x, names=frozenset(detach): name in names)
    records = {name: LayerRecord(info, perturb=perturb) for name, info in infos.items()}
    handles = []
    swapped: dict[str, dict[str, Tensor]] = {}
    overridden: list[nn.Module] = []

    def first_input(args, kwargs):
        return args[0] if args else kwargs.get("input", kwargs.get("query"))

    def restore(name: str) -> None:
        module = records[name].module
        for key, p in swapped.pop(name, {}).items():
            module._parameters[key] = p

    def make_pre_hook(rec: LayerRecord):
        def pre_hook(module, args, kwargs):
            x = first_input(args, kwargs)
            now = isinstance(x, Tensor) and wants(rec.info.name, x) and not _saved_tensor_hooks_active()
            rec._detached_now = now
            if not (now or tap):
                return
            own = {k: module._parameters[k] for k in rec.info.attrs.values() if module._parameters.get(k) is not None}
            swapped[rec.info.name] = own
            for k, p in own.items():
                module._parameters[k] = p.detach() if now else _ParameterTap.apply(p)

        return pre_hook

    def make_hook(rec: LayerRecord, recorded_by_forward: bool):
        def hook(module, args, kwargs, output):
            restore(rec.info.name)
            if recorded_by_forward:
                rec._detached_now = False
                return None
            if only_detached and not rec._detached_now:
                return None
            x = first_input(args, kwargs)
            if not isinstance(x, Tensor):
                raise TypeError(f"module {rec.info.name!r} was called without a tensor as its input (first "
                                f"positional argument or input=)")
            out = rec.add_call(x, output)
            rec._detached_now = False
            return out if perturb else None

        return hook

    try:
        by_module: dict[int, list[LayerRecord]] = {}
        for rec in records.values():
            by_module.setdefault(id(rec.module), []).append(rec)
        for recs in by_module.values():
            module = recs[0].module
            override = recs[0].info.handler.forward_override(module)
            if override is not None:  # a module holding several parts records them all in its forward
                single = len(recs) == 1 and recs[0].info.part == ""
                module.forward = functools.partial(override, recs[0] if single else {r.info.part: r for r in recs})
                overridden.append(module)
            for rec in recs:
                if tap or callable(detach) or rec.info.name in detach:
                    handles.append(module.register_forward_pre_hook(make_pre_hook(rec), with_kwargs=True))
                handles.append(module.register_forward_hook(make_hook(rec, override is not None), with_kwargs=True))
        for module in (parents or {}).values():
            override = handler_for(module).forward_override(module)
            if override is not None and module not in overridden:
                module.forward = functools.partial(override, {})
                overridden.append(module)
        yield records
    finally:
        for h in handles:
            h.remove()
        for module in overridden:
            del module.forward
        for name in list(swapped):  # a call that raised between the two hooks
            restore(name)


def _check_versions(records: Mapping[str, LayerRecord]) -> None:
    for name, rec in records.items():
        for x, v in zip(rec.inputs, rec.versions):
            if x._version != v:
                raise RuntimeError(
                    f"the input of module {name!r} was modified in place after the module used it; its "
                    f"Kronecker factors would be wrong. Make that operation out of place."
                )


def unbatched_records(records: Mapping[str, LayerRecord], batch_size: int) -> dict[str, str]:
    """Records whose inputs or outputs lack the leading batch dimension (e.g. a position
    embedding called on ``arange(T)`` and broadcast over the batch): their per-sample output
    gradients cannot be read from the capture (the batch is already summed), so they must be
    left out. Returns ``{name: reason}``."""
    bad = {}
    for name, rec in records.items():
        shapes = [tuple(x.shape) for x in rec.inputs] + [tuple(e.shape) for e in rec.eps]
        if any(len(sh) == 0 or sh[0] != batch_size for sh in shapes):
            bad[name] = (
                f"called on a tensor without the batch dimension (shapes {shapes[:2]}, batch size {batch_size}); "
                f"its per-sample curvature cannot be captured"
            )
    return bad


def reachable_leaves(output: Tensor) -> set[int]:
    """ids of the leaf tensors ``output`` depends on (a walk over its autograd graph, O(nodes))."""
    seen, found = set(), set()
    stack = [output.grad_fn] if output.grad_fn is not None else []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None:
            found.add(id(var))
        stack.extend(f for f, _ in fn.next_functions)
    return found


def outside_uses(records: Mapping[str, LayerRecord], leaves: Mapping[str, Tensor], output: Tensor) -> dict[str, str]:
    """Modules whose parameters the output depends on *other than* through the recorded calls
    (each call ran on detached views: see :func:`record_layers`), or whose calls could not be
    recorded. Such a parameter (MHA's ``out_proj`` read by ``F.multi_head_attention_forward``, a
    tied embedding used as ``x @ E.T``, a weight penalised or read directly) would get only part
    of its curvature from the capture. Returns ``{name: reason}``."""
    reach = reachable_leaves(output) if output.requires_grad else set()
    bad = {}
    for name, rec in records.items():
        if rec.uncaptured is not None:
            bad[name] = rec.uncaptured
            continue
        used = sorted(k for k in rec.info.keys.values() if id(leaves[k]) in reach)
        if used:
            bad[name] = (f"parameter(s) {used} used outside the module's own forward (read directly, or by "
                         f"another module); exact fallback")
    return bad


def _batched_backward(output: Tensor, leaves: list[Tensor], cotangents: Tensor, retain: bool) -> list[Tensor]:
    """``[K, *leaf.shape]`` vector-Jacobian products for a batch of K output cotangents."""
    K = cotangents.shape[0]
    if K == 1:
        gs = torch.autograd.grad(output, leaves, cotangents[0], retain_graph=retain, allow_unused=True)
        return [torch.zeros_like(l).unsqueeze(0) if g is None else g.unsqueeze(0) for g, l in zip(gs, leaves)]
    if output.device.type != "cpu":  # on the CPU a vmapped convolution backward is ~2x slower than a loop
        try:
            gs = torch.autograd.grad(
                output, leaves, cotangents, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
            return [torch.zeros(K, *l.shape, dtype=l.dtype, device=l.device) if g is None else g
                    for g, l in zip(gs, leaves)]
        except RuntimeError:  # an op without a batching rule: loop instead
            pass
    cols = [
        torch.autograd.grad(output, leaves, cotangents[k], retain_graph=retain or k + 1 < K, allow_unused=True)
        for k in range(K)
    ]
    return [torch.stack([c[i] if c[i] is not None else torch.zeros_like(leaves[i]) for c in cols])
            for i in range(len(leaves))]


def output_grad_columns(
    output: Tensor,
    likelihood: Likelihood,
    fisher_type: str,
    targets: Tensor | None,
    n_mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Cotangents on the model output for each column, ``[K, *output.shape]``, and their
    weights ``[K]`` (see the module docstring)."""
    out = likelihood.canonical_output(output)
    if fisher_type == "emp":
        if targets is None:
            raise ValueError("fisher_type='emp' needs the data targets")
        with torch.enable_grad():
            o = out.detach().requires_grad_(True)
            losses = likelihood.per_sample(o, targets)
            (r,) = torch.autograd.grad(losses.sum(), o)
        return r.reshape(1, *output.shape), torch.ones(1, dtype=out.dtype, device=out.device)
    if fisher_type == "mc":
        if n_mc_samples < 1:
            raise ValueError(f"n_mc_samples must be at least 1, got {n_mc_samples}")
        ys = likelihood.sample(out, n_mc_samples, generator)
        mask = None
        if targets is not None and hasattr(likelihood, "mask"):
            mask = likelihood.mask(targets)
            ys = torch.where(mask, ys, torch.full_like(ys, likelihood.ignore_index))
        cols = []
        with torch.enable_grad():
            for m in range(n_mc_samples):
                o = out.detach().requires_grad_(True)
                (r,) = torch.autograd.grad(likelihood.nll(o, ys[m]).sum(), o)
                cols.append(r)
        w = torch.full((n_mc_samples,), 1.0 / n_mc_samples, dtype=out.dtype, device=out.device)
        return torch.stack(cols).reshape(n_mc_samples, *output.shape), w
    if fisher_type == "exact":
        S = likelihood.hessian_sqrt(out, targets)  # [N, *pos, C, K]
        N, C, K = out.shape[0], out.shape[-1], S.shape[-1]
        S = S.reshape(N, -1, C, K)
        T = S.shape[1]
        V = torch.zeros(T, K, N, T, C, dtype=S.dtype, device=S.device)
        idx = torch.arange(T, device=S.device)
        V[idx, :, :, idx, :] = S.permute(1, 3, 0, 2)
        V = V.reshape(T * K, *output.shape)
        return V, torch.ones(T * K, dtype=out.dtype, device=out.device)
    raise ValueError(f"unknown fisher_type {fisher_type!r}; expected one of {FISHER_TYPES}")


#: the message for a batch of 0 samples (``who``: the caller)
EMPTY_BATCH = (
    "{who} got an empty batch (0 samples); every gradient and curvature is a mean over the samples: pass at "
    "least one sample (skip empty batches, e.g. DataLoader(..., drop_last=True))"
)


def check_batch(inputs: Any, targets: Tensor | None) -> int:
    """Batch size N of ``inputs`` (first tensor's leading dim; tuples and dicts of tensors are
    searched as pytrees), checked against ``targets``."""
    import optree

    first = next((t for t in optree.tree_leaves(as_tuple(inputs)) if isinstance(t, Tensor)), None)
    if first is None or first.ndim == 0:
        raise ValueError("inputs must be a tensor (or a tuple of tensors) with a leading batch dimension")
    N = first.shape[0]
    if N == 0:
        raise ValueError(EMPTY_BATCH.format(who="curvfun"))
    if targets is not None:
        if not isinstance(targets, Tensor):
            raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
        if targets.ndim == 0 or targets.shape[0] != N:
            got = "a scalar" if targets.ndim == 0 else f"{targets.shape[0]} samples"
            raise ValueError(f"batch sizes differ: inputs have {N} samples, targets {got}")
    return N


@torch.compiler.disable  # module hooks, parameter swaps and the autograd-graph walk: eager only
def capture(
    model: nn.Module,
    params: Mapping[str, Tensor],
    inputs: Any,
    targets: Tensor | None = None,
    loss: Any = "cross_entropy",
    fisher_type: str = "emp",
    n_mc_samples: int = 1,
    generator: torch.Generator | None = None,
    on_unsupported: str = "ignore",
    columns: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
) -> Capture:
    """One forward pass (+ backward for the requested columns) recording every supported
    module's inputs and per-sample output-gradients.

    Pure: parameters are detached copies' views, buffers are cloned, hooks are removed.
    ``on_unsupported``: ``"ignore"`` | ``"warn"`` | ``"raise"`` for modules that own entries
    of ``params`` but that no registered handler captures (:mod:`curvfun.layers`; their parameters get no
    record). Cost: one forward, plus one backward per column (see module docstring), with
    no parameter-gradient work. ``columns``: ``output -> (cotangents [K, *output.shape], weights
    [K])`` used instead of ``fisher_type``'s columns (e.g. one per output entry for Jacobians).
    Under ``torch.compile`` it runs eagerly (one graph break per call: its hooks mutate modules
    and it walks the autograd graph); the math on what it recorded compiles whole.
    """
    if fisher_type not in FISHER_TYPES + ("none",):
        raise ValueError(f"unknown fisher_type {fisher_type!r}; expected one of {FISHER_TYPES}")
    params = check_params(model, params)
    N = check_batch(inputs, targets)
    lik = get_likelihood(loss)
    infos, unsupported = supported_modules(model, params)
    if unsupported and on_unsupported != "ignore":
        msg = "no curvature support for: " + ", ".join(
            f"{n or '<root>'} ({cls}: {keys})" for n, (cls, keys) in unsupported.items()
        )
        if on_unsupported == "raise":
            raise ValueError(msg + "; exclude their parameters from params")
        warnings.warn(msg + "; their parameters are left out", stacklevel=2)
    watched = {key for info in infos.values() for key in info.keys.values()}
    leaves_in = {k: v.detach().requires_grad_(k in watched) for k, v in params.items()}
    with torch.enable_grad():
        with record_layers(infos, perturb=fisher_type != "none", detach=set(infos),
                           parents=override_parents(model, infos)) as records:
            output = call_model(model, leaves_in, inputs)
        if not isinstance(output, Tensor):
            raise TypeError(f"the model returned {type(output).__name__}; curvfun needs a tensor output")
        outside = outside_uses(records, leaves_in, output)
        if outside:
            warnings.warn("not captured through their layer: " + "; ".join(
                f"{n} ({why})" for n, why in outside.items()), CaptureFallbackWarning, stacklevel=2)
        for name, why in {**unbatched_records(records, N), **outside}.items():
            records.pop(name)
            unsupported[name] = (f"{type(infos[name].module).__name__} {why}", sorted(infos[name].keys.values()))
        losses = None
        if fisher_type != "none":
            if targets is not None:
                lik.check(output, targets)
            if fisher_type == "emp":
                losses = lik.per_sample(output, targets) if targets is not None else None
            if columns is not None:
                cot, weights = columns(output.detach())
            else:
                cot, weights = output_grad_columns(output, lik, fisher_type, targets, n_mc_samples, generator)
            names = [n for n, r in records.items() for _ in r.eps]
            leaves = [e for r in records.values() for e in r.eps]
            for rec in records.values():
                rec.grads = []
            if leaves:
                gs = _batched_backward(output, leaves, cot, retain=False)
                for n, g in zip(names, gs):
                    records[n].grads.append(g)
        else:
            weights = torch.ones(0)
    _check_versions(records)
    # drop modules that were never called (e.g. defined but unused)
    records = {n: r for n, r in records.items() if r.inputs}
    return Capture(records, weights, output.detach(), None if losses is None else losses.detach(), N, fisher_type, unsupported)
