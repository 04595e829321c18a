"""CurveBall (Henriques et al., ICCV 2019, "Small steps and giant leaps: Minimal Newton solvers
for deep learning"): one interleaved GGN-vector product per step refines the step direction.

With G the GGN of the mean loss (GUIDE: G = (1/N) Σ_n J_nᵀ H_n J_n, H_n the Hessian of the
likelihood's per-sample loss w.r.t. the model output), g the gradient and λ = ``config.damping``,
the quadratic model of the loss around the current parameters is
``q(z) = gᵀz + ½ zᵀ(G + λI)z``. CurveBall keeps a direction z (zero at the start) and takes, every
step, one momentum gradient-descent step on q:

    Δz = (G + λI) z + g,        z ← ρ·z − β·Δz,        and the parameters move by +z

(the maker writes ``p.grad = −z``, so ``torch.optim.SGD(lr=1)`` makes the paper's update; a smaller
lr scales it). With ``auto_tune=True`` (the paper's default) ρ and β minimise q(ρz − βΔz)
exactly, a 2x2 system built from products with G + λI:

    [[Δzᵀ(G+λI)Δz, zᵀ(G+λI)Δz], [zᵀ(G+λI)Δz, zᵀ(G+λI)z]] · [β, −ρ]ᵀ = [gᵀΔz, gᵀz]ᵀ

solved with a pseudo-inverse (at z = 0 it gives ρ = 0 and β = gᵀg / gᵀ(G+λI)g, a steepest-descent
step with exact line search on q). With ``auto_tune=False``, ρ = ``momentum`` and β = ``beta``.
``momentum_decay`` multiplies z before each step (1: no decay).

Pure functions (this module's top): :func:`output_hessian_vp` (H u through the likelihood's
Hessian square root), :func:`solve_rho_beta` and :func:`curveball_update`; the maker computes
J z and J Δz by forward mode (``torch.func.jvp``) on the registered model call, Jᵀ(·) by one
backward through the step's own graph, and g by the user's backward.

Cost per step: the plain forward and backward, one extra backward, and one (``auto_tune=False``)
or two forward-mode passes. The curvature / preconditioner schedules are not used: one GGN
product per step *is* the method.

Differences: ASDL 0.1 declares ``CurveBallGradientMaker`` but calls a method it does not define
(``loss_hvp``), and its recurrence ``m ← decay·m + momentum·((G+λ)m + g)`` adds the curvature term
with the wrong sign for ``m = −z``; curvfun follows the paper. The authors' code also adapts λ by
a trust-region ratio, which needs the loss after the parameter update; the update is made by the
user's optimizer here, so λ stays ``config.damping``. Functional passes use copies of the buffers
(BatchNorm running statistics are updated once, by the plain forward); a model with dropout sees
other masks in the forward-mode passes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..functional import twice_differentiable
from ..losses import Likelihood, get_likelihood
from .base import PreconditionedGradientMaker, unwrap_model
from .config import PreconditioningConfig

__all__ = ["CurveBallGradientMaker", "output_hessian_vp", "solve_rho_beta", "curveball_update"]


def jvp_by_double_vjp(f, primals: dict[str, Tensor], tangent: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(f(θ), J v)`` by reverse mode twice: ``J v = ∂/∂u ⟨Jᵀu, v⟩`` at any u (the map is linear
    in u). For models with ops that have no forward-mode rule; about 2x a jvp's cost."""
    with torch.enable_grad():
        leaves = {k: p.detach().requires_grad_() for k, p in primals.items()}
        out = f(leaves)
        u = torch.zeros_like(out, requires_grad=True)
        keys = list(leaves)
        vjps = torch.autograd.grad(out, [leaves[k] for k in keys], u, create_graph=True, allow_unused=True)
        dot = sum((g * tangent[k]).sum() for g, k in zip(vjps, keys) if g is not None)
        if not isinstance(dot, Tensor) or not dot.requires_grad:
            return out.detach(), torch.zeros_like(out)
        (jv,) = torch.autograd.grad(dot, u)
    return out.detach(), jv


def output_hessian_vp(likelihood: Likelihood, output: Tensor, u: Tensor) -> Tensor:
    """``H_n u_n`` for every sample (and position), H_n = S_n S_nᵀ the Hessian of the per-sample
    loss w.r.t. the output; ``u`` shaped like the output. Cost O(N·C·K)."""
    out = likelihood.canonical_output(output.detach())
    dt = torch.promote_types(out.dtype, u.dtype)  # under autocast the output is bf16, u float32
    out = out.to(dt)
    uc = u.reshape(out.shape).to(dt)
    S = likelihood.hessian_sqrt(out)  # [N, *pos, C, K]
    w = torch.einsum("...ck,...c->...k", S, uc)
    return torch.einsum("...ck,...k->...c", S, w).reshape(u.shape).to(output.dtype)


def solve_rho_beta(a11: Tensor, a12: Tensor, a22: Tensor, b1: Tensor, b2: Tensor) -> tuple[float, float]:
    """``(ρ, β)`` minimising q(ρz − βΔz): ``[β, −ρ] = pinv([[a11, a12], [a12, a22]]) [b1, b2]`` with
    a11 = Δzᵀ(G+λI)Δz, a12 = zᵀ(G+λI)Δz, a22 = zᵀ(G+λI)z, b1 = gᵀΔz, b2 = gᵀz."""
    A = torch.stack([torch.stack([a11, a12]), torch.stack([a12, a22])]).to(torch.float64)
    b = torch.stack([b1, b2]).to(torch.float64)
    sol = torch.linalg.pinv(A) @ b
    return -float(sol[1]), float(sol[0])


def curveball_update(z: dict[str, Tensor], dz: dict[str, Tensor], rho: float, beta: float) -> dict[str, Tensor]:
    """``ρ·z − β·Δz``, entry by entry."""
    return {k: rho * z[k] - beta * dz[k] for k in z}


def _dot(x: dict[str, Tensor], y: dict[str, Tensor]) -> Tensor:
    return sum((x[k] * y[k]).sum() for k in x)


def _check_curveball_args(momentum, momentum_decay, beta, auto_tune) -> None:
    def number(x: Any) -> bool:
        return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)

    if not number(momentum) or not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if not number(momentum_decay) or not 0 < momentum_decay <= 1:
        raise ValueError(f"momentum_decay must be in (0, 1], got {momentum_decay!r}")
    if not number(beta) or beta <= 0:
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    if not isinstance(auto_tune, bool):
        raise TypeError(f"auto_tune must be a bool, got {auto_tune!r}")


class CurveBallGradientMaker(PreconditionedGradientMaker):
    """CurveBall (module docstring) in ASDL's interface; use with ``torch.optim.SGD`` (lr = 1 for
    the paper's step).

    Args:
        model, config: as for every maker (``damping`` is λ; ``ignore_modules`` restricts z to the
            other layers' parameters, the rest keep the plain gradient).
        momentum: ρ when ``auto_tune=False``. (default: 0.9)
        momentum_decay: factor applied to z at the start of each step. (default: 1)
        auto_tune: choose ρ and β by the paper's 2x2 solve. (default: True)
        beta: β when ``auto_tune=False``. (default: 0.1)
        loss_type: the likelihood whose output Hessian defines G: ``"cross_entropy"``, ``"mse"``,
            ``"bce_with_logits"`` or a :class:`~curvfun.losses.Likelihood`; it should match the
            registered loss (a mean over the batch). (default: "cross_entropy")
        seed: the maker's generator seed (unused; kept for the shared interface).

    ``rho`` and ``beta_last`` hold the coefficients of the latest step; ``z`` the direction.
    """

    #: curvature from each rank's own batch; the preconditioned gradients are averaged (base class)
    _local_curvature = True

    _state_attributes = ("z", "rho", "beta_last")
    _settings = ("momentum", "momentum_decay", "beta", "auto_tune")

    def __init__(
        self,
        model: nn.Module,
        config: PreconditioningConfig | None = None,
        momentum: float = 0.9,
        momentum_decay: float = 1,
        auto_tune: bool = True,
        beta: float = 0.1,
        loss_type: Any = "cross_entropy",
        *,
        seed: int | None = None,
    ) -> None:
        _check_curveball_args(momentum, momentum_decay, beta, auto_tune)
        likelihood = get_likelihood(loss_type)
        if not likelihood.is_likelihood:
            raise ValueError(
                f"CurveBallGradientMaker needs a likelihood with an output Hessian (loss_type 'cross_entropy', "
                f"'mse' or 'bce_with_logits'), got {loss_type!r}"
            )
        super().__init__(model, config, seed=seed)
        damping = self.config.damping
        if not (damping >= 0 and math.isfinite(damping)):
            raise ValueError(f"config.damping must be a finite number >= 0, got {damping}")
        self.momentum = float(momentum)
        self.momentum_decay = float(momentum_decay)
        self.auto_tune = auto_tune
        self.beta = float(beta)
        self.likelihood = likelihood
        root = unwrap_model(self.model)
        owned = {id(p) for name in self.preconditioned_modules for p in self.module_params(name).values()}
        self._names = [n for n, p in root.named_parameters() if id(p) in owned]
        self._params = {n: p for n, p in root.named_parameters() if id(p) in owned}
        #: the direction z, by parameter name (zero at the start)
        self.z: dict[str, Tensor] = {n: torch.zeros_like(p, memory_format=torch.contiguous_format).detach()
                                     for n, p in self._params.items()}
        self.rho: float = 0.0
        self.beta_last: float = 0.0

    def _check_settings(self) -> None:
        _check_curveball_args(self.momentum, self.momentum_decay, self.beta, self.auto_tune)

    def do_forward_and_backward(self, step: int | None = None) -> bool:
        return False

    def do_update_curvature(self, step: int | None = None) -> bool:
        return True

    def do_update_preconditioner(self, step: int | None = None) -> bool:
        return False

    def _jvp(self, tangent: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        primals = {n: p.detach() for n, p in self._params.items()}

        def f(params):
            return self.logits_from_output(self.model_output_at(params))

        with twice_differentiable():
            try:
                return torch.func.jvp(f, (primals,), (tangent,))
            except NotImplementedError:  # an op without a forward-mode rule
                return jvp_by_double_vjp(f, primals, tangent)

    def update_curvature(self) -> None:
        lam = self.config.damping
        if self.momentum_decay != 1:
            self.z = {n: v * self.momentum_decay for n, v in self.z.items()}
        z = self.z
        # J z by forward mode on the registered call (buffers copied)
        _, Jz = self._jvp(z)
        # the plain forward: its graph gives Jᵀ(·); its backward gives g
        self.call_model()
        logits = self.logits
        if not isinstance(logits, Tensor):
            raise TypeError(
                f"CurveBallGradientMaker needs tensor logits, got {type(logits).__name__}: declare them with "
                f"gm.setup_logits_repr(dummy_y.logits)"
            )
        self.call_loss()
        N = self.likelihood.canonical_output(logits.detach()).shape[0]
        HJz = output_hessian_vp(self.likelihood, logits, Jz)
        names = self._names
        params = [self._params[n] for n in names]
        jt = torch.autograd.grad(logits, params, HJz / N, retain_graph=True, allow_unused=True)
        self.backward()
        g = {n: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()) for n, p in zip(names, params)}
        dz = {n: (torch.zeros_like(p) if j is None else j) + lam * z[n] + g[n] for n, p, j in zip(names, params, jt)}
        if self.auto_tune:
            _, Jdz = self._jvp(dz)
            HJdz = output_hessian_vp(self.likelihood, logits, Jdz)
            a11 = (Jdz * HJdz).sum() / N + lam * _dot(dz, dz)
            a12 = (Jz * HJdz).sum() / N + lam * _dot(z, dz)
            a22 = (Jz * HJz).sum() / N + lam * _dot(z, z)
            rho, beta = solve_rho_beta(a11, a12, a22, _dot(g, dz), _dot(g, z))
        else:
            rho, beta = self.momentum, self.beta
        new = curveball_update(z, dz, rho, beta)
        if all(bool(torch.isfinite(v).all()) for v in new.values()):
            self.z, self.rho, self.beta_last = new, rho, beta
        else:
            self._install_if_finite("z", new, None, "direction")  # warns once; z is kept

    def precondition(self) -> None:
        for n, p in self._params.items():
            if p.grad is not None:
                p.grad.copy_(-self.z[n])
