"""Reusable assertions and curvature identity checks.

Two layers:

* **Assertions** on tensors, pytrees and matrices, each raising ``AssertionError`` with a
  message that says what differed and by how much: :func:`assert_close`,
  :func:`assert_close_trees`, :func:`assert_symmetric`, :func:`assert_symmetric_psd`,
  :func:`assert_matvec_matches_dense`, :func:`assert_diag_matches_dense`,
  :func:`assert_blocks_match_dense`.
* **Identity checks** that run an implementation against the dense autograd reference
  (:mod:`curvfun.testing.reference`): :func:`check_per_sample_grads`,
  :func:`check_fisher_equals_ggn`, :func:`check_curvature`, :func:`check_vp`. Each takes the
  implementation to test as an argument with curvfun's signature (defaulting to curvfun's own
  function), so the same checks test your own code::

      from curvfun.testing import checks, strategies as cst
      from hypothesis import given

      @given(cst.problems(loss="mse"))
      def test_my_ggn(pb):
          checks.check_curvature("ggn", *pb.args, fn=my_ggn)   # my_ggn(model, params, x, y, loss=, shape=)

      M = torch.tensor([[1.0, 2.0], [2.0, 1.0]])     # eigenvalues 3 and -1
      checks.assert_symmetric_psd(M)                  # raises AssertionError: not PSD

Tolerances default to float64 levels (``rtol=1e-7``, ``atol=1e-9`` relative to the scale of
the expected value); pass looser ones for float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import optree
import torch
from torch import Tensor

from . import reference as ref

__all__ = [
    "relative_error",
    "assert_close",
    "assert_close_trees",
    "assert_symmetric",
    "assert_symmetric_psd",
    "assert_matvec_matches_dense",
    "assert_diag_matches_dense",
    "assert_blocks_match_dense",
    "check_per_sample_grads",
    "check_fisher_equals_ggn",
    "check_curvature",
    "check_vp",
]

RTOL = 1e-7
ATOL = 1e-9


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """‖actual − expected‖ / max(‖expected‖, tiny) (Frobenius norms)."""
    den = expected.norm().item()
    return (actual - expected).norm().item() / max(den, 1e-300)


def assert_close(actual: Tensor, expected: Tensor, rtol: float = RTOL, atol: float = ATOL, what: str = "value") -> None:
    """``|actual − expected| ≤ atol·scale + rtol·|expected|`` entrywise, same shape.

    ``scale`` is ``max(1, max|expected|)``, so ``atol`` is relative to the magnitude of the
    expected tensor. Raises ``AssertionError`` naming ``what``, the worst entry and the
    relative Frobenius error.
    """
    if not isinstance(actual, Tensor):
        raise AssertionError(f"{what}: expected a tensor, got {type(actual).__name__}")
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    if a.numel() == 0:
        return
    if not torch.isfinite(a).all():
        raise AssertionError(f"{what}: contains non-finite values")
    scale = max(1.0, e.abs().max().item())
    err = (a - e).abs()
    bound = atol * scale + rtol * e.abs()
    bad = err > bound
    if bad.any():
        i = int(torch.argmax(err - bound))
        idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), a.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} entries differ; worst at {idx}: "
            f"{a.reshape(-1)[i].item():.12g} vs expected {e.reshape(-1)[i].item():.12g} "
            f"(rtol={rtol}, atol={atol}·{scale:.3g}); relative Frobenius error {relative_error(a, e):.3e}"
        )


def assert_close_trees(actual: Any, expected: Any, rtol: float = RTOL, atol: float = ATOL,
                       check_order: bool = True, what: str = "tree") -> None:
    """Two pytrees of tensors are equal in structure and leafwise close.

    For mappings the key sets must agree, and with ``check_order`` also their order (curvfun
    returns dicts in the order of ``params``). Leaves are compared with :func:`assert_close`.
    """
    if isinstance(expected, Mapping):
        if not isinstance(actual, Mapping):
            raise AssertionError(f"{what}: expected a mapping, got {type(actual).__name__}")
        ka, ke = list(actual.keys()), list(expected.keys())
        if set(ka) != set(ke):
            raise AssertionError(
                f"{what}: keys differ: missing {sorted(set(ke) - set(ka), key=str)}, "
                f"unexpected {sorted(set(ka) - set(ke), key=str)}"
            )
        if check_order and ka != ke:
            raise AssertionError(f"{what}: key order {ka} != expected {ke}")
        for k in ke:
            assert_close_trees(actual[k], expected[k], rtol, atol, check_order, what=f"{what}[{k!r}]")
        return
    if isinstance(expected, Tensor):
        assert_close(actual, expected, rtol, atol, what=what)
        return
    la, sa = optree.tree_flatten(actual)
    le, se = optree.tree_flatten(expected)
    if sa != se:
        raise AssertionError(f"{what}: structures differ:\n  {sa}\n  {se}")
    for i, (x, y) in enumerate(zip(la, le)):
        assert_close(x, y, rtol, atol, what=f"{what} leaf {i}")


def assert_symmetric(M: Tensor, atol: float = 1e-10, what: str = "matrix") -> None:
    """``M`` is square and ``|M − Mᵀ| ≤ atol·max(1, max|M|)`` entrywise."""
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise AssertionError(f"{what}: not a square matrix, shape {tuple(M.shape)}")
    scale = max(1.0, M.abs().max().item()) if M.numel() else 1.0
    asym = (M - M.T).abs().max().item() if M.numel() else 0.0
    if asym > atol * scale:
        raise AssertionError(f"{what}: not symmetric, max |M - Mᵀ| = {asym:.3e} > {atol * scale:.3e}")


def assert_symmetric_psd(M: Tensor, atol: float = 1e-9, rtol: float = 1e-9, what: str = "matrix") -> None:
    """``M`` is symmetric (:func:`assert_symmetric` with ``atol``) and positive semi-definite:
    its smallest eigenvalue is ≥ −(atol + rtol·max|λ|).

    >>> assert_symmetric_psd(torch.eye(2))
    >>> assert_symmetric_psd(torch.tensor([[1.0, 2.0], [2.0, 1.0]]))  # doctest: +SKIP
    AssertionError: matrix: not positive semi-definite, smallest eigenvalue -1 ...
    """
    assert_symmetric(M, atol, what)
    if M.numel() == 0:
        return
    lam = torch.linalg.eigvalsh(((M + M.T) / 2).to(torch.float64))
    tol = atol + rtol * lam.abs().max().item()
    if lam[0].item() < -tol:
        raise AssertionError(
            f"{what}: not positive semi-definite, smallest eigenvalue {lam[0].item():.6g} < -{tol:.3e}"
        )


def assert_matvec_matches_dense(matvec: Callable[[Any], Any], dense: Tensor, like: Any, n_vectors: int = 3,
                                generator: torch.Generator | None = None, rtol: float = RTOL, atol: float = ATOL,
                                what: str = "matvec") -> None:
    """``matvec(v)`` equals ``dense @ v`` for ``n_vectors`` random like-shaped ``v`` and for
    the first unit vector. Vectors are flattened in the insertion order of ``like``
    (:func:`curvfun.testing.reference.flatten`); the result must have ``like``'s structure."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    base = ref.flatten(like)
    P = base.numel()
    vecs = [torch.randn(P, generator=g, dtype=base.dtype) for _ in range(n_vectors)]
    if P:
        e = torch.zeros(P, dtype=base.dtype)
        e[0] = 1
        vecs.append(e)
    for i, v in enumerate(vecs):
        out = matvec(ref.unflatten(v, like))
        expected = ref.unflatten(dense @ v, like)
        assert_close_trees(out, expected, rtol, atol, what=f"{what}(v_{i})")


def assert_diag_matches_dense(diag: Mapping[str, Tensor], dense: Tensor, params: Mapping[str, Tensor],
                              rtol: float = RTOL, atol: float = ATOL, what: str = "diag") -> None:
    """A params-like diagonal equals the diagonal of the dense ``[P, P]`` matrix."""
    assert_close_trees(diag, ref.diag_of(dense, params), rtol, atol, what=what)


def assert_blocks_match_dense(blocks: Mapping[str, Tensor], dense: Tensor, params: Mapping[str, Tensor],
                              rtol: float = RTOL, atol: float = ATOL, what: str = "blocks") -> None:
    """Module blocks (module name -> ``[P_m, P_m]``) equal the blocks of the dense matrix
    (:func:`curvfun.testing.reference.blocks_of`). Block key order is not checked."""
    assert_close_trees(blocks, ref.blocks_of(dense, params), rtol, atol, check_order=False, what=what)


# --------------------------------------------------------------------------------------
# identity checks against the reference
# --------------------------------------------------------------------------------------
def _impl(fn: Callable | None, name: str) -> Callable:
    if fn is not None:
        return fn
    import curvfun

    return getattr(curvfun, name)


def check_per_sample_grads(model, params, inputs, targets, loss="cross_entropy", per_sample_grads=None,
                           rtol: float = RTOL, atol: float = ATOL) -> dict[str, Tensor]:
    """``per_sample_grads`` (default :func:`curvfun.per_sample_grads`) equals the autograd
    loop, and the mean over samples equals the gradient of the mean loss. Returns the
    computed per-sample gradients."""
    fn = _impl(per_sample_grads, "per_sample_grads")
    got = fn(model, params, inputs, targets, loss=loss)
    assert_close_trees(got, ref.per_sample_grads(model, params, inputs, targets, loss), rtol, atol,
                       what="per_sample_grads")
    mean = {k: v.mean(0) for k, v in got.items()}
    assert_close_trees(mean, ref.batch_grad(model, params, inputs, targets, loss), rtol, atol,
                       what="mean of per-sample grads vs batch gradient")
    return got


def check_fisher_equals_ggn(model, params, inputs, targets, loss="cross_entropy", fisher=None, ggn=None,
                            rtol: float = RTOL, atol: float = ATOL) -> tuple[Tensor, Tensor]:
    """The exact Fisher equals the GGN (true for cross-entropy, MSE and BCE, the exponential
    families on their natural parameters), both equal the dense reference GGN and are
    symmetric PSD. ``fisher(model, params, x, y, loss=, fisher_type="exact", shape="full")``
    and ``ggn(model, params, x, y, loss=, shape="full")`` default to curvfun's."""
    F = _impl(fisher, "fisher")(model, params, inputs, targets, loss=loss, fisher_type="exact", shape="full")
    G = _impl(ggn, "ggn")(model, params, inputs, targets, loss=loss, shape="full")
    expected = ref.ggn(model, params, inputs, targets, loss)
    assert_close(G, expected, rtol, atol, what="GGN vs reference")
    assert_close(F, G, rtol, atol, what="exact Fisher vs GGN")
    assert_close(F, ref.exact_fisher(model, params, inputs, targets, loss), rtol, atol,
                 what="exact Fisher vs reference enumeration")
    assert_symmetric_psd(F, what="exact Fisher")
    assert_symmetric_psd(G, what="GGN")
    return F, G


_REFERENCE = {
    "ggn": lambda *a: ref.ggn(*a),
    "hessian": lambda *a: ref.hessian(*a),
    "fisher_exact": lambda *a: ref.exact_fisher(*a),
    "fisher_emp": lambda *a: ref.emp_fisher(*a),
}


def _call_kind(kind: str, fn: Callable | None, model, params, inputs, targets, loss, **kw):
    if kind.startswith("fisher_"):
        return _impl(fn, "fisher")(model, params, inputs, targets, loss=loss, fisher_type=kind[7:], **kw)
    return _impl(fn, kind)(model, params, inputs, targets, loss=loss, **kw)


def check_curvature(kind: str, model, params, inputs, targets, loss="cross_entropy", fn=None,
                    shapes=("full", "diag", "block"), rtol: float = RTOL, atol: float = ATOL) -> Tensor:
    """``kind`` in ``"ggn"``, ``"hessian"``, ``"fisher_exact"``, ``"fisher_emp"``: the
    implementation's ``shape="full"`` matrix equals the dense reference, and its ``"diag"`` /
    ``"block"`` results equal the diagonal / module blocks of that reference. ``fn`` has
    curvfun's signature (``fisher`` with ``fisher_type=``). Returns the reference matrix."""
    if kind not in _REFERENCE:
        raise ValueError(f"check_curvature: kind must be one of {sorted(_REFERENCE)}, got {kind!r}")
    expected = _REFERENCE[kind](model, params, inputs, targets, loss)
    for shape in shapes:
        got = _call_kind(kind, fn, model, params, inputs, targets, loss, shape=shape)
        if shape == "full":
            assert_close(got, expected, rtol, atol, what=f"{kind} full")
        elif shape == "diag":
            assert_diag_matches_dense(got, expected, params, rtol, atol, what=f"{kind} diag")
        elif shape == "block":
            assert_blocks_match_dense(got, expected, params, rtol, atol, what=f"{kind} block")
        else:
            raise ValueError(f"check_curvature: unknown shape {shape!r}")
    return expected


def check_vp(kind: str, model, params, inputs, targets, loss="cross_entropy", fn=None, n_vectors: int = 2,
             generator: torch.Generator | None = None, rtol: float = RTOL, atol: float = ATOL) -> None:
    """``kind`` in ``"ggn"``, ``"hessian"``, ``"fisher_exact"``, ``"fisher_emp"``: the
    matrix-free product (``fn`` with the signature of ``curvfun.{ggn,hessian,fisher}_vp``,
    ``vector`` as 5th positional argument) equals the dense reference times the vector."""
    if kind not in _REFERENCE:
        raise ValueError(f"check_vp: kind must be one of {sorted(_REFERENCE)}, got {kind!r}")
    dense = _REFERENCE[kind](model, params, inputs, targets, loss)
    if kind.startswith("fisher_"):
        f = _impl(fn, "fisher_vp")

        def mv(v):
            return f(model, params, inputs, targets, v, loss=loss, fisher_type=kind[7:])
    else:
        f = _impl(fn, f"{kind}_vp")

        def mv(v):
            return f(model, params, inputs, targets, v, loss=loss)

    assert_matvec_matches_dense(mv, dense, dict(params), n_vectors, generator, rtol, atol, what=f"{kind}_vp")
