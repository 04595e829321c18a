"""``ShampooGradientMaker``: Shampoo (Gupta, Koren & Singer 2018) under the ASDL interface.

Which pure functions are called when (math in :mod:`curvfun.shampoo_math` and
:mod:`curvfun.roots`):

* every step: the plain forward and backward pass (``do_forward_and_backward`` is always True;
  Shampoo's curvature is built from the gradient itself);
* on curvature steps: for every parameter with ndim >= 2 of a preconditioned layer, its gradient G
  (as a matrix, conv kernels ``[out, in·kh·kw]``; cut into tiles when ``block_size > 0``) updates
  L ← L + G Gᵀ and R ← R + Gᵀ G (``config.ema_decay = -1``, the default) or their moving averages
  (``0 < ema_decay <= 1``);
* on preconditioner steps: the inverse 4th roots (L + δ_L I)^{-1/4} and (R + δ_R I)^{-1/4} by
  ``eigh`` (float64 retry), with ASDL's relative damping δ = ``config.damping · λ_max`` of each
  factor (``damping_mode="absolute"`` uses δ = ``config.damping``);
* every step: G ← L^{-1/4} G R^{-1/4} in place; 1-D parameters (biases, norm scales) keep the
  plain gradient, as in ASDL. Each root is applied as a dense matrix or, where that is cheaper
  (:func:`~curvfun.shampoo_math.prefer_factored`: interval · n < d for a d x d factor on a d x n
  side), in factored form Q (w ⊙ (Qᵀ X)) without being formed.

Root methods (``root_method``):

* ``"eigh"`` (default): every refresh decomposes every factor exactly (``eigh``, float64 retry).
* ``"warm"``: every factor keeps its eigenbasis Q (columns by descending eigenvalue) from the
  previous refresh and updates it by ``warm_iters`` steps of subspace iteration,
  Q ← qr(M Q), with the eigenvalues from the Rayleigh quotients λ = diag(Qᵀ M Q)
  (:func:`curvfun.roots.warm_eigh`); the root is Q diag((λ + δ)^{-1/4}) Qᵀ. A full ``eigh``
  runs on a factor's first refresh, every ``eigh_every`` refreshes (a re-sync; None: never), and
  whenever the warm step gives non-finite values. With ``basis_every = k > 1`` the subspace step
  runs on every k-th refresh only; the refreshes between keep Q and update λ = diag(Qᵀ M Q) alone
  (the "eigenvalue-corrected" Shampoo of SOAP / EK-FAC). With the basis kept, the statistics'
  update a·M + b·G Gᵀ moves diag(Q_Lᵀ L Q_L) by b times the squared row norms of the rotated
  gradient G' = Q_Lᵀ G Q_R (and diag(Q_Rᵀ R Q_R) by its squared column norms), and
  preconditioning needs G' anyway, Q_L (w_L ⊙ G' ⊙ w_R) Q_Rᵀ: such a refresh costs no matrix
  product beyond the preconditioning's four (when the eigenvalues were current before the
  statistics' update, i.e. the curvature and preconditioner schedules coincide).
  Accuracy: exact when M did not change since the last refresh; otherwise the root differs from
  the exact one by the part of M that is off-diagonal in Q, which one subspace step shrinks by the
  eigenvalue ratios λ_j/λ_i, and which stays small when M changes slowly (Shampoo's accumulated
  statistics change by one G Gᵀ per step). Cost per factor and refresh: one QR and two d x d x d
  products, against one ``eigh`` (about twice a QR on the CPU) and one product to form the root.

Data space (``data_space="auto"``, the default; ``"never"`` turns it off): in one process, a plain
``nn.Linear`` layer (:func:`~curvfun.precondition._layer_pass.rows_route_module`) whose batch has few
rows R against its widths (:func:`~curvfun.shampoo_math.rows_pay`; the MLP's 784 → 512 and
512 → 512 layers at batch 128) is recorded during the pass (inputs a, output gradients g) with its
own weight and bias detached during its calls, so autograd skips its weight gradient, and
everything above is taken through the rows (G = gᵀa never formed; the rows centred first,
:func:`~curvfun.shampoo_math.centered_rows`, so that a common input mean does not cancel in
floating point): L ← L + gᵀ(a aᵀ)g, R ← R + aᵀ(g gᵀ)a, the rotated gradient as the pair
(Q_Lᵀgᵀ, a Q_R) with its row / column norms from the two R x R Grams, and the preconditioned
gradient (L^{-1/4}gᵀ)(a R^{-1/4}). The same matrices in exact arithmetic. Whatever reaches the
weight outside the layer's own calls (a weight also used elsewhere in the model or the loss,
earlier micro-batches) lands in its ``.grad``; when that is non-zero the step adds gᵀa to it and
takes the formed gradient, so the result is exact in every case. The layer's own part reaches
``.grad`` from the maker (tensor hooks on the weight do not see it); zeroed gradients
(``zero_grad(set_to_none=False)``) are written in place.

Precision (``precision="auto"``, the default). At damping ε the damped factors have condition
numbers up to 1/ε, and at small ε every singular direction of G weighs about as much in the
result (the first step is nearly the polar factor U Vᵀ of G = U Σ Vᵀ), so the small eigenvalues
must be right. Statistics summed in float32 and their float32 ``eigh`` carry eigenvalue errors of
a few float32 units times λ_max, so below ε = 1e-4 (:func:`~curvfun.shampoo_math.needs_float64`;
absolute damping: δ against the largest diagonal entry) a narrower-than-float64 parameter's
statistics, roots, rotated gradient and preconditioning are float64, and the result is cast
back. The gradient itself still carries float32 rounding, which the float64 statistics see as
extra directions of singular value up to ~300·u·σ_max; their eigenvalues are floored at
(300·u)²·λ_max (:func:`~curvfun.shampoo_math.resolved_floor`). On a 784-512-512-10 MLP at
batch 128 and ε = 1e-12 the float32 first step is then 3e-4 from the float64 model's (it was 3.2
with float32 statistics; ASDL 0.1: 0.04). ``precision="native"`` keeps the parameters' dtype,
``"float64"`` always uses float64. Cost: about 2x per factor in float64 on the CPU, only at
damping below 1e-4.

The statistics start at ``1e-12·I`` as in ASDL / the reference implementation; until the first
roots exist a parameter keeps its plain gradient. With the default config the curvature follows
the preconditioner's schedule, so ``preconditioner_upd_interval=10`` refreshes both every 10
steps; set ``curvature_upd_interval=1`` to accumulate statistics on every step while computing the
roots every 10 steps.

Differences from ASDL 0.1 (``asdl/precondition/shampoo.py``):

* Roots by one symmetric eigen-decomposition instead of a coupled Newton iteration (up to 100
  iterations of d x d products plus a power iteration; see :mod:`curvfun.roots`), and the
  statistics are never modified by the root computation (ASDL adds its ridge ``ε·λ_max·I`` to the
  statistics matrix in place on every refresh).
* ``block_size`` is applied. ASDL's maker stores it but builds each ``Preconditioner`` without it,
  so its blocking only affects the distributed work split.
* Conv kernels are preconditioned as ``[out, in·kh·kw]`` matrices with 4th roots; ASDL keeps the
  4-D shape and uses four factors with 8th roots (``2·ndim``).
* Parameters are those of the preconditioned layers (``config.ignore_modules`` applies; tied
  parameters and parameters held directly by container modules keep the plain gradient); ASDL
  preconditions every parameter with ndim > 1 and has no ignore list for Shampoo.
"""

from __future__ import annotations

import optree
import torch
from torch import Tensor, nn

from .. import distributed as cfd
from ..capture import _check_versions, record_layers
from ..roots import descending_eigh, eigen_power_from, warm_eigh
from ..shampoo_math import (
    apply_rotated,
    as_matrix,
    block_slices,
    centered_rows,
    merge_blocks,
    needs_float64,
    precondition_matrix,
    precondition_rows,
    prefer_factored,
    resolved_floor,
    rotate_rows,
    row_tiles,
    row_tiles_with_grams,
    rows_pay,
    shampoo_roots,
    split_blocks,
    update_statistics,
    update_statistics_from_rows,
)
from ._layer_pass import add_grad, backward_with_rows, holds_gradient, module_infos, rows_route_module
from .base import PreconditionedGradientMaker
from .config import PreconditioningConfig

__all__ = ["ShampooGradientMaker"]

_DAMPING_MODES = ("relative", "absolute")
_ROOT_METHODS = ("eigh", "warm")
_DATA_SPACE = ("auto", "never")
_PRECISIONS = ("auto", "float64", "native")


def _check_count(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an int >= 1{extra}, got {value!r}")


def _check_shampoo_args(block_size, damping_mode, init_scale, root_method, warm_iters, eigh_every, basis_every,
                        data_space, precision="auto") -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int (-1 for no blocking), got {block_size!r}")
    if block_size == 0 or block_size < -1:
        raise ValueError(
            f"block_size must be a positive tile size or -1 for no blocking, got {block_size}"
        )
    if damping_mode not in _DAMPING_MODES:
        raise ValueError(f"damping_mode must be one of {_DAMPING_MODES}, got {damping_mode!r}")
    if root_method not in _ROOT_METHODS:
        raise ValueError(f"root_method must be one of {_ROOT_METHODS}, got {root_method!r}")
    if data_space not in _DATA_SPACE:
        raise ValueError(f"data_space must be one of {_DATA_SPACE} ('auto': Linear layers through their rows "
                         f"where cheaper; 'never': plain backward), got {data_space!r}")
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS} ('auto': float64 statistics where the damping "
                         f"is below what float32 resolves; 'native': the parameters' dtype), got {precision!r}")
    _check_count("warm_iters", warm_iters)
    _check_count("eigh_every", eigh_every, allow_none=True)
    _check_count("basis_every", basis_every)
    if not (isinstance(init_scale, (int, float)) and init_scale >= 0):
        raise ValueError(f"init_scale must be a number >= 0, got {init_scale!r}")


class ShampooGradientMaker(PreconditionedGradientMaker):
    """Shampoo gradient preconditioning (see the module docstring).

    Args:
        model: the model.
        config: :class:`PreconditioningConfig`; uses ``damping`` (ε), ``ema_decay``, the schedules
            and ``ignore_modules``.
        block_size: tiles of at most ``block_size x block_size`` with their own statistics;
            ``-1`` (default) or any value <= 0: one tile per parameter.
        damping_mode: ``"relative"`` (default, ASDL): δ = ε·λ_max per factor; ``"absolute"``:
            δ = ε.
        init_scale: the statistics start at ``init_scale · I`` (default 1e-12, as ASDL).
        seed: see :class:`PreconditionedGradientMaker` (Shampoo draws no random numbers).
        inverse_mode: under ``torch.distributed``, ``"assigned"`` (default: each parameter's roots
            computed by one rank, chosen by cost Σ d³, and broadcast) or ``"replicated"`` (every
            rank computes every root: no communication, more compute).
        root_method: ``"eigh"`` (default, exact) or ``"warm"`` (warm-started subspace iteration,
            see the module docstring).
        warm_iters: subspace-iteration steps per basis refresh (``"warm"`` only; default 1).
        eigh_every: a full ``eigh`` every this many refreshes of a factor (``"warm"`` only;
            default 50; None: only on the first refresh and as the non-finite fallback).
        basis_every: the subspace step on every this many refreshes; between them only the
            eigenvalues diag(Qᵀ M Q) are refreshed (``"warm"`` only; default 1: every refresh).
        data_space: ``"auto"`` (default): Linear layers with few rows against their widths go
            through their rows (see the module docstring); ``"never"``: plain ``loss.backward()``.
        precision: ``"auto"`` (default): float64 statistics for parameters narrower than float64
            when the damping is below what their dtype resolves (see the module docstring);
            ``"float64"``: always; ``"native"``: the parameters' dtype.

    Under ``torch.distributed`` the gradients are averaged over ranks before the statistics are
    updated (by DDP, or by the maker when the model is not wrapped), so the statistics are those
    of the mean gradient, as in one process on the concatenated batch, and identical on every
    rank without any curvature collective (averaging per-rank G_r G_rᵀ would give another
    matrix); only the roots are communicated, on preconditioner steps, in ``"assigned"`` mode.
    """

    _state_attributes = ("statistics", "roots", "bases", "warm_counts", "eigen_fresh")
    _settings = ("block_size", "damping_mode", "init_scale", "root_method", "warm_iters", "eigh_every", "basis_every",
                 "data_space", "precision")

    def __init__(
        self,
        model: nn.Module,
        config: PreconditioningConfig | None = None,
        block_size: int = -1,
        *,
        damping_mode: str = "relative",
        init_scale: float = 1e-12,
        seed: int | None = None,
        inverse_mode: str = "assigned",
        root_method: str = "eigh",
        warm_iters: int = 1,
        eigh_every: int | None = 50,
        basis_every: int = 1,
        data_space: str = "auto",
        precision: str = "auto",
    ) -> None:
        _check_shampoo_args(block_size, damping_mode, init_scale, root_method, warm_iters, eigh_every, basis_every,
                            data_space, precision)
        super().__init__(model, config, seed=seed, inverse_mode=inverse_mode)
        self.block_size = block_size
        self.damping_mode = damping_mode
        self.init_scale = float(init_scale)
        #: parameter key ("layer.weight") -> list over tiles of [L, R]
        self.statistics: dict[str, list[list[Tensor]]] = {}
        self.root_method = root_method
        self.warm_iters = warm_iters
        self.eigh_every = eigh_every
        self.basis_every = basis_every
        #: parameter key -> list over tiles of [L^{-1/4}, R^{-1/4}], each root the dense matrix or
        #: its factors [Q, w] (root = Q diag(w) Qᵀ), whichever is cheaper to apply (prefer_factored)
        self.roots: dict[str, list[list]] = {}
        #: ``"warm"`` only: parameter key -> list over tiles of [[Q_L, λ_L], [Q_R, λ_R]] (eigenbasis,
        #: columns by descending eigenvalue, and eigenvalue estimates of the statistics)
        self.bases: dict[str, list[list[list[Tensor]]]] = {}
        #: ``"warm"`` only: parameter key -> refreshes since its last full eigh
        self.warm_counts: dict[str, int] = {}
        #: ``"warm"`` only: parameter key -> whether the λ in :attr:`bases` are diag(Qᵀ S Q) of the
        #: current statistics S (so that the next update can move them by the rotated gradient)
        self.eigen_fresh: dict[str, bool] = {}
        #: within one step: parameter key -> rotated gradient tiles, Q_Lᵀ G Q_R or from the rows the
        #: pair (Q_Lᵀ gᵀ, a Q_R) (not state)
        self._rotated: dict[str, list] = {}
        self.data_space = data_space
        self.precision = precision
        #: within one step: weight key -> (g, a), the (centred, :func:`centered_rows`) rows of the layers
        #: that skip autograd's weight gradient, and their tiles with the R x R Grams
        #: (g_r, a_c, a_c a_cᵀ, g_r g_rᵀ)
        self._rows: dict[str, tuple[Tensor, Tensor]] = {}
        self._row_tiles: dict[str, list[tuple[Tensor, Tensor, Tensor, Tensor]]] = {}
        #: layers that have taken the rows route (introspection)
        self._rows_seen: set[str] = set()

    def _check_settings(self) -> None:
        _check_shampoo_args(*(getattr(self, name) for name in self._settings))

    # --- which parameters ----------------------------------------------------------------------
    def _matrix_params(self) -> dict[str, nn.Parameter]:
        out = {}
        for name in self.preconditioned_modules:
            for local, p in self.module_params(name).items():
                if p.ndim >= 2 and p.numel() > 0:
                    out[f"{name}.{local}" if name else local] = p
        return out

    def _plain_parameters_in_layers(self) -> dict[str, str]:
        matrix = {id(p) for p in self._matrix_params().values()}
        return {_key(name, local): "1-D: Shampoo preconditions matrices and tensors only, as ASDL"
                for name in self.preconditioned_modules for local, p in self.module_params(name).items()
                if id(p) not in matrix}

    def do_forward_and_backward(self, step: int | None = None) -> bool:
        return True

    # --- the pass, through the rows where cheaper ----------------------------------------------
    def _rows_candidates(self) -> dict:
        """Linear layers that may take their weight gradient from the rows this step."""
        if self.data_space != "auto" or cfd.is_distributed():
            return {}
        matrix = self._matrix_params()
        mods = {name: m for name, m in self.preconditioned_modules.items()
                if rows_route_module(m) and matrix.get(_key(name, "weight")) is m.weight}
        return module_infos(mods)

    def _rows_would_pay(self, name: str, x: Tensor) -> bool:
        """Detach the layer's own parameters for this call (its input ``x``) iff its rows pay."""
        m = self.preconditioned_modules[name]
        return rows_pay(x.numel() // max(x.shape[-1], 1), m.out_features, m.in_features, self.block_size)

    def plain_pass(self) -> None:
        """The step's forward and backward: recorded, with the candidate layers' own parameters
        detached during their calls (:func:`~curvfun.precondition._layer_pass.backward_with_rows`);
        a layer keeps its rows (a, g) where :func:`rows_pay` says so and nothing else reached its
        weight's ``.grad`` (an outside use, accumulated micro-batches), else gets gᵀa added there."""
        infos = self._rows_candidates()
        if not infos:
            return super().plain_pass()
        with record_layers(infos, detach=self._rows_would_pay, only_detached=True) as records:
            self.forward()
        for name, (a, g) in backward_with_rows(self, records).items():
            params = self.module_params(name)
            if "bias" in params:
                add_grad(params["bias"], g.sum(0))
            w = params["weight"]
            if holds_gradient(w) or not rows_pay(a.shape[0], w.shape[0], w.shape[1], self.block_size):
                add_grad(w, g.T @ a)  # the formed gradient (plus what was there)
            else:
                dtype = self._work_dtype(_key(name, "weight"), w)
                self._rows[_key(name, "weight")] = centered_rows(g.to(dtype), a.to(dtype))
                self._rows_seen.add(name)
        _check_versions(records)

    def _tiles_from_rows(self, key: str) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """:func:`row_tiles_with_grams` of ``key``'s rows, once per step."""
        if key not in self._row_tiles:
            self._row_tiles[key] = row_tiles_with_grams(*self._rows[key], self.block_size)
        return self._row_tiles[key]

    # --- the three stages ----------------------------------------------------------------------
    def update_curvature(self) -> None:
        decay = self.config.ema_decay
        for key, p in self._matrix_params().items():
            rows = key in self._rows
            if p.grad is None and not rows:
                continue
            stats = self.statistics.get(key)
            if stats is None:
                dtype = self._work_dtype(key, p)
                stats = [
                    [self.init_scale * _eye(r.stop - r.start, p, dtype), self.init_scale * _eye(c.stop - c.start, p, dtype)]
                    for r, c in block_slices((p.shape[0], p[0].numel()), self.block_size)
                ]
            new, tiles = self._updated_statistics(key, p, stats, decay)
            if self._promote(p, new):  # damping below what the parameter's dtype resolves
                stats = [[S.double() for S in pair] for pair in stats]
                if rows:
                    self._rows[key] = tuple(t.double() for t in self._rows[key])
                    self._row_tiles.pop(key, None)
                for kept in (self.roots, self.bases):  # applied to float64 gradients from now on
                    if key in kept:
                        kept[key] = optree.tree_map(lambda t: t.double(), kept[key])
                new, tiles = self._updated_statistics(key, p, stats, decay)
            # PSD matrices are finite iff their diagonals are (|S_ij| <= sqrt(S_ii S_jj), NaN shows on
            # the diagonal): a d-vector check instead of a scan of every entry
            if all(bool(torch.isfinite(S.diagonal()).all()) for pair in new for S in pair):
                self.statistics[key] = new
                if self.root_method == "warm":
                    self._track_eigenvalues(key, tiles, decay)
            else:
                self.statistics[key] = self._install_if_finite(key, new, stats, "statistics")

    def _updated_statistics(self, key: str, p: Tensor, stats: list, decay: float) -> tuple[list, list]:
        """The statistics of ``key`` after this step's gradient (from its rows or its ``.grad``, in
        the statistics' dtype), and the gradient tiles they took."""
        if key in self._rows:
            tiles = self._tiles_from_rows(key)
            return [list(update_statistics_from_rows(L, R, g, a, decay, aa, gg))
                    for (L, R), (g, a, aa, gg) in zip(stats, tiles)], tiles
        tiles = split_blocks(as_matrix(p.grad.detach()).to(stats[0][0].dtype), self.block_size)
        return [list(update_statistics(L, R, tile, decay)) for (L, R), tile in zip(stats, tiles)], tiles

    def _work_dtype(self, key: str, p: Tensor) -> torch.dtype:
        """The dtype of ``key``'s statistics, roots and preconditioning: that of its statistics once
        they exist; else float64 with ``precision="float64"``, or with ``"auto"`` where the relative
        damping is below what the parameter's dtype resolves (:func:`needs_float64`); else ``p``'s."""
        stats = self.statistics.get(key)
        if stats is not None:
            return stats[0][0].dtype
        if self.precision == "float64" or (self.precision == "auto" and self.damping_mode == "relative"
                                           and needs_float64(p.dtype, float(self.config.damping))):
            return torch.float64
        return p.dtype

    def _promote(self, p: Tensor, new: list) -> bool:
        """``precision="auto"``: whether statistics still in the parameter's dtype must move to
        float64 (:func:`needs_float64`): at relative damping ε (e.g. lowered since they were made),
        or at absolute δ against their largest diagonal entry (a lower bound of λ_max); once moved
        they stay."""
        if self.precision != "auto" or new[0][0].dtype == torch.float64:
            return False
        damping = float(self.config.damping)
        if self.damping_mode == "relative":
            return needs_float64(p.dtype, damping)
        top = max(float(S.diagonal().max()) for pair in new for S in pair)
        return top > 0 and needs_float64(p.dtype, damping / top)

    def _keeps_basis(self, key: str) -> bool:
        """``"warm"``: whether the next refresh of ``key`` keeps its basis (see :meth:`_warm_bases`)."""
        count, old = self.warm_counts.get(key, 0), self.bases.get(key)
        full = old is None or (self.eigh_every is not None and count >= self.eigh_every)
        return not full and count % self.basis_every != 0

    def _track_eigenvalues(self, key: str, tiles: list, decay: float) -> None:
        """``"warm"``, after the statistics of ``key`` took ``tiles`` (gradient tiles, or the
        :meth:`_tiles_from_rows`): when this step's refresh keeps the basis and the kept λ were
        current, move them by the rotated gradient G' = Q_Lᵀ G Q_R (λ_L ← α·λ_L + β·rowsq(G'),
        λ_R ← α·λ_R + β·colsq(G'), exactly diag(QᵀSQ) of the updated S) and keep G' (from rows:
        its factors, :func:`rotate_rows`) for :meth:`precondition`; otherwise mark λ stale."""
        fresh = self.eigen_fresh.get(key, False)
        self.eigen_fresh[key] = False
        if not (fresh and self.do_update_preconditioner() and self._keeps_basis(key)):
            return
        alpha, beta = (1.0, 1.0) if decay == -1 else (1.0 - decay, float(decay))
        rotated = []
        for (L_pair, R_pair), G in zip(self.bases[key], tiles):
            if isinstance(G, Tensor):
                Gr = L_pair[0].T @ G @ R_pair[0]
                # squared row / column norms without a d_out x d_in temporary
                rowsq, colsq = torch.linalg.vector_norm(Gr, dim=1).square_(), torch.linalg.vector_norm(Gr, dim=0).square_()
            else:
                g, a, aa, gg = G
                U, V, rowsq, colsq = rotate_rows(g, a, L_pair[0], R_pair[0], aa, gg)
                Gr = (U, V)
            L_pair[1] = torch.add(L_pair[1] * alpha, rowsq, alpha=beta)
            R_pair[1] = torch.add(R_pair[1] * alpha, colsq, alpha=beta)
            rotated.append(Gr)
        self._rotated[key] = rotated
        self.eigen_fresh[key] = True

    def update_preconditioner(self) -> None:
        relative = self.damping_mode == "relative"
        damping = float(self.config.damping)
        owners = cfd.owners_for(self.inverse_mode, {k: cfd.inverse_cost(v) for k, v in self.statistics.items()})
        me = cfd.rank()
        params = self._matrix_params()
        for key, stats in self.statistics.items():
            if owners is not None and owners[key] != me:
                continue
            # float64 statistics of narrower gradients: eigenvalues below their rounding are floored
            p = params.get(key)
            floor = resolved_floor(p.dtype) if p is not None and p.dtype != stats[0][0].dtype else 0.0
            if self.root_method == "warm":
                powers = [
                    [eigen_power_from(lam, Q, -0.25, damping, relative, floor) for Q, lam in pair]
                    for pair in self._warm_bases(key, stats)
                ]
            else:
                # statistics are sums of Gram matrices: eigh reads their lower triangles as they are
                powers = [shampoo_roots(L, R, damping, relative, symmetrize=False, floor=floor) for L, R in stats]
            # each root dense or factored, whichever is cheaper to apply until the next refresh
            tracked = key in self._rotated  # the rotated gradient exists: apply factored
            # each root acts on the other side's width, or on the R rows of a layer that takes its
            # gradient from its rows (then (L^{-1/4}gᵀ)(a R^{-1/4}))
            n_rows = self._rows[key][0].shape[0] if key in self._rows else None
            roots = [
                [self._root_form(eL, n_rows or R.shape[0], tracked), self._root_form(eR, n_rows or L.shape[0], tracked)]
                for (eL, eR), (L, R) in zip(powers, stats)
            ]
            # the roots Q diag(w) Qᵀ are finite iff the powered eigenvalues w are (Q is orthogonal)
            if all(bool(torch.isfinite(e.w).all()) for pair in powers for e in pair):
                self.roots[key] = roots
            else:
                self.roots[key] = self._install_if_finite(key, roots, self.roots.get(key), "inverse root")
        if owners is not None:
            mine = {k: self.roots.get(k) for k in self.statistics if owners[k] == me}
            for key, value in cfd.broadcast_from_owners(mine, owners, self.step).items():
                if value is None:
                    self.roots.pop(key, None)
                else:
                    self.roots[key] = value

    def _root_form(self, power, n: int, factored: bool = False):
        """The dense root, or ``[Q, w]`` when ``factored`` or :func:`prefer_factored` says applying
        it factored to the d x n side until the next refresh is cheaper."""
        interval = max(1, int(self.config.preconditioner_upd_interval))
        if factored or prefer_factored(power.Q.shape[-1], n, interval):
            return [power.Q, power.w]
        return power.matrix()

    def _warm_bases(self, key: str, stats: list[list[Tensor]]) -> list[list[list[Tensor]]]:
        """``"warm"``: new [[Q_L, λ_L], [Q_R, λ_R]] per tile from the kept bases (see the module
        docstring for when a full eigh runs); stores them in :attr:`bases`."""
        count = self.warm_counts.get(key, 0)
        old = self.bases.get(key)
        full = old is None or (self.eigh_every is not None and count >= self.eigh_every)
        iters = self.warm_iters if count % self.basis_every == 0 else 0
        if not full and iters == 0 and key in self._rotated:  # λ already moved by the rotated gradient
            self.warm_counts[key] = count + 1
            return old
        new = []
        for i, pair in enumerate(stats):
            tile = []
            for j, S in enumerate(pair):
                lam = None
                if not full:
                    lam, Q = warm_eigh(S, old[i][j][0], iters)
                    if not bool(torch.isfinite(lam).all()):  # NaN/inf in Q shows in λ = diag(QᵀSQ)
                        lam = None
                if lam is None:
                    lam, Q = descending_eigh(S, symmetrize=False)
                tile.append([Q, lam])
            new.append(tile)
        self.bases[key] = new
        self.warm_counts[key] = 1 if full else count + 1
        self.eigen_fresh[key] = True
        return new

    def precondition(self) -> None:
        for key, p in self._matrix_params().items():
            roots = self.roots.get(key)
            rows = self._rows.get(key)
            if rows is not None:
                g, a = rows
                if roots is None:  # no roots yet: the plain gradient gᵀa
                    add_grad(p, (g.T @ a).reshape(p.shape))
                    continue
            elif roots is None or p.grad is None:
                continue
            rotated = self._rotated.get(key)
            if rotated is not None and self._rotated_matches(key, roots):
                # Q_L (w_L ⊙ G' ⊙ w_R) Q_Rᵀ with G' = Q_Lᵀ G Q_R from _track_eigenvalues
                tiles = [apply_rotated(Gr, Lr, Rr) for (Lr, Rr), Gr in zip(roots, rotated)]
            elif rows is not None:
                tiles = [precondition_rows(g_r, a_c, Lr, Rr) for (Lr, Rr), (g_r, a_c) in zip(roots, row_tiles(g, a, self.block_size))]
            else:
                G = as_matrix(p.grad.detach()).to(self._work_dtype(key, p))
                tiles = [precondition_matrix(t, Lr, Rr) for (Lr, Rr), t in zip(roots, split_blocks(G, self.block_size))]
            shape = (p.shape[0], p[0].numel())
            new = tiles[0] if len(tiles) == 1 else merge_blocks(tiles, shape, self.block_size)
            if rows is not None:  # .grad is None or zeros here (else the layer took the formed gradient)
                add_grad(p, new.reshape(p.shape))
            else:
                p.grad.copy_(new.reshape(p.grad.shape))


    def _rotated_matches(self, key: str, roots: list[list]) -> bool:
        """Whether the installed roots of ``key`` are factored in the very bases the rotated
        gradient was computed with (not so after a rejected refresh or a broadcast)."""
        bases = self.bases.get(key)
        return bases is not None and all(
            not isinstance(r, Tensor) and r[0] is pair[0]
            for (Lr, Rr), (Lb, Rb) in zip(roots, bases) for r, pair in ((Lr, Lb), (Rr, Rb))
        )

    def _startup(self) -> None:
        self._rotated, self._rows, self._row_tiles = {}, {}, {}

    def _teardown(self) -> None:
        self._rotated, self._rows, self._row_tiles = {}, {}, {}


def _key(module: str, local: str) -> str:
    return f"{module}.{local}" if module else local


def _eye(d: int, like: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.eye(d, dtype=dtype, device=like.device)
