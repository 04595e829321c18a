"""Curvature matrices as linear operators: ``@`` on vectors ``[P]`` and matrices ``[P, k]``.

Every operator here is a symmetric P x P matrix of the **mean** loss L = (1/N) Σ_n ℓ_n (see
:mod:`curvfun.curvature`), indexed in the flat order of ``params``: leaves in the **insertion
order** of the dict, each flattened row-major (the order of ``fisher(shape="full")`` and of
:func:`curvfun.testing.reference.flatten`; :meth:`CurvatureOperator.flatten` /
:meth:`~CurvatureOperator.unflatten` convert). A single-batch operator is the matrix at the
values ``params`` have when it is built; with ``data=`` each product reads their current values.

* :class:`GGNOperator`: G = (1/N) Σ_n J_nᵀ (∇²_f ℓ_n) J_n;
* :class:`FisherOperator`: ``"exact"`` (1/N) Σ_n J_nᵀ S_n S_nᵀ J_n, ``"mc"`` with the targets
  sampled **once** when the operator is built (a fixed matrix, as an eigen-solver needs),
  ``"emp"`` (1/N) Σ_n g_n g_nᵀ (:class:`EmpiricalFisherOperator`);
* :class:`HessianOperator`: ∇²_θ L;
* :class:`KFACOperator`: block-diagonal over layers from :func:`curvfun.kfac` factors, and
  :meth:`KFACOperator.inverse` its damped inverse (π-damped factored, or the exact
  (A⊗B + λI)⁻¹ through the eigenbases, :func:`kron_exact_inverse`).

Cost. A single batch is linearised once, when the operator is built: one forward and the
reverse-mode closure u ↦ Jᵀu are kept, J v is the transpose of that closure (a vjp of the vjp,
checked once against forward mode, which replaces it where a backward is not differentiable), so
each product costs about one backward pass for J v and one for Jᵀ u (no forward), and a block
``[P, k]`` is one vmapped call; the Hessian keeps the gradient's graph (reverse over reverse). Memory: the forward's saved activations, held for the
operator's lifetime. ``data=`` (an iterable of ``(inputs, targets)`` batches, re-iterated on
every product, e.g. a DataLoader without shuffling) instead re-linearises each batch on each
product and keeps nothing: Σ_b N_b M_b / Σ_b N_b (``reduction="mean"``) or Σ_b N_b M_b
(``"sum"``: the curvature of the summed loss over the data set).

:meth:`CurvatureOperator.to_scipy` gives a :class:`scipy.sparse.linalg.LinearOperator`
(float64 numpy in and out) for ``eigsh``, ``cg``, ``lsmr``...; scipy is imported lazily.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

import optree
import torch
from torch import Tensor, nn

from .capture import FISHER_TYPES, check_batch, output_grad_columns, supported_modules
from .curvature import fisher, ggn
from .functional import call_model, check_params
from .kron import DiagFactor, EKFACFactor, KronFactor, RelaidFactor, UnitWiseFactor
from .kron_rows import KronRowsFactor
from .losses import get_likelihood
from .memory import check_dense_size
from .reduction import REDUCTIONS

__all__ = [
    "CurvatureOperator",
    "GGNOperator",
    "FisherOperator",
    "EmpiricalFisherOperator",
    "HessianOperator",
    "KFACOperator",
    "kron_exact_inverse",
    "REDUCTIONS",
]



class CurvatureOperator:
    """A symmetric P x P matrix given by its products. ``op @ x`` for ``x`` ``[P]`` or
    ``[P, k]`` (any float dtype: computed in the operator's dtype, returned in it); ``op.T`` is
    ``op``; :meth:`matvec` on a dict like ``params``; :meth:`to_dense` (k = P products);
    :meth:`to_scipy`. Subclasses give ``_matmat(X [P, k]) -> [P, k]``."""

    def __init__(self, like: Mapping[str, Tensor]):
        self._names = list(like)
        self._shapes = {k: tuple(v.shape) for k, v in like.items()}
        self._sizes = [like[k].numel() for k in self._names]
        ref = like[self._names[0]]
        P = sum(self._sizes)
        self.shape = (P, P)
        self.dtype = ref.dtype
        self.device = ref.device

    # --- the flat order -------------------------------------------------------------
    def flatten(self, tree: Mapping[str, Tensor]) -> Tensor:
        """A dict like ``params`` -> ``[P]`` in the operator's order (insertion order of
        ``params``, each leaf row-major)."""
        if not isinstance(tree, Mapping) or set(tree) != set(self._names):
            got = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
            raise ValueError(f"expected a dict with the keys of params {sorted(self._names)}; got {got}")
        for k in self._names:
            if tuple(tree[k].shape) != self._shapes[k]:
                raise ValueError(f"entry {k!r} has shape {tuple(tree[k].shape)}, the parameter {self._shapes[k]}")
        return torch.cat([tree[k].reshape(-1) for k in self._names])

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """``[P]`` -> dict like ``params`` (views); ``[P, k]`` -> leaves ``[*shape, k]``."""
        out, i = {}, 0
        for k, n in zip(self._names, self._sizes):
            out[k] = vec[i : i + n].reshape(*self._shapes[k], *vec.shape[1:])
            i += n
        return out

    def _split_cols(self, X: Tensor) -> dict[str, Tensor]:
        """``[P, k]`` -> dict of leaves ``[k, *shape]`` (the vmapped layout)."""
        out, i = {}, 0
        for key, n in zip(self._names, self._sizes):
            out[key] = X[i : i + n].T.reshape(X.shape[1], *self._shapes[key])
            i += n
        return out

    def _join_cols(self, tree: Mapping[str, Tensor], k: int) -> Tensor:
        """dict of leaves ``[k, *shape]`` -> ``[P, k]``."""
        return torch.cat([tree[key].reshape(k, -1) for key in self._names], 1).T

    # --- products -------------------------------------------------------------------
    def _matmat(self, X: Tensor) -> Tensor:
        raise NotImplementedError

    def __matmul__(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__} @ x needs a torch.Tensor, got {type(x).__name__}; "
                            f"use .to_scipy() for numpy arrays")
        P = self.shape[0]
        if x.ndim not in (1, 2) or x.shape[0] != P:
            raise ValueError(f"{type(self).__name__} is {P} x {P}: x must be [{P}] or [{P}, k], "
                             f"got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        X = x.to(device=self.device, dtype=self.dtype).reshape(P, -1)
        if X.shape[1] == 0:
            return X.clone()
        with torch.no_grad():
            Y = self._matmat(X)
        return Y.reshape(x.shape)

    def matmul(self, x: Tensor) -> Tensor:
        """``self @ x``."""
        return self @ x

    def matvec(self, tree: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """M v on a dict like ``params``."""
        return self.unflatten(self @ self.flatten(tree))

    @property
    def T(self) -> "CurvatureOperator":
        """The transpose: the operator itself (every curvature matrix here is symmetric)."""
        return self

    def to_dense(self) -> Tensor:
        """The ``[P, P]`` matrix by P products (block of identity columns): small P only; sized
        first against the dense limit (:func:`curvfun.memory.check_dense_size`)."""
        P = self.shape[0]
        check_dense_size(f"{type(self).__name__}.to_dense()", (P, P), self.dtype, self.device,
                         instead="use products (op @ x), .to_scipy() or curvfun.top_eigenvalues(op)")
        return self @ torch.eye(P, dtype=self.dtype, device=self.device)

    def diag(self) -> Tensor:
        """The diagonal ``[P]`` where it is cheap; otherwise raises."""
        raise NotImplementedError(
            f"{type(self).__name__} has no cheap diagonal: use curvfun.fisher / ggn (shape='diag') or "
            f"curvfun.hutchinson_diag(op.matvec, params)")

    def to_scipy(self):
        """A :class:`scipy.sparse.linalg.LinearOperator` (float64 numpy in and out; the products
        are computed in the operator's dtype). Symmetric: ``rmatvec`` is ``matvec``."""
        try:
            import numpy as np
            from scipy.sparse.linalg import LinearOperator
        except ImportError as e:  # pragma: no cover - scipy is an optional dependency
            raise ImportError("to_scipy() needs scipy: pip install scipy") from e
        P = self.shape[0]

        def mm(X):
            X = np.asarray(X)
            T = torch.from_numpy(np.ascontiguousarray(X.reshape(P, -1), dtype=np.float64))
            Y = self @ T.to(self.dtype)
            return Y.to(torch.float64).cpu().numpy().reshape(X.shape)

        return LinearOperator((P, P), matvec=mm, rmatvec=mm, matmat=mm, rmatmat=mm, dtype=np.float64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"


# --- model operators ------------------------------------------------------------------


def _vmapped(fn: Callable, tree_or_tensor, k: int):
    """``fn`` over a leading block dim of size k: vmap, else a loop (a model without batching rules)."""
    if k == 1:
        one = optree.tree_map(lambda t: t[0], tree_or_tensor)
        return optree.tree_map(lambda t: t.unsqueeze(0), fn(one))
    try:
        return torch.func.vmap(fn)(tree_or_tensor)
    except Exception:
        outs = [fn(optree.tree_map(lambda t: t[i], tree_or_tensor)) for i in range(k)]
        return optree.tree_map(lambda *ts: torch.stack(ts), *outs)


class _Linearisation:
    """One batch linearised: output, Jᵀ (the vjp closure) and J (its transpose: the vjp of the
    vjp, linear in the cotangent, so it reuses the stored graph; checked once against forward
    mode, which it is replaced by where a backward is not differentiable)."""

    def __init__(self, model, params, inputs):
        self._p = {k: v.detach() for k, v in params.items()}
        self._f = lambda p: call_model(model, p, inputs)
        with torch.enable_grad():
            out, self._vjp = torch.func.vjp(self._f, self._p)
            _, self._jvp = torch.func.vjp(self._vjp, torch.zeros_like(out))
        self.out = out.detach()
        # J as the transpose of the stored vjp needs every backward to be differentiable, and a
        # custom backward marked once_differentiable would give a wrong J v without an error: one
        # probe product against forward mode decides (forward mode per product where they differ)
        g = torch.Generator(device=out.device).manual_seed(0)
        probe = {k: torch.randn(v.shape, generator=g, dtype=v.dtype, device=v.device) for k, v in self._p.items()}
        exact = torch.func.jvp(self._f, (self._p,), (probe,))[1]
        try:
            fast = self._jvp((probe,))[0]
            ok = bool((fast - exact).norm() <= 1e3 * torch.finfo(exact.dtype).eps * exact.norm().clamp_min(1e-30))
        except RuntimeError:
            ok = False
        if not ok:
            self._jvp = None

    def J(self, v: Mapping[str, Tensor]) -> Tensor:
        if self._jvp is not None:
            return self._jvp((v,))[0]
        return torch.func.jvp(self._f, (self._p,), (v,))[1]

    def JT(self, u: Tensor) -> dict[str, Tensor]:
        return self._vjp(u)[0]


class _ModelOperator(CurvatureOperator):
    """Shared driver: Jᵀ C J / N on each batch with the output-space map C of the subclass."""

    def __init__(self, model: nn.Module, params: Mapping[str, Tensor], inputs: Any = None, targets: Any = None,
                 loss: Any = "cross_entropy", data: Iterable | None = None, reduction: str = "mean"):
        params = check_params(model, params)
        super().__init__(params)
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
        if (data is None) == (inputs is None):
            raise ValueError("give either inputs (with targets) for one batch, or data=an iterable of "
                             "(inputs, targets) batches, not both")
        if data is not None and iter(data) is data:
            raise ValueError("data is a one-shot iterator: every product re-reads the data set, so pass a "
                             "re-iterable (a list of batches or a DataLoader without shuffling)")
        self.model, self.params, self.lik = model, params, get_likelihood(loss)
        self.data, self.reduction = data, reduction
        if data is None:
            check_batch(inputs, targets)
            self._single = (inputs, targets)
            self._batch = self._prepare(inputs, targets, 0)

    def _batches(self):
        for b, item in enumerate(self.data):
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise ValueError(f"data must yield (inputs, targets) pairs; batch {b} is a {type(item).__name__}")
            yield b, item[0], item[1]

    def _prepare(self, inputs, targets, b: int):
        """Per-batch state for the products (subclass: the linearisation and output-space map)."""
        raise NotImplementedError

    def _batch_matmat(self, state, X: Tensor) -> Tensor:
        raise NotImplementedError

    def _over_data(self, per_batch: Callable[[int, Any, Any], Tensor], like: Tensor) -> Tensor:
        """Σ_b N_b per_batch(b) / Σ_b N_b (``reduction="mean"``) or Σ_b N_b per_batch(b) over ``data``
        (each ``per_batch`` a mean over its batch's samples)."""
        total, count = torch.zeros_like(like), 0
        for b, inputs, targets in self._batches():
            n = check_batch(inputs, targets)
            total += n * per_batch(b, inputs, targets)
            count += n
        if count == 0:
            raise ValueError("data yielded no batches")
        return total / count if self.reduction == "mean" else total

    def _matmat(self, X: Tensor) -> Tensor:
        if self.data is None:
            return self._batch_matmat(self._batch, X)
        return self._over_data(lambda b, x, y: self._batch_matmat(self._prepare(x, y, b), X), X)

    def _batch_diag(self, inputs, targets) -> dict[str, Tensor]:
        """One batch's diagonal (of its mean), where cheap; default: none (raises, saying what to
        use instead)."""
        return CurvatureOperator.diag(self)

    def diag(self) -> Tensor:
        """The diagonal ``[P]`` without products: per batch the capture's Σ_k w_k Σ_n (∇ℓ_nk)² (the
        functional ``shape="diag"`` route: O(K·N·P), no P x P work), combined over ``data`` as the
        products are (mean over the samples, or their sum)."""
        if self.data is None:
            return self.flatten(self._batch_diag(*self._single))
        like = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        return self._over_data(lambda b, x, y: self.flatten(self._batch_diag(x, y)), like)

    def _jtcj(self, lin: _Linearisation, cot_map: Callable[[Tensor], Tensor], X: Tensor, N: int) -> Tensor:
        """(1/N) Jᵀ C J X for the block X ``[P, k]``."""
        k = X.shape[1]
        V = self._split_cols(X)

        def one(v):
            return lin.JT(cot_map(lin.J(v)))

        return self._join_cols(_vmapped(one, V, k), k) / N


#: the output Hessians ``[N, O, O]`` are formed once when they hold at most this many entries
OUTPUT_HESSIAN_ENTRIES = 2**22


class GGNOperator(_ModelOperator):
    """G = (1/N) Σ_n J_nᵀ (∇²_f ℓ_n) J_n with the output Hessians by autograd (any loss, callables
    too): formed once as ``[N, O, O]`` (O = output entries per sample; O products of the loss's
    Hessian-vector product, batched) when N·O² ≤ :data:`OUTPUT_HESSIAN_ENTRIES`, else one
    output-space Hessian-vector product per product. Per product: one J v, that, one Jᵀ u. See
    the module docstring for ``data`` / ``reduction``."""

    def _prepare(self, inputs, targets, b):
        lin = _Linearisation(self.model, self.params, inputs)
        self.lik.check(lin.out, targets)
        lik, out = self.lik, lin.out
        N = check_batch(inputs, targets)

        def g(o):
            return torch.func.grad(lambda o_: lik.per_sample(o_, targets).sum())(o)

        def hvp(u):
            return torch.func.jvp(g, (out,), (u,))[1]

        O = out[0].numel()
        if N * O * O > OUTPUT_HESSIAN_ENTRIES:
            return lin, hvp, N
        # ℓ = Σ_n ℓ_n is separable over samples: the product with e_j in every sample at once gives
        # column j of every H_n
        E = torch.eye(O, dtype=out.dtype, device=out.device).unsqueeze(1).expand(O, N, O).reshape(O, *out.shape)
        H = _vmapped(hvp, E, O).reshape(O, N, O).permute(1, 2, 0).contiguous()  # [N, O, O]: H[n, :, j]

        def cot(u):
            return (H @ u.reshape(N, O, 1)).reshape(out.shape)

        return lin, cot, N

    def _batch_matmat(self, state, X):
        lin, hvp, N = state
        return self._jtcj(lin, hvp, X, N)

    def _batch_diag(self, inputs, targets):
        return ggn(self.model, self.params, inputs, targets, self.lik, shape="diag", reduction="mean")


class FisherOperator(_ModelOperator):
    """The Fisher of the mean loss (module docstring of :mod:`curvfun.curvature` for the types):
    ``"exact"`` Jᵀ S Sᵀ J / N with the likelihood's closed-form S; ``"mc"``: Σ_m w_m r_m r_mᵀ in
    output space with r_m the NLL gradients at targets sampled **once** (at construction, from
    ``generator``; with ``data``, the generator's state is saved and restored on every pass, so
    each batch gets the same samples each time); ``"emp"``: the data targets."""

    def __init__(self, model, params, inputs=None, targets=None, loss: Any = "cross_entropy",
                 fisher_type: str = "exact", n_mc_samples: int = 1, generator: torch.Generator | None = None,
                 data: Iterable | None = None, reduction: str = "mean"):
        if fisher_type not in FISHER_TYPES:
            raise ValueError(f"unknown fisher_type {fisher_type!r}; expected one of {FISHER_TYPES}")
        lik = get_likelihood(loss)
        if fisher_type != "emp" and not lik.is_likelihood:
            lik.sample(None)  # raises the explanatory error
        if fisher_type == "mc" and n_mc_samples < 1:
            raise ValueError(f"n_mc_samples must be at least 1, got {n_mc_samples}")
        self.fisher_type, self.n_mc_samples = fisher_type, n_mc_samples
        self._gen = generator
        self._gen_state = generator.get_state() if generator is not None else None
        if data is not None and fisher_type == "mc" and generator is None:
            self._gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
            self._gen_state = self._gen.get_state()
        super().__init__(model, params, inputs, targets, loss, data, reduction)

    def _matmat(self, X):
        if self.data is not None and self._gen_state is not None:
            self._gen.set_state(self._gen_state)  # the same samples on every pass
        return super()._matmat(X)

    def _prepare(self, inputs, targets, b):
        lin = _Linearisation(self.model, self.params, inputs)
        lik, out = self.lik, lin.out
        N = check_batch(inputs, targets)
        if targets is not None:
            lik.check(out, targets)
        canon = lik.canonical_output(out)
        if self.fisher_type == "exact":
            mask = targets.reshape(N, -1) if hasattr(lik, "mask") and targets is not None else None
            c3 = canon.reshape(N, -1, canon.shape[-1])  # [N, T, C]
            S = lik.hessian_sqrt(c3, mask).detach()  # [N, T, C, K]

            def cot(u):
                u = u.reshape(c3.shape)
                return torch.einsum("...ck,...k->...c", S, torch.einsum("...ck,...c->...k", S, u)).reshape(out.shape)
        else:
            R, w = output_grad_columns(out, lik, self.fisher_type, targets, self.n_mc_samples, self._gen)
            R = (R * w.sqrt().to(R.dtype).reshape(-1, *([1] * (R.ndim - 1)))).reshape(R.shape[0], N, -1).detach()

            def cot(u):
                s = (R * u.reshape(1, N, -1)).sum(-1)  # [K, N]
                return torch.einsum("kn,knd->nd", s, R).reshape(out.shape)

        return lin, cot, N

    def _batch_matmat(self, state, X):
        lin, cot, N = state
        return self._jtcj(lin, cot, X, N)

    def diag(self):
        if self._gen_state is not None:
            self._gen.set_state(self._gen_state)  # the samples the products use
        return super().diag()

    def _batch_diag(self, inputs, targets):
        return fisher(self.model, self.params, inputs, targets, self.lik, self.fisher_type, shape="diag",
                      n_mc_samples=self.n_mc_samples, generator=self._gen, reduction="mean")


class EmpiricalFisherOperator(FisherOperator):
    """(1/N) Σ_n g_n g_nᵀ: :class:`FisherOperator` with ``fisher_type="emp"``."""

    def __init__(self, model, params, inputs=None, targets=None, loss: Any = "cross_entropy",
                 data: Iterable | None = None, reduction: str = "mean"):
        super().__init__(model, params, inputs, targets, loss, "emp", data=data, reduction=reduction)


class HessianOperator(_ModelOperator):
    """∇²_θ L of the mean loss: reverse-over-reverse, the gradient's graph built once per batch
    and reused (H v = the vjp of ∇L along v: one backward-of-backward per product)."""

    def _prepare(self, inputs, targets, b):
        lik, model = self.lik, self.model
        detached = {k: v.detach() for k, v in self.params.items()}
        lik.check(call_model(model, detached, inputs), targets)

        def L(p):
            return lik.per_sample(call_model(model, p, inputs), targets).mean()

        with torch.enable_grad():
            _, hvp = torch.func.vjp(torch.func.grad(L), detached)
        return hvp

    def _batch_matmat(self, hvp, X):
        k = X.shape[1]
        return self._join_cols(_vmapped(lambda v: hvp(v)[0], self._split_cols(X), k), k)


# --- K-FAC ------------------------------------------------------------------------------


def kron_exact_inverse(factor: Any, damping: float) -> Any:
    """The exact damped inverse (A⊗B + λI)⁻¹ of a K-FAC block through the factors' eigenbases:
    with A = Q_A Λ_A Q_Aᵀ, B = Q_B Λ_B Q_Bᵀ, the weight block's inverse is
    (Q_B⊗Q_A) diag(1/(λ_B[o]·λ_A[i] + λ)) (Q_B⊗Q_A)ᵀ on row-major vec(W), i.e.
    G ↦ Q_B [(Q_Bᵀ G Q_A) / (λ_B λ_Aᵀ + λ)] Q_Aᵀ; the separate bias block's is (B + λI)⁻¹;
    folded: the augmented [W b] block. Per group for grouped convolutions. Unlike
    :meth:`KronFactor.damped_inverse` (π-damped factored: (A+δ_A I)⁻¹ ⊗ (B+δ_B I)⁻¹) this is the
    inverse of the damped Kronecker product itself. Returns an :class:`~curvfun.kron.EKFACFactor`
    in inverse mode (``matvec``, ``to_dense``). Cost: two eigh, O(d_in³ + d_out³)."""
    if not (damping > 0 and math.isfinite(damping)):
        raise ValueError(f"damping must be a finite number > 0 (the inverse of a PSD Kronecker product), got {damping}")
    if isinstance(factor, RelaidFactor):
        return factor._wrap(kron_exact_inverse(factor.inner, damping))
    if isinstance(factor, KronRowsFactor):  # kfac(form="auto"): its Gram matrices, then as above
        factor = factor.dense()
    if not isinstance(factor, KronFactor):
        raise TypeError(f"kron_exact_inverse needs a KronFactor (Linear / convolution, kfac(form='dense')), got "
                        f"{type(factor).__name__}; use its damped_inverse()")
    eig = factor.eigh()
    o, d = eig.lamB.shape[-1], eig.lamA.shape[-1]
    lB, lA = eig.lamB.reshape(-1, o), eig.lamA.reshape(-1, d)
    S = lB.unsqueeze(-1) * lA.unsqueeze(-2)  # [G, o, d]
    s_bias = lB if factor.has_bias and not factor.folded else None
    return EKFACFactor(eig.QA, eig.QB, S, s_bias, factor.weight_shape, factor.has_bias, factor.folded,
                       inverse=True, delta=float(damping))


UNCOVERED = ("identity", "zero", "raise")


class KFACOperator(CurvatureOperator):
    """Block-diagonal over layers: the K-FAC block of each factor of :func:`curvfun.kfac` (its
    ``matvec``: B G_W A and B g_b for a Linear / convolution, the unit-wise or embedding blocks
    for the others), in the flat order of ``params``.

    Parameters of ``params`` that no factor covers (layers kfac() does not support) get
    ``uncovered="identity"`` (default: an identity block, in the operator and in its inverse,
    so a preconditioned gradient leaves them unchanged), ``"zero"`` (excluded: a zero block)
    or ``"raise"``. Cost per product: each factor's matvec (vmapped over a block [P, k])."""

    def __init__(self, factors: Mapping[str, Any], model: nn.Module, params: Mapping[str, Tensor],
                 uncovered: str = "identity"):
        params = check_params(model, params)
        super().__init__(params)
        if uncovered not in UNCOVERED:
            raise ValueError(f"unknown uncovered {uncovered!r}; expected one of {UNCOVERED}")
        infos, _ = supported_modules(model, params)
        self.factors, self.uncovered = dict(factors), uncovered
        self._model, self._params = model, params
        self._roles: dict[str, dict[str, str]] = {}
        for name in self.factors:
            if name not in infos:
                raise ValueError(f"factor {name!r} is not a supported module of the model owning entries of params; "
                                 f"build the factors with curvfun.kfac(model, params, ...)")
            self._roles[name] = dict(infos[name].keys)
        covered = {k for keys in self._roles.values() for k in keys.values()}
        self._rest = [k for k in self._names if k not in covered]
        if self._rest and uncovered == "raise":
            raise ValueError(f"no K-FAC factor covers {self._rest}; exclude them from params, or pass "
                             f"uncovered='identity' / 'zero'")

    def _matmat(self, X):
        k = X.shape[1]
        V = self._split_cols(X)
        out: dict[str, Tensor] = {}
        for name, f in self.factors.items():
            roles = self._roles[name]
            local = {r: V[key] for r, key in roles.items()}
            res = _vmapped(f.matvec, local, k)
            for r, key in roles.items():
                out[key] = res[r]
        for key in self._rest:
            out[key] = V[key] if self.uncovered == "identity" else torch.zeros_like(V[key])
        return self._join_cols(out, k)

    def inverse(self, damping: float, exact: bool = False, heuristic: str = "pi") -> "KFACOperator":
        """The damped inverse. ``exact=False``: each factor's ``damped_inverse(damping, heuristic)``
        (π-damped factored Tikhonov for Kronecker blocks: (B+δ_B)⁻¹ G (A+δ_A)⁻¹); ``exact=True``:
        (A⊗B + λI)⁻¹ by :func:`kron_exact_inverse` for Kronecker blocks and (block + λI)⁻¹ for
        unit-wise / diagonal ones (embedding factors have no exact route: raises). Uncovered
        parameters keep their block (identity or zero)."""
        inv = {}
        for name, f in self.factors.items():
            if not exact:
                inv[name] = f.damped_inverse(damping, heuristic)
            elif isinstance(f, (KronFactor, RelaidFactor, KronRowsFactor)):
                inv[name] = kron_exact_inverse(f, damping)
            elif isinstance(f, (UnitWiseFactor, DiagFactor)):
                inv[name] = f.damped_inverse(damping)
            else:
                raise TypeError(f"no exact damped inverse for the {type(f).__name__} of {name!r}; use exact=False")
        return KFACOperator(inv, self._model, self._params, self.uncovered)

    def diag(self) -> Tensor:
        """The diagonal ``[P]``: O(d_in + d_out) per Kronecker block (diag B ⊗ diag A; the
        exact inverse: (Q_B∘Q_B) (1/(λ_Bλ_Aᵀ+λ)) (Q_A∘Q_A)ᵀ), the factor's dense block elsewhere."""
        out: dict[str, Tensor] = {}
        for name, f in self.factors.items():
            roles = self._roles[name]
            local = _factor_diag(f, {r: torch.zeros(self._shapes[key], dtype=self.dtype, device=self.device)
                                     for r, key in roles.items()})
            for r, key in roles.items():
                out[key] = local[r]
        for key in self._rest:
            fill = 1.0 if self.uncovered == "identity" else 0.0
            out[key] = torch.full(self._shapes[key], fill, dtype=self.dtype, device=self.device)
        return torch.cat([out[k].reshape(-1) for k in self._names])


def _factor_diag(f: Any, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The diagonal of one factor's block on ``{"weight", "bias"}`` shaped like ``like``."""
    if isinstance(f, RelaidFactor):  # a permutation of the inner matrix: diag by unit products
        return _diag_by_products(f, like)
    if isinstance(f, KronRowsFactor):
        f = f.dense()
    if isinstance(f, KronFactor) or (isinstance(f, EKFACFactor) and not f.folded):
        if isinstance(f, KronFactor):
            if f.folded:
                return _diag_by_products(f, like)
            A = f.A.reshape(-1, *f.A.shape[-2:])
            B = f.B.reshape(-1, *f.B.shape[-2:])
            dw = torch.diagonal(B, dim1=-2, dim2=-1).unsqueeze(-1) * torch.diagonal(A, dim1=-2, dim2=-1).unsqueeze(-2)
            db = torch.diagonal(B, dim1=-2, dim2=-1)
        else:
            QA = f.QA.reshape(-1, *f.QA.shape[-2:])
            QB = f.QB.reshape(-1, *f.QB.shape[-2:])
            dw = QB.pow(2) @ f._scale(f.S) @ QA.pow(2).transpose(-1, -2)
            db = (QB.pow(2) @ f._scale(f.s_bias).unsqueeze(-1)).squeeze(-1) if f.s_bias is not None else None
        out = {}
        if "weight" in like:
            out["weight"] = dw.reshape(like["weight"].shape)
        if "bias" in like:
            out["bias"] = db.reshape(like["bias"].shape)
        return out
    if isinstance(f, UnitWiseFactor):
        vals = f.diag().values
        return {r: vals[r].reshape(like[r].shape) for r in like}
    if isinstance(f, DiagFactor):
        return {r: f.values[r] for r in like}
    return _diag_by_products(f, like)


def _diag_by_products(f: Any, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Diagonal by unit-vector products over the block (O(p) matvecs, vmapped)."""
    keys = list(like)
    sizes = [like[r].numel() for r in keys]
    p = sum(sizes)
    check_dense_size(f"KFACOperator.diag() of a {type(f).__name__} block", (p, p), like[keys[0]].dtype,
                     like[keys[0]].device, instead="use to_dense() of that factor where it is smaller")
    E = torch.eye(p, dtype=like[keys[0]].dtype, device=like[keys[0]].device)
    cols, i = {}, 0
    for r, n in zip(keys, sizes):
        cols[r] = E[:, i : i + n].reshape(p, *like[r].shape)
        i += n
    res = _vmapped(f.matvec, cols, p)
    flat = torch.cat([res[r].reshape(p, -1) for r in keys], 1)
    d, i, out = torch.diagonal(flat), 0, {}
    for r, n in zip(keys, sizes):
        out[r] = d[i : i + n].reshape(like[r].shape)
        i += n
    return out
