"""Fisher, GGN and Hessian: dense, block, diagonal and matrix-free.

Conventions (GUIDE): per-sample losses ℓ_n, and every matrix is the curvature of the reduced
loss ``factor · Σ_n ℓ_n``: ``reduction="mean"`` (default, factor 1/N, L = (1/N) Σ_n ℓ_n),
``"sum"`` (factor 1), or a ``torch.nn`` loss module's own (see :mod:`curvfun.reduction`).
Written for the mean:

* ``fisher_type="emp"``:   F = (1/N) Σ_n g_n g_nᵀ,  g_n = ∇_θ ℓ_n;
* ``fisher_type="mc"``:    F = (1/(N·M)) Σ_{n,m} g_nm g_nmᵀ, g_nm the gradient of the NLL at
  a target drawn from the model's predictive distribution;
* ``fisher_type="exact"``: F = (1/N) Σ_n J_nᵀ S_n S_nᵀ J_n with S_n Sᵀ_n the Hessian of the
  NLL w.r.t. the output (the likelihood's closed form; equals the GGN for these losses);
* GGN = (1/N) Σ_n J_nᵀ (∇²_f ℓ_n) J_n (a loss callable: the output Hessian by autograd);
* Hessian = ∇²_θ L by autograd.

Dense ``[P, P]`` matrices are indexed in the insertion order of ``params`` (the order of
``model.named_parameters()`` when built from it; :func:`curvfun.tree.ravel` uses the same
order), each leaf flattened row-major. ``shape="block"`` gives a dict module-name ->
``[P_m, P_m]`` (module name: the parameter name up to its last '.', ``""`` for the root);
``shape="diag"`` a dict like ``params``; ``shape="unit"`` a dict module-name ->
:class:`~curvfun.kron.UnitWiseFactor` (per output unit of an affine layer -- Linear,
convolution, attention projection -- or a norm layer, the exact block over its incoming
weights and bias; see :mod:`curvfun.unit_wise`; parameters of other modules raise).
Fisher and GGN come from the rows of :mod:`curvfun.rows` (linear in N, memory K·N·P for full
and block, no rows at all for the diagonal of registered layers); requests above the dense
limit of :mod:`curvfun.memory` are refused before allocating.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from .capture import FISHER_TYPES, capture, check_batch, output_grad_columns
from .functional import call_model, check_params
from .grads import _check_like, per_sample_grads
from .kron_drivers import scale_factor
from .memory import check_square
from .reduction import loss_value, resolve_loss
from .rows import (column_rows, diag_from_capture, flat, hessian_sqrt_columns, module_indices,
                   output_hessian_columns, rows_shaped, unflat)
from .layers import layer_data
from .precision import full_precision
from .unit_wise import unit_wise_from_dense, unit_wise_from_layer, unit_wise_modules

__all__ = [
    "fisher",
    "ggn",
    "hessian",
    "fisher_vp",
    "ggn_vp",
    "hessian_vp",
    "hutchinson_diag",
    "hutchinson_trace",
    "top_eigenvalues",
    "ggn_rows",
    "SHAPES",
]

SHAPES = ("full", "block", "diag", "unit")


def _check_shape(shape: str) -> None:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _check_fisher_type(fisher_type: str) -> None:
    if fisher_type not in FISHER_TYPES:
        raise ValueError(f"unknown fisher_type {fisher_type!r}; expected one of {FISHER_TYPES}")


def _setup(model, params, inputs, targets, loss, reduction=None):
    params = check_params(model, params)
    N = check_batch(inputs, targets)
    lik, factor = resolve_loss(loss, reduction)
    return params, N, lik, factor


def _finish(result, factor: float, out: Tensor, loss, lik, fac, targets, return_output: bool):
    """Multiply by ``factor`` and, when asked, return ``(result, output, loss)``."""
    if isinstance(result, Tensor):
        result = result * factor
    elif isinstance(result, dict) and all(isinstance(v, Tensor) for v in result.values()):
        result = {k: v * factor for k, v in result.items()}
    if not return_output:
        return result
    with torch.no_grad():
        value = loss_value(loss, lik, fac, out, targets) if targets is not None else None
    return result, out, value


def _columns(lik, fisher_type: str, targets, n_mc_samples: int, generator):
    if fisher_type == "exact":
        return hessian_sqrt_columns(lik, targets)
    return lambda out: output_grad_columns(out, lik, fisher_type, targets, n_mc_samples, generator)


def _rows_curvature(model, params, inputs, targets, lik, columns, shape: str, what: str):
    """Σ_k w_k Σ_n r_kn r_knᵀ (the sum over samples) shaped, and the output."""
    if shape == "diag":
        return diag_from_capture(model, params, inputs, targets, lik, columns, 1.0)
    check_square(f"{what}(shape={shape!r})", params, shape, f"pass shape='diag', use {what}_vp or curvfun.kfac")
    rows, w, out = column_rows(model, params, inputs, targets, lik, columns, what=what)
    return rows_shaped(flat(rows, params, 2), w, params, 1.0, shape), out


def fisher(
    model: nn.Module,
    params: Mapping[str, Tensor],
    inputs: Any,
    targets: Tensor,
    loss: Any = "cross_entropy",
    fisher_type: str = "exact",
    shape: str = "full",
    n_mc_samples: int = 1,
    generator: torch.Generator | None = None,
    reduction: str | None = None,
    return_output: bool = False,
):
    """The Fisher (see the module docstring for the three types, shapes and ``reduction``).

    Rows route (:mod:`curvfun.rows`): one capture with K columns (exact: the output Hessian's
    square root, K = outputs per sample; mc: ``n_mc_samples``; emp: 1), per layer the columns'
    per-sample gradients R ``[K·N, P_layer]`` and RᵀR; linear in N. ``shape="diag"`` forms no
    rows: per layer Σ_k w_k Σ_n (∇ℓ_nk)² from the capture (a Linear: (ĝ²)ᵀ(a²)), O(K·N·P)
    time and O(N·P_layer) memory at most. ``shape="unit"``: one capture, O(K·N·C·(T·d + d²))
    per layer (:func:`curvfun.unit_wise.unit_wise_from_layer`). ``return_output=True``:
    ``(fisher, output, loss)`` with the reduced loss.
    """
    _check_fisher_type(fisher_type)
    _check_shape(shape)
    params, N, lik, fac = _setup(model, params, inputs, targets, loss, reduction)
    if fisher_type != "emp" and not lik.is_likelihood:
        lik.sample(None)  # raises the explanatory error
    if shape == "unit":
        res = _fisher_unit(model, params, inputs, targets, lik, fisher_type, n_mc_samples, generator)
        return _unit_scaled(res, fac, model, params, inputs, targets, loss, lik, return_output)
    if fisher_type == "emp" and targets is None:
        raise ValueError("fisher_type='emp' needs the data targets")
    if fisher_type == "emp" and shape != "diag":
        check_square(f"fisher(shape={shape!r})", params, shape, "pass shape='diag', use fisher_vp or curvfun.kfac")
        G, out = per_sample_grads(model, params, inputs, targets, lik, return_output=True)
        rows = flat(G, params, 1).unsqueeze(0)
        res = rows_shaped(rows, torch.ones(1, dtype=rows.dtype), params, 1.0, shape)
    else:
        res, out = _rows_curvature(model, params, inputs, targets, lik,
                                   _columns(lik, fisher_type, targets, n_mc_samples, generator), shape, "fisher")
    return _finish(res, fac(out, targets), out, loss, lik, fac, targets, return_output)


def _unit_scaled(res, fac, model, params, inputs, targets, loss, lik, return_output):
    """The unit-wise blocks (of the mean) scaled to the loss's reduction: N·factor (e.g. N for a sum)."""
    with torch.no_grad():
        out = call_model(model, {k: v.detach() for k, v in params.items()}, inputs)
    s = fac(out, targets) * out.shape[0]
    if s != 1.0:
        res = {name: scale_factor(f, s) for name, f in res.items()}
    if not return_output:
        return res
    with torch.no_grad():
        return res, out, loss_value(loss, lik, fac, out, targets) if targets is not None else None


def _fisher_unit(model, params, inputs, targets, loss, fisher_type, n_mc_samples, generator) -> dict:
    """``fisher(..., shape="unit")`` from one capture (no Jacobian)."""
    unit_wise_modules(model, params)  # raises for modules without unit-wise blocks
    cap = capture(model, params, inputs, targets, loss, fisher_type, n_mc_samples, generator)
    if cap.unsupported:  # not captured exactly (used outside their forward, not batched)
        names = ", ".join(f"{n or '<root>'} ({why})" for n, (why, _) in cap.unsupported.items())
        raise ValueError(f"fisher(shape='unit') needs each layer's captured data; not available for: {names}. "
                         f"Use shape='block', or ggn / hessian with shape='unit' (dense, exact for any model).")
    with full_precision():
        return {n: unit_wise_from_layer(layer_data(rec, cap.weights)) for n, rec in cap.layers.items()}


def ggn(
    model: nn.Module,
    params: Mapping[str, Tensor],
    inputs: Any,
    targets: Tensor,
    loss: Any = "cross_entropy",
    shape: str = "full",
    reduction: str | None = None,
    return_output: bool = False,
):
    """GGN = factor · Σ_n J_nᵀ H_n J_n, H_n = ∇²_f ℓ_n (factor 1/N for the mean, see
    :mod:`curvfun.reduction`). Rows route (:mod:`curvfun.rows`): the likelihoods' closed-form
    square root of H_n (equal to the exact Fisher), or for a loss callable H_n by autograd and
    its eigendecomposition (indefinite H_n allowed). ``shape="diag"`` forms no rows (see
    :func:`fisher`). ``shape="unit"``: the unit-wise sub-blocks of the dense matrix.
    ``return_output=True``: ``(ggn, output, loss)``."""
    _check_shape(shape)
    params, N, lik, fac = _setup(model, params, inputs, targets, loss, reduction)
    if targets is None:
        raise ValueError("ggn needs the data targets (the output Hessian may depend on them)")
    columns = hessian_sqrt_columns(lik, targets) if lik.is_likelihood else output_hessian_columns(lik, targets)
    if shape == "unit":
        units = unit_wise_modules(model, params)
        M, out = _rows_curvature(model, params, inputs, targets, lik, columns, "full", "ggn")
        res = unit_wise_from_dense(M * fac(out, targets), params, units)
        return _finish(res, 1.0, out, loss, lik, fac, targets, return_output)
    res, out = _rows_curvature(model, params, inputs, targets, lik, columns, shape, "ggn")
    return _finish(res, fac(out, targets), out, loss, lik, fac, targets, return_output)


def ggn_rows(
    model: nn.Module,
    params: Mapping[str, Tensor],
    inputs: Any,
    targets: Tensor | None = None,
    loss: Any = "cross_entropy",
    fisher_type: str = "exact",
    n_mc_samples: int = 1,
    generator: torch.Generator | None = None,
    flatten: bool = False,
) -> tuple[Any, Tensor]:
    """Rows ``r_kn = J_nᵀ c_kn`` and column weights ``w`` ``[K]`` with
    GGN / Fisher of the sum = Σ_k w_k Σ_n r_kn r_knᵀ (divide by N for the mean).

    ``fisher_type="exact"``: c_kn the columns of the output Hessian's square root (GGN = exact
    Fisher for curvfun's likelihoods; for a loss callable, of H_n by autograd, with weights -1
    for an indefinite part); ``"mc"``: sampled NLL gradients (weights 1/M); ``"emp"``: the data
    loss gradient. Rows: a dict like ``params`` with leaves ``[K, N, *shape]``, or with
    ``flatten=True`` one ``[K, N, P]`` tensor (params order). Memory K·N·P (checked against
    :mod:`curvfun.memory`'s limit); time one capture and one GEMM per layer."""
    _check_fisher_type(fisher_type)
    params, N, lik, _ = _setup(model, params, inputs, targets, loss)
    if fisher_type == "exact" and not lik.is_likelihood:
        columns = output_hessian_columns(lik, targets)
    else:
        if fisher_type != "emp" and not lik.is_likelihood:
            lik.sample(None)
        if fisher_type == "emp" and targets is None:
            raise ValueError("fisher_type='emp' needs the data targets")
        columns = _columns(lik, fisher_type, targets, n_mc_samples, generator)
    rows, w, _ = column_rows(model, params, inputs, targets, lik, columns, what="ggn_rows")
    return (flat(rows, params, 2) if flatten else rows), w


def _reshape_dense(M: Tensor, params: Mapping[str, Tensor], shape: str):
    if shape == "full":
        return M
    if shape == "diag":
        return unflat(torch.diagonal(M).clone(), params)
    return {m: M[ix][:, ix] for m, ix in module_indices(params).items()}


def _sum_loss_fn(model, params, inputs, targets, lik) -> Callable[[Tensor], Tensor]:
    def f(flat_: Tensor) -> Tensor:
        out = call_model(model, unflat(flat_, params), inputs)
        return lik.per_sample(out, targets).sum()

    return f


def hessian(
    model: nn.Module,
    params: Mapping[str, Tensor],
    inputs: Any,
    targets: Tensor,
    loss: Any = "cross_entropy",
    shape: str = "full",
    reduction: str | None = None,
    return_output: bool = False,
):
    """∇²_θ of the reduced loss by autograd (reverse-over-reverse). Cost O(P) backward passes."""
    _check_shape(shape)
    params, N, lik, fac = _setup(model, params, inputs, targets, loss, reduction)
    units = unit_wise_modules(model, params) if shape == "unit" else None
    check_square(f"hessian(shape={shape!r})", params, "full", "use hessian_vp, hutchinson_diag or top_eigenvalues")
    flat_ = torch.cat([p.detach().reshape(-1) for p in params.values()])
    with torch.no_grad():
        out = call_model(model, {k: v.detach() for k, v in params.items()}, inputs)
    H = torch.func.jacrev(torch.func.grad(_sum_loss_fn(model, params, inputs, targets, lik)))(flat_)
    H = (H + H.T) / 2 * fac(out, targets)
    res = unit_wise_from_dense(H, params, units) if units is not None else _reshape_dense(H, params, shape)
    return _finish(res, 1.0, out, loss, lik, fac, targets, return_output)


# --- matrix-free products ----------------------------------------------------------


def _out_fn(model, inputs):
    return lambda p: call_model(model, p, inputs)


def hessian_vp(model, params, inputs, targets, vector, loss: Any = "cross_entropy",
               reduction: str | None = None) -> dict[str, Tensor]:
    """H v of the reduced loss (forward-over-reverse). Cost ≈ 2-3 forward+backward passes."""
    params, N, lik, fac = _setup(model, params, inputs, targets, loss, reduction)
    _check_like(params, vector, "vector")
    detached = {k: v.detach() for k, v in params.items()}

    def L(p):
        out = call_model(model, p, inputs)
        return lik.per_sample(out, targets).sum() * fac(out, targets)

    _, hv = torch.func.jvp(torch.func.grad(L), (detached,), ({k: vector[k] for k in params},))
    return hv


def _jvp_vjp(model, params, inputs, vector):
    detached = {k: v.detach() for k, v in params.items()}
    out, Jv = torch.func.jvp(_out_fn(model, inputs), (detached,), ({k: vector[k] for k in params},))
    _, vjp_fn = torch.func.vjp(_out_fn(model, inputs), detached)
    return out, Jv, (lambda u: vjp_fn(u)[0])


def ggn_vp(model, params, inputs, targets, vector, loss: Any = "cross_entropy",
           reduction: str | None = None) -> dict[str, Tensor]:
    """G v = factor · Jᵀ H (J v) (factor 1/N for the mean): one jvp, one output-space
    Hessian-vector product, one vjp."""
    params, N, lik, fac = _setup(model, params, inputs, targets, loss, reduction)
    _check_like(params, vector, "vector")
    out, Jv, vjp_fn = _jvp_vjp(model, params, inputs, vector)

    def g(o):
        return torch.func.grad(lambda o_: lik.per_sample(o_, targets).sum())(o)

    _, HJv = torch.func.jvp(g, (out.detach(),), (Jv,))
    f = fac(out, targets)
    return {k: v * f for k, v in vjp_fn(HJv).items()}


def fisher_vp(
    model,
    params,
    inputs,
    targets,
    vector,
    loss: Any = "cross_entropy",
    fisher_type: str = "exact",
    n_mc_samples: int = 1,
    generator: torch.Generator | None = None,
    reduction: str | None = None,
) -> dict[str, Tensor]:
    """F v without forming F: u = J v (forward mode), then per sample
    ``exact``: S Sᵀ u; ``mc``/``emp``: Σ_k w_k r_k (r_kᵀ u) with r the NLL gradients at
    sampled / data targets; then factor · Jᵀ(·) (factor 1/N for the mean). Cost: one jvp + one vjp."""
    _check_fisher_type(fisher_type)
    params, N, lik, fac = _setup(model, params, inputs, targets, loss, reduction)
    _check_like(params, vector, "vector")
    if fisher_type != "emp" and not lik.is_likelihood:
        lik.sample(None)
    out, Jv, vjp_fn = _jvp_vjp(model, params, inputs, vector)
    if targets is not None:
        lik.check(out, targets)
    canon = lik.canonical_output(out)
    u = Jv.reshape(canon.shape)
    if fisher_type == "exact":
        S = lik.hessian_sqrt(canon, targets if hasattr(lik, "mask") else None)
        S = S.reshape(*canon.shape, S.shape[-1])
        w = torch.einsum("...ck,...c->...k", S, u)
        cot = torch.einsum("...ck,...k->...c", S, w)
    else:
        R, wk = output_grad_columns(out, lik, fisher_type, targets, n_mc_samples, generator)
        R = R.reshape(-1, *canon.shape)
        s = (R * u.unsqueeze(0)).reshape(R.shape[0], N, -1).sum(-1)  # [K, N]
        cot = torch.einsum("k,kn,kn...->n...", wk.to(R.dtype), s, R)
    f = fac(out, targets)
    return {k: v * f for k, v in vjp_fn(cot.reshape(out.shape)).items()}


# --- stochastic estimators and eigenvalues -------------------------------------------


def _rademacher(like: Mapping[str, Tensor], generator) -> dict[str, Tensor]:
    return {
        k: torch.randint(0, 2, v.shape, generator=generator, device=v.device, dtype=v.dtype).mul_(2).sub_(1)
        for k, v in like.items()
    }


def hutchinson_diag(
    matvec: Callable[[dict], dict], like: Mapping[str, Tensor], n_samples: int = 100, generator=None
) -> dict[str, Tensor]:
    """diag(M) ≈ (1/S) Σ_s v_s ⊙ M v_s with Rademacher v_s (unbiased; variance Σ_{j≠i} M_ij²/S)."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}")
    if n_samples == 1:  # v ⊙ Mv as it is (no accumulator passes)
        v = _rademacher(like, generator)
        Mv = matvec(v)
        return {k: v[k] * Mv[k] for k in like}
    acc = {k: torch.zeros_like(v) for k, v in like.items()}
    for _ in range(n_samples):
        v = _rademacher(like, generator)
        Mv = matvec(v)
        for k in acc:
            acc[k] += v[k] * Mv[k]
    return {k: a / n_samples for k, a in acc.items()}


def hutchinson_trace(
    matvec: Callable[[dict], dict], like: Mapping[str, Tensor], n_samples: int = 100, generator=None
) -> Tensor:
    """tr(M) ≈ (1/S) Σ_s v_sᵀ M v_s with Rademacher v_s (unbiased)."""
    d = hutchinson_diag(matvec, like, n_samples, generator)
    return sum(t.sum() for t in d.values())


def top_eigenvalues(
    matvec: Callable[[dict], dict],
    like: Mapping[str, Tensor] | None = None,
    k: int = 1,
    method: str = "lanczos",
    iters: int | None = None,
    tol: float = 1e-8,
    generator=None,
):
    """The ``k`` algebraically largest eigenpairs of a symmetric matrix given by ``matvec``.

    ``method="lanczos"``: Lanczos with full re-orthogonalisation, at most ``iters`` steps
    (default min(P, max(10k, 100))), stopping once every top-k Ritz residual ‖M u − θ u‖ is at
    most ``max(tol, sqrt(eps))`` times the largest ‖M q‖ seen (eps of the vectors' dtype; a Ritz
    value's error is at most residual²/gap), restarted with a fresh orthogonal direction whenever the
    Krylov space becomes invariant (so repeated eigenvalues are found), Ritz values from the
    tridiagonal Qᵀ M Q (float64); cost iters matvecs + O(P·iters²), basis in the vectors' dtype.
    ``matvec`` may be a :mod:`curvfun.operators` operator (then ``like`` may be left out and
    its flat products are used directly, with its parameter order). Without a breakdown one Krylov space holds each eigenvalue once:
    for clustered or repeated top eigenvalues prefer ``method="power"`` (a block method). ``method="power"``: block power
    iteration with QR and Rayleigh–Ritz (finds the largest in magnitude; use it for PSD
    matrices). Returns ``(eigenvalues [k] descending, [eigenvector dicts])``.
    """
    op = matvec if hasattr(matvec, "_matmat") and hasattr(matvec, "unflatten") else None
    if op is not None:  # a curvfun.operators operator: its flat products, its parameter order
        like = op.unflatten(torch.zeros(op.shape[0], dtype=op.dtype, device=op.device))
    elif like is None:
        raise ValueError("top_eigenvalues needs like= (a dict like params) when matvec is a function")
    keys = list(like)
    P = sum(like[q].numel() for q in keys)
    if not 1 <= k <= P:
        raise ValueError(f"k must lie in [1, {P}] (the dimension), got {k}")
    ref = like[keys[0]]

    def mv(x: Tensor) -> Tensor:
        if op is not None:
            return op @ x
        out = matvec(unflat(x, like))
        return torch.cat([out[q].reshape(-1) for q in keys])

    x0 = torch.randn(P, generator=generator, dtype=ref.dtype, device=ref.device)
    if method == "lanczos":
        m = min(P, iters or max(10 * k, 100))
        conv_tol = max(tol, torch.finfo(ref.dtype).eps ** 0.5)  # what the vectors' dtype can resolve
        Q = torch.empty(m, P, dtype=ref.dtype, device=ref.device)  # the basis, one row per step (rows
        # past the last step are never read, nor their pages touched)
        alpha = torch.zeros(m, dtype=torch.float64)
        beta = torch.zeros(m, dtype=torch.float64)
        torch.div(x0, x0.norm(), out=Q[0])
        scale = 0.0

        def orthogonalise(w: Tensor, j: int) -> Tensor:
            # full re-orthogonalisation against rows 0..j, in place (no P-sized temporaries), a
            # second pass only when the first one cancelled most of w ("twice is enough")
            before = w.norm()
            w.addmv_(Q[: j + 1].T, Q[: j + 1] @ w, alpha=-1)
            if w.norm() < 0.7 * before:
                w.addmv_(Q[: j + 1].T, Q[: j + 1] @ w, alpha=-1)
            return w

        for j in range(m):
            q = Q[j]
            w = mv(q)
            if w.data_ptr() == q.data_ptr():  # a matvec that returned its input
                w = w.clone()
            scale = max(scale, float(w.norm()))
            a = float(torch.dot(q, w))
            alpha[j] = a
            w.sub_(q, alpha=a)
            if j:
                w.sub_(Q[j - 1], alpha=float(beta[j - 1]))
            w = orthogonalise(w, j)
            b = float(w.norm())
            if j + 1 >= min(m, 2 * k + 1) and j + 1 < m:  # converged: every top-k Ritz residual |b·u_j| small
                ev, U = torch.linalg.eigh(torch.diag(alpha[: j + 1]) + torch.diag(beta[:j], 1) + torch.diag(beta[:j], -1))
                top = torch.argsort(ev, descending=True)[:k]
                if bool((b * U[j, top].abs() <= conv_tol * max(scale, 1e-30)).all()):
                    break
            if j + 1 == m:
                break
            if b <= tol * max(scale, 1e-30):
                # invariant subspace found: restart with a fresh direction orthogonal to it, so
                # that repeated eigenvalues (which one Krylov space holds only once) are found
                w = orthogonalise(torch.randn(P, generator=generator, dtype=ref.dtype, device=ref.device), j)
                b, beta[j] = float(w.norm()), 0.0
            else:
                beta[j] = b
            torch.div(w, b, out=Q[j + 1])
        steps = j + 1
        T = torch.diag(alpha[:steps]) + torch.diag(beta[: steps - 1], 1) + torch.diag(beta[: steps - 1], -1)
        ev, U = torch.linalg.eigh(T)  # Ritz values of the tridiagonal projection Qᵀ M Q
        order = torch.argsort(ev, descending=True)[:k]
        vecs = Q[:steps].T @ U[:, order].to(ref.dtype)
        vals = ev[order].to(ref.dtype)
    elif method == "power":
        n_it = iters or 100
        X = torch.linalg.qr(torch.randn(P, k, generator=generator, dtype=ref.dtype, device=ref.device)).Q
        for _ in range(n_it):
            Y = torch.stack([mv(X[:, i]) for i in range(k)], 1)
            X_new = torch.linalg.qr(Y).Q
            if (X_new - X @ (X.T @ X_new)).norm() < tol:
                X = X_new
                break
            X = X_new
        AX = torch.stack([mv(X[:, i]) for i in range(k)], 1)
        ev, U = torch.linalg.eigh(X.T @ AX)
        order = torch.argsort(ev, descending=True)
        vals, vecs = ev[order], X @ U[:, order]
    else:
        raise ValueError(f"unknown method {method!r}; expected 'lanczos' or 'power'")
    return vals, [unflat(vecs[:, i], like) for i in range(k)]
