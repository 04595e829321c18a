"""Bad input gets a clear ValueError / TypeError (message asserted), never a silent wrong answer:
mismatched batch sizes, params that do not match the model, unknown loss / fisher_type /
shape, cross-entropy targets out of range or of float dtype, likelihood-only Fisher types with
a plain loss callable; every function that takes the argument is checked."""

import re

import pytest
import torch
from torch import nn

import curvfun
from curvfun.testing import strategies as cst


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: one intra-op thread is faster, and on a loaded 2-core machine
    two threads made this module ~10x slower (spin-waiting). Restored after each test."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _setup():
    torch.manual_seed(0)
    model = cst._init_(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)), seed=0)
    params = dict(model.named_parameters())
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1])
    return model, params, x, y


def _ones(params):
    return {k: torch.ones_like(v.detach()) for k, v in params.items()}


# every public function that takes (model, params, inputs, targets, ..., loss=...)
TARGET_FNS = {
    "per_sample_grads": lambda m, p, x, y, **kw: curvfun.per_sample_grads(m, p, x, y, **kw),
    "per_sample_grad_norms": lambda m, p, x, y, **kw: curvfun.per_sample_grad_norms(m, p, x, y, **kw),
    "fisher_exact": lambda m, p, x, y, **kw: curvfun.fisher(m, p, x, y, fisher_type="exact", **kw),
    "fisher_mc": lambda m, p, x, y, **kw: curvfun.fisher(m, p, x, y, fisher_type="mc", **kw),
    "fisher_emp": lambda m, p, x, y, **kw: curvfun.fisher(m, p, x, y, fisher_type="emp", **kw),
    "fisher_diag": lambda m, p, x, y, **kw: curvfun.fisher(m, p, x, y, shape="diag", **kw),
    "ggn": lambda m, p, x, y, **kw: curvfun.ggn(m, p, x, y, **kw),
    "hessian": lambda m, p, x, y, **kw: curvfun.hessian(m, p, x, y, **kw),
    "fisher_vp": lambda m, p, x, y, **kw: curvfun.fisher_vp(m, p, x, y, _ones(p), **kw),
    "fisher_vp_mc": lambda m, p, x, y, **kw: curvfun.fisher_vp(m, p, x, y, _ones(p), fisher_type="mc", **kw),
    "fisher_vp_emp": lambda m, p, x, y, **kw: curvfun.fisher_vp(m, p, x, y, _ones(p), fisher_type="emp", **kw),
    "ggn_vp": lambda m, p, x, y, **kw: curvfun.ggn_vp(m, p, x, y, _ones(p), **kw),
    "hessian_vp": lambda m, p, x, y, **kw: curvfun.hessian_vp(m, p, x, y, _ones(p), **kw),
}
ALL = list(TARGET_FNS)


# functions that take (model, params, inputs[, extra]) only
PARAM_FNS = {
    "jacobian": lambda m, p, x: curvfun.jacobian(m, p, x),
    "jvp": lambda m, p, x: curvfun.jvp(m, p, x, _ones(p)),
    "vjp": lambda m, p, x: curvfun.vjp(m, p, x, torch.ones(x.shape[0], 3)),
}


@pytest.mark.parametrize("fn", ALL)
def test_mismatched_batch_sizes(fn):
    model, params, x, y = _setup()
    with pytest.raises(ValueError, match=r"(?i)batch") as e:
        TARGET_FNS[fn](model, params, x, torch.tensor([0, 1, 2]))
    assert "4" in str(e.value) and "3" in str(e.value), str(e.value)


@pytest.mark.parametrize("fn", ALL + list(PARAM_FNS))
def test_params_with_unknown_name(fn):
    model, params, x, y = _setup()
    bad = {"0.weight": params["0.weight"], "9.weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=re.escape("'9.weight'") + ".*not a parameter"):
        _call(fn, model, bad, x, y)


@pytest.mark.parametrize("fn", ALL + list(PARAM_FNS))
def test_params_with_wrong_shape(fn):
    model, params, x, y = _setup()
    bad = {"0.weight": torch.zeros(3, 4), "0.bias": params["0.bias"]}
    with pytest.raises(ValueError, match=re.escape("(3, 4)") + ".*" + re.escape("(4, 3)")):
        _call(fn, model, bad, x, y)


@pytest.mark.parametrize("call", [
    lambda m, p, x, y, v: curvfun.per_sample_grads(m, p, x, y),
    lambda m, p, x, y, v: curvfun.fisher(m, p, x, y),
    lambda m, p, x, y, v: curvfun.ggn(m, p, x, y),
    lambda m, p, x, y, v: curvfun.hessian_vp(m, p, x, y, v),
    lambda m, p, x, y, v: curvfun.jacobian(m, p, x),
], ids=["per_sample_grads", "fisher", "ggn", "hessian_vp", "jacobian"])
def test_params_not_a_mapping(call):
    model, params, x, y = _setup()
    with pytest.raises(TypeError, match="mapping"):
        call(model, list(params.values()), x, y, _ones(params))


def _call(fn, model, params, x, y):
    if fn in PARAM_FNS:
        return PARAM_FNS[fn](model, params, x)
    return TARGET_FNS[fn](model, params, x, y)


@pytest.mark.parametrize("fn", ALL)
def test_unknown_loss_lists_known_ones(fn):
    model, params, x, y = _setup()
    with pytest.raises(ValueError, match="crossentropy") as e:
        TARGET_FNS[fn](model, params, x, y, loss="crossentropy")
    for name in ("cross_entropy", "mse", "bce_with_logits"):
        assert name in str(e.value), str(e.value)


@pytest.mark.parametrize("call", [
    lambda m, p, x, y: curvfun.fisher(m, p, x, y, fisher_type="kfac"),
    lambda m, p, x, y: curvfun.fisher(m, p, x, y, fisher_type="kfac", shape="diag"),
    lambda m, p, x, y: curvfun.fisher_vp(m, p, x, y, _ones(p), fisher_type="kfac"),
], ids=["fisher", "fisher_diag", "fisher_vp"])
def test_unknown_fisher_type(call):
    model, params, x, y = _setup()
    with pytest.raises(ValueError, match="'kfac'") as e:
        call(model, params, x, y)
    for name in ("exact", "mc", "emp"):
        assert name in str(e.value), str(e.value)


@pytest.mark.parametrize("call", [
    lambda m, p, x, y: curvfun.fisher(m, p, x, y, shape="dense"),
    lambda m, p, x, y: curvfun.fisher(m, p, x, y, fisher_type="emp", shape="dense"),
    lambda m, p, x, y: curvfun.ggn(m, p, x, y, shape="dense"),
    lambda m, p, x, y: curvfun.hessian(m, p, x, y, shape="dense"),
], ids=["fisher", "fisher_emp", "ggn", "hessian"])
def test_unknown_shape(call):
    model, params, x, y = _setup()
    with pytest.raises(ValueError, match="'dense'") as e:
        call(model, params, x, y)
    for name in ("full", "block", "diag"):
        assert name in str(e.value), str(e.value)


@pytest.mark.parametrize("fn", ALL)
@pytest.mark.parametrize("bad", [3, -5, 100], ids=["C", "negative", "large"])
def test_cross_entropy_targets_out_of_range(fn, bad):
    model, params, x, y = _setup()
    y = y.clone()
    y[1] = bad
    with pytest.raises(ValueError, match=re.escape("[0, 2]")):
        TARGET_FNS[fn](model, params, x, y)


@pytest.mark.parametrize("fn", ALL)
def test_cross_entropy_float_targets(fn):
    model, params, x, y = _setup()
    with pytest.raises((ValueError, TypeError), match=r"(?i)integer.*float64|float64.*integer"):
        TARGET_FNS[fn](model, params, x, y.to(torch.float64))


@pytest.mark.parametrize("fn", ["per_sample_grads", "fisher_exact", "fisher_emp", "ggn", "hessian_vp"])
def test_cross_entropy_targets_of_wrong_shape(fn):
    model, params, x, y = _setup()
    with pytest.raises(ValueError, match=r"targets of shape \(4, 1\)"):
        TARGET_FNS[fn](model, params, x, y.unsqueeze(1))


@pytest.mark.parametrize("fn", ["per_sample_grads", "fisher_exact", "ggn", "hessian", "fisher_vp"])
def test_mse_and_bce_targets_that_do_not_fit(fn):
    model, params, x, y = _setup()
    with pytest.raises(ValueError, match=r"mse: targets of shape \(4, 2\)"):
        TARGET_FNS[fn](model, params, x, torch.zeros(4, 2), loss="mse")
    with pytest.raises(ValueError, match=r"bce_with_logits: targets must lie in \[0, 1\]"):
        TARGET_FNS[fn](model, params, x, torch.full((4, 3), 2.0), loss="bce_with_logits")


@pytest.mark.parametrize("fn", ["fisher_exact", "fisher_mc", "fisher_diag", "fisher_vp", "fisher_vp_mc"])
def test_likelihood_fisher_types_reject_a_plain_callable(fn):
    model, params, x, y = _setup()
    with pytest.raises(ValueError, match="needs a likelihood"):
        TARGET_FNS[fn](model, params, x, torch.zeros(4, 3), loss=cst.logcosh_loss)


@pytest.mark.parametrize("fn", ["fisher_emp", "ggn", "hessian", "per_sample_grads", "fisher_vp_emp", "ggn_vp"])
def test_a_plain_callable_is_accepted_where_only_gradients_are_needed(fn):
    """The counterpart of the previous test: these do not raise, and give finite values."""
    model, params, x, y = _setup()
    out = TARGET_FNS[fn](model, params, x, torch.zeros(4, 3), loss=cst.logcosh_loss)
    leaves = list(out.values()) if isinstance(out, dict) else [out]
    assert all(torch.isfinite(t).all() for t in leaves)


def test_loss_callable_returning_the_wrong_shape():
    model, params, x, y = _setup()
    with pytest.raises(ValueError, match=r"per-sample losses of shape \[N\]"):
        curvfun.per_sample_grads(model, params, x, torch.zeros(4, 3), loss=lambda o, t: ((o - t) ** 2).sum())


@pytest.mark.parametrize("fn", ["fisher_vp", "ggn_vp", "hessian_vp"])
def test_vp_vector_that_does_not_match_params(fn):
    model, params, x, y = _setup()
    f = getattr(curvfun, fn)
    v = _ones(params)
    v.pop("0.bias")
    with pytest.raises(ValueError, match="same keys as params"):
        f(model, params, x, y, v)
    v = _ones(params)
    v["0.bias"] = torch.ones(5)
    with pytest.raises(ValueError, match=r"\(5,\)"):
        f(model, params, x, y, v)


@pytest.mark.parametrize("fn", ["per_sample_grads", "per_sample_grad_norms", "fisher_emp"])
def test_train_mode_batchnorm_is_rejected_for_per_sample_quantities(fn):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double().train()
    params = dict(model.named_parameters())
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"(?i)batchnorm.*train.*eval\(\)"):
        TARGET_FNS[fn](model, params, x, torch.tensor([0, 1, 2, 0]))


def test_mc_sample_count_and_estimator_arguments():
    model, params, x, y = _setup()
    with pytest.raises(ValueError, match="n_mc_samples"):
        curvfun.fisher(model, params, x, y, fisher_type="mc", n_mc_samples=0)
    like = _ones(params)
    mv = lambda v: v
    with pytest.raises(ValueError, match="n_samples"):
        curvfun.hutchinson_diag(mv, like, n_samples=0)
    with pytest.raises(ValueError, match="k must lie in"):
        curvfun.top_eigenvalues(mv, like, k=0)
    with pytest.raises(ValueError, match="'qr'"):
        curvfun.top_eigenvalues(mv, like, k=1, method="qr")
