"""Every registered convolution (1-D/2-D/3-D, transposed, any stride / dilation / groups /
padding / padding_mode) and MultiheadAttention in every configuration, drawn by
:mod:`curvfun.testing.strategies`, against plain autograd in float64: per-sample gradients and
norms, the exact Fisher diagonal, and a Kronecker factor for every layer (no fallback)."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings

import curvfun
from curvfun.capture import CaptureFallbackWarning
from curvfun.testing import checks, reference as ref, strategies as cst

TOL = dict(rtol=1e-9, atol=1e-11)

pytestmark = pytest.mark.usefixtures("one_thread")


@settings(deadline=None)
@given(cst.problems(loss="cross_entropy", kinds=("conv", "attention")))
def test_drawn_convolutions_and_attention_are_captured_exactly(pb):
    model, params, x, y = pb.model, pb.params, pb.inputs, pb.targets
    with warnings.catch_warnings():
        warnings.simplefilter("error", CaptureFallbackWarning)
        got = curvfun.per_sample_grads(model, params, x, y)
        norms = curvfun.per_sample_grad_norms(model, params, x, y)
        diag = curvfun.fisher(model, params, x, y, fisher_type="exact", shape="diag")
        factors = curvfun.kfac(model, params, x, y, fisher_type="emp", on_unsupported="raise")
    expected = ref.per_sample_grads(model, params, x, y)
    checks.assert_close_trees(got, expected, **TOL, what=repr(pb.case))
    dense = torch.cat([expected[k].reshape(pb.N, -1) for k in params], 1)
    checks.assert_close(norms, dense.norm(dim=1), **TOL, what="norms")
    checks.assert_diag_matches_dense(diag, ref.fisher(model, params, x, y, fisher_type="exact"), params, **TOL,
                                     what="exact Fisher diagonal")
    assert factors  # on_unsupported="raise": every module owning an entry of params has its factor
