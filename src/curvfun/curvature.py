"""Fisher, GGN and Hessian of the mean loss: dense, block, diagonal and matrix-free.

Conventions (GUIDE): L = (1/N) Σ_n ℓ_n and every matrix is the curvature of the mean,

* ``fisher_type="emp"``:   F = (1/N) Σ_n g_n g_nᵀ,  g_n = ∇_θ ℓ_n;
* ``fisher_type="mc"``:    F = (1/(N·M)) Σ_{n,m} g_nm g_nmᵀ, g_nm the gradient of the NLL at
  a target drawn from the model's predictive distribution;
* ``fisher_type="exact"``: F = (1/N) Σ_n J_nᵀ S_n S_nᵀ J_n with S_n Sᵀ_n the Hessian of the
  NLL w.r.t. the output (the likelihood's closed form; equals the GGN for these losses);
* GGN = (1/N) Σ_n J_nᵀ (∇²_f ℓ_n) J_n with the output Hessian taken by autograd (so it also
  works for a plain loss callable and is an independent route to the exact Fisher);
* Hessian = ∇²_θ L by autograd.

Dense ``[P, P]`` matrices are indexed in the insertion order of ``params``, each leaf
flattened row-major. ``shape="block"`` gives a dict module-name -> ``[P_m, P_m]`` (module
name: the parameter name up to its last '.', ``""`` for the root); ``shape="diag"`` a dict
like ``params``; ``shape="unit"`` a dict module-name -> :class:`~curvfun.kron.UnitWiseFactor`
(per output unit of an affine layer -- Linear, convolution, attention projection -- or a norm
layer, the exact block over its incoming weights and bias; see :mod:`curvfun.unit_wise`;
parameters of other modules raise).
The dense routes build per-sample Jacobians (memory N·outputs·P): they are meant for small
models; use the ``*_vp`` products, the Hutchinson estimators or :func:`curvfun.kfac` beyond that.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from .capture import FISHER_TYPES, check_batch, output_grad_columns
from .functional import call_model, check_params
from .grads import _check_like, jacobian, per_sample_grads
from .losses import get_likelihood
from .capture import capture
from .layers import layer_data
from .precision import full_precision
from .unit_wise import unit_wise_from_dense, unit_wise_from_layer, unit_wise_modules
from .memory import check_square

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
    "SHAPES",
]

SHAPES = ("full", "block", "diag", "unit")


def _check_shape(shape: str) -> None:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _check_fisher_type(fisher_type: str) -> None:
    if fisher_type not in FISHER_TYPES:
        raise ValueError(f"unknown fisher_type {fisher_type!r}; expected one of {FISHER_TYPES}")


def _flat_rows(tree: Mapping[str, Tensor], params: Mapping[str, Tensor], lead: int) -> Tensor:
    """Concatenate leaves ``[*lead_dims, *param.shape]`` into ``[*lead_dims, P]`` (params order)."""
    first = tree[next(iter(params))]
    lead_shape = first.shape[:lead]
    return torch.cat([tree[k].reshape(*lead_shape, -1) for k in params], -1)


def _unflat(vec: Tensor, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out, i = {}, 0
    for k, p in params.items():
        n = p.numel()
        out[k] = vec[..., i : i + n].reshape(vec.shape[:-1] + p.shape)
        i += n
    return out


def _module_of(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


def _module_indices(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Module name -> indices of its parameters in the flat (params-order) vector."""
    offsets: dict[str, list[Tensor]] = {}
    i = 0
    for k, p in params.items():
        offsets.setdefault(_module_of(k), []).append(torch.arange(i, i + p.numel()))
        i += p.numel()
    return {m: torch.cat(idx) for m, idx in offsets.items()}


def _shaped(rows: Tensor, weights: Tensor, params: Mapping[str, Tensor], N: int, shape: str):
    """From rows ``[K, R, P]`` with column weights ``[K]``: (1/N) Σ_k w_k rowsᵀ rows, shaped."""
    rows = rows * weights.sqrt().reshape(-1, 1, 1).to(rows.dtype)
    rows = rows.reshape(-1, rows.shape[-1])
    if shape == "full":
        M = rows.T @ rows / N
        return (M + M.T) / 2
    if shape == "diag":
        return _unflat(rows.pow(2).sum(0) / N, params)
    blocks: dict[str, Tensor] = {}
    for m, idx in _module_indices(params).items():
        sub = rows[:, idx]
        M = sub.T @ sub / N
        blocks[m] = (M + M.T) / 2
    return blocks


def _canonical_jacobian(model, params, inputs, lik) -> tuple[Tensor, Tensor]:
    """Output ``[N, T, C]`` (canonical layout) and Jacobian rows ``[N, T, C, P]``."""
    detached = {k: v.detach() for k, v in params.items()}
    out = call_model(model, detached, inputs)
    if not isinstance(out, Tensor):
        raise TypeError(f"the model returned {type(out).__name__}; curvfun needs a tensor output")
    J = jacobian(model, params, inputs)
    N = out.shape[0]
    canon = lik.canonical_output(out)
    C = canon.shape[-1]
    Jf = _flat_rows(J, params, out.ndim).reshape(N, -1, C, sum(p.numel() for p in params.values()))
    return canon.reshape(N, -1, C), Jf


def _setup(model, params, inputs, targets, loss):
    params = check_params(model, params)
    N = check_batch(inputs, targets)
    return params, N, get_likelihood(loss)


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
):
    """The Fisher of the mean loss (see the module docstring for the three types and shapes).

    Cost: the Jacobian (N·T·C backward passes, N·T·C·P memory) for ``exact``/``mc``; the
    per-sample gradients (one captured pass, N·P memory) for ``emp``. ``shape="unit"`` forms no
    Jacobian: one captured pass (one backward per column) and O(K·N·C·(T·d + d²)) per layer
    (:func:`curvfun.unit_wise.unit_wise_from_layer`).
    """
    _check_fisher_type(fisher_type)
    _check_shape(shape)
    params, N, lik = _setup(model, params, inputs, targets, loss)
    if shape != "diag":
        check_square(f"fisher(shape={shape!r})", params, shape, "pass shape='diag', use fisher_vp or curvfun.kfac")
    if fisher_type != "emp" and not lik.is_likelihood:
        lik.sample(None)  # raises the explanatory error
    if shape == "unit":
        return _fisher_unit(model, params, inputs, targets, loss, fisher_type, n_mc_samples, generator)
    if fisher_type == "emp":
        G = per_sample_grads(model, params, inputs, targets, lik)
        rows = _flat_rows(G, params, 1).unsqueeze(0)
        w = torch.ones(1, dtype=rows.dtype, device=rows.device)
        return _shaped(rows, w, params, N, shape)
    if targets is not None:
        lik.check(call_model(model, {k: v.detach() for k, v in params.items()}, inputs), targets)
    out, J = _canonical_jacobian(model, params, inputs, lik)
    if fisher_type == "exact":
        mask_t = targets.reshape(N, -1) if hasattr(lik, "mask") and targets is not None else None
        S = lik.hessian_sqrt(out, mask_t)  # [N, T, C, K]
        rows = torch.einsum("ntcp,ntck->kntp", J, S).reshape(S.shape[-1], -1, J.shape[-1])
        w = torch.ones(S.shape[-1], dtype=rows.dtype, device=rows.device)
        return _shaped(rows, w, params, N, shape)
    mask_t = targets.reshape(N, -1) if hasattr(lik, "mask") and targets is not None else None
    cot, w = output_grad_columns(out, lik, "mc", mask_t, n_mc_samples, generator)
    rows = torch.einsum("ntcp,kntc->knp", J, cot.reshape(-1, *out.shape))
    return _shaped(rows, w, params, N, shape)


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


def _output_hessians(lik, out: Tensor, targets: Tensor) -> Tensor:
    """∇²_f ℓ_n for every sample by autograd: ``[N, O, O]`` with O = T·C."""
    N = out.shape[0]
    O = out[0].numel()

    def loss_one(o, y):
        return lik.per_sample_unchecked(o.unsqueeze(0), y.unsqueeze(0))[0]

    try:
        H = torch.func.vmap(torch.func.hessian(loss_one))(out.detach(), targets)
    except Exception:  # a loss callable that vmap cannot batch: loop
        H = torch.stack([torch.func.hessian(loss_one)(out[n].detach(), targets[n]) for n in range(N)])
    return H.reshape(N, O, O)


def ggn(
    model: nn.Module,
    params: Mapping[str, Tensor],
    inputs: Any,
    targets: Tensor,
    loss: Any = "cross_entropy",
    shape: str = "full",
):
    """GGN = (1/N) Σ_n J_nᵀ H_n J_n, H_n = ∇²_f ℓ_n by autograd (any loss, callables too).
    ``shape="unit"``: the unit-wise sub-blocks of that dense matrix."""
    _check_shape(shape)
    params, N, lik = _setup(model, params, inputs, targets, loss)
    units = unit_wise_modules(model, params) if shape == "unit" else None
    check_square(f"ggn(shape={shape!r})", params, "full", "use ggn_vp, hutchinson_diag or curvfun.kfac")
    detached = {k: v.detach() for k, v in params.items()}
    out = call_model(model, detached, inputs)
    lik.check(out, targets)
    H = _output_hessians(lik, out, targets)  # [N, O, O]
    J = jacobian(model, params, inputs)
    Jf = _flat_rows(J, params, out.ndim).reshape(N, H.shape[-1], -1)  # [N, O, P]
    M = torch.einsum("nop,noq,nqr->pr", Jf, H, Jf) / N
    if units is not None:
        return unit_wise_from_dense((M + M.T) / 2, params, units)
    return _reshape_dense((M + M.T) / 2, params, shape)


def _reshape_dense(M: Tensor, params: Mapping[str, Tensor], shape: str):
    if shape == "full":
        return M
    if shape == "diag":
        return _unflat(torch.diagonal(M).clone(), params)
    return {m: M[ix][:, ix] for m, ix in _module_indices(params).items()}


def _mean_loss_fn(model, params, inputs, targets, lik) -> Callable[[Tensor], Tensor]:
    def f(flat: Tensor) -> Tensor:
        out = call_model(model, _unflat(flat, params), inputs)
        return lik.per_sample(out, targets).mean()

    return f


def hessian(
    model: nn.Module,
    params: Mapping[str, Tensor],
    inputs: Any,
    targets: Tensor,
    loss: Any = "cross_entropy",
    shape: str = "full",
):
    """∇²_θ L of the mean loss by autograd (reverse-over-reverse). Cost O(P) backward passes."""
    _check_shape(shape)
    params, N, lik = _setup(model, params, inputs, targets, loss)
    units = unit_wise_modules(model, params) if shape == "unit" else None
    check_square(f"hessian(shape={shape!r})", params, "full", "use hessian_vp, hutchinson_diag or top_eigenvalues")
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    H = torch.func.jacrev(torch.func.grad(_mean_loss_fn(model, params, inputs, targets, lik)))(flat)
    if units is not None:
        return unit_wise_from_dense((H + H.T) / 2, params, units)
    return _reshape_dense((H + H.T) / 2, params, shape)


# --- matrix-free products ----------------------------------------------------------


def _out_fn(model, inputs):
    return lambda p: call_model(model, p, inputs)


def hessian_vp(model, params, inputs, targets, vector, loss: Any = "cross_entropy") -> dict[str, Tensor]:
    """H v (forward-over-reverse). Cost ≈ 2-3 forward+backward passes."""
    params, N, lik = _setup(model, params, inputs, targets, loss)
    _check_like(params, vector, "vector")
    detached = {k: v.detach() for k, v in params.items()}

    def L(p):
        return lik.per_sample(call_model(model, p, inputs), targets).mean()

    _, hv = torch.func.jvp(torch.func.grad(L), (detached,), ({k: vector[k] for k in params},))
    return hv


def _jvp_vjp(model, params, inputs, vector):
    detached = {k: v.detach() for k, v in params.items()}
    out, Jv = torch.func.jvp(_out_fn(model, inputs), (detached,), ({k: vector[k] for k in params},))
    _, vjp_fn = torch.func.vjp(_out_fn(model, inputs), detached)
    return out, Jv, (lambda u: vjp_fn(u)[0])


def ggn_vp(model, params, inputs, targets, vector, loss: Any = "cross_entropy") -> dict[str, Tensor]:
    """G v = (1/N) Jᵀ H (J v): one jvp, one output-space Hessian-vector product, one vjp."""
    params, N, lik = _setup(model, params, inputs, targets, loss)
    _check_like(params, vector, "vector")
    out, Jv, vjp_fn = _jvp_vjp(model, params, inputs, vector)

    def g(o):
        return torch.func.grad(lambda o_: lik.per_sample(o_, targets).sum())(o)

    _, HJv = torch.func.jvp(g, (out.detach(),), (Jv,))
    return {k: v / N for k, v in vjp_fn(HJv).items()}


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
) -> dict[str, Tensor]:
    """F v without forming F: u = J v (forward mode), then per sample
    ``exact``: S Sᵀ u; ``mc``/``emp``: Σ_k w_k r_k (r_kᵀ u) with r the NLL gradients at
    sampled / data targets; then Jᵀ(·)/N. Cost: one jvp + one vjp."""
    _check_fisher_type(fisher_type)
    params, N, lik = _setup(model, params, inputs, targets, loss)
    _check_like(params, vector, "vector")
    if fisher_type != "emp" and not lik.is_likelihood:
        lik.sample(None)
    out, Jv, vjp_fn = _jvp_vjp(model, params, inputs, vector)
    if targets is not None:
        lik.check(out, targets)
    canon = lik.canonical_output(out)
    u = Jv.reshape(canon.shape)
    if fisher_type == "exact":
        C = canon.shape[-1]
        S = lik.hessian_sqrt(canon, targets if hasattr(lik, "mask") else None)
        S = S.reshape(*canon.shape, S.shape[-1])
        w = torch.einsum("...ck,...c->...k", S, u)
        cot = torch.einsum("...ck,...k->...c", S, w)
    else:
        R, wk = output_grad_columns(out, lik, fisher_type, targets, n_mc_samples, generator)
        R = R.reshape(-1, *canon.shape)
        s = (R * u.unsqueeze(0)).reshape(R.shape[0], N, -1).sum(-1)  # [K, N]
        cot = torch.einsum("k,kn,kn...->n...", wk.to(R.dtype), s, R)
    return {k: v / N for k, v in vjp_fn(cot.reshape(out.shape)).items()}


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
        out = matvec(_unflat(x, like))
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
    return vals, [_unflat(vecs[:, i], like) for i in range(k)]
