"""AdaFisher and AdaFisherW: Adam-like steps preconditioned by a diagonal-Kronecker Fisher.

Usage, as in the AdaFisher README (pass the model, not its parameters)::

    optimizer = AdaFisher(model, lr=1e-3)
    for x, t in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), t)
        loss.backward()
        optimizer.step()

The step, per parameter p with gradient g (t counts this parameter's steps):

    m ← β·m + (1 − β)·g,      m̂ = m / (1 − β^t),      p ← p − lr · m̂ / F̃

with F̃ the damped diagonal-Kronecker Fisher of p's layer, ``F̃ = diag(B) ⊗ diag(A) + Lambda``
(:mod:`curvfun.diag_kron`). ``AdaFisher`` adds ``weight_decay·p`` to g (L2, as in the published
code); ``AdaFisherW`` decouples it: ``p ← p − lr·(m̂/F̃ + weight_decay·p)``.

Which pure functions, when:

* on steps ``s`` with ``s % TCov == 0`` (step 0 included) the optimizer's forward hooks are armed:
  during the user's forward each supported layer's input is kept and a tensor hook on its output
  keeps the output gradient of the user's backward; ``step()`` then turns them into
  :class:`~curvfun.layers.LayerData` (:func:`~curvfun.layers.layer_data`), computes
  :func:`~curvfun.diag_kron.diag_kron_factors` (or the layer handler's fast path with the same
  numbers, e.g. Conv2d's without im2col), averages them with
  :func:`~curvfun.diag_kron.update_diag_kron` and caches F̃ (:func:`~curvfun.diag_kron.diag_kron_fisher`);
* on other steps the hooks are removed (no overhead) and F̃ is reused.

The output gradient of a mean-reduced loss is ĝ_n / N; it is multiplied by N (the layer input's
leading dimension) to give curvfun's per-sample convention (``loss_reduction="sum"``: taken as
it is). The Fisher is the empirical one (gradients of the user's loss at the data labels), as in
AdaFisher. A layer called several times in one forward (weight sharing) contributes each call as
extra positions (K-FAC-expand); so does gradient accumulation over several forward/backward
passes before one ``step()``.

Hooks: the optimizer holds forward hooks on the supported layers of ``model`` (and, during a
refresh step's forward, tensor hooks on their outputs). ``remove_hooks()`` takes them off for
good (the last factors stay in use); they are also armed only on refresh steps. While armed
they keep every supported layer's input of each forward run with gradients enabled until the
next ``step()``, so run evaluation forwards under ``torch.no_grad()`` (as usual). Avoid in-place
operations on a layer's input after the layer used it (an error says which layer).

Parameters and layers are matched **by identity** (:func:`curvfun.precondition.assign_modules`):
every layer of the registry (:mod:`curvfun.layers`) whose parameters are ``weight`` / ``bias`` gets F̃:
Linear, convolutions (1-D/2-D/3-D and transposed, any padding), Embedding (no max_norm /
scale_grad_by_freq), LayerNorm, GroupNorm and BatchNorm with affine parameters. Every other trainable parameter (a learnable class token
held by a container module, parameters of unsupported layers, weights tied between layers) gets
the documented **fallback** and is never skipped:

* ``fallback="adam"`` (default): Adam's second moment, ``v ← β₂·v + (1 − β₂)·g²``,
  ``p ← p − lr·m̂ / (sqrt(v / (1 − β₂^t)) + eps)`` (with the same weight decay rule);
* ``fallback="momentum"``: ``p ← p − lr·m̂`` (F̃ = 1, what the published code does for a parameter
  it cannot pair).

A supported layer whose factors do not exist yet (it was not called in a refresh step's
forward) also uses the fallback until they do. ``fallback_parameters`` lists the parameters that
always do, with the reason.

Differences from the published AdaFisher code (read for behaviour only):

* it pairs parameters with layers **by position** in ``model.parameters()``, so one parameter
  outside a supported layer (e.g. a class token) shifts the pairing and trailing layers are
  updated with another layer's F̃ or not at all; curvfun pairs by identity and gives every other
  parameter the fallback above;
* its factor average ``H ← 0.1γ·H + 0.01γ·MinMax(Ĥ)`` is not a convex combination (the weights sum
  to 0.11γ), so the factors shrink to ~0.009 and damping dominates; the default here is
  ``ema="corrected"``, ``ema="paper"`` reproduces the published rule (for Linear and Conv2d
  layers the published step, to rounding in float64);
* its output gradients are those of the mean loss (a factor 1/N² in B, and for Conv2d also 1/T),
  removed by its min-max normalisation but for the 1e-6 that normalisation adds to the range,
  which ``ema="paper"`` adds on that scale too (:func:`~curvfun.diag_kron.update_diag_kron`);
  curvfun uses the K-FAC scaling of :mod:`curvfun.kron` (which the corrected average keeps);
* its BatchNorm factors (``BatchNorm2d`` only; LayerNorm's are built alike) are not those of γ
  and β: A is one 2-vector for the whole layer, [Σ_c (Σ_{n,h,w} x_nchw / (HW)²)², C] / N², from the layer's
  *input* x (not the normalised x̂ that γ multiplies), which min-max turns into {0, 1}, and B is
  the squared batch sum (Σ_{n,h,w} s_nchw)² / N of the output gradients, not a sum of per-sample
  squares; curvfun's are the per-channel diagonal-Kronecker factors above (a 1x1 unit per
  channel: A_c the mean of x̂², B_c the per-sample mean of ĝ², the diagonal of the layer's
  K-FAC block), in every mode;
* ``state_dict()`` here also holds the optimizer's step count, the averaged factors and the EMA
  mode, by layer name, so training resumes exactly;
* ``dist=True`` all-reduces the factors on every step there; here (``torch.distributed``
  initialised, e.g. under ``torchrun``) the new factors are averaged over ranks with one
  coalesced all-reduce on refresh steps only (``s % TCov == 0``), before the moving average, and
  the gradients are averaged in ``step()`` unless the model is wrapped in
  ``DistributedDataParallel`` (which already did). With equal per-rank batches this equals one
  process on the concatenated batch. The model structure is checked across ranks at construction.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from .. import distributed as cfd
from ..capture import LayerRecord, ModuleInfo, layer_kind
from ..diag_kron import (
    EMA_MODES,
    DiagKron,
    diag_kron_factors,
    diag_kron_fisher,
    update_diag_kron,
)
from ..layers import layer_batch_grads, layer_data
from ..precondition.base import UnsupportedModuleWarning, all_finite, assign_modules, unwrap_model

__all__ = ["AdaFisher", "AdaFisherW", "FALLBACKS"]

FALLBACKS = ("adam", "momentum")
_STATE_KEY = "curvfun.adafisher"


def _check_number(name: str, value: Any, ok: Callable[[float], bool], what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"Invalid {name}: {value!r} (expected {what})")
    return float(value)


def _supported_reason(name: str, module: nn.Module) -> str | None:
    if layer_kind(module) is None:
        return f"unsupported layer class {type(module).__name__}"
    own = {n for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    if not own <= {"weight", "bias"}:
        return f"unsupported layer {type(module).__name__} with parameters {sorted(own)} (expected weight/bias)"
    return None


class _AdaFisherBase(torch.optim.Optimizer):
    _decoupled = False

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        beta: float = 0.9,
        Lambda: float = 1e-3,
        gamma: float = 0.8,
        TCov: int = 100,
        weight_decay: float = 0,
        dist: bool = False,
        ema: str = "corrected",
        *,
        fallback: str = "adam",
        fallback_beta2: float = 0.999,
        eps: float = 1e-8,
        loss_reduction: str = "mean",
        params: Iterable | None = None,
    ) -> None:
        cls = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{cls} needs the model (an nn.Module), not its parameters: {cls}(model, lr=...); got "
                f"{type(model).__name__}"
            )
        if dist and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError(
                f"{cls}(dist=True) needs torch.distributed to be initialised first "
                f"(torch.distributed.init_process_group, e.g. under torchrun); use dist=False in one process"
            )
        _check_number("learning rate", lr, lambda v: v >= 0, "lr >= 0")
        _check_number("beta parameter", beta, lambda v: 0 <= v < 1, "0 <= beta < 1")
        _check_number("Lambda", Lambda, lambda v: v > 0, "Lambda > 0: F̃ = diag-Kron + Lambda is divided by")
        _check_number("gamma parameter", gamma, lambda v: 0 <= v < 1, "0 <= gamma < 1")
        _check_number("weight_decay", weight_decay, lambda v: v >= 0, "weight_decay >= 0")
        _check_number("fallback_beta2", fallback_beta2, lambda v: 0 <= v < 1, "0 <= fallback_beta2 < 1")
        _check_number("eps", eps, lambda v: v >= 0, "eps >= 0")
        if isinstance(TCov, bool) or not isinstance(TCov, int) or TCov < 1:
            raise ValueError(f"Invalid TCov parameter: {TCov!r} (expected an int >= 1: steps between factor refreshes)")
        if ema not in EMA_MODES:
            raise ValueError(f"Invalid ema: {ema!r} (expected one of {EMA_MODES})")
        if fallback not in FALLBACKS:
            raise ValueError(f"Invalid fallback: {fallback!r} (expected one of {FALLBACKS})")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"Invalid loss_reduction: {loss_reduction!r} (expected 'mean' or 'sum')")

        self.model = model
        self.Lambda = float(Lambda)
        self.gamma = float(gamma)
        self.TCov = TCov
        self.ema = ema
        self.fallback = fallback
        self.loss_reduction = loss_reduction
        self.dist = bool(dist)
        defaults = dict(lr=lr, beta=beta, weight_decay=weight_decay, fallback_beta2=fallback_beta2, eps=eps)
        super().__init__(model.parameters() if params is None else params, defaults)

        root = unwrap_model(model)
        a = assign_modules(root, None, _supported_reason)
        #: supported layers that get F̃, by name (model order)
        self.preconditioned_modules: dict[str, nn.Module] = a.preconditioned
        self._infos: dict[str, ModuleInfo] = {}
        self._param_layer: dict[int, tuple[str, str]] = {}
        for name, m in a.preconditioned.items():
            keys = {k: f"{name}.{k}" if name else k for k, p in m.named_parameters(recurse=False) if p.requires_grad}
            self._infos[name] = ModuleInfo(name, m, layer_kind(m), keys)
            for k, p in m.named_parameters(recurse=False):
                if p.requires_grad:
                    self._param_layer[id(p)] = (name, k)
        names = {id(p): n for n, p in root.named_parameters()}
        #: parameters that always take the fallback rule, name -> reason
        self.fallback_parameters: dict[str, str] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in self._param_layer:
                    if id(p) not in names:
                        raise ValueError(f"{cls}: a parameter in params is not a parameter of the model")
                    self.fallback_parameters[names[id(p)]] = a.plain_parameters.get(
                        names[id(p)], "frozen in the model" if not p.requires_grad else "not in a supported layer"
                    )

        unsupported = sorted(k for k, r in self.fallback_parameters.items() if r.startswith("unsupported"))
        if unsupported:
            warnings.warn(f"{cls}: no diagonal Kronecker factors for {unsupported} (unsupported layers); they take "
                          f"the fallback rule {fallback!r}. See fallback_parameters for the reasons.",
                          UnsupportedModuleWarning, stacklevel=3)

        self._steps = 0
        self._silent_warned: set[str] = set()
        self._outside_warned: set[str] = set()
        self._factors: dict[str, DiagKron] = {}
        self._ftilde: dict[str, dict[str, Tensor]] = {}
        self._ftilde_lambda = self.Lambda
        self._records: dict[str, list[list]] = {n: [] for n in self._infos}
        self._handles: list = []
        self._hooks_enabled = True
        if self.dist:
            cfd.check_same_structure(
                [cls, [[n, list(p.shape)] for n, p in root.named_parameters()], list(self._infos)],
                f"model structure or preconditioned layers of {cls}",
            )
        self._arm_for_step()

    # --- hooks ------------------------------------------------------------------------------
    def _is_refresh(self, step: int) -> bool:
        return step % self.TCov == 0

    def _make_hook(self, name: str):
        records = self._records[name]

        def forward_hook(module, args, output):
            if not torch.is_grad_enabled() or not isinstance(output, Tensor) or not output.requires_grad:
                return None
            if not args or not isinstance(args[0], Tensor):
                return None
            x = args[0].detach()
            entry = [x, x._version, None]
            records.append(entry)

            def grad_hook(grad):
                entry[2] = grad.detach()

            output.register_hook(grad_hook)
            return None

        return forward_hook

    def _arm(self) -> None:
        if self._handles or not self._hooks_enabled:
            return
        for name, info in self._infos.items():
            self._handles.append(info.module.register_forward_hook(self._make_hook(name)))

    def _disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _arm_for_step(self) -> None:
        if self._is_refresh(self._steps):
            self._arm()
        else:
            self._disarm()
            for r in self._records.values():
                r.clear()

    def remove_hooks(self) -> None:
        """Take the optimizer's hooks off the model for good; the last factors stay in use."""
        self._hooks_enabled = False
        self._disarm()
        for r in self._records.values():
            r.clear()

    # --- factors ----------------------------------------------------------------------------
    def _refresh_factors(self) -> None:
        news: dict[str, DiagKron] = {}
        b_scales: dict[str, float] = {}  # ema="paper": the published B is this B / scale (update_diag_kron)
        for name, entries in self._records.items():
            done = [e for e in entries if e[2] is not None]
            if not done:
                if not entries and name not in self._factors and name not in self._silent_warned:
                    self._silent_warned.add(name)
                    warnings.warn(f"{type(self).__name__}: layer {name!r} was not called through its own forward in "
                                  f"this refresh step (its parameters, if used, are read directly, e.g. by a parent "
                                  f"module); they take the fallback rule {self.fallback!r} until it is",
                                  UserWarning, stacklevel=3)
                continue
            for x, v, _ in done:
                if x._version != v:
                    raise RuntimeError(
                        f"{type(self).__name__}: the input of layer {name!r} was modified in place after the layer "
                        f"used it, so its Kronecker factors would be wrong; make that operation out of place "
                        f"(e.g. nn.ReLU(inplace=False), out = out + y instead of out += y)"
                    )
            info = self._infos[name]
            grads = []
            for x, _, g in done:
                scale = float(x.shape[0]) if self.loss_reduction == "mean" else 1.0
                grads.append((g * scale).unsqueeze(0))
            inputs = [e[0] for e in done]
            if name not in self._outside_warned and not cfd.is_distributed():
                self._name_outside_use(name, info, inputs, [e[2].unsqueeze(0) for e in done])
            fast = info.handler.diag_kron_factors(info.module, inputs, grads, "bias" in info.keys)  # e.g. no im2col
            news[name] = fast if fast is not None else diag_kron_factors(
                layer_data(LayerRecord(info, inputs=inputs, grads=grads), None))
            # the published code's B: output gradients as the loss gives them (not rescaled by N),
            # averaged over the N·T rows: ours / (scale²·T), T positions per sample
            N, scale = done[0][0].shape[0], float(done[0][0].shape[0]) if self.loss_reduction == "mean" else 1.0
            b_scales[name] = scale**2 * sum(g.numel() for _, _, g in done) / (N * news[name].B.numel())
        if self.dist:
            # this refresh's factors averaged over ranks (one coalesced all-reduce, refresh steps only)
            news = cfd.all_reduce_tree_mean(news, "curvature", self._steps)
        for name, new in news.items():
            if not all_finite(tuple(new)):
                warnings.warn(
                    f"{type(self).__name__}: the new factors of layer {name!r} at step {self._steps} are not finite; "
                    f"the previous ones are kept",
                    RuntimeWarning,
                    stacklevel=3,
                )
                continue
            self._factors[name] = update_diag_kron(self._factors.get(name), new, self.gamma, self.ema,
                                                   (1.0, b_scales.get(name, 1.0)))
            self._ftilde.pop(name, None)
        for r in self._records.values():
            r.clear()

    def _name_outside_use(self, name: str, info: ModuleInfo, inputs: list[Tensor], grads: list[Tensor]) -> None:
        """Warn once when a layer's gradient holds more than its recorded calls give (Σ gᵀa from the
        records, :func:`~curvfun.layers.layer_batch_grads`): its parameters are also used elsewhere
        (a tied head ``h @ emb.weight.T``, a weight read directly, a penalty in the loss), which its
        factors, built from its own calls, do not see. One batch gradient per layer on refresh steps."""
        own = layer_batch_grads(layer_data(LayerRecord(info, inputs=inputs, grads=grads), None))
        pairs = {role: (getattr(info.module, info.attrs[role]).grad, g) for role, g in own.items()}
        pairs = {r: (pg, g.to(pg.dtype)) for r, (pg, g) in pairs.items() if pg is not None and not pg.is_sparse}
        scale = sum(float(pg.norm()) ** 2 for pg, _ in pairs.values()) ** 0.5  # the layer's whole gradient
        half = any(t.dtype in (torch.float16, torch.bfloat16) for t in (*inputs, *grads))  # autocast records
        rtol = 3e-2 if half else 1e-4
        for role, (pg, g) in pairs.items():
            if (pg - g).norm() > rtol * (pg.norm() + g.norm()) + 1e-6 * scale + 1e-30:
                self._outside_warned.add(name)
                warnings.warn(f"{type(self).__name__}: the gradient of layer {name!r} holds more than its own calls "
                              f"give (its {info.attrs[role]!r} is also used elsewhere: a tied or directly read "
                              f"weight, or a penalty in the loss); its factors cover its own calls only",
                              UserWarning, stacklevel=4)
                return

    def _ftilde_of(self, name: str) -> dict[str, Tensor] | None:
        if self._ftilde_lambda != self.Lambda:
            self._ftilde.clear()
            self._ftilde_lambda = self.Lambda
        f = self._ftilde.get(name)
        if f is None and name in self._factors:
            info = self._infos[name]
            layout = info.handler.weight_layout(info.module) if info.kind == "affine" else ""
            f = diag_kron_fisher(self._factors[name], info.kind, tuple(info.module.weight.shape), "bias" in info.keys,
                                 self.Lambda, layout)
            self._ftilde[name] = f
        return f

    def fisher_diagonal(self) -> dict[str, dict[str, Tensor]]:
        """The current damped F̃ of every layer that has factors: ``{layer: {"weight", "bias"}}``."""
        return {n: {k: v.clone() for k, v in self._ftilde_of(n).items()} for n in self._factors}

    @property
    def factors(self) -> dict[str, DiagKron]:
        """The averaged ``(diag A, diag B)`` of every layer that has them (copies)."""
        return {n: DiagKron(f.A.clone(), f.B.clone()) for n, f in self._factors.items()}

    # --- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):
        """One AdaFisher step (module docstring). ``closure`` (optional) is re-evaluated with
        gradients enabled first, as in ``torch.optim``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.dist and not cfd.is_ddp(self.model):
            # DDP averages in backward; otherwise one coalesced all-reduce of the gradients here
            cfd.average_gradients((p for g in self.param_groups for p in g["params"]), self._steps)
        if self._is_refresh(self._steps):
            self._refresh_factors()
        for group in self.param_groups:
            self._update_group(group)
        self._steps += 1
        self._arm_for_step()
        return loss

    def _update_group(self, group: dict) -> None:
        lr, beta, wd = group["lr"], group["beta"], group["weight_decay"]
        # buckets: (rule, step) -> lists, so that each bucket is a few foreach calls
        buckets: dict[tuple[str, int], dict[str, list]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            where = self._param_layer.get(id(p))
            F = None
            if where is not None:
                ft = self._ftilde_of(where[0])
                F = None if ft is None else ft.get(where[1])
            rule = "fisher" if F is not None else self.fallback
            if rule == "adam" and "exp_avg_sq" not in state:
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            b = buckets.setdefault((rule, state["step"]), {"p": [], "g": [], "m": [], "F": [], "v": []})
            b["p"].append(p)
            b["g"].append(p.grad)
            b["m"].append(state["exp_avg"])
            if F is not None:
                b["F"].append(F)
            if rule == "adam":
                b["v"].append(state["exp_avg_sq"])
        for (rule, t), b in buckets.items():
            ps, gs, ms = b["p"], b["g"], b["m"]
            if wd != 0 and not self._decoupled:
                gs = torch._foreach_add(gs, ps, alpha=wd)
            torch._foreach_mul_(ms, beta)
            torch._foreach_add_(ms, gs, alpha=1 - beta)
            if wd != 0 and self._decoupled:
                torch._foreach_mul_(ps, 1 - lr * wd)
            step_size = lr / (1 - beta**t)
            if rule == "fisher":
                torch._foreach_addcdiv_(ps, ms, b["F"], value=-step_size)
            elif rule == "adam":
                beta2, eps = group["fallback_beta2"], group["eps"]
                torch._foreach_mul_(b["v"], beta2)
                torch._foreach_addcmul_(b["v"], gs, gs, value=1 - beta2)
                denom = torch._foreach_sqrt(b["v"])
                torch._foreach_div_(denom, math.sqrt(1 - beta2**t))
                torch._foreach_add_(denom, eps)
                torch._foreach_addcdiv_(ps, ms, denom, value=-step_size)
            else:  # momentum: F̃ = 1
                torch._foreach_add_(ps, ms, alpha=-step_size)

    # --- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` state (moments, per-parameter steps, param groups) plus, under
        ``"curvfun.adafisher"``, the step count, the EMA mode and the averaged factors by layer name."""
        sd = super().state_dict()
        sd[_STATE_KEY] = {
            "steps": self._steps,
            "ema": self.ema,
            "layers": list(self._infos),
            "factors": {n: {"A": f.A.clone(), "B": f.B.clone()} for n, f in self._factors.items()},
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; raises ``ValueError`` for a state dict without the
        factors or saved for other layers."""
        state_dict = dict(state_dict)
        extra = state_dict.pop(_STATE_KEY, None)
        if extra is None:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the state dict has no {_STATE_KEY!r} entry (the factors); "
                f"save it with {type(self).__name__}.state_dict()"
            )
        if list(extra["layers"]) != list(self._infos):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: saved for layers {list(extra['layers'])}, but this optimizer "
                f"preconditions {list(self._infos)}"
            )
        if extra["ema"] != self.ema:
            warnings.warn(
                f"loading factors averaged with ema={extra['ema']!r} into an optimizer with ema={self.ema!r}",
                UserWarning,
                stacklevel=2,
            )
        super().load_state_dict(state_dict)
        dev = next((info.module.weight.device for info in self._infos.values()), None)
        self._factors = {
            n: DiagKron(f["A"].detach().clone().to(dev), f["B"].detach().clone().to(dev))
            for n, f in extra["factors"].items()
        }
        self._ftilde = {}
        self._steps = int(extra["steps"])
        for r in self._records.values():
            r.clear()
        self._arm_for_step()


class AdaFisher(_AdaFisherBase):
    """AdaFisher (Gomes et al. 2024) with L2 weight decay; see :mod:`curvfun.optim.adafisher`.

    Args:
        model: the model (its supported layers get hooks; pass the model, not its parameters).
        lr: learning rate. (default: 1e-3)
        beta: first-moment decay β. (default: 0.9)
        Lambda: damping λ > 0 in F̃ = diag(B) ⊗ diag(A) + λ. (default: 1e-3)
        gamma: factor-average coefficient γ in [0, 1). (default: 0.8)
        TCov: steps between factor refreshes (step 0 refreshes). (default: 100)
        weight_decay: L2 coefficient added to the gradient. (default: 0)
        dist: data-parallel under ``torch.distributed`` (must be initialised): factors averaged on
            refresh steps, gradients averaged unless the model is DDP-wrapped. (default: False)
        ema: ``"corrected"`` (convex average) or ``"paper"`` (published rule). (default: "corrected")
        fallback: rule for parameters without F̃, ``"adam"`` or ``"momentum"``. (default: "adam")
        fallback_beta2, eps: the Adam fallback's β₂ and ε. (defaults: 0.999, 1e-8)
        loss_reduction: ``"mean"`` (output gradients are rescaled by N) or ``"sum"``. (default: "mean")
        params: parameters or param groups to optimize (default: ``model.parameters()``).

    Cost per step: a few elementwise passes over the parameters (like Adam, with one cached F̃
    tensor per parameter); a refresh step adds one pass over each layer's inputs and output
    gradients (im2col for Conv2d).
    """

    _decoupled = False


class AdaFisherW(_AdaFisherBase):
    """AdaFisherW: AdaFisher with decoupled weight decay, ``p ← p − lr·(m̂/F̃ + weight_decay·p)``.
    Arguments as for :class:`AdaFisher`."""

    _decoupled = True
