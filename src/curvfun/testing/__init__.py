"""``curvfun.testing``: property-test curvature code against a dense autograd ground truth.

Public and documented, for curvfun's own tests and for users testing their own code:

* :mod:`curvfun.testing.reference` — dense ground truth in plain autograd (per-sample loops,
  ``torch.autograd.functional``): per-sample gradients, Jacobians, Hessian, GGN, empirical and
  exact Fisher (by enumeration over classes / Bernoulli outcomes, Gaussian closed form), all
  of the **mean** loss, dense matrices indexed in the insertion order of ``params``.
* :mod:`curvfun.testing.strategies` — hypothesis strategies: small float64 models (MLPs,
  CNNs with drawn kernel/stride/padding/dilation/groups, Embedding/LayerNorm sequence models
  with ``[N, T, C]`` outputs, eval-mode BatchNorm models, models linear in their parameters),
  params mappings, batches with valid targets, whole :class:`~curvfun.testing.strategies.Problem` s,
  SPD matrices and tensor pytrees.
* :mod:`curvfun.testing.checks` — assertions (``assert_close_trees``, ``assert_symmetric_psd``,
  ``assert_matvec_matches_dense``, ...) and identity checks (``check_fisher_equals_ggn``,
  ``check_curvature``, ``check_vp``, ``check_per_sample_grads``) that take the implementation
  under test as an argument.

Example::

    from hypothesis import given
    from curvfun.testing import checks, strategies as cst

    @given(cst.problems(loss="cross_entropy"))
    def test_fisher_is_ggn(pb):
        checks.check_fisher_equals_ggn(*pb.args)

Importing this package needs ``hypothesis`` (a test extra of curvfun).
"""

from . import reference, checks, strategies
from .checks import (
    assert_close,
    assert_close_trees,
    assert_symmetric,
    assert_symmetric_psd,
    assert_matvec_matches_dense,
    assert_diag_matches_dense,
    assert_blocks_match_dense,
    check_per_sample_grads,
    check_fisher_equals_ggn,
    check_curvature,
    check_vp,
    relative_error,
)
from .strategies import ModelCase, Problem

__all__ = [
    "reference",
    "checks",
    "strategies",
    "ModelCase",
    "Problem",
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
    "relative_error",
]
