"""Dense ground truth in plain autograd, written for clarity, not speed.

Every function here loops over samples (and, for the exact Fisher, over classes / output
entries) and calls ``torch.autograd.grad`` or ``torch.autograd.functional.{jacobian,hessian}``.
Nothing here calls curvfun's fast paths (``curvfun.grads``, ``curvfun.curvature``, the
likelihoods' ``hessian_sqrt`` or ``sample``), so a curvature implementation can be tested
against it; this is what curvfun's own test suite does, and users can do the same for their
own code::

    import curvfun.testing.reference as ref
    F = ref.exact_fisher(model, params, x, y, loss="cross_entropy")  # [P, P]
    G = ref.ggn(model, params, x, y, loss="cross_entropy")           # [P, P]
    torch.testing.assert_close(F, G)

Conventions (the same as curvfun's, see the GUIDE):

* Batch of N samples, per-sample loss ℓ_n = loss(f(x_n; θ), y_n), objective the **mean**
  L = (1/N) Σ_n ℓ_n; every curvature matrix is that of the mean.
* The model output is ``[N, *positions, C]`` with the class / output dim last; a sample's
  loss sums over its positions.
* ``params`` is a mapping name -> tensor (a subset of ``dict(model.named_parameters())``);
  parameters left out are held at the module's values. Dense ``[P, P]`` matrices are indexed
  in the **insertion order** of ``params``, each leaf flattened row-major (see
  :func:`flatten` / :func:`unflatten`).
* Losses: ``"cross_entropy"`` (class indices, ``ignore_index`` positions contribute nothing,
  ``label_smoothing`` changes the loss, never the Fisher), ``"mse"`` (ℓ = ½‖f − y‖²/var
  summed over output entries), ``"bce_with_logits"`` (independent Bernoulli per entry), a
  :class:`curvfun.losses.Likelihood` instance (its ``ignore_index`` / ``label_smoothing`` /
  ``var`` settings are read; its methods are not used), or a plain callable
  ``fn(output, target) -> [N]`` per-sample losses (gradients, Hessian, GGN and empirical
  Fisher only).

The per-sample loop means the model must treat samples independently (no train-mode
BatchNorm); the reference evaluates the model on one sample at a time, in whatever mode the
module is in, with copies of its buffers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import optree
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "flatten",
    "unflatten",
    "param_names_in_order",
    "module_name",
    "output_fn",
    "per_sample_losses",
    "mean_loss",
    "per_sample_grads",
    "per_sample_grads_dense",
    "batch_grad",
    "jacobian",
    "jacobian_dense",
    "jvp",
    "vjp",
    "hessian",
    "output_hessians",
    "ggn",
    "emp_fisher",
    "exact_fisher",
    "fisher",
    "diag_of",
    "blocks_of",
    "dense_from_matvec",
    "matvec_from_dense",
]


# --------------------------------------------------------------------------------------
# parameter vectors in insertion order
# --------------------------------------------------------------------------------------
def _leaves(tree: Any) -> list[Tensor]:
    if isinstance(tree, Mapping):
        return list(tree.values())
    return optree.tree_leaves(tree)


def param_names_in_order(params: Mapping[str, Tensor]) -> list[str]:
    """The names of ``params`` in the order dense matrices use (insertion order)."""
    return list(params.keys())


def flatten(tree: Any) -> Tensor:
    """Concatenate the leaves of ``tree`` into one vector.

    For a mapping: values in **insertion order** (the order of curvfun's dense matrices);
    for any other pytree: optree's leaf order. Each leaf is flattened row-major. For
    unbatched trees; :func:`per_sample_grads_dense` gives per-sample gradients as ``[N, P]``.
    """
    leaves = _leaves(tree)
    if not leaves:
        return torch.zeros(0)
    return torch.cat([t.reshape(-1) for t in leaves])


def unflatten(vec: Tensor, like: Any) -> Any:
    """Inverse of :func:`flatten`: split ``vec`` (``[P]``) into a tree shaped like ``like``."""
    leaves = _leaves(like)
    total = sum(t.numel() for t in leaves)
    if vec.ndim != 1 or vec.numel() != total:
        raise ValueError(f"unflatten: expected a vector of {total} entries, got shape {tuple(vec.shape)}")
    parts, start = [], 0
    for t in leaves:
        parts.append(vec[start : start + t.numel()].reshape(t.shape))
        start += t.numel()
    if isinstance(like, Mapping):
        return dict(zip(like.keys(), parts))
    return optree.tree_unflatten(optree.tree_structure(like), parts)


def module_name(param_name: str) -> str:
    """Module of a parameter: its name up to the last ``'.'`` (``""`` for the root module)."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else ""


# --------------------------------------------------------------------------------------
# model and losses
# --------------------------------------------------------------------------------------
def _as_tuple(inputs: Any) -> tuple:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def _batch_size(inputs: Any) -> int:
    return _as_tuple(inputs)[0].shape[0]


def _sample(inputs: Any, n: int) -> Any:
    """Sample ``n`` of ``inputs`` with its batch dim kept (size 1)."""
    if isinstance(inputs, tuple):
        return tuple(t[n : n + 1] for t in inputs)
    return inputs[n : n + 1]


def output_fn(model: nn.Module, params: Mapping[str, Tensor], inputs: Any) -> Callable[[Tensor], Tensor]:
    """``theta -> model(inputs)`` with ``theta`` the flat parameter vector of ``params``.

    Parameters not in ``params`` and all buffers are the module's own (buffers copied).
    """
    names = list(params.keys())
    like = dict(params)
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
    args = _as_tuple(inputs)

    def f(theta: Tensor) -> Tensor:
        p = unflatten(theta, like)
        assert list(p) == names
        return functional_call(model, (p, dict(buffers)), args, strict=False)

    return f


def _loss_settings(loss: Any) -> tuple[str | None, dict]:
    """(kind, settings) for a loss given by name or Likelihood; (None, {}) for a callable."""
    if isinstance(loss, str):
        if loss not in ("cross_entropy", "mse", "bce_with_logits"):
            raise ValueError(f"reference: unknown loss {loss!r}")
        return loss, {}
    name = getattr(loss, "name", None)
    if name == "cross_entropy":
        return name, {"ignore_index": loss.ignore_index, "label_smoothing": loss.label_smoothing}
    if name == "mse":
        return name, {"var": loss.var}
    if name == "bce_with_logits":
        return name, {}
    if name == "callable" and hasattr(loss, "fn"):
        return None, {"fn": loss.fn}
    if callable(loss):
        return None, {"fn": loss}
    raise TypeError(f"reference: cannot interpret loss {loss!r}")


def _per_sample_loss_from_output(output: Tensor, target: Tensor, loss: Any, smooth: bool = True) -> Tensor:
    """ℓ_n for each sample of ``output`` ([N, *positions, C]), summed over positions."""
    kind, s = _loss_settings(loss)
    N = output.shape[0]
    if kind is None:
        return s["fn"](output, target)
    if kind == "cross_entropy":
        C = output.shape[-1]
        per_position = F.cross_entropy(
            output.reshape(-1, C),
            target.reshape(-1),
            reduction="none",
            ignore_index=s.get("ignore_index", -100),
            label_smoothing=s.get("label_smoothing", 0.0) if smooth else 0.0,
        )
        return per_position.reshape(N, -1).sum(1)
    out = output.reshape(N, -1)
    tgt = target.reshape(N, -1).to(output.dtype)
    if kind == "mse":
        return (0.5 * (out - tgt) ** 2 / s.get("var", 1.0)).sum(1)
    # bce_with_logits: -[y log σ(f) + (1 - y) log(1 - σ(f))]
    return -(tgt * F.logsigmoid(out) + (1 - tgt) * F.logsigmoid(-out)).sum(1)


def per_sample_losses(model, params, inputs, targets, loss="cross_entropy") -> Tensor:
    """``[N]`` per-sample losses at ``params``."""
    f = output_fn(model, params, inputs)
    return _per_sample_loss_from_output(f(flatten(params)), targets, loss)


def mean_loss(model, params, inputs, targets, loss="cross_entropy") -> Tensor:
    """The objective L = (1/N) Σ ℓ_n."""
    return per_sample_losses(model, params, inputs, targets, loss).mean()


# --------------------------------------------------------------------------------------
# gradients and Jacobians
# --------------------------------------------------------------------------------------
def _theta(params) -> Tensor:
    return flatten(params).detach().clone().requires_grad_(True)


def per_sample_grads_dense(model, params, inputs, targets, loss="cross_entropy") -> Tensor:
    """``[N, P]``: row n is ∇_θ ℓ_n, by a loop over samples (one backward pass each)."""
    rows = []
    for n in range(_batch_size(inputs)):
        theta = _theta(params)
        out = output_fn(model, params, _sample(inputs, n))(theta)
        ell = _per_sample_loss_from_output(out, targets[n : n + 1], loss).sum()
        (g,) = torch.autograd.grad(ell, theta, allow_unused=True)
        rows.append(torch.zeros_like(theta) if g is None else g)
    return torch.stack(rows)


def per_sample_grads(model, params, inputs, targets, loss="cross_entropy") -> dict[str, Tensor]:
    """Per-sample gradients as a dict like ``params``, leaves ``[N, *param.shape]``."""
    G = per_sample_grads_dense(model, params, inputs, targets, loss)
    return _unflatten_batched(G, params)


def _unflatten_batched(M: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out, start = {}, 0
    for k, t in like.items():
        out[k] = M[:, start : start + t.numel()].reshape(M.shape[0], *t.shape)
        start += t.numel()
    return out


def batch_grad(model, params, inputs, targets, loss="cross_entropy") -> dict[str, Tensor]:
    """∇_θ of the mean loss, one backward pass over the whole batch, as a dict like params."""
    theta = _theta(params)
    out = output_fn(model, params, inputs)(theta)
    L = _per_sample_loss_from_output(out, targets, loss).mean()
    (g,) = torch.autograd.grad(L, theta, allow_unused=True)
    return unflatten(torch.zeros_like(theta) if g is None else g, params)


def jacobian_dense(model, params, inputs) -> Tensor:
    """``[N, *per_sample_output_shape, P]``: J_n = ∂f(x_n)/∂θ, one sample at a time."""
    theta = flatten(params).detach()
    rows = []
    for n in range(_batch_size(inputs)):
        f_n = output_fn(model, params, _sample(inputs, n))
        J = torch.autograd.functional.jacobian(lambda th: f_n(th)[0], theta)  # [*out, P]
        rows.append(J)
    return torch.stack(rows)


def jacobian(model, params, inputs) -> dict[str, Tensor]:
    """The output Jacobian as a dict like params, leaves ``[N, *out_shape, *param.shape]``."""
    J = jacobian_dense(model, params, inputs)
    lead = J.shape[:-1]
    out, start = {}, 0
    for k, t in params.items():
        out[k] = J[..., start : start + t.numel()].reshape(*lead, *t.shape)
        start += t.numel()
    return out


def jvp(model, params, inputs, tangent: Mapping[str, Tensor]) -> Tensor:
    """J v: ``[N, *out_shape]``, from the dense Jacobian."""
    J = jacobian_dense(model, params, inputs)
    return J @ flatten(tangent)


def vjp(model, params, inputs, cotangent: Tensor) -> dict[str, Tensor]:
    """Σ_n J_nᵀ v_n as a dict like params, from the dense Jacobian."""
    J = jacobian_dense(model, params, inputs)
    N = J.shape[0]
    v = (J.reshape(N, -1, J.shape[-1]) * cotangent.reshape(N, -1, 1)).sum((0, 1))
    return unflatten(v, params)


# --------------------------------------------------------------------------------------
# curvature matrices (of the mean loss)
# --------------------------------------------------------------------------------------
def hessian(model, params, inputs, targets, loss="cross_entropy") -> Tensor:
    """``[P, P]`` Hessian of the mean loss (``torch.autograd.functional.hessian``)."""
    f = output_fn(model, params, inputs)

    def L(theta):
        return _per_sample_loss_from_output(f(theta), targets, loss).mean()

    return torch.autograd.functional.hessian(L, flatten(params).detach())


def output_hessians(model, params, inputs, targets, loss="cross_entropy") -> Tensor:
    """``[N, O, O]``: H_n = ∇²_f ℓ_n, by autograd on each sample's loss (O = output entries)."""
    f = output_fn(model, params, inputs)
    with torch.no_grad():
        out = f(flatten(params))
    Hs = []
    for n in range(out.shape[0]):
        shape = out[n : n + 1].shape

        def ell(o_flat, n=n, shape=shape):
            return _per_sample_loss_from_output(o_flat.reshape(shape), targets[n : n + 1], loss).sum()

        Hs.append(torch.autograd.functional.hessian(ell, out[n].reshape(-1).detach()))
    return torch.stack(Hs)


def ggn(model, params, inputs, targets, loss="cross_entropy") -> Tensor:
    """``[P, P]`` GGN of the mean loss: (1/N) Σ_n J_nᵀ H_n J_n, H_n by autograd."""
    J = jacobian_dense(model, params, inputs)
    N, P = J.shape[0], J.shape[-1]
    J = J.reshape(N, -1, P)
    H = output_hessians(model, params, inputs, targets, loss)
    return sum(J[n].T @ H[n] @ J[n] for n in range(N)) / N


def emp_fisher(model, params, inputs, targets, loss="cross_entropy") -> Tensor:
    """``[P, P]`` empirical Fisher (1/N) Σ_n g_n g_nᵀ with g_n = ∇_θ ℓ_n (the loss as given)."""
    G = per_sample_grads_dense(model, params, inputs, targets, loss)
    return G.T @ G / G.shape[0]


def exact_fisher(model, params, inputs, targets=None, loss="cross_entropy") -> Tensor:
    """``[P, P]`` exact Fisher of the mean: (1/N) Σ_n E_{y ~ p(y | f(x_n))}[g_n(y) g_n(y)ᵀ].

    Computed by explicit enumeration, independently of any Hessian square root:

    * ``cross_entropy``: Σ over positions t (not ``ignore_index``; ``targets`` is read for
      that mask only) and classes c of p_c · g(c) g(c)ᵀ with g(c) = ∇_θ −log softmax(f_nt)_c.
      Positions are independent and E[g_t] = 0, so cross-position terms vanish.
      ``label_smoothing`` plays no role.
    * ``bce_with_logits``: Σ over output entries k of σ_k g(1) g(1)ᵀ + (1 − σ_k) g(0) g(0)ᵀ
      with g(1) = ∇_θ −log σ(f_k), g(0) = ∇_θ −log(1 − σ(f_k)).
    * ``mse``: the Gaussian closed form E[(f − y)(f − y)ᵀ]/var² = I/var, i.e. J_nᵀ J_n / var.
    """
    kind, s = _loss_settings(loss)
    if kind is None:
        raise ValueError("reference.exact_fisher needs a likelihood, not a plain loss callable")
    N = _batch_size(inputs)
    P = flatten(params).numel()
    total = torch.zeros(P, P, dtype=flatten(params).dtype)
    if kind == "mse":
        J = jacobian_dense(model, params, inputs).reshape(N, -1, P)
        return sum(J[n].T @ J[n] for n in range(N)) / (N * s.get("var", 1.0))
    for n in range(N):
        theta = _theta(params)
        out = output_fn(model, params, _sample(inputs, n))(theta)[0]  # [*positions, C]
        if kind == "cross_entropy":
            C = out.shape[-1]
            logits = out.reshape(-1, C)
            if targets is None:
                keep = torch.ones(logits.shape[0], dtype=torch.bool)
            else:
                keep = (targets[n].reshape(-1) != s.get("ignore_index", -100))
            logp = torch.log_softmax(logits, dim=-1)
            for t in range(logits.shape[0]):
                if not keep[t]:
                    continue
                for c in range(C):
                    (g,) = torch.autograd.grad(-logp[t, c], theta, retain_graph=True, allow_unused=True)
                    if g is None:
                        continue
                    total += logp[t, c].detach().exp() * torch.outer(g, g)
        else:  # bce_with_logits
            flat = out.reshape(-1)
            for k in range(flat.numel()):
                p1 = torch.sigmoid(flat[k]).detach()
                (g1,) = torch.autograd.grad(-F.logsigmoid(flat[k]), theta, retain_graph=True, allow_unused=True)
                (g0,) = torch.autograd.grad(-F.logsigmoid(-flat[k]), theta, retain_graph=True, allow_unused=True)
                if g1 is None:
                    continue
                total += p1 * torch.outer(g1, g1) + (1 - p1) * torch.outer(g0, g0)
    return total / N


def fisher(model, params, inputs, targets, loss="cross_entropy", fisher_type="exact") -> Tensor:
    """Dense Fisher: ``fisher_type`` ``"exact"`` (:func:`exact_fisher`) or ``"emp"``."""
    if fisher_type == "exact":
        return exact_fisher(model, params, inputs, targets, loss)
    if fisher_type == "emp":
        return emp_fisher(model, params, inputs, targets, loss)
    raise ValueError(f"reference.fisher: fisher_type must be 'exact' or 'emp', got {fisher_type!r}")


# --------------------------------------------------------------------------------------
# views of dense matrices and matrix-free products
# --------------------------------------------------------------------------------------
def diag_of(M: Tensor, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The diagonal of the dense ``[P, P]`` matrix ``M`` as a dict like ``params``."""
    return unflatten(torch.diagonal(M).clone(), dict(params))


def blocks_of(M: Tensor, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Module blocks of ``M``: module name -> ``[P_m, P_m]`` over that module's parameters.

    The module name is the parameter name up to its last ``'.'`` (``""`` for parameters of the
    root module); within a block, parameters keep their order in ``params``. A module whose
    parameters are not contiguous in ``params`` still gets one block (rows/cols gathered).
    """
    index: dict[str, list[int]] = {}
    start = 0
    for name, t in params.items():
        idx = list(range(start, start + t.numel()))
        index.setdefault(module_name(name), []).extend(idx)
        start += t.numel()
    out = {}
    for mod, idx in index.items():
        i = torch.tensor(idx, dtype=torch.long)
        out[mod] = M[i][:, i].clone()
    return out


def dense_from_matvec(matvec: Callable[[Any], Any], like: Any) -> Tensor:
    """The ``[P, P]`` matrix of a like-shaped linear map, by applying it to each unit vector."""
    base = flatten(like)
    P = base.numel()
    cols = []
    for i in range(P):
        e = torch.zeros(P, dtype=base.dtype, device=base.device)
        e[i] = 1
        cols.append(flatten(matvec(unflatten(e, like))))
    return torch.stack(cols, dim=1)


def matvec_from_dense(M: Tensor, like: Any) -> Callable[[Any], Any]:
    """A like-shaped matvec ``v -> M v`` (insertion order), e.g. to test eigen/trace routines."""

    def mv(v):
        return unflatten(M @ flatten(v), like)

    return mv
