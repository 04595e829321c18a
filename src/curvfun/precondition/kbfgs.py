"""``KronBfgsGradientMaker``: K-BFGS (Goldfarb, Ren & Bahamou 2020) for Linear and Conv2d layers.

Which pure functions are called when (math in :mod:`curvfun.kbfgs_math`):

* **curvature steps** make the pass with the layers recorded (:func:`curvfun.capture.record_layers`
  around the usual forward and backward), and read per layer the mean input ā, the input second
  moment A_batch = (1/(N·T)) Σ a aᵀ (conv: im2col patches, T output pixels), the mean pre-activation
  z̄ = W ā + b and the mean output-gradient ḡ = (1/N) Σ_{n,t} ∂ℓ_n/∂z_nt. When an earlier curvature
  step left a snapshot θ₀ of the parameters, the same mini-batch is first evaluated at θ₀ (a
  functional forward and a backward to the recorded layers only; ``param.grad`` is not touched),
  giving z̄₀ and ḡ₀, and the B-side pair (s, y) = (z̄ − z̄₀, ḡ − ḡ₀) (skipped when y is at the
  rounding level of the sums, e.g. before a train-mode BatchNorm). Then θ is snapshotted.
* **preconditioner steps** apply the latest fresh data once:
  A ← EMA of A_batch (``config.ema_decay``; -1: A = A_batch), H_a ← (A + δ_A I)^{-1} the first time,
  then H_a ← BFGS(H_a, s_a = H_a ā, y_a = (A + δ_A I) s_a); with ``minibatch_hessian_action=True``
  (once H_a exists) y_a = (1/(N·T)) aᵀ(a s_a) + δ_A s_a from the batch alone and no A is kept.
  H_g (starting at I) ← BFGS(H_g, Powell-LM-damped (s, y)) with μ₁ = ``mu1``, μ₂ = δ_B.
* **every step**: G_W ← H_g G_W H_a and g_b ← H_g g_b once both inverses exist (until the first B
  pair, i.e. on the first curvature step, the gradient stays plain, as in ASDL).

Damping: λ = ``config.damping``; δ_A = sqrt(λ/T), δ_B = sqrt(λ·T) with T the number of positions
(1 for a Linear on ``[N, d]`` inputs, output pixels for a Conv2d): with A averaged over positions
and B summed over them (the GUIDE's conv convention) this is the π-heuristic's balance for
A ~ O(1), B ~ O(T).

Cost per curvature step: one extra forward and backward (the evaluation at θ₀; ASDL makes the
same extra pass) and O(d_in² + d_out²) per layer for the BFGS updates (plus O(N·T·d_in²) to form
A_batch unless ``minibatch_hessian_action``); memory: one copy of the trainable parameters.

Differences from ASDL 0.1 (``asdl/precondition/kbfgs.py``):

* The B pair is measured at the next curvature step, on *that* step's mini-batch, between the
  snapshot θ₀ and the current θ (ASDL re-runs the previous step's mini-batch at the start of the
  next step, which needs that batch kept around). Both compare the two parameter values on one
  mini-batch; this way the resumable state is a parameter snapshot, not a batch of inputs.
* y uses output-gradients of the per-sample losses (ḡ above); ASDL averages the gradients of the
  mean loss over the batch, which is ḡ/N, so its B is N times smaller than the layer's curvature
  and its Levenberg-Marquardt damping correspondingly stronger.
* With ``ema_decay=-1`` (the config default) A is the latest batch's; ASDL computes
  ``A·(1 - (-1)) + (-1)·A_new``, i.e. 2A − A_new, so it needs an explicit ``ema_decay``.
* The mini-batch Hessian action divides by N·T (ASDL's sums over the batch without dividing).
* Convolutions with ``groups > 1`` are left plain (reported as unsupported).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..capture import override_parents, record_layers
from ..kbfgs_math import bfgs_inverse_update, hessian_action_pair, kbfgs_precondition, powell_lm_damping
from ..linalg import damped_cholesky_inverse
from ._layer_pass import eps_leaves, linear_or_conv_reason, module_infos, name_outside_uses, records_to_data
from .base import PreconditionedGradientMaker, unwrap_model
from .config import PreconditioningConfig

__all__ = ["KronBfgsGradientMaker"]


def _check_kbfgs_args(mu1, minibatch_hessian_action) -> None:
    if isinstance(mu1, bool) or not isinstance(mu1, (int, float)) or not 0 < mu1 < 1:
        raise ValueError(f"mu1 (Powell's damping threshold) must be in (0, 1), got {mu1!r}")
    if not isinstance(minibatch_hessian_action, bool):
        raise TypeError(f"minibatch_hessian_action must be a bool, got {minibatch_hessian_action!r}")


class KronBfgsGradientMaker(PreconditionedGradientMaker):
    """K-BFGS with Powell and Levenberg-Marquardt damping (see the module docstring).

    Args:
        model: the model.
        config: :class:`PreconditioningConfig`; uses ``damping`` (> 0), ``ema_decay`` (for A), the
            schedules and ``ignore_modules``.
        minibatch_hessian_action: the A-side pair from the mini-batch only (no A kept). (default False)
        mu1: Powell's damping threshold μ₁ in (0, 1). (default 0.2)
        seed: see :class:`PreconditionedGradientMaker` (K-BFGS draws no random numbers).
    """

    #: curvature from each rank's own batch; the preconditioned gradients are averaged (base class)
    _local_curvature = True

    _state_attributes = ("A", "H_a", "H_g", "snapshot", "pending", "pending_fresh")
    _settings = ("mu1", "minibatch_hessian_action")

    def __init__(
        self,
        model: nn.Module,
        config: PreconditioningConfig | None = None,
        minibatch_hessian_action: bool = False,
        mu1: float = 0.2,
        *,
        seed: int | None = None,
    ) -> None:
        _check_kbfgs_args(mu1, minibatch_hessian_action)
        if config is None:
            config = PreconditioningConfig(damping=1e-3)
        super().__init__(model, config, seed=seed)
        self.minibatch_hessian_action = minibatch_hessian_action
        self.mu1 = float(mu1)
        self.A: dict[str, Tensor] = {}  # EMA of the input second moment
        self.H_a: dict[str, Tensor] = {}
        self.H_g: dict[str, Tensor] = {}
        #: parameter name -> value at the latest curvature step (θ₀)
        self.snapshot: dict[str, Tensor] = {}
        #: layer -> data of the latest curvature step: A_batch, a_mean, positions T, (s, y) or absent
        self.pending: dict[str, dict[str, Tensor]] = {}
        self.pending_fresh = False

    def _check_settings(self) -> None:
        _check_kbfgs_args(self.mu1, self.minibatch_hessian_action)

    def _check_config(self, config: PreconditioningConfig) -> None:
        if not config.damping > 0:
            raise ValueError(
                f"KronBfgsGradientMaker needs damping > 0 (the Levenberg-Marquardt damping of the B side "
                f"and the Tikhonov damping of A), got damping={config.damping}"
            )

    def _unsupported_reason(self, name: str, module: nn.Module) -> str | None:
        reason = linear_or_conv_reason(module, "K-BFGS")
        return reason

    def _dampings(self, T: int) -> tuple[float, float]:
        lam = float(self.config.damping)
        return math.sqrt(lam / T), math.sqrt(lam * T)

    # --- the captured evaluations --------------------------------------------------------------
    def _layer_stats(self, data, weight: Tensor, bias: Tensor | None, second_moment: bool):
        a = data.a[:, 0]  # [N, T, d_in] (groups == 1)
        N, T, d = a.shape
        rows = a.reshape(N * T, d)
        a_mean = rows.mean(0)
        z_mean = weight.reshape(weight.shape[0], -1) @ a_mean
        if bias is not None:
            z_mean = z_mean + bias
        g = data.g[0, :, 0]  # [N, T, d_out], gradients of the registered loss
        out = {"a_mean": a_mean, "z_mean": z_mean, "g_sum": g.sum((0, 1)), "g_abs": g.abs().sum((0, 1)), "T": T}
        if second_moment:
            out["A_batch"] = rows.T @ rows / (N * T)
        elif self.minibatch_hessian_action:
            out["rows"] = rows
        return out

    def _per_sample_scale(self) -> float:
        """Turns Σ_{n,t} ∂L/∂z into (1/N) Σ_{n,t} ∂ℓ_n/∂z: 1 for a mean loss, 1/N for a sum."""
        from ._layer_pass import user_reduction

        return 1.0 if user_reduction(self) == "mean" else 1.0 / self._batch_size

    def update_curvature(self) -> None:
        infos = module_infos(self.preconditioned_modules)
        before = {}
        if self.snapshot:
            with torch.enable_grad():
                with record_layers(infos, parents=override_parents(unwrap_model(self.model), infos)) as records:
                    out0 = self.model_output_at(self.snapshot)
                loss0 = self.loss_from_output(out0)
                leaves = eps_leaves(records)
                grads = torch.autograd.grad(loss0, leaves, allow_unused=True) if leaves else []
            for name, data in records_to_data(records, 1.0, list(grads)).items():
                w0, b0 = self._weight_and_bias(name, self.snapshot)
                before[name] = self._layer_stats(data, w0, b0, second_moment=False)
        with record_layers(infos, tap=True, parents=override_parents(unwrap_model(self.model), infos)) as records:
            self.forward()
            name_outside_uses(self, records, self._outside_warned)
            self.backward()
        out = self.model_output
        self._batch_size = _batch_size_of(records)
        scale = self._per_sample_scale()
        pending = {}
        need_A = not (self.minibatch_hessian_action and self.H_a)
        for name, data in records_to_data(records, 1.0).items():
            w, b = self._weight_and_bias(name)
            st = self._layer_stats(data, w, b, second_moment=need_A)
            entry = {"a_mean": st["a_mean"], "T": torch.tensor(st["T"])}
            if "A_batch" in st:
                entry["A_batch"] = st["A_batch"]
            if "rows" in st:
                entry["rows"] = st["rows"]
            if name in before:
                if _rounding_only(st, before[name]):  # no B-side signal: H_g stays I
                    entry["z_dim"] = torch.tensor(st["z_mean"].shape[0])
                else:
                    entry["s"] = (st["z_mean"] - before[name]["z_mean"]).detach()
                    entry["y"] = ((st["g_sum"] - before[name]["g_sum"]) * scale).detach()
            pending[name] = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in entry.items()}
        self.pending = pending
        self.pending_fresh = True
        self.snapshot = {k: p.detach().clone() for k, p in unwrap_model(self.model).named_parameters() if p.requires_grad}
        del out

    def _weight_and_bias(self, name: str, snapshot: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor | None]:
        """The layer's weight and bias (detached) for its pre-activations: from ``snapshot`` where
        it holds them (trainable ones), else the module's own (a frozen weight or bias)."""
        m = self.preconditioned_modules[name]
        key = self._keys[name]
        out = []
        for local in ("weight", "bias"):
            if snapshot is not None and local in key:
                out.append(snapshot[key[local]])
            else:
                p = getattr(m, local, None)
                out.append(None if p is None else p.detach())
        return out[0], out[1]

    @property
    def _keys(self) -> dict[str, dict[str, str]]:
        keys = {}
        for name in self.preconditioned_modules:
            keys[name] = {local: (f"{name}.{local}" if name else local) for local in self.module_params(name)}
        return keys

    # --- BFGS updates ----------------------------------------------------------------------------
    def update_preconditioner(self) -> None:
        if not self.pending_fresh:
            return
        decay = self.config.ema_decay
        for name, d in self.pending.items():
            T = int(d["T"])
            delta_a, delta_b = self._dampings(T)
            # A side
            H_a = self.H_a.get(name)
            if "A_batch" in d:
                A_new = d["A_batch"]
                A_old = self.A.get(name)
                A = A_new if (A_old is None or decay == -1) else (1 - decay) * A_old + decay * A_new
                self.A[name] = A
                if H_a is None:
                    H_a = damped_cholesky_inverse(A, delta_a, what="input second moment A")
                A_times = A
            else:  # mini-batch Hessian action: (1/(N·T)) aᵀ(a s)
                rows = d["rows"]
                A_times = lambda v, r=rows: r.T @ (r @ v) / r.shape[0]  # noqa: E731
            s_a, y_a = hessian_action_pair(H_a, A_times, d["a_mean"], delta_a)
            if _curvature_ok(s_a, y_a):
                H_a = bfgs_inverse_update(H_a, s_a, y_a)
            self.H_a[name] = self._install_if_finite(name, H_a, self.H_a.get(name), "H_a")
            # B side
            if "s" in d:
                H_g = self.H_g.get(name)
                if H_g is None:
                    H_g = torch.eye(d["s"].shape[0], dtype=d["s"].dtype, device=d["s"].device)
                s, y = powell_lm_damping(H_g, d["s"], d["y"], self.mu1, delta_b)
                if _curvature_ok(s, y):
                    H_g = bfgs_inverse_update(H_g, s, y)
                self.H_g[name] = self._install_if_finite(name, H_g, self.H_g.get(name), "H_g")
            elif "z_dim" in d and name not in self.H_g:
                self.H_g[name] = torch.eye(int(d["z_dim"]), dtype=H_a.dtype, device=H_a.device)
        self.pending_fresh = False

    def precondition(self) -> None:
        for name in self.preconditioned_modules:
            H_a, H_g = self.H_a.get(name), self.H_g.get(name)
            if H_a is None or H_g is None:
                continue
            ps = self.module_params(name)
            w, b = ps.get("weight"), ps.get("bias")
            if w is None:  # frozen weight: the bias by its own block H_g
                if b is not None and b.grad is not None:
                    b.grad.copy_(H_g @ b.grad)
                continue
            if w.grad is None:
                continue
            Gw, gb = kbfgs_precondition(H_g, H_a, w.grad.reshape(w.shape[0], -1), None if b is None else b.grad)
            w.grad.copy_(Gw.reshape(w.shape))
            if gb is not None:
                b.grad.copy_(gb)


def _rounding_only(now: dict, before: dict) -> bool:
    """Whether the B-side y = ḡ − ḡ₀ is at the rounding level of the sums it differences
    (‖y‖ ≤ 10³·ε·(Σ|g| + Σ|g₀|)). Then there is no curvature signal — e.g. a layer feeding a
    train-mode BatchNorm, whose output gradients sum to zero over the batch — and BFGS, which is
    invariant to the pair's scale, would turn rounding noise into an O(1) change of H_g (one
    that differs between devices). Such a pair is skipped."""
    y = now["g_sum"] - before["g_sum"]
    level = 1e3 * torch.finfo(y.dtype).eps * (now["g_abs"].norm() + before["g_abs"].norm())
    return bool(y.norm() <= level)


def _curvature_ok(s: Tensor, y: Tensor) -> bool:
    sty = torch.dot(s, y)
    return bool(torch.isfinite(sty)) and bool(sty > torch.finfo(s.dtype).tiny)


def _batch_size_of(records) -> int:
    for rec in records.values():
        if rec.inputs:
            return rec.inputs[0].shape[0]
    return 1
