"""Damped Newton: the gradient preconditioned by the dense Hessian of the mean loss.

    ĝ = (H + λ I)⁻¹ g,   or with ``abs_eigenvalues=True``   ĝ = (|H| + λ I)⁻¹ g,  |H| = Q |Λ| Qᵀ

over the P parameters of the preconditioned layers (every trainable layer unless
``config.ignore_modules`` says otherwise), H the Hessian of the registered loss (the mean of the
batch, GUIDE) with respect to them, λ = ``config.damping``.

Pure functions (this module's top): :func:`dense_hessian` (reverse-over-reverse on a flat
parameter vector, O(P) backward passes), :func:`newton_solver` (an LU factorisation, or the
eigendecomposition for |H|; O(P³)) and :func:`newton_direction` (O(P²)). The maker calls them:
the Hessian on curvature steps (averaged with ``config.ema_decay`` when set), the solver on
preconditioner steps, the direction on every step. Memory is P² entries, so the maker refuses a
model with more than ``max_params`` parameters to precondition (the error gives the count).

Differences from ASDL 0.1's ``NewtonGradientMaker``: it takes its own ``NewtonGradientConfig``
(``damping``, ``absolute``) and factorises the Hessian on every step; this one takes the shared
:class:`PreconditioningConfig` (``damping``, schedules, ``ema_decay``, ``ignore_modules``), keeps
the factorisation between preconditioner refreshes, checks the model's size up front, and keeps
the last good solver when a new one is not finite. ASDL's ``NewtonGradientConfig`` is accepted too
(:class:`curvfun.precondition.NewtonGradientConfig`, a ``PreconditioningConfig``): its ``absolute``
sets ``abs_eigenvalues``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..functional import twice_differentiable

from .base import PreconditionedGradientMaker, unwrap_model
from .config import PreconditioningConfig

__all__ = ["NewtonGradientMaker", "dense_hessian", "newton_solver", "newton_direction"]


def dense_hessian(loss_of_flat: Callable[[Tensor], Tensor], flat: Tensor, chunk_size: int | None = None) -> Tensor:
    """``∇²`` of a scalar function of a flat vector, ``[P, P]`` and symmetrised, by
    ``jacrev(grad)`` (reverse-over-reverse; ``chunk_size`` bounds the vmapped batch)."""
    H = torch.func.jacrev(torch.func.grad(loss_of_flat), chunk_size=chunk_size)(flat.detach())
    return (H + H.T) / 2


def newton_solver(H: Tensor, damping: float, abs_eigenvalues: bool = False) -> dict[str, Tensor]:
    """What :func:`newton_direction` needs to apply ``(H + λI)⁻¹`` (LU factors and pivots) or
    ``(|H| + λI)⁻¹`` (eigenvectors Q and 1/(|Λ| + λ); ``eigh`` is retried in float64 when it fails
    to converge in float32). Non-finite entries mark a failure (e.g. a singular ``H + λI``)."""
    if abs_eigenvalues:
        try:
            L, Q = torch.linalg.eigh(H)
        except torch.linalg.LinAlgError:
            if H.dtype == torch.float64:
                return {"Q": torch.full_like(H, math.nan), "scale": torch.full_like(H[0], math.nan)}
            L, Q = (t.to(H.dtype) for t in torch.linalg.eigh(H.double()))  # float32 eigh can fail to converge
        return {"Q": Q, "scale": 1.0 / (L.abs() + damping)}
    M = H + damping * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    LU, pivots, info = torch.linalg.lu_factor_ex(M)
    if int(info) != 0:
        LU = torch.full_like(LU, math.nan)
    return {"LU": LU, "pivots": pivots}


def newton_direction(solver: dict[str, Tensor], g: Tensor) -> Tensor:
    """``(H + λI)⁻¹ g`` (or ``(|H| + λI)⁻¹ g``) from :func:`newton_solver`'s output."""
    if "Q" in solver:
        Q = solver["Q"]
        return Q @ (solver["scale"] * (Q.T @ g))
    return torch.linalg.lu_solve(solver["LU"], solver["pivots"], g.unsqueeze(1)).squeeze(1)


def check_max_params(maker: str, num_params: int, max_params: int, matrix: str, cost: str, instead: str) -> None:
    """Refuse a dense P x P method for more than ``max_params`` parameters, naming the count."""
    if num_params > max_params:
        raise ValueError(
            f"{maker}: the model has {num_params} parameters to precondition, more than max_params={max_params}; "
            f"{matrix} needs {num_params}² = {num_params ** 2:,} entries and {cost}. Restrict it with "
            f"config.ignore_modules, raise max_params, or use {instead}."
        )


def _check_newton_args(abs_eigenvalues, max_params, hessian_chunk_size) -> None:
    if not isinstance(abs_eigenvalues, bool):
        raise TypeError(f"abs_eigenvalues must be a bool, got {abs_eigenvalues!r}")
    if isinstance(max_params, bool) or not isinstance(max_params, int) or max_params < 1:
        raise ValueError(f"max_params must be a positive int, got {max_params!r}")
    if hessian_chunk_size is not None and (not isinstance(hessian_chunk_size, int) or hessian_chunk_size < 1):
        raise ValueError(f"hessian_chunk_size must be a positive int or None, got {hessian_chunk_size!r}")


class NewtonGradientMaker(PreconditionedGradientMaker):
    """Damped dense Newton (module docstring), in ASDL's interface::

        gm = NewtonGradientMaker(model, PreconditioningConfig(damping=1e-2))
        dummy_y = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, dummy_y, t)
        y, loss = gm.forward_and_backward()   # p.grad = (H + λI)⁻¹ ∇L
        optimizer.step()                      # SGD(lr=1) gives the Newton step

    Args:
        model, config: as for every maker (``damping`` is λ; the curvature / preconditioner
            schedules say when H and its factorisation are refreshed).
        abs_eigenvalues: precondition with ``|H| = Q|Λ|Qᵀ`` (eigh) instead of H, so that the
            direction descends where H is indefinite. (default: False)
        max_params: the largest number of preconditioned parameters accepted. (default: 5000)
        hessian_chunk_size: vmapped batch of the Hessian's backward passes (None: all at once).
        seed: the maker's generator seed (unused by Newton; kept for the shared interface).

    Cost per curvature step: one forward and backward plus P backward-of-backward passes; per
    preconditioner step O(P³); per step O(P²). Memory O(P²).
    """

    #: curvature from each rank's own batch; the preconditioned gradients are averaged (base class)
    _local_curvature = True

    _state_attributes = ("hessian", "solver")
    _settings = ("abs_eigenvalues", "max_params", "hessian_chunk_size")

    def __init__(
        self,
        model: nn.Module,
        config: PreconditioningConfig | None = None,
        abs_eigenvalues: bool = False,
        max_params: int = 5000,
        hessian_chunk_size: int | None = 1024,
        *,
        seed: int | None = None,
    ) -> None:
        _check_newton_args(abs_eigenvalues, max_params, hessian_chunk_size)
        abs_eigenvalues = abs_eigenvalues or getattr(config, "absolute", False)  # ASDL's NewtonGradientConfig
        super().__init__(model, config, seed=seed)
        damping = self.config.damping
        if not (damping >= 0 and math.isfinite(damping)):
            raise ValueError(f"config.damping must be a finite number >= 0, got {damping}")
        self.abs_eigenvalues = abs_eigenvalues
        self.max_params = max_params
        self.hessian_chunk_size = hessian_chunk_size
        root = unwrap_model(self.model)
        owned = {id(p) for name in self.preconditioned_modules for p in self.module_params(name).values()}
        #: the preconditioned parameters, by name (model order); H is over their concatenation
        self.param_names: list[str] = [n for n, p in root.named_parameters() if id(p) in owned]
        self._params = [p for n, p in root.named_parameters() if id(p) in owned]
        self.num_params = sum(p.numel() for p in self._params)
        check_max_params("NewtonGradientMaker", self.num_params, max_params, "a dense Hessian", "an O(P³) solve",
                         "a matrix-free method (CurveBallGradientMaker, KfacGradientMaker)")
        self.hessian: Tensor | None = None
        self.solver: dict[str, Tensor] | None = None

    def _check_settings(self) -> None:
        _check_newton_args(self.abs_eigenvalues, self.max_params, self.hessian_chunk_size)

    def _dense_requests(self) -> list:
        params = [p for n in self.preconditioned_modules for p in self.module_params(n).values()]
        if not params:
            return []
        P = sum(p.numel() for p in params)
        return [("NewtonGradientMaker's dense Hessian", (P, P), params[0].dtype, params[0].device,
                 "restrict it with config.ignore_modules or use a matrix-free method (CurveBallGradientMaker, "
                 "KfacGradientMaker)")]

    # --- pure pieces bound to the registered calls -----------------------------------------------
    def _flat_loss(self) -> Callable[[Tensor], Tensor]:
        names, shapes = self.param_names, [p.shape for p in self._params]
        sizes = [p.numel() for p in self._params]

        def loss_of_flat(flat: Tensor) -> Tensor:
            chunks = torch.split(flat, sizes)
            params = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
            loss = self.loss_from_output(self.model_output_at(params))
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError("NewtonGradientMaker needs a scalar loss (reduce it in loss_fn, e.g. reduction='mean')")
            return loss.reshape(())

        return loss_of_flat

    def compute_hessian(self) -> Tensor:
        """The dense Hessian of the registered loss at the current parameters, ``[P, P]``."""
        flat = torch.cat([p.detach().reshape(-1) for p in self._params])
        with twice_differentiable():
            return dense_hessian(self._flat_loss(), flat, self.hessian_chunk_size)

    # --- the maker --------------------------------------------------------------------------
    def update_curvature(self) -> None:
        self.forward()
        self.backward()
        new = self.compute_hessian()
        if self.hessian is not None and self.config.use_ema:
            d = self.config.ema_decay
            new = (1 - d) * self.hessian + d * new
        self.hessian = self._install_if_finite("hessian", new, self.hessian, "Hessian")

    def update_preconditioner(self) -> None:
        if self.hessian is None:
            return
        new = newton_solver(self.hessian, self.config.damping, self.abs_eigenvalues)
        self.solver = self._install_if_finite("hessian", new, self.solver, "solver")

    def precondition(self) -> None:
        if self.solver is None or any(p.grad is None for p in self._params):
            return
        g = torch.cat([p.grad.reshape(-1) for p in self._params])
        d = newton_direction(self.solver, g.to(self.solver["Q" if "Q" in self.solver else "LU"].dtype))
        for p, c in zip(self._params, torch.split(d, [p.numel() for p in self._params])):
            p.grad.copy_(c.reshape(p.shape))

    def report_preconditioned_modules(self, force: bool = False) -> str:
        text = super().report_preconditioned_modules(force)
        return text + f"\n(dense Hessian over {len(self._params)} tensors, P = {self.num_params})"
