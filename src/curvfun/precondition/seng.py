"""``SengGradientMaker``: the sketched empirical natural gradient (Yang et al. 2021), per Linear /
Conv2d layer.

Which pure functions are called when (math and conventions in :mod:`curvfun.seng_math`):

* **curvature steps** make the pass with the layers recorded (:func:`curvfun.capture.record_layers`
  around the usual forward and backward) and keep, per layer, the per-sample gradients in factored
  form X_n (d_out x r), Y_n (d_in' x r) (per-sample output-gradients and inputs with a ones row for
  the bias, positions truncated to ``truncated_rank`` by :func:`~curvfun.seng_math.truncate_positions`),
  fresh sketch indices drawn from ``self.generator`` (:func:`~curvfun.seng_math.sketch_indices`,
  ``sketching_size`` per side) and the sketched Gram matrix K_S (:func:`~curvfun.seng_math.sketched_gram`);
* **preconditioner steps** factorise K_S/N + λI (Cholesky, float64 retry), λ = ``config.damping``;
* **every step**, for each layer's mean gradient Ḡ = [G_W | g_b] (of the current batch),
  u_S = :func:`~curvfun.seng_math.sketched_products`, w = (K_S/N + λI)^{-1} u_S and
  Ḡ ← (1/λ)(Ḡ − (1/N) Σ_n w_n X_n Y_nᵀ) (:func:`~curvfun.seng_math.seng_direction`, exact product).

Conventions: N is the batch size of the curvature step; X uses the output-gradients of the
per-sample losses (N·∂L/∂z for a ``reduction='mean'`` loss, ∂L/∂z for ``'sum'``), so that
F = (1/N) UᵀU is the empirical Fisher of the mean loss; Ḡ is ``param.grad`` as the pass left it
(the mean gradient for a mean loss). With no sketch (``sketching_size`` >= both dimensions) and no
truncation (T <= ``truncated_rank``, e.g. every Linear on ``[N, d]`` inputs) the update is exactly
the layer-wise (F_l + λI)^{-1} ḡ_l.

Memory: N·(d_out + d_in + 1)·r per layer plus N x N.

Differences from ASDL 0.1 (``asdl/precondition/seng.py``): the final product Uᵀw is the exact
Σ_n w_n X_n Y_nᵀ (ASDL uses a rank-r surrogate, see :mod:`curvfun.seng_math`); the sketched Gram
and products are scaled to be unbiased (c, not c²); the bias column goes through the truncation
with the inputs (ASDL appends ones after truncating); the sketch comes from the maker's seeded
generator (ASDL's ``torch.randperm`` uses the global stream); ``config.data_size`` need not be
set (ASDL raises without it) since N is the batch size; the loss keeps its own reduction (ASDL
forces ``'sum'`` and divides afterwards). Convolutions with ``groups > 1`` keep the plain gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..capture import override_parents, record_layers
from ..seng_math import seng_direction, sketch_indices, sketched_gram, sketched_products, truncate_positions
from ..linalg import NotPositiveDefiniteError, psd_cholesky
from ._layer_pass import linear_or_conv_reason, module_infos, name_outside_uses, records_to_data, user_reduction
from .base import PreconditionedGradientMaker, unwrap_model
from .config import PreconditioningConfig

__all__ = ["SengGradientMaker"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class SengGradientMaker(PreconditionedGradientMaker):
    """Sketched empirical natural gradient (see the module docstring).

    Args:
        model: the model.
        config: :class:`PreconditioningConfig`; uses ``damping`` (> 0), the schedules and
            ``ignore_modules`` (``ema_decay`` must be -1: the factored gradients of one batch are
            not averaged).
        sketching_size: rows kept per side of each layer's gradient matrix. (default 256)
        truncated_rank: positions kept per sample after truncation; None: no truncation. (default 16)
        seed: seed of the sketch generator (default: ``config.seed`` or derived).
    """

    #: curvature from each rank's own batch; the preconditioned gradients are averaged (base class)
    _local_curvature = True

    _state_attributes = ("curvature", "factor")
    _settings = ("sketching_size", "truncated_rank")
    _data_shaped_state = ("curvature", "factor")  # [N, ...] sketches of one batch

    def __init__(
        self,
        model: nn.Module,
        config: PreconditioningConfig | None = None,
        sketching_size: int = 256,
        truncated_rank: int | None = 16,
        *,
        seed: int | None = None,
    ) -> None:
        self.sketching_size, self.truncated_rank = sketching_size, truncated_rank
        self._check_settings()
        if config is None:
            config = PreconditioningConfig(damping=1e-3)
        super().__init__(model, config, seed=seed)
        #: layer -> {"X": [N, d_out, r], "Y": [N, d_in', r], "K": [N, N], "idx_out", "idx_in"}
        self.curvature: dict[str, dict[str, Tensor | None]] = {}
        #: layer -> Cholesky factor of K_S/N + λI
        self.factor: dict[str, Tensor] = {}

    def _check_settings(self) -> None:
        _positive_int("sketching_size", self.sketching_size)
        if self.truncated_rank is not None:
            _positive_int("truncated_rank", self.truncated_rank)

    def _check_config(self, config: PreconditioningConfig) -> None:
        if not config.damping > 0:
            raise ValueError(f"SengGradientMaker needs damping > 0 (it divides by λ), got damping={config.damping}")
        if config.use_ema:
            raise ValueError(
                f"SengGradientMaker keeps one batch's factored gradients, with no moving average: leave "
                f"ema_decay=-1, got {config.ema_decay!r}"
            )

    def _unsupported_reason(self, name: str, module: nn.Module) -> str | None:
        reason = linear_or_conv_reason(module, "SENG")
        if reason is None and not module.weight.requires_grad:
            return "frozen weight"
        return reason

    def update_curvature(self) -> None:
        infos = module_infos(self.preconditioned_modules)
        with record_layers(infos, tap=True, parents=override_parents(unwrap_model(self.model), infos)) as records:
            self.forward()
            name_outside_uses(self, records, self._outside_warned)
            self.backward()
        N = next((r.inputs[0].shape[0] for r in records.values() if r.inputs), 1)
        scale = float(N) if user_reduction(self) == "mean" else 1.0
        for name, data in records_to_data(records, scale).items():
            a = data.a[:, 0]  # [N, T, d_in]
            g = data.g[0, :, 0]  # [N, T, d_out]
            if data.has_bias:
                a = torch.cat([a, torch.ones_like(a[..., :1])], -1)
            X, Y = truncate_positions(g.transpose(1, 2), a.transpose(1, 2), self.truncated_rank)
            idx_out = sketch_indices(X.shape[1], self.sketching_size, self.generator, X.device)
            idx_in = sketch_indices(Y.shape[1], self.sketching_size, self.generator, Y.device)
            K = sketched_gram(X, Y, idx_out, idx_in)
            new = {"X": X.detach(), "Y": Y.detach(), "K": K.detach(), "idx_out": idx_out, "idx_in": idx_in}
            self.curvature[name] = self._install_if_finite(name, new, self.curvature.get(name), "sketched Gram matrix")

    def update_preconditioner(self) -> None:
        lam = float(self.config.damping)
        for name, c in self.curvature.items():
            K = c["K"]
            N = K.shape[0]
            M = K / N + lam * torch.eye(N, dtype=K.dtype, device=K.device)
            L = _cholesky(M)
            self.factor[name] = self._install_if_finite(name, L, self.factor.get(name), "Cholesky factor")

    def precondition(self) -> None:
        lam = float(self.config.damping)
        for name, c in self.curvature.items():
            L = self.factor.get(name)
            if L is None:
                continue
            ps = self.module_params(name)
            w, b = ps["weight"], ps.get("bias")
            if w.grad is None:
                continue
            G = w.grad.reshape(w.shape[0], -1)
            if b is not None:
                G = torch.cat([G, b.grad.reshape(-1, 1)], 1)
            u = sketched_products(c["X"], c["Y"], G, c["idx_out"], c["idx_in"])
            coef = torch.cholesky_solve(u.to(L.dtype).unsqueeze(-1), L).squeeze(-1).to(G.dtype)
            D = seng_direction(G, c["X"], c["Y"], coef, lam)
            if b is None:
                w.grad.copy_(D.reshape(w.shape))
            else:
                w.grad.copy_(D[:, :-1].reshape(w.shape))
                b.grad.copy_(D[:, -1])


def _cholesky(M: Tensor) -> Tensor:
    """:func:`curvfun.linalg.psd_cholesky`, or a NaN matrix (rejected by ``_install_if_finite``)
    when ``M`` is not positive definite even in float64."""
    try:
        return psd_cholesky(M, "SENG Gram matrix")
    except NotPositiveDefiniteError:
        return torch.full_like(M, float("nan"))
