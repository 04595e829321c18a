"""AdaHessian (Yao et al. 2021): Adam with a Hutchinson estimate of the Hessian diagonal.

Usage (the gradient's graph is needed for the Hessian-vector products)::

    optimizer = AdaHessian(model.parameters())
    for x, t in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), t)
        loss.backward(create_graph=True)
        optimizer.step()

The step, for the parameters with a gradient g (t counts the steps):

1. D = (1/S) Σ_s v_s ⊙ H v_s with Rademacher v_s, H v_s = ∂(gᵀv_s)/∂θ by double backward
   (:func:`curvfun.hutchinson_diag`, S = ``n_samples``);
2. spatial averaging: for a parameter with ndim >= 3 (a conv kernel ``[out, in, *spatial]``) D is
   replaced by its mean over the spatial dims (the paper's block average over a kernel);
3. m ← β₁·m + (1 − β₁)·g,  v ← β₂·v + (1 − β₂)·D²;
4. p ← p − lr·( (m/(1 − β₁^t)) / ((sqrt(v)/sqrt(1 − β₂^t))^k + eps) + weight_decay·p ),
   k = ``hessian_power`` (decoupled weight decay, as in the published code).

Cost per step: S extra backward passes through the gradient's graph (about 2x a backward each).

Update period (``update_period = k``): step 1 computes D as above (after the spatial average) and
keeps it in the parameter's state; steps 2..k reuse it, step k + 1 computes a new one, and so on
(counted over ``step()`` calls that see gradients; a parameter that has no kept D yet, e.g. one
first seen mid-period, makes that step compute D for all). Only the Hessian-vector products are
skipped: m and v are updated on every step, v with the kept D (so 1 − β₂^t stays the right bias
correction). On the steps that reuse D the gradients need no graph, so a loop may call
``loss.backward(create_graph=optimizer.needs_graph())``. Cost: S extra backward passes every k
steps. pytorch-optimizer's ``AdaHessian(update_period=k)`` also reuses the Hutchinson estimate
but updates v only on the steps that compute it while its bias correction counts every step, so
its denominator is too small by up to √k for the first thousands of steps (β₂ = 0.999).

Randomness: the Rademacher vectors come from the optimizer's own ``torch.Generator`` (seeded by
``seed``; None derives one from ``torch.initial_seed()``), drawn parameter by parameter in
param-group order as ``torch.randint(0, 2, p.shape, generator=gen) * 2 - 1``, sample after
sample (on the steps that compute D only); its state and the step counter of the update period
are in ``state_dict()``, so a resumed run, also one saved mid-period, is bit-for-bit the
uninterrupted one.

Differences from the published code (read for behaviour only): it averages ``|v ⊙ Hv|`` over a
kernel's spatial dims; this follows the paper and averages the signed estimate ``v ⊙ Hv`` (the
unbiased estimate of the block's mean diagonal; the square in v makes the sign irrelevant
afterwards). It draws v from the global random stream, so resuming is not exact; it fails on
3-D (Conv1d) kernels, which are averaged over their one spatial dim here; and it supports one
sample only (``n_samples`` here). A gradient without a graph raises an error naming
``create_graph=True`` (as there); a gradient that is constant in the parameters (no graph while
others have one) counts as zero curvature.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from ..curvature import hutchinson_diag

__all__ = ["AdaHessian"]

_GEN_KEY = "curvfun.adahessian.generator"
_CALLS_KEY = "curvfun.adahessian.calls"


def _derived_seed() -> int:
    return (torch.initial_seed() * 6364136223846793005 + 1442695040888963407) % (2**63)


def spatial_average(d: Tensor) -> Tensor:
    """The mean of ``d`` over dims 2.. for a conv kernel (ndim >= 3), broadcast back; else ``d``."""
    if d.ndim >= 3:
        return d.mean(dim=tuple(range(2, d.ndim)), keepdim=True).expand_as(d)
    return d


class AdaHessian(torch.optim.Optimizer):
    """AdaHessian; see :mod:`curvfun.optim.adahessian` for the update and its cost.

    Args:
        params: parameters or param groups.
        lr: learning rate. (default: 0.15)
        betas: (β₁, β₂) of the gradient and Hessian-diagonal moments. (default: (0.9, 0.999))
        eps: added to the denominator. (default: 1e-4)
        weight_decay: decoupled weight decay. (default: 0)
        hessian_power: k in [0, 1]. (default: 1)
        n_samples: Rademacher samples per step. (default: 1)
        update_period: the Hessian diagonal is estimated every this many steps and reused in
            between (see the module docstring). (default: 1)
        seed: seed of the optimizer's generator (None: derived from ``torch.initial_seed()``).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0,
        hessian_power: float = 1,
        n_samples: int = 1,
        seed: int | None = None,
        update_period: int = 1,
    ) -> None:
        def bad(x: Any) -> bool:
            return isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x)

        if bad(lr) or lr < 0:
            raise ValueError(f"Invalid learning rate: {lr!r} (expected lr >= 0)")
        if bad(eps) or eps < 0:
            raise ValueError(f"Invalid epsilon value: {eps!r} (expected eps >= 0)")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
        for i, b in enumerate(betas):
            if bad(b) or not 0 <= b < 1:
                raise ValueError(f"Invalid beta parameter at index {i}: {b!r} (expected 0 <= beta < 1)")
        if bad(weight_decay) or weight_decay < 0:
            raise ValueError(f"Invalid weight_decay: {weight_decay!r} (expected weight_decay >= 0)")
        if bad(hessian_power) or not 0 <= hessian_power <= 1:
            raise ValueError(f"Invalid Hessian power value: {hessian_power!r} (expected 0 <= hessian_power <= 1)")
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"Invalid n_samples: {n_samples!r} (expected an int >= 1)")
        if isinstance(update_period, bool) or not isinstance(update_period, int) or update_period < 1:
            raise ValueError(f"Invalid update_period: {update_period!r} (expected an int >= 1: the Hessian diagonal "
                             f"is estimated every update_period steps)")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, hessian_power=hessian_power)
        super().__init__(params, defaults)
        self.n_samples = n_samples
        self.update_period = update_period
        #: ``step()`` calls that saw gradients (the update period's clock)
        self.calls = 0
        first = next((p for g in self.param_groups for p in g["params"]), None)
        device = first.device if first is not None else torch.device("cpu")
        self.seed = _derived_seed() if seed is None else seed
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed)

    def needs_graph(self) -> bool:
        """Whether the next ``step()`` estimates the Hessian diagonal (its gradients need
        ``create_graph=True``); False only on steps that reuse a kept estimate."""
        if self.update_period == 1 or self.calls % self.update_period == 0:
            return True
        return any("hessian_diag" not in self.state[p] for g in self.param_groups for p in g["params"]
                   if p.requires_grad)

    def _hessian_diagonal(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        with_graph = [i for i, g in enumerate(grads) if g.requires_grad]
        if not with_graph:
            raise RuntimeError(
                "AdaHessian needs the gradient's graph for Hessian-vector products: call "
                "loss.backward(create_graph=True) before optimizer.step() (the gradients have no grad_fn)"
            )
        outs = [grads[i] for i in with_graph]
        keys = [str(i) for i in range(len(params))]

        calls = [0]

        def matvec(v: dict[str, Tensor]) -> dict[str, Tensor]:
            calls[0] += 1  # the graph is freed after the last sample's product
            with torch.enable_grad():
                hv = torch.autograd.grad(
                    outs, params, grad_outputs=[v[keys[i]] for i in with_graph],
                    retain_graph=calls[0] < self.n_samples, allow_unused=True,
                )
            return {k: torch.zeros_like(p) if h is None else h for k, p, h in zip(keys, params, hv)}

        like = {k: p.detach() for k, p in zip(keys, params)}
        D = hutchinson_diag(matvec, like, self.n_samples, self.generator)
        return [D[k] for k in keys]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):
        """One AdaHessian step (module docstring). A ``closure`` must itself call
        ``loss.backward(create_graph=True)``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params, groups = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("AdaHessian does not support sparse gradients")
                    params.append(p)
                    groups.append(group)
        if not params:
            return loss
        grads = [p.grad for p in params]
        keep = self.update_period > 1
        if not keep or self.calls % self.update_period == 0 or any("hessian_diag" not in self.state[p] for p in params):
            D = [spatial_average(d) for d in self._hessian_diagonal(params, grads)]
        else:
            D = [self.state[p]["hessian_diag"] for p in params]
        self.calls += 1
        for p, group, g, d in zip(params, groups, grads, D):
            g = g.detach()
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_hessian_diag_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if keep:
                state["hessian_diag"] = d
            m, v = state["exp_avg"], state["exp_hessian_diag_sq"]
            beta1, beta2 = group["betas"]
            state["step"] += 1
            t = state["step"]
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(d, d, value=1 - beta2)
            k = group["hessian_power"]
            denom = v.sqrt().div_(math.sqrt(1 - beta2**t))
            if k != 1:
                denom.pow_(k)
            denom.add_(group["eps"])
            if group["weight_decay"] != 0:  # p − lr·wd·p, then − lr·m̂/denom (the same update)
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1**t))
        # drop the gradients' graphs (create_graph=True makes parameter <-> gradient reference cycles)
        for p in params:
            p.grad = p.grad.detach()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` state plus the generator state (``"curvfun.adahessian.generator"``) and
        the update period's step counter (``"curvfun.adahessian.calls"``)."""
        sd = super().state_dict()
        sd[_GEN_KEY] = self.generator.get_state()
        sd[_CALLS_KEY] = self.calls
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        gen = state_dict.pop(_GEN_KEY, None)
        calls = state_dict.pop(_CALLS_KEY, 0)
        if gen is None:
            raise ValueError(
                f"AdaHessian.load_state_dict: no {_GEN_KEY!r} entry (the Rademacher generator's state); save it "
                f"with AdaHessian.state_dict()"
            )
        super().load_state_dict(state_dict)
        self.generator.set_state(gen.clone())
        self.calls = int(calls)
